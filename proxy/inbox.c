/* inbox.c -- see inbox.h.
 *
 * Every consumer of a guest is one consumer on the link's inbox channel,
 * with its own tag ("vmproxyd.<thread>.<seq>") and the guest's prefetch
 * (capped at inbox.max_prefetch) as its basic.qos: the broker never has
 * more than that many unacked deliveries out to it, so a guest that stops
 * acking, or stops reading its socket, stops the flow for that consumer
 * alone and holds at most prefetch x inbox.max_message_bytes here.
 * Deliveries are settled at the broker one by one (never "multiple": the
 * channel is shared by every VM of the thread), and only on the channel
 * generation that delivered them; after the channel or link was lost the
 * broker has requeued them already, and a late guest ack is dropped.
 *
 * Requests to the broker are pipelined (declare, bind, qos, consume) and
 * answered in order; one guest operation is one struct inbox_req whose
 * replies are counted down. A connection that closes meanwhile is cut
 * loose from its requests and consumers (conn set to NULL), so nothing
 * here holds a reference to a guest connection. */
#include "inbox.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "field.h"
#include "log.h"

#define TAG_PREFIX "vmproxyd."
#define BUCKETS    256

enum cons_state {
	CONS_SUBSCRIBING, /* qos + consume sent */
	CONS_LIVE,
	CONS_CANCELLING, /* basic.cancel sent; freed at cancel-ok */
	CONS_DOWN,       /* the inbox channel or link was lost: subscribe again */
};

struct inbox_cons {
	struct inbox_cons *next, *hnext;
	struct guest_conn *conn; /* NULL: the guest is gone, cancel at the broker */
	uint16_t ch;
	uint32_t ch_gen, cid;
	uint64_t seq;
	enum cons_state st;
	bool no_ack;
	uint16_t prefetch; /* as sent in basic.qos */
	char tag[48];
	char uuid[VM_UUID_LEN + 1];
	char queue[VM_UUID_LEN + 16];
};

enum req_what {
	REQ_DECLARE,     /* a guest's queue.declare */
	REQ_CONSUME,     /* a guest's basic.consume */
	REQ_RESUBSCRIBE, /* a consumer's subscription after the channel was lost */
	REQ_CANCEL,      /* a consumer's basic.cancel */
	REQ_GET,         /* a guest's basic.get */
};

struct inbox_req {
	struct inbox_req *prev, *next; /* the inbox's outstanding requests */
	enum req_what what;
	struct guest_conn *conn; /* NULL once it closed */
	uint16_t ch;
	uint32_t ch_gen;
	struct inbox_cons *k;
	unsigned replies; /* still to come */
	bool failed;
	uint16_t code;
	char text[200];
	uint32_t count, consumers;
	bool no_ack;                /* GET */
	char uuid[VM_UUID_LEN + 1]; /* GET: whose routing key prefix to strip */
};

struct inbox {
	const struct proxy_config *cfg;
	unsigned thread_id;
	inbox_wake_fn wake;
	void *ud;
	struct upstream *up;
	struct inbox_cons *cons; /* all */
	struct inbox_cons *bucket[BUCKETS];
	uint32_t ncons;
	struct inbox_req *reqs;
	uint64_t next_seq;
	amqp_table_entry_t args[4];
	amqp_table_t qargs;
};

int inbox_new(const struct proxy_config *cfg, unsigned thread_id, inbox_wake_fn wake,
              void *userdata, struct inbox **out)
{
	struct inbox *ib = calloc(1, sizeof(*ib));

	if (!ib)
		return -ENOMEM;
	ib->cfg = cfg;
	ib->thread_id = thread_id;
	ib->wake = wake;
	ib->ud = userdata;
	ib->args[0] = field_utf8("x-queue-type", cfg->inbox.quorum ? "quorum" : "classic");
	ib->args[1] = field_i64("x-max-length", cfg->inbox.max_length);
	ib->args[2] = field_i64("x-message-ttl", cfg->inbox.message_ttl_ms);
	/* A full inbox refuses (nacks) new control messages: the sender
	 * learns of it, and what the VM has not read yet is kept. */
	ib->args[3] = field_utf8("x-overflow", "reject-publish");
	ib->qargs = (amqp_table_t){4, ib->args};
	*out = ib;
	return 0;
}

