/* upstream_proto.c -- see upstream_proto.h.
 *
 * Output is one growing buffer: the owner writes it with as few TLS writes
 * as the data needs (a whole loop iteration's publishes at once), which is
 * the point of owning the frame layer. Input frames are parsed in place
 * from what the owner read; only a frame split across reads is copied. */
#include "upstream_proto.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"
#include "field.h"
#include "log.h"

#define HEADER_FRAME_FIXED 12 /* class u16, weight u16, body size u64 */
#define OUT_KEEP	   (256u << 10) /* larger idle output buffers are given back */

static const uint8_t protocol_header[8] = { 'A', 'M', 'Q', 'P', 0, 0, 9, 1 };

static const char *state_name(enum upstream_proto_state st)
{
	static const char *const names[] = {
		[UPSTREAM_PROTO_START] = "waiting for connection.start",
		[UPSTREAM_PROTO_TUNE] = "waiting for connection.tune",
		[UPSTREAM_PROTO_OPEN] = "waiting for connection.open-ok",
		[UPSTREAM_PROTO_CHANNEL_OPEN] = "waiting for channel.open-ok",
		[UPSTREAM_PROTO_SELECT] = "waiting for confirm.select-ok",
		[UPSTREAM_PROTO_READY] = "publishing",
		[UPSTREAM_PROTO_CLOSING] = "closing",
		[UPSTREAM_PROTO_CLOSED] = "closed",
	};
	return names[st];
}

/* ---- output ------------------------------------------------------------------ */

static bool out_reserve(struct upstream_proto *p, size_t n)
{
	size_t pending = p->out_len - p->out_off;
	size_t cap;
	uint8_t *o;

	if (p->out_off > 0 && p->out_len + n > p->out_cap) {
		memmove(p->out, p->out + p->out_off, pending);
		p->out_len = pending;
		p->out_off = 0;
	}
	if (p->out_len + n <= p->out_cap)
		return true;
	cap = p->out_cap ? p->out_cap : 16384;
	while (cap < p->out_len + n)
		cap *= 2;
	o = realloc(p->out, cap);
	if (!o)
		return false;
	p->out = o;
	p->out_cap = cap;
	return true;
}

