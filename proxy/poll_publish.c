/* poll_publish.c -- a poll thread's publish path: guest publishes stamped
 * and held in their VM's FIFO, the link taking them one VM at a time
 * (vm_queue.h), confirms and returns back to the guests, and the
 * unconfirmed-bytes bounds that block and unblock them. Fairness: a VM
 * publishing flat out queues behind itself, not in front of others; order
 * within a connection is kept because a VM's FIFO is one queue. */
#include "poll_thread_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"
#include "stamp.h"

/* ---- backpressure ------------------------------------------------------ */

#define BOUND_REASON "vmproxy: unconfirmed message limit"
#define ALARM_REASON "vmproxy: the management broker blocks publishers (resource alarm)"

/* A guest is blocked while its VM or its thread is over a bound, the
 * thread's link cannot publish, or the broker blocks the link (a resource
 * alarm); unblocked once none of these holds, so one ending does not
 * unblock a guest another still applies to. The bounds stop reading the
 * guest; the link and the broker alone do not (what the guest sends is
 * held, up to the bounds, and published when the link can). */
void pt_conn_update_blocked(struct poll_thread *pt, struct guest_conn *c)
{
	struct guest_session *s = guest_conn_session(c);

	if (!s)
		return;
	if (guest_conn_vm(c)->blocked || pt->blocked)
		guest_session_set_blocked(s, true, BOUND_REASON);
	else if (pt->link_unable)
		guest_session_set_blocked(s, true, pt->link_reason);
	else if (pt->broker_blocked)
		guest_session_set_blocked(s, true, ALARM_REASON);
	else
		guest_session_set_blocked(s, false, NULL);
	pt_mark_dirty(pt, c);
}

static void vm_set_blocked(struct poll_thread *pt, struct vm_state *v, bool blocked)
{
	struct guest_conn *c;

	if (v->blocked == blocked)
		return;
	v->blocked = blocked;
	if (blocked)
		log_warn("vm=%s thread=%u: %llu unconfirmed bytes held, over the bound: "
			 "pausing its connections until the broker confirms",
			 v->info.name, pt->id, (unsigned long long)v->held_bytes);
	else
		log_info("vm=%s thread=%u: below the bound again, resuming", v->info.name, pt->id);
	for (c = v->conns.head; c; c = guest_conn_vm_next(c))
		pt_conn_update_blocked(pt, c);
}

void pt_check_bounds(struct poll_thread *pt, struct vm_state *v)
{
	const struct proxy_config *cfg = pt->sh->cfg;
	uint64_t vm_max = cfg->limits.unconfirmed_bytes_per_vm;
	uint64_t pt_max = cfg->limits.unconfirmed_bytes_per_thread;

	if (!pt->blocked && pt->held_bytes > pt_max) {
		pt->blocked = true;
		log_warn("thread=%u: %llu unconfirmed bytes held, over the thread bound: "
			 "pausing all its guests", pt->id, (unsigned long long)pt->held_bytes);
		for (struct guest_conn *c = pt->conns.head; c; c = guest_conn_all_next(c))
			pt_conn_update_blocked(pt, c);
	} else if (pt->blocked && pt->held_bytes <= pt_max / 2) {
		pt->blocked = false;
		log_info("thread=%u: below the thread bound again", pt->id);
		for (struct guest_conn *c = pt->conns.head; c; c = guest_conn_all_next(c))
			pt_conn_update_blocked(pt, c);
	}
	if (v) {
		if (!v->blocked && v->held_bytes > vm_max)
			vm_set_blocked(pt, v, true);
		else if (v->blocked && v->held_bytes <= vm_max / 2)
			vm_set_blocked(pt, v, false);
	}
}

/* ---- the link's view of the queues ------------------------------------- */

static struct vm_state *vm_of(struct vmq_entry *e)
{
	return (struct vm_state *)((char *)e - offsetof(struct vm_state, q));
}

/* The next VM's oldest message, by the fair queue (vm_queue.h). */
static struct upstream_msg *op_peek(void *ud)
{
	struct poll_thread *pt = ud;
	struct vmq_entry *e = vm_queue_pick(&pt->ring, pt->sh->cfg->upstream.max_in_flight);

	return e ? vm_of(e)->pend_head : NULL;
}

static void op_pop(void *ud, struct upstream_msg *m)
{
	struct poll_thread *pt = ud;
	struct vm_state *v = vm_of(pt->ring.pick);

	pt->msgs_out++;
	pt->bytes_out += m->body_len;
	v->pend_head = m->next;
	if (!v->pend_head)
		v->pend_tail = NULL;
	m->next = NULL;
	/* Rotate: the next message comes from the next VM. */
	vm_queue_sent(&pt->ring, v->pend_head != NULL);
}

