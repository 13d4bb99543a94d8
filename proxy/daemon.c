/* daemon.c -- see daemon.h. The acceptor runs on the thread that calls
 * vmproxy_run: it accepts, resolves the peer's VM from what is known
 * without libvirt (or hands the lookup to a lookup thread, lookup.c, and
 * takes the answer back later: it never waits on an RPC), picks the VM's
 * poll thread from the partition table and hands the fd over by mailbox. */
#include "daemon.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/vm_sockets.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "balancer.h"
#include "metrics.h"
#include "clock.h"
#include "helper.h"
#include "listener.h"
#include "log.h"
#include "lookup.h"
#include "partition.h"
#include "report_json.h"
#include "poll_thread.h"

#define ACCEPTS_PER_WAKE 64
/* After EMFILE, ENFILE, ENOBUFS or ENOMEM a listener is taken out of the
 * epoll set this long: it is level-triggered, and the connection waiting
 * in its backlog would wake the acceptor again at once. */
#define ACCEPT_PAUSE_MS 250
/* "accept: ..." is logged once, then at most once in this long. */
#define ACCEPT_LOG_MS 10000
/* Refused peers: at most one log line in this long per listener. */
#define REFUSAL_LOG_MS 1000
#define MAX_VMS		 100000
#define CLOSE_GRACE_MS	 3000
/* Threads for identity lookups that wait on libvirt. */
#define LOOKUP_THREADS 2

enum drain_phase {
	RUNNING,
	WAIT_CONFIRMS,
	WAIT_CLOSED,
	DONE,
};

struct vmproxy {
	struct proxy_config *cfg;
	struct vm_identity *id;
	struct helper_pool *helpers;
	struct lookup_queue *lookups;
	struct partition *partition;
	struct poll_shared shared;
	struct poll_thread **threads;
	unsigned nthreads;
	struct listener *listeners;
	size_t nlisteners;
	struct admin *admin;
	struct metrics_server *metrics;
	int epfd, stopfd, sigfd, timerfd;
	const char *log_file;
	enum drain_phase phase;
	uint64_t phase_deadline;
	uint64_t watchdog_usec;
	struct balancer balancer;
	uint64_t next_balance_ms, last_sample_ms;
	struct poll_report *prev_threads; /* the previous sample's reports (no VM lists) */
	unsigned nprev_threads;
	pthread_mutex_t load_lock; /* guards load, read by admin and metrics */
	json_t *load;		/* per thread rates at the last sample */
	_Atomic bool balancer_enabled;
	bool log_level_pinned;	      /* --log-level given: reloads keep it */
	char ***retired;	      /* exchange lists replaced by reloads: a session may
				       * still be reading one, so they live until exit */
	size_t nretired;
	_Atomic uint32_t next_conn_id;
	_Atomic uint64_t accepted, refused_unknown, refused_limit, refused_libvirt, refused_lookups,
		vms_gone;
};

int vmproxy_new(struct proxy_config *cfg, struct vmproxy **out)
{
	struct vmproxy *p = calloc(1, sizeof(*p));

	if (!p) {
		proxy_config_free(cfg);
		return -ENOMEM;
	}
	p->cfg = cfg;
	p->epfd = p->stopfd = p->sigfd = p->timerfd = -1;
	*out = p;
	return 0;
}

struct vm_identity *vmproxy_identity(struct vmproxy *p)
{
	return p->id;
}

const struct proxy_config *vmproxy_config(struct vmproxy *p)
{
	return p->cfg;
}

void vmproxy_pin_log_level(struct vmproxy *p)
{
	p->log_level_pinned = true;
}

static void lookup_run(void *ud, struct lookup_job *job);

