/* poll_thread.c -- see poll_thread.h.
 *
 * Ownership: a guest_conn lives while its socket is open or while any of
 * its messages is held (refs); a vm_state while it has connections or held
 * messages. Neither is freed inside an engine callback: a closing
 * connection is marked and closed after the dispatch round.
 *
 * Fairness: each VM has its own FIFO of messages waiting for the link, and
 * the link takes one message at a time from VMs in round-robin order, so a
 * VM publishing flat out queues behind itself, not in front of others.
 * Order within a connection is kept because a VM's FIFO is one queue. */
#include "poll_thread.h"

#include <errno.h>
#include <stdarg.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "guest_conn.h"
#include "guest_session.h"
#include "hash.h"
#include "inbox.h"
#include "log.h"
#include "mailbox.h"
#include "stamp.h"
#include "upstream.h"
#include "vm_queue.h"

#define READ_CHUNK     65536
#define MAX_EVENTS     256
#define SCAN_EVERY_MS  250
#define VM_BUCKETS     1024
#define PROPS_BUF_SIZE (256u << 10)

struct vm_state {
	struct vm_info info;
	struct vm_state *hash_next;
	struct guest_conn *conns;
	uint32_t nconns;
	uint32_t refs; /* connections + held messages */
	uint64_t held_bytes, held_msgs;
	struct upstream_msg *pend_head, *pend_tail; /* waiting for the link */
	struct vmq_entry q;			    /* in the thread's fair queue */
	bool blocked; /* over its unconfirmed-bytes bound */
	bool migrating; /* quiescing: not read, waiting for confirms */
	unsigned migrate_to;
	uint64_t migrate_deadline, migrate_started;
	struct migrate_result *migrate_res;
	struct vm_state *mig_next; /* the thread's migrating list (holds a reference) */
	uint64_t msgs_in, bytes_in, acked, nacked;
	bool leaving;            /* migrating to another host: not read, closed once settled */
	uint64_t leave_deadline; /* closed then even if messages are still unconfirmed */
};

/* What a poll thread's mailbox carries (struct mail.type); the link's
 * resolve results (UPSTREAM_MAIL_RESOLVED) arrive there too. */
enum mail_type {
	MAIL_NEW_CONN = 1, /* acceptor: a delegated guest connection */
	MAIL_VM_GONE,	   /* libvirt: close a VM's connections with 320 */
	MAIL_QUERY,	   /* admin, balancer, metrics: report what the thread owns */
	MAIL_PAUSE,	   /* shutdown: stop reading guests, keep settling */
	MAIL_DRAIN,	   /* shutdown: close every guest with 320 */
	MAIL_STOP,	   /* shutdown: leave the loop */
	MAIL_MIGRATE_OUT,  /* balancer, admin: hand a VM to another thread */
	MAIL_MIGRATE_IN,   /* another poll thread: adopt a VM's connections */
	MAIL_RELINK,	   /* SIGHUP: reconnect the link when idle, re-reading TLS files */
	MAIL_RECONFIG,	   /* SIGHUP: new guest session settings */
};
_Static_assert(UPSTREAM_MAIL_RESOLVED > MAIL_RECONFIG, "mail types overlap");

struct new_conn_mail {
	struct mail mail;
	int fd;
	uint32_t conn_id;
	struct vm_info vm;
	char peer[80];
};

/* MAIL_VM_GONE: see poll_thread_vm_change. */
struct vm_gone_mail {
	struct mail mail;
	char uuid[VM_UUID_LEN + 1];
	enum vm_change how;
	uint32_t cid;
	uint32_t settle_ms;
};

struct reconfig_mail {
	struct mail mail;
	const char *const *allowed_exchanges;
	uint16_t channel_max;
	uint16_t heartbeat;
	uint32_t handshake_timeout_ms;
};

/* MAIL_QUERY: each thread fills REPORTS[thread] and counts PENDING down;
 * the asker waits on COND at most its timeout. Shared by reference (REFS:
 * the asker and every mail not yet answered), so an asker that gave up
 * (ABANDONED) leaves it to the last late answer to free. */
struct query {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned pending, refs, n;
	bool abandoned;
	struct poll_report *reports; /* N of them, one per thread */
};

struct query_mail {
	struct mail mail;
	struct query *q;
};

struct migrate_out_mail {
	struct mail mail;
	char uuid[VM_UUID_LEN + 1];
	unsigned to;
	uint32_t timeout_ms;
	struct migrate_result *res;
};

/* MAIL_MIGRATE_IN: a quiesced VM and its connections, from thread FROM. */
struct migrate_in_mail {
	struct mail mail;
	struct vm_state *vm;
	unsigned from;
};

struct poll_thread {
	unsigned id;
	int cpu;
	const struct poll_shared *sh;
	pthread_t tid;
	int epfd;
	struct mailbox mb;
	struct upstream *up;
	struct inbox *inbox; /* the VMs' inbox consumers on the link */

	struct vm_state *vms[VM_BUCKETS];
	uint32_t nvms;
	struct guest_conn *conns; /* all, doubly linked */
	uint32_t nconns;
	unsigned nleaving; /* VMs leaving for another host (vm_state.leaving) */
	struct guest_conn *dirty;
	struct vm_queue ring; /* VMs with messages waiting */
	struct vm_state *migrating;
	uint64_t msgs_in, bytes_in, msgs_out, bytes_out, migrations_in, migrations_out;
	uint64_t guest_reads, guest_writes; /* recv() and send() calls on guest sockets */
	uint64_t busy_ns, busy_max_ns; /* loop time spent working, since the last report */

	bool stopping;
	bool paused; /* draining: guests are no longer read */
	bool started;
	bool blocked; /* the whole thread is over its bound */
	bool link_unable; /* the link cannot publish: guests are told */
	char link_reason[96]; /* what connection.blocked says then */
	uint64_t held_bytes, held_msgs;
	uint64_t next_scan;

	struct guest_session_config scfg; /* this thread's sessions read it */
	amqp_pool_t pool;
	unsigned char *props_buf;
	unsigned char read_buf[READ_CHUNK];
	struct poll_gauges g;
};

static uint64_t hash_uuid(const char *s)
{
	return hash_fnv1a64(s);
}

static struct vm_state *vm_find(struct poll_thread *pt, const char *uuid)
{
	struct vm_state *v = pt->vms[hash_uuid(uuid) % VM_BUCKETS];

	while (v && strcmp(v->info.uuid, uuid) != 0)
		v = v->hash_next;
	return v;
}

