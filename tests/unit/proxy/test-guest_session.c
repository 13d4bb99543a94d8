/* test-guest_session.c -- black-box tests of the guest-facing AMQP 0-9-1
 * engine: every frame in is built and every frame out is parsed by
 * amqp_wire, independently of the engine, and each rule is checked against
 * what RabbitMQ 3.10 does (reply code, and connection.close vs
 * channel.close). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_wire.h"
#include "guest_session.h"

/* cmocka's assert_non_null() is not known to the compiler to stop the test. */
#pragma GCC diagnostic ignored "-Wnull-dereference"

#define MAX_EVENTS 256
#define MAX_FRAMES 512

#define CAP_BLOCKED   1
#define CAP_AUTHCLOSE 2
#define CAP_CANCEL    4

struct ev_rec {
	enum guest_event_type type;
	uint16_t channel;
	uint32_t gen;
	uint16_t reply_code;
	uint64_t tag;
	bool confirm, mandatory;
	char exchange[256], rk[256], content_type[64];
	uint8_t delivery_mode;
	uint8_t *body;
	size_t body_len;
	uint8_t raw_props[512];
	size_t raw_props_len;
	bool passive, no_ack;
	uint16_t prefetch;
	uint32_t consumer_id;
	struct guest_settle settle;
};

struct fx {
	struct guest_session_config cfg;
	struct guest_session *s;
	uint64_t now;
	struct ev_rec ev[MAX_EVENTS];
	int nev;
	amqp_pool_t pool;
	uint8_t *out; /* copy of the last drained output */
	struct wire_frame fr[MAX_FRAMES];
	int nfr;
	const char *refuse_user; /* auth hook refuses this login */
	char auth_mech[32], auth_user[128];
};

static const char *const allowed[] = {"metrics", NULL};

static void on_event(void *ud, const struct guest_event *e)
{
	struct fx *f = ud;
	struct ev_rec *r;

	assert_true(f->nev < MAX_EVENTS);
	r = &f->ev[f->nev++];
	memset(r, 0, sizeof(*r));
	r->type = e->type;
	r->channel = e->channel;
	r->gen = e->channel_gen;
	r->reply_code = e->reply_code;
	if (e->type == GUEST_EVENT_CLOSED)
		assert_non_null(e->text);
	r->passive = e->passive;
	r->no_ack = e->no_ack;
	r->prefetch = e->prefetch;
	r->consumer_id = e->consumer_id;
	r->settle = e->settle;
	if (e->type != GUEST_EVENT_PUBLISH)
		return;
	assert_int_equal(e->publish.channel, e->channel);
	assert_int_equal(e->publish.channel_gen, e->channel_gen);
	r->tag = e->publish.delivery_tag;
	r->confirm = e->publish.confirm;
	r->mandatory = e->publish.mandatory;
	memcpy(r->exchange, e->publish.exchange.bytes, e->publish.exchange.len);
	memcpy(r->rk, e->publish.routing_key.bytes, e->publish.routing_key.len);
	assert_non_null(e->publish.properties);
	if (e->publish.properties->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
		amqp_bytes_t ct = e->publish.properties->content_type;
		assert_true(ct.len < sizeof(r->content_type));
		memcpy(r->content_type, ct.bytes, ct.len);
	}
	if (e->publish.properties->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG)
		r->delivery_mode = e->publish.properties->delivery_mode;
	assert_true(e->publish.raw_properties.len <= sizeof(r->raw_props));
	memcpy(r->raw_props, e->publish.raw_properties.bytes, e->publish.raw_properties.len);
	r->raw_props_len = e->publish.raw_properties.len;
	r->body = e->publish.body; /* ownership passes to us */
	r->body_len = e->publish.body_len;
	if (r->body_len == 0)
		assert_null(r->body);
}

static int auth_hook(void *ud, const char *mech, const char *user)
{
	struct fx *f = ud;

	snprintf(f->auth_mech, sizeof(f->auth_mech), "%s", mech);
	snprintf(f->auth_user, sizeof(f->auth_user), "%s", user);
	if (f->refuse_user && strcmp(user, f->refuse_user) == 0)
		return -EACCES;
	return 0;
}

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	guest_session_config_init(&f->cfg);
	f->cfg.allowed_exchanges = allowed;
	f->cfg.channel_max = 8;
	f->cfg.max_message_bytes = 4096;
	f->cfg.product = "vmproxy-test";
	f->cfg.auth = auth_hook;
	f->cfg.auth_userdata = f;
	f->cfg.on_event = on_event;
	f->now = 1000000;
	init_amqp_pool(&f->pool, 4096);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;

	guest_session_free(f->s);
	for (int i = 0; i < f->nev; i++)
		free(f->ev[i].body);
	free(f->out);
	empty_amqp_pool(&f->pool);
	free(f);
	return 0;
}

/* Create the session lazily so tests can change the config first. */
static struct guest_session *sess(struct fx *f)
{
	if (!f->s) {
		f->s = guest_session_new(&f->cfg, f, f->now);
		assert_non_null(f->s);
	}
	return f->s;
}

static int feed(struct fx *f, struct wire_buf *b)
{
	int r = guest_session_feed(sess(f), b->p, b->len, f->now);

	wire_buf_free(b);
	return r;
}

/* Take all pending output, check that it is whole frames with good end
 * octets, and decode it into f->fr. */
static int drain(struct fx *f)
{
	const void *p;
	size_t n = guest_session_output(sess(f), &p);

	recycle_amqp_pool(&f->pool);
	free(f->out);
	f->out = malloc(n ? n : 1);
	assert_non_null(f->out);
	memcpy(f->out, p, n);
	guest_session_output_consumed(f->s, n, f->now);
	f->nfr = wire_parse(f->out, n, f->fr, MAX_FRAMES, &f->pool);
	assert_true(f->nfr >= 0);
	return f->nfr;
}

static int count_events(struct fx *f, enum guest_event_type t)
{
	int k = 0;

	for (int i = 0; i < f->nev; i++)
		k += f->ev[i].type == t;
	return k;
}

static struct ev_rec *last_event(struct fx *f, enum guest_event_type t)
{
	for (int i = f->nev - 1; i >= 0; i--)
		if (f->ev[i].type == t)
			return &f->ev[i];
	return NULL;
}

static void *expect_one_method(struct fx *f, uint16_t ch, amqp_method_number_t id)
{
	assert_int_equal(drain(f), 1);
	assert_int_equal(f->fr[0].type, AMQP_FRAME_METHOD);
	assert_int_equal(f->fr[0].ch, ch);
	assert_int_equal(f->fr[0].id, id);
	assert_non_null(f->fr[0].decoded);
	return f->fr[0].decoded;
}

static bool has_word(amqp_bytes_t list, const char *w)
{
	size_t wl = strlen(w), i = 0;
	const char *p = list.bytes;

	while (i < list.len) {
		size_t j = i;
		while (j < list.len && p[j] != ' ')
			j++;
		if (j - i == wl && memcmp(p + i, w, wl) == 0)
			return true;
		i = j + 1;
	}
	return false;
}

static const amqp_field_value_t *tget(const amqp_table_t *t, const char *k)
{
	for (int i = 0; i < t->num_entries; i++)
		if (t->entries[i].key.len == strlen(k) &&
		    memcmp(t->entries[i].key.bytes, k, strlen(k)) == 0)
			return &t->entries[i].value;
	return NULL;
}

/* ---- handshake helpers ---------------------------------------------------- */

static void send_header_expect_start(struct fx *f)
{
	struct wire_buf b = {0};

	wire_protocol_header(&b);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 0, AMQP_CONNECTION_START_METHOD);
}

static void put_start_ok(struct wire_buf *b, int caps, const char *mech, amqp_bytes_t resp)
{
	amqp_table_entry_t ce[3], pe[2];
	amqp_connection_start_ok_t m;
	int nc = 0;

	if (caps & CAP_BLOCKED) {
		ce[nc].key = amqp_cstring_bytes("connection.blocked");
		ce[nc].value.kind = AMQP_FIELD_KIND_BOOLEAN;
		ce[nc++].value.value.boolean = 1;
	}
	if (caps & CAP_AUTHCLOSE) {
		ce[nc].key = amqp_cstring_bytes("authentication_failure_close");
		ce[nc].value.kind = AMQP_FIELD_KIND_BOOLEAN;
		ce[nc++].value.value.boolean = 1;
	}
	if (caps & CAP_CANCEL) {
		ce[nc].key = amqp_cstring_bytes("consumer_cancel_notify");
		ce[nc].value.kind = AMQP_FIELD_KIND_BOOLEAN;
		ce[nc++].value.value.boolean = 1;
	}
	pe[0].key = amqp_cstring_bytes("capabilities");
	pe[0].value.kind = AMQP_FIELD_KIND_TABLE;
	pe[0].value.value.table.num_entries = nc;
	pe[0].value.value.table.entries = ce;
	pe[1].key = amqp_cstring_bytes("product");
	pe[1].value.kind = AMQP_FIELD_KIND_UTF8;
	pe[1].value.value.bytes = amqp_cstring_bytes("test-client");
	memset(&m, 0, sizeof(m));
	m.client_properties.num_entries = 2;
	m.client_properties.entries = pe;
	m.mechanism = amqp_cstring_bytes(mech);
	m.response = resp;
	m.locale = amqp_cstring_bytes("en_US");
	wire_method(b, 0, AMQP_CONNECTION_START_OK_METHOD, &m);
}

static amqp_bytes_t plain(const char *user)
{
	static char buf[300];
	size_t n = strlen(user);

	buf[0] = 0;
	memcpy(buf + 1, user, n);
	buf[n + 1] = 0;
	memcpy(buf + n + 2, "secret", 6);
	return (amqp_bytes_t){n + 8, buf};
}

static void put_tune_ok(struct wire_buf *b, uint16_t chmax, uint32_t fmax, uint16_t hb)
{
	amqp_connection_tune_ok_t t = {.channel_max = chmax, .frame_max = fmax, .heartbeat = hb};

	wire_method(b, 0, AMQP_CONNECTION_TUNE_OK_METHOD, &t);
}

static void put_open(struct wire_buf *b, const char *vhost)
{
	amqp_connection_open_t o;

	memset(&o, 0, sizeof(o));
	o.virtual_host = amqp_cstring_bytes(vhost);
	o.capabilities = amqp_cstring_bytes("");
	wire_method(b, 0, AMQP_CONNECTION_OPEN_METHOD, &o);
}

/* Header, start, start-ok, tune; returns after tune was checked. */
static void handshake_to_tune(struct fx *f, int caps)
{
	struct wire_buf b = {0};
	amqp_connection_tune_t *t;

	send_header_expect_start(f);
	put_start_ok(&b, caps, "PLAIN", plain("guest"));
	assert_int_equal(feed(f, &b), 0);
	t = expect_one_method(f, 0, AMQP_CONNECTION_TUNE_METHOD);
	assert_int_equal(t->channel_max, f->cfg.channel_max);
	assert_int_equal(t->frame_max, 131072);
	assert_int_equal(t->heartbeat, 60);
}