static void on_vm_gone(void *ud, const struct vm_info *vm, enum vm_change how)
{
	struct vmproxy *p = ud;
	unsigned t;

	if (how != VM_CID_CHANGED)
		atomic_fetch_add(&p->vms_gone, 1);
	if (partition_lookup(p->partition, vm->uuid, &t) < 0)
		return; /* no connections from it */
	/* drain_timeout_ms is read here while a reload may write it: one
	 * aligned word. */
	if (poll_thread_vm_change(p->threads[t], vm->uuid, how, vm->cid,
				  p->cfg->drain_timeout_ms) < 0)
		log_error("vm=%s: %s, but out of memory: its connections stay open until they "
			  "close or the VM's next lifecycle event",
			  vm->name, how == VM_CID_CHANGED ? "its CID changed" : "stopped");
}

/* CPUs for the poll threads: the configured list, else the process's
 * affinity mask in order. Returns the thread count. */
static unsigned pick_cpus(const struct proxy_config *cfg, int **cpus_out)
{
	cpu_set_t set;
	unsigned n = cfg->threads.count, k = 0;
	int *cpus;

	if (cfg->threads.cpus && cfg->threads.n_cpus) {
		if (!n)
			n = (unsigned)cfg->threads.n_cpus;
		cpus = calloc(n, sizeof(int));
		for (unsigned i = 0; cpus && i < n; i++)
			cpus[i] = cfg->threads.cpus[i % cfg->threads.n_cpus];
		*cpus_out = cpus;
		return cpus ? n : 0;
	}
	CPU_ZERO(&set);
	if (sched_getaffinity(0, sizeof(set), &set) < 0)
		CPU_SET(0, &set);
	if (!n)
		n = (unsigned)CPU_COUNT(&set);
	if (!n)
		n = 1;
	cpus = calloc(n, sizeof(int));
	if (!cpus)
		return 0;
	for (int c = 0; c < CPU_SETSIZE && k < n; c++)
		if (CPU_ISSET(c, &set))
			cpus[k++] = c;
	/* More threads than CPUs: the rest share, round-robin. */
	for (unsigned i = k; i < n; i++)
		cpus[i] = k ? cpus[i % k] : -1;
	*cpus_out = cpus;
	return n;
}

static int add_fd(struct vmproxy *p, int fd, void *ptr)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = ptr };

	return epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &e) < 0 ? -errno : 0;
}