void inbox_set_link(struct inbox *ib, struct upstream *up)
{
	ib->up = up;
}

void inbox_free(struct inbox *ib)
{
	if (!ib)
		return;
	while (ib->cons) {
		struct inbox_cons *k = ib->cons;
		ib->cons = k->next;
		free(k);
	}
	while (ib->reqs) {
		struct inbox_req *r = ib->reqs;
		ib->reqs = r->next;
		free(r);
	}
	free(ib);
}

void inbox_session_config(const struct proxy_config *cfg, struct guest_session_config *sc)
{
	sc->inbox_name = cfg->inbox.enabled ? cfg->inbox.name : NULL;
	sc->max_consumers = cfg->inbox.max_consumers;
	/* What the broker may have out to one connection's consumers. */
	sc->max_unacked = (uint32_t)cfg->inbox.max_consumers * cfg->inbox.max_prefetch;
}

/* ---- consumers ---------------------------------------------------------------- */

static unsigned bucket_of(uint64_t seq)
{
	return (unsigned)(seq % BUCKETS);
}

static struct inbox_cons *cons_by_tag(struct inbox *ib, amqp_bytes_t tag)
{
	char buf[48];
	const char *dot;
	uint64_t seq;

	if (tag.len >= sizeof(buf) || tag.len <= sizeof(TAG_PREFIX))
		return NULL;
	memcpy(buf, tag.bytes, tag.len);
	buf[tag.len] = '\0';
	dot = strrchr(buf, '.');
	if (!dot || sscanf(dot + 1, "%" SCNu64, &seq) != 1)
		return NULL;
	for (struct inbox_cons *k = ib->bucket[bucket_of(seq)]; k; k = k->hnext)
		if (k->seq == seq && strcmp(k->tag, buf) == 0)
			return k;
	return NULL;
}

static struct inbox_cons *cons_new(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm,
                                   const struct guest_event *ev)
{
	struct inbox_cons *k = calloc(1, sizeof(*k));
	uint16_t max = ib->cfg->inbox.max_prefetch;

	if (!k)
		return NULL;
	k->conn = c;
	k->ch = ev->channel;
	k->ch_gen = ev->channel_gen;
	k->cid = ev->consumer_id;
	k->no_ack = ev->no_ack;
	k->prefetch = ev->prefetch == 0 || ev->prefetch > max ? max : ev->prefetch;
	k->seq = ++ib->next_seq;
	snprintf(k->tag, sizeof(k->tag), TAG_PREFIX "%u.%" PRIu64, ib->thread_id, k->seq);
	snprintf(k->uuid, sizeof(k->uuid), "%s", vm->uuid);
	snprintf(k->queue, sizeof(k->queue), "vm.%s.inbox", vm->uuid);
	k->next = ib->cons;
	ib->cons = k;
	k->hnext = ib->bucket[bucket_of(k->seq)];
	ib->bucket[bucket_of(k->seq)] = k;
	ib->ncons++;
	return k;
}

static void cons_free(struct inbox *ib, struct inbox_cons *k)
{
	struct inbox_cons **pp;

	for (pp = &ib->cons; *pp; pp = &(*pp)->next) {
		if (*pp == k) {
			*pp = k->next;
			break;
		}
	}
	for (pp = &ib->bucket[bucket_of(k->seq)]; *pp; pp = &(*pp)->hnext) {
		if (*pp == k) {
			*pp = k->hnext;
			break;
		}
	}
	for (struct inbox_req *r = ib->reqs; r; r = r->next)
		if (r->k == k)
			r->k = NULL;
	ib->ncons--;
	free(k);
}

uint32_t inbox_consumers(const struct inbox *ib, const struct guest_conn *c)
{
	uint32_t n = 0;

	for (const struct inbox_cons *k = ib->cons; k; k = k->next)
		if (!c || k->conn == c)
			n++;
	return n;
}

/* ---- requests ------------------------------------------------------------------- */

static struct inbox_req *req_new(struct inbox *ib, enum req_what what, struct guest_conn *c,
                                 uint16_t ch, uint32_t ch_gen, struct inbox_cons *k)
{
	struct inbox_req *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	r->what = what;
	r->conn = c;
	r->ch = ch;
	r->ch_gen = ch_gen;
	r->k = k;
	r->next = ib->reqs;
	if (ib->reqs)
		ib->reqs->prev = r;
	ib->reqs = r;
	return r;
}