/* The whole handshake, tune-ok and open pipelined in one feed. */
static void handshake(struct fx *f, int caps, uint16_t hb)
{
	struct wire_buf b = {0};

	handshake_to_tune(f, caps);
	put_tune_ok(&b, f->cfg.channel_max, 131072, hb);
	put_open(&b, "/");
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 0, AMQP_CONNECTION_OPEN_OK_METHOD);
	assert_int_equal(count_events(f, GUEST_EVENT_OPENED), 1);
	assert_true(guest_session_is_open(f->s));
	assert_string_equal(guest_session_user(f->s), "guest");
}

static void open_channel(struct fx *f, uint16_t ch, bool confirm)
{
	struct wire_buf b = {0};
	amqp_channel_open_t o = {.out_of_band = amqp_cstring_bytes("")};

	wire_method(&b, ch, AMQP_CHANNEL_OPEN_METHOD, &o);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, ch, AMQP_CHANNEL_OPEN_OK_METHOD);
	if (confirm) {
		amqp_confirm_select_t c = {.nowait = 0};
		wire_method(&b, ch, AMQP_CONFIRM_SELECT_METHOD, &c);
		assert_int_equal(feed(f, &b), 0);
		expect_one_method(f, ch, AMQP_CONFIRM_SELECT_OK_METHOD);
	}
}

static void put_publish(struct wire_buf *b, uint16_t ch, const char *exch, const char *rk,
                        bool immediate)
{
	amqp_basic_publish_t p;

	memset(&p, 0, sizeof(p));
	p.exchange = amqp_cstring_bytes(exch);
	p.routing_key = amqp_cstring_bytes(rk);
	p.immediate = immediate;
	wire_method(b, ch, AMQP_BASIC_PUBLISH_METHOD, &p);
}

/* A complete publish in one feed. */
static int publish(struct fx *f, uint16_t ch, const char *exch, const char *rk, const char *body)
{
	struct wire_buf b = {0};
	size_t n = strlen(body);

	put_publish(&b, ch, exch, rk, false);
	wire_header(&b, ch, AMQP_BASIC_CLASS, n, NULL);
	if (n)
		wire_body(&b, ch, body, n);
	return feed(f, &b);
}

/* Drain and check the engine sent exactly a connection.close with CODE and
 * no channel.close; then the guest's close-ok finishes the session with a
 * CLOSED event carrying CODE. */
static void expect_conn_close(struct fx *f, uint16_t code)
{
	amqp_connection_close_t *c = NULL;
	struct wire_buf b = {0};
	amqp_connection_close_ok_t ok = {0};
	struct ev_rec *ev;

	drain(f);
	for (int i = 0; i < f->nfr; i++) {
		assert_false(f->fr[i].type == AMQP_FRAME_METHOD &&
		             f->fr[i].id == AMQP_CHANNEL_CLOSE_METHOD);
		if (f->fr[i].type == AMQP_FRAME_METHOD &&
		    f->fr[i].id == AMQP_CONNECTION_CLOSE_METHOD) {
			assert_null(c);
			assert_int_equal(f->fr[i].ch, 0);
			c = f->fr[i].decoded;
			assert_non_null(c);
		}
	}
	assert_non_null(c);
	assert_int_equal(c->reply_code, code);
	assert_false(guest_session_wants_read(f->s));
	assert_false(guest_session_is_open(f->s));
	wire_method(&b, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
	guest_session_feed(f->s, b.p, b.len, f->now);
	wire_buf_free(&b);
	ev = last_event(f, GUEST_EVENT_CLOSED);
	assert_non_null(ev);
	assert_int_equal(ev->reply_code, code);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	assert_true(guest_session_done(f->s));
}

/* Drain and check the engine sent exactly one channel.close on CH with
 * CODE and the connection stays open; the guest's close-ok frees the
 * channel. */
static void expect_chan_close(struct fx *f, uint16_t ch, uint16_t code)
{
	amqp_channel_close_t *c;
	struct wire_buf b = {0};
	amqp_channel_close_ok_t ok = {0};
	int closed_before = count_events(f, GUEST_EVENT_CHANNEL_CLOSED);

	c = expect_one_method(f, ch, AMQP_CHANNEL_CLOSE_METHOD);
	assert_int_equal(c->reply_code, code);
	assert_true(guest_session_is_open(f->s));
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 0);
	wire_method(&b, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(drain(f), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_CHANNEL_CLOSED), closed_before + 1);
	assert_int_equal(last_event(f, GUEST_EVENT_CHANNEL_CLOSED)->channel, ch);
}

/* ---- happy path --------------------------------------------------------- */

static void test_start_capabilities(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_connection_start_t *st;
	const amqp_field_value_t *caps;
	static const char *const need[] = {
	        "publisher_confirms",     "basic.nack",
	        "connection.blocked",     "authentication_failure_close",
	        "consumer_cancel_notify", "exchange_exchange_bindings",
	        "per_consumer_qos",
	};

	wire_protocol_header(&b);
	assert_int_equal(feed(f, &b), 0);
	st = expect_one_method(f, 0, AMQP_CONNECTION_START_METHOD);
	assert_int_equal(st->version_major, 0);
	assert_int_equal(st->version_minor, 9);
	assert_true(has_word(st->mechanisms, "PLAIN"));
	assert_true(has_word(st->mechanisms, "AMQPLAIN"));
	assert_true(has_word(st->mechanisms, "EXTERNAL"));
	assert_true(has_word(st->locales, "en_US"));
	caps = tget(&st->server_properties, "capabilities");
	assert_non_null(caps);
	assert_int_equal(caps->kind, AMQP_FIELD_KIND_TABLE);
	for (size_t i = 0; i < sizeof(need) / sizeof(need[0]); i++) {
		const amqp_field_value_t *v = tget(&caps->value.table, need[i]);
		assert_non_null(v);
		assert_int_equal(v->kind, AMQP_FIELD_KIND_BOOLEAN);
		assert_true(v->value.boolean);
	}
	caps = tget(&st->server_properties, "product");
	assert_non_null(caps);
	assert_int_equal(caps->value.bytes.len, strlen("vmproxy-test"));
	assert_false(guest_session_is_open(f->s));
	assert_true(guest_session_wants_read(f->s));
}

static void test_handshake_and_publish(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_basic_properties_t props;
	amqp_table_entry_t h;
	uint8_t expect_raw[512];
	int raw_len;

	handshake(f, 0, 60);
	assert_string_equal(f->auth_mech, "PLAIN");
	assert_string_equal(f->auth_user, "guest");
	open_channel(f, 1, true);

	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
	               AMQP_BASIC_HEADERS_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.delivery_mode = 2;
	h.key = amqp_cstring_bytes("seq");
	h.value.kind = AMQP_FIELD_KIND_I32;
	h.value.value.i32 = 7;
	props.headers.num_entries = 1;
	props.headers.entries = &h;
	raw_len = amqp_encode_properties(AMQP_BASIC_CLASS, &props,
	                                 (amqp_bytes_t){sizeof(expect_raw), expect_raw});
	assert_true(raw_len > 0);

	for (int i = 1; i <= 3; i++) {
		put_publish(&b, 1, "metrics", "vm.cpu", false);
		wire_header(&b, 1, AMQP_BASIC_CLASS, 11, &props);
		wire_body(&b, 1, "hello ", 6);
		wire_body(&b, 1, "world", 5);
		assert_int_equal(feed(f, &b), 0);
		assert_int_equal(drain(f), 0); /* nothing until settled */
		struct ev_rec *e = last_event(f, GUEST_EVENT_PUBLISH);
		assert_non_null(e);
		assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), i);
		assert_int_equal(e->channel, 1);
		assert_int_equal(e->tag, (uint64_t)i);
		assert_true(e->confirm);
		assert_false(e->mandatory);
		assert_string_equal(e->exchange, "metrics");
		assert_string_equal(e->rk, "vm.cpu");
		assert_string_equal(e->content_type, "application/json");
		assert_int_equal(e->delivery_mode, 2);
		assert_int_equal(e->body_len, 11);
		assert_memory_equal(e->body, "hello world", 11);
		assert_int_equal(e->raw_props_len, (size_t)raw_len);
		assert_memory_equal(e->raw_props, expect_raw, (size_t)raw_len);
	}
	/* Settle in order: one ack each, multiple=false. */
	for (int i = 1; i <= 3; i++) {
		struct ev_rec *e = &f->ev[f->nev - 4 + i];
		amqp_basic_ack_t *a;

		assert_int_equal(e->type, GUEST_EVENT_PUBLISH);
		assert_int_equal(guest_session_settle(f->s, 1, e->gen, e->tag, true), 0);
		a = expect_one_method(f, 1, AMQP_BASIC_ACK_METHOD);
		assert_int_equal(a->delivery_tag, (uint64_t)i);
		assert_false(a->multiple);
	}
	/* A settled tag is no longer known. */
	assert_int_equal(guest_session_settle(f->s, 1, f->ev[f->nev - 1].gen, 2, true), -ENOENT);
	assert_int_equal(guest_session_settle(f->s, 1, f->ev[f->nev - 1].gen, 99, true), -ENOENT);
}

static void test_no_confirm_publish(void **state)
{
	struct fx *f = *state;

	handshake(f, 0, 60);
	open_channel(f, 2, false);
	assert_int_equal(publish(f, 2, "metrics", "k", "x"), 0);
	assert_int_equal(publish(f, 2, "metrics", "", ""), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 2);
	assert_int_equal(f->ev[f->nev - 2].tag, 0);
	assert_false(f->ev[f->nev - 2].confirm);
	assert_int_equal(f->ev[f->nev - 1].body_len, 0);
	assert_string_equal(f->ev[f->nev - 1].rk, "");
	assert_int_equal(drain(f), 0);
}

/* Heartbeats may come between content frames, and contents on different
 * channels may interleave (RabbitMQ assembles per channel). */
static void test_interleaved_content(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, true);
	open_channel(f, 2, false);
	put_publish(&b, 1, "metrics", "one", false);
	put_publish(&b, 2, "metrics", "two", false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 4, NULL);
	wire_heartbeat(&b, 0);
	wire_header(&b, 2, AMQP_BASIC_CLASS, 2, NULL);
	wire_body(&b, 1, "ab", 2);
	wire_body(&b, 2, "xy", 2);
	wire_heartbeat(&b, 0);
	wire_body(&b, 1, "cd", 2);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(drain(f), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 2);
	assert_string_equal(f->ev[f->nev - 2].rk, "two");
	assert_memory_equal(f->ev[f->nev - 2].body, "xy", 2);
	assert_string_equal(f->ev[f->nev - 1].rk, "one");
	assert_memory_equal(f->ev[f->nev - 1].body, "abcd", 4);
	assert_int_equal(f->ev[f->nev - 1].tag, 1);
}

static void test_confirm_nowait(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_confirm_select_t c = {.nowait = 1};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_method(&b, 1, AMQP_CONFIRM_SELECT_METHOD, &c);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(drain(f), 0);
	assert_int_equal(publish(f, 1, "metrics", "k", "x"), 0);
	assert_true(last_event(f, GUEST_EVENT_PUBLISH)->confirm);
	assert_int_equal(last_event(f, GUEST_EVENT_PUBLISH)->tag, 1);
}