int vmproxy_start(struct vmproxy *p, char *err, size_t errlen)
{
	const struct proxy_config *cfg = p->cfg;
	struct itimerspec its = { { 1, 0 }, { 1, 0 } };
	int *cpus = NULL;
	int r;

	{
		struct balancer_config bc;
		struct conf_ctx cc;

		conf_ctx_init(&cc, cfg->file);
		r = balancer_config_parse(&cc, cfg->balancer_raw, &bc);
		if (r < 0) {
			snprintf(err, errlen, "%s", cc.err);
			return r;
		}
		balancer_init(&p->balancer, &bc);
		atomic_store(&p->balancer_enabled, bc.enabled);
		p->load = json_array();
		pthread_mutex_init(&p->load_lock, NULL);
	}
	r = vm_identity_new(cfg, &p->id, err, errlen);
	if (r < 0)
		return r;
	r = helper_pool_new(2, &p->helpers);
	if (r < 0) {
		snprintf(err, errlen, "cannot start helper threads: %s", strerror(-r));
		return r;
	}
	r = lookup_queue_new(LOOKUP_THREADS, cfg->limits.max_pending_lookups, lookup_run, p,
			     &p->lookups);
	if (r < 0) {
		snprintf(err, errlen, "cannot start identity lookup threads: %s", strerror(-r));
		return r;
	}
	p->nthreads = pick_cpus(cfg, &cpus);
	if (!p->nthreads) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	r = partition_new(p->nthreads, MAX_VMS, &p->partition);
	if (r < 0) {
		free(cpus);
		snprintf(err, errlen, "out of memory");
		return r;
	}
	p->shared.cfg = cfg;
	p->shared.partition = p->partition;
	p->shared.helpers = p->helpers;
	p->shared.allowed_exchanges = (const char *const *)cfg->guest.allowed_exchanges;
	poll_thread_session_config(cfg, p->shared.allowed_exchanges, &p->shared.scfg);
	p->threads = calloc(p->nthreads, sizeof(*p->threads));
	if (!p->threads) {
		free(cpus);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	p->shared.threads = p->threads;
	p->shared.nthreads = p->nthreads;
	for (unsigned i = 0; i < p->nthreads; i++) {
		r = poll_thread_new(i, cpus[i], &p->shared, &p->threads[i]);
		if (r == 0)
			r = poll_thread_start(p->threads[i]);
		if (r < 0) {
			free(cpus);
			snprintf(err, errlen, "cannot start poll thread %u: %s", i, strerror(-r));
			return r;
		}
	}
	log_info("%u poll threads started", p->nthreads);
	free(cpus);

	p->epfd = epoll_create1(EPOLL_CLOEXEC);
	p->stopfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	p->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (p->epfd < 0 || p->stopfd < 0 || p->timerfd < 0) {
		snprintf(err, errlen, "epoll/eventfd/timerfd: %s", strerror(errno));
		return -errno;
	}
	timerfd_settime(p->timerfd, 0, &its, NULL);
	add_fd(p, p->stopfd, &p->stopfd);
	add_fd(p, p->timerfd, &p->timerfd);
	add_fd(p, lookup_queue_fd(p->lookups), &p->lookups);
	if (p->sigfd >= 0)
		add_fd(p, p->sigfd, &p->sigfd);

	p->listeners = calloc(cfg->n_listeners, sizeof(*p->listeners));
	if (!p->listeners) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	for (size_t i = 0; i < cfg->n_listeners; i++) {
		r = listener_open(&cfg->listeners[i], &p->listeners[i], err, errlen);
		if (r < 0)
			return r;
		p->nlisteners = i + 1;
		add_fd(p, p->listeners[i].fd, &p->listeners[i]);
		log_info("listening on %s", p->listeners[i].name);
	}
	r = vm_identity_start_events(p->id, on_vm_gone, p);
	if (r < 0) {
		snprintf(err, errlen, "libvirt events: %s", strerror(-r));
		return r;
	}
	{
		struct metrics_config mc;
		struct conf_ctx cc;

		conf_ctx_init(&cc, cfg->file);
		r = metrics_config_parse(&cc, cfg->metrics_raw, &mc);
		if (r < 0) {
			snprintf(err, errlen, "%s", cc.err);
			return r;
		}
		r = metrics_start(p, &mc, &p->metrics, err, errlen);
		if (r < 0)
			return r;
	}
	if (cfg->admin.socket) {
		r = admin_start(p, cfg->admin.socket, cfg->admin.group, &p->admin, err, errlen);
		if (r < 0)
			return r;
	}
	if (sd_watchdog_enabled(0, &p->watchdog_usec) <= 0)
		p->watchdog_usec = 0;
	sd_notifyf(0, "READY=1\nSTATUS=%u poll threads, %zu listeners", p->nthreads,
		   p->nlisteners);
	return 0;
}

void vmproxy_handle_signals(struct vmproxy *p, const char *log_file)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	p->sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	p->log_file = log_file;
}

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

/* On a lookup thread. */
static void lookup_run(void *ud, struct lookup_job *job)
{
	struct vmproxy *p = ud;

	job->result = identify(p, &p->listeners[job->listener], &job->ss, job->len, &job->vm);
}

/* Admit FD at once when its peer is known without libvirt; else hand the
 * lookup to a lookup thread (on_lookups_done admits it), or refuse it when
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
static void on_lookups_done(struct vmproxy *p)
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

static void accept_some(struct vmproxy *p, struct listener *l)
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

/* Put paused listeners whose time has come back into the epoll set;
 * returns the epoll_wait timeout until the next one (-1: none paused). */
static int resume_listeners(struct vmproxy *p)
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
			add_fd(p, l->fd, l);
		} else if (!next || l->paused_until_ms < next) {
			next = l->paused_until_ms;
		}
	}
	return next ? (int)(next - now) : -1;
}

