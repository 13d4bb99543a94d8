/* poll_thread.c -- see poll_thread.h: a poll thread's VMs and guest
 * connections, its loop and its life. The rest of it is in poll_publish.c,
 * poll_migrate.c and poll_request.c (poll_thread_impl.h). */
#include "poll_thread_impl.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "clock.h"
#include "hash.h"
#include "log.h"
#include "partition.h"

/* ---- VMs --------------------------------------------------------------------- */

uint64_t pt_hash_uuid(const char *s)
{
	return hash_fnv1a64(s);
}

struct vm_state *pt_vm_find(struct poll_thread *pt, const char *uuid)
{
	struct vm_state *v = pt->vms[pt_hash_uuid(uuid) % VM_BUCKETS];

	while (v && strcmp(v->info.uuid, uuid) != 0)
		v = v->hash_next;
	return v;
}

static struct vm_state *vm_get(struct poll_thread *pt, const struct vm_info *info)
{
	struct vm_state *v = pt_vm_find(pt, info->uuid);
	size_t b;

	if (v)
		return v;
	v = calloc(1, sizeof(*v));
	if (!v)
		return NULL;
	v->info = *info;
	b = pt_hash_uuid(info->uuid) % VM_BUCKETS;
	v->hash_next = pt->vms[b];
	pt->vms[b] = v;
	pt->nvms++;
	return v;
}

void pt_vm_unref(struct poll_thread *pt, struct vm_state *v)
{
	struct vm_state **pv;

	if (--v->refs > 0)
		return;
	for (pv = &pt->vms[pt_hash_uuid(v->info.uuid) % VM_BUCKETS]; *pv != v; pv = &(*pv)->hash_next)
		;
	*pv = v->hash_next;
	pt->nvms--;
	free(v);
}

static void conn_unref(struct poll_thread *pt, struct guest_conn *c)
{
	struct vm_state *v = guest_conn_vm(c);

	if (guest_conn_unref(c))
		pt_vm_unref(pt, v);
}

void pt_mark_dirty(struct poll_thread *pt, struct guest_conn *c)
{
	guest_conn_push_dirty(&pt->dirty, c);
}

void pt_msg_free(struct poll_thread *pt, struct upstream_msg *m)
{
	struct vm_state *v = m->vm;

	v->held_bytes -= m->size;
	v->held_msgs--;
	pt->held_bytes -= m->size;
	pt->held_msgs--;
	atomic_store_explicit(&pt->g.held_messages, pt->held_msgs, memory_order_relaxed);
	free(m->body);
	conn_unref(pt, m->conn);
	pt_vm_unref(pt, v);
	free(m);
}

/* Engine events; UD is the session's connection, which knows its thread
 * (a session moves between threads with its VM). */
static void on_session_event(void *ud, const struct guest_event *ev)
{
	struct guest_conn *c = ud;
	struct poll_thread *pt = guest_conn_thread(c);
	struct vm_state *v = guest_conn_vm(c);
	uint32_t id = guest_conn_id(c);

	switch (ev->type) {
	case GUEST_EVENT_OPENED: {
		char user[80];
		const char *u = guest_session_user(guest_conn_session(c));
		log_info("vm=%s conn=%u: AMQP connection open from %s, user \"%s\"",
			 v->info.name, id, guest_conn_peer(c),
			 log_sanitize(user, sizeof(user), u, (unsigned)strlen(u)));
		if (v->blocked || pt->blocked || pt->link_unable || pt->broker_blocked)
			pt_conn_update_blocked(pt, c);
		break;
	}
	case GUEST_EVENT_PUBLISH:
		pt_on_publish(pt, c, &ev->publish);
		break;
	case GUEST_EVENT_DECLARE:
	case GUEST_EVENT_CONSUME:
	case GUEST_EVENT_CANCEL:
	case GUEST_EVENT_SETTLE:
	case GUEST_EVENT_GET:
		inbox_guest_event(pt->inbox, c, &v->info, ev);
		break;
	case GUEST_EVENT_CHANNEL_CLOSED:
		break;
	case GUEST_EVENT_CLOSED: {
		/* The text may quote the guest: its close reason, a refused
		 * vhost, exchange or user name. */
		char text[300];
		log_escape(text, sizeof(text), ev->text ? ev->text : "");
		if (ev->reply_code == 200 || ev->reply_code == 0)
			log_info("vm=%s conn=%u: closed: %s", v->info.name, id, text);
		else
			log_warn("vm=%s conn=%u: closed with %u: %s", v->info.name, id,
				 ev->reply_code, text);
		break;
	}
	}
	pt_mark_dirty(pt, c);
}

