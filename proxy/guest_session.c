/* guest_session.c -- see guest_session.h.
 *
 * Framing is ours; method and property bodies go through rabbitmq-c's
 * codec after our own bounds checks: only methods the engine acts on are
 * decoded at all, and every field table a guest sent (client properties,
 * AMQPLAIN responses, exchange.declare arguments, message headers) is
 * depth-checked first, since rabbitmq-c 0.11's table decoder recurses
 * without a limit.
 *
 * Errors follow RabbitMQ: a hard error sends connection.close and then only
 * close/close-ok are processed; a soft error sends channel.close and the
 * channel drops everything but close/close-ok until the guest confirms. */
#include "guest_session.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"
#include "field.h"

#define CLOSE_OK_TIMEOUT_MS 3000
/* A channel keeps its publish metadata buffer between messages up to this
 * size. */
#define META_KEEP 1024
#define DEFAULT_MAX_UNCONFIRMED 10000
/* Publishes that may complete after a channel reached max_unconfirmed,
 * from input already read (one read is at most 64 KiB of tiny frames). */
#define UNCONFIRMED_SLACK 65536

static const uint8_t protocol_header[8] = { 'A', 'M', 'Q', 'P', 0, 0, 9, 1 };
/* The 0-9 header, which RabbitMQ treats as 0-9-1. */
static const uint8_t protocol_header_09[8] = { 'A', 'M', 'Q', 'P', 1, 1, 0, 9 };

enum conn_state {
	ST_HEADER,   /* waiting for the protocol header */
	ST_START_OK, /* sent start */
	ST_TUNE_OK,  /* sent tune */
	ST_OPEN,     /* got tune-ok, waiting for connection.open */
	ST_RUNNING,
	ST_CLOSING, /* sent connection.close, waiting for close-ok */
	ST_CLOSED,
};

enum pub_state {
	PUB_NONE,
	PUB_HEADER, /* got basic.publish, want the content header */
	PUB_BODY,   /* got the header, want body frames */
};

/* A delivery not yet settled by the guest, with the owner's tags. */
struct dlv {
	uint64_t tag, up_tag;
	uint32_t up_gen, cid;
};

struct consumer {
	uint32_t id;
	uint16_t ch;
	uint32_t gen;
		bool no_ack;
	bool ready; /* consume-ok given */
	uint16_t prefetch; /* the channel's basic.qos when it was created */
	uint8_t tag_len;
	char tag[256];
};

struct chan {
	uint16_t id;
	uint32_t gen;
	bool closing; /* we sent channel.close, waiting for close-ok */
	bool crossed; /* ... and the guest's own channel.close came meanwhile */
	bool confirm;
	bool acks_due; /* settled tags not yet acked to the guest */
	/* Confirm window: tags in [low, next_tag] not yet acked to the guest;
	 * win[tag % cap] is 0 unsettled, 1 acked, 2 nacked. */
	uint64_t next_tag, low;
	uint8_t *win;
	uint32_t cap;
	/* Publish assembly. */
	enum pub_state pub;
	bool mandatory;
	uint8_t exchange_len, rk_len;
	/* exchange, routing key, then the raw property flags + list; the
	 * buffer is kept for the next message */
	uint8_t *meta;
	uint32_t props_len, meta_cap;
	uint64_t body_size, body_got;
	uint8_t *body;
	uint64_t body_cap;
	/* Inbox. */
	uint16_t prefetch;		/* basic.qos for consumers created after it */
	amqp_method_number_t pending;	/* an inbox request awaiting the owner's answer */
	bool pending_nowait;
	bool get_no_ack; /* of the pending basic.get */
	bool declared;			/* the inbox was declared: "" names it */
	uint64_t dnext;			/* the last delivery tag given */
	struct dlv *dl;			/* unsettled deliveries, by tag ascending */
	uint32_t ndl, capdl;
};

struct guest_session {
	const struct guest_session_config *cfg;
	void *ud; /* the owner's, passed to on_event */
	enum conn_state st;
	uint8_t *in;
	size_t in_len, in_cap;
	uint8_t *out;
	size_t out_off, out_len, out_cap;
	uint32_t frame_max;
	uint16_t channel_max;
	uint16_t heartbeat;
	uint64_t created_ms, last_rx_ms, last_tx_ms, close_deadline;
	bool cap_blocked, cap_auth_close, cap_cancel_notify;
	struct consumer *cons;
	uint16_t ncons, capcons;
	uint32_t next_cid;
	bool blocked_sent;
	bool closed_emitted;
	bool dropped;	 /* output is discarded from now on */
	bool rx_paused;	 /* the caller does not read: no receive timeout */
	bool lost_sync;	 /* bad framing: the rest of this feed is discarded */
	bool acks_due;	 /* some channel has settled tags to ack */
	uint64_t now_ms; /* the latest time the caller passed in */
	uint16_t close_code;
	char close_text[256];
	char user[128];
	uint32_t next_gen;
	struct chan **chans;
	uint16_t nchans, capchans;
	amqp_pool_t pool;
};

void guest_session_config_init(struct guest_session_config *c)
{
	memset(c, 0, sizeof(*c));
	c->channel_max = 64;
	c->frame_max = 131072;
	c->heartbeat = 60;
	c->max_message_bytes = 1u << 20;
	c->max_output_bytes = 4u << 20;
	c->handshake_timeout_ms = 10000;
	c->max_table_depth = 8;
	c->max_unconfirmed = DEFAULT_MAX_UNCONFIRMED;
	c->max_consumers = 4;
	c->max_unacked = 1024;
}

/* ---- output -------------------------------------------------------------- */

static void emit_closed(struct guest_session *s)
{
	struct guest_event ev;

	if (s->closed_emitted)
		return;
	s->closed_emitted = true;
	if (!s->cfg->on_event)
		return;
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_CLOSED;
	ev.reply_code = s->close_code;
	ev.text = s->close_text;
	s->cfg->on_event(s->ud, &ev);
}

/* The guest does not read: drop the connection, output and all. */
static void drop(struct guest_session *s, const char *why)
{
	s->dropped = true;
	s->st = ST_CLOSED;
	s->out_off = s->out_len = 0;
	s->close_code = 0;
	snprintf(s->close_text, sizeof(s->close_text), "%s", why);
	emit_closed(s);
}

static bool out_reserve(struct guest_session *s, size_t n)
{
	size_t pending = s->out_len - s->out_off;

	if (s->dropped)
		return false;
	if (pending + n > s->cfg->max_output_bytes) {
		drop(s, "output buffer limit reached: the guest does not read");
		return false;
	}
	if (s->out_off > 0 && s->out_len + n > s->out_cap) {
		memmove(s->out, s->out + s->out_off, pending);
		s->out_len = pending;
		s->out_off = 0;
	}
	if (s->out_len + n > s->out_cap) {
		size_t cap = s->out_cap ? s->out_cap : 512;
		uint8_t *o;

		while (cap < s->out_len + n)
			cap *= 2;
		o = realloc(s->out, cap);
		if (!o) {
			drop(s, "out of memory");
			return false;
		}
		s->out = o;
		s->out_cap = cap;
	}
	return true;
}

static void out_raw(struct guest_session *s, const void *p, size_t n)
{
	if (n == 0)
		return; /* P may be NULL (empty properties or body) */
	if (!out_reserve(s, n))
		return;
	memcpy(s->out + s->out_len, p, n);
	s->out_len += n;
}

static void flush_due_acks(struct guest_session *s);

/* Encode METHOD_ID with DECODED arguments as a method frame on CHANNEL. */
static void send_method(struct guest_session *s, uint16_t channel, amqp_method_number_t id,
			void *decoded)
{
	uint8_t buf[4096];
	amqp_bytes_t enc = { sizeof(buf) - 12, buf + 11 };
	int n;

	/* Acks settled earlier go out before anything sent after them. */
	flush_due_acks(s);
	n = amqp_encode_method(id, decoded, enc);
	if (n < 0) {
		drop(s, "cannot encode a reply");
		return;
	}
	buf[0] = AMQP_FT_METHOD;
	amqp_frame_put16(buf + 1, channel);
	amqp_frame_put32(buf + 3, (uint32_t)n + 4);
	amqp_frame_put32(buf + 7, id);
	buf[11 + n] = AMQP_FRAME_END_OCTET;
	out_raw(s, buf, (size_t)n + 12);
}

static void send_heartbeat(struct guest_session *s)
{
	static const uint8_t hb[8] = { AMQP_FT_HEARTBEAT, 0, 0, 0, 0, 0, 0, AMQP_FRAME_END_OCTET };

	out_raw(s, hb, sizeof(hb));
}

/* ---- errors ---------------------------------------------------------------- */

static const char *code_name(uint16_t code)
{
	switch (code) {
	case 200: return "OK";
	case 320: return "CONNECTION_FORCED";
	case 403: return "ACCESS_REFUSED";
	case 404: return "NOT_FOUND";
	case 406: return "PRECONDITION_FAILED";
	case 501: return "FRAME_ERROR";
	case 502: return "SYNTAX_ERROR";
	case 503: return "COMMAND_INVALID";
	case 504: return "CHANNEL_ERROR";
	case 505: return "UNEXPECTED_FRAME";
	case 530: return "NOT_ALLOWED";
	case 540: return "NOT_IMPLEMENTED";
	case 541: return "INTERNAL_ERROR";
	}
	return "ERROR";
}

/* Send connection.close with TEXT (already "NAME - detail") and wait for
 * close-ok, at most CLOSE_OK_TIMEOUT_MS. */
static void conn_close_with(struct guest_session *s, uint16_t code, amqp_method_number_t cause,
			    const char *text)
{
	amqp_connection_close_t m;

	if (s->st == ST_CLOSING || s->st == ST_CLOSED)
		return;
	s->close_code = code;
	snprintf(s->close_text, sizeof(s->close_text), "%s", text);
	memset(&m, 0, sizeof(m));
	m.reply_code = code;
	m.reply_text = amqp_cstring_bytes(s->close_text);
	m.class_id = (uint16_t)(cause >> 16);
	m.method_id = (uint16_t)(cause & 0xffff);
	send_method(s, 0, AMQP_CONNECTION_CLOSE_METHOD, &m);
	if (s->st != ST_CLOSED)
		s->st = ST_CLOSING;
	s->close_deadline = s->now_ms + CLOSE_OK_TIMEOUT_MS;
}