static void fail(struct upstream_proto *p, uint16_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void put_frame_header(uint8_t *b, uint8_t type, uint16_t ch, uint32_t size)
{
	b[0] = type;
	amqp_frame_put16(b + 1, ch);
	amqp_frame_put32(b + 3, size);
}

/* Append METHOD_ID with DECODED arguments as a method frame on CH. */
static int send_method(struct upstream_proto *p, uint16_t ch, amqp_method_number_t id,
		       void *decoded)
{
	size_t room = 4096;
	uint8_t *b;
	int n;

	for (;;) {
		if (!out_reserve(p, room + 12))
			return -ENOMEM;
		b = p->out + p->out_len;
		n = amqp_encode_method(id, decoded, (amqp_bytes_t){ room, b + 11 });
		if (n != AMQP_STATUS_BAD_AMQP_DATA || room >= p->frame_max)
			break;
		room *= 4; /* a large client-properties table */
	}
	if (n < 0)
		return -EINVAL;
	put_frame_header(b, AMQP_FT_METHOD, ch, (uint32_t)n + 4);
	amqp_frame_put32(b + 7, id);
	b[11 + n] = AMQP_FRAME_END_OCTET;
	p->out_len += (size_t)n + 12;
	return 0;
}

static void send_heartbeat(struct upstream_proto *p)
{
	static const uint8_t hb[8] = { AMQP_FT_HEARTBEAT, 0, 0, 0, 0, 0, 0, AMQP_FRAME_END_OCTET };

	if (out_reserve(p, sizeof(hb))) {
		memcpy(p->out + p->out_len, hb, sizeof(hb));
		p->out_len += sizeof(hb);
	}
}

/* End the link with CODE: connection.close queued unless the broker already
 * closed it or the handshake has not got that far. */
static void fail(struct upstream_proto *p, uint16_t code, const char *fmt, ...)
{
	va_list ap;

	if (p->st == UPSTREAM_PROTO_CLOSED)
		return;
	va_start(ap, fmt);
	vsnprintf(p->error, sizeof(p->error), fmt, ap);
	va_end(ap);
	p->error_code = code;
	if (code && !p->close_received && p->st > UPSTREAM_PROTO_START &&
	    p->st != UPSTREAM_PROTO_CLOSING) {
		amqp_connection_close_t cl = { .reply_code = code,
					       .reply_text = amqp_cstring_bytes(p->error) };
		send_method(p, 0, AMQP_CONNECTION_CLOSE_METHOD, &cl);
	}
	p->st = UPSTREAM_PROTO_CLOSED;
}

/* ---- handshake ---------------------------------------------------------------- */

static bool offers(amqp_bytes_t list, const char *mech)
{
	size_t n = strlen(mech);
	const char *s = list.bytes, *end = s + list.len;

	while (s < end) {
		const char *sp = memchr(s, ' ', (size_t)(end - s));
		size_t len = (size_t)((sp ? sp : end) - s);

		if (len == n && memcmp(s, mech, n) == 0)
			return true;
		s += len + 1;
	}
	return false;
}

static void on_start(struct upstream_proto *p, const amqp_connection_start_t *m)
{
	const struct upstream_proto_config *c = p->cfg;
	const char *mech = c->mechanism == BROKER_AUTH_EXTERNAL ? "EXTERNAL" : "PLAIN";
	amqp_table_entry_t caps[] = {
		field_bool("connection.blocked", true),
		field_bool("authentication_failure_close", true),
		field_bool("publisher_confirms", true),
		field_bool("basic.nack", true),
		field_bool("consumer_cancel_notify", true),
	};
	amqp_table_entry_t props[5];
	amqp_connection_start_ok_t ok;
	char resp[1024];
	int n = 0, rlen = 0;

	if (m->version_major != 0 || m->version_minor != 9) {
		fail(p, 0, "broker speaks AMQP %u-%u, not 0-9-1", m->version_major,
		     m->version_minor);
		return;
	}
	if (!offers(m->mechanisms, mech)) {
		char offered[110];
		fail(p, 0, "broker does not offer the %s mechanism (offers \"%s\")", mech,
		     log_sanitize(offered, sizeof(offered), m->mechanisms.bytes,
				  (unsigned)m->mechanisms.len));
		return;
	}
	props[n++] = field_table("capabilities", caps, (int)(sizeof(caps) / sizeof(caps[0])));
	if (c->connection_name)
		props[n++] = field_utf8("connection_name", c->connection_name);
	props[n++] = field_utf8("product", c->product ? c->product : "vmproxyd");
	props[n++] = field_utf8("version", VMPROXY_VERSION);
	props[n++] = field_utf8("platform", "C");
	if (c->mechanism == BROKER_AUTH_PLAIN) {
		/* "\0user\0password" */
		rlen = snprintf(resp, sizeof(resp), "%c%s%c%s", 0, c->user ? c->user : "guest", 0,
				c->password ? c->password : "guest");
		if (rlen < 0 || (size_t)rlen >= sizeof(resp)) {
			fail(p, 0, "PLAIN user name and password too long");
			return;
		}
	}
	/* EXTERNAL: the broker takes the name from the client certificate. */
	ok.client_properties = (amqp_table_t){ n, props };
	ok.mechanism = amqp_cstring_bytes(mech);
	ok.response = (amqp_bytes_t){ (size_t)rlen, resp };
	ok.locale = amqp_cstring_bytes("en_US");
	if (send_method(p, 0, AMQP_CONNECTION_START_OK_METHOD, &ok) < 0) {
		fail(p, 0, "cannot encode connection.start-ok");
		return;
	}
	p->st = UPSTREAM_PROTO_TUNE;
}

static void on_tune(struct upstream_proto *p, const amqp_connection_tune_t *m, uint64_t now)
{
	amqp_connection_tune_ok_t ok;
	amqp_connection_open_t op = { 0 };
	uint16_t hb = p->cfg->heartbeat;

	if (m->frame_max != 0 && m->frame_max < AMQP_FRAME_MIN_SIZE) {
		fail(p, 530, "broker's frame_max %u is below the minimum %u", m->frame_max,
		     AMQP_FRAME_MIN_SIZE);
		return;
	}
	p->frame_max = UPSTREAM_PROTO_FRAME_MAX;
	if (m->frame_max != 0 && m->frame_max < p->frame_max)
		p->frame_max = m->frame_max;
	/* As rabbitmq-c: the broker's interval when shorter than ours. */
	if (hb && m->heartbeat && m->heartbeat < hb)
		hb = m->heartbeat;
	p->heartbeat = hb;
	ok.channel_max = m->channel_max && m->channel_max < 16 ? m->channel_max : 16;
	ok.frame_max = p->frame_max;
	ok.heartbeat = hb;
	op.virtual_host = amqp_cstring_bytes(p->cfg->vhost ? p->cfg->vhost : "/");
	op.capabilities = amqp_cstring_bytes("");
	if (send_method(p, 0, AMQP_CONNECTION_TUNE_OK_METHOD, &ok) < 0 ||
	    send_method(p, 0, AMQP_CONNECTION_OPEN_METHOD, &op) < 0) {
		fail(p, 0, "out of memory");
		return;
	}
	p->last_rx_ms = now;
	p->st = UPSTREAM_PROTO_OPEN;
}

/* ---- returned messages ---------------------------------------------------------- */

static void ret_reset(struct upstream_proto *p)
{
	free(p->ret.meta);
	free(p->ret.body);
	memset(&p->ret, 0, sizeof(p->ret));
}

static void ret_deliver(struct upstream_proto *p)
{
	struct upstream_proto_return r = {
		.code = p->ret.code,
		.text = p->ret.text,
		.exchange = { p->ret.ex_len, p->ret.meta },
		.routing_key = { p->ret.rk_len, p->ret.meta + p->ret.ex_len },
		.properties = { p->ret.props_len, p->ret.meta + p->ret.ex_len + p->ret.rk_len },
		.body = { (size_t)p->ret.size, p->ret.body },
	};

	if (p->ops->returned)
		p->ops->returned(p->ud, &r);
	ret_reset(p);
}

static void on_return(struct upstream_proto *p, const amqp_basic_return_t *m)
{
	if (m->exchange.len > 255 || m->routing_key.len > 255) {
		fail(p, 502, "SYNTAX_ERROR - basic.return with an oversize name");
		return;
	}
	p->ret.active = true;
	p->ret.code = m->reply_code;
	log_sanitize(p->ret.text, sizeof(p->ret.text), m->reply_text.bytes,
		     (unsigned)m->reply_text.len);
	p->ret.meta = malloc(m->exchange.len + m->routing_key.len + 1);
	if (!p->ret.meta) {
		fail(p, 0, "out of memory");
		return;
	}
	p->ret.ex_len = (uint8_t)m->exchange.len;
	p->ret.rk_len = (uint8_t)m->routing_key.len;
	if (m->exchange.len)
		memcpy(p->ret.meta, m->exchange.bytes, m->exchange.len);
	if (m->routing_key.len)
		memcpy(p->ret.meta + m->exchange.len, m->routing_key.bytes, m->routing_key.len);
}

/* The content header of a returned message: class, weight, body size and
 * the properties, which are kept as they came. */
static void on_return_header(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	uint64_t size;
	uint8_t *meta;

	if (!p->ret.active || p->ret.header) {
		fail(p, 505, "UNEXPECTED_FRAME - content header without basic.return");
		return;
	}
	if (len < HEADER_FRAME_FIXED || amqp_frame_get16(f) != AMQP_BASIC_CLASS) {
		fail(p, 501, "FRAME_ERROR - malformed content header");
		return;
	}
	size = amqp_frame_get64(f + 4);
	if (size > p->cfg->max_return) {
		fail(p, 505, "UNEXPECTED_FRAME - returned body of %llu bytes, larger than anything "
			     "published", (unsigned long long)size);
		return;
	}
	meta = realloc(p->ret.meta, p->ret.ex_len + p->ret.rk_len + (len - HEADER_FRAME_FIXED) + 1);
	p->ret.body = size ? malloc((size_t)size) : NULL;
	if (!meta || (size && !p->ret.body)) {
		if (meta)
			p->ret.meta = meta;
		fail(p, 0, "out of memory");
		return;
	}
	p->ret.meta = meta;
	p->ret.props_len = (uint32_t)(len - HEADER_FRAME_FIXED);
	memcpy(meta + p->ret.ex_len + p->ret.rk_len, f + HEADER_FRAME_FIXED, p->ret.props_len);
	p->ret.header = true;
	p->ret.size = size;
	if (size == 0)
		ret_deliver(p);
}

static void on_return_body(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	if (!p->ret.header) {
		fail(p, 505, "UNEXPECTED_FRAME - body frame without basic.return");
		return;
	}
	if (len > p->ret.size - p->ret.got) {
		fail(p, 505, "UNEXPECTED_FRAME - returned body longer than its header said");
		return;
	}
	memcpy(p->ret.body + p->ret.got, f, len);
	p->ret.got += len;
	if (p->ret.got == p->ret.size)
		ret_deliver(p);
}

/* ---- the inbox channel ----------------------------------------------------------- */

static void ib_reset_delivery(struct upstream_proto *p)
{
	free(p->ib.meta);
	free(p->ib.body);
	p->ib.meta = p->ib.body = NULL;
	p->ib.active = p->ib.header = p->ib.discard = p->ib.get_ok = false;
	p->ib.size = p->ib.got = 0;
}

/* Answer every pending request as failed (OK false, CODE) and report the
 * channel closed. */
static void ib_fail_all(struct upstream_proto *p, uint16_t code, const char *text)
{
	bool was_open = p->ib.open;

	p->ib.open = false;
	ib_reset_delivery(p);
	while (p->ib.head) {
		struct upstream_inbox_pending *r = p->ib.head;

		p->ib.head = r->next;
		p->ib.npending--;
		if (p->ops->inbox_reply)
			p->ops->inbox_reply(p->ud, r->cookie, r->kind, false, code, text, 0, 0);
		free(r);
	}
	p->ib.tail = NULL;
	if (was_open && p->ops->inbox_closed)
		p->ops->inbox_closed(p->ud, code, text);
}

void upstream_proto_inbox_abort(struct upstream_proto *p, const char *why)
{
	ib_fail_all(p, 0, why);
}

static int ib_request(struct upstream_proto *p, enum upstream_inbox_req kind, uint64_t cookie,
		      amqp_method_number_t id, void *m)
{
	struct upstream_inbox_pending *r;

	if (p->st != UPSTREAM_PROTO_READY)
		return -EAGAIN;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	if (!p->ib.open) {
		amqp_channel_open_t co = { .out_of_band = amqp_cstring_bytes("") };

		if (send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_CHANNEL_OPEN_METHOD, &co) < 0) {
			free(r);
			return -ENOMEM;
		}
		p->ib.open = true;
		p->ib.gen++;
	}
	if (send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, id, m) < 0) {
		free(r);
		return -ENOMEM;
	}
	r->cookie = cookie;
	r->kind = kind;
	if (p->ib.tail)
		p->ib.tail->next = r;
	else
		p->ib.head = r;
	p->ib.tail = r;
	p->ib.npending++;
	return 0;
}

