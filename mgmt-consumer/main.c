/* main.c -- vmproxy-consumer: configuration, then the consume loop: take a
 * batch of messages, validate, deduplicate, write them to JSON Lines (bad
 * ones to quarantine), fsync, and only then ack the batch. Reconnects with
 * backoff over the configured broker nodes after any failure. */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backoff.h"
#include "broker.h"
#include "certfile.h"
#include "clock.h"
#include "conf.h"
#include "dedup.h"
#include "log.h"
#include "metrics_http.h"
#include "prom.h"
#include "sink.h"
#include "validate.h"
#include "vmstate.h"

#define MAX_HOSTS 16

struct ccfg {
	struct broker_opts b;
	const char *hosts[MAX_HOSTS];
	uint64_t ports[MAX_HOSTS];
	size_t nhosts;
	const char *queue, *exchange, *binding_key, *dir, *listen, *log_level;
	bool declare, quorum;
	uint64_t prefetch, batch_ms, max_file_bytes, dedup_window, stale_after, max_message_bytes;
	uint64_t max_vms;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void usage(FILE *f)
{
	fprintf(f, "Usage: vmproxy-consumer --config FILE [--jsonl-dir D] [--metrics-listen A:P]\n"
		   "                        [--log-level L] [--check-config]\n"
		   "Consumes vmproxy metrics from the broker into JSON Lines files and a\n"
		   "Prometheus endpoint, acking each batch only once it is on disk.\n"
		   "See vmproxy-consumer(8) and docs/consumer.md for the configuration.\n");
}

static int parse_config(const char *file, struct ccfg *c, json_t **root)
{
	static const char *const keys[] = { "broker", "queue", "sink", "dedup_window", "metrics",
					    "log_level", "max_message_bytes", NULL };
	static const char *const bkeys[] = { "host", "port", "hosts", "vhost", "tls", "auth",
					     "heartbeat", NULL };
	static const char *const tkeys[] = { "ca", "cert", "key", "verify_hostname", NULL };
	static const char *const akeys[] = { "mechanism", "user", "password", NULL };
	static const char *const qkeys[] = { "name", "type", "declare", "exchange", "binding_key",
					     "prefetch", "batch_ms", NULL };
	static const char *const skeys[] = { "dir", "max_file_bytes", NULL };
	static const char *const mkeys[] = { "listen", "stale_after_intervals", "max_vms", NULL };
	static const char *const mechs[] = { "PLAIN", "EXTERNAL", NULL };
	static const char *const types[] = { "classic", "quorum", NULL };
	struct conf_ctx ctx;
	json_t *b = NULL, *t = NULL, *a = NULL, *q = NULL, *s = NULL, *m = NULL, *hosts = NULL, *h;
	unsigned mech = 0, type = 1;
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
		json_array_foreach(hosts, i, h) {
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
			r |= conf_get_string(&ctx, t, "broker.tls", "key", c->b.cert != NULL, &c->b.key);
			r |= conf_get_bool(&ctx, t, "broker.tls", "verify_hostname", false,
					   &c->b.verify_hostname);
		}
		r |= conf_get_object(&ctx, b, "broker", "auth", false, &a);
		if (a) {
			r |= conf_check_keys(&ctx, a, "broker.auth", akeys);
			r |= conf_get_enum(&ctx, a, "broker.auth", "mechanism", false, mechs, &mech);
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
	}
	c->quorum = type == 1;
	r |= conf_get_object(&ctx, *root, "", "sink", false, &s);
	if (s) {
		r |= conf_check_keys(&ctx, s, "sink", skeys);
		r |= conf_get_string(&ctx, s, "sink", "dir", false, &c->dir);
		r |= conf_get_uint(&ctx, s, "sink", "max_file_bytes", false, 4096, 1ull << 40,
				   &c->max_file_bytes);
	}
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

/* broker.tls.ca and .cert, for vmproxy_tls_certificate_expiry_seconds. */
static const char *tls_files[2];

static char *render(void *ud)
{
	char *body = vmstate_render(ud, (double)clock_wall_ms() / 1000.0);
	struct prom_buf b;

	if (!body || (!tls_files[0] && !tls_files[1]))
		return body;
	prom_init(&b);
	certfile_prom_expiry(&b, tls_files, 2);
	if (!b.oom && b.len) {
		size_t len = strlen(body);
		char *all = realloc(body, len + b.len + 1);

		if (all) {
			memcpy(all + len, b.data, b.len);
			all[len + b.len] = '\0';
			body = all;
		}
	}
	prom_free(&b);
	return body;
}

/* --check-config: what the start needs, without creating anything: the
 * TLS files (valid, the key the certificate's), the JSON Lines directory
 * (or its parent) writable, the metrics address on this host (bound and
 * closed). Each problem on a line; 0 or 1. */
static int check_config(const char *file, const struct ccfg *c)
{
	struct stat st;
	char err[600];
	int problems = 0;

	if (certfile_check("broker.tls", c->b.tls ? c->b.ca : NULL, c->b.cert, c->b.key, err,
			   sizeof(err)) < 0) {
		fprintf(stderr, "%s: %s\n", file, err);
		problems++;
	}
	if (stat(c->dir, &st) == 0) {
		if (!S_ISDIR(st.st_mode) || access(c->dir, W_OK | X_OK) < 0) {
			fprintf(stderr, "%s: sink.dir \"%s\": %s\n", file, c->dir,
				S_ISDIR(st.st_mode) ? strerror(errno) : "not a directory");
			problems++;
		}
	} else {
		char parent[4096], *slash;

		snprintf(parent, sizeof(parent), "%s", c->dir);
		slash = strrchr(parent, '/');
		if (slash == parent)
			slash[1] = '\0';
		else if (slash)
			*slash = '\0';
		else
			snprintf(parent, sizeof(parent), ".");
		if (access(parent, W_OK | X_OK) < 0) {
			fprintf(stderr, "%s: sink.dir \"%s\": cannot be created in \"%s\": %s\n",
				file, c->dir, parent, strerror(errno));
			problems++;
		}
	}
	if (c->listen) {
		struct sockaddr_in sa;
		int one = 1, fd;

		if (metrics_http_parse_listen(c->listen, &sa) < 0) {
			fprintf(stderr, "%s: metrics.listen \"%s\": expected ADDRESS:PORT\n", file,
				c->listen);
			problems++;
		} else if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) >= 0) {
			setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
			if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
				if (errno == EADDRINUSE) {
					fprintf(stderr, "warning: %s: metrics.listen %s is in use now; "
						"a start succeeds only once it is free\n", file,
						c->listen);
				} else {
					fprintf(stderr, "%s: metrics.listen %s: %s\n", file, c->listen,
						errno == EADDRNOTAVAIL ? "the address is not on this host"
								       : strerror(errno));
					problems++;
				}
			}
			close(fd);
		}
	}
	if (problems)
		return 1;
	printf("%s: configuration OK\n", file);
	return 0;
}

