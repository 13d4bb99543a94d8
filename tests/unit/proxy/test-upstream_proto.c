/* test-upstream_proto.c -- the upstream link's protocol engine against
 * scripted broker byte streams: the handshake, publishing with verbatim
 * properties, confirms (split across reads, multiple, nack), heartbeats,
 * and every way the broker's bytes can end the link. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "amqp_wire.h"
#include "upstream_proto.h"

#define MAX_CONFIRMS 64

struct rec {
	int ready;
	unsigned nconf;
	struct {
		uint64_t tag;
		bool multiple, ack;
	} conf[MAX_CONFIRMS];
	int blocked; /* -1 unset, 0 unblocked, 1 blocked */
	char reason[128];
	unsigned nret;
	uint16_t ret_code;
	char ret_rk[64], ret_ex[64];
	uint8_t ret_props[64], ret_body[8192];
	size_t ret_props_len, ret_body_len;
	unsigned nconf_at_return; /* confirms seen before the return */
	/* inbox */
	unsigned nreply;
	struct {
		uint64_t cookie;
		enum upstream_inbox_req kind;
		bool ok;
		uint16_t code;
		uint32_t count;
	} reply[16];
	unsigned ndeliver;
	uint64_t dtag;
	uint32_t dgen;
	bool dredelivered;
	char dctag[64], drk[64];
	uint8_t dbody[8192];
	size_t dbody_len;
		unsigned nclosed;
	uint16_t closed_code;
	unsigned ngot;
	uint64_t got_cookie;
	uint32_t got_count;
	unsigned ncancelled;
};

static void on_ready(void *ud)
{
	((struct rec *)ud)->ready++;
}

static void on_confirm(void *ud, uint64_t tag, bool multiple, bool ack)
{
	struct rec *r = ud;

	assert_true(r->nconf < MAX_CONFIRMS);
	r->conf[r->nconf].tag = tag;
	r->conf[r->nconf].multiple = multiple;
	r->conf[r->nconf].ack = ack;
	r->nconf++;
}

static void on_flow(void *ud, bool blocked, const char *reason)
{
	struct rec *r = ud;

	r->blocked = blocked;
	snprintf(r->reason, sizeof(r->reason), "%s", reason ? reason : "");
}

static void on_returned(void *ud, const struct upstream_proto_return *r)
{
	struct rec *x = ud;

	x->nret++;
	x->ret_code = r->code;
	x->nconf_at_return = x->nconf;
	snprintf(x->ret_rk, sizeof(x->ret_rk), "%.*s", (int)r->routing_key.len,
		 (const char *)r->routing_key.bytes);
	snprintf(x->ret_ex, sizeof(x->ret_ex), "%.*s", (int)r->exchange.len,
		 (const char *)r->exchange.bytes);
	assert_true(r->properties.len <= sizeof(x->ret_props) && r->body.len <= sizeof(x->ret_body));
	memcpy(x->ret_props, r->properties.bytes, r->properties.len);
	x->ret_props_len = r->properties.len;
	if (r->body.len)
		memcpy(x->ret_body, r->body.bytes, r->body.len);
	x->ret_body_len = r->body.len;
}

static void on_inbox_reply(void *ud, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
			   uint16_t code, const char *text, uint32_t count, uint32_t consumers)
{
	struct rec *r = ud;

	(void)text;
	(void)consumers;
	assert_true(r->nreply < 16);
	r->reply[r->nreply].cookie = cookie;
	r->reply[r->nreply].kind = kind;
	r->reply[r->nreply].ok = ok;
	r->reply[r->nreply].code = code;
	r->reply[r->nreply].count = count;
	r->nreply++;
}

static void on_inbox_deliver(void *ud, const struct upstream_proto_delivery *d)
{
	struct rec *r = ud;

	r->ndeliver++;
	r->dtag = d->delivery_tag;
	r->dgen = d->gen;
	r->dredelivered = d->redelivered;
	snprintf(r->dctag, sizeof(r->dctag), "%.*s", (int)d->consumer_tag.len,
		 (const char *)d->consumer_tag.bytes);
	snprintf(r->drk, sizeof(r->drk), "%.*s", (int)d->routing_key.len,
		 (const char *)d->routing_key.bytes);
	assert_true(d->body.len <= sizeof(r->dbody));
	if (d->body.len)
		memcpy(r->dbody, d->body.bytes, d->body.len);
	r->dbody_len = d->body.len;
}

static void on_inbox_got(void *ud, uint64_t cookie, const struct upstream_proto_delivery *d,
			 uint32_t count)
{
	struct rec *r = ud;

	r->ngot++;
	r->got_cookie = cookie;
	r->got_count = count;
	on_inbox_deliver(ud, d);
	r->ndeliver--; /* counted as got, not as a consumer's delivery */
}

static void on_inbox_cancelled(void *ud, amqp_bytes_t tag)
{
	(void)tag;
	((struct rec *)ud)->ncancelled++;
}

static void on_inbox_closed(void *ud, uint16_t code, const char *text)
{
	struct rec *r = ud;

	(void)text;
	r->nclosed++;
	r->closed_code = code;
}

static const struct upstream_proto_ops ops = {
	.ready = on_ready,
	.confirm = on_confirm,
	.flow = on_flow,
	.returned = on_returned,
	.inbox_reply = on_inbox_reply,
		.inbox_deliver = on_inbox_deliver,
	.inbox_got = on_inbox_got,

	.inbox_cancelled = on_inbox_cancelled,
	.inbox_closed = on_inbox_closed,
};

struct fx {
	struct upstream_proto p;
	struct upstream_proto_config cfg;
	struct rec rec;
	amqp_pool_t pool;
	struct wire_frame f[64];
	int nf;
	uint64_t now;
};

static void fx_init(struct fx *x, enum broker_auth mech)
{
	memset(x, 0, sizeof(*x));
	x->cfg.vhost = "/vms";
	x->cfg.mechanism = mech;
	x->cfg.user = "proxy";
	x->cfg.password = "secret";
	x->cfg.heartbeat = 30;
	x->cfg.connection_name = "vmproxyd/test/thread-0";
	x->cfg.product = "vmproxyd";
	x->cfg.exchange = "vm.metrics";
	x->cfg.max_output = 64u << 10;
	x->cfg.max_return = 8192;
	x->cfg.max_delivery = 8192;
	x->rec.blocked = -1;
	x->now = 1000;
	init_amqp_pool(&x->pool, 4096);
	assert_int_equal(upstream_proto_init(&x->p, &x->cfg, &ops, &x->rec, x->now), 0);
}

static void fx_free(struct fx *x)
{
	upstream_proto_destroy(&x->p);
	empty_amqp_pool(&x->pool);
}

