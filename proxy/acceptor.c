/* acceptor.c -- the acceptor's side of vmproxyd (daemon_impl.h): on the
 * thread that calls vmproxy_run it accepts, resolves the peer's VM from
 * what is known without libvirt (or hands the lookup to a lookup thread,
 * lookup.c, and takes the answer back later: it never waits on an RPC),
 * picks the VM's poll thread from the partition table and hands the fd
 * over by mailbox. Listeners that run out of descriptors are paused. */
#include "daemon_impl.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/vm_sockets.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"

#define ACCEPTS_PER_WAKE 64
/* After EMFILE, ENFILE, ENOBUFS or ENOMEM a listener is taken out of the
 * epoll set this long: it is level-triggered, and the connection waiting
 * in its backlog would wake the acceptor again at once. */
#define ACCEPT_PAUSE_MS 250
/* "accept: ..." is logged once, then at most once in this long. */
#define ACCEPT_LOG_MS 10000
/* Refused peers: at most one log line in this long per listener. */
#define REFUSAL_LOG_MS 1000

/* Both below; CACHED: without waiting on libvirt (-EAGAIN when only it can
 * answer). */
static int identify_peer(struct vm_identity *id, const struct listener_config *lc,
			 const struct sockaddr_storage *ss, socklen_t len, struct vm_info *vm,
			 bool cached)
{
	switch (lc->type) {
	case LISTENER_TCP:
		return cached ? vm_identity_by_address_cached(id, (const struct sockaddr *)ss, len,
							      vm)
			      : vm_identity_by_address(id, (const struct sockaddr *)ss, len, vm);
	case LISTENER_VSOCK: {
		const struct sockaddr_vm *svm = (const struct sockaddr_vm *)ss;

		if (ss->ss_family != AF_VSOCK || len < sizeof(*svm))
			return -ENOENT;
		/* CIDs 0, 1, 2 and ANY are never a guest: no lookup at all. */
		if (vm_identity_cid_reserved(svm->svm_cid))
			return -EPERM;
		return cached ? vm_identity_by_cid_cached(id, svm->svm_cid, vm)
			      : vm_identity_by_cid(id, svm->svm_cid, vm);
	}
	case LISTENER_UNIX:
	case LISTENER_FIRECRACKER:
		/* Whoever can connect is the listener's VM. */
		if (lc->uuid) {
			memset(vm, 0, sizeof(*vm));
			snprintf(vm->uuid, sizeof(vm->uuid), "%s", lc->uuid);
			snprintf(vm->name, sizeof(vm->name), "%s", lc->vm);
			return 0;
		}
		return cached ? vm_identity_by_name_cached(id, lc->vm, vm)
			      : vm_identity_by_name(id, lc->vm, vm);
	}
	return -ENOENT;
}

int vmproxy_identify_peer(struct vm_identity *id, const struct listener_config *lc,
			  const struct sockaddr_storage *ss, socklen_t len, struct vm_info *vm)
{
	return identify_peer(id, lc, ss, len, vm, false);
}

int vmproxy_identify_peer_cached(struct vm_identity *id, const struct listener_config *lc,
				 const struct sockaddr_storage *ss, socklen_t len,
				 struct vm_info *vm)
{
	return identify_peer(id, lc, ss, len, vm, true);
}

static int identify(struct vmproxy *p, struct listener *l, const struct sockaddr_storage *ss,
		    socklen_t len, struct vm_info *vm)
{
	return vmproxy_identify_peer(p->id, l->cfg, ss, len, vm);
}

/* Close FD, refused on L for WHY. A peer in a connect loop must not flood
 * the log: one line a second per listener, saying how many went unlogged. */
static void refuse(struct listener *l, int fd, const char *peer, const char *why)
{
	uint64_t now = clock_mono_ms();

	l->refused++;
	if (!l->last_refusal_log_ms || now >= l->last_refusal_log_ms + REFUSAL_LOG_MS) {
		char more[64] = "";

		if (l->refusals_unlogged)
			snprintf(more, sizeof(more), " (and %llu more refused since)",
				 (unsigned long long)l->refusals_unlogged);
		log_warn("%s: refused connection from %s: %s%s", l->name, peer, why, more);
		l->last_refusal_log_ms = now;
		l->refusals_unlogged = 0;
	} else {
		l->refusals_unlogged++;
	}
	close(fd);
}