/* ---- consuming ------------------------------------------------------------ */

struct ctx {
	const struct ccfg *c;
	struct sink *jsonl, *quarantine;
	struct dedup *dedup;
	struct vmstate *st;
};

static const amqp_field_value_t *header(const amqp_basic_properties_t *p, const char *key)
{
	if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG))
		return NULL;
	for (int i = 0; i < p->headers.num_entries; i++) {
		const amqp_table_entry_t *e = &p->headers.entries[i];
		if (e->key.len == strlen(key) && !memcmp(e->key.bytes, key, e->key.len))
			return &e->value;
	}
	return NULL;
}

static json_t *header_json(const amqp_field_value_t *v)
{
	if (!v)
		return json_null();
	switch (v->kind) {
	case AMQP_FIELD_KIND_UTF8:
	case AMQP_FIELD_KIND_BYTES:
		return json_stringn_nocheck(v->value.bytes.bytes, v->value.bytes.len);
	case AMQP_FIELD_KIND_I64:
		return json_integer(v->value.i64);
	case AMQP_FIELD_KIND_U64:
		return json_integer((json_int_t)v->value.u64);
	case AMQP_FIELD_KIND_I32:
		return json_integer(v->value.i32);
	case AMQP_FIELD_KIND_U32:
		return json_integer(v->value.u32);
	default:
		return json_null();
	}
}