/* Hard error: connection.close, then wait for close-ok. */
static void conn_error(struct guest_session *s, uint16_t code, amqp_method_number_t cause,
		       const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void conn_error(struct guest_session *s, uint16_t code, amqp_method_number_t cause,
		       const char *fmt, ...)
{
	char detail[200], text[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	snprintf(text, sizeof(text), "%s - %s", code_name(code), detail);
	conn_close_with(s, code, cause, text);
}

static void chan_free(struct guest_session *s, struct chan *c);

/* Soft error: channel.close; the channel drops all but close/close-ok. */
static void chan_error(struct guest_session *s, struct chan *c, uint16_t code,
		       amqp_method_number_t cause, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

static void chan_error(struct guest_session *s, struct chan *c, uint16_t code,
		       amqp_method_number_t cause, const char *fmt, ...)
{
	amqp_channel_close_t m;
	char detail[200], text[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	snprintf(text, sizeof(text), "%s - %s", code_name(code), detail);
	memset(&m, 0, sizeof(m));
	m.reply_code = code;
	m.reply_text = amqp_cstring_bytes(text);
	m.class_id = (uint16_t)(cause >> 16);
	m.method_id = (uint16_t)(cause & 0xffff);
	send_method(s, c->id, AMQP_CHANNEL_CLOSE_METHOD, &m);
	c->closing = true;
	c->pub = PUB_NONE;
	free(c->body);
	c->body = NULL;
	c->body_cap = c->body_got = c->body_size = 0;
}

/* ---- channels ---------------------------------------------------------- */

static struct chan *chan_find(struct guest_session *s, uint16_t id)
{
	for (uint16_t i = 0; i < s->nchans; i++)
		if (s->chans[i]->id == id)
			return s->chans[i];
	return NULL;
}

static struct chan *chan_new(struct guest_session *s, uint16_t id)
{
	struct chan *c;

	if (s->nchans == s->capchans) {
		uint16_t cap = s->capchans ? (uint16_t)(s->capchans * 2) : 2;
		struct chan **a = realloc(s->chans, cap * sizeof(*a));
		if (!a)
			return NULL;
		s->chans = a;
		s->capchans = cap;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->id = id;
	c->gen = ++s->next_gen;
	c->low = 1;
	s->chans[s->nchans++] = c;
	return c;
}

static void emit(struct guest_session *s, struct guest_event *ev)
{
	if (s->cfg->on_event)
		s->cfg->on_event(s->ud, ev);
}

static void cons_remove(struct guest_session *s, uint16_t i)
{
	struct guest_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_CANCEL;
	ev.channel = s->cons[i].ch;
	ev.channel_gen = s->cons[i].gen;
	ev.consumer_id = s->cons[i].id;
	s->cons[i] = s->cons[--s->ncons];
	emit(s, &ev);
}

static void emit_settle(struct guest_session *s, struct chan *c, const struct dlv *d,
			enum guest_settle_kind kind, bool requeue)
{
	struct guest_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_SETTLE;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	ev.settle.kind = kind;
	ev.settle.requeue = requeue;
	ev.settle.consumer_id = d->cid;
	ev.settle.up_tag = d->up_tag;
	ev.settle.up_gen = d->up_gen;
	emit(s, &ev);
}

/* Give back what the inbox handed this channel: its deliveries (requeued)
 * and its consumers. */
static void chan_release(struct guest_session *s, struct chan *c)
{
	uint32_t n = c->ndl;

	c->ndl = 0;
	for (uint32_t i = 0; i < n; i++)
		emit_settle(s, c, &c->dl[i], GUEST_SETTLE_RELEASE, true);
	for (uint16_t i = s->ncons; i-- > 0;)
		if (s->cons[i].ch == c->id && s->cons[i].gen == c->gen)
			cons_remove(s, i);
}

static void chan_emit_closed(struct guest_session *s, struct chan *c)
{
	struct guest_event ev;

	chan_release(s, c);
	if (!s->cfg->on_event)
		return;
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_CHANNEL_CLOSED;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	s->cfg->on_event(s->ud, &ev);
}

static void chan_free(struct guest_session *s, struct chan *c)
{
	for (uint16_t i = 0; i < s->nchans; i++) {
		if (s->chans[i] == c) {
			s->chans[i] = s->chans[--s->nchans];
			break;
		}
	}
	free(c->win);
	free(c->meta);
	free(c->body);
	free(c->dl);
	free(c);
}

static uint64_t chan_unconfirmed(const struct chan *c)
{
	return c->next_tag + 1 - c->low;
}

/* Room in the confirm window for tag next_tag + 1. */
static bool win_grow(struct guest_session *s, struct chan *c)
{
	uint64_t need = chan_unconfirmed(c) + 1;
	uint32_t ncap;
	uint8_t *nw;

	if (need > (uint64_t)s->cfg->max_unconfirmed + UNCONFIRMED_SLACK)
		return false;
	if (need <= c->cap)
		return true;
	ncap = c->cap ? c->cap : 64;
	while (ncap < need)
		ncap *= 2;
	nw = calloc(ncap, 1);
	if (!nw)
		return false;
	for (uint64_t t = c->low; t <= c->next_tag; t++)
		nw[t % ncap] = c->win[t % c->cap];
	free(c->win);
	c->win = nw;
	c->cap = ncap;
	return true;
}

/* Send acks/nacks for settled tags from the bottom of the window, one
 * frame per run of equal outcomes; "multiple" only over settled tags. */
static void chan_flush_acks(struct guest_session *s, struct chan *c)
{
	while (c->low <= c->next_tag && c->win[c->low % c->cap] != 0) {
		uint8_t outcome = c->win[c->low % c->cap];
		uint64_t end = c->low;

		while (end + 1 <= c->next_tag && c->win[(end + 1) % c->cap] == outcome)
			end++;
		if (outcome == 1) {
			amqp_basic_ack_t a = { .delivery_tag = end, .multiple = end > c->low };
			send_method(s, c->id, AMQP_BASIC_ACK_METHOD, &a);
		} else {
			amqp_basic_nack_t n = { .delivery_tag = end, .multiple = end > c->low,
						.requeue = 0 };
			send_method(s, c->id, AMQP_BASIC_NACK_METHOD, &n);
		}
		for (uint64_t t = c->low; t <= end; t++)
			c->win[t % c->cap] = 0;
		c->low = end + 1;
	}
}

/* Settled tags are acked when the output is next taken (or before any
 * other frame), so the confirms of one loop iteration become as few
 * "multiple" acks as the tags allow. */
static void flush_due_acks(struct guest_session *s)
{
	if (!s->acks_due)
		return;
	s->acks_due = false;
	for (uint16_t i = 0; i < s->nchans; i++) {
		struct chan *c = s->chans[i];

		if (c->acks_due) {
			c->acks_due = false;
			chan_flush_acks(s, c);
		}
	}
}

/* ---- session lifetime ---------------------------------------------------- */

struct guest_session *guest_session_new(const struct guest_session_config *config,
					void *userdata, uint64_t now_ms)
{
	struct guest_session *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->cfg = config;
	s->ud = userdata;
	s->st = ST_HEADER;
	s->frame_max = AMQP_FRAME_MIN_SIZE;
	s->created_ms = s->last_rx_ms = s->last_tx_ms = s->now_ms = now_ms;
	init_amqp_pool(&s->pool, 1024);
	return s;
}

void guest_session_set_config(struct guest_session *s, const struct guest_session_config *config)
{
	s->cfg = config;
}

void guest_session_free(struct guest_session *s)
{
	if (!s)
		return;
	while (s->nchans)
		chan_free(s, s->chans[0]);
	free(s->chans);
	free(s->cons);
	free(s->in);
	free(s->out);
	empty_amqp_pool(&s->pool);
	free(s);
}

/* ---- handshake ------------------------------------------------------------- */

static void send_start(struct guest_session *s)
{
	amqp_table_entry_t caps[] = {
		field_bool("publisher_confirms", true),
		field_bool("basic.nack", true),
		field_bool("connection.blocked", true),
		field_bool("authentication_failure_close", true),
		field_bool("consumer_cancel_notify", true),
		field_bool("exchange_exchange_bindings", true),
		field_bool("per_consumer_qos", true),
	};
	amqp_table_entry_t props[4];
	amqp_connection_start_t m;

	props[0] = field_table("capabilities", caps, (int)(sizeof(caps) / sizeof(caps[0])));
	props[1] = field_utf8("product", s->cfg->product ? s->cfg->product : "vmproxy");
	props[2] = field_utf8("version", VMPROXY_VERSION);
	props[3] = field_utf8("platform", "Linux");
	memset(&m, 0, sizeof(m));
	m.version_major = 0;
	m.version_minor = 9;
	m.server_properties.num_entries = 4;
	m.server_properties.entries = props;
	m.mechanisms = amqp_cstring_bytes("PLAIN AMQPLAIN EXTERNAL");
	m.locales = amqp_cstring_bytes("en_US");
	send_method(s, 0, AMQP_CONNECTION_START_METHOD, &m);
}

static bool table_bool(const amqp_table_t *t, const char *key)
{
	for (int i = 0; i < t->num_entries; i++) {
		const amqp_table_entry_t *e = &t->entries[i];
		if (e->key.len == strlen(key) && memcmp(e->key.bytes, key, e->key.len) == 0)
			return e->value.kind == AMQP_FIELD_KIND_BOOLEAN && e->value.value.boolean;
	}
	return false;
}

static const amqp_field_value_t *table_get(const amqp_table_t *t, const char *key)
{
	for (int i = 0; i < t->num_entries; i++) {
		const amqp_table_entry_t *e = &t->entries[i];
		if (e->key.len == strlen(key) && memcmp(e->key.bytes, key, e->key.len) == 0)
			return &e->value;
	}
	return NULL;
}

static void copy_user(struct guest_session *s, const void *p, size_t n)
{
	if (n >= sizeof(s->user))
		n = sizeof(s->user) - 1;
	memcpy(s->user, p, n);
	s->user[n] = '\0';
}

static void refuse_login(struct guest_session *s, const char *mech)
{
	if (s->cap_auth_close) {
		conn_error(s, 403, AMQP_CONNECTION_START_OK_METHOD,
			   "Login was refused using authentication mechanism %s. For details "
			   "see the broker logfile.", mech);
		return;
	}
	/* Clients without authentication_failure_close see the socket close. */
	s->close_code = 403;
	snprintf(s->close_text, sizeof(s->close_text),
		 "ACCESS_REFUSED - login refused using authentication mechanism %s", mech);
	s->st = ST_CLOSED;
	emit_closed(s);
}

/* A response the mechanism cannot parse is a protocol error in RabbitMQ
 * (502), not a refused login. */
static void bad_response(struct guest_session *s, const char *mech)
{
	conn_error(s, 502, AMQP_CONNECTION_START_OK_METHOD, "%s response is malformed", mech);
}

static void on_start_ok(struct guest_session *s, const uint8_t *args, size_t len)
{
	amqp_connection_start_ok_t *m;
	amqp_bytes_t b = { len, (void *)args };
	const amqp_field_value_t *caps;
	char mech[32];
	size_t used;
	int r;

	/* client_properties is the first argument: check it before decoding. */
	r = amqp_frame_check_table_prefixed(args, len, s->cfg->max_table_depth, &used);
	if (r == -ELOOP) {
		conn_error(s, 502, AMQP_CONNECTION_START_OK_METHOD,
			   "client_properties nested deeper than %u levels", s->cfg->max_table_depth);
		return;
	}
	if (r < 0) {
		conn_error(s, 502, AMQP_CONNECTION_START_OK_METHOD, "malformed client_properties");
		return;
	}
	if (amqp_decode_method(AMQP_CONNECTION_START_OK_METHOD, &s->pool, b, (void **)&m) < 0) {
		conn_error(s, 501, AMQP_CONNECTION_START_OK_METHOD,
			   "cannot decode connection.start-ok");
		return;
	}
	caps = table_get(&m->client_properties, "capabilities");
	if (caps && caps->kind == AMQP_FIELD_KIND_TABLE) {
		s->cap_blocked = table_bool(&caps->value.table, "connection.blocked");
		s->cap_auth_close = table_bool(&caps->value.table, "authentication_failure_close");
		s->cap_cancel_notify = table_bool(&caps->value.table, "consumer_cancel_notify");
	}
	snprintf(mech, sizeof(mech), "%.*s", (int)(m->mechanism.len < 31 ? m->mechanism.len : 31),
		 (const char *)m->mechanism.bytes);
	if (strcmp(mech, "PLAIN") == 0) {
		/* [authzid] NUL authcid NUL passwd */
		const uint8_t *p = m->response.bytes, *nul1, *nul2;
		size_t n = m->response.len;

		nul1 = n ? memchr(p, 0, n) : NULL;
		nul2 = nul1 ? memchr(nul1 + 1, 0, n - (size_t)(nul1 + 1 - p)) : NULL;
		if (!nul1 || !nul2) {
			bad_response(s, mech);
			return;
		}
		copy_user(s, nul1 + 1, (size_t)(nul2 - nul1 - 1));
	} else if (strcmp(mech, "AMQPLAIN") == 0) {
		/* The response is a table's entries without the length prefix:
		 * check them, then hand rabbitmq-c a prefixed copy. */
		amqp_bytes_t resp = m->response;
		uint8_t *buf = amqp_pool_alloc(&s->pool, resp.len + 4);
		amqp_bytes_t wrapped = { resp.len + 4, buf };
		const amqp_field_value_t *login;
		amqp_table_t t;
		size_t off = 0;

		if (!buf || amqp_frame_check_table(resp.bytes, resp.len, s->cfg->max_table_depth) < 0) {
			bad_response(s, mech);
			return;
		}
		amqp_frame_put32(buf, (uint32_t)resp.len);
		memcpy(buf + 4, resp.bytes, resp.len);
		if (amqp_decode_table(wrapped, &s->pool, &t, &off) != AMQP_STATUS_OK) {
			bad_response(s, mech);
			return;
		}
		login = table_get(&t, "LOGIN");
		if (!login || (login->kind != AMQP_FIELD_KIND_UTF8 &&
			       login->kind != AMQP_FIELD_KIND_BYTES)) {
			bad_response(s, mech);
			return;
		}
		copy_user(s, login->value.bytes.bytes, login->value.bytes.len);
	} else if (strcmp(mech, "EXTERNAL") == 0) {
		s->user[0] = '\0';
	} else {
		char shown[40];
		snprintf(shown, sizeof(shown), "%s", mech);
		for (char *c = shown; *c; c++)
			if (*c < 0x20 || *c > 0x7e)
				*c = '?';
		conn_error(s, 503, AMQP_CONNECTION_START_OK_METHOD,
			   "unknown authentication mechanism '%s'", shown);
		return;
	}
	if (s->cfg->auth && s->cfg->auth(s->cfg->auth_userdata, mech, s->user) < 0) {
		refuse_login(s, mech);
		return;
	}
	{
		amqp_connection_tune_t t = {
			.channel_max = s->cfg->channel_max,
			.frame_max = s->cfg->frame_max,
			.heartbeat = s->cfg->heartbeat,
		};
		send_method(s, 0, AMQP_CONNECTION_TUNE_METHOD, &t);
	}
	s->st = ST_TUNE_OK;
}

static void on_tune_ok(struct guest_session *s, const uint8_t *args, size_t len)
{
	amqp_connection_tune_ok_t *m;
	amqp_bytes_t b = { len, (void *)args };
	uint32_t fmax = s->cfg->frame_max;

	if (amqp_decode_method(AMQP_CONNECTION_TUNE_OK_METHOD, &s->pool, b, (void **)&m) < 0) {
		conn_error(s, 501, AMQP_CONNECTION_TUNE_OK_METHOD, "cannot decode connection.tune-ok");
		return;
	}
	/* rabbit_reader's validate_negotiated_integer_value: with a server
	 * limit, 0 ("no limit") is above it; the close names connection.tune. */
	if (m->channel_max == 0 || m->channel_max > s->cfg->channel_max) {
		conn_error(s, 530, AMQP_CONNECTION_TUNE_METHOD,
			   "negotiated channel_max = %u%s is higher than the maximum allowed value "
			   "(%u)", m->channel_max, m->channel_max ? "" : " (no limit)",
			   s->cfg->channel_max);
		return;
	}
	if (m->frame_max != 0 && m->frame_max < AMQP_FRAME_MIN_SIZE) {
		conn_error(s, 530, AMQP_CONNECTION_TUNE_METHOD,
			   "negotiated frame_max = %u is lower than the minimum allowed value (%u)",
			   m->frame_max, AMQP_FRAME_MIN_SIZE);
		return;
	}
	if (m->frame_max == 0 || m->frame_max > fmax) {
		conn_error(s, 530, AMQP_CONNECTION_TUNE_METHOD,
			   "negotiated frame_max = %u is higher than the maximum allowed value (%u)",
			   m->frame_max, fmax);
		return;
	}
	s->channel_max = m->channel_max;
	s->frame_max = m->frame_max;
	s->heartbeat = m->heartbeat;
	s->st = ST_OPEN;
}

static void on_open(struct guest_session *s, const uint8_t *args, size_t len)
{
	amqp_connection_open_t *m;
	amqp_bytes_t b = { len, (void *)args };
	amqp_connection_open_ok_t ok;
	struct guest_event ev;

	if (amqp_decode_method(AMQP_CONNECTION_OPEN_METHOD, &s->pool, b, (void **)&m) < 0) {
		conn_error(s, 501, AMQP_CONNECTION_OPEN_METHOD, "cannot decode connection.open");
		return;
	}
	if (s->cfg->vhost && (m->virtual_host.len != strlen(s->cfg->vhost) ||
			      memcmp(m->virtual_host.bytes, s->cfg->vhost, m->virtual_host.len))) {
		conn_error(s, 530, AMQP_CONNECTION_OPEN_METHOD,
			   "access to vhost '%.*s' refused for user '%s'",
			   (int)(m->virtual_host.len > 64 ? 64 : m->virtual_host.len),
			   (const char *)m->virtual_host.bytes, s->user);
		return;
	}
	memset(&ok, 0, sizeof(ok));
	ok.known_hosts = amqp_cstring_bytes("");
	send_method(s, 0, AMQP_CONNECTION_OPEN_OK_METHOD, &ok);
	s->st = ST_RUNNING;
	if (s->cfg->on_event) {
		memset(&ev, 0, sizeof(ev));
		ev.type = GUEST_EVENT_OPENED;
		s->cfg->on_event(s->ud, &ev);
	}
}

/* ---- methods on a running connection -------------------------------------- */

static bool exchange_allowed(const struct guest_session *s, const char *name, size_t len)
{
	const char *const *a = s->cfg->allowed_exchanges;

	for (; a && *a; a++)
		if (strlen(*a) == len && memcmp(*a, name, len) == 0)
			return true;
	return false;
}

static void complete_publish(struct guest_session *s, struct chan *c)
{
	struct guest_event ev;
	amqp_basic_properties_t *props = NULL;
	amqp_bytes_t raw = { c->props_len, c->meta + c->exchange_len + c->rk_len };

	if (amqp_decode_properties(AMQP_BASIC_CLASS, &s->pool, raw, (void **)&props) < 0) {
		/* Validated when the header arrived: cannot happen. */
		conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD, "cannot decode content header");
		return;
	}
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_PUBLISH;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	ev.publish.channel = c->id;
	ev.publish.channel_gen = c->gen;
	if (c->confirm) {
		if (!win_grow(s, c)) {
			chan_error(s, c, 406, AMQP_BASIC_PUBLISH_METHOD,
				   "more than %u unconfirmed messages on channel %u",
				   s->cfg->max_unconfirmed + UNCONFIRMED_SLACK, c->id);
			return;
		}
		c->next_tag++;
		c->win[c->next_tag % c->cap] = 0;
		ev.publish.delivery_tag = c->next_tag;
		ev.publish.confirm = true;
	}
	ev.publish.mandatory = c->mandatory;
	ev.publish.exchange = (amqp_bytes_t){ c->exchange_len, c->meta };
	ev.publish.routing_key = (amqp_bytes_t){ c->rk_len, c->meta + c->exchange_len };
	ev.publish.properties = props;
	ev.publish.raw_properties = raw;
	ev.publish.body = c->body;
	ev.publish.body_len = (size_t)c->body_size;
	c->body = NULL;
	c->body_cap = c->body_got = c->body_size = 0;
	c->pub = PUB_NONE;
	if (s->cfg->on_event)
		s->cfg->on_event(s->ud, &ev);
	else
		free(ev.publish.body);
	c->props_len = 0;
	if (c->meta_cap > META_KEEP) {
		free(c->meta);
		c->meta = NULL;
		c->meta_cap = 0;
	}
}

/* Room for N bytes of publish metadata, keeping what is there. */
static bool meta_reserve(struct chan *c, size_t n)
{
	uint8_t *m;

	if (n <= c->meta_cap)
		return true;
	if (n < 256)
		n = 256;
	m = realloc(c->meta, n);
	if (!m)
		return false;
	c->meta = m;
	c->meta_cap = (uint32_t)n;
	return true;
}

static void on_publish(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_publish_t *m;
	amqp_bytes_t b = { len, (void *)args };

	if (amqp_decode_method(AMQP_BASIC_PUBLISH_METHOD, &s->pool, b, (void **)&m) < 0) {
		conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD, "cannot decode basic.publish");
		return;
	}
	if (m->immediate) {
		conn_error(s, 540, AMQP_BASIC_PUBLISH_METHOD, "immediate=true");
		return;
	}
	if (!exchange_allowed(s, m->exchange.bytes, m->exchange.len)) {
		chan_error(s, c, 403, AMQP_BASIC_PUBLISH_METHOD,
			   "access to exchange '%.*s' in vhost '%s' refused for user '%s'",
			   (int)(m->exchange.len > 64 ? 64 : m->exchange.len),
			   (const char *)m->exchange.bytes, s->cfg->vhost ? s->cfg->vhost : "/",
			   s->user);
		return;
	}
	if (!meta_reserve(c, m->exchange.len + m->routing_key.len)) {
		conn_error(s, 541, AMQP_BASIC_PUBLISH_METHOD, "out of memory");
		return;
	}
	c->pub = PUB_HEADER;
	c->mandatory = m->mandatory;
	c->exchange_len = (uint8_t)m->exchange.len;
	memcpy(c->meta, m->exchange.bytes, m->exchange.len);
	c->rk_len = (uint8_t)m->routing_key.len;
	memcpy(c->meta + c->exchange_len, m->routing_key.bytes, m->routing_key.len);
}

static void on_exchange_declare(struct guest_session *s, struct chan *c, const uint8_t *args,
				size_t len)
{
	amqp_exchange_declare_t *m;
	amqp_bytes_t b = { len, (void *)args };
	size_t off = 2, n;
	int r;

	/* reserved u16, exchange, type, bits, arguments: check the table. */
	if (off > len || amqp_frame_skip_shortstr(args + off, len - off, &n) < 0 ||
	    (off += n) > len || amqp_frame_skip_shortstr(args + off, len - off, &n) < 0 ||
	    (off += n + 1) > len) {
		conn_error(s, 501, AMQP_EXCHANGE_DECLARE_METHOD, "cannot decode exchange.declare");
		return;
	}
	r = amqp_frame_check_table_prefixed(args + off, len - off, s->cfg->max_table_depth, &n);
	if (r < 0 ||
	    amqp_decode_method(AMQP_EXCHANGE_DECLARE_METHOD, &s->pool, b, (void **)&m) < 0) {
		conn_error(s, 502, AMQP_EXCHANGE_DECLARE_METHOD,
			   r == -ELOOP ? "arguments nested too deep" : "malformed exchange.declare");
		return;
	}
	if (!exchange_allowed(s, m->exchange.bytes, m->exchange.len)) {
		chan_error(s, c, 403, AMQP_EXCHANGE_DECLARE_METHOD,
			   "access to exchange '%.*s' in vhost '%s' refused for user '%s'",
			   (int)(m->exchange.len > 64 ? 64 : m->exchange.len),
			   (const char *)m->exchange.bytes, s->cfg->vhost ? s->cfg->vhost : "/",
			   s->user);
		return;
	}
	if (!m->nowait) {
		amqp_exchange_declare_ok_t ok = { 0 };
		send_method(s, c->id, AMQP_EXCHANGE_DECLARE_OK_METHOD, &ok);
	}
}

static bool refused_method(amqp_method_number_t id)
{
	switch (id) {
	case AMQP_EXCHANGE_DELETE_METHOD:
	case AMQP_EXCHANGE_BIND_METHOD:
	case AMQP_EXCHANGE_UNBIND_METHOD:
	case AMQP_QUEUE_BIND_METHOD:
	case AMQP_QUEUE_PURGE_METHOD:
	case AMQP_QUEUE_DELETE_METHOD:
	case AMQP_QUEUE_UNBIND_METHOD:
		return true;
	}
	return false;
}

/* RabbitMQ's spelling of a method ("basic.recover-async") from
 * rabbitmq-c's constant name ("AMQP_BASIC_RECOVER_ASYNC_METHOD"). */
static const char *method_name_r(amqp_method_number_t id, char *buf, size_t size)
{
	const char *n = amqp_method_name(id);
	size_t len, o = 0;
	bool dot = false;

	if (!n || strncmp(n, "AMQP_", 5) != 0)
		return "unknown";
	n += 5;
	len = strlen(n);
	if (len > 7 && strcmp(n + len - 7, "_METHOD") == 0)
		len -= 7;
	for (size_t i = 0; i < len && o < size - 1; i++) {
		char c = n[i];
		if (c == '_') {
			c = dot ? '-' : '.';
			dot = true;
		} else if (c >= 'A' && c <= 'Z') {
			c = (char)(c - 'A' + 'a');
		}
		buf[o++] = c;
	}
	buf[o] = '\0';
	return buf;
}

/* The same in a per-thread buffer: one use per message. */
static const char *method_name(amqp_method_number_t id)
{
	static _Thread_local char buf[64];

	return method_name_r(id, buf, sizeof(buf));
}

/* ---- the inbox ------------------------------------------------------------ */

static bool is_inbox(const struct guest_session *s, const struct chan *c, amqp_bytes_t q,
		     bool empty_ok)
{
	const char *n = s->cfg->inbox_name;

	if (!n)
		return false;
	if (q.len == 0)
		return empty_ok && c->declared;
	return q.len == strlen(n) && memcmp(q.bytes, n, q.len) == 0;
}

static void refuse_queue(struct guest_session *s, struct chan *c, amqp_method_number_t id,
			 amqp_bytes_t q)
{
	if (!s->cfg->inbox_name) {
		chan_error(s, c, 403, id, "%s is not permitted through this proxy: guests may "
					  "only publish", method_name(id));
		return;
	}
	chan_error(s, c, 403, id, "access to queue '%.*s' in vhost '%s' refused for user '%s'",
		   (int)(q.len > 64 ? 64 : q.len), (const char *)q.bytes,
		   s->cfg->vhost ? s->cfg->vhost : "/", s->user);
}

/* Depth-check the table at the end of ARGS, after SKIP short strings that
 * follow the reserved u16 and before the bits octet; then decode. */
static void *decode_with_table(struct guest_session *s, amqp_method_number_t id,
			       const uint8_t *args, size_t len, int strs)
{
	size_t off = 2, n;
	void *m;
	int r;

	for (int i = 0; i < strs; i++) {
		if (off > len || amqp_frame_skip_shortstr(args + off, len - off, &n) < 0) {
			conn_error(s, 501, id, "cannot decode %s", method_name(id));
			return NULL;
		}
		off += n;
	}
	if (++off > len) {
		conn_error(s, 501, id, "cannot decode %s", method_name(id));
		return NULL;
	}
	r = amqp_frame_check_table_prefixed(args + off, len - off, s->cfg->max_table_depth, &n);
	if (r < 0 || amqp_decode_method(id, &s->pool, (amqp_bytes_t){ len, (void *)args }, &m) < 0) {
		conn_error(s, 502, id, r == -ELOOP ? "arguments nested too deep" : "malformed %s",
			   method_name(id));
		return NULL;
	}
	return m;
}

/* One inbox request at a time per channel: the answer comes from the
 * broker, and later requests would have to wait behind it. */
static bool check_not_pending(struct guest_session *s, struct chan *c, amqp_method_number_t id)
{
	if (!c->pending)
		return true;
	conn_error(s, 503, id, "%s while %s on channel %u is still unanswered: wait for its reply",
		   method_name(id), method_name_r(c->pending, (char[64]){ 0 }, 64), c->id);
	return false;
}

static void on_queue_declare(struct guest_session *s, struct chan *c, const uint8_t *args,
			     size_t len)
{
	amqp_queue_declare_t *m = decode_with_table(s, AMQP_QUEUE_DECLARE_METHOD, args, len, 1);
	struct guest_event ev;

	if (!m)
		return;
	if (!is_inbox(s, c, m->queue, false)) {
		refuse_queue(s, c, AMQP_QUEUE_DECLARE_METHOD, m->queue);
		return;
	}
	if (!check_not_pending(s, c, AMQP_QUEUE_DECLARE_METHOD))
		return;
	c->pending = AMQP_QUEUE_DECLARE_METHOD;
	c->pending_nowait = m->nowait;
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_DECLARE;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	ev.passive = m->passive;
	emit(s, &ev);
}

static void on_get(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_get_t *m;
	struct guest_event ev;

	if (amqp_decode_method(AMQP_BASIC_GET_METHOD, &s->pool, (amqp_bytes_t){ len, (void *)args },
			       (void **)&m) < 0) {
		conn_error(s, 501, AMQP_BASIC_GET_METHOD, "cannot decode basic.get");
		return;
	}
	if (!is_inbox(s, c, m->queue, true)) {
		refuse_queue(s, c, AMQP_BASIC_GET_METHOD, m->queue);
		return;
	}
	if (!check_not_pending(s, c, AMQP_BASIC_GET_METHOD))
		return;
	if (!m->no_ack && c->ndl >= s->cfg->max_unacked) {
		chan_error(s, c, 406, AMQP_BASIC_GET_METHOD,
			   "more than %u unacknowledged deliveries on channel %u", s->cfg->max_unacked,
			   c->id);
		return;
	}
	c->pending = AMQP_BASIC_GET_METHOD;
	c->pending_nowait = false;
	c->get_no_ack = m->no_ack;
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_GET;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	ev.no_ack = m->no_ack;
	emit(s, &ev);
}

/* basic.recover(-async) with requeue: the channel's unsettled deliveries
 * go back to the queue (RELEASE events) and are delivered again, marked
 * redelivered, as RabbitMQ does; requeue=false is not supported there
 * either. */
static void on_recover(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		       const uint8_t *args, size_t len)
{
	bool requeue = len >= 1 && (args[0] & 1);
	uint32_t n = c->ndl;

	if (len < 1) {
		conn_error(s, 501, id, "cannot decode %s", method_name(id));
		return;
	}
	if (!requeue) {
		conn_error(s, 540, id, "requeue=false");
		return;
	}
	c->ndl = 0;
	for (uint32_t i = 0; i < n; i++)
		emit_settle(s, c, &c->dl[i], GUEST_SETTLE_RELEASE, true);
	if (id == AMQP_BASIC_RECOVER_METHOD) {
		amqp_basic_recover_ok_t ok = { 0 };
		send_method(s, c->id, AMQP_BASIC_RECOVER_OK_METHOD, &ok);
	}
}

static struct consumer *cons_by_tag(struct guest_session *s, amqp_bytes_t tag)
{
	for (uint16_t i = 0; i < s->ncons; i++)
		if (s->cons[i].tag_len == tag.len && memcmp(s->cons[i].tag, tag.bytes, tag.len) == 0)
			return &s->cons[i];
	return NULL;
}

static struct consumer *cons_by_id(struct guest_session *s, uint32_t id, uint16_t *index)
{
	for (uint16_t i = 0; i < s->ncons; i++) {
		if (s->cons[i].id == id) {
			if (index)
				*index = i;
			return &s->cons[i];
		}
	}
	return NULL;
}

static void on_consume(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_consume_t *m = decode_with_table(s, AMQP_BASIC_CONSUME_METHOD, args, len, 2);
	struct guest_event ev;
	struct consumer *k;

	if (!m)
		return;
	if (!is_inbox(s, c, m->queue, true)) {
		refuse_queue(s, c, AMQP_BASIC_CONSUME_METHOD, m->queue);
		return;
	}
	if (!check_not_pending(s, c, AMQP_BASIC_CONSUME_METHOD))
		return;
	if (m->consumer_tag.len && cons_by_tag(s, m->consumer_tag)) {
		conn_error(s, 530, AMQP_BASIC_CONSUME_METHOD, "attempt to reuse consumer tag '%.*s'",
			   (int)(m->consumer_tag.len > 64 ? 64 : m->consumer_tag.len),
			   (const char *)m->consumer_tag.bytes);
		return;
	}
	if (s->ncons >= s->cfg->max_consumers) {
		chan_error(s, c, 406, AMQP_BASIC_CONSUME_METHOD,
			   "more than %u consumers on this connection", s->cfg->max_consumers);
		return;
	}
	if (s->ncons == s->capcons) {
		uint16_t cap = s->capcons ? (uint16_t)(s->capcons * 2) : 2;
		struct consumer *a = realloc(s->cons, cap * sizeof(*a));
		if (!a) {
			conn_error(s, 541, AMQP_BASIC_CONSUME_METHOD, "out of memory");
			return;
		}
		s->cons = a;
		s->capcons = cap;
	}
	k = &s->cons[s->ncons++];
	memset(k, 0, sizeof(*k));
	k->id = ++s->next_cid;
	k->ch = c->id;
	k->gen = c->gen;
		k->no_ack = m->no_ack;
	k->prefetch = c->prefetch;
	if (m->consumer_tag.len) {
		k->tag_len = (uint8_t)m->consumer_tag.len;
		memcpy(k->tag, m->consumer_tag.bytes, m->consumer_tag.len);
	} else {
		k->tag_len = (uint8_t)snprintf(k->tag, sizeof(k->tag), "amq.ctag-vmproxy-%u", k->id);
	}
	c->pending = AMQP_BASIC_CONSUME_METHOD;
	c->pending_nowait = m->nowait;
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_CONSUME;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	ev.consumer_id = k->id;
	ev.prefetch = c->prefetch;
	ev.no_ack = m->no_ack;
	emit(s, &ev);
}

static void on_cancel(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_cancel_t *m;
	struct consumer *k;
	uint8_t tag[256];
	size_t tag_len;
	bool nowait;

	if (amqp_decode_method(AMQP_BASIC_CANCEL_METHOD, &s->pool, (amqp_bytes_t){ len, (void *)args },
			       (void **)&m) < 0) {
		conn_error(s, 501, AMQP_BASIC_CANCEL_METHOD, "cannot decode basic.cancel");
		return;
	}
	tag_len = m->consumer_tag.len > 255 ? 255 : m->consumer_tag.len;
	if (tag_len)
		memcpy(tag, m->consumer_tag.bytes, tag_len);
	nowait = m->nowait;
	k = cons_by_tag(s, (amqp_bytes_t){ tag_len, tag });
	if (k && k->ch == c->id && k->gen == c->gen) {
		if (!k->ready) {
			conn_error(s, 503, AMQP_BASIC_CANCEL_METHOD,
				   "basic.cancel before the consumer's basic.consume-ok");
			return;
		}
		cons_remove(s, (uint16_t)(k - s->cons));
	}
	/* As RabbitMQ: an unknown tag is cancelled all the same. */
	if (!nowait) {
		amqp_basic_cancel_ok_t ok = { .consumer_tag = { tag_len, tag } };
		send_method(s, c->id, AMQP_BASIC_CANCEL_OK_METHOD, &ok);
	}
}

/* Index of the delivery with TAG in C's list, or -1. */
static int64_t dlv_find(const struct chan *c, uint64_t tag)
{
	uint32_t lo = 0, hi = c->ndl;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		if (c->dl[mid].tag < tag)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < c->ndl && c->dl[lo].tag == tag ? (int64_t)lo : -1;
}

static void on_settle(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		      const uint8_t *args, size_t len)
{
	enum guest_settle_kind kind = GUEST_SETTLE_ACK;
	uint64_t tag;
	bool multiple = false, requeue = false;
	uint32_t from, to;
	void *m;

	if (amqp_decode_method(id, &s->pool, (amqp_bytes_t){ len, (void *)args }, &m) < 0) {
		conn_error(s, 501, id, "cannot decode %s", method_name(id));
		return;
	}
	if (id == AMQP_BASIC_ACK_METHOD) {
		tag = ((amqp_basic_ack_t *)m)->delivery_tag;
		multiple = ((amqp_basic_ack_t *)m)->multiple;
	} else if (id == AMQP_BASIC_NACK_METHOD) {
		kind = GUEST_SETTLE_NACK;
		tag = ((amqp_basic_nack_t *)m)->delivery_tag;
		multiple = ((amqp_basic_nack_t *)m)->multiple;
		requeue = ((amqp_basic_nack_t *)m)->requeue;
	} else {
		kind = GUEST_SETTLE_REJECT;
		tag = ((amqp_basic_reject_t *)m)->delivery_tag;
		requeue = ((amqp_basic_reject_t *)m)->requeue;
	}
	if (multiple && tag == 0) {
		from = 0;
		to = c->ndl; /* everything outstanding */
	} else {
		int64_t i = dlv_find(c, tag);
		if (i < 0) {
			chan_error(s, c, 406, id, "unknown delivery tag %llu", (unsigned long long)tag);
			return;
		}
		from = multiple ? 0 : (uint32_t)i;
		to = (uint32_t)i + 1;
	}
	for (uint32_t i = from; i < to; i++)
		emit_settle(s, c, &c->dl[i], kind, requeue);
	memmove(c->dl + from, c->dl + to, (c->ndl - to) * sizeof(*c->dl));
	c->ndl -= to - from;
	if (c->capdl > 64 && c->ndl == 0) {
		free(c->dl);
		c->dl = NULL;
		c->capdl = 0;
	}
}

static struct chan *answer_chan(struct guest_session *s, uint16_t channel, uint32_t gen,
				amqp_method_number_t want)
{
	struct chan *c = chan_find(s, channel);

	if (!c || c->gen != gen || c->closing || s->st != ST_RUNNING || c->pending != want)
		return NULL;
	c->pending = 0;
	return c;
}

void guest_session_declare_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t count, uint32_t consumers)
{
	struct chan *c = answer_chan(s, channel, channel_gen, AMQP_QUEUE_DECLARE_METHOD);

	if (!c)
		return;
	c->declared = true;
	if (!c->pending_nowait) {
		amqp_queue_declare_ok_t ok = { .queue = amqp_cstring_bytes(s->cfg->inbox_name),
					       .message_count = count,
					       .consumer_count = consumers };
		send_method(s, c->id, AMQP_QUEUE_DECLARE_OK_METHOD, &ok);
	}
}

void guest_session_consume_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t consumer_id)
{
	struct chan *c = answer_chan(s, channel, channel_gen, AMQP_BASIC_CONSUME_METHOD);
	struct consumer *k = cons_by_id(s, consumer_id, NULL);

	if (!c || !k)
		return;
	k->ready = true;
	if (!c->pending_nowait) {
		amqp_basic_consume_ok_t ok = { .consumer_tag = { k->tag_len, k->tag } };
		send_method(s, c->id, AMQP_BASIC_CONSUME_OK_METHOD, &ok);
	}
}

void guest_session_fail(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			uint16_t code, const char *text)
{
	struct chan *c = chan_find(s, channel);
	amqp_method_number_t id;
	const char *name = code_name(code);
	size_t n = strlen(name);

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING || !c->pending)
		return;
	id = c->pending;
	c->pending = 0;
	if (!text)
		text = "";
	/* The broker's text already starts with the code's name. */
	if (strncmp(text, name, n) == 0 && strncmp(text + n, " - ", 3) == 0)
		text += n + 3;
	chan_error(s, c, code, id, "%s", text);
}