/* ---- connections --------------------------------------------------------- */

/* Link C (whose vm is set) into its VM's and the thread's lists. */
void pt_conn_attach(struct poll_thread *pt, struct guest_conn *c)
{
	guest_conn_link(c, &guest_conn_vm(c)->conns, &pt->conns);
	atomic_store_explicit(&pt->g.connections, pt->conns.count, memory_order_relaxed);
}

/* Unlink C from the thread's list, and from its VM's list when FROM_VM. */
void pt_conn_detach(struct poll_thread *pt, struct guest_conn *c, bool from_vm)
{
	guest_conn_unlink(c, from_vm ? &guest_conn_vm(c)->conns : NULL, &pt->conns);
	atomic_store_explicit(&pt->g.connections, pt->conns.count, memory_order_relaxed);
}

static void conn_close(struct poll_thread *pt, struct guest_conn *c)
{
	struct vm_state *v = guest_conn_vm(c);
	struct guest_session *sess;

	if (!guest_conn_session(c))
		return;
	/* Shut first: what the inbox hands back marks nothing dirty. */
	sess = guest_conn_shut(c, pt->epfd);
	inbox_conn_closing(pt->inbox, c, sess);
	guest_session_free(sess);
	partition_release_conn(pt->sh->partition, v->info.uuid);
	pt_conn_detach(pt, c, true);
	log_debug("vm=%s conn=%u: socket closed (%llu bytes in, %llu out)", v->info.name,
		  guest_conn_id(c), (unsigned long long)guest_conn_bytes_in(c),
		  (unsigned long long)guest_conn_bytes_out(c));
	conn_unref(pt, c);
}

void pt_conn_update_epoll(struct poll_thread *pt, struct guest_conn *c, bool want_out,
			      uint64_t now)
{
	const struct vm_state *v = guest_conn_vm(c);
	bool read = !v->blocked && !pt->blocked && !v->migrating && !v->leaving && !pt->paused;

	guest_conn_set_interest(c, pt->epfd, read, want_out, now);
}

/* Write output, update epoll interest, close when the engine is done. */
static void conn_service(struct poll_thread *pt, struct guest_conn *c, uint64_t now)
{
	int r;

	if (!guest_conn_session(c))
		return;
	r = guest_conn_flush(c, now, &pt->guest_writes);
	if (r < 0 && r != -EAGAIN) {
		conn_close(pt, c);
		return;
	}
	if (guest_session_done(guest_conn_session(c)) || guest_conn_closing(c)) {
		conn_close(pt, c);
		return;
	}
	pt_conn_update_epoll(pt, c, r == -EAGAIN, now);
}

static void flush_dirty(struct poll_thread *pt, uint64_t now)
{
	struct guest_conn *c;

	while ((c = guest_conn_pop_dirty(&pt->dirty))) {
		guest_conn_ref(c); /* conn_service may close it */
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
			log_debug("vm=%s conn=%u: peer went away", guest_conn_vm(c)->info.name,
				  guest_conn_id(c));
			guest_conn_close_later(c);
		}
		guest_conn_set_deadline(c, 0); /* re-evaluate timers at the next scan */
	} else if (events & (EPOLLERR | EPOLLHUP)) {
		guest_conn_close_later(c);
	}
	pt_mark_dirty(pt, c);
}

/* Take over a delegated connection. Returns false when the mail was
 * forwarded instead: its VM has moved to another thread since the acceptor
 * looked (the mail is then not ours to free). */