/* Take and parse everything the engine wrote since the last call. */
static int take(struct fx *x)
{
	const void *d;
	size_t n = upstream_proto_output(&x->p, &d);
	static uint8_t copy[1 << 20];

	assert_true(n <= sizeof(copy));
	memcpy(copy, d, n);
	upstream_proto_consumed(&x->p, n, x->now);
	recycle_amqp_pool(&x->pool);
	if (n >= 8 && memcmp(copy, "AMQP", 4) == 0) { /* the protocol header */
		x->nf = wire_parse(copy + 8, n - 8, x->f, 64, &x->pool);
		assert_true(x->nf >= 0);
		return x->nf;
	}
	x->nf = wire_parse(copy, n, x->f, 64, &x->pool);
	assert_true(x->nf >= 0);
	return x->nf;
}

/* Feed B in pieces of CHUNK bytes (0: at once). */
static int feed(struct fx *x, struct wire_buf *b, size_t chunk)
{
	int r = 0;

	if (!chunk)
		chunk = b->len ? b->len : 1;
	for (size_t off = 0; off < b->len && r == 0; off += chunk)
		r = upstream_proto_feed(&x->p, b->p + off, b->len - off < chunk ? b->len - off : chunk,
					x->now);
	wire_buf_free(b);
	return r;
}

static int send_start(struct fx *x, const char *mechs)
{
	struct wire_buf b = { 0 };
	amqp_connection_start_t s = { .version_major = 0, .version_minor = 9 };

	s.mechanisms = amqp_cstring_bytes(mechs);
	s.locales = amqp_cstring_bytes("en_US");
	wire_method(&b, 0, AMQP_CONNECTION_START_METHOD, &s);
	return feed(x, &b, 0);
}

static int send_tune(struct fx *x, uint32_t frame_max, uint16_t heartbeat)
{
	struct wire_buf b = { 0 };
	amqp_connection_tune_t t = { .channel_max = 2047, .frame_max = frame_max,
				     .heartbeat = heartbeat };

	wire_method(&b, 0, AMQP_CONNECTION_TUNE_METHOD, &t);
	return feed(x, &b, 0);
}

static void send_method(struct fx *x, uint16_t ch, amqp_method_number_t id, void *m)
{
	struct wire_buf b = { 0 };

	wire_method(&b, ch, id, m);
	feed(x, &b, 0);
}

/* A full handshake with FRAME_MAX offered by the broker. */
static void handshake(struct fx *x, uint32_t frame_max)
{
	amqp_connection_open_ok_t ook = { .known_hosts = amqp_cstring_bytes("") };
	amqp_channel_open_ok_t cok = { .channel_id = amqp_cstring_bytes("") };
	amqp_confirm_select_ok_t sok = { 0 };

	take(x);
	assert_int_equal(send_start(x, "AMQPLAIN PLAIN EXTERNAL"), 0);
	assert_int_equal(send_tune(x, frame_max, 60), 0);
	send_method(x, 0, AMQP_CONNECTION_OPEN_OK_METHOD, &ook);
	send_method(x, UPSTREAM_PROTO_CHANNEL, AMQP_CHANNEL_OPEN_OK_METHOD, &cok);
	send_method(x, UPSTREAM_PROTO_CHANNEL, AMQP_CONFIRM_SELECT_OK_METHOD, &sok);
	assert_int_equal(x->rec.ready, 1);
	assert_true(upstream_proto_ready(&x->p));
	take(x);
}

static void ack(struct fx *x, uint64_t tag, bool multiple, bool is_ack, size_t chunk)
{
	struct wire_buf b = { 0 };

	if (is_ack) {
		amqp_basic_ack_t a = { .delivery_tag = tag, .multiple = multiple };
		wire_method(&b, UPSTREAM_PROTO_CHANNEL, AMQP_BASIC_ACK_METHOD, &a);
	} else {
		amqp_basic_nack_t a = { .delivery_tag = tag, .multiple = multiple };
		wire_method(&b, UPSTREAM_PROTO_CHANNEL, AMQP_BASIC_NACK_METHOD, &a);
	}
	assert_int_equal(feed(x, &b, chunk), 0);
}

/* The close the engine sent last: its code, and it is the last frame. */
static void assert_sent_close(struct fx *x, uint16_t code)
{
	const amqp_connection_close_t *c;

	take(x);
	assert_true(x->nf >= 1);
	assert_int_equal(x->f[x->nf - 1].id, AMQP_CONNECTION_CLOSE_METHOD);
	c = x->f[x->nf - 1].decoded;
	assert_int_equal(c->reply_code, code);
}

/* ---- the handshake ---------------------------------------------------------------- */

static void test_handshake_plain(void **state)
{
	struct fx x;
	const amqp_connection_start_ok_t *so;
	const amqp_connection_tune_ok_t *to;
	const amqp_connection_open_t *op;
	const void *d;
	size_t n;

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	n = upstream_proto_output(&x.p, &d);
	assert_int_equal(n, 8);
	assert_memory_equal(d, "AMQP\0\0\x09\x01", 8);
	upstream_proto_consumed(&x.p, n, x.now);

	assert_int_equal(send_start(&x, "AMQPLAIN PLAIN"), 0);
	assert_int_equal(take(&x), 1);
	assert_int_equal(x.f[0].id, AMQP_CONNECTION_START_OK_METHOD);
	so = x.f[0].decoded;
	assert_int_equal(so->mechanism.len, 5);
	assert_memory_equal(so->mechanism.bytes, "PLAIN", 5);
	assert_int_equal(so->response.len, 13);
	assert_memory_equal(so->response.bytes, "\0proxy\0secret", 13);
	{
		bool caps = false, name = false;
		for (int i = 0; i < so->client_properties.num_entries; i++) {
			amqp_table_entry_t *e = &so->client_properties.entries[i];
			if (e->key.len == 12 && !memcmp(e->key.bytes, "capabilities", 12))
				caps = true;
			if (e->key.len == 15 && !memcmp(e->key.bytes, "connection_name", 15))
				name = e->value.value.bytes.len == strlen(x.cfg.connection_name);
		}
		assert_true(caps);
		assert_true(name);
	}

	/* The broker's 60 s against our 30: ours, the shorter. */
	assert_int_equal(send_tune(&x, 131072, 60), 0);
	assert_int_equal(take(&x), 2);
	assert_int_equal(x.f[0].id, AMQP_CONNECTION_TUNE_OK_METHOD);
	to = x.f[0].decoded;
	assert_int_equal(to->heartbeat, 30);
	assert_int_equal(to->frame_max, 131072);
	assert_int_equal(x.f[1].id, AMQP_CONNECTION_OPEN_METHOD);
	op = x.f[1].decoded;
	assert_int_equal(op->virtual_host.len, 4);
	assert_memory_equal(op->virtual_host.bytes, "/vms", 4);
	assert_int_equal(x.rec.ready, 0);
	fx_free(&x);
}