static struct vm_state *vm_get(struct poll_thread *pt, const struct vm_info *info)
{
	struct vm_state *v = vm_find(pt, info->uuid);
	size_t b;

	if (v)
		return v;
	v = calloc(1, sizeof(*v));
	if (!v)
		return NULL;
	v->info = *info;
	b = hash_uuid(info->uuid) % VM_BUCKETS;
	v->hash_next = pt->vms[b];
	pt->vms[b] = v;
	pt->nvms++;
	return v;
}

static void vm_unref(struct poll_thread *pt, struct vm_state *v)
{
	struct vm_state **pv;

	if (--v->refs > 0)
		return;
	for (pv = &pt->vms[hash_uuid(v->info.uuid) % VM_BUCKETS]; *pv != v; pv = &(*pv)->hash_next)
		;
	*pv = v->hash_next;
	pt->nvms--;
	free(v);
}

static void conn_unref(struct poll_thread *pt, struct guest_conn *c)
{
	if (--c->refs > 0)
		return;
	vm_unref(pt, c->vm);
	free(c);
}

static void mark_dirty(struct poll_thread *pt, struct guest_conn *c)
{
	if (c->dirty || !c->sess)
		return;
	c->dirty = true;
	c->dirty_next = pt->dirty;
	pt->dirty = c;
}

static void msg_free(struct poll_thread *pt, struct upstream_msg *m)
{
	struct vm_state *v = m->vm;

	v->held_bytes -= m->size;
	v->held_msgs--;
	pt->held_bytes -= m->size;
	pt->held_msgs--;
	atomic_store_explicit(&pt->g.held_messages, pt->held_msgs, memory_order_relaxed);
	free(m->body);
	conn_unref(pt, m->conn);
	vm_unref(pt, v);
	free(m);
}

/* ---- backpressure ------------------------------------------------------ */

#define BOUND_REASON "vmproxy: unconfirmed message limit"

/* A guest is blocked while its VM or its thread is over a bound, or the
 * thread's link cannot publish; unblocked once none of the three holds,
 * so one ending does not unblock a guest another still applies to. The
 * bounds stop reading the guest; the link alone does not (what the guest
 * sends is held, up to the bounds, and published when the link works). */
static void conn_update_blocked(struct poll_thread *pt, struct guest_conn *c)
{
	if (!c->sess)
		return;
	if (c->vm->blocked || pt->blocked)
		guest_session_set_blocked(c->sess, true, BOUND_REASON);
	else if (pt->link_unable)
		guest_session_set_blocked(c->sess, true, pt->link_reason);
	else
		guest_session_set_blocked(c->sess, false, NULL);
	mark_dirty(pt, c);
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
	for (c = v->conns; c; c = c->vm_next)
		conn_update_blocked(pt, c);
}