/* The whole session one byte at a time: partial frames are buffered. */
static void test_byte_at_a_time(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_open_t o = {.out_of_band = amqp_cstring_bytes("")};
	amqp_confirm_select_t c = {0};

	wire_protocol_header(&b);
	put_start_ok(&b, 0, "PLAIN", plain("bytewise"));
	put_tune_ok(&b, 8, 131072, 60);
	put_open(&b, "/");
	wire_method(&b, 5, AMQP_CHANNEL_OPEN_METHOD, &o);
	wire_method(&b, 5, AMQP_CONFIRM_SELECT_METHOD, &c);
	put_publish(&b, 5, "metrics", "rk", false);
	wire_header(&b, 5, AMQP_BASIC_CLASS, 3, NULL);
	wire_body(&b, 5, "abc", 3);
	for (size_t i = 0; i < b.len; i++)
		assert_int_equal(guest_session_feed(sess(f), b.p + i, 1, f->now), 0);
	wire_buf_free(&b);
	assert_int_equal(drain(f), 5); /* start tune open-ok channel.open-ok select-ok */
	assert_int_equal(f->fr[0].id, AMQP_CONNECTION_START_METHOD);
	assert_int_equal(f->fr[1].id, AMQP_CONNECTION_TUNE_METHOD);
	assert_int_equal(f->fr[2].id, AMQP_CONNECTION_OPEN_OK_METHOD);
	assert_int_equal(f->fr[3].id, AMQP_CHANNEL_OPEN_OK_METHOD);
	assert_int_equal(f->fr[4].id, AMQP_CONFIRM_SELECT_OK_METHOD);
	assert_int_equal(f->fr[4].ch, 5);
	assert_string_equal(guest_session_user(f->s), "bytewise");
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 1);
	assert_memory_equal(last_event(f, GUEST_EVENT_PUBLISH)->body, "abc", 3);
}

static void test_settle_out_of_order(void **state)
{
	struct fx *f = *state;
	uint32_t gen;
	amqp_basic_ack_t *a;
	amqp_basic_nack_t *n;

	handshake(f, 0, 60);
	open_channel(f, 1, true);
	for (int i = 0; i < 7; i++)
		assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	gen = last_event(f, GUEST_EVENT_PUBLISH)->gen;

	/* 3 settled first: nothing may go out, an ack of 3 with or without
	 * multiple would claim 1 and 2 or break the order. */
	assert_int_equal(guest_session_settle(f->s, 1, gen, 3, true), 0);
	assert_int_equal(drain(f), 0);
	assert_int_equal(guest_session_settle(f->s, 1, gen, 1, true), 0);
	a = expect_one_method(f, 1, AMQP_BASIC_ACK_METHOD);
	assert_int_equal(a->delivery_tag, 1);
	assert_false(a->multiple);
	assert_int_equal(guest_session_settle(f->s, 1, gen, 2, true), 0);
	drain(f);
	/* 2 and 3 are both settled now: one multiple ack of 3, or 2 then 3. */
	assert_true(f->nfr >= 1);
	a = f->fr[f->nfr - 1].decoded;
	assert_int_equal(f->fr[f->nfr - 1].id, AMQP_BASIC_ACK_METHOD);
	assert_int_equal(a->delivery_tag, 3);
	if (f->nfr == 1)
		assert_true(a->multiple);
	/* Double settle. */
	assert_int_equal(guest_session_settle(f->s, 1, gen, 3, true), -ENOENT);

	/* Mixed outcomes settled backwards: 6 nack, 7 ack, then 5, 4 ack. */
	assert_int_equal(guest_session_settle(f->s, 1, gen, 6, false), 0);
	assert_int_equal(guest_session_settle(f->s, 1, gen, 7, true), 0);
	assert_int_equal(guest_session_settle(f->s, 1, gen, 5, true), 0);
	assert_int_equal(drain(f), 0);
	assert_int_equal(guest_session_settle(f->s, 1, gen, 4, true), 0);
	drain(f);
	/* Expected: ack 5 multiple (4,5), nack 6 single, ack 7 single. */
	assert_int_equal(f->nfr, 3);
	assert_int_equal(f->fr[0].id, AMQP_BASIC_ACK_METHOD);
	a = f->fr[0].decoded;
	assert_int_equal(a->delivery_tag, 5);
	assert_true(a->multiple);
	assert_int_equal(f->fr[1].id, AMQP_BASIC_NACK_METHOD);
	n = f->fr[1].decoded;
	assert_int_equal(n->delivery_tag, 6);
	assert_false(n->multiple);
	assert_int_equal(f->fr[2].id, AMQP_BASIC_ACK_METHOD);
	a = f->fr[2].decoded;
	assert_int_equal(a->delivery_tag, 7);
	assert_false(a->multiple);
}

/* The settlements of one loop iteration (between two takes of the output)
 * go out as one "multiple" ack, on each channel, not one frame per tag. */
static void test_settle_batch_coalesced(void **state)
{
	struct fx *f = *state;
	uint32_t gen1, gen2;
	amqp_basic_ack_t *a;

	handshake(f, 0, 60);
	open_channel(f, 1, true);
	open_channel(f, 2, true);
	for (int i = 0; i < 50; i++)
		assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	gen1 = last_event(f, GUEST_EVENT_PUBLISH)->gen;
	for (int i = 0; i < 5; i++)
		assert_int_equal(publish(f, 2, "metrics", "k", "m"), 0);
	gen2 = last_event(f, GUEST_EVENT_PUBLISH)->gen;
	for (uint64_t t = 1; t <= 50; t++)
		assert_int_equal(guest_session_settle(f->s, 1, gen1, t, true), 0);
	for (uint64_t t = 1; t <= 5; t++)
		assert_int_equal(guest_session_settle(f->s, 2, gen2, t, true), 0);
	drain(f);
	assert_int_equal(f->nfr, 2);
	for (int i = 0; i < 2; i++) {
		assert_int_equal(f->fr[i].id, AMQP_BASIC_ACK_METHOD);
		a = f->fr[i].decoded;
		assert_true(a->multiple);
		assert_int_equal(a->delivery_tag, f->fr[i].ch == 1 ? 50 : 5);
	}
	assert_int_not_equal(f->fr[0].ch, f->fr[1].ch);
}

/* A returned publish goes back on its own channel: basic.return with the
 * guest's names, the content header with the properties as given, and the
 * body cut to the guest's frame_max; nothing for a channel since closed. */
static void test_return_to_guest(void **state)
{
	struct fx *f = *state;
	static char body[10000];
	uint8_t props[] = { 0x90, 0x00, 4, 't', 'e', 'x', 't', 2 };
	amqp_basic_return_t *r;
	uint32_t gen;

	struct wire_buf b = { 0 };

	memset(body, 'r', sizeof(body));
	handshake_to_tune(f, 0);
	put_tune_ok(&b, f->cfg.channel_max, 4096, 60); /* the guest's frames are small */
	put_open(&b, "/");
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 0, AMQP_CONNECTION_OPEN_OK_METHOD);
	open_channel(f, 1, true);
	assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	gen = last_event(f, GUEST_EVENT_PUBLISH)->gen;
	guest_session_return(f->s, 1, gen, 312, "NO_ROUTE", amqp_cstring_bytes("metrics"),
			     amqp_cstring_bytes("k"), (amqp_bytes_t){ sizeof(props), props },
			     (amqp_bytes_t){ sizeof(body), body });
	drain(f);
	assert_int_equal(f->nfr, 2 + 3); /* 10000 bytes in frames of at most 4088 */
	assert_int_equal(f->fr[0].id, AMQP_BASIC_RETURN_METHOD);
	r = f->fr[0].decoded;
	assert_int_equal(r->reply_code, 312);
	assert_memory_equal(r->exchange.bytes, "metrics", 7);
	assert_memory_equal(r->routing_key.bytes, "k", 1);
	assert_int_equal(f->fr[1].type, 2);
	assert_int_equal(f->fr[1].size, 12 + sizeof(props));
	assert_memory_equal(f->fr[1].payload + 12, props, sizeof(props));
	{
		size_t got = 0;
		for (int i = 2; i < f->nfr; i++) {
			assert_int_equal(f->fr[i].type, 3);
			assert_true(f->fr[i].size <= 4096 - 8);
			got += f->fr[i].size;
		}
		assert_int_equal(got, sizeof(body));
	}
	/* The channel closed and reopened: the old generation gets nothing. */
	guest_session_return(f->s, 1, gen + 100, 312, "NO_ROUTE", amqp_cstring_bytes("metrics"),
			     amqp_cstring_bytes("k"), (amqp_bytes_t){ sizeof(props), props },
			     (amqp_bytes_t){ 1, body });
	assert_int_equal(drain(f), 0);
}

static void test_nack(void **state)
{
	struct fx *f = *state;
	amqp_basic_nack_t *n;
	uint32_t gen;

	handshake(f, 0, 60);
	open_channel(f, 3, true);
	assert_int_equal(publish(f, 3, "metrics", "k", "m"), 0);
	assert_int_equal(publish(f, 3, "metrics", "k", "m"), 0);
	gen = last_event(f, GUEST_EVENT_PUBLISH)->gen;
	assert_int_equal(guest_session_settle(f->s, 3, gen, 2, false), 0);
	assert_int_equal(guest_session_settle(f->s, 3, gen, 1, false), 0);
	n = expect_one_method(f, 3, AMQP_BASIC_NACK_METHOD);
	assert_int_equal(n->delivery_tag, 2);
	assert_true(n->multiple);
	assert_false(n->requeue);
}

static void test_settle_closed_generation(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_close_t cl;
	uint32_t old_gen, new_gen;
	amqp_basic_ack_t *a;

	handshake(f, 0, 60);
	open_channel(f, 1, true);
	assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	old_gen = last_event(f, GUEST_EVENT_PUBLISH)->gen;
	memset(&cl, 0, sizeof(cl));
	cl.reply_code = 200;
	cl.reply_text = amqp_cstring_bytes("bye");
	wire_method(&b, 1, AMQP_CHANNEL_CLOSE_METHOD, &cl);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_CHANNEL_CLOSE_OK_METHOD);
	assert_int_equal(count_events(f, GUEST_EVENT_CHANNEL_CLOSED), 1);
	assert_int_equal(last_event(f, GUEST_EVENT_CHANNEL_CLOSED)->gen, old_gen);
	assert_int_equal(guest_session_settle(f->s, 1, old_gen, 1, true), 0);
	assert_int_equal(drain(f), 0);

	/* Same number again: a new generation, tags restart at 1. */
	open_channel(f, 1, true);
	assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	new_gen = last_event(f, GUEST_EVENT_PUBLISH)->gen;
	assert_int_not_equal(new_gen, old_gen);
	assert_int_equal(last_event(f, GUEST_EVENT_PUBLISH)->tag, 1);
	assert_int_equal(guest_session_settle(f->s, 1, old_gen, 1, true), 0);
	assert_int_equal(drain(f), 0);
	assert_int_equal(guest_session_settle(f->s, 1, new_gen, 1, true), 0);
	a = expect_one_method(f, 1, AMQP_BASIC_ACK_METHOD);
	assert_int_equal(a->delivery_tag, 1);
}