static bool name_ok(const char *s)
{
	return s && strlen(s) <= 255;
}

int upstream_proto_inbox_declare(struct upstream_proto *p, const char *queue,
				 const amqp_table_t *args, uint64_t cookie)
{
	amqp_queue_declare_t m = { .queue = amqp_cstring_bytes(queue ? queue : ""),
				   .durable = 1 };

	if (!name_ok(queue))
		return -EMSGSIZE;
	if (args)
		m.arguments = *args;
	return ib_request(p, UPSTREAM_INBOX_DECLARE, cookie, AMQP_QUEUE_DECLARE_METHOD, &m);
}

int upstream_proto_inbox_bind(struct upstream_proto *p, const char *queue, const char *exchange,
			      const char *key, uint64_t cookie)
{
	amqp_queue_bind_t m = { .queue = amqp_cstring_bytes(queue ? queue : ""),
				.exchange = amqp_cstring_bytes(exchange ? exchange : ""),
				.routing_key = amqp_cstring_bytes(key ? key : "") };

	if (!name_ok(queue) || !name_ok(exchange) || !name_ok(key))
		return -EMSGSIZE;
	return ib_request(p, UPSTREAM_INBOX_BIND, cookie, AMQP_QUEUE_BIND_METHOD, &m);
}

int upstream_proto_inbox_consume(struct upstream_proto *p, const char *queue, const char *tag,
				 uint16_t prefetch, uint64_t cookie)
{
	amqp_basic_qos_t q = { .prefetch_count = prefetch, .global = 0 };
	amqp_basic_consume_t m = { .queue = amqp_cstring_bytes(queue ? queue : ""),
				   .consumer_tag = amqp_cstring_bytes(tag ? tag : "") };
	size_t mark = p->out_len;
	int r;

	if (!name_ok(queue) || !name_ok(tag))
		return -EMSGSIZE;
	if (p->st != UPSTREAM_PROTO_READY)
		return -EAGAIN;
	/* qos-ok then consume-ok: one pending entry that takes both. */
	if (p->ib.open && send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_QOS_METHOD, &q) < 0)
		return -ENOMEM;
	if (!p->ib.open) {
		r = ib_request(p, UPSTREAM_INBOX_CONSUME, cookie, AMQP_BASIC_QOS_METHOD, &q);
		if (r < 0)
			return r;
		if (send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_CONSUME_METHOD, &m) < 0) {
			fail(p, 0, "out of memory");
			return -ENOMEM;
		}
		return 0;
	}
	r = ib_request(p, UPSTREAM_INBOX_CONSUME, cookie, AMQP_BASIC_CONSUME_METHOD, &m);
	if (r < 0)
		p->out_len = mark; /* take the qos back: nothing was sent yet */
	return r;
}

int upstream_proto_inbox_cancel(struct upstream_proto *p, const char *tag, uint64_t cookie)
{
	amqp_basic_cancel_t m = { .consumer_tag = amqp_cstring_bytes(tag ? tag : "") };

	if (!name_ok(tag))
		return -EMSGSIZE;
	if (!p->ib.open)
		return -EAGAIN; /* no channel: no consumer to cancel */
	return ib_request(p, UPSTREAM_INBOX_CANCEL, cookie, AMQP_BASIC_CANCEL_METHOD, &m);
}

int upstream_proto_inbox_get(struct upstream_proto *p, const char *queue, uint64_t cookie)
{
	amqp_basic_get_t m = { .queue = amqp_cstring_bytes(queue ? queue : "") };

	if (!name_ok(queue))
		return -EMSGSIZE;
	return ib_request(p, UPSTREAM_INBOX_GET, cookie, AMQP_BASIC_GET_METHOD, &m);
}