static void req_free(struct inbox *ib, struct inbox_req *r)
{
	if (r->prev)
		r->prev->next = r->next;
	else
		ib->reqs = r->next;
	if (r->next)
		r->next->prev = r->prev;
	free(r);
}

static void wake(struct inbox *ib, struct guest_conn *c)
{
	if (c && ib->wake)
		ib->wake(ib->ud, c);
}

/* Declare and bind K's queue (or VM's, for a plain declare), then, for a
 * subscription, qos and consume. R counts the replies; a request that
 * cannot even be queued fails R at once. Returns false then. */
static bool send_chain(struct inbox *ib, struct inbox_req *r, const char *queue, const char *uuid,
                       struct inbox_cons *k, bool get)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	char key[VM_UUID_LEN + 3];
	uint64_t cookie = (uint64_t)(uintptr_t)r;
	int e;

	if (!p) {
		r->failed = true;
		r->code = 506;
		snprintf(r->text, sizeof(r->text), "the management link is down; try again later");
		return false;
	}
	snprintf(key, sizeof(key), "%s.#", uuid);
	e = upstream_proto_inbox_declare(p, queue, &ib->qargs, cookie);
	if (e == 0) {
		r->replies++;
		e = upstream_proto_inbox_bind(p, queue, ib->cfg->inbox.exchange, key, cookie);
	}
	if (e == 0 && k) {
		r->replies++;
		e = upstream_proto_inbox_consume(p, queue, k->tag, k->prefetch, cookie);
	} else if (e == 0 && get) {
		r->replies++;
		e = upstream_proto_inbox_get(p, queue, cookie);
	}
	if (e == 0) {
		r->replies++;
		return true;
	}
	/* What was queued is answered as usual; the request fails after it. */
	r->failed = true;
	r->code = 541;
	snprintf(r->text, sizeof(r->text), "cannot send to the broker: %s", strerror(-e));
	return false;
}

static void cancel_upstream(struct inbox *ib, struct inbox_cons *k)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	struct inbox_req *r;

	k->conn = NULL;
	if (k->st != CONS_LIVE || !p) {
		/* DOWN: nothing at the broker. SUBSCRIBING: cancelled when its
		 * consume-ok comes. CANCELLING: under way. */
		if (k->st == CONS_DOWN || !p)
			cons_free(ib, k);
		return;
	}
	r = req_new(ib, REQ_CANCEL, NULL, 0, 0, k);
	if (!r || upstream_proto_inbox_cancel(p, k->tag, (uint64_t)(uintptr_t)r) < 0) {
		/* The consumer stays at the broker until the channel goes;
		 * its deliveries are requeued as they come (no guest). */
		if (r)
			req_free(ib, r);
		return;
	}
	r->replies = 1;
	k->st = CONS_CANCELLING;
}

static void subscribe(struct inbox *ib, struct inbox_cons *k, enum req_what what)
{
	struct inbox_req *r = req_new(ib, what, k->conn, k->ch, k->ch_gen, k);

	k->st = CONS_SUBSCRIBING;
	if (!r) {
		if (k->conn && k->conn->sess)
			guest_session_cancel_consumer(k->conn->sess, k->cid, "out of memory");
		wake(ib, k->conn);
		return;
	}
	if (!send_chain(ib, r, k->queue, k->uuid, k, false) && r->replies == 0)
		inbox_on_reply(ib, (uint64_t)(uintptr_t)r, UPSTREAM_INBOX_CONSUME, false, 0, NULL,
		               0, 0);
}

/* ---- the guest's side ------------------------------------------------------------- */

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