static void test_handshake_external_heartbeat_from_broker(void **state)
{
	struct fx x;
	const amqp_connection_start_ok_t *so;

	(void)state;
	fx_init(&x, BROKER_AUTH_EXTERNAL);
	x.cfg.heartbeat = 60;
	take(&x);
	assert_int_equal(send_start(&x, "PLAIN EXTERNAL"), 0);
	take(&x);
	so = x.f[0].decoded;
	assert_int_equal(so->mechanism.len, 8);
	assert_memory_equal(so->mechanism.bytes, "EXTERNAL", 8);
	assert_int_equal(so->response.len, 0);
	assert_int_equal(send_tune(&x, 0, 10), 0);
	take(&x);
	assert_int_equal(((amqp_connection_tune_ok_t *)x.f[0].decoded)->heartbeat, 10);
	/* frame_max 0 (no limit) from the broker: ours. */
	assert_int_equal(((amqp_connection_tune_ok_t *)x.f[0].decoded)->frame_max, 131072);
	fx_free(&x);
}

static void test_mechanism_not_offered(void **state)
{
	struct fx x;

	(void)state;
	fx_init(&x, BROKER_AUTH_EXTERNAL);
	take(&x);
	assert_int_equal(send_start(&x, "PLAIN AMQPLAIN"), -EPROTO);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	/* Before start-ok there is no connection to close: nothing is sent. */
	assert_int_equal(take(&x), 0);
	assert_non_null(strstr(x.p.error, "EXTERNAL"));
	fx_free(&x);
}

static void test_full_handshake_then_ready(void **state)
{
	struct fx x;

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	assert_int_equal(x.p.frame_max, 131072);
	fx_free(&x);
}

static void test_tune_frame_max_below_minimum(void **state)
{
	struct fx x;

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	take(&x);
	assert_int_equal(send_start(&x, "PLAIN"), 0);
	take(&x);
	assert_int_equal(send_tune(&x, 1024, 60), -EPROTO);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_int_equal(x.p.error_code, 530);
	assert_non_null(strstr(x.p.error, "frame_max"));
	assert_sent_close(&x, 530);
	fx_free(&x);
}

static void test_close_mid_handshake(void **state)
{
	struct fx x;
	amqp_connection_close_t c = { .reply_code = 403 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	take(&x);
	assert_int_equal(send_start(&x, "PLAIN"), 0);
	take(&x);
	c.reply_text = amqp_cstring_bytes("ACCESS_REFUSED - Login was refused\nforged line");
	send_method(&x, 0, AMQP_CONNECTION_CLOSE_METHOD, &c);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_int_equal(x.p.broker_code, 403);
	assert_non_null(strstr(x.p.error, "403"));
	assert_null(strchr(x.p.error, '\n')); /* the broker's text cannot forge a log line */
	take(&x);
	assert_int_equal(x.nf, 1);
	assert_int_equal(x.f[0].id, AMQP_CONNECTION_CLOSE_OK_METHOD);
	fx_free(&x);
}

static void test_deep_table_in_start(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 }, payload = { 0 };
	size_t tlen;
	uint8_t *t = wire_deep_table(100, &tlen);
	uint8_t hdr[6] = { 0, 10, 0, 10, 0, 9 }; /* connection.start, 0-9 */
	uint8_t lstr[4] = { 0, 0, 0, 5 };

	(void)state;
	wire_raw(&payload, hdr, sizeof(hdr));
	wire_raw(&payload, t, tlen);
	wire_raw(&payload, lstr, 4);
	wire_raw(&payload, "PLAIN", 5);
	wire_raw(&payload, lstr, 4);
	wire_raw(&payload, "en_US", 5);
	wire_frame(&b, 1, 0, payload.p, payload.len);
	fx_init(&x, BROKER_AUTH_PLAIN);
	take(&x);
	assert_int_equal(feed(&x, &b, 0), -EPROTO);
	assert_int_equal(x.p.error_code, 502);
	free(t);
	wire_buf_free(&payload);
	fx_free(&x);
}

/* ---- publishing and confirms -------------------------------------------------------- */

static void test_publish_frames_and_verbatim_properties(void **state)
{
	struct fx x;
	uint8_t props[64];
	amqp_basic_properties_t in = { ._flags = AMQP_BASIC_CONTENT_TYPE_FLAG |
						 AMQP_BASIC_DELIVERY_MODE_FLAG,
				       .content_type = amqp_cstring_bytes("application/json"),
				       .delivery_mode = 2 };
	int plen = amqp_encode_properties(AMQP_BASIC_CLASS, &in, (amqp_bytes_t){ sizeof(props), props });
	char body[10000];
	const amqp_basic_publish_t *pub;

	(void)state;
	assert_true(plen > 0);
	for (size_t i = 0; i < sizeof(body); i++)
		body[i] = (char)i;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 4096);
	assert_int_equal(upstream_proto_publish(&x.p, "uuid.cpu", 8, false, props, (size_t)plen, body,
						sizeof(body)), 1);
	assert_int_equal(upstream_proto_publish(&x.p, "uuid.mem", 8, false, props, (size_t)plen, NULL, 0),
			 2);
	take(&x);
	/* method, header, 3 bodies (4088 per frame), then method, header */
	assert_int_equal(x.nf, 7);
	assert_int_equal(x.f[0].id, AMQP_BASIC_PUBLISH_METHOD);
	pub = x.f[0].decoded;
	assert_int_equal(pub->exchange.len, 10);
	assert_memory_equal(pub->exchange.bytes, "vm.metrics", 10);
	assert_memory_equal(pub->routing_key.bytes, "uuid.cpu", 8);
	assert_int_equal(x.f[1].type, 2);
	/* class 60, weight 0, body size 10000, then the properties as given */
	assert_int_equal(x.f[1].size, 12 + (uint32_t)plen);
	assert_memory_equal(x.f[1].payload, "\0\x3c\0\0\0\0\0\0\0\0\x27\x10", 12);
	assert_memory_equal(x.f[1].payload + 12, props, (size_t)plen);
	assert_int_equal(x.f[2].size, 4088);
	assert_int_equal(x.f[3].size, 4088);
	assert_int_equal(x.f[4].size, 10000 - 2 * 4088);
	assert_memory_equal(x.f[3].payload, body + 4088, 4088);
	assert_int_equal(x.f[6].type, 2);
	fx_free(&x);
}