static void quarantine(struct ctx *x, const amqp_envelope_t *env, const char *reason)
{
	json_t *q = json_object(), *body;
	char *line;

	json_object_set_new(q, "reason", json_string(reason));
	json_object_set_new(q, "time_ms", json_integer((json_int_t)clock_wall_ms()));
	json_object_set_new(q, "routing_key", json_stringn_nocheck(env->routing_key.bytes,
								   env->routing_key.len));
	json_object_set_new(q, "x-vm-uuid", header_json(header(&env->message.properties,
								"x-vm-uuid")));
	/* As text when it is valid UTF-8, else only its length. */
	body = json_stringn(env->message.body.bytes, env->message.body.len);
	if (body)
		json_object_set_new(q, "body", body);
	else
		json_object_set_new(q, "body_len", json_integer((json_int_t)env->message.body.len));
	line = json_dumps(q, JSON_COMPACT);
	if (line)
		sink_append(x->quarantine, line, strlen(line));
	free(line);
	json_decref(q);
	vmstate_count(x->st, "quarantined");
	log_warn("quarantined a message with routing key \"%.*s\": %s",
		 (int)(env->routing_key.len > 80 ? 80 : env->routing_key.len),
		 (char *)env->routing_key.bytes, reason);
}

static void handle(struct ctx *x, const amqp_envelope_t *env)
{
	const amqp_basic_properties_t *p = &env->message.properties;
	const amqp_field_value_t *uuid = header(p, "x-vm-uuid");
	json_error_t jerr;
	json_t *doc, *line, *vm;
	const char *why;
	char reason[200], uuidbuf[64];
	char *text;
	uint64_t key;

	if (env->message.body.len > x->c->max_message_bytes) {
		quarantine(x, env, "message larger than max_message_bytes");
		return;
	}
	if (!uuid || uuid->kind != AMQP_FIELD_KIND_UTF8 || uuid->value.bytes.len == 0 ||
	    uuid->value.bytes.len >= sizeof(uuidbuf)) {
		quarantine(x, env, "no x-vm-uuid header: not stamped by vmproxyd");
		return;
	}
	snprintf(uuidbuf, sizeof(uuidbuf), "%.*s", (int)uuid->value.bytes.len,
		 (char *)uuid->value.bytes.bytes);
	doc = json_loadb(env->message.body.bytes, env->message.body.len, 0, &jerr);
	if (!doc) {
		snprintf(reason, sizeof(reason), "not JSON: %s", jerr.text);
		quarantine(x, env, reason);
		return;
	}
	if ((why = metrics_validate(doc))) {
		snprintf(reason, sizeof(reason), "fails the metrics schema: %s", why);
		quarantine(x, env, reason);
		json_decref(doc);
		return;
	}
	key = dedup_key(uuidbuf, json_string_value(json_object_get(json_object_get(doc, "host"),
								   "boot_id")),
			json_integer_value(json_object_get(doc, "seq")));
	if (dedup_seen(x->dedup, key)) {
		vmstate_count(x->st, "duplicate");
		json_decref(doc);
		return;
	}
	vm = json_pack("{s:s, s:o, s:o, s:o, s:o}", "uuid", uuidbuf, "name",
		       header_json(header(p, "x-vm-name")), "cid", header_json(header(p, "x-vm-cid")),
		       "proxy_host", header_json(header(p, "x-vmproxy-host")), "received_ms",
		       header_json(header(p, "x-vmproxy-received-ms")));
	line = json_pack("{s:o, s:s%, s:O}", "vm", vm, "routing_key", env->routing_key.bytes,
			 env->routing_key.len, "doc", doc);
	/* 15 significant digits: a real the publisher wrote with up to 15
	 * (the agent's two decimals) is stored as written, not as its binary
	 * approximation's 17-digit tail. */
	text = json_dumps(line, JSON_COMPACT | JSON_REAL_PRECISION(15));
	if (text && sink_append(x->jsonl, text, strlen(text)) == 0) {
		dedup_add(x->dedup, key);
		vmstate_count(x->st, "stored");
		vmstate_update(x->st, uuidbuf, json_string_value(json_object_get(vm, "name")), doc,
			       (double)clock_wall_ms() / 1000.0);
	}
	free(text);
	json_decref(line);
	json_decref(doc);
}

static void seed_line(void *ud, const char *line, size_t len)
{
	struct ctx *x = ud;
	json_t *o = json_loadb(line, len, 0, NULL);
	json_t *doc = json_object_get(o, "doc");
	const char *uuid = json_string_value(json_object_get(json_object_get(o, "vm"), "uuid"));
	const char *boot = json_string_value(json_object_get(json_object_get(doc, "host"),
							     "boot_id"));

	if (uuid && boot)
		dedup_add(x->dedup, dedup_key(uuid, boot,
					      json_integer_value(json_object_get(doc, "seq"))));
	json_decref(o);
}