static bool adopt_conn(struct poll_thread *pt, struct new_conn_mail *nm, uint64_t now)
{
	const char *why = "out of memory";
	struct guest_conn *c;
	struct vm_state *v;
	unsigned owner;

	if (partition_lookup(pt->sh->partition, nm->vm.uuid, &owner) == 0 && owner != pt->id &&
	    owner < pt->sh->nthreads) {
		mailbox_post(&pt->sh->threads[owner]->mb, &nm->mail);
		return false;
	}
	c = guest_conn_new(nm->fd, nm->conn_id, nm->vm.cid, nm->peer, &pt->scfg, now);
	v = c ? vm_get(pt, &nm->vm) : NULL;
	if (v) {
		v->refs++; /* the connection's */
		if (guest_conn_watch(c, pt->epfd, true) < 0) {
			pt_vm_unref(pt, v);
			v = NULL;
			why = "epoll failure";
		}
	}
	if (!v) {
		log_error("vm=%s conn=%u: cannot adopt connection: %s", nm->vm.name, nm->conn_id,
			  why);
		if (c)
			guest_conn_discard(c); /* closes the socket */
		else
			close(nm->fd);
		partition_release_conn(pt->sh->partition, nm->vm.uuid);
		return true;
	}
	v->info.cid = nm->vm.cid; /* the VM's newest connection: a restart may change it */
	guest_conn_set_owner(c, pt, v);
	pt_conn_attach(pt, c);
	pt_mark_dirty(pt, c); /* epoll interest follows the VM's state */
	log_debug("vm=%s conn=%u: adopted by thread %u from %s", v->info.name, guest_conn_id(c),
		  pt->id, guest_conn_peer(c));
	return true;
}

void pt_close_vm_conns(struct poll_thread *pt, struct vm_state *v, uint16_t code,
			   const char *text)
{
	for (struct guest_conn *c = v->conns.head; c; c = guest_conn_vm_next(c)) {
		guest_session_close(guest_conn_session(c), code, text);
		guest_conn_set_deadline(c, 0); /* the close-ok timeout: armed at the next scan */
		pt_mark_dirty(pt, c);
	}
}

/* ---- the loop ------------------------------------------------------------ */
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
		if (pt_vm_gone(pt, (struct vm_gone_mail *)m, now))
			free(m);
		break;
	case MAIL_QUERY: {
		struct poll_report r;
		pt_report(pt, &r);
		pt_query_answer(((struct query_mail *)m)->q, pt->id, &r);
		free(m);
		break;
	}
	case MAIL_PAUSE:
		pt->paused = true;
		for (struct guest_conn *c = pt->conns.head; c; c = guest_conn_all_next(c))
			pt_mark_dirty(pt, c);
		free(m);
		break;
	case MAIL_DRAIN:
		for (struct guest_conn *c = pt->conns.head; c; c = guest_conn_all_next(c)) {
			guest_session_close(guest_conn_session(c), 320,
					    "CONNECTION_FORCED - vmproxyd shutdown");
			guest_conn_set_deadline(c, 0);
			pt_mark_dirty(pt, c);
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
		pt_migrate_out(pt, (struct migrate_out_mail *)m, now);
		free(m);
		break;
	case MAIL_MIGRATE_IN:
		pt_migrate_in(pt, (struct migrate_in_mail *)m, now);
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
	for (struct guest_conn *c = pt->conns.head; c; c = guest_conn_all_next(c)) {
		if (guest_conn_deadline(c) > now)
			continue;
		guest_conn_set_deadline(c, guest_session_tick(guest_conn_session(c), now));
		pt_mark_dirty(pt, c);
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
			pt_process_migrations(pt, now);
		if (pt->nleaving)
			pt_process_leaving(pt, now);
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
	r = inbox_new(cfg, id, pt_inbox_wake, pt, &pt->inbox);
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
		pt_query_answer(((struct query_mail *)m)->q, 0, NULL);
		free(m);
		break;
	case MAIL_MIGRATE_OUT:
		pt_migrate_result_set(((struct migrate_out_mail *)m)->res, -ECANCELED,
				   "the daemon is stopping");
		free(m);
		break;
	case MAIL_MIGRATE_IN: {
		struct vm_state *v = ((struct migrate_in_mail *)m)->vm;
		struct guest_conn *c, *next;
		pt_migrate_result_set(v->migrate_res, -ECANCELED, "the daemon is stopping");
		for (c = v->conns.head; c; c = next) {
			next = guest_conn_vm_next(c);
			guest_conn_discard(c);
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
		pt_migrate_result_set(v->migrate_res, -ECANCELED, "the daemon is stopping");
		pt_vm_unref(pt, v);
	}
	/* The link first: its unconfirmed messages come back to the VM queues. */
	upstream_free(pt->up);
	pt->up = NULL;
	inbox_set_link(pt->inbox, NULL);
	while (pt->conns.head)
		conn_close(pt, pt->conns.head);
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
			pt_msg_free(pt, mm); /* may free v: start the bucket again */
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