void guest_session_cancel_consumer(struct guest_session *s, uint32_t consumer_id, const char *why)
{
	uint16_t i;
	struct consumer *k = cons_by_id(s, consumer_id, &i);
	struct chan *c;

	if (!k || s->st != ST_RUNNING)
		return;
	c = chan_find(s, k->ch);
	if (!c || c->gen != k->gen || c->closing)
		return;
	if (!k->ready) {
		/* Its basic.consume is still unanswered: that answer fails. */
		c->pending = AMQP_BASIC_CONSUME_METHOD;
		guest_session_fail(s, c->id, c->gen, 506, why);
		return;
	}
	if (!s->cap_cancel_notify) {
		chan_error(s, c, 506, AMQP_BASIC_CONSUME_METHOD, "%s", why);
		return;
	}
	amqp_basic_cancel_t m = { .consumer_tag = { k->tag_len, k->tag }, .nowait = 1 };
	send_method(s, c->id, AMQP_BASIC_CANCEL_METHOD, &m);
	cons_remove(s, i);
}

static void send_content(struct guest_session *s, uint16_t channel, amqp_bytes_t properties,
			 amqp_bytes_t body);

int64_t guest_session_get_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			     bool redelivered, amqp_bytes_t exchange, amqp_bytes_t routing_key,
			     uint32_t count, amqp_bytes_t properties, amqp_bytes_t body,
			     uint64_t up_tag, uint32_t up_gen)
{
	struct chan *c = chan_find(s, channel);
	amqp_basic_get_ok_t g;

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING ||
	    c->pending != AMQP_BASIC_GET_METHOD)
		return -ENOENT;
	if (12 + properties.len > s->frame_max - 8 || exchange.len > 255 || routing_key.len > 255)
		return -EMSGSIZE;
	if (!c->get_no_ack && c->ndl == c->capdl) {
		uint32_t cap = c->capdl ? c->capdl * 2 : 16;
		struct dlv *a = realloc(c->dl, cap * sizeof(*a));
		if (!a)
			return -ENOENT;
		c->dl = a;
		c->capdl = cap;
	}
	c->pending = 0;
	g.delivery_tag = ++c->dnext;
	g.redelivered = redelivered;
	g.exchange = exchange;
	g.routing_key = routing_key;
	g.message_count = count;
	send_method(s, channel, AMQP_BASIC_GET_OK_METHOD, &g);
	send_content(s, channel, properties, body);
	if (!c->get_no_ack)
		c->dl[c->ndl++] = (struct dlv){ .tag = c->dnext, .up_tag = up_tag, .up_gen = up_gen };
	return (int64_t)c->dnext;
}