/* Connect to node I and start consuming. */
static int open_consumer(const struct ccfg *c, size_t i, amqp_connection_state_t *out)
{
	struct broker_opts o = c->b;
	amqp_connection_state_t conn;
	amqp_table_entry_t arg;
	amqp_table_t args = { 0, NULL };
	amqp_rpc_reply_t rr;
	char err[300], desc[200];

	o.host = c->hosts[i];
	o.port = (uint16_t)c->ports[i];
	o.connection_name = "vmproxy-consumer";
	o.product = "vmproxy-consumer";
	if (broker_connect(&o, &conn, err, sizeof(err)) < 0 ||
	    broker_channel_open(conn, 1, false, err, sizeof(err)) < 0) {
		log_warn("broker %s:%" PRIu64 ": %s", c->hosts[i], c->ports[i], err);
		return -ECONNREFUSED;
	}
	arg.key = amqp_cstring_bytes("x-queue-type");
	arg.value.kind = AMQP_FIELD_KIND_UTF8;
	arg.value.value.bytes = amqp_cstring_bytes(c->quorum ? "quorum" : "classic");
	args.num_entries = 1;
	args.entries = &arg;
	amqp_queue_declare(conn, 1, amqp_cstring_bytes(c->queue), !c->declare, 1, 0, 0, args);
	rr = amqp_get_rpc_reply(conn);
	if (rr.reply_type == AMQP_RESPONSE_NORMAL && c->declare) {
		amqp_queue_bind(conn, 1, amqp_cstring_bytes(c->queue), amqp_cstring_bytes(c->exchange),
				amqp_cstring_bytes(c->binding_key), amqp_empty_table);
		rr = amqp_get_rpc_reply(conn);
	}
	if (rr.reply_type == AMQP_RESPONSE_NORMAL) {
		amqp_basic_qos(conn, 1, 0, (uint16_t)c->prefetch, 0);
		rr = amqp_get_rpc_reply(conn);
	}
	if (rr.reply_type == AMQP_RESPONSE_NORMAL) {
		amqp_basic_consume(conn, 1, amqp_cstring_bytes(c->queue), amqp_empty_bytes, 0, 0, 0,
				   amqp_empty_table);
		rr = amqp_get_rpc_reply(conn);
	}
	if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
		log_error("queue \"%s\": %s", c->queue, broker_reply_describe(rr, desc, sizeof(desc)));
		amqp_destroy_connection(conn);
		return -EPROTO;
	}
	log_info("consuming \"%s\" on %s:%" PRIu64, c->queue, c->hosts[i], c->ports[i]);
	*out = conn;
	return 0;
}

/* One batch: up to prefetch messages or batch_ms, stored, synced, acked.
 * Returns the messages handled, or -1 when the connection must go. */