void inbox_guest_event(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm,
                       const struct guest_event *ev)
{
	switch (ev->type) {
	case GUEST_EVENT_DECLARE: {
		struct inbox_req *r =
		        req_new(ib, REQ_DECLARE, c, ev->channel, ev->channel_gen, NULL);
		char queue[VM_UUID_LEN + 16];

		if (!r) {
			guest_session_fail(c->sess, ev->channel, ev->channel_gen, 541,
			                   "out of memory");
			break;
		}
		snprintf(queue, sizeof(queue), "vm.%s.inbox", vm->uuid);
		if (!send_chain(ib, r, queue, vm->uuid, NULL, false) && r->replies == 0)
			inbox_on_reply(ib, (uint64_t)(uintptr_t)r, UPSTREAM_INBOX_DECLARE, false, 0,
			               NULL, 0, 0);
		break;
	}
	case GUEST_EVENT_GET: {
		struct inbox_req *r = req_new(ib, REQ_GET, c, ev->channel, ev->channel_gen, NULL);
		char queue[VM_UUID_LEN + 16];

		if (!r) {
			guest_session_fail(c->sess, ev->channel, ev->channel_gen, 541,
			                   "out of memory");
			break;
		}
		r->no_ack = ev->no_ack;
		snprintf(r->uuid, sizeof(r->uuid), "%s", vm->uuid);
		snprintf(queue, sizeof(queue), "vm.%s.inbox", vm->uuid);
		if (!send_chain(ib, r, queue, vm->uuid, NULL, true) && r->replies == 0)
			inbox_on_reply(ib, (uint64_t)(uintptr_t)r, UPSTREAM_INBOX_GET, false, 0,
			               NULL, 0, 0);
		break;
	}
	case GUEST_EVENT_CONSUME: {
		struct inbox_cons *k = cons_new(ib, c, vm, ev);

		if (!k) {
			guest_session_fail(c->sess, ev->channel, ev->channel_gen, 541,
			                   "out of memory");
			break;
		}
		subscribe(ib, k, REQ_CONSUME);
		break;
	}
	case GUEST_EVENT_CANCEL: {
		struct inbox_cons *k = cons_of(ib, c, ev->consumer_id);

		if (k)
			cancel_upstream(ib, k);
		break;
	}
	case GUEST_EVENT_SETTLE:
		on_settle(ib, &ev->settle);
		break;
	default:
		break;
	}
	wake(ib, c);
}

/* Nothing here refers to C afterwards: its consumers are cancelled at the
 * broker, its requests answered by nobody (SESS, when given, gets a 506
 * for those the guest waits for: C is moving, and its session stays). */
static void cut_loose(struct inbox *ib, struct guest_conn *c, struct guest_session *sess)
{
	for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
		n = k->next;
		if (k->conn == c)
			cancel_upstream(ib, k);
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
	if (!c->sess)
		return;
	guest_session_detach_deliveries(c->sess, requeue_detached, ib);
	cut_loose(ib, c, c->sess);
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
	struct inbox_cons *k = cons_new(a->ib, a->c, a->vm, &ev);

	if (!k) {
		guest_session_cancel_consumer(a->c->sess, cid, "out of memory");
		return;
	}
	k->st = CONS_DOWN;
}

void inbox_conn_arrived(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm)
{
	struct arrival a = {ib, c, vm};

	if (!c->sess)
		return;
	guest_session_foreach_consumer(c->sess, adopt_consumer, &a);
	if (ib->up && upstream_inbox_proto(ib->up)) {
		for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
			n = k->next;
			if (k->conn == c && k->st == CONS_DOWN)
				subscribe(ib, k, REQ_RESUBSCRIBE);
		}
	}
	wake(ib, c);
}

void inbox_link_up(struct inbox *ib)
{
	for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
		n = k->next;
		if (k->st != CONS_DOWN)
			continue;
		if (!k->conn)
			cons_free(ib, k);
		else
			subscribe(ib, k, REQ_RESUBSCRIBE);
	}
}

/* ---- the broker's side ------------------------------------------------------------- */