static void test_publish_refusals(void **state)
{
	struct fx x;
	static uint8_t big[8192];
	static uint8_t body[70000];
	int64_t r;
	unsigned n = 0;

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	/* Not ready yet. */
	assert_int_equal(upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, NULL, 0), -EAGAIN);
	handshake(&x, 4096);
	/* Properties larger than a frame can never go out on this link. */
	assert_int_equal(upstream_proto_publish(&x.p, "k", 1, false, big, sizeof(big), NULL, 0),
			 -EMSGSIZE);
	/* The output bound (64 KiB here): one message past it, then -EAGAIN. */
	while ((r = upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, body, 30000)) > 0)
		n++;
	assert_int_equal(r, -EAGAIN);
	assert_int_equal(n, 3);
	take(&x);
	assert_int_equal(upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, body, 30000), 4);
	fx_free(&x);
}

static void test_confirms(void **state)
{
	struct fx x;

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	for (int i = 0; i < 10; i++)
		upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1);
	ack(&x, 3, false, true, 1); /* a confirm split across many reads */
	ack(&x, 2, true, true, 5);
	ack(&x, 4, false, false, 0);
	ack(&x, 10, true, true, 0);
	assert_int_equal(x.rec.nconf, 4);
	assert_int_equal(x.rec.conf[0].tag, 3);
	assert_false(x.rec.conf[0].multiple);
	assert_true(x.rec.conf[1].multiple);
	assert_int_equal(x.rec.conf[1].tag, 2);
	assert_false(x.rec.conf[2].ack);
	assert_int_equal(x.rec.conf[3].tag, 10);
	assert_true(upstream_proto_ready(&x.p));
	fx_free(&x);
}

static void test_confirm_split_across_feeds_with_heartbeat(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	amqp_basic_ack_t a1 = { .delivery_tag = 1 }, a2 = { .delivery_tag = 2 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1);
	upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1);
	wire_method(&b, 1, AMQP_BASIC_ACK_METHOD, &a1);
	wire_heartbeat(&b, 0);
	wire_method(&b, 1, AMQP_BASIC_ACK_METHOD, &a2);
	/* Every split point, as TLS records might cut it. */
	for (size_t cut = 1; cut < b.len; cut++) {
		x.rec.nconf = 0;
		assert_int_equal(upstream_proto_feed(&x.p, b.p, cut, x.now), 0);
		assert_int_equal(upstream_proto_feed(&x.p, b.p + cut, b.len - cut, x.now), 0);
		assert_int_equal(x.rec.nconf, 2);
		assert_int_equal(x.rec.conf[1].tag, 2);
	}
	wire_buf_free(&b);
	fx_free(&x);
}

static void test_confirm_unknown_tag(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	amqp_basic_ack_t a = { .delivery_tag = 5 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1);
	wire_method(&b, 1, AMQP_BASIC_ACK_METHOD, &a);
	assert_int_equal(feed(&x, &b, 0), -EPROTO);
	assert_int_equal(x.p.error_code, 406);
	assert_int_equal(x.rec.nconf, 0);
	assert_sent_close(&x, 406);
	fx_free(&x);
}

static void test_flow(void **state)
{
	struct fx x;
	amqp_connection_blocked_t bl = { .reason = amqp_cstring_bytes("low on memory") };
	amqp_connection_unblocked_t ub = { 0 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	send_method(&x, 0, AMQP_CONNECTION_BLOCKED_METHOD, &bl);
	assert_int_equal(x.rec.blocked, 1);
	assert_string_equal(x.rec.reason, "low on memory");
	send_method(&x, 0, AMQP_CONNECTION_UNBLOCKED_METHOD, &ub);
	assert_int_equal(x.rec.blocked, 0);
	fx_free(&x);
}

static void test_channel_close_from_broker(void **state)
{
	struct fx x;
	amqp_channel_close_t c = { .reply_code = 404 };

	(void)state;
	c.reply_text = amqp_cstring_bytes("NOT_FOUND - no exchange 'vm.metrics' in vhost '/'");
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	send_method(&x, 1, AMQP_CHANNEL_CLOSE_METHOD, &c);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_int_equal(x.p.broker_code, 404);
	take(&x);
	assert_int_equal(x.nf, 2);
	assert_int_equal(x.f[0].id, AMQP_CHANNEL_CLOSE_OK_METHOD);
	assert_int_equal(x.f[1].id, AMQP_CONNECTION_CLOSE_METHOD);
	fx_free(&x);
}

/* basic.return, its header and its body (two frames), fed a byte at a time:
 * delivered whole, with the properties as the broker sent them, before the
 * confirm that follows it. */
static void test_return_assembled(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	amqp_basic_return_t r = { .reply_code = 312 };
	amqp_basic_properties_t props = { ._flags = AMQP_BASIC_CONTENT_TYPE_FLAG,
					  .content_type = amqp_cstring_bytes("text/plain") };
	amqp_basic_ack_t a = { .delivery_tag = 1 };
	char body[5000];
	uint8_t enc[64];
	int elen = amqp_encode_properties(AMQP_BASIC_CLASS, &props,
					  (amqp_bytes_t){ sizeof(enc), enc });

	(void)state;
	memset(body, 'b', sizeof(body));
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 4096);
	assert_int_equal(upstream_proto_publish(&x.p, "uuid.k", 6, true, enc, (size_t)elen, body,
						sizeof(body)), 1);
	take(&x);
	assert_true(((amqp_basic_publish_t *)x.f[0].decoded)->mandatory);
	r.reply_text = amqp_cstring_bytes("NO_ROUTE");
	r.exchange = amqp_cstring_bytes("vm.metrics");
	r.routing_key = amqp_cstring_bytes("uuid.k");
	wire_method(&b, 1, AMQP_BASIC_RETURN_METHOD, &r);
	wire_header(&b, 1, AMQP_BASIC_CLASS, sizeof(body), &props);
	wire_body(&b, 1, body, 4088);
	wire_heartbeat(&b, 0); /* channel 0 may come between content frames */
	wire_body(&b, 1, body + 4088, sizeof(body) - 4088);
	wire_method(&b, 1, AMQP_BASIC_ACK_METHOD, &a);
	assert_int_equal(feed(&x, &b, 1), 0);
	assert_int_equal(x.rec.nret, 1);
	assert_int_equal(x.rec.ret_code, 312);
	assert_string_equal(x.rec.ret_rk, "uuid.k");
	assert_string_equal(x.rec.ret_ex, "vm.metrics");
	assert_int_equal(x.rec.ret_props_len, (size_t)elen);
	assert_memory_equal(x.rec.ret_props, enc, (size_t)elen);
	assert_int_equal(x.rec.ret_body_len, sizeof(body));
	assert_memory_equal(x.rec.ret_body, body, sizeof(body));
	assert_int_equal(x.rec.nconf_at_return, 0);
	assert_int_equal(x.rec.nconf, 1);
	fx_free(&x);
}

