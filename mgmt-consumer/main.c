/* main.c -- vmproxy-consumer: configuration, then the consume loop: take a
 * batch of messages from the queue (or from every shard queue), validate
 * them, store them in one transaction of the configured store (bad ones to
 * quarantine), commit, and only then ack the batch. Reconnects with backoff
 * over the configured broker nodes, and to the database, after any failure.
 * "vmproxy-consumer query ..." reads the store instead (query.c). */
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
#include <unistd.h>

#include "backoff.h"
#include "broker.h"
#include "certfile.h"
#include "clock.h"
#include "conf.h"
#include "consumer.h"
#include "log.h"
#include "metrics_http.h"
#include "prom.h"
#include "control.h"
#include "query.h"
#include "sink.h"
#include "store.h"
#include "validate.h"
#include "vmstate.h"


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
		   "       vmproxy-consumer query --config FILE [--stale] [--json]\n"
		   "       vmproxy-consumer query --config FILE --vm NAME|UUID --metric M\n"
		   "                        [--since DUR] [--until DUR] [--json]\n"
		   "Consumes vmproxy metrics from the broker into a store (SQLite, PostgreSQL\n"
		   "or JSON Lines) and a Prometheus endpoint, acking each batch only once it\n"
		   "is committed; \"query\" prints what the store holds.\n"
		   "See vmproxy-consumer(8) and docs/consumer.md for the configuration.\n");
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
 * TLS files (valid, the key the certificate's), the sink directory (or its
 * parent) writable, the metrics address on this host (bound and closed).
 * Each problem on a line; 0 or 1. */