void guest_session_get_empty(struct guest_session *s, uint16_t channel, uint32_t channel_gen)
{
	struct chan *c = answer_chan(s, channel, channel_gen, AMQP_BASIC_GET_METHOD);
	amqp_basic_get_empty_t e = { .cluster_id = amqp_empty_bytes };

	if (c)
		send_method(s, c->id, AMQP_BASIC_GET_EMPTY_METHOD, &e);
}

/* Content header and body frames of a message on CHANNEL. */
static void send_content(struct guest_session *s, uint16_t channel, amqp_bytes_t properties,
			 amqp_bytes_t body)
{
	size_t chunk = s->frame_max - 8;
	uint8_t h[7 + 12];

	h[0] = AMQP_FT_HEADER;
	amqp_frame_put16(h + 1, channel);
	amqp_frame_put32(h + 3, (uint32_t)(12 + properties.len));
	amqp_frame_put16(h + 7, AMQP_BASIC_CLASS);
	amqp_frame_put16(h + 9, 0);
	amqp_frame_put32(h + 11, (uint32_t)((uint64_t)body.len >> 32));
	amqp_frame_put32(h + 15, (uint32_t)body.len);
	out_raw(s, h, sizeof(h));
	out_raw(s, properties.bytes, properties.len);
	out_raw(s, (const uint8_t[]){ AMQP_FRAME_END_OCTET }, 1);
	for (size_t off = 0; off < body.len; off += chunk) {
		size_t len = body.len - off < chunk ? body.len - off : chunk;

		h[0] = AMQP_FT_BODY;
		amqp_frame_put32(h + 3, (uint32_t)len);
		out_raw(s, h, 7);
		out_raw(s, (const uint8_t *)body.bytes + off, len);
		out_raw(s, (const uint8_t[]){ AMQP_FRAME_END_OCTET }, 1);
	}
}