static void test_return_bounds(void **state)
{
	amqp_basic_return_t r = { .reply_code = 312 };
	amqp_basic_ack_t a = { .delivery_tag = 1 };

	(void)state;
	r.reply_text = amqp_cstring_bytes("NO_ROUTE");
	r.exchange = amqp_cstring_bytes("x");
	r.routing_key = amqp_cstring_bytes("k");
	/* A body larger than anything published ends the link. */
	{
		struct fx x;
		struct wire_buf b = { 0 };
		fx_init(&x, BROKER_AUTH_PLAIN);
		handshake(&x, 131072);
		wire_method(&b, 1, AMQP_BASIC_RETURN_METHOD, &r);
		wire_header(&b, 1, AMQP_BASIC_CLASS, 8193, NULL);
		assert_int_equal(feed(&x, &b, 0), -EPROTO);
		assert_int_equal(x.p.error_code, 505);
		fx_free(&x);
	}
	/* A method where the returned content was due. */
	{
		struct fx x;
		struct wire_buf b = { 0 };
		fx_init(&x, BROKER_AUTH_PLAIN);
		handshake(&x, 131072);
		upstream_proto_publish(&x.p, "k", 1, true, NULL, 0, "x", 1);
		wire_method(&b, 1, AMQP_BASIC_RETURN_METHOD, &r);
		wire_method(&b, 1, AMQP_BASIC_ACK_METHOD, &a);
		assert_int_equal(feed(&x, &b, 0), -EPROTO);
		assert_int_equal(x.p.error_code, 505);
		assert_int_equal(x.rec.nret, 0);
		fx_free(&x);
	}
	/* More body than the header announced. */
	{
		struct fx x;
		struct wire_buf b = { 0 };
		fx_init(&x, BROKER_AUTH_PLAIN);
		handshake(&x, 131072);
		wire_method(&b, 1, AMQP_BASIC_RETURN_METHOD, &r);
		wire_header(&b, 1, AMQP_BASIC_CLASS, 2, NULL);
		wire_body(&b, 1, "abc", 3);
		assert_int_equal(feed(&x, &b, 0), -EPROTO);
		assert_int_equal(x.p.error_code, 505);
		fx_free(&x);
	}
}

/* ---- malformed input ------------------------------------------------------------------- */

static void test_oversize_frame(void **state)
{
	struct fx x;
	uint8_t hdr[7] = { 1, 0, 1, 0, 0x10, 0, 0 }; /* 1 MiB method frame */

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	/* Refused on its header alone: nothing of it is buffered. */
	assert_int_equal(upstream_proto_feed(&x.p, hdr, 3, x.now), 0);
	assert_int_equal(upstream_proto_feed(&x.p, hdr + 3, 4, x.now), -EPROTO);
	assert_int_equal(x.p.error_code, 501);
	assert_sent_close(&x, 501);
	fx_free(&x);
}

static void test_bad_frame_end(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	wire_frame_end(&b, 8, 0, NULL, 0, 0x00);
	assert_int_equal(feed(&x, &b, 0), -EPROTO);
	assert_int_equal(x.p.error_code, 501);
	fx_free(&x);
}

static void test_unexpected_frames(void **state)
{
	static const struct {
		uint8_t type;
		uint16_t ch;
		uint16_t code;
	} cases[] = {
		{ 2, 1, 505 },	/* a content header: this link never consumes */
		{ 3, 1, 505 },	/* a body */
		{ 1, 7, 504 },	/* a channel we never opened */
		{ 9, 0, 501 },	/* no such frame type */
		{ 8, 1, 501 },	/* heartbeat on a channel (the spec's frame error) */
	};

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct fx x;
		struct wire_buf b = { 0 };
		uint8_t payload[4] = { 0, 60, 0, 80 };

		fx_init(&x, BROKER_AUTH_PLAIN);
		handshake(&x, 131072);
		wire_frame(&b, cases[i].type, cases[i].ch, payload, cases[i].type == 8 ? 0 : 4);
		assert_int_equal(feed(&x, &b, 0), -EPROTO);
		assert_int_equal(x.p.error_code, cases[i].code);
		fx_free(&x);
	}
}