static void test_client_close(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_connection_close_t cl;

	handshake(f, 0, 60);
	memset(&cl, 0, sizeof(cl));
	cl.reply_code = 200;
	cl.reply_text = amqp_cstring_bytes("Normal shutdown");
	wire_method(&b, 0, AMQP_CONNECTION_CLOSE_METHOD, &cl);
	guest_session_feed(sess(f), b.p, b.len, f->now);
	wire_buf_free(&b);
	expect_one_method(f, 0, AMQP_CONNECTION_CLOSE_OK_METHOD);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	assert_int_equal(last_event(f, GUEST_EVENT_CLOSED)->reply_code, 200);
	assert_true(guest_session_done(f->s));
}

static void test_server_close(void **state)
{
	struct fx *f = *state;

	handshake(f, 0, 60);
	guest_session_close(f->s, 320, "CONNECTION_FORCED - VM stopped");
	expect_conn_close(f, 320);
}

static void test_amqplain_and_external(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_table_entry_t e[2];
	amqp_table_t t = {2, e};
	uint8_t enc[256];
	size_t off = 0;

	e[0].key = amqp_cstring_bytes("LOGIN");
	e[0].value.kind = AMQP_FIELD_KIND_UTF8;
	e[0].value.value.bytes = amqp_cstring_bytes("amqplain-user");
	e[1].key = amqp_cstring_bytes("PASSWORD");
	e[1].value.kind = AMQP_FIELD_KIND_UTF8;
	e[1].value.value.bytes = amqp_cstring_bytes("pw");
	assert_int_equal(amqp_encode_table((amqp_bytes_t){sizeof(enc), enc}, &t, &off), 0);
	send_header_expect_start(f);
	/* AMQPLAIN's response is the table without its length prefix. */
	put_start_ok(&b, 0, "AMQPLAIN", (amqp_bytes_t){off - 4, enc + 4});
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 0, AMQP_CONNECTION_TUNE_METHOD);
	assert_string_equal(f->auth_mech, "AMQPLAIN");
	assert_string_equal(f->auth_user, "amqplain-user");

	guest_session_free(f->s);
	f->s = NULL;
	send_header_expect_start(f);
	put_start_ok(&b, 0, "EXTERNAL", amqp_cstring_bytes(""));
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 0, AMQP_CONNECTION_TUNE_METHOD);
	assert_string_equal(f->auth_mech, "EXTERNAL");
	assert_string_equal(f->auth_user, "");
}

/* ---- authentication ------------------------------------------------------- */

static void test_auth_refused_403(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	f->refuse_user = "mallory";
	send_header_expect_start(f);
	put_start_ok(&b, CAP_AUTHCLOSE, "PLAIN", plain("mallory"));
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 403);
}

static void test_auth_refused_no_capability(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	f->refuse_user = "mallory";
	send_header_expect_start(f);
	put_start_ok(&b, 0, "PLAIN", plain("mallory"));
	assert_int_equal(feed(f, &b), -EPROTO);
	/* Such clients only see the socket close (RabbitMQ does the same). */
	for (int i = 0; i < drain(f); i++)
		assert_int_not_equal(f->fr[i].id, AMQP_CONNECTION_TUNE_METHOD);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	assert_int_equal(last_event(f, GUEST_EVENT_CLOSED)->reply_code, 403);
	assert_true(guest_session_done(f->s));
}

/* A table that does not parse (a long string running past the end): the
 * connection ends without tune and without decoding past the bytes sent.
 * RabbitMQ's parse_table fails there too; it drops the connection. */
static void test_amqplain_garbage(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	static const uint8_t junk[] = {5,   'L',  'O',  'G',  'I',  'N',
	                               'S', 0xff, 0xff, 0xff, 0xf0, 'x'};

	send_header_expect_start(f);
	put_start_ok(&b, CAP_AUTHCLOSE, "AMQPLAIN", (amqp_bytes_t){sizeof(junk), (void *)junk});
	assert_int_equal(feed(f, &b), -EPROTO);
	for (int i = 0; i < drain(f); i++)
		assert_int_not_equal(f->fr[i].id, AMQP_CONNECTION_TUNE_METHOD);
	assert_false(guest_session_wants_read(f->s));
	assert_false(guest_session_is_open(f->s));
}

/* A well-formed AMQPLAIN table without LOGIN: RabbitMQ's amqplain module
 * returns protocol_error, which rabbit_reader turns into 502 SYNTAX_ERROR. */
static void test_amqplain_without_login(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_table_entry_t e;
	amqp_table_t t = {1, &e};
	uint8_t enc[64];
	size_t off = 0;

	e.key = amqp_cstring_bytes("PASSWORD");
	e.value.kind = AMQP_FIELD_KIND_UTF8;
	e.value.value.bytes = amqp_cstring_bytes("pw");
	assert_int_equal(amqp_encode_table((amqp_bytes_t){sizeof(enc), enc}, &t, &off), 0);
	send_header_expect_start(f);
	put_start_ok(&b, CAP_AUTHCLOSE, "AMQPLAIN", (amqp_bytes_t){off - 4, enc + 4});
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 502);
}

/* PLAIN without the NUL separators: rabbit_auth_mechanism_plain answers
 * protocol_error "response ... invalid", i.e. 502 SYNTAX_ERROR. */
static void test_plain_without_nul(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	send_header_expect_start(f);
	put_start_ok(&b, CAP_AUTHCLOSE, "PLAIN", amqp_cstring_bytes("guestguest"));
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 502);
}

/* An unknown mechanism: 503 COMMAND_INVALID "unknown authentication
 * mechanism". */
static void test_unknown_mechanism(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	send_header_expect_start(f);
	put_start_ok(&b, CAP_AUTHCLOSE, "CRAM-MD5", amqp_cstring_bytes("x"));
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 503);
}

/* ---- hostile input: handshake ------------------------------------------- */

static void test_bad_protocol_header(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	const void *p;

	wire_raw(&b, "AMQP\0\0\x09\x02", 8); /* 0-9-2 */
	assert_int_equal(feed(f, &b), -EPROTO);
	assert_int_equal(guest_session_output(f->s, &p), 8);
	assert_memory_equal(p, "AMQP\0\0\x09\x01", 8);
	guest_session_output_consumed(f->s, 8, f->now);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	assert_true(guest_session_done(f->s));

	guest_session_free(f->s);
	f->s = NULL;
	wire_raw(&b, "GET / HTTP/1.1\r\n\r\n", 18);
	assert_int_equal(feed(f, &b), -EPROTO);
	assert_int_equal(guest_session_output(f->s, &p), 8);
	assert_memory_equal(p, "AMQP\0\0\x09\x01", 8);
}

static void test_frame_too_big_before_tune(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	static const uint8_t hdr[7] = {1, 0, 0, 0, 0, 0x13, 0x88}; /* 5000 > 4096 - 8 */

	send_header_expect_start(f);
	wire_raw(&b, hdr, sizeof(hdr));
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 501);
}

static void test_wrong_method_in_handshake(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	/* connection.open instead of tune-ok: RabbitMQ's handle_method0 answers
	 * "unexpected method in connection state tuning" with 504. */
	handshake_to_tune(f, 0);
	put_open(&b, "/");
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 504);
}

static void test_tune_ok_channel_max(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake_to_tune(f, 0);
	put_tune_ok(&b, 9, 131072, 60);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
}

static void test_tune_ok_frame_max_small(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake_to_tune(f, 0);
	put_tune_ok(&b, 8, 4095, 60);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
}

static void test_tune_ok_frame_max_big(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake_to_tune(f, 0);
	put_tune_ok(&b, 8, 131073, 60);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
}

/* rabbit_reader's validate_negotiated_integer_value: with a non-zero
 * server value, a client value of 0 ("no limit") is higher than the
 * maximum: 530. */
static void test_tune_ok_frame_max_zero(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake_to_tune(f, 0);
	put_tune_ok(&b, 8, 0, 60);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
}

static void test_tune_ok_channel_max_zero(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake_to_tune(f, 0);
	put_tune_ok(&b, 0, 131072, 60);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
}

static void test_vhost_refused(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	f->cfg.vhost = "vmproxy";
	handshake_to_tune(f, 0);
	put_tune_ok(&b, 8, 131072, 60);
	put_open(&b, "/");
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
	assert_int_equal(count_events(f, GUEST_EVENT_OPENED), 0);
}

static void test_vhost_accepted(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	f->cfg.vhost = "vmproxy";
	handshake_to_tune(f, 0);
	put_tune_ok(&b, 8, 131072, 60);
	put_open(&b, "vmproxy");
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 0, AMQP_CONNECTION_OPEN_OK_METHOD);
}

static void test_deep_client_properties(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0}, m = {0};
	size_t tl;
	uint8_t *t = wire_deep_table(10000, &tl);
	static const uint8_t id[4] = {0, 10, 0, 11};

	send_header_expect_start(f);
	wire_raw(&m, id, 4);
	wire_raw(&m, t, tl);
	wire_raw(&m, "\x05PLAIN", 6);
	wire_raw(&m, "\0\0\0\x0c\0guest\0guest", 16);
	wire_raw(&m,
	         "\x05"
	         "en_US",
	         6);
	free(t);
	/* Larger than 4096: send it in one frame anyway after a small one
	 * would not pass the pre-tune frame limit, so use 500 levels. */
	wire_buf_free(&m);
	t = wire_deep_table(500, &tl);
	wire_raw(&m, id, 4);
	wire_raw(&m, t, tl);
	wire_raw(&m, "\x05PLAIN", 6);
	wire_raw(&m, "\0\0\0\x0c\0guest\0guest", 16);
	wire_raw(&m,
	         "\x05"
	         "en_US",
	         6);
	free(t);
	assert_true(m.len < 4096 - 8);
	wire_frame(&b, AMQP_FRAME_METHOD, 0, m.p, m.len);
	wire_buf_free(&m);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 502);
}

/* ---- hostile input: framing ----------------------------------------------- */

static void test_bad_frame_end(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	wire_frame_end(&b, AMQP_FRAME_HEARTBEAT, 0, NULL, 0, 0x00);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 501);
}

static void test_oversize_frame(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	/* 131065 > frame_max 131072 - 8 bytes of framing. */
	static const uint8_t hdr[7] = {3, 0, 1, 0, 0x02, 0x00, 0x01 + 0xf8};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_raw(&b, hdr, sizeof(hdr));
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 501);
}

/* The limit is the negotiated frame_max (4096 here), framing included. */
static void test_negotiated_frame_max_boundary(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	static char body[4089];

	handshake_to_tune(f, 0);
	put_tune_ok(&b, 8, 4096, 60);
	put_open(&b, "/");
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 0, AMQP_CONNECTION_OPEN_OK_METHOD);
	open_channel(f, 1, false);
	memset(body, 'b', sizeof(body));
	put_publish(&b, 1, "metrics", "k", false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 4088, NULL);
	wire_body(&b, 1, body, 4088);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 1);
	put_publish(&b, 1, "metrics", "k", false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 4089, NULL);
	wire_body(&b, 1, body, 4089);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 501);
}

static void test_unknown_frame_type(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	wire_frame(&b, 9, 0, "x", 1);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 501);
}

static void test_heartbeat_on_channel(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_heartbeat(&b, 1);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 501);
}