static void op_confirmed(void *ud, struct upstream_msg *m, bool ack)
{
	struct poll_thread *pt = ud;
	struct guest_conn *c = m->conn;
	struct guest_session *s = guest_conn_session(c);
	struct vm_state *v = m->vm;

	vm_queue_settled(&v->q);
	if (ack)
		v->acked++;
	else
		v->nacked++;
	if (m->confirm && s) {
		guest_session_settle(s, m->channel, m->chan_gen, m->guest_tag, ack);
		pt_mark_dirty(pt, c);
	}
	v->refs++; /* msg_free may drop the last reference */
	pt_msg_free(pt, m);
	pt_check_bounds(pt, v);
	pt_vm_unref(pt, v);
}

static void op_requeue(void *ud, struct upstream_msg *m)
{
	struct poll_thread *pt = ud;
	struct vm_state *v = m->vm;

	vm_queue_settled(&v->q);
	m->next = v->pend_head;
	v->pend_head = m;
	if (!v->pend_tail)
		v->pend_tail = m;
	vm_queue_add(&pt->ring, &v->q);
}

static void op_returned(void *ud, struct upstream_msg *m, uint16_t code, const char *text)
{
	struct poll_thread *pt = ud;
	struct guest_conn *c = m->conn;
	struct guest_session *s = guest_conn_session(c);
	amqp_bytes_t ex = { m->ex_len, m->data + m->rk_len + m->props_len };
	amqp_bytes_t rk = { (size_t)(m->rk_len - m->guest_rk_off), m->data + m->guest_rk_off };
	amqp_bytes_t props = { m->props_len, m->data + m->rk_len };
	amqp_bytes_t body = { m->body_len, m->body };

	/* Back to the guest with the names it used, before its confirm. */
	if (s) {
		guest_session_return(s, m->channel, m->chan_gen, code, text, ex, rk, props, body);
		pt_mark_dirty(pt, c);
	}
}

static void op_state_changed(void *ud, bool up)
{
	struct poll_thread *pt = ud;

	atomic_store_explicit(&pt->g.link_up, up, memory_order_relaxed);
	if (up)
		inbox_link_up(pt->inbox);
}

static void op_inbox_reply(void *ud, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
			   uint16_t code, const char *text, uint32_t count, uint32_t consumers)
{
	struct poll_thread *pt = ud;

	inbox_on_reply(pt->inbox, cookie, kind, ok, code, text, count, consumers);
}

static void op_inbox_deliver(void *ud, const struct upstream_proto_delivery *d)
{
	struct poll_thread *pt = ud;

	inbox_on_deliver(pt->inbox, d);
}

static void op_inbox_got(void *ud, uint64_t cookie, const struct upstream_proto_delivery *d,
			 uint32_t count)
{
	struct poll_thread *pt = ud;

	inbox_on_got(pt->inbox, cookie, d, count);
}

static void op_inbox_cancelled(void *ud, amqp_bytes_t tag)
{
	struct poll_thread *pt = ud;

	inbox_on_cancelled(pt->inbox, tag);
}

static void op_inbox_closed(void *ud, uint16_t code, const char *text)
{
	struct poll_thread *pt = ud;

	inbox_on_closed(pt->inbox, code, text);
}

/* The reason tells the guest why without the broker's text or address
 * (those are for the operator: the log and vmproxyctl threads). */
static void op_publishing(void *ud, bool able, uint16_t code)
{
	struct poll_thread *pt = ud;

	if (pt->link_unable == !able)
		return;
	pt->link_unable = !able;
	if (!able) {
		if (code >= 400)
			snprintf(pt->link_reason, sizeof(pt->link_reason),
				 "vmproxy: the management broker refuses publishing (%u)", code);
		else
			snprintf(pt->link_reason, sizeof(pt->link_reason),
				 "vmproxy: the management broker is unreachable");
		log_warn("thread=%u: the link cannot publish: guests that take "
			 "connection.blocked are told \"%s\"", pt->id, pt->link_reason);
	} else {
		log_info("thread=%u: the link publishes again: guests are unblocked", pt->id);
	}
	for (struct guest_conn *c = pt->conns.head; c; c = guest_conn_all_next(c))
		pt_conn_update_blocked(pt, c);
}

/* The guests hear of a broker's alarm in our words (the broker's own
 * reason, "low on memory" say, is logged by the link). */