static void test_short_and_unknown_methods(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	uint8_t shortm[2] = { 0, 60 };
	amqp_basic_qos_ok_t q = { 0 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	wire_frame(&b, 1, 1, shortm, sizeof(shortm));
	assert_int_equal(feed(&x, &b, 0), -EPROTO);
	assert_int_equal(x.p.error_code, 501);
	fx_free(&x);

	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	send_method(&x, 1, AMQP_BASIC_QOS_OK_METHOD, &q);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_int_equal(x.p.error_code, 503);
	fx_free(&x);
}

/* ---- heartbeats and closing ----------------------------------------------------------- */

static void test_heartbeats(void **state)
{
	struct fx x;
	uint64_t next;
	struct wire_buf b = { 0 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	x.cfg.heartbeat = 10;
	handshake(&x, 131072);
	/* Nothing due before half the interval. */
	next = upstream_proto_tick(&x.p, x.now + 1000);
	assert_int_equal(next, x.now + 5000);
	assert_int_equal(take(&x), 0);
	/* Idle for half the interval: a heartbeat goes out. */
	x.now += 5000;
	upstream_proto_tick(&x.p, x.now);
	assert_int_equal(take(&x), 1);
	assert_int_equal(x.f[0].type, 8);
	/* The broker's heartbeat keeps the link alive... */
	x.now += 15000;
	wire_heartbeat(&b, 0);
	assert_int_equal(feed(&x, &b, 0), 0);
	assert_true(upstream_proto_tick(&x.p, x.now + 19999) > 0);
	/* ...and two missed intervals end it. */
	assert_int_equal(upstream_proto_tick(&x.p, x.now + 20000), 0);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_non_null(strstr(x.p.error, "heartbeat"));
	fx_free(&x);
}

static void test_planned_close(void **state)
{
	struct fx x;
	amqp_connection_close_ok_t ok = { 0 };
	amqp_basic_ack_t a = { .delivery_tag = 1 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1);
	take(&x);
	upstream_proto_close(&x.p, 200, "reconnecting");
	assert_sent_close(&x, 200);
	assert_int_equal(upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1), -EAGAIN);
	/* A confirm crossing the close still counts. */
	send_method(&x, 1, AMQP_BASIC_ACK_METHOD, &a);
	assert_int_equal(x.rec.nconf, 1);
	send_method(&x, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_string_equal(x.p.error, "");
	fx_free(&x);
}


/* ---- the inbox channel ---------------------------------------------------------------- */

#define IB UPSTREAM_PROTO_INBOX_CHANNEL

/* declare, bind and consume on the inbox channel: opened first, requests
 * pipelined, answered in order with their cookies; declare-ok's count. */
static void subscribe(struct fx *x, const char *tag, uint16_t prefetch)
{
	amqp_channel_open_ok_t cok = { .channel_id = amqp_cstring_bytes("") };
	amqp_queue_declare_ok_t dok = { .queue = amqp_cstring_bytes("vm.u.inbox"),
					.message_count = 5 };
	amqp_queue_bind_ok_t bok = { 0 };
	amqp_basic_qos_ok_t qok = { 0 };
	amqp_basic_consume_ok_t ok = { .consumer_tag = amqp_cstring_bytes(tag) };
	amqp_table_entry_t arg = { .key = amqp_cstring_bytes("x-max-length"),
				   .value = { .kind = AMQP_FIELD_KIND_I64, .value.i64 = 10 } };
	amqp_table_t args = { 1, &arg };
	bool first = !x->p.ib.open;

	assert_int_equal(upstream_proto_inbox_declare(&x->p, "vm.u.inbox", &args, 1), 0);
	assert_int_equal(upstream_proto_inbox_bind(&x->p, "vm.u.inbox", "vm.control", "u.#", 2), 0);
	assert_int_equal(upstream_proto_inbox_consume(&x->p, "vm.u.inbox", tag, prefetch, 3), 0);
	take(x);
	int i = 0;
	if (first) {
		assert_int_equal(x->nf, 5);
		assert_int_equal(x->f[i].id, AMQP_CHANNEL_OPEN_METHOD);
		assert_int_equal(x->f[i++].ch, IB);
	} else {
		assert_int_equal(x->nf, 4);
	}
	assert_int_equal(x->f[i].id, AMQP_QUEUE_DECLARE_METHOD);
	assert_int_equal(x->f[i].ch, IB);
	{
		amqp_queue_declare_t *d = x->f[i++].decoded;
		assert_true(d->durable);
		assert_int_equal(d->arguments.num_entries, 1);
	}
	assert_int_equal(x->f[i].id, AMQP_QUEUE_BIND_METHOD);
	{
		amqp_queue_bind_t *qb = x->f[i++].decoded;
		assert_int_equal(qb->routing_key.len, 3);
		assert_memory_equal(qb->routing_key.bytes, "u.#", 3);
		assert_int_equal(qb->exchange.len, 10);
		assert_memory_equal(qb->exchange.bytes, "vm.control", 10);
	}
	assert_int_equal(x->f[i].id, AMQP_BASIC_QOS_METHOD);
	assert_int_equal(((amqp_basic_qos_t *)x->f[i++].decoded)->prefetch_count, prefetch);
	assert_int_equal(x->f[i].id, AMQP_BASIC_CONSUME_METHOD);
	assert_false(((amqp_basic_consume_t *)x->f[i].decoded)->no_ack);
	if (first)
		send_method(x, IB, AMQP_CHANNEL_OPEN_OK_METHOD, &cok);
	x->rec.nreply = 0;
	send_method(x, IB, AMQP_QUEUE_DECLARE_OK_METHOD, &dok);
	send_method(x, IB, AMQP_QUEUE_BIND_OK_METHOD, &bok);
	send_method(x, IB, AMQP_BASIC_QOS_OK_METHOD, &qok);
	assert_int_equal(x->rec.nreply, 2); /* qos-ok alone answers nothing */
	send_method(x, IB, AMQP_BASIC_CONSUME_OK_METHOD, &ok);
	assert_int_equal(x->rec.nreply, 3);
	for (unsigned k = 0; k < 3; k++) {
		assert_int_equal(x->rec.reply[k].cookie, k + 1);
		assert_true(x->rec.reply[k].ok);
	}
	assert_int_equal(x->rec.reply[0].kind, UPSTREAM_INBOX_DECLARE);
	assert_int_equal(x->rec.reply[0].count, 5);
	assert_int_equal(x->rec.reply[2].kind, UPSTREAM_INBOX_CONSUME);
	assert_true(upstream_proto_ready(&x->p));
}

static void test_inbox_requests(void **state)
{
	struct fx x;

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	subscribe(&x, "vmproxyd.0.1", 7);
	/* A second subscription reuses the open channel. */
	subscribe(&x, "vmproxyd.0.2", 100);
	assert_int_equal(x.p.ib.gen, 1);
	fx_free(&x);
}

/* A delivery's method, header and two body frames, fed a byte at a time
 * and interleaved with a confirm on the publishing channel: passed on
 * whole; settling it acks that one tag on the inbox channel. */
static void test_inbox_delivery(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	amqp_basic_deliver_t d = { .consumer_tag = amqp_cstring_bytes("vmproxyd.0.1"),
				   .delivery_tag = 42,
				   .redelivered = 1,
				   .exchange = amqp_cstring_bytes("vm.control"),
				   .routing_key = amqp_cstring_bytes("u.cmd") };
	amqp_basic_ack_t a = { .delivery_tag = 1 };
	char body[5000];

	(void)state;
	memset(body, 'd', sizeof(body));
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 4096);
	subscribe(&x, "vmproxyd.0.1", 1);
	assert_int_equal(upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1), 1);
	take(&x);
	wire_method(&b, IB, AMQP_BASIC_DELIVER_METHOD, &d);
	wire_header(&b, IB, AMQP_BASIC_CLASS, sizeof(body), NULL);
	wire_body(&b, IB, body, 4088);
	wire_method(&b, 1, AMQP_BASIC_ACK_METHOD, &a); /* another channel may come between */
	wire_body(&b, IB, body + 4088, sizeof(body) - 4088);
	assert_int_equal(feed(&x, &b, 1), 0);
	assert_int_equal(x.rec.nconf, 1);
	assert_int_equal(x.rec.ndeliver, 1);
	assert_int_equal(x.rec.dtag, 42);
	assert_true(x.rec.dredelivered);
	assert_string_equal(x.rec.dctag, "vmproxyd.0.1");
	assert_string_equal(x.rec.drk, "u.cmd");
	assert_int_equal(x.rec.dbody_len, sizeof(body));
	assert_memory_equal(x.rec.dbody, body, sizeof(body));
	assert_int_equal(upstream_proto_inbox_settle(&x.p, x.rec.dgen, 42, UPSTREAM_ACK, false), 0);
	assert_int_equal(upstream_proto_inbox_settle(&x.p, x.rec.dgen, 43, UPSTREAM_NACK, true), 0);
	assert_int_equal(upstream_proto_inbox_settle(&x.p, x.rec.dgen + 1, 44, UPSTREAM_ACK, false),
			 -ESTALE);
	take(&x);
	assert_int_equal(x.nf, 2);
	assert_int_equal(x.f[0].id, AMQP_BASIC_ACK_METHOD);
	assert_int_equal(x.f[0].ch, IB);
	assert_int_equal(((amqp_basic_ack_t *)x.f[0].decoded)->delivery_tag, 42);
	assert_false(((amqp_basic_ack_t *)x.f[0].decoded)->multiple);
	assert_int_equal(x.f[1].id, AMQP_BASIC_NACK_METHOD);
	assert_true(((amqp_basic_nack_t *)x.f[1].decoded)->requeue);
	fx_free(&x);
}

