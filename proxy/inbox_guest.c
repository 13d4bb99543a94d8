/* inbox_guest.c -- the inboxes' guest side: a session's declare, get,
 * consume, cancel and settle events, and its connection closing, leaving
 * for another poll thread or arriving from one. */
#include "inbox_impl.h"

#include <stdio.h>

static struct inbox_cons *cons_of(struct inbox *ib, const struct guest_conn *c, uint32_t cid)
{
	for (struct inbox_cons *k = ib->cons; k; k = k->next)
		if (k->conn == c && k->cid == cid)
			return k;
	return NULL;
}

static void on_settle(struct inbox *ib, const struct guest_settle *st)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	enum upstream_settle how = UPSTREAM_ACK;
	bool requeue = st->requeue;

	if (!p)
		return; /* the link is gone: the broker requeued it */
	switch (st->kind) {
	case GUEST_SETTLE_ACK:
		how = UPSTREAM_ACK;
		break;
	case GUEST_SETTLE_NACK:
		how = UPSTREAM_NACK;
		break;
	case GUEST_SETTLE_REJECT:
		how = UPSTREAM_REJECT;
		break;
	case GUEST_SETTLE_RELEASE:
		how = UPSTREAM_NACK;
		requeue = true;
		break;
	}
	/* -ESTALE: delivered on an inbox channel that is gone since; the
	 * broker requeued it then and delivers it again. */
	upstream_proto_inbox_settle(p, st->up_gen, st->up_tag, how, requeue);
}

/* A declare or a get of the VM's inbox: one request chain, answered from
 * the broker's replies (at once when nothing needed sending). */
static void queue_request(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm,
                          const struct guest_event *ev, enum req_what what)
{
	bool get = what == REQ_GET;
	struct inbox_req *r = inbox_req_new(ib, what, c, ev->channel, ev->channel_gen, NULL);
	char queue[VM_UUID_LEN + 16];

	if (!r) {
		guest_session_fail(inbox_session(c), ev->channel, ev->channel_gen, 541,
		                   "out of memory");
		return;
	}
	if (get) {
		r->no_ack = ev->no_ack;
		snprintf(r->uuid, sizeof(r->uuid), "%s", vm->uuid);
	}
	snprintf(queue, sizeof(queue), "vm.%s.inbox", vm->uuid);
	if (!inbox_send_chain(ib, r, queue, vm->uuid, NULL, get) && r->replies == 0)
		inbox_on_reply(ib, (uint64_t)(uintptr_t)r,
		               get ? UPSTREAM_INBOX_GET : UPSTREAM_INBOX_DECLARE, false, 0, NULL, 0,
		               0);
}

void inbox_guest_event(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm,
                       const struct guest_event *ev)
{
	switch (ev->type) {
	case GUEST_EVENT_DECLARE:
		queue_request(ib, c, vm, ev, REQ_DECLARE);
		break;
	case GUEST_EVENT_GET:
		queue_request(ib, c, vm, ev, REQ_GET);
		break;
	case GUEST_EVENT_CONSUME: {
		struct inbox_cons *k = inbox_cons_new(ib, c, vm, ev);

		if (!k) {
			guest_session_fail(inbox_session(c), ev->channel, ev->channel_gen, 541,
			                   "out of memory");
			break;
		}
		inbox_subscribe(ib, k, REQ_CONSUME);
		break;
	}
	case GUEST_EVENT_CANCEL: {
		struct inbox_cons *k = cons_of(ib, c, ev->consumer_id);

		if (k)
			inbox_cancel_upstream(ib, k);
		break;
	}
	case GUEST_EVENT_SETTLE:
		on_settle(ib, &ev->settle);
		break;
	default:
		break;
	}
	inbox_wake(ib, c);
}

/* Nothing here refers to C afterwards: its consumers are cancelled at the
 * broker, its requests answered by nobody (SESS, when given, gets a 506
 * for those the guest waits for: C is moving, and its session stays). */
static void cut_loose(struct inbox *ib, struct guest_conn *c, struct guest_session *sess)
{
	for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
		n = k->next;
		if (k->conn == c)
			inbox_cancel_upstream(ib, k);
	}
	for (struct inbox_req *r = ib->reqs; r; r = r->next) {
		if (r->conn != c)
			continue;
		if (sess && r->what != REQ_CANCEL && r->what != REQ_RESUBSCRIBE)
			guest_session_fail(sess, r->ch, r->ch_gen, 506,
			                   "the VM moved to another poll thread; try again");
		r->conn = NULL;
	}
}

void inbox_conn_closing(struct inbox *ib, struct guest_conn *c, struct guest_session *sess)
{
	/* Deliveries back and consumers cancelled, through the events. */
	if (sess)
		guest_session_release_all(sess);
	cut_loose(ib, c, NULL);
}

static void requeue_detached(void *ud, uint64_t up_tag, uint32_t up_gen)
{
	struct inbox *ib = ud;
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;

	if (p)
		upstream_proto_inbox_settle(p, up_gen, up_tag, UPSTREAM_NACK, true);
}

void inbox_conn_leaving(struct inbox *ib, struct guest_conn *c)
{
	if (!inbox_session(c))
		return;
	guest_session_detach_deliveries(inbox_session(c), requeue_detached, ib);
	cut_loose(ib, c, inbox_session(c));
}

struct arrival {
	struct inbox *ib;
	struct guest_conn *c;
	const struct vm_info *vm;
};

static void adopt_consumer(void *ud, uint16_t channel, uint32_t channel_gen, uint32_t cid,
                           uint16_t prefetch, bool no_ack)
{
	struct arrival *a = ud;
	struct guest_event ev = {.channel = channel,
	                         .channel_gen = channel_gen,
	                         .consumer_id = cid,
	                         .prefetch = prefetch,
	                         .no_ack = no_ack};
	struct inbox_cons *k = inbox_cons_new(a->ib, a->c, a->vm, &ev);

	if (!k) {
		guest_session_cancel_consumer(inbox_session(a->c), cid, "out of memory");
		return;
	}
	k->st = CONS_DOWN;
}

void inbox_conn_arrived(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm)
{
	struct arrival a = {ib, c, vm};

	if (!inbox_session(c))
		return;
	guest_session_foreach_consumer(inbox_session(c), adopt_consumer, &a);
	if (ib->up && upstream_inbox_proto(ib->up)) {
		for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
			n = k->next;
			if (k->conn == c && k->st == CONS_DOWN)
				inbox_subscribe(ib, k, REQ_RESUBSCRIBE);
		}
	}
	inbox_wake(ib, c);
}