static void check_bounds(struct poll_thread *pt, struct vm_state *v)
{
	const struct proxy_config *cfg = pt->sh->cfg;
	uint64_t vm_max = cfg->limits.unconfirmed_bytes_per_vm;
	uint64_t pt_max = cfg->limits.unconfirmed_bytes_per_thread;

	if (!pt->blocked && pt->held_bytes > pt_max) {
		pt->blocked = true;
		log_warn("thread=%u: %llu unconfirmed bytes held, over the thread bound: "
			 "pausing all its guests", pt->id, (unsigned long long)pt->held_bytes);
		for (struct guest_conn *c = pt->conns; c; c = c->all_next)
			conn_update_blocked(pt, c);
	} else if (pt->blocked && pt->held_bytes <= pt_max / 2) {
		pt->blocked = false;
		log_info("thread=%u: below the thread bound again", pt->id);
		for (struct guest_conn *c = pt->conns; c; c = c->all_next)
			conn_update_blocked(pt, c);
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
	struct vm_state *v = m->vm;

	vm_queue_settled(&v->q);
	if (ack)
		v->acked++;
	else
		v->nacked++;
	if (m->confirm && c->sess) {
		guest_session_settle(c->sess, m->channel, m->chan_gen, m->guest_tag, ack);
		mark_dirty(pt, c);
	}
	v->refs++; /* msg_free may drop the last reference */
	msg_free(pt, m);
	check_bounds(pt, v);
	vm_unref(pt, v);
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
	amqp_bytes_t ex = { m->ex_len, m->data + m->rk_len + m->props_len };
	amqp_bytes_t rk = { (size_t)(m->rk_len - m->guest_rk_off), m->data + m->guest_rk_off };
	amqp_bytes_t props = { m->props_len, m->data + m->rk_len };
	amqp_bytes_t body = { m->body_len, m->body };

	/* Back to the guest with the names it used, before its confirm. */
	if (c->sess) {
		guest_session_return(c->sess, m->channel, m->chan_gen, code, text, ex, rk, props,
				     body);
		mark_dirty(pt, c);
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
	for (struct guest_conn *c = pt->conns; c; c = c->all_next)
		conn_update_blocked(pt, c);
}

static const struct upstream_ops pt_upstream_ops = {
	.peek = op_peek,
	.pop = op_pop,
	.confirmed = op_confirmed,
	.requeue = op_requeue,
	.state_changed = op_state_changed,
	.returned = op_returned,
	.publishing = op_publishing,
	.inbox_reply = op_inbox_reply,
	.inbox_deliver = op_inbox_deliver,
	.inbox_got = op_inbox_got,
	.inbox_cancelled = op_inbox_cancelled,
	.inbox_closed = op_inbox_closed,
};

static void inbox_wake(void *ud, struct guest_conn *c)
{
	mark_dirty(ud, c);
}

/* ---- guest publishes ---------------------------------------------------- */

static void reject_publish(struct poll_thread *pt, struct guest_conn *c,
			   const struct guest_publish *pub, const char *why)
{
	log_warn("vm=%s conn=%u: message dropped: %s", c->vm->info.name, c->id, why);
	if (pub->confirm) {
		guest_session_settle(c->sess, pub->channel, pub->channel_gen, pub->delivery_tag,
				     false);
		mark_dirty(pt, c);
	}
	free(pub->body);
}

static void on_publish(struct poll_thread *pt, struct guest_conn *c, const struct guest_publish *pub)
{
	struct vm_state *v = c->vm;
	size_t uuid_len = strlen(v->info.uuid);
	size_t rk_len = uuid_len + 1 + pub->routing_key.len;
	struct stamp st = { v->info.uuid, v->info.name, c->cid, pt->sh->cfg->hostname,
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
	c->refs++;
	v->refs++;
	c->msgs_in++;
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
	check_bounds(pt, v);
}

/* Engine events; UD is the session's connection, which knows its thread
 * (a session moves between threads with its VM). */
static void on_session_event(void *ud, const struct guest_event *ev)
{
	struct guest_conn *c = ud;
	struct poll_thread *pt = c->pt;

	switch (ev->type) {
	case GUEST_EVENT_OPENED: {
		char user[80];
		const char *u = guest_session_user(c->sess);
		log_info("vm=%s conn=%u: AMQP connection open from %s, user \"%s\"",
			 c->vm->info.name, c->id, c->peer,
			 log_sanitize(user, sizeof(user), u, (unsigned)strlen(u)));
		if (c->vm->blocked || pt->blocked || pt->link_unable)
			conn_update_blocked(pt, c);
		break;
	}
	case GUEST_EVENT_PUBLISH:
		on_publish(pt, c, &ev->publish);
		break;
	case GUEST_EVENT_DECLARE:
	case GUEST_EVENT_CONSUME:
	case GUEST_EVENT_CANCEL:
	case GUEST_EVENT_SETTLE:
	case GUEST_EVENT_GET:
		inbox_guest_event(pt->inbox, c, &c->vm->info, ev);
		break;
	case GUEST_EVENT_CHANNEL_CLOSED:
		break;
	case GUEST_EVENT_CLOSED: {
		/* The text may quote the guest: its close reason, a refused
		 * vhost, exchange or user name. */
		char text[300];
		log_escape(text, sizeof(text), ev->text ? ev->text : "");
		if (ev->reply_code == 200 || ev->reply_code == 0)
			log_info("vm=%s conn=%u: closed: %s", c->vm->info.name, c->id, text);
		else
			log_warn("vm=%s conn=%u: closed with %u: %s", c->vm->info.name, c->id,
				 ev->reply_code, text);
		break;
	}
	}
	mark_dirty(pt, c);
}

/* ---- connections --------------------------------------------------------- */

/* Link C (whose vm is set) into its VM's and the thread's lists. */
static void conn_attach(struct poll_thread *pt, struct guest_conn *c)
{
	struct vm_state *v = c->vm;

	c->vm_prev = NULL;
	c->vm_next = v->conns;
	if (v->conns)
		v->conns->vm_prev = c;
	v->conns = c;
	v->nconns++;
	c->all_prev = NULL;
	c->all_next = pt->conns;
	if (pt->conns)
		pt->conns->all_prev = c;
	pt->conns = c;
	pt->nconns++;
	atomic_store_explicit(&pt->g.connections, pt->nconns, memory_order_relaxed);
}

/* Unlink C from the thread's list, and from its VM's list when FROM_VM. */
static void conn_detach(struct poll_thread *pt, struct guest_conn *c, bool from_vm)
{
	struct vm_state *v = c->vm;

	if (from_vm) {
		if (c->vm_prev)
			c->vm_prev->vm_next = c->vm_next;
		else
			v->conns = c->vm_next;
		if (c->vm_next)
			c->vm_next->vm_prev = c->vm_prev;
		c->vm_prev = c->vm_next = NULL;
		v->nconns--;
	}
	if (c->all_prev)
		c->all_prev->all_next = c->all_next;
	else
		pt->conns = c->all_next;
	if (c->all_next)
		c->all_next->all_prev = c->all_prev;
	c->all_prev = c->all_next = NULL;
	pt->nconns--;
	atomic_store_explicit(&pt->g.connections, pt->nconns, memory_order_relaxed);
}

static void conn_close(struct poll_thread *pt, struct guest_conn *c)
{
	struct vm_state *v = c->vm;
	struct guest_session *sess;

	if (!c->sess)
		return;
	sess = c->sess;
	c->sess = NULL; /* what the inbox hands back marks nothing dirty */
	inbox_conn_closing(pt->inbox, c, sess);
	epoll_ctl(pt->epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	guest_session_free(sess);
	partition_release_conn(pt->sh->partition, v->info.uuid);
	conn_detach(pt, c, true);
	log_debug("vm=%s conn=%u: socket closed (%llu bytes in, %llu out)", v->info.name, c->id,
		  (unsigned long long)c->bytes_in, (unsigned long long)c->bytes_out);
	conn_unref(pt, c);
}

static void conn_update_epoll(struct poll_thread *pt, struct guest_conn *c, bool want_out,
			      uint64_t now)
{
	uint32_t ev = 0;
	struct epoll_event e;

	if (guest_session_wants_read(c->sess) && !c->vm->blocked && !pt->blocked &&
	    !c->vm->migrating && !c->vm->leaving && !pt->paused)
		ev |= EPOLLIN;
	if (want_out)
		ev |= EPOLLOUT;
	if (ev == c->ep_events)
		return;
	e.events = ev;
	e.data.ptr = c;
	if (epoll_ctl(pt->epfd, EPOLL_CTL_MOD, c->fd, &e) == 0) {
		if ((ev ^ c->ep_events) & EPOLLIN)
			guest_session_set_reading(c->sess, ev & EPOLLIN, now);
		c->ep_events = ev;
	}
}

/* Write output, update epoll interest, close when the engine is done. */
static void conn_service(struct poll_thread *pt, struct guest_conn *c, uint64_t now)
{
	int r;

	if (!c->sess)
		return;
	r = guest_conn_flush(c, now, &pt->guest_writes);
	if (r < 0 && r != -EAGAIN) {
		conn_close(pt, c);
		return;
	}
	if (guest_session_done(c->sess) || c->closing) {
		conn_close(pt, c);
		return;
	}
	conn_update_epoll(pt, c, r == -EAGAIN, now);
}

static void flush_dirty(struct poll_thread *pt, uint64_t now)
{
	while (pt->dirty) {
		struct guest_conn *c = pt->dirty;

		pt->dirty = c->dirty_next;
		c->dirty = false;
		c->refs++; /* conn_service may close it */
		conn_service(pt, c, now);
		conn_unref(pt, c);
	}
}

static void conn_handle_events(struct poll_thread *pt, struct guest_conn *c, uint32_t events,
			       uint64_t now)
{
	if (events & EPOLLIN) {
		int r;

		pt->guest_reads++;
		r = guest_conn_read(c, pt->read_buf, sizeof(pt->read_buf), now);
		if (r == 0 || (r < 0 && r != -EAGAIN)) {
			log_debug("vm=%s conn=%u: peer went away", c->vm->info.name, c->id);
			c->closing = true;
		}
		c->deadline = 0; /* re-evaluate timers at the next scan */
	} else if (events & (EPOLLERR | EPOLLHUP)) {
		c->closing = true;
	}
	mark_dirty(pt, c);
}

/* Take over a delegated connection. Returns false when the mail was
 * forwarded instead: its VM has moved to another thread since the acceptor
 * looked (the mail is then not ours to free). */
static bool adopt_conn(struct poll_thread *pt, struct new_conn_mail *nm, uint64_t now)
{
	struct guest_conn *c;
	struct vm_state *v = NULL;
	struct epoll_event e;
	unsigned owner;

	if (partition_lookup(pt->sh->partition, nm->vm.uuid, &owner) == 0 && owner != pt->id &&
	    owner < pt->sh->nthreads) {
		mailbox_post(&pt->sh->threads[owner]->mb, &nm->mail);
		return false;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		goto fail;
	c->pt = pt;
	c->sess = guest_session_new(&pt->scfg, c, now);
	v = c->sess ? vm_get(pt, &nm->vm) : NULL;
	if (!v)
		goto fail;
	v->refs++; /* the connection's */
	c->fd = nm->fd;
	c->id = nm->conn_id;
	c->cid = nm->vm.cid;
	v->info.cid = nm->vm.cid; /* the VM's newest connection: a restart may change it */
	c->vm = v;
	c->refs = 1;
	snprintf(c->peer, sizeof(c->peer), "%s", nm->peer);
	e.events = EPOLLIN;
	e.data.ptr = c;
	if (epoll_ctl(pt->epfd, EPOLL_CTL_ADD, c->fd, &e) < 0) {
		vm_unref(pt, v);
		goto fail;
	}
	c->ep_events = EPOLLIN;
	conn_attach(pt, c);
	mark_dirty(pt, c); /* epoll interest follows the VM's state */
	log_debug("vm=%s conn=%u: adopted by thread %u from %s", v->info.name, c->id, pt->id,
		  c->peer);
	return true;
fail:
	log_error("vm=%s conn=%u: cannot adopt connection: %s", nm->vm.name, nm->conn_id,
		  c ? "out of memory or epoll failure" : "out of memory");
	if (c && c->sess)
		guest_session_free(c->sess);
	free(c);
	close(nm->fd);
	partition_release_conn(pt->sh->partition, nm->vm.uuid);
	return true;
}

static void close_vm_conns(struct poll_thread *pt, struct vm_state *v, uint16_t code,
			   const char *text)
{
	for (struct guest_conn *c = v->conns; c; c = c->vm_next) {
		guest_session_close(c->sess, code, text);
		c->deadline = 0; /* the close-ok timeout: armed at the next scan */
		mark_dirty(pt, c);
	}
}

/* ---- migration between threads ------------------------------------------ */

/* Record the outcome in RES (if any) and wake its waiter. */
static void migrate_result_set(struct migrate_result *res, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void migrate_result_set(struct migrate_result *res, int status, const char *fmt, ...)
{
	va_list ap;

	if (!res)
		return;
	pthread_mutex_lock(&res->lock);
	res->status = status;
	va_start(ap, fmt);
	vsnprintf(res->msg, sizeof(res->msg), fmt, ap);
	va_end(ap);
	res->done = true;
	pthread_cond_broadcast(&res->cond);
	pthread_mutex_unlock(&res->lock);
}

/* Quiesce: stop reading the VM's sockets; process_migrations hands it over
 * once every message it sent is confirmed (acks included), or gives up. */
static void migrate_out(struct poll_thread *pt, struct migrate_out_mail *mo, uint64_t now)
{
	struct vm_state *v = vm_find(pt, mo->uuid);

	if (!v) {
		migrate_result_set(mo->res, -ENOENT, "VM %s has no connections on thread %u",
				   mo->uuid, pt->id);
		return;
	}
	if (mo->to >= pt->sh->nthreads) {
		migrate_result_set(mo->res, -EINVAL, "there is no thread %u (0..%u)", mo->to,
				   pt->sh->nthreads - 1);
		return;
	}
	if (mo->to == pt->id) {
		migrate_result_set(mo->res, 0, "vm %s is already on thread %u", v->info.name, pt->id);
		return;
	}
	if (v->migrating) {
		migrate_result_set(mo->res, -EBUSY, "vm %s is already moving to thread %u",
				   v->info.name, v->migrate_to);
		return;
	}
	v->migrating = true;
	v->migrate_to = mo->to;
	v->migrate_started = now;
	v->migrate_deadline = now + mo->timeout_ms;
	v->migrate_res = mo->res;
	v->refs++; /* the migrating list's */
	v->mig_next = pt->migrating;
	pt->migrating = v;
	log_info("vm=%s: moving from thread %u to %u: pausing its %u connections until its %llu "
		 "held messages are confirmed", v->info.name, pt->id, mo->to, v->nconns,
		 (unsigned long long)v->held_msgs);
	for (struct guest_conn *c = v->conns; c; c = c->vm_next)
		mark_dirty(pt, c);
}

static void migrate_abandon(struct poll_thread *pt, struct vm_state *v, uint64_t now)
{
	log_warn("vm=%s: move to thread %u abandoned: %llu messages still unconfirmed after %llu "
		 "ms; it stays on thread %u", v->info.name, v->migrate_to,
		 (unsigned long long)v->held_msgs, (unsigned long long)(now - v->migrate_started),
		 pt->id);
	migrate_result_set(v->migrate_res, -ETIMEDOUT,
			   "abandoned: %llu messages still unconfirmed after %llu ms",
			   (unsigned long long)v->held_msgs,
			   (unsigned long long)(now - v->migrate_started));
	v->migrate_res = NULL;
	v->migrating = false;
	for (struct guest_conn *c = v->conns; c; c = c->vm_next)
		mark_dirty(pt, c);
	vm_unref(pt, v);
}

/* Called with the dirty list empty: nothing on this thread still points at
 * the VM's connections once they leave. */
static void migrate_handover(struct poll_thread *pt, struct vm_state *v, uint64_t now)
{
	struct migrate_in_mail *im;
	struct vm_state **pv;
	char uuid[VM_UUID_LEN + 1];
	unsigned to;

	if (v->nconns == 0) {
		migrate_result_set(v->migrate_res, 0, "vm %s has no connections left to move",
				   v->info.name);
		v->migrate_res = NULL;
		v->migrating = false;
		vm_unref(pt, v);
		return;
	}
	im = calloc(1, sizeof(*im));
	if (!im) {
		migrate_abandon(pt, v, now);
		return;
	}
	for (struct guest_conn *c = v->conns; c; c = c->vm_next) {
		/* Inbox consumers stay with this thread's link: cancel them. */
		inbox_conn_leaving(pt->inbox, c);
	}
	for (struct guest_conn *c = v->conns; c; c = c->vm_next) {
		/* Last chance to send acks from here; what is left moves along. */
		int r = guest_conn_flush(c, now, &pt->guest_writes);
		if (r < 0 && r != -EAGAIN)
			c->closing = true;
		epoll_ctl(pt->epfd, EPOLL_CTL_DEL, c->fd, NULL);
		c->ep_events = 0;
		conn_detach(pt, c, false);
	}
	for (pv = &pt->vms[hash_uuid(v->info.uuid) % VM_BUCKETS]; *pv != v; pv = &(*pv)->hash_next)
		;
	*pv = v->hash_next;
	v->hash_next = NULL;
	pt->nvms--;
	v->refs--; /* the migrating list's; its connections hold the rest */
	v->migrating = false;
	pt->migrations_out++;
	im->mail.type = MAIL_MIGRATE_IN;
	im->vm = v;
	im->from = pt->id;
	snprintf(uuid, sizeof(uuid), "%s", v->info.uuid);
	to = v->migrate_to;
	/* The VM first, then the partition entry: whoever finds the new owner
	 * there (a VM-stopped notice, a new connection) and posts to it is
	 * behind the VM in its mailbox. V is the new owner's from here. */
	mailbox_post(&pt->sh->threads[to]->mb, &im->mail);
	partition_move_vm(pt->sh->partition, uuid, to);
}

static void migrate_in(struct poll_thread *pt, struct migrate_in_mail *im, uint64_t now)
{
	struct vm_state *v = im->vm, *have = vm_find(pt, v->info.uuid);
	struct guest_conn *list = v->conns, *c, *next;
	struct migrate_result *res = v->migrate_res;
	uint64_t took = now - v->migrate_started;
	unsigned n = v->nconns;

	v->migrate_res = NULL;
	if (have) {
		/* A new connection of this VM got here first: merge. */
		have->msgs_in += v->msgs_in;
		have->bytes_in += v->bytes_in;
		have->acked += v->acked;
		have->nacked += v->nacked;
		free(v);
		v = have;
	} else {
		size_t b = hash_uuid(v->info.uuid) % VM_BUCKETS;
		v->hash_next = pt->vms[b];
		pt->vms[b] = v;
		pt->nvms++;
		v->conns = NULL;
		v->nconns = 0;
		v->refs = 0;
	}
	for (c = list; c; c = next) {
		/* No interest yet: conn_update_epoll sets it (and resumes the
		 * engine's receive timer) when the dirty list is flushed. */
		struct epoll_event e = { .events = 0, .data.ptr = c };

		next = c->vm_next;
		c->vm = v;
		c->pt = pt;
				if (c->sess)
			guest_session_set_config(c->sess, &pt->scfg);
		v->refs++;
		conn_attach(pt, c);
		inbox_conn_arrived(pt->inbox, c, &v->info);
		c->ep_events = 0;
		if (epoll_ctl(pt->epfd, EPOLL_CTL_ADD, c->fd, &e) < 0)
			c->closing = true;
		c->deadline = 0;
		conn_update_blocked(pt, c); /* this thread's bound and link now */
	}
	pt->migrations_in++;
	if (v->leaving)
		pt->nleaving++;
	log_info("vm=%s: moved from thread %u to thread %u in %llu ms (%u connections)",
		 v->info.name, im->from, pt->id, (unsigned long long)took, n);
	migrate_result_set(res, 0, "vm %s moved from thread %u to thread %u in %llu ms",
			   v->info.name, im->from, pt->id, (unsigned long long)took);
	check_bounds(pt, v);
}

static void process_migrations(struct poll_thread *pt, uint64_t now)
{
	struct vm_state **pv = &pt->migrating, *v;

	while ((v = *pv)) {
		if (v->held_msgs == 0 || v->nconns == 0) {
			*pv = v->mig_next;
			v->mig_next = NULL;
			migrate_handover(pt, v, now);
		} else if (now >= v->migrate_deadline) {
			*pv = v->mig_next;
			v->mig_next = NULL;
			migrate_abandon(pt, v, now);
		} else {
			pv = &v->mig_next;
		}
	}
}

/* ---- queries --------------------------------------------------------------- */

/* CPU time of the calling thread, through its pthread CPU clock. */
static double thread_cpu_seconds(void)
{
	struct timespec ts;
	clockid_t cid;

	if (pthread_getcpuclockid(pthread_self(), &cid) != 0 || clock_gettime(cid, &ts) < 0)
		return 0;
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Fill R (its VM list malloc'd; none when out of memory). */
static void report(struct poll_thread *pt, struct poll_report *r)
{
	size_t k = 0;

	memset(r, 0, sizeof(*r));
	r->vms = pt->nvms ? calloc(pt->nvms, sizeof(*r->vms)) : NULL;
	for (size_t b = 0; r->vms && b < VM_BUCKETS; b++) {
		for (struct vm_state *v = pt->vms[b]; v && k < pt->nvms; v = v->hash_next) {
			struct poll_vm_report *vr = &r->vms[k++];

			vr->info = v->info;
			vr->connections = v->nconns;
			vr->held_bytes = v->held_bytes;
			vr->held_messages = v->held_msgs;
			vr->messages_in = v->msgs_in;
			vr->bytes_in = v->bytes_in;
			vr->acked = v->acked;
			vr->nacked = v->nacked;
			vr->blocked = v->blocked;
			vr->migrating = v->migrating;
		}
	}
	r->nvms = k;
	upstream_get_stats(pt->up, &r->link);
	r->thread = pt->id;
	r->cpu = pt->cpu;
	r->connections = pt->nconns;
	r->vm_count = pt->nvms;
	r->held_bytes = pt->held_bytes;
	r->held_messages = pt->held_msgs;
	r->blocked = pt->blocked;
	r->messages_in = pt->msgs_in;
	r->bytes_in = pt->bytes_in;
	r->messages_out = pt->msgs_out;
	r->bytes_out = pt->bytes_out;
	r->guest_reads = pt->guest_reads;
	r->guest_writes = pt->guest_writes;
	r->migrations_in = pt->migrations_in;
	r->migrations_out = pt->migrations_out;
	r->cpu_seconds = thread_cpu_seconds();
	r->loop_busy_seconds = (double)pt->busy_ns / 1e9;
	r->loop_max_us = pt->busy_max_ns / 1000;
	pt->busy_max_ns = 0;
	r->answered = true;
}

void poll_reports_free(struct poll_report *r, unsigned n)
{
	if (!r)
		return;
	for (unsigned i = 0; i < n; i++)
		free(r[i].vms);
	free(r);
}

/* Drop one reference to Q with its lock held (released); the last one
 * frees it. */
static void query_unref_locked(struct query *q)
{
	if (--q->refs > 0) {
		pthread_mutex_unlock(&q->lock);
		return;
	}
	pthread_mutex_unlock(&q->lock);
	poll_reports_free(q->reports, q->n);
	pthread_mutex_destroy(&q->lock);
	pthread_cond_destroy(&q->cond);
	free(q);
}

/* Answer Q for thread ID with R (its VM list stolen; NULL when the mail
 * is discarded) and drop the mail's reference. */
static void query_answer(struct query *q, unsigned id, struct poll_report *r)
{
	pthread_mutex_lock(&q->lock);
	if (r && !q->abandoned && id < q->n && q->reports) {
		q->reports[id] = *r;
		r->vms = NULL;
	}
	if (r) {
		free(r->vms);
		r->vms = NULL;
	}
	if (--q->pending == 0)
		pthread_cond_broadcast(&q->cond);
	query_unref_locked(q);
}

/* ---- the loop ------------------------------------------------------------ */

/* Close the stopped VM's connections (or act on its other changes, see
 * poll_thread_vm_change). Returns false when the mail was forwarded instead:
 * the VM moved to another thread after the notice was addressed here (the
 * mail is then not ours to free). */
static bool vm_gone(struct poll_thread *pt, struct vm_gone_mail *gm, uint64_t now)
{
	struct vm_state *v = vm_find(pt, gm->uuid);
	unsigned owner, n = 0;

	if (!v) {
		if (partition_lookup(pt->sh->partition, gm->uuid, &owner) == 0 && owner != pt->id &&
		    owner < pt->sh->nthreads) {
			mailbox_post(&pt->sh->threads[owner]->mb, &gm->mail);
			return false;
		}
		return true;
	}
	switch (gm->how) {
	case VM_STOPPED:
		log_info("vm=%s thread=%u: VM stopped or went away: closing its %u connections",
			 v->info.name, pt->id, v->nconns);
		close_vm_conns(pt, v, 320, "CONNECTION_FORCED - VM is no longer running");
		break;
	case VM_MIGRATING_AWAY:
		if (v->leaving)
			break;
		/* What was read is settled first, so that the guest's own retry
		 * carries only what it was not acked. */
		v->leaving = true;
		v->leave_deadline = now + gm->settle_ms;
		pt->nleaving++;
		log_info("vm=%s thread=%u: VM migrating to another host: its %u connections are "
			 "no longer read and are closed once its %llu held messages are confirmed "
			 "(at most %u ms)",
			 v->info.name, pt->id, v->nconns, (unsigned long long)v->held_msgs,
			 gm->settle_ms);
		for (struct guest_conn *c = v->conns; c; c = c->vm_next)
			mark_dirty(pt, c);
		break;
	case VM_CID_CHANGED:
		for (struct guest_conn *c = v->conns; c; c = c->vm_next) {
			if (!c->cid || c->cid == gm->cid)
				continue;
			guest_session_close(
				c->sess, 320,
				"CONNECTION_FORCED - the VM no longer has this vsock CID");
			c->deadline = 0;
			mark_dirty(pt, c);
			n++;
		}
		if (n)
			log_info("vm=%s thread=%u: its vsock CID is now %u: closed %u connections "
				 "made from another CID",
				 v->info.name, pt->id, gm->cid, n);
		if (gm->cid)
			v->info.cid = gm->cid;
		break;
	}
	return true;
}

/* Leaving VMs whose messages are settled (or whose time is up): closed. */
static void process_leaving(struct poll_thread *pt, uint64_t now)
{
	unsigned still = 0;

	for (size_t b = 0; b < VM_BUCKETS; b++) {
		for (struct vm_state *v = pt->vms[b]; v; v = v->hash_next) {
			if (!v->leaving)
				continue;
			if (v->held_msgs && now < v->leave_deadline) {
				still++;
				continue;
			}
			v->leaving = false;
			if (v->held_msgs)
				log_warn("vm=%s thread=%u: closing its connections with %llu "
					 "messages "
					 "still unconfirmed: they were not acked, the guest sends "
					 "them "
					 "again",
					 v->info.name, pt->id, (unsigned long long)v->held_msgs);
			else
				log_info("vm=%s thread=%u: migrated away, every message settled: "
					 "closing its %u connections",
					 v->info.name, pt->id, v->nconns);
			close_vm_conns(pt, v, 320,
				       "CONNECTION_FORCED - VM migrated to another host");
		}
	}
	pt->nleaving = still; /* a VM that went away by itself is not counted */
}

static void handle_mail(struct poll_thread *pt, struct mail *m, uint64_t now)
{
	switch (m->type) {
	case MAIL_NEW_CONN:
		if (adopt_conn(pt, (struct new_conn_mail *)m, now))
			free(m);
		break;
	case UPSTREAM_MAIL_RESOLVED:
		if (pt->stopping)
			upstream_mail_discard(m);
		else
			upstream_handle_mail(pt->up, m, now);
		break;
	case MAIL_VM_GONE:
		if (vm_gone(pt, (struct vm_gone_mail *)m, now))
			free(m);
		break;
	case MAIL_QUERY: {
		struct poll_report r;
		report(pt, &r);
		query_answer(((struct query_mail *)m)->q, pt->id, &r);
		free(m);
		break;
	}
	case MAIL_PAUSE:
		pt->paused = true;
		for (struct guest_conn *c = pt->conns; c; c = c->all_next)
			mark_dirty(pt, c);
		free(m);
		break;
	case MAIL_DRAIN:
		for (struct guest_conn *c = pt->conns; c; c = c->all_next) {
			guest_session_close(c->sess, 320, "CONNECTION_FORCED - vmproxyd shutdown");
			c->deadline = 0;
			mark_dirty(pt, c);
		}
		free(m);
		break;
	case MAIL_STOP:
		pt->stopping = true;
		free(m);
		break;
	case MAIL_RELINK:
		upstream_relink(pt->up, now);
		free(m);
		break;
	case MAIL_RECONFIG: {
		const struct reconfig_mail *rm = (const struct reconfig_mail *)m;
		pt->scfg.allowed_exchanges = rm->allowed_exchanges;
		pt->scfg.channel_max = rm->channel_max;
		pt->scfg.heartbeat = rm->heartbeat;
		pt->scfg.handshake_timeout_ms = rm->handshake_timeout_ms;
		free(m);
		break;
	}
	case MAIL_MIGRATE_OUT:
		migrate_out(pt, (struct migrate_out_mail *)m, now);
		free(m);
		break;
	case MAIL_MIGRATE_IN:
		migrate_in(pt, (struct migrate_in_mail *)m, now);
		free(m);
		break;
	default: /* only this file and the link post here */
		log_error("thread=%u: mail of unknown type %d dropped", pt->id, m->type);
		free(m);
		break;
	}
}

static void scan_timers(struct poll_thread *pt, uint64_t now)
{
	for (struct guest_conn *c = pt->conns; c; c = c->all_next) {
		if (c->deadline > now)
			continue;
		c->deadline = guest_session_tick(c->sess, now);
		mark_dirty(pt, c);
	}
	pt->next_scan = now + SCAN_EVERY_MS;
}

static void *poll_main(void *arg)
{
	struct poll_thread *pt = arg;
	struct epoll_event evs[MAX_EVENTS];
	char name[16];

	snprintf(name, sizeof(name), "vmproxy-poll%u", pt->id);
	pthread_setname_np(pthread_self(), name);
	if (pt->cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(pt->cpu, &set);
		int r = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
		if (r)
			log_warn("thread=%u: cannot pin to CPU %d: %s; running unpinned", pt->id,
				 pt->cpu, strerror(r));
	}
	while (!pt->stopping) {
		uint64_t now = clock_mono_ms();
		uint64_t next = upstream_tick(pt->up, now), woke_ns;
		int timeout, n;

		if (now >= pt->next_scan)
			scan_timers(pt, now);
		flush_dirty(pt, now);
		if (next > pt->next_scan)
			next = pt->next_scan;
		timeout = next <= now ? 0 : (int)(next - now);
		atomic_store_explicit(&pt->g.loop_ms, now, memory_order_relaxed);
		n = epoll_wait(pt->epfd, evs, MAX_EVENTS, timeout);
		woke_ns = clock_mono_ns();
		now = woke_ns / 1000000u;
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;

			if (p == &pt->mb) {
				struct mail *m;
				mailbox_ack(&pt->mb);
				while ((m = mailbox_take(&pt->mb)))
					handle_mail(pt, m, now);
			} else if (p == (void *)pt->up) {
				upstream_handle_events(pt->up, evs[i].events, now);
			} else {
				conn_handle_events(pt, p, evs[i].events, now);
			}
		}
		/* One write to the link per iteration, whatever woke it. */
		upstream_kick(pt->up, now);
		flush_dirty(pt, now);
		if (pt->migrating)
			process_migrations(pt, now);
		if (pt->nleaving)
			process_leaving(pt, now);
		if (n > 0) {
			uint64_t busy = clock_mono_ns() - woke_ns;
			pt->busy_ns += busy;
			if (busy > pt->busy_max_ns)
				pt->busy_max_ns = busy;
		}
	}
	return NULL;
}

int poll_thread_new(unsigned id, int cpu, const struct poll_shared *sh, struct poll_thread **out)
{
	struct poll_thread *pt = calloc(1, sizeof(*pt));
	const struct proxy_config *cfg = sh->cfg;
	struct epoll_event e;
	int r;

	if (!pt)
		return -ENOMEM;
	pt->id = id;
	pt->cpu = cpu;
	pt->sh = sh;
	pt->scfg = sh->scfg;
	pt->epfd = -1;
	pt->mb.efd = -1;
	pt->props_buf = malloc(PROPS_BUF_SIZE);
	init_amqp_pool(&pt->pool, 4096);
	if (!pt->props_buf) {
		r = -ENOMEM;
		goto fail;
	}
	pt->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (pt->epfd < 0) {
		r = -errno;
		goto fail;
	}
	r = mailbox_init(&pt->mb);
	if (r < 0)
		goto fail;
	e.events = EPOLLIN;
	e.data.ptr = &pt->mb;
	if (epoll_ctl(pt->epfd, EPOLL_CTL_ADD, mailbox_fd(&pt->mb), &e) < 0) {
		r = -errno;
		goto fail;
	}
	r = inbox_new(cfg, id, inbox_wake, pt, &pt->inbox);
	if (r < 0)
		goto fail;
	r = upstream_new(cfg, id, pt->epfd, sh->helpers, &pt->mb, &pt_upstream_ops, pt, &pt->up);
	if (r < 0)
		goto fail;
	inbox_set_link(pt->inbox, pt->up);
	*out = pt;
	return 0;
fail:
	if (pt->epfd >= 0)
		close(pt->epfd);
	mailbox_destroy(&pt->mb);
	empty_amqp_pool(&pt->pool);
	inbox_free(pt->inbox);
	free(pt->props_buf);
	free(pt);
	return r;
}

int poll_thread_start(struct poll_thread *pt)
{
	int r = pthread_create(&pt->tid, NULL, poll_main, pt);

	pt->started = r == 0;
	return -r;
}

/* ---- requests from other threads ----------------------------------------- */

int poll_thread_delegate(struct poll_thread *pt, int fd, uint32_t conn_id,
			 const struct vm_info *vm, const char *peer)
{
	struct new_conn_mail *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->mail.type = MAIL_NEW_CONN;
	m->fd = fd;
	m->conn_id = conn_id;
	m->vm = *vm;
	snprintf(m->peer, sizeof(m->peer), "%s", peer);
	mailbox_post(&pt->mb, &m->mail);
	return 0;
}

int poll_thread_vm_change(struct poll_thread *pt, const char *uuid, enum vm_change how,
			  uint32_t cid, uint32_t settle_ms)
{
	struct vm_gone_mail *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->mail.type = MAIL_VM_GONE;
	snprintf(m->uuid, sizeof(m->uuid), "%s", uuid);
	m->how = how;
	m->cid = cid;
	m->settle_ms = settle_ms;
	mailbox_post(&pt->mb, &m->mail);
	return 0;
}

int poll_thread_migrate(struct poll_thread *pt, const char *uuid, unsigned to,
			uint32_t timeout_ms, struct migrate_result *res)
{
	struct migrate_out_mail *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->mail.type = MAIL_MIGRATE_OUT;
	snprintf(m->uuid, sizeof(m->uuid), "%s", uuid);
	m->to = to;
	m->timeout_ms = timeout_ms;
	m->res = res;
	mailbox_post(&pt->mb, &m->mail);
	return 0;
}

int poll_thread_reconfig(struct poll_thread *pt, const char *const *allowed,
			 uint16_t channel_max, uint16_t heartbeat, uint32_t handshake_timeout_ms)
{
	struct reconfig_mail *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->mail.type = MAIL_RECONFIG;
	m->allowed_exchanges = allowed;
	m->channel_max = channel_max;
	m->heartbeat = heartbeat;
	m->handshake_timeout_ms = handshake_timeout_ms;
	mailbox_post(&pt->mb, &m->mail);
	return 0;
}

int poll_thread_control(struct poll_thread *pt, enum poll_control what)
{
	static const int types[] = {
		[POLL_PAUSE] = MAIL_PAUSE,
		[POLL_DRAIN] = MAIL_DRAIN,
		[POLL_RELINK] = MAIL_RELINK,
	};
	struct mail *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->type = types[what];
	mailbox_post(&pt->mb, m);
	return 0;
}

struct poll_report *poll_threads_query(struct poll_thread *const *threads, unsigned n,
				       int timeout_ms, unsigned *late)
{
	struct query *q = calloc(1, sizeof(*q));
	struct poll_report *res = NULL;
	struct timespec ts;

	*late = 0;
	if (!q)
		return NULL;
	q->reports = calloc(n, sizeof(*q->reports));
	if (!q->reports) {
		free(q);
		return NULL;
	}
	q->n = n;
	pthread_mutex_init(&q->lock, NULL);
	pthread_cond_init(&q->cond, NULL);
	q->refs = 1; /* the asker's */
	pthread_mutex_lock(&q->lock);
	for (unsigned i = 0; i < n; i++) {
		struct query_mail *m = calloc(1, sizeof(*m));

		if (!m) {
			log_warn("query: out of memory: thread %u not asked", i);
			continue;
		}
		m->mail.type = MAIL_QUERY;
		m->q = q;
		q->pending++;
		q->refs++;
		mailbox_post(&threads[i]->mb, &m->mail);
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	while (q->pending > 0)
		if (pthread_cond_timedwait(&q->cond, &q->lock, &ts) == ETIMEDOUT)
			break;
	*late = q->pending;
	if (*late == 0) {
		res = q->reports;
		q->reports = NULL;
	} else {
		/* The answers still due find the query alive; the last one frees it. */
		q->abandoned = true;
	}
	query_unref_locked(q);
	return res;
}

void poll_thread_session_config(const struct proxy_config *cfg, const char *const *allowed,
				struct guest_session_config *out)
{
	guest_session_config_init(out);
	out->channel_max = cfg->guest.channel_max;
	out->heartbeat = cfg->guest.heartbeat;
	out->max_message_bytes = cfg->guest.max_message_bytes;
	out->handshake_timeout_ms = cfg->guest.handshake_timeout_ms;
	out->allowed_exchanges = allowed;
	out->product = "vmproxyd";
	out->on_event = on_session_event;
	inbox_session_config(cfg, out);
}

const struct poll_gauges *poll_thread_gauges(const struct poll_thread *pt)
{
	return &pt->g;
}

static void discard_mail(struct mail *m)
{
	switch (m->type) {
	case MAIL_NEW_CONN:
		close(((struct new_conn_mail *)m)->fd);
		free(m);
		break;
	case UPSTREAM_MAIL_RESOLVED:
		upstream_mail_discard(m);
		break;
	case MAIL_QUERY:
		query_answer(((struct query_mail *)m)->q, 0, NULL);
		free(m);
		break;
	case MAIL_MIGRATE_OUT:
		migrate_result_set(((struct migrate_out_mail *)m)->res, -ECANCELED,
				   "the daemon is stopping");
		free(m);
		break;
	case MAIL_MIGRATE_IN: {
		struct vm_state *v = ((struct migrate_in_mail *)m)->vm;
		struct guest_conn *c, *next;
		migrate_result_set(v->migrate_res, -ECANCELED, "the daemon is stopping");
		for (c = v->conns; c; c = next) {
			next = c->vm_next;
			close(c->fd);
			guest_session_free(c->sess);
			free(c);
		}
		free(v);
		free(m);
		break;
	}
	default:
		free(m);
		break;
	}
}

void poll_thread_stop(struct poll_thread *pt)
{
	struct mail *m;

	if (!pt || !pt->started)
		return;
	m = calloc(1, sizeof(*m));
	if (m) {
		m->type = MAIL_STOP;
		mailbox_post(&pt->mb, m);
	} else {
		pt->stopping = true; /* best effort; the loop wakes within a scan period */
	}
	pthread_join(pt->tid, NULL);
	pt->started = false;
}

void poll_thread_free(struct poll_thread *pt)
{
	struct mail *m;

	if (!pt)
		return;
	poll_thread_stop(pt);
	while (pt->migrating) {
		struct vm_state *v = pt->migrating;
		pt->migrating = v->mig_next;
		v->migrating = false;
		migrate_result_set(v->migrate_res, -ECANCELED, "the daemon is stopping");
		vm_unref(pt, v);
	}
	/* The link first: its unconfirmed messages come back to the VM queues. */
	upstream_free(pt->up);
	pt->up = NULL;
	inbox_set_link(pt->inbox, NULL);
	while (pt->conns)
		conn_close(pt, pt->conns);
	for (size_t b = 0; b < VM_BUCKETS; b++) {
		struct vm_state *v = pt->vms[b];

		while (v) {
			struct upstream_msg *mm = v->pend_head;

			if (!mm) {
				v = v->hash_next;
				continue;
			}
			v->pend_head = mm->next;
			if (!v->pend_head)
				v->pend_tail = NULL;
			msg_free(pt, mm); /* may free v: start the bucket again */
			v = pt->vms[b];
		}
	}
	mailbox_ack(&pt->mb);
	while ((m = mailbox_take(&pt->mb)))
		discard_mail(m);
	close(pt->epfd);
	mailbox_destroy(&pt->mb);
	empty_amqp_pool(&pt->pool);
	inbox_free(pt->inbox);
	free(pt->props_buf);
	free(pt);
}