static void test_method_before_channel_open(void **state)
{
	struct fx *f = *state;

	handshake(f, 0, 60);
	assert_int_equal(publish(f, 1, "metrics", "k", "x"), -EPROTO);
	expect_conn_close(f, 504);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
}

static void test_second_channel_open(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_open_t o = {.out_of_band = amqp_cstring_bytes("")};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_method(&b, 1, AMQP_CHANNEL_OPEN_METHOD, &o);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 504);
}

static void test_channel_above_max(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_open_t o = {.out_of_band = amqp_cstring_bytes("")};

	/* RabbitMQ: NOT_ALLOWED "... has reached the negotiated channel_max". */
	handshake(f, 0, 60);
	open_channel(f, 8, false);
	wire_method(&b, 9, AMQP_CHANNEL_OPEN_METHOD, &o);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
}

static void test_method_on_channel0(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_open_t o = {.out_of_band = amqp_cstring_bytes("")};

	/* channel.open on channel 0: "unexpected method in connection state
	 * running", 504 in RabbitMQ. */
	handshake(f, 0, 60);
	wire_method(&b, 0, AMQP_CHANNEL_OPEN_METHOD, &o);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 504);
}

static void test_header_without_publish(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 1, NULL);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 505);
}

static void test_body_without_header(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_publish(&b, 1, "metrics", "k", false);
	wire_body(&b, 1, "x", 1);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 505);
}

static void test_body_without_publish(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_body(&b, 1, "x", 1);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 505);
}

static void test_method_mid_content(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_basic_qos_t q = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_publish(&b, 1, "metrics", "k", false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 4, NULL);
	wire_body(&b, 1, "ab", 2);
	wire_method(&b, 1, AMQP_BASIC_QOS_METHOD, &q);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 505);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
}

static void test_body_longer_than_declared(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_publish(&b, 1, "metrics", "k", false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 5, NULL);
	wire_body(&b, 1, "abcdef", 6);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 501);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
}

static void test_header_wrong_class(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_publish(&b, 1, "metrics", "k", false);
	wire_header(&b, 1, 50, 1, NULL); /* queue class */
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 505);
}

static void test_truncated_method_args(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	/* basic.publish: reserved u16, then an exchange name longer than the frame. */
	static const uint8_t m[] = {0, 60, 0, 40, 0, 0, 20, 'm', 'e'};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_frame(&b, AMQP_FRAME_METHOD, 1, m, sizeof(m));
	assert_int_equal(feed(f, &b), -EPROTO);
	/* RabbitMQ's decode_method_fields falls back to rabbit_misc:frame_error:
	 * 501 FRAME_ERROR "cannot decode ...". */
	expect_conn_close(f, 501);
}

static void test_method_frame_too_short(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	wire_frame(&b, AMQP_FRAME_METHOD, 0, "\0\x0a", 2);
	assert_int_equal(feed(f, &b), -EPROTO);
	drain(f);
	assert_true(f->nfr >= 1);
	assert_int_equal(f->fr[f->nfr - 1].id, AMQP_CONNECTION_CLOSE_METHOD);
	assert_false(guest_session_wants_read(f->s));
}

static void test_unknown_method(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	static const uint8_t m[] = {0x12, 0x34, 0x00, 0x01};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_frame(&b, AMQP_FRAME_METHOD, 1, m, sizeof(m));
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 540);
}

static void test_deep_message_headers(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0}, h = {0};
	size_t tl;
	uint8_t *t = wire_deep_table(10000, &tl);
	uint8_t pre[14] = {0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0x00}; /* headers flag */

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_raw(&h, pre, sizeof(pre));
	wire_raw(&h, t, tl);
	free(t);
	assert_true(h.len < 131072 - 8);
	put_publish(&b, 1, "metrics", "k", false);
	wire_frame(&b, AMQP_FRAME_HEADER, 1, h.p, h.len);
	wire_buf_free(&h);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 502);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
}

static void test_headers_at_depth_limit(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0}, h = {0};
	size_t tl;
	uint8_t *t = wire_deep_table(8, &tl);
	uint8_t pre[14] = {0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0x00};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_raw(&h, pre, sizeof(pre));
	wire_raw(&h, t, tl);
	free(t);
	put_publish(&b, 1, "metrics", "k", false);
	wire_frame(&b, AMQP_FRAME_HEADER, 1, h.p, h.len);
	wire_body(&b, 1, "x", 1);
	wire_buf_free(&h);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 1);

	/* One level more is refused. */
	t = wire_deep_table(9, &tl);
	wire_raw(&h, pre, sizeof(pre));
	wire_raw(&h, t, tl);
	free(t);
	put_publish(&b, 1, "metrics", "k", false);
	wire_frame(&b, AMQP_FRAME_HEADER, 1, h.p, h.len);
	wire_buf_free(&h);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 502);
}

static void test_only_close_after_server_close(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_open_t o = {.out_of_band = amqp_cstring_bytes("")};
	amqp_connection_close_ok_t ok = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	guest_session_close(f->s, 320, "CONNECTION_FORCED - shutdown");
	drain(f);
	assert_int_equal(f->nfr, 1);
	assert_int_equal(f->fr[0].id, AMQP_CONNECTION_CLOSE_METHOD);
	/* Publishes, opens, garbage: all ignored, nothing answered. */
	put_publish(&b, 1, "metrics", "k", false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 1, NULL);
	wire_body(&b, 1, "x", 1);
	wire_method(&b, 2, AMQP_CHANNEL_OPEN_METHOD, &o);
	wire_heartbeat(&b, 0);
	assert_int_equal(feed(f, &b), -EPROTO);
	assert_int_equal(drain(f), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 0);
	wire_method(&b, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
	feed(f, &b);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	assert_int_equal(last_event(f, GUEST_EVENT_CLOSED)->reply_code, 320);
	assert_true(guest_session_done(f->s));
}

/* Both sides close at once: the guest's connection.close gets close-ok. */
static void test_close_crossing(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_connection_close_t cl;

	handshake(f, 0, 60);
	guest_session_close(f->s, 320, "CONNECTION_FORCED - shutdown");
	expect_one_method(f, 0, AMQP_CONNECTION_CLOSE_METHOD);
	memset(&cl, 0, sizeof(cl));
	cl.reply_code = 200;
	cl.reply_text = amqp_cstring_bytes("bye");
	wire_method(&b, 0, AMQP_CONNECTION_CLOSE_METHOD, &cl);
	feed(f, &b);
	expect_one_method(f, 0, AMQP_CONNECTION_CLOSE_OK_METHOD);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	assert_true(guest_session_done(f->s));
}

/* ---- channel-level errors ------------------------------------------------- */

static void test_declared_size_too_big(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_publish(&b, 1, "metrics", "k", false);
	wire_header(&b, 1, AMQP_BASIC_CLASS, 4097, NULL);
	assert_int_equal(feed(f, &b), 0);
	/* Refused on the header, before any body byte is buffered. */
	{
		amqp_channel_close_t *c = expect_one_method(f, 1, AMQP_CHANNEL_CLOSE_METHOD);
		assert_int_equal(c->reply_code, 406);
	}
	/* The body that follows is dropped by the closing channel. */
	{
		static uint8_t big[4097];
		amqp_channel_close_ok_t ok = {0};

		wire_body(&b, 1, big, sizeof(big));
		assert_int_equal(feed(f, &b), 0);
		assert_int_equal(drain(f), 0);
		wire_method(&b, 1, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		assert_int_equal(feed(f, &b), 0);
		assert_int_equal(drain(f), 0);
		assert_int_equal(count_events(f, GUEST_EVENT_CHANNEL_CLOSED), 1);
	}
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
	/* The channel can be opened again and works; 4096 is accepted. */
	open_channel(f, 1, false);
	{
		char *body = malloc(4097);
		memset(body, 'z', 4096);
		body[4096] = 0;
		assert_int_equal(publish(f, 1, "metrics", "k", body), 0);
		free(body);
	}
	assert_int_equal(last_event(f, GUEST_EVENT_PUBLISH)->body_len, 4096);
}

static void test_publish_forbidden_exchange(void **state)
{
	struct fx *f = *state;

	handshake(f, 0, 60);
	open_channel(f, 1, true);
	open_channel(f, 2, false);
	assert_int_equal(publish(f, 1, "amq.direct", "k", "x"), 0);
	expect_chan_close(f, 1, 403);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
	/* Other channels are untouched. */
	assert_int_equal(publish(f, 2, "metrics", "k", "x"), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 1);
	assert_int_equal(publish(f, 2, "", "k", "x"), 0);
	expect_chan_close(f, 2, 403);
}

static void put_exchange_declare(struct wire_buf *b, uint16_t ch, const char *name, bool passive)
{
	amqp_exchange_declare_t d;

	memset(&d, 0, sizeof(d));
	d.exchange = amqp_cstring_bytes(name);
	d.type = amqp_cstring_bytes("topic");
	d.passive = passive;
	d.durable = 1;
	wire_method(b, ch, AMQP_EXCHANGE_DECLARE_METHOD, &d);
}

static void test_exchange_declare(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_exchange_declare(&b, 1, "metrics", false);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_EXCHANGE_DECLARE_OK_METHOD);
	put_exchange_declare(&b, 1, "metrics", true);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_EXCHANGE_DECLARE_OK_METHOD);
	put_exchange_declare(&b, 1, "other", false);
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 1, 403);
}

static void check_refused_403(struct fx *f, amqp_method_number_t id, void *m)
{
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_method(&b, 1, id, m);
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 1, 403);
}

static void test_queue_declare_403(void **state)
{
	amqp_queue_declare_t q;

	memset(&q, 0, sizeof(q));
	q.queue = amqp_cstring_bytes("q");
	check_refused_403(*state, AMQP_QUEUE_DECLARE_METHOD, &q);
}

static void test_basic_consume_403(void **state)
{
	amqp_basic_consume_t c;

	memset(&c, 0, sizeof(c));
	c.queue = amqp_cstring_bytes("vm.metrics.all");
	c.consumer_tag = amqp_cstring_bytes("");
	check_refused_403(*state, AMQP_BASIC_CONSUME_METHOD, &c);
}

static void test_basic_get_403(void **state)
{
	amqp_basic_get_t g;

	memset(&g, 0, sizeof(g));
	g.queue = amqp_cstring_bytes("vm.metrics.all");
	check_refused_403(*state, AMQP_BASIC_GET_METHOD, &g);
}

static void test_tx_select_540(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_tx_select_t t = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_method(&b, 1, AMQP_TX_SELECT_METHOD, &t);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 540);
}

static void test_publish_immediate_540(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_publish(&b, 1, "metrics", "k", true);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 540);
}

/* ---- bounds and timers ---------------------------------------------------- */

static void test_handshake_timeout(void **state)
{
	struct fx *f = *state;
	uint64_t t0 = f->now, next;

	send_header_expect_start(f);
	next = guest_session_tick(f->s, t0 + 9999);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 0);
	assert_true(next <= t0 + 10000);
	guest_session_tick(f->s, t0 + 10000);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	drain(f);
	assert_true(guest_session_done(f->s));
	assert_false(guest_session_wants_read(f->s));
}