/* A delivery larger than max_delivery is not passed on: rejected without
 * requeue (the broker dead-letters or drops it), counted. */
static void test_inbox_oversize_delivery(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	amqp_basic_deliver_t d = { .consumer_tag = amqp_cstring_bytes("vmproxyd.0.1"),
				   .delivery_tag = 7,
				   .exchange = amqp_cstring_bytes("vm.control"),
				   .routing_key = amqp_cstring_bytes("u.cmd") };
	char body[300];

	(void)state;
	memset(body, 'o', sizeof(body));
	fx_init(&x, BROKER_AUTH_PLAIN);
	x.cfg.max_delivery = 100;
	handshake(&x, 131072);
	subscribe(&x, "vmproxyd.0.1", 1);
	wire_method(&b, IB, AMQP_BASIC_DELIVER_METHOD, &d);
	wire_header(&b, IB, AMQP_BASIC_CLASS, sizeof(body), NULL);
	wire_body(&b, IB, body, sizeof(body));
	assert_int_equal(feed(&x, &b, 0), 0);
	assert_int_equal(x.rec.ndeliver, 0);
	assert_int_equal(x.p.ib.refused, 1);
	take(&x);
	assert_int_equal(x.nf, 1);
	assert_int_equal(x.f[0].id, AMQP_BASIC_REJECT_METHOD);
	assert_int_equal(((amqp_basic_reject_t *)x.f[0].decoded)->delivery_tag, 7);
	assert_false(((amqp_basic_reject_t *)x.f[0].decoded)->requeue);
	fx_free(&x);
}

/* The broker closes the inbox channel (a refused declare): the pending
 * requests fail with its code, the channel is reported closed, publishing
 * goes on, and the next request opens the channel again. */
static void test_inbox_channel_close(void **state)
{
	struct fx x;
	amqp_channel_open_ok_t cok = { .channel_id = amqp_cstring_bytes("") };
	amqp_channel_close_t c = { .reply_code = 403 };

	(void)state;
	c.reply_text = amqp_cstring_bytes("ACCESS_REFUSED - access to queue refused");
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	assert_int_equal(upstream_proto_inbox_declare(&x.p, "q", NULL, 10), 0);
	assert_int_equal(upstream_proto_inbox_bind(&x.p, "q", "vm.control", "u.#", 11), 0);
	take(&x);
	send_method(&x, IB, AMQP_CHANNEL_OPEN_OK_METHOD, &cok);
	send_method(&x, IB, AMQP_CHANNEL_CLOSE_METHOD, &c);
	assert_int_equal(x.rec.nreply, 2);
	assert_false(x.rec.reply[0].ok);
	assert_int_equal(x.rec.reply[0].code, 403);
	assert_int_equal(x.rec.reply[1].cookie, 11);
	assert_int_equal(x.rec.nclosed, 1);
	assert_int_equal(x.rec.closed_code, 403);
	assert_true(upstream_proto_ready(&x.p));
	take(&x);
	assert_int_equal(x.nf, 1);
	assert_int_equal(x.f[0].id, AMQP_CHANNEL_CLOSE_OK_METHOD);
	assert_int_equal(x.f[0].ch, IB);
	assert_int_equal(upstream_proto_inbox_settle(&x.p, 1, 1, UPSTREAM_ACK, false), -ESTALE);
	assert_int_equal(upstream_proto_publish(&x.p, "k", 1, false, NULL, 0, "x", 1), 1);
	assert_int_equal(upstream_proto_inbox_declare(&x.p, "q", NULL, 12), 0);
	take(&x);
	assert_int_equal(x.f[3].id, AMQP_CHANNEL_OPEN_METHOD);
	assert_int_equal(x.p.ib.gen, 2);
	/* The link ends: what is pending is answered, once. */
	upstream_proto_inbox_abort(&x.p, "link lost");
	upstream_proto_inbox_abort(&x.p, "link lost");
	assert_int_equal(x.rec.nreply, 3);
	assert_false(x.rec.reply[2].ok);
	assert_int_equal(x.rec.reply[2].code, 0);
	assert_int_equal(x.rec.nclosed, 2);
	fx_free(&x);
}

/* basic.get: get-ok and its content answer the request with the message
 * and the count left; get-empty answers it as a reply. */
static void test_inbox_get(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	amqp_channel_open_ok_t cok = { .channel_id = amqp_cstring_bytes("") };
	amqp_basic_get_ok_t g = { .delivery_tag = 9,
				  .redelivered = 1,
				  .exchange = amqp_cstring_bytes("vm.control"),
				  .routing_key = amqp_cstring_bytes("u.x"),
				  .message_count = 4 };
	amqp_basic_get_empty_t e = { .cluster_id = amqp_empty_bytes };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	assert_int_equal(upstream_proto_inbox_get(&x.p, "q", 21), 0);
	assert_int_equal(upstream_proto_inbox_get(&x.p, "q", 22), 0);
	take(&x);
	assert_int_equal(x.nf, 3);
	assert_int_equal(x.f[1].id, AMQP_BASIC_GET_METHOD);
	send_method(&x, IB, AMQP_CHANNEL_OPEN_OK_METHOD, &cok);
	wire_method(&b, IB, AMQP_BASIC_GET_OK_METHOD, &g);
	wire_header(&b, IB, AMQP_BASIC_CLASS, 3, NULL);
	wire_body(&b, IB, "abc", 3);
	wire_method(&b, IB, AMQP_BASIC_GET_EMPTY_METHOD, &e);
	assert_int_equal(feed(&x, &b, 1), 0);
	assert_int_equal(x.rec.ngot, 1);
	assert_int_equal(x.rec.got_cookie, 21);
	assert_int_equal(x.rec.got_count, 4);
	assert_int_equal(x.rec.dtag, 9);
	assert_true(x.rec.dredelivered);
	assert_int_equal(x.rec.dbody_len, 3);
	assert_memory_equal(x.rec.dbody, "abc", 3);
	assert_int_equal(x.rec.nreply, 1);
	assert_int_equal(x.rec.reply[0].cookie, 22);
	assert_int_equal(x.rec.reply[0].kind, UPSTREAM_INBOX_GET);
	assert_true(x.rec.reply[0].ok);
	assert_int_equal(x.p.ib.npending, 0);
	fx_free(&x);
}

/* What the inbox channel must never see ends the link: a reply nothing
 * asked for, a frame before the channel was opened, content without
 * basic.deliver, a method inside a delivery's content. */