static void post_all(struct vmproxy *p, enum poll_control what)
{
	static const char *const names[] = {
		[POLL_PAUSE] = "pause",
		[POLL_DRAIN] = "drain",
		[POLL_RELINK] = "relink",
	};

	for (unsigned i = 0; i < p->nthreads; i++)
		if (poll_thread_control(p->threads[i], what) < 0)
			log_error("thread=%u: out of memory: %s request not sent", i, names[what]);
}

static void begin_drain(struct vmproxy *p)
{
	if (p->phase != RUNNING)
		return;
	log_info("draining: no new connections; waiting up to %u ms for broker confirms",
		 p->cfg->drain_timeout_ms);
	sd_notify(0, "STOPPING=1");
	for (size_t i = 0; i < p->nlisteners; i++) {
		epoll_ctl(p->epfd, EPOLL_CTL_DEL, p->listeners[i].fd, NULL);
		listener_close(&p->listeners[i]);
	}
	/* Guests are no longer read, so what is held can only shrink. */
	post_all(p, POLL_PAUSE);
	p->phase = WAIT_CONFIRMS;
	p->phase_deadline = clock_mono_ms() + p->cfg->drain_timeout_ms;
}

static uint64_t total_held(struct vmproxy *p)
{
	uint64_t n = 0;

	for (unsigned i = 0; i < p->nthreads; i++)
		n += atomic_load(&poll_thread_gauges(p->threads[i])->held_messages);
	return n;
}

static uint32_t total_conns(struct vmproxy *p)
{
	uint32_t n = 0;

	for (unsigned i = 0; i < p->nthreads; i++)
		n += atomic_load(&poll_thread_gauges(p->threads[i])->connections);
	return n;
}

/* Post a move of UUID (on thread FROM) to thread TO; RES may be NULL. */
static int post_migrate(struct vmproxy *p, const char *uuid, unsigned from, unsigned to,
			struct migrate_result *res)
{
	return poll_thread_migrate(p->threads[from], uuid, to, p->balancer.cfg.migrate_timeout_ms,
				   res);
}

/* Keep the per-thread rates since the previous sample (R, N reports) as
 * the admin socket's and /metrics' "load". */
static void thread_load(struct vmproxy *p, struct poll_report *r, unsigned n, double dt)
{
	json_t *load = report_json_load(r, p->prev_threads, p->nprev_threads, n, dt);
	struct poll_report *keep = calloc(n, sizeof(*keep));

	for (unsigned i = 0; keep && i < n; i++) {
		keep[i] = r[i];
		keep[i].vms = NULL;
		keep[i].nvms = 0;
	}
	free(p->prev_threads);
	p->prev_threads = keep;
	p->nprev_threads = keep ? n : 0;
	pthread_mutex_lock(&p->load_lock);
	json_decref(p->load);
	p->load = load;
	pthread_mutex_unlock(&p->load_lock);
}

/* Sample every thread, keep the load and let the balancer decide; carry
 * out at most one move per sample. */
static void balance(struct vmproxy *p, uint64_t now)
{
	unsigned n = 0;
	struct poll_report *threads = vmproxy_query_threads(p, 1000, &n);
	double dt = p->last_sample_ms ? (double)(now - p->last_sample_ms) / 1000.0 : 0;
	struct bal_move move;

	if (!threads)
		return;
	thread_load(p, threads, n, dt);
	p->last_sample_ms = now;
	p->balancer.cfg.enabled = atomic_load(&p->balancer_enabled);
	if (balancer_observe(&p->balancer, threads, n, now, &move) == 1) {
		log_info("balancer: thread %u at %.0f msgs/s, thread %u at %.0f: moving vm %s",
			 move.from, move.from_load, move.to, move.to_load, move.uuid);
		post_migrate(p, move.uuid, move.from, move.to, NULL);
	}
	poll_reports_free(threads, n);
}

