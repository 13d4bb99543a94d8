/* upstream_inbox.c -- the link engine's inbox channel: the owner's inbox
 * requests (declare, bind, consume, cancel, get, settle) answered in order,
 * and deliveries assembled for the owner. Part of the engine behind
 * upstream_proto.h. */
#include "upstream_proto_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"
#include "log.h"

void up_ib_reset_delivery(struct upstream_proto *p)
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
	up_ib_reset_delivery(p);
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

		if (up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_CHANNEL_OPEN_METHOD,
				   &co) < 0) {
			free(r);
			return -ENOMEM;
		}
		p->ib.open = true;
		p->ib.gen++;
	}
	if (up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, id, m) < 0) {
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
	if (p->ib.open &&
	    up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_QOS_METHOD, &q) < 0)
		return -ENOMEM;
	if (!p->ib.open) {
		r = ib_request(p, UPSTREAM_INBOX_CONSUME, cookie, AMQP_BASIC_QOS_METHOD, &q);
		if (r < 0)
			return r;
		if (up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_CONSUME_METHOD,
				   &m) < 0) {
			up_fail(p, 0, "out of memory");
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
		return up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_ACK_METHOD, &a);
	}
	if (how == UPSTREAM_NACK) {
		amqp_basic_nack_t n = { .delivery_tag = tag, .requeue = requeue };
		return up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_NACK_METHOD, &n);
	}
	amqp_basic_reject_t rj = { .delivery_tag = tag, .requeue = requeue };
	return up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_REJECT_METHOD, &rj);
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
			up_fail(p, 0, "internal error: get-ok without its request");
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
	up_ib_reset_delivery(p);
}

static void on_deliver(struct upstream_proto *p, const amqp_basic_deliver_t *m)
{
	size_t n = m->consumer_tag.len + m->exchange.len + m->routing_key.len;

	if (m->consumer_tag.len > 255 || m->exchange.len > 255 || m->routing_key.len > 255) {
		up_fail(p, 502, "SYNTAX_ERROR - basic.deliver with an oversize name");
		return;
	}
	p->ib.meta = malloc(n + 1);
	if (!p->ib.meta) {
		up_fail(p, 0, "out of memory");
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

void up_on_deliver_header(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	size_t keep = (size_t)p->ib.ctag_len + p->ib.ex_len + p->ib.rk_len;
	uint64_t size;
	uint8_t *meta;

	if (!p->ib.active || p->ib.header) {
		up_fail(p, 505, "UNEXPECTED_FRAME - content header without basic.deliver");
		return;
	}
	if (len < HEADER_FRAME_FIXED || amqp_frame_get16(f) != AMQP_BASIC_CLASS) {
		up_fail(p, 501, "FRAME_ERROR - malformed content header");
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
			up_fail(p, 0, "out of memory");
			return;
		}
		p->ib.meta = meta;
		p->ib.props_len = (uint32_t)(len - HEADER_FRAME_FIXED);
		memcpy(meta + keep, f + HEADER_FRAME_FIXED, p->ib.props_len);
	}
	if (size == 0)
		ib_deliver(p);
}

void up_on_deliver_body(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	if (!p->ib.header) {
		up_fail(p, 505, "UNEXPECTED_FRAME - body frame without basic.deliver");
		return;
	}
	if (len > p->ib.size - p->ib.got) {
		up_fail(p, 505, "UNEXPECTED_FRAME - delivered body longer than its header said");
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
	up_fail(p, 503, "COMMAND_INVALID - unexpected method 0x%08x on channel %u", id,
		UPSTREAM_PROTO_INBOX_CHANNEL);
}

void up_on_inbox_method(struct upstream_proto *p, amqp_method_number_t id, void *m)
{
	if (p->ib.active) {
		up_fail(p, 505, "UNEXPECTED_FRAME - method 0x%08x where delivered content was due",
			id);
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
			up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_BASIC_CANCEL_OK_METHOD,
				       &ok);
		}
		return;
	}
	case AMQP_CHANNEL_FLOW_METHOD: {
		amqp_channel_flow_ok_t ok = { .active = ((amqp_channel_flow_t *)m)->active };
		up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_CHANNEL_FLOW_OK_METHOD, &ok);
		return;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		const amqp_channel_close_t *c = m;
		amqp_channel_close_ok_t ok = { 0 };
		char text[170];
		up_send_method(p, UPSTREAM_PROTO_INBOX_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
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
