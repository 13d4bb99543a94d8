/* inbox_link.c -- the inboxes' link side: the broker's replies to their
 * requests, deliveries and gets passed to the guests, consumers the broker
 * cancelled, and the inbox channel lost and the link back. */
#include "inbox_impl.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "log.h"

static void req_done(struct inbox *ib, struct inbox_req *r)
{
	struct guest_conn *c = r->conn;
	struct guest_session *s = inbox_session(c);
	struct inbox_cons *k = r->k;

	switch (r->what) {
	case REQ_DECLARE:
	case REQ_GET: /* a get only when nothing was got: empty, or failed */
		if (!s)
			break;
		if (r->failed)
			guest_session_fail(s, r->ch, r->ch_gen, r->code ? r->code : 506, r->text);
		else if (r->what == REQ_GET)
			guest_session_get_empty(s, r->ch, r->ch_gen);
		else
			guest_session_declare_ok(s, r->ch, r->ch_gen, r->count, r->consumers);
		break;
	case REQ_CONSUME:
	case REQ_RESUBSCRIBE:
		if (!k)
			break;
		if (r->failed) {
			if (inbox_session(k->conn)) {
				char why[300];
				snprintf(why, sizeof(why),
				         "inbox consumer refused by the broker: %u %s", r->code,
				         r->text);
				if (r->what == REQ_CONSUME)
					guest_session_fail(inbox_session(k->conn), k->ch, k->ch_gen,
					                   r->code ? r->code : 506, r->text);
				else
					guest_session_cancel_consumer(inbox_session(k->conn),
					                              k->cid, why);
				log_warn("thread=%u: consumer %s of %s: %s", ib->thread_id, k->tag,
				         k->queue, why);
			}
			c = k->conn;
			/* The session's CANCEL event may have freed it already. */
			k = r->k;
			if (k && k->st != CONS_DOWN) {
				k->st = CONS_DOWN;
				k->conn = NULL;
				inbox_cons_free(ib, k);
			}
			break;
		}
		k->st = CONS_LIVE;
		if (!k->conn) {
			inbox_cancel_upstream(ib, k);
			break;
		}
		c = k->conn;
		if (r->what == REQ_CONSUME && inbox_session(c))
			guest_session_consume_ok(inbox_session(c), k->ch, k->ch_gen, k->cid);
		break;
	case REQ_CANCEL:
		if (k)
			inbox_cons_free(ib, k);
		break;
	}
	inbox_wake(ib, c);
	inbox_req_free(ib, r);
}

void inbox_on_reply(struct inbox *ib, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
                    uint16_t code, const char *text, uint32_t count, uint32_t consumers)
{
	struct inbox_req *r = (struct inbox_req *)(uintptr_t)cookie;

	if (kind == UPSTREAM_INBOX_DECLARE && ok) {
		r->count = count;
		r->consumers = consumers;
	}
	if (!ok && !r->failed) {
		r->failed = true;
		r->code = code ? code : 506;
		snprintf(r->text, sizeof(r->text), "%s",
		         code ? (text ? text : "") : "the management link was lost; try again");
	}
	if (r->replies > 0)
		r->replies--;
	if (r->replies == 0)
		req_done(ib, r);
}

/* The routing key a guest sees: without its own "<uuid>." (the binding
 * guarantees the prefix). */
static amqp_bytes_t guest_key(amqp_bytes_t rk, const char *uuid)
{
	size_t ul = strlen(uuid);

	if (rk.len > ul && memcmp(rk.bytes, uuid, ul) == 0 && ((char *)rk.bytes)[ul] == '.') {
		rk.bytes = (char *)rk.bytes + ul + 1;
		rk.len -= ul + 1;
	}
	return rk;
}