/* FD's peer identified as VM (R 0) or not (R -errno): hand FD to its VM's
 * poll thread, or close it. 0 when admitted, else -errno. */
static int admit_identified(struct vmproxy *p, struct listener *l, int fd,
			    const struct sockaddr_storage *ss, socklen_t len, struct vm_info *vm,
			    int r)
{
	char peer[80];
	uint32_t conn_id;
	unsigned t;

	listener_peer_str(ss, len, peer, sizeof(peer));
	if (p->phase != RUNNING || r == -ESHUTDOWN) {
		close(fd);
		return -ESHUTDOWN;
	}
	if (r < 0) {
		atomic_fetch_add(r == -ENOTCONN ? &p->refused_libvirt : &p->refused_unknown, 1);
		refuse(l, fd, peer,
		       r == -EPERM ? "a reserved CID (hypervisor, loopback or host), never a guest"
		       : r == -ENOTCONN
			       ? "libvirt is unreachable and this peer was not known before "
				 "it went away"
			       : "no VM known for this peer");
		return r;
	}
	if (partition_total_conns(p->partition) >= p->cfg->limits.max_connections) {
		atomic_fetch_add(&p->refused_limit, 1);
		log_warn("vm=%s: refused connection from %s: the daemon holds its limit of "
			 "%u connections", vm->name, peer, p->cfg->limits.max_connections);
		close(fd);
		return -EMFILE;
	}
	r = partition_assign_conn(p->partition, vm->uuid, p->cfg->guest.max_connections_per_vm, &t);
	if (r < 0) {
		atomic_fetch_add(&p->refused_limit, 1);
		log_warn("vm=%s: refused connection from %s: %s", vm->name, peer,
			 r == -EMFILE ? "the VM holds guest.max_connections_per_vm connections"
				      : strerror(-r));
		close(fd);
		return r;
	}
	conn_id = atomic_fetch_add(&p->next_conn_id, 1) + 1;
	if (poll_thread_delegate(p->threads[t], fd, conn_id, vm, peer) < 0) {
		atomic_fetch_add(&p->refused_limit, 1);
		log_error("vm=%s: refused connection from %s: out of memory", vm->name, peer);
		partition_release_conn(p->partition, vm->uuid);
		close(fd);
		return -ENOMEM;
	}
	l->accepted++;
	atomic_fetch_add(&p->accepted, 1);
	log_debug("vm=%s conn=%u: accepted from %s on %s, thread %u", vm->name, conn_id, peer,
		  l->name, t);
	return 0;
}

/* Identify FD's peer, waiting for libvirt if need be, and admit it. */
static int admit(struct vmproxy *p, struct listener *l, int fd, const struct sockaddr_storage *ss,
		 socklen_t len, struct vm_info *vm)
{
	if (p->phase != RUNNING) {
		close(fd);
		return -ESHUTDOWN;
	}
	return admit_identified(p, l, fd, ss, len, vm, identify(p, l, ss, len, vm));
}

void acceptor_lookup_run(void *ud, struct lookup_job *job)
{
	struct vmproxy *p = ud;

	job->result = identify(p, &p->listeners[job->listener], &job->ss, job->len, &job->vm);
}

/* Admit FD at once when its peer is known without libvirt; else hand the
 * lookup to a lookup thread (acceptor_lookups_done admits it), or refuse it when
 * limits.max_pending_lookups are waiting already. */