static int check_config(const char *file, const struct ccfg *c)
{
	char err[600];
	int problems = 0;

	if (certfile_check("broker.tls", c->b.tls ? c->b.ca : NULL, c->b.cert, c->b.key, err,
			   sizeof(err)) < 0) {
		fprintf(stderr, "%s: %s\n", file, err);
		problems++;
	}
	problems += conf_check_dir(file, "sink.dir", c->dir);
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

/* One queue consumed: the only one, or a shard. */
struct shard {
	char queue[256];
	char tag[48];
	bool own;	 /* subscribed at once; the others after others_after_ms */
	bool subscribed; /* on the current connection */
};

/* A stored sample whose VM state is updated once its batch is committed. */
struct done {
	char uuid[64];
	char *name;
	json_t *doc;
};

struct ctx {
	const struct ccfg *c;
	struct store *store;
	struct sink *quarantine;
	struct vmstate *st;
	struct shard *shards;
	size_t nshards;
	uint64_t others_at; /* monotonic ms to subscribe the other shards, 0: done */
	bool in_batch, store_failed;
	struct done *done;
	size_t ndone;
	uint64_t stored, duplicates;
	int64_t next_expire_ms;
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
	case AMQP_FIELD_KIND_BYTES: {
		/* Bounded, and only valid UTF-8 without NUL (a database rejects
		 * the rest, which would fail the whole batch forever). */
		json_t *j = v->value.bytes.len <= 256 &&
					!memchr(v->value.bytes.bytes, 0, v->value.bytes.len)
				    ? json_stringn(v->value.bytes.bytes, v->value.bytes.len)
				    : NULL;
		return j ? j : json_null();
	}
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

/* Valid UTF-8 (what jansson accepts in a string). */
static bool utf8_ok(const char *p, size_t len)
{
	json_t *j = json_stringn(p, len);

	json_decref(j);
	return j != NULL;
}

/* A header string a database takes: valid UTF-8 without NUL. */
static bool valid_text(const amqp_field_value_t *v)
{
	return !memchr(v->value.bytes.bytes, 0, v->value.bytes.len) &&
	       utf8_ok(v->value.bytes.bytes, v->value.bytes.len);
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

static int store_failure(struct ctx *x)
{
	log_error("store: %s; the batch is not acked and comes back", store_error(x->store));
	store_rollback(x->store);
	sink_discard(x->quarantine); /* the batch's quarantined messages come back too */
	x->in_batch = false;
	x->store_failed = true;
	vmstate_count_store_error(x->st);
	return -1;
}

/* Returns -1 when the store failed (the batch must not be acked). */
static int handle(struct ctx *x, const amqp_envelope_t *env)
{
	const amqp_basic_properties_t *p = &env->message.properties;
	const amqp_field_value_t *uuid = header(p, "x-vm-uuid");
	struct store_sample smp;
	json_error_t jerr;
	json_t *doc, *vm, *rcv;
	const char *why;
	char reason[200], uuidbuf[64], rkey[256];
	char *text;
	int r;

	if (env->message.body.len > x->c->max_message_bytes) {
		quarantine(x, env, "message larger than max_message_bytes");
		return 0;
	}
	if (!uuid || uuid->kind != AMQP_FIELD_KIND_UTF8 || uuid->value.bytes.len == 0 ||
	    uuid->value.bytes.len >= sizeof(uuidbuf) || !valid_text(uuid)) {
		quarantine(x, env, "no x-vm-uuid header: not stamped by vmproxyd");
		return 0;
	}
	snprintf(uuidbuf, sizeof(uuidbuf), "%.*s", (int)uuid->value.bytes.len,
		 (char *)uuid->value.bytes.bytes);
	doc = json_loadb(env->message.body.bytes, env->message.body.len, 0, &jerr);
	if (!doc) {
		snprintf(reason, sizeof(reason), "not JSON: %s", jerr.text);
		quarantine(x, env, reason);
		return 0;
	}
	if ((why = metrics_validate(doc))) {
		snprintf(reason, sizeof(reason), "fails the metrics schema: %s", why);
		quarantine(x, env, reason);
		json_decref(doc);
		return 0;
	}
	vm = json_pack("{s:s, s:o, s:o, s:o, s:o}", "uuid", uuidbuf, "name",
		       header_json(header(p, "x-vm-name")), "cid", header_json(header(p, "x-vm-cid")),
		       "proxy_host", header_json(header(p, "x-vmproxy-host")), "received_ms",
		       header_json(header(p, "x-vmproxy-received-ms")));
	if (!vm) {
		json_decref(doc);
		return store_failure(x);
	}
	/* Routing keys are at most 255 bytes; kept only when valid text. */
	snprintf(rkey, sizeof(rkey), "%.*s", (int)env->routing_key.len,
		 (char *)env->routing_key.bytes);
	memset(&smp, 0, sizeof(smp));
	smp.vm_uuid = uuidbuf;
	smp.vm_name = json_string_value(json_object_get(vm, "name"));
	smp.proxy_host = json_string_value(json_object_get(vm, "proxy_host"));
	smp.routing_key = strlen(rkey) == env->routing_key.len &&
					  utf8_ok(rkey, env->routing_key.len)
				  ? rkey
				  : NULL;
	smp.boot_id = json_string_value(json_object_get(json_object_get(doc, "host"), "boot_id"));
	smp.seq = json_integer_value(json_object_get(doc, "seq"));
	smp.time_ms = json_integer_value(json_object_get(doc, "time_ms"));
	rcv = json_object_get(vm, "received_ms");
	smp.received_ms = json_is_integer(rcv) ? json_integer_value(rcv) : -1;
	smp.stored_ms = (int64_t)clock_wall_ms();
	smp.interval_s = json_integer_value(json_object_get(doc, "interval_s"));
	store_sample_gauges(&smp, doc);
	smp.doc = doc;
	smp.vm = vm;
	/* NUL-terminated for libpq's text parameters (jansson refused any NUL,
	 * raw or as \u0000, so there is none inside). */
	text = malloc(env->message.body.len + 1);
	if (!text) {
		json_decref(vm);
		json_decref(doc);
		return store_failure(x);
	}
	memcpy(text, env->message.body.bytes, env->message.body.len);
	text[env->message.body.len] = '\0';
	smp.doc_text = text;
	smp.doc_len = env->message.body.len;
	if (!x->in_batch) {
		if (store_begin(x->store) < 0) {
			free(text);
			json_decref(vm);
			json_decref(doc);
			return store_failure(x);
		}
		x->in_batch = true;
	}
	r = store_put(x->store, &smp);
	free(text);
	if (r < 0) {
		json_decref(vm);
		json_decref(doc);
		return store_failure(x);
	}
	if (r == 0) {
		x->duplicates++;
	} else {
		struct done *d = &x->done[x->ndone++];
		snprintf(d->uuid, sizeof(d->uuid), "%s", uuidbuf);
		d->name = smp.vm_name ? strdup(smp.vm_name) : NULL;
		d->doc = json_incref(doc);
		x->stored++;
	}
	json_decref(vm);
	json_decref(doc);
	return 0;
}

static void forget_done(struct ctx *x, bool apply)
{
	double now = (double)clock_wall_ms() / 1000.0;

	for (size_t i = 0; i < x->ndone; i++) {
		/* A duplicate says nothing about the VM now (PostgreSQL tells
		 * which were at commit; the others never list them here). */
		if (apply && !store_batch_was_duplicate(x->store, i))
			vmstate_update(x->st, x->done[i].uuid, x->done[i].name, x->done[i].doc, now);
		free(x->done[i].name);
		json_decref(x->done[i].doc);
	}
	x->ndone = 0;
	if (apply) {
		vmstate_add(x->st, "stored", x->stored);
		vmstate_add(x->st, "duplicate", x->duplicates);
	}
	x->stored = x->duplicates = 0;
}

static void restore_vm(void *ud, const char *uuid, const char *name, int64_t last_seen_ms,
		       json_t *doc)
{
	vmstate_update(ud, uuid, name, doc, (double)last_seen_ms / 1000.0);
}

static int subscribe(struct ctx *x, amqp_connection_state_t conn, struct shard *sh)
{
	amqp_rpc_reply_t rr;
	char desc[200];

	amqp_basic_consume(conn, 1, amqp_cstring_bytes(sh->queue), amqp_cstring_bytes(sh->tag), 0,
			   0, 0, amqp_empty_table);
	rr = amqp_get_rpc_reply(conn);
	if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
		log_error("queue \"%s\": %s", sh->queue,
			  broker_reply_describe(rr, desc, sizeof(desc)));
		return -1;
	}
	sh->subscribed = true;
	log_info("consuming \"%s\"%s", sh->queue,
		 x->nshards > 1 ? (sh->own ? " (own shard)" : " (standby)") : "");
	return 0;
}

/* Connect to node I and start consuming: every queue of our own at once,
 * the other shards after others_after_ms. */
static int open_consumer(struct ctx *x, size_t i, amqp_connection_state_t *out)
{
	const struct ccfg *c = x->c;
	struct broker_opts o = c->b;
	amqp_connection_state_t conn;
	amqp_table_entry_t arg;
	amqp_table_t args = { 0, NULL };
	amqp_rpc_reply_t rr;
	char err[300], desc[200];
	bool others = false;

	o.host = c->hosts[i];
	o.port = (uint16_t)c->ports[i];
	o.connection_name = "vmproxy-consumer";
	o.product = "vmproxy-consumer";
	if (broker_connect(&o, &conn, err, sizeof(err)) < 0 ||
	    broker_channel_open(conn, 1, false, err, sizeof(err)) < 0) {
		log_warn("broker %s:%" PRIu64 ": %s", c->hosts[i], c->ports[i], err);
		return -ECONNREFUSED;
	}
	rr.reply_type = AMQP_RESPONSE_NORMAL;
	if (!c->shards) {
		arg.key = amqp_cstring_bytes("x-queue-type");
		arg.value.kind = AMQP_FIELD_KIND_UTF8;
		arg.value.value.bytes = amqp_cstring_bytes(c->quorum ? "quorum" : "classic");
		args.num_entries = 1;
		args.entries = &arg;
		amqp_queue_declare(conn, 1, amqp_cstring_bytes(c->queue), !c->declare, 1, 0, 0,
				   args);
		rr = amqp_get_rpc_reply(conn);
		if (rr.reply_type == AMQP_RESPONSE_NORMAL && c->declare) {
			amqp_queue_bind(conn, 1, amqp_cstring_bytes(c->queue),
					amqp_cstring_bytes(c->exchange),
					amqp_cstring_bytes(c->binding_key), amqp_empty_table);
			rr = amqp_get_rpc_reply(conn);
		}
	}
	if (rr.reply_type == AMQP_RESPONSE_NORMAL) {
		/* Per consumer: each shard has up to prefetch unacked. */
		amqp_basic_qos(conn, 1, 0, (uint16_t)c->prefetch, 0);
		rr = amqp_get_rpc_reply(conn);
	}
	if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
		log_error("queue \"%s\": %s", c->queue, broker_reply_describe(rr, desc, sizeof(desc)));
		amqp_destroy_connection(conn);
		return -EPROTO;
	}
	for (size_t k = 0; k < x->nshards; k++) {
		x->shards[k].subscribed = false;
		vmstate_shard_active(x->st, k, false);
	}
	for (size_t k = 0; k < x->nshards; k++) {
		if (!x->shards[k].own) {
			others = true;
			continue;
		}
		if (subscribe(x, conn, &x->shards[k]) < 0) {
			amqp_destroy_connection(conn);
			return -EPROTO;
		}
	}
	x->others_at = others ? clock_mono_ms() + c->others_after_ms : 0;
	log_info("connected to %s:%" PRIu64, c->hosts[i], c->ports[i]);
	*out = conn;
	return 0;
}

static int subscribe_others(struct ctx *x, amqp_connection_state_t conn)
{
	x->others_at = 0;
	for (size_t k = 0; k < x->nshards; k++)
		if (!x->shards[k].subscribed && subscribe(x, conn, &x->shards[k]) < 0)
			return -1;
	return 0;
}

static void note_delivery(struct ctx *x, const amqp_envelope_t *env)
{
	/* Single active consumer: deliveries from a shard mean we are its
	 * active consumer (until this connection ends). */
	for (size_t k = 0; k < x->nshards; k++) {
		const struct shard *sh = &x->shards[k];
		if (env->consumer_tag.len == strlen(sh->tag) &&
		    !memcmp(env->consumer_tag.bytes, sh->tag, env->consumer_tag.len)) {
			vmstate_shard_active(x->st, k, true);
			return;
		}
	}
}

static void expire(struct ctx *x)
{
	int64_t now = (int64_t)clock_wall_ms();
	int n;

	if (!x->c->retention_days || now < x->next_expire_ms)
		return;
	/* Small batches between message batches: never a long lock. */
	n = store_expire(x->store, now - (int64_t)x->c->retention_days * 86400000, 1000);
	if (n < 0) {
		log_warn("retention: %s", store_error(x->store));
		x->next_expire_ms = now + 60000;
		return;
	}
	vmstate_add(x->st, "expired", (uint64_t)n);
	if (n < 1000)
		x->next_expire_ms = now + 60000;
}

/* One batch: up to prefetch messages or batch_ms, stored, committed, acked.
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
		struct timeval tv;

		if (x->others_at && now >= x->others_at && subscribe_others(x, conn) < 0)
			return -1;
		if (x->others_at && x->others_at - now < wait)
			wait = x->others_at > now ? x->others_at - now : 0;
		tv.tv_sec = (time_t)(wait / 1000);
		tv.tv_usec = (suseconds_t)(wait % 1000) * 1000;
		if (deadline && now >= deadline)
			break;
		amqp_maybe_release_buffers(conn);
		rr = amqp_consume_message(conn, &env, &tv, 0);
		if (rr.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		    rr.library_error == AMQP_STATUS_TIMEOUT) {
			if (!deadline && n == 0) {
				if (x->others_at)
					continue;
				expire(x);
				return 0;
			}
			if (deadline)
				break;
			continue;
		}
		if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
			char desc[200];
			log_warn("consume: %s", broker_reply_describe(rr, desc, sizeof(desc)));
			if (x->in_batch)
				store_rollback(x->store);
			x->in_batch = false;
			sink_discard(x->quarantine); /* those come back too */
			forget_done(x, false);
			return -1; /* unacked messages come back to us or another consumer */
		}
		if (!deadline)
			deadline = clock_mono_ms() + x->c->batch_ms;
		note_delivery(x, &env);
		if (handle(x, &env) < 0) {
			amqp_destroy_envelope(&env);
			forget_done(x, false);
			return -1;
		}
		last_tag = env.delivery_tag;
		amqp_destroy_envelope(&env);
		n++;
	}
	if (n) {
		uint64_t t0 = clock_mono_ns();
		if (sink_sync(x->quarantine) < 0) {
			log_error("cannot write the quarantine files: %s; exiting without acking",
				  strerror(errno));
			exit(1);
		}
		if (x->in_batch) {
			x->in_batch = false;
			if (store_commit(x->store) < 0) {
				forget_done(x, false);
				if (store_kind(x->store) == STORE_JSONL) {
					log_error("%s; exiting without acking", store_error(x->store));
					exit(1);
				}
				log_error("store: commit: %s; the batch is not acked and comes back",
					  store_error(x->store));
				vmstate_count_store_error(x->st);
				x->store_failed = true;
				return -1;
			}
		}
		vmstate_observe_fsync(x->st, (double)(clock_mono_ns() - t0) / 1e9);
		{
			uint64_t d = store_batch_duplicates(x->store);
			d = d < x->stored ? d : x->stored;
			x->stored -= d;
			x->duplicates += d;
		}
		forget_done(x, true);
		/* Only now: everything up to last_tag is committed. */
		if (amqp_basic_ack(conn, 1, last_tag, 1) != AMQP_STATUS_OK)
			return -1;
		expire(x);
	}
	return n;
}