static void req_done(struct inbox *ib, struct inbox_req *r)
{
	struct guest_conn *c = r->conn;
	struct guest_session *s = c ? c->sess : NULL;
	struct inbox_cons *k = r->k;

	switch (r->what) {
	case REQ_DECLARE:
		if (!s)
			break;
		if (r->failed)
			guest_session_fail(s, r->ch, r->ch_gen, r->code ? r->code : 506, r->text);
		else
			guest_session_declare_ok(s, r->ch, r->ch_gen, r->count, r->consumers);
		break;
	case REQ_CONSUME:
	case REQ_RESUBSCRIBE:
		if (!k)
			break;
		if (r->failed) {
			if (k->conn && k->conn->sess) {
				char why[300];
				snprintf(why, sizeof(why),
				         "inbox consumer refused by the broker: %u %s", r->code,
				         r->text);
				if (r->what == REQ_CONSUME)
					guest_session_fail(k->conn->sess, k->ch, k->ch_gen,
					                   r->code ? r->code : 506, r->text);
				else
					guest_session_cancel_consumer(k->conn->sess, k->cid, why);
				log_warn("thread=%u: consumer %s of %s: %s", ib->thread_id, k->tag,
				         k->queue, why);
			}
			c = k->conn;
			/* The session's CANCEL event may have freed it already. */
			k = r->k;
			if (k && k->st != CONS_DOWN) {
				k->st = CONS_DOWN;
				k->conn = NULL;
				cons_free(ib, k);
			}
			break;
		}
		k->st = CONS_LIVE;
		if (!k->conn) {
			cancel_upstream(ib, k);
			break;
		}
		c = k->conn;
		if (r->what == REQ_CONSUME && c->sess)
			guest_session_consume_ok(c->sess, k->ch, k->ch_gen, k->cid);
		break;
	case REQ_CANCEL:
		if (k)
			cons_free(ib, k);
		break;
	case REQ_GET:
		/* Here only when nothing was got: empty, or failed. */
		if (!s)
			break;
		if (r->failed)
			guest_session_fail(s, r->ch, r->ch_gen, r->code ? r->code : 506, r->text);
		else
			guest_session_get_empty(s, r->ch, r->ch_gen);
		break;
	}
	wake(ib, c);
	req_free(ib, r);
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

	if (c && c->sess && !r->failed)
		t = guest_session_get_ok(c->sess, r->ch, r->ch_gen, d->redelivered, d->exchange,
		                         guest_key(d->routing_key, r->uuid), count, d->properties,
		                         d->body, d->delivery_tag, d->gen);
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
	if (t == -EMSGSIZE && c && c->sess)
		guest_session_fail(c->sess, r->ch, r->ch_gen, 506,
		                   "the message's properties do not fit the frame size");
	wake(ib, c);
	req_free(ib, r); /* the get was the chain's last request */
}

void inbox_on_deliver(struct inbox *ib, const struct upstream_proto_delivery *d)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	struct inbox_cons *k = cons_by_tag(ib, d->consumer_tag);
	amqp_bytes_t rk = d->routing_key;
	int64_t t;

	if (!p)
		return;
	if (!k || k->st != CONS_LIVE || !k->conn || !k->conn->sess) {
		/* Cancelled meanwhile: back to the queue, for the next consumer. */
		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_NACK, true);
		return;
	}
	rk = guest_key(rk, k->uuid);
	t = guest_session_deliver(k->conn->sess, k->ch, k->ch_gen, k->cid, d->redelivered,
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
		guest_session_cancel_consumer(c->sess, k->cid,
		                              "too many unacknowledged deliveries on the channel");
		wake(ib, c);
		return;
	} else if (t < 0) {
		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_NACK, true);
	} else if (k->no_ack) {
		upstream_proto_inbox_settle(p, d->gen, d->delivery_tag, UPSTREAM_ACK, false);
	}
	wake(ib, k->conn);
}

void inbox_on_cancelled(struct inbox *ib, amqp_bytes_t tag)
{
	struct inbox_cons *k = cons_by_tag(ib, tag);
	struct guest_conn *c;

	if (!k)
		return;
	c = k->conn;
	log_warn("thread=%u: the broker cancelled consumer %s of %s", ib->thread_id, k->tag,
	         k->queue);
	k->st = CONS_DOWN;
	if (c && c->sess)
		guest_session_cancel_consumer(c->sess, k->cid, "the inbox queue was deleted");
	/* The session's CANCEL event frees a DOWN consumer; else do it here. */
	k = cons_by_tag(ib, tag);
	if (k) {
		k->conn = NULL;
		cons_free(ib, k);
	}
	wake(ib, c);
}

void inbox_on_closed(struct inbox *ib, uint16_t code, const char *text)
{
	for (struct inbox_cons *k = ib->cons, *n; k; k = n) {
		n = k->next;
		if (k->st == CONS_CANCELLING || !k->conn) {
			cons_free(ib, k);
			continue;
		}
		k->st = CONS_DOWN;
	}
	/* The channel alone went (the link is up): subscribe again now. */
	if (code && ib->up && upstream_inbox_proto(ib->up))
		inbox_link_up(ib);
}