int vmproxy_migrate(struct vmproxy *p, const char *vm, unsigned to, char *msg, size_t msglen)
{
	unsigned n = 0;
	struct poll_report *threads = vmproxy_query_threads(p, 2000, &n);
	struct migrate_result res;
	char uuid[VM_UUID_LEN + 1] = "";
	unsigned from = 0;
	int r;

	if (!threads) {
		snprintf(msg, msglen, "a poll thread did not answer within 2000 ms");
		return -ETIMEDOUT;
	}
	for (unsigned i = 0; i < n; i++) {
		for (size_t j = 0; j < threads[i].nvms; j++) {
			const struct vm_info *info = &threads[i].vms[j].info;
			if (strcmp(info->uuid, vm) == 0 || strcmp(info->name, vm) == 0) {
				snprintf(uuid, sizeof(uuid), "%s", info->uuid);
				from = i;
			}
		}
	}
	poll_reports_free(threads, n);
	if (!uuid[0]) {
		snprintf(msg, msglen, "no VM \"%.64s\" has connections here", vm);
		return -ENOENT;
	}
	if (to >= p->nthreads) {
		snprintf(msg, msglen, "there is no thread %u (0..%u)", to, p->nthreads - 1);
		return -EINVAL;
	}
	memset(&res, 0, sizeof(res));
	pthread_mutex_init(&res.lock, NULL);
	pthread_cond_init(&res.cond, NULL);
	r = post_migrate(p, uuid, from, to, &res);
	if (r < 0) {
		snprintf(msg, msglen, "out of memory");
		return r;
	}
	/* The poll thread always answers: done, abandoned at the timeout, or
	 * cancelled at shutdown. */
	pthread_mutex_lock(&res.lock);
	while (!res.done)
		pthread_cond_wait(&res.cond, &res.lock);
	pthread_mutex_unlock(&res.lock);
	snprintf(msg, msglen, "%s", res.msg);
	pthread_mutex_destroy(&res.lock);
	pthread_cond_destroy(&res.cond);
	return res.status;
}

void vmproxy_set_balancer(struct vmproxy *p, bool enabled)
{
	atomic_store(&p->balancer_enabled, enabled);
	log_info("balancer %s by the operator", enabled ? "enabled" : "disabled");
}

static void on_timer(struct vmproxy *p)
{
	uint64_t now = clock_mono_ms(), held;
	bool alive = true;

	for (unsigned i = 0; i < p->nthreads; i++) {
		if (now - atomic_load(&poll_thread_gauges(p->threads[i])->loop_ms) > 10000)
			alive = false;
	}
	if (p->watchdog_usec && alive)
		sd_notify(0, "WATCHDOG=1");
	if (p->phase == RUNNING && now >= p->next_balance_ms) {
		p->next_balance_ms = now + p->balancer.cfg.interval_ms;
		balance(p, now);
	}

	switch (p->phase) {
	case RUNNING:
	case DONE:
		break;
	case WAIT_CONFIRMS:
		held = total_held(p);
		if (held == 0 || now >= p->phase_deadline) {
			if (held)
				log_warn("drain: %llu messages still unconfirmed after %u ms; closing "
					 "guests anyway (they were not acked to them)",
					 (unsigned long long)held, p->cfg->drain_timeout_ms);
			post_all(p, POLL_DRAIN);
			p->phase = WAIT_CLOSED;
			p->phase_deadline = now + CLOSE_GRACE_MS;
		}
		break;
	case WAIT_CLOSED:
		if (total_conns(p) == 0 || now >= p->phase_deadline)
			p->phase = DONE;
		break;
	}
}

/* Make a reloaded session setting visible to the poll threads. Each field is
 * one aligned word written by one store: a poll thread's session reads the
 * old or the new value at its next channel or method, never a mix. */
#define SWAP(a, b)                                                                                 \
	do {                                                                                       \
		__typeof__(a) swap_tmp_ = (a);                                                     \
		(a) = (b);                                                                         \
		(b) = swap_tmp_;                                                                   \
	} while (0)