int upstream_proto_inbox_settle(struct upstream_proto *p, uint32_t gen, uint64_t tag,
				enum upstream_settle how, bool requeue)
{
	if (!p->ib.open || gen != p->ib.gen || p->st != UPSTREAM_PROTO_READY)
		return -ESTALE;
	if (how == UPSTREAM_ACK) {
		amqp_basic_ack_t a = { .delivery_tag = tag };
		return send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_ACK_METHOD, &a);
	}
	if (how == UPSTREAM_NACK) {
		amqp_basic_nack_t n = { .delivery_tag = tag, .requeue = requeue };
		return send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_NACK_METHOD, &n);
	}
	amqp_basic_reject_t rj = { .delivery_tag = tag, .requeue = requeue };
	return send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_REJECT_METHOD, &rj);
}

/* Whether R waits only for a consume-ok or a cancel-ok. RabbitMQ sends
 * those of a quorum queue from the queue's side, after the channel has
 * gone on to answer the requests behind them: they may come after a later
 * request's reply, though in the order of their own requests. */
static bool ib_async_wait(const struct upstream_inbox_pending *r)
{
	return (r->kind == UPSTREAM_INBOX_CONSUME && r->replies == 1) ||
	       r->kind == UPSTREAM_INBOX_CANCEL;
}

/* The pending request a reply ID answers: the oldest consume (past its
 * qos-ok) for a consume-ok, the oldest cancel for a cancel-ok, else the
 * oldest of the others; *PREV is the entry before it. */
static struct upstream_inbox_pending *ib_answered(struct upstream_proto *p,
						  amqp_method_number_t id,
						  struct upstream_inbox_pending **prev)
{
	*prev = NULL;
	for (struct upstream_inbox_pending *r = p->ib.head; r; *prev = r, r = r->next) {
		if (id == AMQP_BASIC_CONSUME_OK_METHOD) {
			if (r->kind == UPSTREAM_INBOX_CONSUME && r->replies == 1)
				return r;
		} else if (id == AMQP_BASIC_CANCEL_OK_METHOD) {
			if (r->kind == UPSTREAM_INBOX_CANCEL)
				return r;
		} else if (!ib_async_wait(r)) {
			return r;
		}
	}
	return NULL;
}

static void ib_unlink(struct upstream_proto *p, struct upstream_inbox_pending *r,
		      struct upstream_inbox_pending *prev)
{
	if (prev)
		prev->next = r->next;
	else
		p->ib.head = r->next;
	if (p->ib.tail == r)
		p->ib.tail = prev;
	p->ib.npending--;
}

static void ib_deliver(struct upstream_proto *p)
{
	uint8_t *m = p->ib.meta;
	struct upstream_proto_delivery d = {
		.consumer_tag = { p->ib.ctag_len, m },
		.delivery_tag = p->ib.tag,
		.gen = p->ib.gen,
		.redelivered = p->ib.redelivered,
		.exchange = { p->ib.ex_len, m + p->ib.ctag_len },
		.routing_key = { p->ib.rk_len, m + p->ib.ctag_len + p->ib.ex_len },
		.properties = { p->ib.props_len, m + p->ib.ctag_len + p->ib.ex_len + p->ib.rk_len },
		.body = { (size_t)p->ib.size, p->ib.body },
	};

	if (p->ib.get_ok) {
		/* The answer to the pending basic.get its get-ok matched. */
		struct upstream_inbox_pending *prev;
		struct upstream_inbox_pending *r = ib_answered(p, AMQP_BASIC_GET_OK_METHOD, &prev);

		if (!r) { /* cannot happen: the get-ok matched it */
			fail(p, 0, "internal error: get-ok without its request");
			return;
		}
		ib_unlink(p, r, prev);
		if (p->ib.discard) {
			p->ib.refused++;
			upstream_proto_inbox_settle(p, p->ib.gen, p->ib.tag, UPSTREAM_REJECT, false);
			if (p->ops->inbox_reply) /* as if empty: nothing to hand over */
				p->ops->inbox_reply(p->ud, r->cookie, r->kind, true, 0, NULL, 0, 0);
		} else if (p->ops->inbox_got) {
			p->ib.delivered++;
			p->ops->inbox_got(p->ud, r->cookie, &d, p->ib.got_count);
		} else {
			upstream_proto_inbox_settle(p, p->ib.gen, p->ib.tag, UPSTREAM_NACK, true);
		}
		free(r);
	} else if (p->ib.discard) {
		/* Too large to pass on: dead-lettered or dropped by the broker. */
		p->ib.refused++;
		upstream_proto_inbox_settle(p, p->ib.gen, p->ib.tag, UPSTREAM_REJECT, false);
	} else if (p->ops->inbox_deliver) {
		p->ib.delivered++;
		p->ops->inbox_deliver(p->ud, &d);
	}
	ib_reset_delivery(p);
}

static void on_deliver(struct upstream_proto *p, const amqp_basic_deliver_t *m)
{
	size_t n = m->consumer_tag.len + m->exchange.len + m->routing_key.len;

	if (m->consumer_tag.len > 255 || m->exchange.len > 255 || m->routing_key.len > 255) {
		fail(p, 502, "SYNTAX_ERROR - basic.deliver with an oversize name");
		return;
	}
	p->ib.meta = malloc(n + 1);
	if (!p->ib.meta) {
		fail(p, 0, "out of memory");
		return;
	}
	p->ib.active = true;
	p->ib.tag = m->delivery_tag;
	p->ib.redelivered = m->redelivered;
	p->ib.ctag_len = (uint8_t)m->consumer_tag.len;
	p->ib.ex_len = (uint8_t)m->exchange.len;
	p->ib.rk_len = (uint8_t)m->routing_key.len;
		/* Empty names may come without a buffer (a get-ok's consumer tag). */
	if (m->consumer_tag.len)
		memcpy(p->ib.meta, m->consumer_tag.bytes, m->consumer_tag.len);
	if (m->exchange.len)
		memcpy(p->ib.meta + p->ib.ctag_len, m->exchange.bytes, m->exchange.len);
	if (m->routing_key.len)
		memcpy(p->ib.meta + p->ib.ctag_len + p->ib.ex_len, m->routing_key.bytes,
		       m->routing_key.len);
}