static int one_batch(struct ctx *x, amqp_connection_state_t conn)
{
	uint64_t deadline = 0, last_tag = 0;
	int n = 0;

	while ((uint64_t)n < x->c->prefetch && !stop) {
		amqp_envelope_t env;
		amqp_rpc_reply_t rr;
		uint64_t now = clock_mono_ms();
		uint64_t wait = deadline ? (deadline > now ? deadline - now : 0) : 1000;
		struct timeval tv = { (time_t)(wait / 1000), (suseconds_t)(wait % 1000) * 1000 };

		if (deadline && now >= deadline)
			break;
		amqp_maybe_release_buffers(conn);
		rr = amqp_consume_message(conn, &env, &tv, 0);
		if (rr.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		    rr.library_error == AMQP_STATUS_TIMEOUT) {
			if (!deadline && n == 0)
				return 0;
			break;
		}
		if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
			char desc[200];
			log_warn("consume: %s", broker_reply_describe(rr, desc, sizeof(desc)));
			return -1; /* unacked messages come back to us or another consumer */
		}
		if (!deadline)
			deadline = clock_mono_ms() + x->c->batch_ms;
		handle(x, &env);
		last_tag = env.delivery_tag;
		amqp_destroy_envelope(&env);
		n++;
	}
	if (n) {
		uint64_t t0 = clock_mono_ns();
		if (sink_sync(x->jsonl) < 0 || sink_sync(x->quarantine) < 0) {
			log_error("cannot write the JSON Lines files: %s; exiting without acking",
				  strerror(errno));
			exit(1);
		}
		vmstate_observe_fsync(x->st, (double)(clock_mono_ns() - t0) / 1e9);
		/* Only now: everything up to last_tag is on disk. */
		if (amqp_basic_ack(conn, 1, last_tag, 1) != AMQP_STATUS_OK)
			return -1;
	}
	return n;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", 1, NULL, 'c' }, { "jsonl-dir", 1, NULL, 'd' },
		{ "metrics-listen", 1, NULL, 'm' }, { "log-level", 1, NULL, 'l' },
		{ "help", 0, NULL, 'h' },   { "version", 0, NULL, 'V' },
		{ "check-config", 0, NULL, 'X' },
		{ NULL, 0, NULL, 0 },
	};
	struct ccfg c = {
		.queue = "vm.metrics.consumer",
		.exchange = "vm.metrics",
		.binding_key = "#",
		.dir = "/var/lib/vmproxy-consumer",
		.declare = true,
		.prefetch = 256,
		.batch_ms = 200,
		.max_file_bytes = 256u << 20,
		.dedup_window = 1000000,
		.stale_after = 3,
		.max_vms = 100000,
		.max_message_bytes = 4u << 20,
	};
	const char *config = NULL, *dir = NULL, *listen = NULL, *level_s = NULL;
	enum log_level level = LOG_LEVEL_INFO;
	struct metrics_http *http = NULL;
	struct backoff bo;
	struct ctx x = { &c, NULL, NULL, NULL, NULL };
	json_t *root = NULL;
	struct sigaction sa;
	size_t node = 0;
	int ch, seeded;
	bool check = false;

	broker_opts_init(&c.b);
	while ((ch = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
		switch (ch) {
		case 'c': config = optarg; break;
		case 'd': dir = optarg; break;
		case 'm': listen = optarg; break;
		case 'l': level_s = optarg; break;
		case 'X': check = true; break;
		case 'h': usage(stdout); return 0;
		case 'V': printf("vmproxy-consumer %s\n", VMPROXY_VERSION); return 0;
		default: usage(stderr); return 1;
		}
	}
	if (!config || optind != argc) {
		usage(stderr);
		return 1;
	}
	if (parse_config(config, &c, &root) < 0)
		return 1;
	if (dir)
		c.dir = dir;
	if (listen)
		c.listen = listen;
	if (level_s)
		c.log_level = level_s;
	if (c.log_level && log_level_parse(c.log_level, &level) < 0) {
		fprintf(stderr, "vmproxy-consumer: log level: expected error, warn, info or debug\n");
		return 1;
	}
	log_init("vmproxy-consumer", level);
	if (check) {
		int rc = check_config(config, &c);

		json_decref(root);
		return rc;
	}
	if (c.b.tls) {
		tls_files[0] = c.b.ca;
		tls_files[1] = c.b.cert;
	}
	if (sink_open(c.dir, "metrics", c.max_file_bytes, NULL, &x.jsonl) < 0 ||
	    sink_open(c.dir, "quarantine", c.max_file_bytes, NULL, &x.quarantine) < 0 ||
	    dedup_new(c.dedup_window, &x.dedup) < 0 ||
	    vmstate_new((size_t)c.max_vms, c.stale_after, &x.st) < 0) {
		log_error("cannot open \"%s\": %s", c.dir, strerror(errno));
		return 1;
	}
	/* Remember what was stored before a crash: those may be redelivered. */
	seeded = sink_replay_tail(c.dir, "metrics", c.dedup_window, seed_line, &x);
	log_info("%d stored samples remembered for deduplication", seeded < 0 ? 0 : seeded);
	if (c.listen) {
		if (metrics_http_start(c.listen, render, x.st, &http) < 0) {
			log_error("metrics.listen \"%s\": cannot listen", c.listen);
			return 1;
		}
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN); /* nothing to reload; a stray HUP must not stop consuming */
	backoff_init(&bo, 200, 15000, 0);
	while (!stop) {
		amqp_connection_state_t conn;

		if (open_consumer(&c, node, &conn) < 0) {
			uint32_t d = backoff_next(&bo);
			node = (node + 1) % c.nhosts;
			for (uint32_t waited = 0; waited < d && !stop; waited += 50)
				usleep(50000);
			continue;
		}
		backoff_reset(&bo);
		while (!stop && one_batch(&x, conn) >= 0)
			;
		if (stop)
			broker_close(conn);
		else {
			amqp_destroy_connection(conn);
			vmstate_count_reconnect(x.st);
			node = (node + 1) % c.nhosts;
		}
	}
	log_info("stopped");
	metrics_http_stop(http);
	sink_close(x.jsonl);
	sink_close(x.quarantine);
	dedup_free(x.dedup);
	vmstate_free(x.st);
	json_decref(root);
	return 0;
}