int64_t guest_session_deliver(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t consumer_id, bool redelivered, amqp_bytes_t exchange,
			      amqp_bytes_t routing_key, amqp_bytes_t properties, amqp_bytes_t body,
			      uint64_t up_tag, uint32_t up_gen)
{
	struct chan *c = chan_find(s, channel);
	struct consumer *k = cons_by_id(s, consumer_id, NULL);
	amqp_basic_deliver_t d;

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING || !k || !k->ready ||
	    k->ch != channel || k->gen != channel_gen)
		return -ENOENT;
	if (12 + properties.len > s->frame_max - 8 || exchange.len > 255 || routing_key.len > 255)
		return -EMSGSIZE;
	if (!k->no_ack) {
		if (c->ndl >= s->cfg->max_unacked)
			return -ENOSPC;
		if (c->ndl == c->capdl) {
			uint32_t cap = c->capdl ? c->capdl * 2 : 16;
			struct dlv *a = realloc(c->dl, cap * sizeof(*a));
			if (!a)
				return -ENOSPC;
			c->dl = a;
			c->capdl = cap;
		}
	}
	d.consumer_tag = (amqp_bytes_t){ k->tag_len, k->tag };
	d.delivery_tag = ++c->dnext;
	d.redelivered = redelivered;
	d.exchange = exchange;
	d.routing_key = routing_key;
	send_method(s, channel, AMQP_BASIC_DELIVER_METHOD, &d);
	send_content(s, channel, properties, body);
	if (!k->no_ack)
		c->dl[c->ndl++] = (struct dlv){ .tag = c->dnext, .up_tag = up_tag, .up_gen = up_gen,
						.cid = consumer_id };
	return (int64_t)c->dnext;
}