static void test_inbox_protocol_errors(void **state)
{
	struct fx x;
	struct wire_buf b = { 0 };
	amqp_basic_consume_ok_t ok = { .consumer_tag = amqp_cstring_bytes("t") };
	amqp_basic_deliver_t d = { .consumer_tag = amqp_cstring_bytes("t"), .delivery_tag = 1 };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	send_method(&x, IB, AMQP_BASIC_CONSUME_OK_METHOD, &ok);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_int_equal(x.p.error_code, 504); /* the channel was never opened */
	fx_free(&x);

	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	assert_int_equal(upstream_proto_inbox_declare(&x.p, "q", NULL, 1), 0);
	send_method(&x, IB, AMQP_BASIC_CONSUME_OK_METHOD, &ok);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_int_equal(x.p.error_code, 503);
	fx_free(&x);

	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	subscribe(&x, "t", 1);
	wire_body(&b, IB, "x", 1);
	assert_int_equal(feed(&x, &b, 0), -EPROTO);
	assert_int_equal(x.p.error_code, 505);
	fx_free(&x);

	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	subscribe(&x, "t", 1);
	wire_method(&b, IB, AMQP_BASIC_DELIVER_METHOD, &d);
	wire_method(&b, IB, AMQP_BASIC_DELIVER_METHOD, &d);
	assert_int_equal(feed(&x, &b, 0), -EPROTO);
	assert_int_equal(x.p.error_code, 505);
	fx_free(&x);
}

/* RabbitMQ sends a quorum queue's consume-ok and cancel-ok from the
 * queue's side: a later request's reply may overtake them. Each reply
 * still answers its own request, and the link stays up. */
static void test_inbox_consume_ok_overtaken(void **state)
{
	struct fx x;
	amqp_queue_declare_ok_t dok = { .queue = amqp_cstring_bytes("vm.v.inbox"),
					.message_count = 2 };
	amqp_queue_bind_ok_t bok = { 0 };
	amqp_basic_qos_ok_t qok = { 0 };
	amqp_basic_consume_ok_t cok = { .consumer_tag = amqp_cstring_bytes("t2") };
	amqp_basic_cancel_ok_t xok = { .consumer_tag = amqp_cstring_bytes("t2") };

	(void)state;
	fx_init(&x, BROKER_AUTH_PLAIN);
	handshake(&x, 131072);
	subscribe(&x, "t1", 5);
	assert_int_equal(upstream_proto_inbox_consume(&x.p, "vm.u.inbox", "t2", 5, 10), 0);
	assert_int_equal(upstream_proto_inbox_declare(&x.p, "vm.v.inbox", NULL, 11), 0);
	assert_int_equal(upstream_proto_inbox_bind(&x.p, "vm.v.inbox", "vm.control", "v.#", 12), 0);
	x.rec.nreply = 0;
	send_method(&x, IB, AMQP_BASIC_QOS_OK_METHOD, &qok);
	send_method(&x, IB, AMQP_QUEUE_DECLARE_OK_METHOD, &dok);
	send_method(&x, IB, AMQP_QUEUE_BIND_OK_METHOD, &bok);
	send_method(&x, IB, AMQP_BASIC_CONSUME_OK_METHOD, &cok);
	assert_true(upstream_proto_ready(&x.p));
	assert_int_equal(x.rec.nreply, 3);
	assert_int_equal(x.rec.reply[0].cookie, 11);
	assert_int_equal(x.rec.reply[0].kind, UPSTREAM_INBOX_DECLARE);
	assert_int_equal(x.rec.reply[0].count, 2);
	assert_int_equal(x.rec.reply[1].cookie, 12);
	assert_int_equal(x.rec.reply[2].cookie, 10);
	assert_int_equal(x.rec.reply[2].kind, UPSTREAM_INBOX_CONSUME);
	/* A cancel overtaken by a declare's reply. */
	assert_int_equal(upstream_proto_inbox_cancel(&x.p, "t2", 20), 0);
	assert_int_equal(upstream_proto_inbox_declare(&x.p, "vm.v.inbox", NULL, 21), 0);
	send_method(&x, IB, AMQP_QUEUE_DECLARE_OK_METHOD, &dok);
	send_method(&x, IB, AMQP_BASIC_CANCEL_OK_METHOD, &xok);
	assert_true(upstream_proto_ready(&x.p));
	assert_int_equal(x.rec.nreply, 5);
	assert_int_equal(x.rec.reply[3].cookie, 21);
	assert_int_equal(x.rec.reply[4].cookie, 20);
	assert_int_equal(x.rec.reply[4].kind, UPSTREAM_INBOX_CANCEL);
	assert_int_equal(x.p.ib.npending, 0);
	assert_null(x.p.ib.head);
	assert_null(x.p.ib.tail);
	/* Nothing is owed now: a consume-ok ends the link as before. */
	send_method(&x, IB, AMQP_BASIC_CONSUME_OK_METHOD, &cok);
	assert_int_equal(x.p.st, UPSTREAM_PROTO_CLOSED);
	assert_int_equal(x.p.error_code, 503);
	fx_free(&x);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_handshake_plain),
		cmocka_unit_test(test_handshake_external_heartbeat_from_broker),
		cmocka_unit_test(test_mechanism_not_offered),
		cmocka_unit_test(test_full_handshake_then_ready),
		cmocka_unit_test(test_tune_frame_max_below_minimum),
		cmocka_unit_test(test_close_mid_handshake),
		cmocka_unit_test(test_deep_table_in_start),
		cmocka_unit_test(test_publish_frames_and_verbatim_properties),
		cmocka_unit_test(test_publish_refusals),
		cmocka_unit_test(test_confirms),
		cmocka_unit_test(test_confirm_split_across_feeds_with_heartbeat),
		cmocka_unit_test(test_confirm_unknown_tag),
		cmocka_unit_test(test_flow),
		cmocka_unit_test(test_return_assembled),
		cmocka_unit_test(test_return_bounds),
		cmocka_unit_test(test_channel_close_from_broker),
		cmocka_unit_test(test_oversize_frame),
		cmocka_unit_test(test_bad_frame_end),
		cmocka_unit_test(test_unexpected_frames),
		cmocka_unit_test(test_short_and_unknown_methods),
		cmocka_unit_test(test_heartbeats),
		cmocka_unit_test(test_planned_close),
		cmocka_unit_test(test_inbox_requests),
		cmocka_unit_test(test_inbox_delivery),
		cmocka_unit_test(test_inbox_oversize_delivery),
		cmocka_unit_test(test_inbox_channel_close),
				cmocka_unit_test(test_inbox_protocol_errors),
		cmocka_unit_test(test_inbox_get),
		cmocka_unit_test(test_inbox_consume_ok_overtaken),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