/* SIGHUP: read the file again and apply what changes without dropping a
 * guest (log level, guest bounds and allowed exchanges, balancer settings,
 * metrics.per_vm, drain_timeout_ms, static identities appended). Anything
 * else, or a file that does not load, leaves the running configuration as
 * it is, and says why. */
static void reload_config(struct vmproxy *p)
{
	struct proxy_config *cfg = p->cfg, *ncfg = NULL;
	char ***grown;
	struct balancer_config bc;
	struct metrics_config mc;
	struct conf_ctx cc;
	enum log_level level;
	char err[600], key[64];
	size_t nex = 0, nstatic;

	if (proxy_config_load(cfg->file, &ncfg, err, sizeof(err)) < 0) {
		log_error("SIGHUP: %s; the running configuration stays", err);
		return;
	}
	if (proxy_config_restart_key(cfg, ncfg, key, sizeof(key))) {
		log_error("SIGHUP: %s: %s changed, which takes a restart; the running "
			  "configuration stays", cfg->file, key);
		proxy_config_free(ncfg);
		return;
	}
	grown = realloc(p->retired, (p->nretired + 1) * sizeof(*p->retired));
	if (!grown) {
		log_error("SIGHUP: out of memory; the running configuration stays");
		proxy_config_free(ncfg);
		return;
	}
	p->retired = grown;
	/* The one step that can still fail (a new static entry naming a domain
	 * libvirt does not have), so it goes first. */
	nstatic = json_array_size(json_object_get(json_object_get(cfg->raw, "identity"), "static"));
	if (vm_identity_add_statics(p->id, ncfg, nstatic, err, sizeof(err)) < 0) {
		log_error("SIGHUP: %s: %s; the running configuration stays", cfg->file, err);
		proxy_config_free(ncfg);
		return;
	}
	if (ncfg->identity.n_statics > nstatic)
		log_info("SIGHUP: %zu identity.static entries added",
			 ncfg->identity.n_statics - nstatic);
	conf_ctx_init(&cc, cfg->file);
	balancer_config_parse(&cc, ncfg->balancer_raw, &bc);
	conf_ctx_init(&cc, cfg->file);
	metrics_config_parse(&cc, ncfg->metrics_raw, &mc);

	if (!p->log_level_pinned && log_level_parse(ncfg->log_level, &level) == 0)
		log_set_level(level);
	/* Daemon-thread settings: the acceptor, the timer and the drain read
	 * them on this thread. */
	cfg->guest.max_connections_per_vm = ncfg->guest.max_connections_per_vm;
	cfg->drain_timeout_ms = ncfg->drain_timeout_ms;
	p->balancer.cfg = bc;
	atomic_store(&p->balancer_enabled, bc.enabled);
	metrics_set_per_vm(p->metrics, mc.per_vm);
	/* Session settings: each poll thread has its own copy, which its
	 * sessions read, and takes the new values by mail. The old exchange
	 * list may still be read by a session: it is retired, not freed. */
	p->retired[p->nretired++] = cfg->guest.allowed_exchanges;
	cfg->guest.allowed_exchanges = ncfg->guest.allowed_exchanges;
	ncfg->guest.allowed_exchanges = NULL;
	p->shared.allowed_exchanges = (const char *const *)cfg->guest.allowed_exchanges;
	p->shared.scfg.allowed_exchanges = p->shared.allowed_exchanges;
	p->shared.scfg.channel_max = ncfg->guest.channel_max;
	p->shared.scfg.heartbeat = ncfg->guest.heartbeat;
	p->shared.scfg.handshake_timeout_ms = ncfg->guest.handshake_timeout_ms;
	for (unsigned i = 0; i < p->nthreads; i++)
		if (poll_thread_reconfig(p->threads[i], p->shared.allowed_exchanges,
					 p->shared.scfg.channel_max, p->shared.scfg.heartbeat,
					 p->shared.scfg.handshake_timeout_ms) < 0)
			log_error("SIGHUP: out of memory: thread %u keeps its guest session settings "
				  "until the next reload", i);
	/* The file as applied is what the next reload compares against. */
	SWAP(cfg->raw, ncfg->raw);
	SWAP(cfg->balancer_raw, ncfg->balancer_raw);
	SWAP(cfg->metrics_raw, ncfg->metrics_raw);
	SWAP(cfg->identity.statics, ncfg->identity.statics);
	SWAP(cfg->identity.n_statics, ncfg->identity.n_statics);
	SWAP(cfg->log_level, ncfg->log_level);
	proxy_config_free(ncfg);
	while (cfg->guest.allowed_exchanges[nex])
		nex++;
	log_info("SIGHUP: configuration reloaded (log_level %s%s, %zu allowed exchanges, "
		 "balancer %s, metrics.per_vm %s)", cfg->log_level,
		 p->log_level_pinned ? " ignored: --log-level given" : "", nex,
		 bc.enabled ? "on" : "off", mc.per_vm ? "on" : "off");
}