void inbox_on_got(struct inbox *ib, uint64_t cookie, const struct upstream_proto_delivery *d,
                  uint32_t count)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	struct inbox_req *r = (struct inbox_req *)(uintptr_t)cookie;
	struct guest_conn *c = r->conn;
	int64_t t = -ENOENT;

	if (inbox_session(c) && !r->failed)
		t = guest_session_get_ok(inbox_session(c), r->ch, r->ch_gen, d->redelivered,
		                         d->exchange, guest_key(d->routing_key, r->uuid), count,
		                         d->properties, d->body, d->delivery_tag, d->gen);
	if (p) {
		if (t == -EMSGSIZE)
			upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_REJECT,
			                            false);
		else if (t < 0)
			upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_NACK,
			                            true);
		else if (r->no_ack)
			upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_ACK,
			                            false);
	}
	if (t == -EMSGSIZE && inbox_session(c))
		guest_session_fail(inbox_session(c), r->ch, r->ch_gen, 506,
		                   "the message's properties do not fit the frame size");
	inbox_wake(ib, c);
	inbox_req_free(ib, r); /* the get was the chain's last request */
}

void inbox_on_deliver(struct inbox *ib, const struct upstream_proto_delivery *d)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	struct inbox_cons *k = inbox_cons_by_tag(ib, d->consumer_tag);
	amqp_bytes_t rk = d->routing_key;
	int64_t t;

	if (!p)
		return;
	if (!k || k->st != CONS_LIVE || !inbox_session(k->conn)) {
		/* Cancelled meanwhile: back to the queue, for the next consumer. */
		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_NACK, true);
		return;
	}
	rk = guest_key(rk, k->uuid);
	t = guest_session_deliver(inbox_session(k->conn), k->ch, k->ch_gen, k->cid, d->redelivered,
	                          d->exchange, rk, d->properties, d->body, d->delivery_tag, d->gen);
	if (t == -EMSGSIZE) {
		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_REJECT, false);
		log_warn("thread=%u: consumer %s: a delivery's properties do not fit the guest's "
		         "frame size; rejected",
		         ib->thread_id, k->tag);
	} else if (t == -ENOSPC) {
		/* The guest holds its channel's whole bound (acks it keeps back,
		 * or tags of a lost link it never settled): requeueing alone
		 * would have the broker deliver the same message again at once.
		 * The consumer is cancelled instead. */
		struct guest_conn *c = k->conn;

		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_NACK, true);
		log_warn("thread=%u: consumer %s: the guest channel is at its bound of unacked "
		         "deliveries; cancelled",
		         ib->thread_id, k->tag);
		guest_session_cancel_consumer(inbox_session(c), k->cid,
		                              "too many unacknowledged deliveries on the channel");
		inbox_wake(ib, c);
		return;
	} else if (t < 0) {
		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_NACK, true);
	} else if (k->no_ack) {
		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_ACK, false);
	}
	inbox_wake(ib, k->conn);
}

void inbox_on_cancelled(struct inbox *ib, amqp_bytes_t tag)
{
	struct inbox_cons *k = inbox_cons_by_tag(ib, tag);
	struct guest_conn *c;

	if (!k)
		return;
	c = k->conn;
	log_warn("thread=%u: the broker cancelled consumer %s of %s", ib->thread_id, k->tag,
	         k->queue);
	k->st = CONS_DOWN;
	if (inbox_session(c))
		guest_session_cancel_consumer(inbox_session(c), k->cid,
		                              "the inbox queue was deleted");
	/* The session's CANCEL event frees a DOWN consumer; else do it here. */
	k = inbox_cons_by_tag(ib, tag);
	if (k) {
		k->conn = NULL;
		inbox_cons_free(ib, k);
	}
	inbox_wake(ib, c);
}

void inbox_link_up(struct inbox *ib)
{
	for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
		n = k->next;
		if (k->st != CONS_DOWN)
			continue;
		if (!k->conn)
			inbox_cons_free(ib, k);
		else
			inbox_subscribe(ib, k, REQ_RESUBSCRIBE);
	}
}

void inbox_on_closed(struct inbox *ib, uint16_t code, const char *text)
{
	for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
		n = k->next;
		if (k->st == CONS_CANCELLING || !k->conn) {
			inbox_cons_free(ib, k);
			continue;
		}
		k->st = CONS_DOWN;
	}
	/* The channel alone went (the link is up): subscribe again now. */
	if (code && ib->up && upstream_inbox_proto(ib->up))
		inbox_link_up(ib);
}
