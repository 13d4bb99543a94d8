/* poll_request.c -- what other threads ask of a poll thread: the typed
 * requests of poll_thread.h, each a mail of the thread's own, and the
 * reports that answer queries. */
#include "poll_thread_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

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
void pt_report(struct poll_thread *pt, struct poll_report *r)
{
	size_t k = 0;

	memset(r, 0, sizeof(*r));
	r->vms = pt->nvms ? calloc(pt->nvms, sizeof(*r->vms)) : NULL;
	for (size_t b = 0; r->vms && b < VM_BUCKETS; b++) {
		for (struct vm_state *v = pt->vms[b]; v && k < pt->nvms; v = v->hash_next) {
			struct poll_vm_report *vr = &r->vms[k++];

			vr->info = v->info;
			vr->connections = v->conns.count;
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
	r->connections = pt->conns.count;
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
void pt_query_answer(struct query *q, unsigned id, struct poll_report *r)
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