static void admit_async(struct vmproxy *p, struct listener *l, int fd,
			const struct sockaddr_storage *ss, socklen_t len)
{
	struct lookup_job *job;
	struct vm_info vm;
	int r;

	if (p->phase != RUNNING) {
		close(fd);
		return;
	}
	r = vmproxy_identify_peer_cached(p->id, l->cfg, ss, len, &vm);
	if (r != -EAGAIN) {
		admit_identified(p, l, fd, ss, len, &vm, r);
		return;
	}
	job = calloc(1, sizeof(*job));
	if (job) {
		job->fd = fd;
		job->listener = (size_t)(l - p->listeners);
		memcpy(&job->ss, ss, sizeof(*ss));
		job->len = len;
		job->submitted_ms = clock_mono_ms();
		if (lookup_submit(p->lookups, job) == 0)
			return;
	}
	{
		char peer[80];

		listener_peer_str(ss, len, peer, sizeof(peer));
		atomic_fetch_add(&p->refused_lookups, 1);
		refuse(l, fd, peer,
		       job ? "limits.max_pending_lookups identity lookups are waiting for libvirt "
			     "already"
			   : "out of memory");
		free(job);
	}
}

/* Lookups a lookup thread finished: admit or refuse their connections. */
void acceptor_lookups_done(struct vmproxy *p)
{
	struct lookup_job *job = lookup_take_done(p->lookups), *next;

	for (; job; job = next) {
		next = job->next_done;
		admit_identified(p, &p->listeners[job->listener], job->fd, &job->ss, job->len,
				 &job->vm, job->result);
		free(job);
	}
}

int vmproxy_admit(struct vmproxy *p, size_t listener, int fd, const struct sockaddr_storage *ss,
		  socklen_t len, struct vm_info *vm)
{
	struct vm_info tmp;

	if (listener >= p->nlisteners) {
		close(fd);
		return -EINVAL;
	}
	return admit(p, &p->listeners[listener], fd, ss, len, vm ? vm : &tmp);
}

/* Out of descriptors or memory: take L out of the epoll set for a while
 * (vmproxy_run puts it back) instead of being woken for it in a loop. */
static void pause_listener(struct vmproxy *p, struct listener *l, int err)
{
	uint64_t now = clock_mono_ms();

	epoll_ctl(p->epfd, EPOLL_CTL_DEL, l->fd, NULL);
	l->paused_until_ms = now + ACCEPT_PAUSE_MS;
	l->accept_errors++;
	if (!l->last_error_log_ms || now >= l->last_error_log_ms + ACCEPT_LOG_MS) {
		log_warn("%s: accept: %s; pausing this listener for %u ms at a time until it "
			 "passes (%llu such errors so far)",
			 l->name, strerror(err), ACCEPT_PAUSE_MS,
			 (unsigned long long)l->accept_errors);
		l->last_error_log_ms = now;
	}
}

void acceptor_accept(struct vmproxy *p, struct listener *l)
{
	for (int i = 0; i < ACCEPTS_PER_WAKE; i++) {
		struct sockaddr_storage ss;
		socklen_t len;
		int fd, r;

		r = listener_accept(l, &fd, &ss, &len);
		if (r == -EAGAIN)
			return;
		switch (r) {
		case 0:
			break;
		/* The connection that was waiting is gone, or a network error
		 * that belongs to it (accept(2)): the next one may be fine. */
		case -ECONNABORTED:
		case -EINTR:
		case -EPROTO:
		case -EPERM:
		case -ENETDOWN:
		case -ENETUNREACH:
		case -EHOSTDOWN:
		case -EHOSTUNREACH:
		case -ENONET:
		case -ENOPROTOOPT:
		case -EOPNOTSUPP:
		case -ETIMEDOUT:
			log_debug("%s: accept: %s; skipped", l->name, strerror(-r));
			continue;
		default:
			/* EMFILE, ENFILE, ENOBUFS, ENOMEM, anything else. */
			pause_listener(p, l, -r);
			return;
		}
		admit_async(p, l, fd, &ss, len);
	}
}

int acceptor_resume_listeners(struct vmproxy *p)
{
	uint64_t now = clock_mono_ms(), next = 0;

	if (p->phase != RUNNING)
		return -1;
	for (size_t i = 0; i < p->nlisteners; i++) {
		struct listener *l = &p->listeners[i];

		if (!l->paused_until_ms || l->fd < 0)
			continue;
		if (now >= l->paused_until_ms) {
			l->paused_until_ms = 0;
			daemon_epoll_add(p, l->fd, l);
		} else if (!next || l->paused_until_ms < next) {
			next = l->paused_until_ms;
		}
	}
	return next ? (int)(next - now) : -1;
}