void guest_session_release_all(struct guest_session *s)
{
	for (uint16_t i = 0; i < s->nchans; i++)
		chan_release(s, s->chans[i]);
	while (s->ncons)
		cons_remove(s, (uint16_t)(s->ncons - 1));
}

void guest_session_detach_deliveries(struct guest_session *s,
				     void (*fn)(void *ud, uint64_t up_tag, uint32_t up_gen),
				     void *ud)
{
	for (uint16_t i = 0; i < s->nchans; i++) {
		struct chan *c = s->chans[i];

		for (uint32_t j = 0; j < c->ndl; j++) {
			if (c->dl[j].up_gen)
				fn(ud, c->dl[j].up_tag, c->dl[j].up_gen);
			c->dl[j].up_gen = 0;
		}
	}
}

void guest_session_foreach_consumer(struct guest_session *s,
				    void (*fn)(void *ud, uint16_t channel, uint32_t channel_gen,
					       uint32_t consumer_id, uint16_t prefetch, bool no_ack),
				    void *ud)
{
	for (uint16_t i = 0; i < s->ncons; i++)
		if (s->cons[i].ready)
			fn(ud, s->cons[i].ch, s->cons[i].gen, s->cons[i].id, s->cons[i].prefetch,
			   s->cons[i].no_ack);
}

uint32_t guest_session_unacked(const struct guest_session *s)
{
	uint32_t n = 0;

	for (uint16_t i = 0; i < s->nchans; i++)
		n += s->chans[i]->ndl;
	return n;
}