static void on_deliver_header(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	size_t keep = (size_t)p->ib.ctag_len + p->ib.ex_len + p->ib.rk_len;
	uint64_t size;
	uint8_t *meta;

	if (!p->ib.active || p->ib.header) {
		fail(p, 505, "UNEXPECTED_FRAME - content header without basic.deliver");
		return;
	}
	if (len < HEADER_FRAME_FIXED || amqp_frame_get16(f) != AMQP_BASIC_CLASS) {
		fail(p, 501, "FRAME_ERROR - malformed content header");
		return;
	}
	size = amqp_frame_get64(f + 4);
	p->ib.header = true;
	p->ib.size = size;
	if (size > p->cfg->max_delivery) {
		p->ib.discard = true;
	} else {
		meta = realloc(p->ib.meta, keep + (len - HEADER_FRAME_FIXED) + 1);
		p->ib.body = size ? malloc((size_t)size) : NULL;
		if (!meta || (size && !p->ib.body)) {
			if (meta)
				p->ib.meta = meta;
			fail(p, 0, "out of memory");
			return;
		}
		p->ib.meta = meta;
		p->ib.props_len = (uint32_t)(len - HEADER_FRAME_FIXED);
		memcpy(meta + keep, f + HEADER_FRAME_FIXED, p->ib.props_len);
	}
	if (size == 0)
		ib_deliver(p);
}

static void on_deliver_body(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	if (!p->ib.header) {
		fail(p, 505, "UNEXPECTED_FRAME - body frame without basic.deliver");
		return;
	}
	if (len > p->ib.size - p->ib.got) {
		fail(p, 505, "UNEXPECTED_FRAME - delivered body longer than its header said");
		return;
	}
	if (!p->ib.discard)
		memcpy(p->ib.body + p->ib.got, f, len);
	p->ib.got += len;
	if (p->ib.got == p->ib.size)
		ib_deliver(p);
}

/* The reply to the pending request it answers (ib_answered): it must be
 * what that request expects. */
static void ib_answer(struct upstream_proto *p, amqp_method_number_t id, void *m)
{
	struct upstream_inbox_pending *prev;
	struct upstream_inbox_pending *r = ib_answered(p, id, &prev);
	bool done = true;

	if (!r)
		goto unexpected;
	switch (id) {
	case AMQP_QUEUE_DECLARE_OK_METHOD:
		if (r->kind != UPSTREAM_INBOX_DECLARE)
			goto unexpected;
		r->count = ((amqp_queue_declare_ok_t *)m)->message_count;
		r->consumers = ((amqp_queue_declare_ok_t *)m)->consumer_count;
		break;
	case AMQP_QUEUE_BIND_OK_METHOD:
		if (r->kind != UPSTREAM_INBOX_BIND)
			goto unexpected;
		break;
	case AMQP_BASIC_QOS_OK_METHOD:
		if (r->kind != UPSTREAM_INBOX_CONSUME || r->replies != 0)
			goto unexpected;
		r->replies = 1;
		done = false;
		break;
	case AMQP_BASIC_CONSUME_OK_METHOD:
		if (r->kind != UPSTREAM_INBOX_CONSUME || r->replies != 1)
			goto unexpected;
		break;
	case AMQP_BASIC_CANCEL_OK_METHOD:
		if (r->kind != UPSTREAM_INBOX_CANCEL)
			goto unexpected;
		break;
	case AMQP_BASIC_GET_EMPTY_METHOD:
		if (r->kind != UPSTREAM_INBOX_GET)
			goto unexpected;
		break;
	case AMQP_BASIC_GET_OK_METHOD: {
		const amqp_basic_get_ok_t *g = m;
		amqp_basic_deliver_t d = { .consumer_tag = amqp_empty_bytes,
					   .delivery_tag = g->delivery_tag,
					   .redelivered = g->redelivered,
					   .exchange = g->exchange,
					   .routing_key = g->routing_key };
		if (r->kind != UPSTREAM_INBOX_GET)
			goto unexpected;
		/* The content follows; the request is answered with it. */
		on_deliver(p, &d);
		p->ib.get_ok = true;
		p->ib.got_count = g->message_count;
		return;
	}
	default:
		goto unexpected;
	}
	if (!done)
		return;
	ib_unlink(p, r, prev);
	if (p->ops->inbox_reply)
		p->ops->inbox_reply(p->ud, r->cookie, r->kind, true, 0, NULL, r->count,
				    r->consumers);
	free(r);
	return;
unexpected:
	fail(p, 503, "COMMAND_INVALID - unexpected method 0x%08x on channel %u", id,
	     UPSTREAM_PROTO_INBOX_CHANNEL);
}

static void on_inbox_method(struct upstream_proto *p, amqp_method_number_t id, void *m)
{
	if (p->ib.active) {
		fail(p, 505, "UNEXPECTED_FRAME - method 0x%08x where delivered content was due", id);
		return;
	}
	switch (id) {
	case AMQP_CHANNEL_OPEN_OK_METHOD:
		return;
	case AMQP_BASIC_DELIVER_METHOD:
		on_deliver(p, m);
		return;
	case AMQP_BASIC_CANCEL_METHOD: {
		const amqp_basic_cancel_t *c = m;
		if (p->ops->inbox_cancelled)
			p->ops->inbox_cancelled(p->ud, c->consumer_tag);
		if (!c->nowait) {
			amqp_basic_cancel_ok_t ok = { .consumer_tag = c->consumer_tag };
			send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_CANCEL_OK_METHOD, &ok);
		}
		return;
	}
	case AMQP_CHANNEL_FLOW_METHOD: {
		amqp_channel_flow_ok_t ok = { .active = ((amqp_channel_flow_t *)m)->active };
		send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_CHANNEL_FLOW_OK_METHOD, &ok);
		return;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		const amqp_channel_close_t *c = m;
		amqp_channel_close_ok_t ok = { 0 };
		char text[170];
		send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		/* Only this channel: publishing goes on. */
		ib_fail_all(p, c->reply_code,
			    log_sanitize(text, sizeof(text), c->reply_text.bytes,
					 (unsigned)c->reply_text.len));
		return;
	}
	default:
		ib_answer(p, id, m);
		return;
	}
}

/* ---- frames from the broker ----------------------------------------------------- */