static void on_signal(struct vmproxy *p)
{
	struct signalfd_siginfo si;

	while (read(p->sigfd, &si, sizeof(si)) == sizeof(si)) {
		if (si.ssi_signo == SIGHUP) {
			int r;

			if (p->phase == RUNNING)
				reload_config(p);
			r = log_reopen(p->log_file);
			if (r < 0)
				log_error("SIGHUP: cannot reopen \"%s\": %s", p->log_file,
					  strerror(-r));
			else
				log_info("SIGHUP: log reopened");
			/* Certificate rotation: every link reconnects once its
			 * published messages are settled, reading the files anew. */
			if (p->phase == RUNNING) {
				log_info("SIGHUP: upstream links reconnect when idle to re-read "
					 "the TLS files");
				post_all(p, POLL_RELINK);
			}
		} else {
			log_info("signal %u: shutting down", si.ssi_signo);
			begin_drain(p);
		}
	}
}

int vmproxy_run(struct vmproxy *p)
{
	struct epoll_event evs[32];

	while (p->phase != DONE) {
		int n = epoll_wait(p->epfd, evs, 32, resume_listeners(p));

		if (n < 0 && errno != EINTR)
			return -errno;
		for (int i = 0; i < n; i++) {
			void *ptr = evs[i].data.ptr;
			uint64_t v;

			if (ptr == &p->stopfd) {
				if (read(p->stopfd, &v, sizeof(v)) > 0)
					begin_drain(p);
			} else if (ptr == &p->timerfd) {
				if (read(p->timerfd, &v, sizeof(v)) > 0)
					on_timer(p);
			} else if (ptr == &p->sigfd) {
				on_signal(p);
			} else if (ptr == &p->lookups) {
				on_lookups_done(p);
			} else {
				accept_some(p, ptr);
			}
		}
	}
	log_info("drained");
	return 0;
}

void vmproxy_stop(struct vmproxy *p)
{
	uint64_t one = 1;

	if (write(p->stopfd, &one, sizeof(one)) < 0)
		log_error("cannot signal stop: %s", strerror(errno));
}

struct poll_report *vmproxy_query_threads(struct vmproxy *p, int timeout_ms, unsigned *n)
{
	unsigned late;
	struct poll_report *r = poll_threads_query(p->threads, p->nthreads, timeout_ms, &late);

	if (r)
		*n = p->nthreads;
	else if (late)
		log_warn("query: %u poll thread%s did not answer within %d ms", late,
			 late == 1 ? "" : "s", timeout_ms);
	return r;
}