static void test_heartbeats(void **state)
{
	struct fx *f = *state;
	uint64_t t0, next;
	struct wire_buf b = {0};
	int hb_seen = 0;

	handshake(f, 0, 60);
	t0 = f->now;
	next = guest_session_tick(f->s, t0 + 29999);
	assert_true(next > t0 + 29999 && next <= t0 + 30000);
	assert_int_equal(drain(f), 0);
	f->now = t0 + 30000;
	guest_session_tick(f->s, f->now);
	assert_int_equal(drain(f), 1);
	assert_int_equal(f->fr[0].type, AMQP_FRAME_HEARTBEAT);
	assert_int_equal(f->fr[0].ch, 0);
	/* The guest sends one partial frame byte at t0 + 100 s: the receive
	 * timer restarts there, heartbeats we sent do not count. */
	for (uint64_t t = t0 + 30000; t < t0 + 100000 + 120000; t += 5000) {
		if (t == t0 + 100000) {
			wire_raw(&b, "\x08", 1);
			f->now = t;
			assert_int_equal(feed(f, &b), 0);
		}
		f->now = t;
		guest_session_tick(f->s, t);
		drain(f);
		for (int i = 0; i < f->nfr; i++)
			assert_int_equal(f->fr[i].type, AMQP_FRAME_HEARTBEAT);
		hb_seen += f->nfr;
		assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 0);
	}
	/* One heartbeat every 30 s of our silence: about 6 in 190 s. */
	assert_true(hb_seen >= 5 && hb_seen <= 8);
	guest_session_tick(f->s, t0 + 100000 + 119999);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 0);
	guest_session_tick(f->s, t0 + 100000 + 120000);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	drain(f);
	assert_true(guest_session_done(f->s));
}

static void test_heartbeat_timeout_without_bytes(void **state)
{
	struct fx *f = *state;
	uint64_t t0;

	handshake(f, 0, 10);
	t0 = f->now;
	guest_session_tick(f->s, t0 + 19999);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 0);
	guest_session_tick(f->s, t0 + 20000);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
}

static void test_heartbeat_disabled(void **state)
{
	struct fx *f = *state;

	handshake(f, 0, 0);
	assert_int_equal(guest_session_tick(f->s, f->now + 3600000), UINT64_MAX);
	assert_int_equal(drain(f), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 0);
}

static void test_output_bound(void **state)
{
	struct fx *f = *state;
	bool saw_backoff = false;
	int i;

	f->cfg.max_output_bytes = 2048;
	handshake(f, 0, 60);
	open_channel(f, 1, true);
	/* The guest stops reading: acks pile up until the session drops. */
	for (i = 0; i < 1000 && count_events(f, GUEST_EVENT_CLOSED) == 0; i++) {
		const void *p;
		struct ev_rec *e;

		publish(f, 1, "metrics", "k", "m");
		e = last_event(f, GUEST_EVENT_PUBLISH);
		guest_session_settle(f->s, 1, e->gen, e->tag, true);
		guest_session_output(f->s, &p); /* the ack is queued when output is taken */
		if (!guest_session_wants_read(f->s) && count_events(f, GUEST_EVENT_CLOSED) == 0) {
			assert_true(guest_session_output(f->s, &p) > 1024);
			saw_backoff = true;
		}
		assert_true(guest_session_output(f->s, &p) <= 2048);
	}
	assert_true(saw_backoff);
	assert_int_equal(count_events(f, GUEST_EVENT_CLOSED), 1);
	assert_true(i < 200);
	assert_true(guest_session_done(f->s));
}

static void test_max_unconfirmed(void **state)
{
	struct fx *f = *state;
	struct ev_rec *e;

	f->cfg.max_unconfirmed = 3;
	handshake(f, 0, 60);
	open_channel(f, 1, true);
	assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	assert_true(guest_session_wants_read(f->s));
	assert_int_equal(publish(f, 1, "metrics", "k", "m"), 0);
	assert_false(guest_session_wants_read(f->s));
	e = last_event(f, GUEST_EVENT_PUBLISH);
	assert_int_equal(guest_session_settle(f->s, 1, e->gen, 1, true), 0);
	/* The window opens once the ack is taken with the output. */
	assert_false(guest_session_wants_read(f->s));
	expect_one_method(f, 1, AMQP_BASIC_ACK_METHOD);
	assert_true(guest_session_wants_read(f->s));
	/* A channel without confirms is not bounded this way. */
	open_channel(f, 2, false);
	for (int i = 0; i < 10; i++)
		assert_int_equal(publish(f, 2, "metrics", "k", "m"), 0);
	assert_true(guest_session_wants_read(f->s));
}

/* Input already read may run past max_unconfirmed by 65536 publishes (the
 * guest_session.h contract); one more closes the channel, not the
 * connection, with 406. */
static void test_unconfirmed_past_slack(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	uint32_t accepted = 0;
	bool closed = false;

	f->cfg.max_unconfirmed = 2;
	handshake(f, 0, 60);
	open_channel(f, 1, true);
	while (!closed && accepted < 2 + 65536 + 10) {
		for (int i = 0; i < 100; i++) {
			put_publish(&b, 1, "metrics", "k", false);
			wire_header(&b, 1, AMQP_BASIC_CLASS, 0, NULL);
		}
		assert_int_equal(feed(f, &b), 0);
		accepted += (uint32_t)count_events(f, GUEST_EVENT_PUBLISH);
		f->nev = 0; /* empty bodies: nothing to free */
		drain(f);
		for (int i = 0; i < f->nfr; i++)
			if (f->fr[i].type == AMQP_FRAME_METHOD && f->fr[i].ch == 1 &&
			    f->fr[i].id == AMQP_CHANNEL_CLOSE_METHOD) {
				assert_int_equal(((amqp_channel_close_t *)f->fr[i].decoded)->reply_code,
						 406);
				closed = true;
			}
	}
	assert_true(closed);
	assert_int_equal(accepted, 2 + 65536);
	assert_true(guest_session_is_open(f->s));
}

/* channel.flow: active=true is answered; active=false is 540 and closes the
 * connection, as RabbitMQ does (a client cannot stop the server). */
static void test_channel_flow(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_flow_t fl = { .active = 1 };
	amqp_channel_flow_ok_t *ok;

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_method(&b, 1, AMQP_CHANNEL_FLOW_METHOD, &fl);
	assert_int_equal(feed(f, &b), 0);
	ok = expect_one_method(f, 1, AMQP_CHANNEL_FLOW_OK_METHOD);
	assert_int_equal(ok->active, 1);
	fl.active = 0;
	wire_method(&b, 1, AMQP_CHANNEL_FLOW_METHOD, &fl);
	(void)feed(f, &b);
	expect_conn_close(f, 540);
}

/* basic.qos: prefetch_count is accepted (the proxy never delivers);
 * prefetch_size other than 0 is 540 on the connection, as in RabbitMQ. */
static void test_qos_prefetch_size(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_basic_qos_t q = { .prefetch_count = 10 };

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	wire_method(&b, 1, AMQP_BASIC_QOS_METHOD, &q);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_BASIC_QOS_OK_METHOD);
	q.prefetch_size = 4096;
	wire_method(&b, 1, AMQP_BASIC_QOS_METHOD, &q);
	(void)feed(f, &b);
	expect_conn_close(f, 540);
}

/* A content header whose property flags set the continuation bit: basic
 * has no second flag word, so it is malformed (502), never decoded. */
static void test_property_flags_continuation(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	static const uint8_t hdr[] = {
		0, 60, 0, 0,		/* class basic, weight */
		0, 0, 0, 0, 0, 0, 0, 0, /* body size 0 */
		0x00, 0x01,		/* flags: only the continuation bit */
		0x20, 0x00,		/* a second word: "headers" */
		0, 0, 0, 0,		/* an empty table */
	};

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_publish(&b, 1, "metrics", "k", false);
	wire_frame(&b, AMQP_FRAME_HEADER, 1, hdr, sizeof(hdr));
	(void)feed(f, &b);
	expect_conn_close(f, 502);
	assert_int_equal(count_events(f, GUEST_EVENT_PUBLISH), 0);
}

static void test_blocked(void **state)
{
	struct fx *f = *state;
	amqp_connection_blocked_t *bl;

	handshake(f, CAP_BLOCKED, 60);
	guest_session_set_blocked(f->s, true, "low on memory");
	bl = expect_one_method(f, 0, AMQP_CONNECTION_BLOCKED_METHOD);
	assert_int_equal(bl->reason.len, strlen("low on memory"));
	guest_session_set_blocked(f->s, true, "low on memory");
	assert_int_equal(drain(f), 0);
	guest_session_set_blocked(f->s, false, NULL);
	expect_one_method(f, 0, AMQP_CONNECTION_UNBLOCKED_METHOD);
	guest_session_set_blocked(f->s, false, NULL);
	assert_int_equal(drain(f), 0);
}

static void test_blocked_not_advertised(void **state)
{
	struct fx *f = *state;

	handshake(f, CAP_AUTHCLOSE, 60);
	guest_session_set_blocked(f->s, true, "low on memory");
	assert_int_equal(drain(f), 0);
	guest_session_set_blocked(f->s, false, NULL);
	assert_int_equal(drain(f), 0);
}


/* ---- the inbox ------------------------------------------------------------ */

static void inbox_session(struct fx *f, int caps)
{
	f->cfg.inbox_name = "inbox";
	f->cfg.max_consumers = 2;
	f->cfg.max_unacked = 3;
	handshake(f, caps, 60);
}

static void put_declare(struct wire_buf *b, uint16_t ch, const char *q, bool passive)
{
	amqp_queue_declare_t m;

	memset(&m, 0, sizeof(m));
	m.queue = amqp_cstring_bytes(q);
	m.passive = passive;
	wire_method(b, ch, AMQP_QUEUE_DECLARE_METHOD, &m);
}

static void put_consume(struct wire_buf *b, uint16_t ch, const char *q, const char *tag)
{
	amqp_basic_consume_t m;

	memset(&m, 0, sizeof(m));
	m.queue = amqp_cstring_bytes(q);
	m.consumer_tag = amqp_cstring_bytes(tag);
	wire_method(b, ch, AMQP_BASIC_CONSUME_METHOD, &m);
}

static void put_settle(struct wire_buf *b, uint16_t ch, amqp_method_number_t id, uint64_t tag,
                       bool multiple, bool requeue)
{
	if (id == AMQP_BASIC_ACK_METHOD) {
		amqp_basic_ack_t m = {.delivery_tag = tag, .multiple = multiple};
		wire_method(b, ch, id, &m);
	} else if (id == AMQP_BASIC_NACK_METHOD) {
		amqp_basic_nack_t m = {.delivery_tag = tag, .multiple = multiple, .requeue = requeue};
		wire_method(b, ch, id, &m);
	} else {
		amqp_basic_reject_t m = {.delivery_tag = tag, .requeue = requeue};
		wire_method(b, ch, id, &m);
	}
}