static void on_channel_method(struct guest_session *s, uint16_t ch, amqp_method_number_t id,
			      const uint8_t *args, size_t len)
{
	struct chan *c = chan_find(s, ch);

	if (c && c->closing) {
		/* Only the close handshake matters now (RabbitMQ drops the
		 * rest). Closes that crossed: both sides answer close-ok, and
		 * the channel waits for ours, as RabbitMQ does; but a client
		 * that reopens the number instead is taken to be done with it. */
		switch (id) {
		case AMQP_CHANNEL_CLOSE_METHOD: {
			amqp_channel_close_ok_t ok = { 0 };
			send_method(s, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
			if (!c->crossed)
				chan_emit_closed(s, c);
			c->crossed = true;
			return;
		}
		case AMQP_CHANNEL_CLOSE_OK_METHOD:
			if (!c->crossed)
				chan_emit_closed(s, c);
			chan_free(s, c);
			return;
		case AMQP_CHANNEL_OPEN_METHOD:
			if (!c->crossed)
				return;
			chan_free(s, c);
			c = NULL;
			break;
		default:
			return;
		}
	}
	if (id == AMQP_CHANNEL_OPEN_METHOD) {
		amqp_channel_open_ok_t ok;

		if (c) {
			conn_error(s, 504, id, "second 'channel.open' seen");
			return;
		}
		if (ch > s->channel_max) {
			conn_error(s, 530, id, "channel number %u above the negotiated channel_max (%u)",
				   ch, s->channel_max);
			return;
		}
		c = chan_new(s, ch);
		if (!c) {
			conn_error(s, 541, id, "out of memory");
			return;
		}
		ok.channel_id = amqp_cstring_bytes("");
		send_method(s, ch, AMQP_CHANNEL_OPEN_OK_METHOD, &ok);
		return;
	}
	if (!c) {
		conn_error(s, 504, id, "expected 'channel.open'");
		return;
	}
	if (c->pub == PUB_HEADER) {
		conn_error(s, 505, id, "expected content header for class 60, got non content "
				       "header frame instead");
		return;
	}
	if (c->pub == PUB_BODY) {
		conn_error(s, 505, id, "expected content body, got non content body frame instead");
		return;
	}
	switch (id) {
	case AMQP_CHANNEL_CLOSE_METHOD: {
		amqp_channel_close_ok_t ok = { 0 };
		send_method(s, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		chan_emit_closed(s, c);
		chan_free(s, c);
		return;
	}
	case AMQP_CHANNEL_CLOSE_OK_METHOD:
		return;
	case AMQP_CHANNEL_FLOW_METHOD: {
		amqp_channel_flow_t *m;
		amqp_bytes_t b = { len, (void *)args };
		if (amqp_decode_method(id, &s->pool, b, (void **)&m) < 0) {
			conn_error(s, 501, id, "cannot decode channel.flow");
			return;
		}
		amqp_channel_flow_ok_t ok = { .active = 1 };
		/* As RabbitMQ since 3.3: a client cannot stop the server. */
		if (!m->active) {
			conn_error(s, 540, id, "active=false");
			return;
		}
		send_method(s, ch, AMQP_CHANNEL_FLOW_OK_METHOD, &ok);
		return;
	}
	case AMQP_CONFIRM_SELECT_METHOD: {
		amqp_confirm_select_t *m;
		amqp_bytes_t b = { len, (void *)args };
		if (amqp_decode_method(id, &s->pool, b, (void **)&m) < 0) {
			conn_error(s, 501, id, "cannot decode confirm.select");
			return;
		}
		c->confirm = true;
		if (!m->nowait) {
			amqp_confirm_select_ok_t ok = { 0 };
			send_method(s, ch, AMQP_CONFIRM_SELECT_OK_METHOD, &ok);
		}
		return;
	}
	case AMQP_BASIC_QOS_METHOD: {
		amqp_basic_qos_t *m;
		amqp_bytes_t b = { len, (void *)args };
		amqp_basic_qos_ok_t ok = { 0 };
		if (amqp_decode_method(id, &s->pool, b, (void **)&m) < 0) {
			conn_error(s, 501, id, "cannot decode basic.qos");
			return;
		}
		if (m->prefetch_size != 0) {
			conn_error(s, 540, id, "prefetch_size!=0 (%u)", m->prefetch_size);
			return;
		}
		c->prefetch = m->prefetch_count;
		send_method(s, ch, AMQP_BASIC_QOS_OK_METHOD, &ok);
		return;
	}
	case AMQP_BASIC_PUBLISH_METHOD:
		on_publish(s, c, args, len);
		return;
	case AMQP_EXCHANGE_DECLARE_METHOD:
		on_exchange_declare(s, c, args, len);
		return;
	case AMQP_BASIC_ACK_METHOD:
	case AMQP_BASIC_NACK_METHOD:
	case AMQP_BASIC_REJECT_METHOD:
		on_settle(s, c, id, args, len);
		return;
	case AMQP_QUEUE_DECLARE_METHOD:
		on_queue_declare(s, c, args, len);
		return;
	case AMQP_BASIC_CONSUME_METHOD:
		on_consume(s, c, args, len);
		return;
	case AMQP_BASIC_CANCEL_METHOD:
		on_cancel(s, c, args, len);
		return;
	case AMQP_BASIC_GET_METHOD:
		on_get(s, c, args, len);
		return;
	case AMQP_BASIC_RECOVER_METHOD:
	case AMQP_BASIC_RECOVER_ASYNC_METHOD:
		on_recover(s, c, id, args, len);
		return;
	case AMQP_TX_SELECT_METHOD:
	case AMQP_TX_COMMIT_METHOD:
	case AMQP_TX_ROLLBACK_METHOD:
		conn_error(s, 540, id, "%s not supported by this proxy", method_name(id));
		return;
	}
	if (refused_method(id)) {
		chan_error(s, c, 403, id, "%s is not permitted through this proxy: guests may "
					  "only publish", method_name(id));
		return;
	}
	conn_error(s, 540, id, "method %s (%u,%u) not implemented", method_name(id), id >> 16,
		   id & 0xffff);
}

static void on_method(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len)
{
	amqp_method_number_t id;

	if (len < 4) {
		conn_error(s, 501, 0, "type 1, method frame of %zu octets", len);
		return;
	}
	id = amqp_frame_get32(p);
	p += 4;
	len -= 4;
	if (s->st == ST_CLOSING) {
		if (ch == 0 && id == AMQP_CONNECTION_CLOSE_OK_METHOD) {
			s->st = ST_CLOSED;
			emit_closed(s);
		} else if (ch == 0 && id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_ok_t ok = { 0 };
			send_method(s, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
			s->st = ST_CLOSED;
			emit_closed(s);
		}
		return;
	}
	if (ch == 0) {
		static const amqp_method_number_t expect[] = {
			[ST_START_OK] = AMQP_CONNECTION_START_OK_METHOD,
			[ST_TUNE_OK] = AMQP_CONNECTION_TUNE_OK_METHOD,
			[ST_OPEN] = AMQP_CONNECTION_OPEN_METHOD,
		};
		/* rabbit_reader's names for these states */
		static const char *const state_name[] = {
			[ST_START_OK] = "starting",
			[ST_TUNE_OK] = "tuning",
			[ST_OPEN] = "opening",
			[ST_RUNNING] = "running",
		};

		if (id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_t *m;
			amqp_bytes_t b = { len, (void *)p };
			amqp_connection_close_ok_t ok = { 0 };

			s->close_code = 200;
			snprintf(s->close_text, sizeof(s->close_text), "closed by the client");
			if (amqp_decode_method(id, &s->pool, b, (void **)&m) == 0) {
				s->close_code = m->reply_code;
				snprintf(s->close_text, sizeof(s->close_text), "closed by the client: %.*s",
					 (int)(m->reply_text.len > 100 ? 100 : m->reply_text.len),
					 (const char *)m->reply_text.bytes);
			}
			send_method(s, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
			s->st = ST_CLOSED;
			emit_closed(s);
			return;
		}
		if (s->st != ST_RUNNING) {
			if (id != expect[s->st]) {
				conn_error(s, 504, id, "unexpected method in connection state %s",
					   state_name[s->st]);
				return;
			}
			if (s->st == ST_START_OK)
				on_start_ok(s, p, len);
			else if (s->st == ST_TUNE_OK)
				on_tune_ok(s, p, len);
			else
				on_open(s, p, len);
			return;
		}
		switch (id) {
		case AMQP_CONNECTION_CLOSE_OK_METHOD:
		case AMQP_CONNECTION_BLOCKED_METHOD:
		case AMQP_CONNECTION_UNBLOCKED_METHOD:
			return;
		}
		conn_error(s, 504, id, "unexpected method in connection state %s",
			   state_name[s->st]);
		return;
	}
	if (s->st != ST_RUNNING) {
		/* rabbit_reader: frames on channels before "running" are
		 * unexpected frames. */
		conn_error(s, 505, id, "type 1 on channel %u before connection.open", ch);
		return;
	}
	on_channel_method(s, ch, id, p, len);
}

/* The channel a content frame (expected in state WANT) belongs to, or
 * NULL when the frame is answered with an error or dropped because the
 * channel is closing. Codes and texts are rabbit_command_assembler's: a
 * content frame where a method was expected (channel 0, a channel not
 * open, no publish pending) is 505 like one out of order. */
static struct chan *content_chan(struct guest_session *s, uint16_t ch, enum pub_state want)
{
	struct chan *c = ch != 0 ? chan_find(s, ch) : NULL;

	if (c && c->closing)
		return NULL;
	if (!c || c->pub == PUB_NONE) {
		conn_error(s, 505, 0, "expected method frame, got non method frame instead");
		return NULL;
	}
	if (c->pub != want) {
		if (c->pub == PUB_HEADER)
			conn_error(s, 505, AMQP_BASIC_PUBLISH_METHOD,
				   "expected content header for class 60, got non content header "
				   "frame instead");
		else
			conn_error(s, 505, AMQP_BASIC_PUBLISH_METHOD,
				   "expected content body, got non content body frame instead");
		return NULL;
	}
	return c;
}

/* Content header: class u16, weight u16, body size u64, flags + list. */
static void on_header(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len)
{
	struct chan *c = content_chan(s, ch, PUB_HEADER);
	amqp_basic_properties_t *props;
	amqp_bytes_t raw;
	uint16_t flags;
	size_t off, n;

	if (!c)
		return;
	if (len < 12) {
		conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD, "type 2, content header of %zu octets",
			   len);
		return;
	}
	if (amqp_frame_get16(p) != AMQP_BASIC_CLASS) {
		conn_error(s, 505, AMQP_BASIC_PUBLISH_METHOD,
			   "expected content header for class 60, got one for class %u instead",
			   amqp_frame_get16(p));
		return;
	}
	if (len < 14)
		goto bad; /* no property flags */
	c->body_size = amqp_frame_get64(p + 4);
	if (c->body_size > s->cfg->max_message_bytes) {
		chan_error(s, c, 406, AMQP_BASIC_PUBLISH_METHOD,
			   "message size %llu is larger than configured max size %llu",
			   (unsigned long long)c->body_size,
			   (unsigned long long)s->cfg->max_message_bytes);
		return;
	}
	raw.bytes = (void *)(p + 12);
	raw.len = len - 12;
	/* Property flags: basic's 14 properties fit in one word, so the
	 * continuation bit is malformed. It must be refused, not ignored:
	 * rabbitmq-c would read more flag words (shifting them past 32 bits)
	 * and find a headers table where this scan did not check one. */
	flags = amqp_frame_get16(p + 12);
	if (flags & 0x0001)
		goto bad;
	off = 14;
	if (flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
		if (amqp_frame_skip_shortstr(p + off, len - off, &n) < 0)
			goto bad;
		off += n;
	}
	if (flags & AMQP_BASIC_CONTENT_ENCODING_FLAG) {
		if (amqp_frame_skip_shortstr(p + off, len - off, &n) < 0)
			goto bad;
		off += n;
	}
	if (flags & AMQP_BASIC_HEADERS_FLAG) {
		int r = amqp_frame_check_table_prefixed(p + off, len - off, s->cfg->max_table_depth,
							&n);
		if (r == -ELOOP) {
			conn_error(s, 502, AMQP_BASIC_PUBLISH_METHOD,
				   "message headers nested deeper than %u levels",
				   s->cfg->max_table_depth);
			return;
		}
		if (r < 0)
			goto bad;
	}
	if (amqp_decode_properties(AMQP_BASIC_CLASS, &s->pool, raw, (void **)&props) < 0)
		goto bad;
	if (!meta_reserve(c, (size_t)c->exchange_len + c->rk_len + raw.len)) {
		conn_error(s, 541, AMQP_BASIC_PUBLISH_METHOD, "out of memory");
		return;
	}
	memcpy(c->meta + c->exchange_len + c->rk_len, raw.bytes, raw.len);
	c->props_len = (uint32_t)raw.len;
	c->body_got = 0;
	c->pub = PUB_BODY;
	if (c->body_size == 0)
		complete_publish(s, c);
	return;
bad:
	conn_error(s, 502, AMQP_BASIC_PUBLISH_METHOD, "malformed content header properties");
}

static void on_body(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len)
{
	struct chan *c = content_chan(s, ch, PUB_BODY);

	if (!c)
		return;
	if (len == 0)
		return; /* an empty body frame adds nothing */
	if (len > c->body_size - c->body_got) {
		conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD,
			   "content body exceeds the declared size %llu",
			   (unsigned long long)c->body_size);
		return;
	}
	if (c->body_got + len > c->body_cap) {
		/* Grow with what arrives, not with what was declared. */
		uint64_t cap = c->body_cap ? c->body_cap : 4096;
		uint8_t *nb;

		while (cap < c->body_got + len)
			cap *= 2;
		if (cap > c->body_size)
			cap = c->body_size;
		nb = realloc(c->body, (size_t)cap);
		if (!nb) {
			conn_error(s, 541, AMQP_BASIC_PUBLISH_METHOD, "out of memory");
			return;
		}
		c->body = nb;
		c->body_cap = cap;
	}
	memcpy(c->body + c->body_got, p, len);
	c->body_got += len;
	if (c->body_got == c->body_size)
		complete_publish(s, c);
}

static void on_frame(struct guest_session *s, uint8_t type, uint16_t ch, const uint8_t *p,
		     size_t len)
{
	if (s->st == ST_CLOSING && type != AMQP_FT_METHOD)
		return;
	if (s->st != ST_RUNNING && s->st != ST_CLOSING && type != AMQP_FT_METHOD &&
	    type != AMQP_FT_HEARTBEAT) {
		conn_error(s, 505, 0, "unexpected frame type %u during the handshake", type);
		return;
	}
	switch (type) {
	case AMQP_FT_METHOD:
		on_method(s, ch, p, len);
		break;
	case AMQP_FT_HEADER:
		on_header(s, ch, p, len);
		break;
	case AMQP_FT_BODY:
		on_body(s, ch, p, len);
		break;
	case AMQP_FT_HEARTBEAT:
		/* The spec's rule (501) for heartbeats on a channel; RabbitMQ
		 * answers those 505. A heartbeat with a payload is unknown to
		 * RabbitMQ's frame analysis: 501. */
		if (ch != 0)
			conn_error(s, 501, 0, "heartbeat frame on channel %u", ch);
		else if (len != 0)
			conn_error(s, 501, 0, "type 8, heartbeat frame with a %zu-byte payload", len);
		break;
	default:
		conn_error(s, 501, 0, "unknown frame type %u", type);
		break;
	}
	/* Keep one page for the next frame; give back what a large table
	 * needed, so that idle sessions stay small. */
	if (s->pool.pages.num_blocks > 1)
		empty_amqp_pool(&s->pool);
	else
		recycle_amqp_pool(&s->pool);
}

/* ---- input ----------------------------------------------------------------- */

/* Consume complete frames from P (N bytes); returns how many were used. */
static size_t parse(struct guest_session *s, const uint8_t *p, size_t n)
{
	size_t used = 0;

	while (s->st != ST_CLOSED) {
		const uint8_t *f = p + used;
		size_t avail = n - used;
		uint32_t size;

		if (s->st == ST_HEADER) {
			if (avail < 8)
				break;
			used += 8;
			if (memcmp(f, protocol_header, 8) != 0 &&
			    memcmp(f, protocol_header_09, 8) != 0) {
				out_raw(s, protocol_header, 8);
				s->close_code = 0;
				snprintf(s->close_text, sizeof(s->close_text),
					 "bad protocol header: not AMQP 0-9-1");
				s->st = ST_CLOSED;
				emit_closed(s);
				break;
			}
			send_start(s);
			s->st = ST_START_OK;
			continue;
		}
		if (avail < AMQP_FRAME_HEADER_SIZE)
			break;
		size = amqp_frame_get32(f + 3);
		if (size > s->frame_max - 8) {
			conn_error(s, 501, 0, "type %u, frame_too_large: %u > %u", f[0], size,
				   s->frame_max - 8);
			s->lost_sync = true;
			break;
		}
		if (avail < (size_t)size + 8)
			break;
		if (f[7 + size] != AMQP_FRAME_END_OCTET) {
			conn_error(s, 501, 0, "type %u, invalid_frame_end_marker: %u", f[0],
				   f[7 + size]);
			s->lost_sync = true;
			break;
		}
		used += (size_t)size + 8;
		on_frame(s, f[0], amqp_frame_get16(f + 1), f + 7, size);
	}
	if (s->st == ST_CLOSED || s->lost_sync)
		used = n;
	return used;
}

/* Bytes the partial frame at P (N buffered) needs before it can be
 * parsed: the protocol header, a frame header, or the whole frame. A frame
 * header announcing an oversized frame needs nothing more: parse() refuses
 * it as it is. */
static size_t frame_need(const struct guest_session *s, const uint8_t *p, size_t n)
{
	uint32_t size;

	if (s->st == ST_HEADER)
		return 8;
	if (n < AMQP_FRAME_HEADER_SIZE)
		return AMQP_FRAME_HEADER_SIZE;
	size = amqp_frame_get32(p + 3);
	if (size > s->frame_max - 8)
		return AMQP_FRAME_HEADER_SIZE;
	return (size_t)size + 8;
}

/* Room for N buffered input bytes; the buffer grows with what arrived, so
 * a guest that trickles a large frame costs only what it sent. */
static bool in_reserve(struct guest_session *s, size_t n)
{
	size_t cap = s->in_cap ? s->in_cap : 256;
	uint8_t *b;

	if (n <= s->in_cap)
		return true;
	while (cap < n)
		cap *= 2;
	b = realloc(s->in, cap);
	if (!b)
		return false;
	s->in = b;
	s->in_cap = cap;
	return true;
}

int guest_session_feed(struct guest_session *s, const void *data, size_t len, uint64_t now_ms)
{
	const uint8_t *p = data;

	s->now_ms = now_ms;
	if (len)
		s->last_rx_ms = now_ms;
	if (s->st == ST_CLOSED)
		return -EPROTO;
	s->lost_sync = false;
	/* Whole frames are parsed in place; only the one frame that straddles
	 * two feeds is copied, and the buffer never holds more than it. */
	while (len > 0 && s->st != ST_CLOSED && !s->lost_sync) {
		size_t need, take, used;

		if (s->in_len == 0) {
			used = parse(s, p, len);
			p += used;
			len -= used;
			if (len == 0 || s->st == ST_CLOSED || s->lost_sync)
				break;
		}
		need = frame_need(s, s->in, s->in_len);
		take = need - s->in_len < len ? need - s->in_len : len;
		if (!in_reserve(s, s->in_len + take)) {
			drop(s, "out of memory");
			break;
		}
		memcpy(s->in + s->in_len, p, take);
		s->in_len += take;
		p += take;
		len -= take;
		if (s->in_len < frame_need(s, s->in, s->in_len))
			continue; /* a frame header completed: now its payload */
		used = parse(s, s->in, s->in_len);
		if (used != s->in_len && s->st != ST_CLOSED) {
			/* Cannot happen: the buffer holds exactly one frame. */
			conn_error(s, 501, 0, "frame larger than the input buffer");
			break;
		}
		s->in_len = 0;
	}
	if (s->in_len == 0 && s->in_cap > 1024) {
		free(s->in); /* idle connections keep no large input buffer */
		s->in = NULL;
		s->in_cap = 0;
	}
	return s->st == ST_CLOSING || s->st == ST_CLOSED ? -EPROTO : 0;
}

/* ---- timers, output, control --------------------------------------------- */

/* Milliseconds from THEN to NOW; 0 if the caller's clock went backwards
 * between two calls (a tick with an older "now" than the last feed). */
static uint64_t since(uint64_t now, uint64_t then)
{
	return now > then ? now - then : 0;
}

uint64_t guest_session_tick(struct guest_session *s, uint64_t now_ms)
{
	uint64_t next = UINT64_MAX;

	s->now_ms = now_ms;
	switch (s->st) {
	case ST_HEADER:
	case ST_START_OK:
	case ST_TUNE_OK:
	case ST_OPEN:
		if (since(now_ms, s->created_ms) >= s->cfg->handshake_timeout_ms) {
			s->close_code = 0;
			snprintf(s->close_text, sizeof(s->close_text),
				 "handshake not completed within %u ms", s->cfg->handshake_timeout_ms);
			s->st = ST_CLOSED;
			emit_closed(s);
			return UINT64_MAX;
		}
		return s->created_ms + s->cfg->handshake_timeout_ms;
	case ST_RUNNING:
		break;
	case ST_CLOSING:
		if (now_ms >= s->close_deadline) {
			s->st = ST_CLOSED;
			emit_closed(s);
			return UINT64_MAX;
		}
		return s->close_deadline;
	case ST_CLOSED:
		return UINT64_MAX;
	}
	if (s->heartbeat) {
		uint64_t hb = (uint64_t)s->heartbeat * 1000, hb_due;

		if (!s->rx_paused && since(now_ms, s->last_rx_ms) >= 2 * hb) {
			s->close_code = 0;
			snprintf(s->close_text, sizeof(s->close_text),
				 "missed heartbeats from client, timeout: %us", s->heartbeat);
			s->st = ST_CLOSED;
			s->out_off = s->out_len = 0;
			emit_closed(s);
			return UINT64_MAX;
		}
		if (since(now_ms, s->last_tx_ms) >= hb / 2 && s->out_len == s->out_off) {
			send_heartbeat(s);
			s->last_tx_ms = now_ms; /* queued; counted as sent */
		}
		/* With output pending the guest gets bytes once it reads: check
		 * again in half an interval rather than at a time now past. */
		hb_due = s->last_tx_ms + hb / 2;
		if (hb_due <= now_ms)
			hb_due = now_ms + hb / 2;
		next = s->rx_paused ? UINT64_MAX : s->last_rx_ms + 2 * hb;
		if (hb_due < next)
			next = hb_due;
	}
	return next;
}

size_t guest_session_output(struct guest_session *s, const void **data)
{
	static const uint8_t nothing;

	flush_due_acks(s);
	if (s->out_len == s->out_off) {
		/* s->out may be NULL: no arithmetic on it; callers still get a
		 * valid pointer for their zero-length copies. */
		*data = &nothing;
		return 0;
	}
	*data = s->out + s->out_off;
	return s->out_len - s->out_off;
}

void guest_session_output_consumed(struct guest_session *s, size_t n, uint64_t now_ms)
{
	s->now_ms = now_ms;
	if (n > s->out_len - s->out_off)
		n = s->out_len - s->out_off;
	s->out_off += n;
	if (n)
		s->last_tx_ms = now_ms;
	if (s->out_off == s->out_len) {
		s->out_off = s->out_len = 0;
		if (s->out_cap > 4096) {
			free(s->out); /* idle connections keep no large output buffer */
			s->out = NULL;
			s->out_cap = 0;
		}
	}
}

int guest_session_settle(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			 uint64_t delivery_tag, bool ack)
{
	struct chan *c = chan_find(s, channel);

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING)
		return 0;
	if (!c->confirm || delivery_tag < c->low || delivery_tag > c->next_tag ||
	    c->win[delivery_tag % c->cap] != 0)
		return -ENOENT;
	c->win[delivery_tag % c->cap] = ack ? 1 : 2;
	c->acks_due = true;
	s->acks_due = true;
	return 0;
}

void guest_session_return(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			  uint16_t code, const char *text, amqp_bytes_t exchange,
			  amqp_bytes_t routing_key, amqp_bytes_t properties, amqp_bytes_t body)
{
	struct chan *c = chan_find(s, channel);
	amqp_basic_return_t r = { .reply_code = code, .reply_text = amqp_cstring_bytes(text),
				  .exchange = exchange, .routing_key = routing_key };
	size_t chunk = s->frame_max - 8;

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING ||
	    12 + properties.len > chunk)
		return;
	send_method(s, channel, AMQP_BASIC_RETURN_METHOD, &r);
	send_content(s, channel, properties, body);
}