static void on_connection_method(struct upstream_proto *p, amqp_method_number_t id, void *m,
				 uint64_t now)
{
	switch (id) {
	case AMQP_CONNECTION_START_METHOD:
		if (p->st != UPSTREAM_PROTO_START)
			break;
		on_start(p, m);
		return;
	case AMQP_CONNECTION_TUNE_METHOD:
		if (p->st != UPSTREAM_PROTO_TUNE)
			break;
		on_tune(p, m, now);
		return;
	case AMQP_CONNECTION_OPEN_OK_METHOD: {
		amqp_channel_open_t co = { 0 };
		if (p->st != UPSTREAM_PROTO_OPEN)
			break;
		co.out_of_band = amqp_cstring_bytes("");
		send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CHANNEL_OPEN_METHOD, &co);
		p->st = UPSTREAM_PROTO_CHANNEL_OPEN;
		return;
	}
	case AMQP_CONNECTION_CLOSE_METHOD: {
		const amqp_connection_close_t *c = m;
		amqp_connection_close_ok_t ok = { 0 };
		char text[170];
		p->close_received = true;
		p->broker_code = c->reply_code;
		send_method(p, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		fail(p, c->reply_code, "broker closed the connection: %u \"%s\"", c->reply_code,
		     log_sanitize(text, sizeof(text), c->reply_text.bytes,
				  (unsigned)c->reply_text.len));
		return;
	}
	case AMQP_CONNECTION_CLOSE_OK_METHOD:
		if (p->st != UPSTREAM_PROTO_CLOSING)
			break;
		p->st = UPSTREAM_PROTO_CLOSED;
		return;
	case AMQP_CONNECTION_BLOCKED_METHOD: {
		const amqp_connection_blocked_t *b = m;
		char reason[128];
		p->ops->flow(p->ud, true,
			     log_sanitize(reason, sizeof(reason), b->reason.bytes,
					  (unsigned)b->reason.len));
		return;
	}
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		p->ops->flow(p->ud, false, NULL);
		return;
	default:
		break;
	}
	fail(p, 503, "unexpected method 0x%08x on channel 0 while %s", id, state_name(p->st));
}

static void on_channel_method(struct upstream_proto *p, amqp_method_number_t id, void *m)
{
	switch (id) {
	case AMQP_CHANNEL_OPEN_OK_METHOD: {
		amqp_confirm_select_t cs = { .nowait = 0 };
		if (p->st != UPSTREAM_PROTO_CHANNEL_OPEN)
			break;
		send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CONFIRM_SELECT_METHOD, &cs);
		p->st = UPSTREAM_PROTO_SELECT;
		return;
	}
	case AMQP_CONFIRM_SELECT_OK_METHOD:
		if (p->st != UPSTREAM_PROTO_SELECT)
			break;
		p->st = UPSTREAM_PROTO_READY;
		p->ops->ready(p->ud);
		return;
	case AMQP_BASIC_ACK_METHOD:
	case AMQP_BASIC_NACK_METHOD: {
		bool ack = id == AMQP_BASIC_ACK_METHOD;
		uint64_t tag = ack ? ((amqp_basic_ack_t *)m)->delivery_tag
				   : ((amqp_basic_nack_t *)m)->delivery_tag;
		bool multiple = ack ? ((amqp_basic_ack_t *)m)->multiple
				    : ((amqp_basic_nack_t *)m)->multiple;
		if (p->st != UPSTREAM_PROTO_READY && p->st != UPSTREAM_PROTO_CLOSING)
			break;
		if (tag == 0 || tag > p->next_tag) {
			fail(p, 406, "PRECONDITION_FAILED - confirm for unknown delivery tag %llu",
			     (unsigned long long)tag);
			return;
		}
		p->ops->confirm(p->ud, tag, multiple, ack);
		return;
	}
	case AMQP_BASIC_RETURN_METHOD:
		if (p->st != UPSTREAM_PROTO_READY && p->st != UPSTREAM_PROTO_CLOSING)
			break;
		on_return(p, m);
		return;
	case AMQP_CHANNEL_FLOW_METHOD: {
		amqp_channel_flow_ok_t ok = { .active = ((amqp_channel_flow_t *)m)->active };
		send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CHANNEL_FLOW_OK_METHOD, &ok);
		p->ops->flow(p->ud, !ok.active, ok.active ? NULL : "channel.flow");
		return;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		const amqp_channel_close_t *c = m;
		amqp_channel_close_ok_t ok = { 0 };
		char text[170];
		send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		p->broker_code = c->reply_code;
		/* The channel's unconfirmed messages are lost to it: the link
		 * ends, and they are republished on the next one. */
		fail(p, c->reply_code, "broker closed the channel: %u \"%s\"", c->reply_code,
		     log_sanitize(text, sizeof(text), c->reply_text.bytes,
				  (unsigned)c->reply_text.len));
		return;
	}
	default:
		break;
	}
	fail(p, 503, "unexpected method 0x%08x on channel %u while %s", id, UPSTREAM_PROTO_CHANNEL,
	     state_name(p->st));
}

/* Tables the broker sends are checked before rabbitmq-c's recursive decoder
 * sees them: connection.start's server properties are the only ones a
 * publish-only link receives. */
static int check_tables(amqp_method_number_t id, const uint8_t *args, size_t len)
{
	size_t used;

	if (id != AMQP_CONNECTION_START_METHOD)
		return 0;
	if (len < 2)
		return -EBADMSG;
	return amqp_frame_check_table_prefixed(args + 2, len - 2, UPSTREAM_PROTO_TABLE_DEPTH,
					       &used);
}

static void on_method(struct upstream_proto *p, uint16_t ch, const uint8_t *f, size_t len,
		      uint64_t now)
{
	amqp_method_number_t id;
	void *m = NULL;
	int r;

	if (len < 4) {
		fail(p, 501, "method frame of %zu bytes", len);
		return;
	}
	id = amqp_frame_get32(f);
	if (p->st == UPSTREAM_PROTO_CLOSING && id != AMQP_CONNECTION_CLOSE_OK_METHOD &&
	    id != AMQP_CONNECTION_CLOSE_METHOD && id != AMQP_BASIC_ACK_METHOD &&
	    id != AMQP_BASIC_NACK_METHOD)
		return; /* what crosses our close is moot */
	r = check_tables(id, f + 4, len - 4);
	if (r == 0)
		r = amqp_decode_method(id, &p->pool, (amqp_bytes_t){ len - 4, (void *)(f + 4) }, &m);
	if (r < 0 || !m) {
		fail(p, 502, "SYNTAX_ERROR - malformed method 0x%08x (%zu bytes)", id, len);
		return;
	}
	if (ch == 0)
		on_connection_method(p, id, m, now);
	else if (ch == UPSTREAM_PROTO_INBOX_CHANNEL)
		on_inbox_method(p, id, m);
	else if (p->ret.active)
		fail(p, 505, "UNEXPECTED_FRAME - method 0x%08x where returned content was due", id);
	else
		on_channel_method(p, id, m);
}