/* basic.consume of the inbox on CH, answered; returns the consumer id. */
static uint32_t consume(struct fx *f, uint16_t ch, const char *tag)
{
	struct wire_buf b = {0};
	struct ev_rec *ev;
	amqp_basic_consume_ok_t *ok;
	int before = count_events(f, GUEST_EVENT_CONSUME);

	put_consume(&b, ch, "inbox", tag);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(drain(f), 0); /* nothing until the broker answered */
	assert_int_equal(count_events(f, GUEST_EVENT_CONSUME), before + 1);
	ev = last_event(f, GUEST_EVENT_CONSUME);
	assert_int_equal(ev->channel, ch);
	guest_session_consume_ok(f->s, ch, ev->gen, ev->consumer_id);
	ok = expect_one_method(f, ch, AMQP_BASIC_CONSUME_OK_METHOD);
	if (tag[0])
		assert_memory_equal(ok->consumer_tag.bytes, tag, strlen(tag));
	else
		assert_true(ok->consumer_tag.len > 0);
	return ev->consumer_id;
}

static int64_t deliver(struct fx *f, uint16_t ch, uint32_t cid, uint64_t up_tag, const char *body)
{
	struct ev_rec *ev = last_event(f, GUEST_EVENT_CONSUME);

	return guest_session_deliver(f->s, ch, ev->gen, cid, false, amqp_cstring_bytes("vm.control"),
	                             amqp_cstring_bytes("cmd"), amqp_empty_bytes,
	                             amqp_cstring_bytes(body), up_tag, 1);
}

/* queue.declare of the inbox, passive or not, waits for the broker's
 * count and answers with the virtual name; any other name is 403. */
static void test_inbox_declare(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_queue_declare_ok_t *ok;
	struct ev_rec *ev;

	inbox_session(f, 0);
	open_channel(f, 1, false);
	put_declare(&b, 1, "inbox", true);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(drain(f), 0);
	ev = last_event(f, GUEST_EVENT_DECLARE);
	assert_non_null(ev);
	assert_true(ev->passive);
	guest_session_declare_ok(f->s, 1, ev->gen, 3, 1);
	ok = expect_one_method(f, 1, AMQP_QUEUE_DECLARE_OK_METHOD);
	assert_int_equal(ok->message_count, 3);
	assert_int_equal(ok->consumer_count, 1);
	assert_memory_equal(ok->queue.bytes, "inbox", 5);
	/* Answers for a generation or request that is gone are dropped. */
	guest_session_declare_ok(f->s, 1, ev->gen, 3, 1);
	assert_int_equal(drain(f), 0);
	put_declare(&b, 1, "vm.0b8e3a9c-0000-0000-0000-000000000000.inbox", false);
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 1, 403);
	open_channel(f, 2, false);
	put_declare(&b, 2, "", false); /* server-named */
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 2, 403);
	assert_int_equal(count_events(f, GUEST_EVENT_DECLARE), 1);
}

/* One inbox request per channel at a time: a pipelined second one is 503. */
static void test_inbox_pipelined_request(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};

	inbox_session(f, 0);
	open_channel(f, 1, false);
	put_declare(&b, 1, "inbox", false);
	put_consume(&b, 1, "inbox", "");
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 503);
}

/* Deliveries are tagged 1, 2, 3 per channel with the consumer's tag; acks
 * (single and multiple) come back as one SETTLE per delivery with the
 * owner's tags, in order; a tag settled twice, or never delivered, is 406. */
static void test_inbox_deliver_and_ack(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	uint32_t cid;
	amqp_basic_deliver_t *d;
	int settles;

	inbox_session(f, 0);
	open_channel(f, 1, false);
	cid = consume(f, 1, "mine");
	assert_int_equal(deliver(f, 1, cid, 100, "a"), 1);
	assert_int_equal(deliver(f, 1, cid, 101, "bb"), 2);
	assert_int_equal(deliver(f, 1, cid, 102, "ccc"), 3);
	assert_int_equal(deliver(f, 1, cid, 103, "over"), -ENOSPC); /* max_unacked 3 */
	assert_int_equal(guest_session_unacked(f->s), 3);
	assert_int_equal(drain(f), 9);
	d = f->fr[3].decoded;
	assert_int_equal(f->fr[3].id, AMQP_BASIC_DELIVER_METHOD);
	assert_int_equal(d->delivery_tag, 2);
	assert_memory_equal(d->consumer_tag.bytes, "mine", 4);
	assert_memory_equal(d->routing_key.bytes, "cmd", 3);
	assert_int_equal(f->fr[4].type, AMQP_FRAME_HEADER);
	assert_int_equal(f->fr[5].size, 2);
	settles = count_events(f, GUEST_EVENT_SETTLE);
	put_settle(&b, 1, AMQP_BASIC_ACK_METHOD, 2, false, false);
	put_settle(&b, 1, AMQP_BASIC_ACK_METHOD, 3, true, false);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(count_events(f, GUEST_EVENT_SETTLE), settles + 3);
	assert_int_equal(f->ev[f->nev - 3].settle.up_tag, 101);
	assert_int_equal(f->ev[f->nev - 2].settle.up_tag, 100);
	assert_int_equal(f->ev[f->nev - 1].settle.up_tag, 102);
	assert_int_equal(f->ev[f->nev - 1].settle.kind, GUEST_SETTLE_ACK);
	assert_int_equal(f->ev[f->nev - 1].settle.up_gen, 1);
	assert_int_equal(guest_session_unacked(f->s), 0);
	assert_int_equal(drain(f), 0); /* acks have no reply */
	put_settle(&b, 1, AMQP_BASIC_ACK_METHOD, 3, false, false);
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 1, 406);
}

/* nack (multiple with tag 0: all) and reject carry requeue; another
 * channel's tag is unknown on this one (406), and stays the other's. */
static void test_inbox_nack_reject_foreign_channel(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	uint32_t cid;
	struct ev_rec *e;

	inbox_session(f, 0);
	open_channel(f, 1, false);
	open_channel(f, 2, false);
	cid = consume(f, 1, "");
	assert_int_equal(deliver(f, 1, cid, 7, "x"), 1);
	assert_int_equal(deliver(f, 1, cid, 8, "y"), 2);
	assert_int_equal(deliver(f, 1, cid, 9, "z"), 3);
	drain(f);
	put_settle(&b, 2, AMQP_BASIC_ACK_METHOD, 1, false, false);
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 2, 406);
	assert_int_equal(guest_session_unacked(f->s), 3);
	put_settle(&b, 1, AMQP_BASIC_REJECT_METHOD, 2, false, false);
	assert_int_equal(feed(f, &b), 0);
	e = last_event(f, GUEST_EVENT_SETTLE);
	assert_int_equal(e->settle.kind, GUEST_SETTLE_REJECT);
	assert_false(e->settle.requeue);
	assert_int_equal(e->settle.up_tag, 8);
	put_settle(&b, 1, AMQP_BASIC_NACK_METHOD, 0, true, true);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(guest_session_unacked(f->s), 0);
	e = last_event(f, GUEST_EVENT_SETTLE);
	assert_int_equal(e->settle.kind, GUEST_SETTLE_NACK);
	assert_true(e->settle.requeue);
	assert_int_equal(e->settle.up_tag, 9);
	assert_int_equal(drain(f), 0);
}

/* basic.cancel answers cancel-ok and reports CANCEL; later deliveries for
 * it are refused; unsettled ones stay ackable. A channel that closes hands
 * back its deliveries (RELEASE, requeue) and consumers before it is
 * reported closed. */
static void test_inbox_cancel_and_release(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_basic_cancel_t c = {.consumer_tag = amqp_cstring_bytes("k1")};
	amqp_channel_close_t cl = {.reply_code = 200, .reply_text = amqp_cstring_bytes("bye")};
	uint32_t cid, cid2;
	int i;

	inbox_session(f, 0);
	open_channel(f, 1, false);
	cid = consume(f, 1, "k1");
	cid2 = consume(f, 1, "k2");
	assert_int_equal(deliver(f, 1, cid, 50, "x"), 1);
	drain(f);
	wire_method(&b, 1, AMQP_BASIC_CANCEL_METHOD, &c);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_BASIC_CANCEL_OK_METHOD);
	assert_int_equal(last_event(f, GUEST_EVENT_CANCEL)->consumer_id, cid);
	assert_int_equal(deliver(f, 1, cid, 51, "y"), -ENOENT);
	assert_int_equal(deliver(f, 1, cid2, 52, "z"), 2);
	drain(f);
	/* A third consumer is over max_consumers (2)... after the cancel, not. */
	assert_int_equal(consume(f, 1, "k3") > 0, 1);
	wire_method(&b, 1, AMQP_CHANNEL_CLOSE_METHOD, &cl);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_CHANNEL_CLOSE_OK_METHOD);
	for (i = f->nev - 1; i >= 0 && f->ev[i].type != GUEST_EVENT_CHANNEL_CLOSED; i--)
		;
	assert_true(i >= 4);
	assert_int_equal(f->ev[i - 1].type, GUEST_EVENT_CANCEL);
	assert_int_equal(f->ev[i - 2].type, GUEST_EVENT_CANCEL);
	assert_int_equal(f->ev[i - 3].type, GUEST_EVENT_SETTLE);
	assert_int_equal(f->ev[i - 3].settle.kind, GUEST_SETTLE_RELEASE);
	assert_int_equal(f->ev[i - 4].settle.up_tag, 50);
	assert_true(f->ev[i - 4].settle.requeue);
	assert_int_equal(guest_session_unacked(f->s), 0);
}

/* Bounds and refusals: consumers per connection (406), a reused tag
 * (530), a consume of another queue (403), an inbox that is not
 * configured (403 as for every queue), a deep arguments table (502). */
static void test_inbox_bounds(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	size_t dlen;
	uint8_t *deep = wire_deep_table(f->cfg.max_table_depth + 2, &dlen);

	inbox_session(f, 0);
	open_channel(f, 1, false);
	consume(f, 1, "a");
	consume(f, 1, "b");
	put_consume(&b, 1, "inbox", "c");
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 1, 406);
	open_channel(f, 2, false);
	put_consume(&b, 2, "metrics.all", "");
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 2, 403);
	open_channel(f, 3, false);
	consume(f, 3, "d");
	put_consume(&b, 3, "inbox", "d");
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 530);
	guest_session_free(f->s);
	f->s = NULL;

	/* consume: reserved u16, queue, tag, bits, arguments */
	f->nev = 0;
	handshake(f, 0, 60);
	open_channel(f, 1, false);
	{
		uint8_t args[4096];
		size_t n = 0;
		args[0] = args[1] = 0;
		n = 2;
		args[n++] = 5;
		memcpy(args + n, "inbox", 5);
		n += 5;
		args[n++] = 0;
		args[n++] = 0;
		assert_true(n + dlen <= sizeof(args) - 4);
		memcpy(args + n, deep, dlen);
		n += dlen;
		uint8_t pl[4096 + 4];
		pl[0] = 0;
		pl[1] = 60; /* basic */
		pl[2] = 0;
		pl[3] = 20; /* consume */
		memcpy(pl + 4, args, n);
		wire_frame(&b, AMQP_FRAME_METHOD, 1, pl, n + 4);
	}
	free(deep);
	assert_int_equal(feed(f, &b), -EPROTO);
	expect_conn_close(f, 502);
}

/* basic.get waits for the owner; get-ok takes the channel's next tag and
 * is settled like a delivery (none for no_ack); get-empty; past
 * max_unacked a get is 406. basic.recover releases the unsettled ones. */