void guest_session_close(struct guest_session *s, uint16_t code, const char *text)
{
	switch (s->st) {
	case ST_RUNNING:
	case ST_START_OK:
	case ST_TUNE_OK:
	case ST_OPEN:
		conn_close_with(s, code, 0, text ? text : code_name(code));
		break;
	case ST_HEADER:
		s->close_code = code;
		snprintf(s->close_text, sizeof(s->close_text), "%s", text ? text : "");
		s->st = ST_CLOSED;
		emit_closed(s);
		break;
	case ST_CLOSING:
	case ST_CLOSED:
		break;
	}
}

void guest_session_set_blocked(struct guest_session *s, bool blocked, const char *reason)
{
	if (!s->cap_blocked || s->st != ST_RUNNING || s->blocked_sent == blocked)
		return;
	s->blocked_sent = blocked;
	if (blocked) {
		amqp_connection_blocked_t m = {
			.reason = amqp_cstring_bytes(reason ? reason : "blocked"),
		};
		send_method(s, 0, AMQP_CONNECTION_BLOCKED_METHOD, &m);
	} else {
		amqp_connection_unblocked_t m = { 0 };
		send_method(s, 0, AMQP_CONNECTION_UNBLOCKED_METHOD, &m);
	}
}

bool guest_session_wants_read(const struct guest_session *s)
{
	if (s->st == ST_CLOSING || s->st == ST_CLOSED)
		return false;
	if (s->out_len - s->out_off > s->cfg->max_output_bytes / 2)
		return false;
	for (uint16_t i = 0; i < s->nchans; i++)
		if (s->chans[i]->confirm &&
		    chan_unconfirmed(s->chans[i]) >= s->cfg->max_unconfirmed)
			return false;
	return true;
}

void guest_session_set_reading(struct guest_session *s, bool reading, uint64_t now_ms)
{
	if (s->rx_paused == !reading)
		return;
	s->rx_paused = !reading;
	if (reading)
		s->last_rx_ms = now_ms;
}

bool guest_session_done(const struct guest_session *s)
{
	return s->st == ST_CLOSED && s->out_len == s->out_off;
}

const char *guest_session_user(const struct guest_session *s)
{
	return s->user;
}

bool guest_session_is_open(const struct guest_session *s)
{
	return s->st == ST_RUNNING;
}
