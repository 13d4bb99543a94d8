/* poll_migrate.c -- VMs that move: to another poll thread (the balancer's
 * or the operator's migration: quiesce, wait for confirms, hand the
 * connections over by mail) and away to another host (libvirt's notices:
 * stopped, migrating away, CID changed). */
#include "poll_thread_impl.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>

#include "log.h"
#include "partition.h"

/* ---- migration between threads ------------------------------------------ */

void pt_migrate_result_set(struct migrate_result *res, int status, const char *fmt, ...)
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
void pt_migrate_out(struct poll_thread *pt, struct migrate_out_mail *mo, uint64_t now)
{
	struct vm_state *v = pt_vm_find(pt, mo->uuid);

	if (!v) {
		pt_migrate_result_set(mo->res, -ENOENT, "VM %s has no connections on thread %u",
				   mo->uuid, pt->id);
		return;
	}
	if (mo->to >= pt->sh->nthreads) {
		pt_migrate_result_set(mo->res, -EINVAL, "there is no thread %u (0..%u)", mo->to,
				   pt->sh->nthreads - 1);
		return;
	}
	if (mo->to == pt->id) {
		pt_migrate_result_set(mo->res, 0, "vm %s is already on thread %u", v->info.name, pt->id);
		return;
	}
	if (v->migrating) {
		pt_migrate_result_set(mo->res, -EBUSY, "vm %s is already moving to thread %u",
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
		 "held messages are confirmed", v->info.name, pt->id, mo->to, v->conns.count,
		 (unsigned long long)v->held_msgs);
	for (struct guest_conn *c = v->conns.head; c; c = guest_conn_vm_next(c))
		pt_mark_dirty(pt, c);
}

static void migrate_abandon(struct poll_thread *pt, struct vm_state *v, uint64_t now)
{
	log_warn("vm=%s: move to thread %u abandoned: %llu messages still unconfirmed after %llu "
		 "ms; it stays on thread %u", v->info.name, v->migrate_to,
		 (unsigned long long)v->held_msgs, (unsigned long long)(now - v->migrate_started),
		 pt->id);
	pt_migrate_result_set(v->migrate_res, -ETIMEDOUT,
			   "abandoned: %llu messages still unconfirmed after %llu ms",
			   (unsigned long long)v->held_msgs,
			   (unsigned long long)(now - v->migrate_started));
	v->migrate_res = NULL;
	v->migrating = false;
	for (struct guest_conn *c = v->conns.head; c; c = guest_conn_vm_next(c))
		pt_mark_dirty(pt, c);
	pt_vm_unref(pt, v);
}

/* Called with the dirty list empty: nothing on this thread still points at
 * the VM's connections once they leave. */
static void migrate_handover(struct poll_thread *pt, struct vm_state *v, uint64_t now)
{
	struct migrate_in_mail *im;
	struct vm_state **pv;
	char uuid[VM_UUID_LEN + 1];
	unsigned to;

	if (v->conns.count == 0) {
		pt_migrate_result_set(v->migrate_res, 0, "vm %s has no connections left to move",
				   v->info.name);
		v->migrate_res = NULL;
		v->migrating = false;
		pt_vm_unref(pt, v);
		return;
	}
	im = calloc(1, sizeof(*im));
	if (!im) {
		migrate_abandon(pt, v, now);
		return;
	}
	for (struct guest_conn *c = v->conns.head; c; c = guest_conn_vm_next(c)) {
		/* Inbox consumers stay with this thread's link: cancel them. */
		inbox_conn_leaving(pt->inbox, c);
	}
	for (struct guest_conn *c = v->conns.head; c; c = guest_conn_vm_next(c)) {
		/* Last chance to send acks from here; what is left moves along. */
		int r = guest_conn_flush(c, now, &pt->guest_writes);
		if (r < 0 && r != -EAGAIN)
			guest_conn_close_later(c);
		guest_conn_unwatch(c, pt->epfd);
		pt_conn_detach(pt, c, false);
	}
	for (pv = &pt->vms[pt_hash_uuid(v->info.uuid) % VM_BUCKETS]; *pv != v; pv = &(*pv)->hash_next)
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

void pt_migrate_in(struct poll_thread *pt, struct migrate_in_mail *im, uint64_t now)
{
	struct vm_state *v = im->vm, *have = pt_vm_find(pt, v->info.uuid);
	struct guest_conn *list = v->conns.head, *c, *next;
	struct migrate_result *res = v->migrate_res;
	uint64_t took = now - v->migrate_started;
	unsigned n = v->conns.count;

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
		size_t b = pt_hash_uuid(v->info.uuid) % VM_BUCKETS;
		v->hash_next = pt->vms[b];
		pt->vms[b] = v;
		pt->nvms++;
		v->conns = (struct guest_conn_list){ NULL, 0 };
		v->refs = 0;
	}
	for (c = list; c; c = next) {
		next = guest_conn_vm_next(c);
		guest_conn_set_owner(c, pt, v);
		if (guest_conn_session(c))
			guest_session_set_config(guest_conn_session(c), &pt->scfg);
		v->refs++;
		pt_conn_attach(pt, c);
		inbox_conn_arrived(pt->inbox, c, &v->info);
		/* No interest yet: conn_update_epoll sets it (and resumes the
		 * engine's receive timer) when the dirty list is flushed. */
		if (guest_conn_watch(c, pt->epfd, false) < 0)
			guest_conn_close_later(c);
		guest_conn_set_deadline(c, 0);
		pt_conn_update_blocked(pt, c); /* this thread's bound and link now */
	}
	pt->migrations_in++;
	if (v->leaving)
		pt->nleaving++;
	log_info("vm=%s: moved from thread %u to thread %u in %llu ms (%u connections)",
		 v->info.name, im->from, pt->id, (unsigned long long)took, n);
	pt_migrate_result_set(res, 0, "vm %s moved from thread %u to thread %u in %llu ms",
			   v->info.name, im->from, pt->id, (unsigned long long)took);
	pt_check_bounds(pt, v);
}

void pt_process_migrations(struct poll_thread *pt, uint64_t now)
{
	struct vm_state **pv = &pt->migrating, *v;

	while ((v = *pv)) {
		if (v->held_msgs == 0 || v->conns.count == 0) {
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



/* ---- a VM's changes: stopped, leaving for another host, CID changed ---------- */

/* Close the stopped VM's connections (or act on its other changes, see
 * poll_thread_vm_change). Returns false when the mail was forwarded instead:
 * the VM moved to another thread after the notice was addressed here (the
 * mail is then not ours to free). */
bool pt_vm_gone(struct poll_thread *pt, struct vm_gone_mail *gm, uint64_t now)
{
	struct vm_state *v = pt_vm_find(pt, gm->uuid);
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
			 v->info.name, pt->id, v->conns.count);
		pt_close_vm_conns(pt, v, 320, "CONNECTION_FORCED - VM is no longer running");
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
			 v->info.name, pt->id, v->conns.count, (unsigned long long)v->held_msgs,
			 gm->settle_ms);
		for (struct guest_conn *c = v->conns.head; c; c = guest_conn_vm_next(c))
			pt_mark_dirty(pt, c);
		break;
	case VM_CID_CHANGED:
		for (struct guest_conn *c = v->conns.head; c; c = guest_conn_vm_next(c)) {
			if (!guest_conn_cid(c) || guest_conn_cid(c) == gm->cid)
				continue;
			guest_session_close(
				guest_conn_session(c), 320,
				"CONNECTION_FORCED - the VM no longer has this vsock CID");
			guest_conn_set_deadline(c, 0);
			pt_mark_dirty(pt, c);
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
void pt_process_leaving(struct poll_thread *pt, uint64_t now)
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
					 v->info.name, pt->id, v->conns.count);
			pt_close_vm_conns(pt, v, 320,
				       "CONNECTION_FORCED - VM migrated to another host");
		}
	}
	pt->nleaving = still; /* a VM that went away by itself is not counted */
}