static void on_frame(struct upstream_proto *p, uint8_t type, uint16_t ch, const uint8_t *f,
		     size_t len, uint64_t now)
{
	if (ch != 0 && ch != UPSTREAM_PROTO_CHANNEL &&
	    !(ch == UPSTREAM_PROTO_INBOX_CHANNEL && p->ib.open)) {
		fail(p, 504, "CHANNEL_ERROR - frame on channel %u, which was never opened", ch);
		return;
	}
	switch (type) {
	case AMQP_FT_METHOD:
		on_method(p, ch, f, len, now);
		break;
	case AMQP_FT_HEARTBEAT:
		if (ch != 0 || len != 0)
			fail(p, 501, "FRAME_ERROR - malformed heartbeat frame");
		break;
	case AMQP_FT_HEADER:
		if (ch == UPSTREAM_PROTO_INBOX_CHANNEL)
			on_deliver_header(p, f, len);
		else if (ch != UPSTREAM_PROTO_CHANNEL)
			fail(p, 504, "CHANNEL_ERROR - content header on channel 0");
		else
			on_return_header(p, f, len);
		break;
	case AMQP_FT_BODY:
		if (ch == UPSTREAM_PROTO_INBOX_CHANNEL)
			on_deliver_body(p, f, len);
		else if (ch != UPSTREAM_PROTO_CHANNEL)
			fail(p, 504, "CHANNEL_ERROR - body frame on channel 0");
		else
			on_return_body(p, f, len);
		break;
	default:
		fail(p, 501, "FRAME_ERROR - unknown frame type %u", type);
		break;
	}
	if (p->pool.pages.num_blocks > 1)
		empty_amqp_pool(&p->pool);
	else
		recycle_amqp_pool(&p->pool);
}

/* Bytes the frame at B (N available) needs: a frame header, or all of it.
 * A header announcing an oversized frame needs nothing more. */
static size_t frame_need(const struct upstream_proto *p, const uint8_t *b, size_t n)
{
	uint32_t size;

	if (n < AMQP_FRAME_HEADER_SIZE)
		return AMQP_FRAME_HEADER_SIZE;
	size = amqp_frame_get32(b + 3);
	if (size > p->frame_max - 8)
		return AMQP_FRAME_HEADER_SIZE;
	return (size_t)size + 8;
}

/* Consume complete frames from B; returns how many bytes were used. */
static size_t parse(struct upstream_proto *p, const uint8_t *b, size_t n, uint64_t now)
{
	size_t used = 0;

	while (p->st != UPSTREAM_PROTO_CLOSED && n - used >= AMQP_FRAME_HEADER_SIZE) {
		const uint8_t *f = b + used;
		uint32_t size = amqp_frame_get32(f + 3);

		if (size > p->frame_max - 8) {
			fail(p, 501, "FRAME_ERROR - frame of %u bytes over frame_max %u", size,
			     p->frame_max);
			break;
		}
		if (n - used < (size_t)size + 8)
			break;
		if (f[7 + size] != AMQP_FRAME_END_OCTET) {
			fail(p, 501, "FRAME_ERROR - invalid frame end octet 0x%02x", f[7 + size]);
			break;
		}
		used += (size_t)size + 8;
		on_frame(p, f[0], amqp_frame_get16(f + 1), f + 7, size, now);
	}
	return p->st == UPSTREAM_PROTO_CLOSED ? n : used;
}

static bool in_append(struct upstream_proto *p, const uint8_t *d, size_t n)
{
	if (p->in_len + n > p->in_cap) {
		size_t cap = p->in_cap ? p->in_cap : 4096;
		uint8_t *b;

		while (cap < p->in_len + n)
			cap *= 2;
		b = realloc(p->in, cap);
		if (!b)
			return false;
		p->in = b;
		p->in_cap = cap;
	}
	memcpy(p->in + p->in_len, d, n);
	p->in_len += n;
	return true;
}

int upstream_proto_feed(struct upstream_proto *p, const void *data, size_t len, uint64_t now_ms)
{
	const uint8_t *d = data;

	if (p->st == UPSTREAM_PROTO_CLOSED)
		return -EPROTO;
	if (len)
		p->last_rx_ms = now_ms;
	while (len > 0 && p->st != UPSTREAM_PROTO_CLOSED) {
		size_t used;

		if (p->in_len > 0) {
			/* Complete the carried-over frame first. */
			size_t need = frame_need(p, p->in, p->in_len);
			size_t take = need - p->in_len < len ? need - p->in_len : len;

			if (!in_append(p, d, take)) {
				fail(p, 0, "out of memory");
				break;
			}
			d += take;
			len -= take;
			if (p->in_len < frame_need(p, p->in, p->in_len))
				continue;
			used = parse(p, p->in, p->in_len, now_ms);
			if (used < p->in_len) /* cannot happen: need was met */
				fail(p, 0, "internal error: frame carried over twice");
			p->in_len = 0;
			continue;
		}
		used = parse(p, d, len, now_ms);
		d += used;
		len -= used;
		if (len > 0 && p->st != UPSTREAM_PROTO_CLOSED && !in_append(p, d, len))
			fail(p, 0, "out of memory");
		break;
	}
	if (p->in_cap > 2 * (size_t)p->frame_max && p->in_len == 0) {
		free(p->in);
		p->in = NULL;
		p->in_cap = 0;
	}
	return p->st == UPSTREAM_PROTO_CLOSED ? -EPROTO : 0;
}

/* ---- the owner's side --------------------------------------------------------------- */