static void sleep_ms(uint32_t d)
{
	for (uint32_t waited = 0; waited < d && !stop; waited += 50)
		usleep(50000);
}

/* After a store failure: until the store answers again (PostgreSQL:
 * reconnect with backoff), consume nothing. */
static void recover_store(struct ctx *x)
{
	struct backoff bo;

	backoff_init(&bo, 200, 10000, 0);
	x->store_failed = false;
	sleep_ms(backoff_next(&bo));
	while (!stop && !store_ok(x->store)) {
		if (store_reconnect(x->store) == 0) {
			log_info("store: reconnected");
			break;
		}
		log_warn("store: %s", store_error(x->store));
		sleep_ms(backoff_next(&bo));
	}
}

static int setup_shards(struct ctx *x, const struct ccfg *c)
{
	size_t n = c->shards ? c->shards : 1;
	const char **names = calloc(n, sizeof(char *));

	x->shards = calloc(n, sizeof(*x->shards));
	if (!x->shards || !names) {
		free(names);
		return -ENOMEM;
	}
	x->nshards = n;
	for (size_t k = 0; k < n; k++) {
		struct shard *sh = &x->shards[k];
		if (c->shards)
			snprintf(sh->queue, sizeof(sh->queue), "%s%zu", c->shard_prefix, k);
		else
			snprintf(sh->queue, sizeof(sh->queue), "%s", c->queue);
		snprintf(sh->tag, sizeof(sh->tag), "vmproxy-consumer.%zu", k);
		/* Instance K of N owns shards K-1, K-1+N, K-1+2N, ... */
		sh->own = !c->shards || k % c->instances == c->instance - 1;
		names[k] = sh->queue;
	}
	vmstate_set_shards(x->st, names, n);
	free(names);
	return 0;
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
	struct ccfg c;
	const char *config = NULL, *dir = NULL, *listen = NULL, *level_s = NULL;
	enum log_level level = LOG_LEVEL_INFO;
	struct metrics_http *http = NULL;
	struct backoff bo;
	struct ctx x;
	json_t *root = NULL;
	struct sigaction sa;
	size_t node = 0;
	char dbpath[600], err[600];
	bool check = false;
	int ch;

	if (argc > 1 && !strcmp(argv[1], "query"))
		return query_main(argc - 1, argv + 1);
	if (argc > 1 && !strcmp(argv[1], "control"))
		return control_main(argc - 1, argv + 1);
	consumer_config_defaults(&c);
	memset(&x, 0, sizeof(x));
	x.c = &c;
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
	if (consumer_parse_config(config, &c, &root) < 0)
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
	x.done = calloc(c.prefetch * (c.shards ? c.shards : 1), sizeof(*x.done));
	if (!x.done || sink_open(c.dir, "quarantine", c.max_file_bytes, NULL, &x.quarantine) < 0 ||
	    vmstate_new((size_t)c.max_vms, c.stale_after, &x.st) < 0 || setup_shards(&x, &c) < 0) {
		log_error("cannot open \"%s\": %s", c.dir, strerror(errno));
		return 1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN); /* nothing to reload; a stray HUP must not stop consuming */
	backoff_init(&bo, 200, 10000, 0);
	consumer_store_options(&c, dbpath, sizeof(dbpath));
	while (store_open(&c.store, &x.store, err, sizeof(err)) < 0) {
		/* A database server may come later; a file that cannot be opened
		 * is a configuration error. */
		log_error("store: %s", err);
		if (c.store.kind != STORE_POSTGRESQL || stop)
			return 1;
		sleep_ms(backoff_next(&bo));
	}
	if (c.store.kind == STORE_JSONL) {
		log_info("%zu stored samples remembered for deduplication",
			 store_remembered(x.store));
	} else {
		/* The VMs known before this start: stale until they send again. */
		if (store_load_vms(x.store, restore_vm, x.st) < 0)
			log_warn("store: cannot read the known VMs: %s", store_error(x.store));
		log_info("store: %zu VMs known", vmstate_count_vms(x.st));
	}
	if (c.listen) {
		if (metrics_http_start(c.listen, render, x.st, &http) < 0) {
			log_error("metrics.listen \"%s\": cannot listen", c.listen);
			return 1;
		}
	}
	backoff_init(&bo, 200, 15000, 0);
	while (!stop) {
		amqp_connection_state_t conn;

		if (x.store_failed || !store_ok(x.store))
			recover_store(&x);
		if (stop)
			break;
		if (open_consumer(&x, node, &conn) < 0) {
			node = (node + 1) % c.nhosts;
			sleep_ms(backoff_next(&bo));
			continue;
		}
		backoff_reset(&bo);
		while (!stop && one_batch(&x, conn) >= 0)
			;
		if (stop && !x.store_failed)
			broker_close(conn);
		else {
			/* Destroyed without acking: the broker requeues the batch. */
			amqp_destroy_connection(conn);
			vmstate_count_reconnect(x.st);
			if (!x.store_failed)
				node = (node + 1) % c.nhosts;
		}
	}
	log_info("stopped");
	metrics_http_stop(http);
	store_close(x.store);
	sink_close(x.quarantine);
	vmstate_free(x.st);
	free(x.shards);
	free(x.done);
	json_decref(root);
	return 0;
}
