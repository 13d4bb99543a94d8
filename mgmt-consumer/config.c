/* config.c -- see consumer.h */
#include "consumer.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "conf.h"

int consumer_parse_config(const char *file, struct ccfg *c, json_t **root)
{
	static const char *const keys[] = {"broker",
	                                   "queue",
	                                   "sink",
	                                   "dedup_window",
	                                   "metrics",
	                                   "log_level",
	                                   "max_message_bytes",
	                                   NULL};
	static const char *const bkeys[] = {"host", "port", "hosts",     "vhost",
	                                    "tls",  "auth", "heartbeat", NULL};
	static const char *const tkeys[] = {"ca", "cert", "key", "verify_hostname", NULL};
	static const char *const akeys[] = {"mechanism", "user", "password", NULL};
	static const char *const qkeys[] = {
	        "name",     "type",   "declare",      "exchange", "binding_key", "prefetch",
	        "batch_ms", "shards", "shard_prefix", "instance", "instances",   "others_after_ms",
	        NULL};
	static const char *const skeys[] = {
	        "type", "dir", "max_file_bytes", "path", "conninfo", "retention_days", NULL};
	static const char *const sinks[] = {"sqlite", "postgresql", "jsonl", NULL};
	static const char *const mkeys[] = {"listen", "stale_after_intervals", "max_vms", NULL};
	static const char *const mechs[] = {"PLAIN", "EXTERNAL", NULL};
	static const char *const types[] = {"classic", "quorum", NULL};
	struct conf_ctx ctx;
	json_t *b = NULL, *t = NULL, *a = NULL, *q = NULL, *s = NULL, *m = NULL, *hosts = NULL, *h;
	unsigned mech = 0, type = 1, sink = 0;
	uint64_t port = 0, hb = 30;
	size_t i;
	int r = 0;

	conf_ctx_init(&ctx, file);
	if (conf_load_file(&ctx, root) < 0)
		goto fail;
	r |= conf_check_keys(&ctx, *root, "", keys);
	r |= conf_get_object(&ctx, *root, "", "broker", true, &b);
	if (b) {
		r |= conf_check_keys(&ctx, b, "broker", bkeys);
		r |= conf_get_object(&ctx, b, "broker", "tls", false, &t);
		port = t ? 5671 : 5672;
		r |= conf_get_uint(&ctx, b, "broker", "port", false, 1, 65535, &port);
		r |= conf_get_array(&ctx, b, "broker", "hosts", false, &hosts);
		r |= conf_get_string(&ctx, b, "broker", "host", !hosts, &c->hosts[0]);
		c->ports[0] = port;
		c->nhosts = c->hosts[0] ? 1 : 0;
		json_array_foreach(hosts, i, h)
		{
			char p[64];
			conf_path_index(p, sizeof(p), "broker.hosts", i);
			if (i >= MAX_HOSTS) {
				r |= conf_error(&ctx, p, "at most %d hosts", MAX_HOSTS);
				break;
			}
			c->ports[i] = port;
			r |= conf_get_string(&ctx, h, p, "host", true, &c->hosts[i]);
			r |= conf_get_uint(&ctx, h, p, "port", false, 1, 65535, &c->ports[i]);
			c->nhosts = i + 1;
		}
		r |= conf_get_string(&ctx, b, "broker", "vhost", false, &c->b.vhost);
		r |= conf_get_uint(&ctx, b, "broker", "heartbeat", false, 0, 3600, &hb);
		c->b.heartbeat = (uint16_t)hb;
		if (t) {
			c->b.tls = true;
			r |= conf_check_keys(&ctx, t, "broker.tls", tkeys);
			r |= conf_get_string(&ctx, t, "broker.tls", "ca", true, &c->b.ca);
			r |= conf_get_string(&ctx, t, "broker.tls", "cert", false, &c->b.cert);
			r |= conf_get_string(&ctx, t, "broker.tls", "key", c->b.cert != NULL,
			                     &c->b.key);
			r |= conf_get_bool(&ctx, t, "broker.tls", "verify_hostname", false,
			                   &c->b.verify_hostname);
		}
		r |= conf_get_object(&ctx, b, "broker", "auth", false, &a);
		if (a) {
			r |= conf_check_keys(&ctx, a, "broker.auth", akeys);
			r |= conf_get_enum(&ctx, a, "broker.auth", "mechanism", false, mechs,
			                   &mech);
			r |= conf_get_string(&ctx, a, "broker.auth", "user", false, &c->b.user);
			r |= conf_get_string(&ctx, a, "broker.auth", "password", false,
			                     &c->b.password);
		}
		c->b.auth = mech ? BROKER_AUTH_EXTERNAL : BROKER_AUTH_PLAIN;
		if (mech && !c->b.cert)
			r |= conf_error(&ctx, "broker.auth.mechanism",
			                "EXTERNAL needs broker.tls with a client cert and key");
	}
	r |= conf_get_object(&ctx, *root, "", "queue", false, &q);
	if (q) {
		r |= conf_check_keys(&ctx, q, "queue", qkeys);
		r |= conf_get_string(&ctx, q, "queue", "name", false, &c->queue);
		r |= conf_get_enum(&ctx, q, "queue", "type", false, types, &type);
		r |= conf_get_bool(&ctx, q, "queue", "declare", false, &c->declare);
		r |= conf_get_string(&ctx, q, "queue", "exchange", false, &c->exchange);
		r |= conf_get_string(&ctx, q, "queue", "binding_key", false, &c->binding_key);
		r |= conf_get_uint(&ctx, q, "queue", "prefetch", false, 1, 65535, &c->prefetch);
		r |= conf_get_uint(&ctx, q, "queue", "batch_ms", false, 1, 60000, &c->batch_ms);
		r |= conf_get_uint(&ctx, q, "queue", "shards", false, 1, MAX_SHARDS, &c->shards);
		r |= conf_get_string(&ctx, q, "queue", "shard_prefix", false, &c->shard_prefix);
		r |= conf_get_uint(&ctx, q, "queue", "instances", false, 1, MAX_SHARDS,
		                   &c->instances);
		r |= conf_get_uint(&ctx, q, "queue", "instance", false, 1, c->instances,
		                   &c->instance);
		r |= conf_get_uint(&ctx, q, "queue", "others_after_ms", false, 0, 600000,
		                   &c->others_after_ms);
		if (c->shard_prefix && strlen(c->shard_prefix) > 200)
			r |= conf_error(&ctx, "queue.shard_prefix", "at most 200 bytes");
		if (c->shards && c->declare && json_object_get(q, "declare") &&
		    json_is_true(json_object_get(q, "declare")))
			r |= conf_error(
			        &ctx, "queue.declare",
			        "shard queues are declared by the broker's definitions "
			        "(deploy/rabbitmq/gen-definitions.py), not by the consumer");
		if (c->shards)
			c->declare = false;
	}
	c->quorum = type == 1;
	r |= conf_get_object(&ctx, *root, "", "sink", false, &s);
	if (s) {
		r |= conf_check_keys(&ctx, s, "sink", skeys);
		r |= conf_get_enum(&ctx, s, "sink", "type", false, sinks, &sink);
		r |= conf_get_string(&ctx, s, "sink", "dir", false, &c->dir);
		r |= conf_get_uint(&ctx, s, "sink", "max_file_bytes", false, 4096, 1ull << 40,
		                   &c->max_file_bytes);
		r |= conf_get_string(&ctx, s, "sink", "path", false, &c->store.path);
		r |= conf_get_string(&ctx, s, "sink", "conninfo", sink == 1, &c->store.conninfo);
		r |= conf_get_uint(&ctx, s, "sink", "retention_days", false, 0, 100000,
		                   &c->retention_days);
		if (sink == 2 && c->retention_days)
			r |= conf_error(&ctx, "sink.retention_days",
			                "only for the sqlite and postgresql sinks");
	}
	c->store.kind = sink == 1 ? STORE_POSTGRESQL : sink == 2 ? STORE_JSONL : STORE_SQLITE;
	r |= conf_get_uint(&ctx, *root, "", "dedup_window", false, 16, 100000000, &c->dedup_window);
	r |= conf_get_uint(&ctx, *root, "", "max_message_bytes", false, 1024, 128u << 20,
	                   &c->max_message_bytes);
	r |= conf_get_object(&ctx, *root, "", "metrics", false, &m);
	if (m) {
		r |= conf_check_keys(&ctx, m, "metrics", mkeys);
		r |= conf_get_string(&ctx, m, "metrics", "listen", false, &c->listen);
		r |= conf_get_uint(&ctx, m, "metrics", "stale_after_intervals", false, 1, 1000,
		                   &c->stale_after);
		r |= conf_get_uint(&ctx, m, "metrics", "max_vms", false, 1, 10000000, &c->max_vms);
	}
	r |= conf_get_string(&ctx, *root, "", "log_level", false, &c->log_level);
	if (!r && !ctx.nerr)
		return 0;
fail:
	fprintf(stderr, "vmproxy-consumer: %s\n", ctx.err);
	return -EINVAL;
}

void consumer_config_defaults(struct ccfg *c)
{
	memset(c, 0, sizeof(*c));
	c->queue = "vm.metrics.consumer";
	c->exchange = "vm.metrics";
	c->binding_key = "#";
	c->dir = "/var/lib/vmproxy-consumer";
	c->declare = true;
	c->prefetch = 256;
	c->batch_ms = 200;
	c->max_file_bytes = 256u << 20;
	c->dedup_window = 1000000;
	c->stale_after = 3;
	c->max_vms = 100000;
	c->max_message_bytes = 4u << 20;
	c->shard_prefix = "vm.metrics.shard.";
	c->instance = 1;
	c->instances = 1;
	c->others_after_ms = 5000;
	broker_opts_init(&c->b);
}

const struct store_opts *consumer_store_options(struct ccfg *c, char *pathbuf, size_t len)
{
	c->store.dir = c->dir;
	c->store.max_file_bytes = c->max_file_bytes;
	c->store.dedup_window = c->dedup_window;
	if (c->store.kind == STORE_SQLITE && !c->store.path) {
		snprintf(pathbuf, len, "%s/metrics.db", c->dir);
		c->store.path = pathbuf;
	}
	return &c->store;
}