static void op_broker_flow(void *ud, bool blocked)
{
	struct poll_thread *pt = ud;

	pt->broker_blocked = blocked;
	if (blocked)
		log_warn("thread=%u: the broker blocks the link: guests that take "
			 "connection.blocked are told \"%s\"", pt->id, ALARM_REASON);
	for (struct guest_conn *c = pt->conns.head; c; c = guest_conn_all_next(c))
		pt_conn_update_blocked(pt, c);
}

const struct upstream_ops pt_upstream_ops = {
	.peek = op_peek,
	.pop = op_pop,
	.confirmed = op_confirmed,
	.requeue = op_requeue,
	.state_changed = op_state_changed,
	.returned = op_returned,
	.publishing = op_publishing,
	.broker_flow = op_broker_flow,
	.inbox_reply = op_inbox_reply,
	.inbox_deliver = op_inbox_deliver,
	.inbox_got = op_inbox_got,
	.inbox_cancelled = op_inbox_cancelled,
	.inbox_closed = op_inbox_closed,
};

void pt_inbox_wake(void *ud, struct guest_conn *c)
{
	pt_mark_dirty(ud, c);
}

/* ---- guest publishes ---------------------------------------------------- */

static void reject_publish(struct poll_thread *pt, struct guest_conn *c,
			   const struct guest_publish *pub, const char *why)
{
	log_warn("vm=%s conn=%u: message dropped: %s", guest_conn_vm(c)->info.name,
		 guest_conn_id(c), why);
	if (pub->confirm) {
		guest_session_settle(guest_conn_session(c), pub->channel, pub->channel_gen,
				     pub->delivery_tag, false);
		pt_mark_dirty(pt, c);
	}
	free(pub->body);
}

void pt_on_publish(struct poll_thread *pt, struct guest_conn *c, const struct guest_publish *pub)
{
	struct vm_state *v = guest_conn_vm(c);
	size_t uuid_len = strlen(v->info.uuid);
	size_t rk_len = uuid_len + 1 + pub->routing_key.len;
	struct stamp st = { v->info.uuid, v->info.name, guest_conn_cid(c), pt->sh->cfg->hostname,
			    (int64_t)clock_wall_ms() };
	struct upstream_msg *m;
	int plen;

	if (rk_len > 255) {
		reject_publish(pt, c, pub, "routing key too long once prefixed with the VM uuid");
		return;
	}
	plen = stamp_encode(&st, pub->properties, &pt->pool, pt->props_buf, PROPS_BUF_SIZE);
	if (plen < 0) {
		reject_publish(pt, c, pub, amqp_error_string2(plen));
		return;
	}
	m = malloc(sizeof(*m) + rk_len + (size_t)plen + pub->exchange.len);
	if (!m) {
		reject_publish(pt, c, pub, "out of memory");
		return;
	}
	memset(m, 0, sizeof(*m));
	memcpy(m->data, v->info.uuid, uuid_len);
	m->data[uuid_len] = '.';
	memcpy(m->data + uuid_len + 1, pub->routing_key.bytes, pub->routing_key.len);
	memcpy(m->data + rk_len, pt->props_buf, (size_t)plen);
	if (pub->exchange.len)
		memcpy(m->data + rk_len + (size_t)plen, pub->exchange.bytes, pub->exchange.len);
	m->rk_len = (uint16_t)rk_len;
	m->guest_rk_off = (uint16_t)(uuid_len + 1);
	m->props_len = (uint32_t)plen;
	m->ex_len = (uint8_t)pub->exchange.len;
	m->mandatory = pub->mandatory;
	m->body = pub->body;
	m->body_len = pub->body_len;
	m->channel = pub->channel;
	m->chan_gen = pub->channel_gen;
	m->guest_tag = pub->delivery_tag;
	m->confirm = pub->confirm;
	m->size = (uint32_t)(sizeof(*m) + rk_len + (size_t)plen + pub->exchange.len + pub->body_len);
	m->conn = c;
	m->vm = v;
	guest_conn_ref(c);
	v->refs++;
	v->msgs_in++;
	v->bytes_in += pub->body_len;
	pt->msgs_in++;
	pt->bytes_in += pub->body_len;
	v->held_bytes += m->size;
	v->held_msgs++;
	pt->held_bytes += m->size;
	pt->held_msgs++;
	atomic_store_explicit(&pt->g.held_messages, pt->held_msgs, memory_order_relaxed);
	if (v->pend_tail)
		v->pend_tail->next = m;
	else
		v->pend_head = m;
	v->pend_tail = m;
	vm_queue_add(&pt->ring, &v->q);
	pt_check_bounds(pt, v);
}