json_t *vmproxy_counters(struct vmproxy *p)
{
	json_t *o = json_object(), *ls = json_array();

	json_object_set_new(o, "threads", json_integer(p->nthreads));
	json_object_set_new(o, "accepted", json_integer((json_int_t)atomic_load(&p->accepted)));
	json_object_set_new(o, "refused_unknown_peer",
			    json_integer((json_int_t)atomic_load(&p->refused_unknown)));
	json_object_set_new(o, "refused_limit",
			    json_integer((json_int_t)atomic_load(&p->refused_limit)));
	json_object_set_new(o, "refused_libvirt_unreachable",
			    json_integer((json_int_t)atomic_load(&p->refused_libvirt)));
	json_object_set_new(o, "refused_lookups_pending",
			    json_integer((json_int_t)atomic_load(&p->refused_lookups)));
	json_object_set_new(o, "lookups_pending",
			    json_integer(p->lookups ? lookup_pending(p->lookups) : 0));
	json_object_set_new(o, "vms_gone", json_integer((json_int_t)atomic_load(&p->vms_gone)));
	{
		struct vm_identity_stats st;

		vm_identity_stats(p->id, &st);
		json_object_set_new(
			o, "libvirt",
			json_pack("{s:s, s:I, s:I, s:I, s:I}", "state",
				  !st.libvirt_configured ? "none"
				  : st.libvirt_connected ? "connected"
							 : "disconnected",
				  "disconnects", (json_int_t)st.libvirt_disconnects, "reconnects",
				  (json_int_t)st.libvirt_reconnects, "reconnect_failures",
				  (json_int_t)st.libvirt_reconnect_failures, "served_from_cache",
				  (json_int_t)st.served_unreachable));
	}
	json_object_set_new(o, "connections", json_integer(total_conns(p)));
	json_object_set_new(o, "held_messages", json_integer((json_int_t)total_held(p)));
	json_object_set_new(o, "draining", json_boolean(p->phase != RUNNING));
	json_object_set_new(o, "balancer_enabled", json_boolean(atomic_load(&p->balancer_enabled)));
	if (p->load) {
		pthread_mutex_lock(&p->load_lock);
		json_object_set_new(o, "load", json_deep_copy(p->load));
		pthread_mutex_unlock(&p->load_lock);
	}
	for (size_t i = 0; i < p->nlisteners; i++) {
		const struct listener *l = &p->listeners[i];

		json_array_append_new(ls, json_pack("{s:s, s:I, s:I, s:I}", "name", l->name,
						    "accepted", (json_int_t)l->accepted, "refused",
						    (json_int_t)l->refused, "accept_errors",
						    (json_int_t)l->accept_errors));
	}
	json_object_set_new(o, "listeners", ls);
	return o;
}

void vmproxy_free(struct vmproxy *p)
{
	if (!p)
		return;
	metrics_stop(p->metrics);
	admin_stop(p->admin);
	/* Before the listeners go: a lookup thread reads its listener's
	 * configuration. Connections still being looked up are closed. */
	lookup_queue_free(p->lookups);
	for (size_t i = 0; i < p->nlisteners; i++)
		listener_close(&p->listeners[i]);
	free(p->listeners);
	/* Loops first (no new connect jobs), then the helpers (a connect in
	 * progress posts its result to a mailbox that still exists), then the
	 * threads' state, discarding such results. */
	for (unsigned i = 0; p->threads && i < p->nthreads; i++)
		poll_thread_stop(p->threads[i]);
	helper_pool_free(p->helpers);
	for (unsigned i = 0; p->threads && i < p->nthreads; i++)
		poll_thread_free(p->threads[i]);
	free(p->threads);
	vm_identity_free(p->id);
	partition_free(p->partition);
	if (p->epfd >= 0)
		close(p->epfd);
	if (p->stopfd >= 0)
		close(p->stopfd);
	if (p->sigfd >= 0)
		close(p->sigfd);
	if (p->timerfd >= 0)
		close(p->timerfd);
	balancer_free(&p->balancer);
	free(p->prev_threads);
	if (p->load) {
		json_decref(p->load);
		pthread_mutex_destroy(&p->load_lock);
	}
	for (size_t i = 0; i < p->nretired; i++) {
		for (char **e = p->retired[i]; *e; e++)
			free(*e);
		free(p->retired[i]);
	}
	free(p->retired);
	proxy_config_free(p->cfg);
	free(p);
}