int upstream_proto_init(struct upstream_proto *p, const struct upstream_proto_config *cfg,
			const struct upstream_proto_ops *ops, void *ud, uint64_t now_ms)
{
	memset(p, 0, sizeof(*p));
	p->cfg = cfg;
	p->ops = ops;
	p->ud = ud;
	p->st = UPSTREAM_PROTO_START;
	p->frame_max = UPSTREAM_PROTO_FRAME_MAX; /* until tune: what we will accept */
	p->last_rx_ms = p->last_tx_ms = now_ms;
	init_amqp_pool(&p->pool, 4096);
	if (!out_reserve(p, sizeof(protocol_header)))
		return -ENOMEM;
	memcpy(p->out, protocol_header, sizeof(protocol_header));
	p->out_len = sizeof(protocol_header);
	return 0;
}

void upstream_proto_destroy(struct upstream_proto *p)
{
	ret_reset(p);
	ib_reset_delivery(p);
	while (p->ib.head) {
		struct upstream_inbox_pending *r = p->ib.head;
		p->ib.head = r->next;
		free(r);
	}
	p->ib.tail = NULL;
	p->ib.npending = 0;
	p->ib.open = false;
	empty_amqp_pool(&p->pool);
	free(p->out);
	free(p->in);
	p->out = p->in = NULL;
	p->out_len = p->out_off = p->out_cap = p->in_len = p->in_cap = 0;
}

int64_t upstream_proto_publish(struct upstream_proto *p, const void *rk, size_t rk_len,
			       bool mandatory, const void *props, size_t props_len,
			       const void *body, size_t body_len)
{
	amqp_basic_publish_t pub = { 0 };
	size_t chunk = p->frame_max - 8;
	size_t nbody = body_len ? (body_len + chunk - 1) / chunk : 0;
	size_t start = p->out_len;
	uint8_t *b;
	int n;

	if (p->st != UPSTREAM_PROTO_READY || p->out_len - p->out_off > p->cfg->max_output)
		return -EAGAIN;
	if (HEADER_FRAME_FIXED + props_len > chunk || rk_len > 255)
		return -EMSGSIZE;
	if (!out_reserve(p, 12 + 4 + 2 * 256 + 8 + 8 + HEADER_FRAME_FIXED + props_len +
				    nbody * 8 + body_len))
		return -EAGAIN;
	start = p->out_len;
	b = p->out + start;
	pub.exchange = amqp_cstring_bytes(p->cfg->exchange);
	pub.routing_key = (amqp_bytes_t){ rk_len, (void *)rk };
	pub.mandatory = mandatory;
	n = amqp_encode_method(AMQP_BASIC_PUBLISH_METHOD, &pub,
			       (amqp_bytes_t){ 2 * 256 + 8, b + 11 });
	if (n < 0)
		return -EMSGSIZE;
	put_frame_header(b, AMQP_FT_METHOD, UPSTREAM_PROTO_CHANNEL, (uint32_t)n + 4);
	amqp_frame_put32(b + 7, AMQP_BASIC_PUBLISH_METHOD);
	b[11 + n] = AMQP_FRAME_END_OCTET;
	b += 12 + n;

	put_frame_header(b, AMQP_FT_HEADER, UPSTREAM_PROTO_CHANNEL,
			 (uint32_t)(HEADER_FRAME_FIXED + props_len));
	amqp_frame_put16(b + 7, AMQP_BASIC_CLASS);
	amqp_frame_put16(b + 9, 0);
	amqp_frame_put32(b + 11, (uint32_t)((uint64_t)body_len >> 32));
	amqp_frame_put32(b + 15, (uint32_t)body_len);
	if (props_len)
		memcpy(b + 7 + HEADER_FRAME_FIXED, props, props_len);
	b[7 + HEADER_FRAME_FIXED + props_len] = AMQP_FRAME_END_OCTET;
	b += 8 + HEADER_FRAME_FIXED + props_len;

	for (size_t off = 0; off < body_len; off += chunk) {
		size_t len = body_len - off < chunk ? body_len - off : chunk;

		put_frame_header(b, AMQP_FT_BODY, UPSTREAM_PROTO_CHANNEL, (uint32_t)len);
		memcpy(b + 7, (const uint8_t *)body + off, len);
		b[7 + len] = AMQP_FRAME_END_OCTET;
		b += 8 + len;
	}
	p->out_len = (size_t)(b - p->out);
	return (int64_t)++p->next_tag;
}

size_t upstream_proto_output(const struct upstream_proto *p, const void **data)
{
	*data = p->out + p->out_off;
	return p->out_len - p->out_off;
}

void upstream_proto_consumed(struct upstream_proto *p, size_t n, uint64_t now_ms)
{
	if (n == 0)
		return;
	p->out_off += n;
	p->last_tx_ms = now_ms;
	if (p->out_off == p->out_len) {
		p->out_off = p->out_len = 0;
		if (p->out_cap > OUT_KEEP) {
			free(p->out);
			p->out = NULL;
			p->out_cap = 0;
		}
	}
}

uint64_t upstream_proto_tick(struct upstream_proto *p, uint64_t now_ms)
{
	uint64_t hb = (uint64_t)p->heartbeat * 1000, send_at, dead_at;

	if (!hb || p->st < UPSTREAM_PROTO_OPEN || p->st == UPSTREAM_PROTO_CLOSED)
		return UINT64_MAX;
	dead_at = p->last_rx_ms + 2 * hb;
	if (now_ms >= dead_at) {
		fail(p, 0, "missed heartbeats from the broker: nothing received for %llu s",
		     (unsigned long long)(now_ms - p->last_rx_ms) / 1000);
		return 0;
	}
	send_at = p->last_tx_ms + hb / 2;
	if (now_ms >= send_at) {
		/* Output still waiting to be written says as much. */
		if (p->out_len == p->out_off)
			send_heartbeat(p);
		send_at = now_ms + hb / 2;
	}
	return send_at < dead_at ? send_at : dead_at;
}

void upstream_proto_close(struct upstream_proto *p, uint16_t code, const char *text)
{
	amqp_connection_close_t cl = { .reply_code = code, .reply_text = amqp_cstring_bytes(text) };

	if (p->st == UPSTREAM_PROTO_CLOSED || p->st == UPSTREAM_PROTO_CLOSING)
		return;
	if (p->st == UPSTREAM_PROTO_START) {
		p->st = UPSTREAM_PROTO_CLOSED;
		return;
	}
	send_method(p, 0, AMQP_CONNECTION_CLOSE_METHOD, &cl);
	p->st = UPSTREAM_PROTO_CLOSING;
}