static void test_inbox_get_and_recover(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_basic_get_t g = {.queue = amqp_cstring_bytes("inbox")};
	amqp_basic_recover_t rec = {.requeue = 1};
	amqp_basic_get_ok_t *ok;
	struct ev_rec *ev;
	int before;

	inbox_session(f, 0);
	open_channel(f, 1, false);
	for (int i = 0; i < 3; i++) {
		g.no_ack = i == 1;
		wire_method(&b, 1, AMQP_BASIC_GET_METHOD, &g);
		assert_int_equal(feed(f, &b), 0);
		assert_int_equal(drain(f), 0);
		ev = last_event(f, GUEST_EVENT_GET);
		assert_int_equal(ev->no_ack, i == 1);
		assert_int_equal(guest_session_get_ok(f->s, 1, ev->gen, false,
		                                      amqp_cstring_bytes("vm.control"),
		                                      amqp_cstring_bytes("cmd"), (uint32_t)(2 - i),
		                                      amqp_empty_bytes, amqp_cstring_bytes("m"),
		                                      (uint64_t)(70 + i), 1),
		                 i + 1);
		assert_int_equal(drain(f), 3);
		ok = f->fr[0].decoded;
		assert_int_equal(f->fr[0].id, AMQP_BASIC_GET_OK_METHOD);
		assert_int_equal(ok->delivery_tag, (uint64_t)(i + 1));
		assert_int_equal(ok->message_count, (uint32_t)(2 - i));
	}
	assert_int_equal(guest_session_unacked(f->s), 2);
	wire_method(&b, 1, AMQP_BASIC_GET_METHOD, &g);
	assert_int_equal(feed(f, &b), 0);
	guest_session_get_empty(f->s, 1, last_event(f, GUEST_EVENT_GET)->gen);
	expect_one_method(f, 1, AMQP_BASIC_GET_EMPTY_METHOD);
	before = count_events(f, GUEST_EVENT_SETTLE);
	wire_method(&b, 1, AMQP_BASIC_RECOVER_METHOD, &rec);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_BASIC_RECOVER_OK_METHOD);
	assert_int_equal(count_events(f, GUEST_EVENT_SETTLE), before + 2);
	ev = last_event(f, GUEST_EVENT_SETTLE);
	assert_int_equal(ev->settle.kind, GUEST_SETTLE_RELEASE);
	assert_int_equal(ev->settle.up_tag, 72);
	assert_int_equal(guest_session_unacked(f->s), 0);
	/* max_unacked (3) unsettled gets: the next get is refused. */
	g.no_ack = 0;
	for (int i = 0; i < 3; i++) {
		wire_method(&b, 1, AMQP_BASIC_GET_METHOD, &g);
		assert_int_equal(feed(f, &b), 0);
		ev = last_event(f, GUEST_EVENT_GET);
		assert_true(guest_session_get_ok(f->s, 1, ev->gen, false, amqp_empty_bytes,
		                                 amqp_empty_bytes, 0, amqp_empty_bytes,
		                                 amqp_empty_bytes, 1, 1) > 0);
		drain(f);
	}
	wire_method(&b, 1, AMQP_BASIC_GET_METHOD, &g);
	assert_int_equal(feed(f, &b), 0);
	expect_chan_close(f, 1, 406);
}

struct seen {
	int n;
	uint64_t tags[8];
	uint32_t cid;
	uint16_t prefetch;
};

static void saw_delivery(void *ud, uint64_t up_tag, uint32_t up_gen)
{
	struct seen *s = ud;

	assert_int_equal(up_gen, 1);
	s->tags[s->n++] = up_tag;
}

static void saw_consumer(void *ud, uint16_t ch, uint32_t gen, uint32_t cid, uint16_t prefetch,
                         bool no_ack)
{
	struct seen *s = ud;

	assert_int_equal(ch, 1);
	assert_false(no_ack);
	s->cid = cid;
	s->prefetch = prefetch;
	s->n++;
}

/* What a move to another thread needs: the unsettled deliveries once (then
 * detached: their settles carry generation 0), and the consumers with the
 * prefetch they were created with. */
static void test_inbox_detach_and_consumers(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_basic_qos_t q = {.prefetch_count = 7};
	struct seen s = {0};
	uint32_t cid;

	inbox_session(f, 0);
	open_channel(f, 1, false);
	wire_method(&b, 1, AMQP_BASIC_QOS_METHOD, &q);
	assert_int_equal(feed(f, &b), 0);
	expect_one_method(f, 1, AMQP_BASIC_QOS_OK_METHOD);
	cid = consume(f, 1, "k");
	assert_int_equal(last_event(f, GUEST_EVENT_CONSUME)->prefetch, 7);
	assert_int_equal(deliver(f, 1, cid, 30, "a"), 1);
	assert_int_equal(deliver(f, 1, cid, 31, "b"), 2);
	drain(f);
	guest_session_detach_deliveries(f->s, saw_delivery, &s);
	assert_int_equal(s.n, 2);
	assert_int_equal(s.tags[1], 31);
	s.n = 0;
	guest_session_detach_deliveries(f->s, saw_delivery, &s);
	assert_int_equal(s.n, 0); /* once */
	put_settle(&b, 1, AMQP_BASIC_ACK_METHOD, 2, true, false);
	assert_int_equal(feed(f, &b), 0);
	assert_int_equal(last_event(f, GUEST_EVENT_SETTLE)->settle.up_gen, 0);
	assert_int_equal(drain(f), 0); /* accepted: no 406 */
	guest_session_foreach_consumer(f->s, saw_consumer, &s);
	assert_int_equal(s.n, 1);
	assert_int_equal(s.cid, cid);
	assert_int_equal(s.prefetch, 7);
}

static void test_inbox_not_configured(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_channel_close_t *c;

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	put_declare(&b, 1, "inbox", false);
	assert_int_equal(feed(f, &b), 0);
	c = expect_one_method(f, 1, AMQP_CHANNEL_CLOSE_METHOD);
	assert_int_equal(c->reply_code, 403);
	assert_non_null(strstr((const char *)c->reply_text.bytes, "guests may only publish"));
}

/* The server cancels a consumer: basic.cancel to a client that advertised
 * consumer_cancel_notify, a 506 channel close to one that did not; a
 * failed request closes its channel with the broker's code, its text not
 * prefixed twice. */
static void test_inbox_server_cancel_and_fail(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = {0};
	amqp_basic_cancel_t *m;
	amqp_channel_close_t *c;
	struct ev_rec *ev;
	uint32_t cid;

	inbox_session(f, CAP_CANCEL);
	open_channel(f, 1, false);
	cid = consume(f, 1, "k");
	guest_session_cancel_consumer(f->s, cid, "moved");
	m = expect_one_method(f, 1, AMQP_BASIC_CANCEL_METHOD);
	assert_memory_equal(m->consumer_tag.bytes, "k", 1);
	assert_int_equal(last_event(f, GUEST_EVENT_CANCEL)->consumer_id, cid);
	put_declare(&b, 1, "inbox", false);
	assert_int_equal(feed(f, &b), 0);
	ev = last_event(f, GUEST_EVENT_DECLARE);
	guest_session_fail(f->s, 1, ev->gen, 406,
	                   "PRECONDITION_FAILED - inequivalent arg 'x-max-length'");
	c = expect_one_method(f, 1, AMQP_CHANNEL_CLOSE_METHOD);
	assert_int_equal(c->reply_code, 406);
	assert_int_equal(c->reply_text.len, strlen("PRECONDITION_FAILED - inequivalent arg "
	                                           "'x-max-length'"));
	guest_session_free(f->s);
	f->s = NULL;
	f->nev = 0;

	handshake(f, 0, 60);
	open_channel(f, 1, false);
	cid = consume(f, 1, "k");
	guest_session_cancel_consumer(f->s, cid, "moved");
	expect_chan_close(f, 1, 506);
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
	const struct CMUnitTest tests[] = {
	        T(test_start_capabilities),
	        T(test_inbox_declare),
	        T(test_inbox_pipelined_request),
	        T(test_inbox_deliver_and_ack),
	        T(test_inbox_nack_reject_foreign_channel),
	        T(test_inbox_cancel_and_release),
	        T(test_inbox_bounds),
	        	        T(test_inbox_not_configured),
	        	        T(test_inbox_get_and_recover),
	        T(test_inbox_detach_and_consumers),
	        T(test_inbox_server_cancel_and_fail),
	        T(test_handshake_and_publish),
	        T(test_no_confirm_publish),
	        T(test_confirm_nowait),
	        T(test_interleaved_content),
	        T(test_byte_at_a_time),
	        T(test_settle_out_of_order),
	        T(test_settle_batch_coalesced),
	        T(test_return_to_guest),
	        T(test_nack),
	        T(test_settle_closed_generation),
	        T(test_client_close),
	        T(test_server_close),
	        T(test_amqplain_and_external),
	        T(test_auth_refused_403),
	        T(test_auth_refused_no_capability),
	        T(test_amqplain_garbage),
	        T(test_amqplain_without_login),
	        T(test_plain_without_nul),
	        T(test_unknown_mechanism),
	        T(test_bad_protocol_header),
	        T(test_frame_too_big_before_tune),
	        T(test_wrong_method_in_handshake),
	        T(test_tune_ok_channel_max),
	        T(test_tune_ok_frame_max_small),
	        T(test_tune_ok_frame_max_big),
	        T(test_tune_ok_frame_max_zero),
	        T(test_tune_ok_channel_max_zero),
	        T(test_vhost_refused),
	        T(test_vhost_accepted),
	        T(test_deep_client_properties),
	        T(test_bad_frame_end),
	        T(test_oversize_frame),
	        T(test_negotiated_frame_max_boundary),
	        T(test_unknown_frame_type),
	        T(test_heartbeat_on_channel),
	        T(test_method_before_channel_open),
	        T(test_second_channel_open),
	        T(test_channel_above_max),
	        T(test_method_on_channel0),
	        T(test_header_without_publish),
	        T(test_body_without_header),
	        T(test_body_without_publish),
	        T(test_method_mid_content),
	        T(test_body_longer_than_declared),
	        T(test_header_wrong_class),
	        T(test_truncated_method_args),
	        T(test_method_frame_too_short),
	        T(test_unknown_method),
	        T(test_deep_message_headers),
	        T(test_headers_at_depth_limit),
	        T(test_only_close_after_server_close),
	        T(test_close_crossing),
	        T(test_declared_size_too_big),
	        T(test_publish_forbidden_exchange),
	        T(test_exchange_declare),
	        T(test_queue_declare_403),
	        T(test_basic_consume_403),
	        T(test_basic_get_403),
	        T(test_tx_select_540),
	        T(test_publish_immediate_540),
	        T(test_handshake_timeout),
	        T(test_heartbeats),
	        T(test_heartbeat_timeout_without_bytes),
	        T(test_heartbeat_disabled),
	        T(test_output_bound),
	        T(test_max_unconfirmed),
	        T(test_unconfirmed_past_slack),
	        T(test_channel_flow),
	        T(test_qos_prefetch_size),
	        T(test_property_flags_continuation),
	        T(test_blocked),
	        T(test_blocked_not_advertised),
	};
#undef T
	return cmocka_run_group_tests(tests, NULL, NULL);
}
