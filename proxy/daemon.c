/* daemon.c -- see daemon.h. vmproxyd's lifecycle (start, the acceptor
 * thread's epoll loop, signals, the 1 s timer with the watchdog and the
 * balancer, drain, free), the balancer's moves and the counters. What the
 * acceptor does with a connection is in acceptor.c, SIGHUP's reload in
 * reload.c; daemon_impl.h is what they share. */
#include "daemon_impl.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "report_json.h"

#define MAX_VMS		 100000
#define CLOSE_GRACE_MS	 3000
/* Threads for identity lookups that wait on libvirt. */
#define LOOKUP_THREADS 2

int vmproxy_new(struct proxy_config *cfg, struct vmproxy **out)
{
	struct vmproxy *p = calloc(1, sizeof(*p));

	if (!p) {
		proxy_config_free(cfg);
		return -ENOMEM;
	}
	p->cfg = cfg;
	p->epfd = p->stopfd = p->sigfd = p->timerfd = -1;
	pthread_mutex_init(&p->load_lock, NULL);
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

int daemon_epoll_add(struct vmproxy *p, int fd, void *ptr)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = ptr };

	return epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &e) < 0 ? -errno : 0;
}

/* The "balancer" section into BC, or else the "metrics" section into MC;
 * what is wrong with it in ERR. */
static int parse_section(const struct proxy_config *cfg, struct balancer_config *bc,
			 struct metrics_config *mc, char *err, size_t errlen)
{
	struct conf_ctx cc;
	int r;

	conf_ctx_init(&cc, cfg->file);
	r = bc ? balancer_config_parse(&cc, cfg->balancer_raw, bc)
	       : metrics_config_parse(&cc, cfg->metrics_raw, mc);
	if (r < 0)
		snprintf(err, errlen, "%s", cc.err);
	return r;
}

/* The "balancer" section and the load it keeps. */
static int start_balancer(struct vmproxy *p, char *err, size_t errlen)
{
	struct balancer_config bc;
	int r;

	r = parse_section(p->cfg, &bc, NULL, err, errlen);
	if (r < 0)
		return r;
	balancer_init(&p->balancer, &bc);
	atomic_store(&p->balancer_enabled, bc.enabled);
	return 0;
}

/* Helper and lookup threads, the partition table and the poll threads. */
static int start_threads(struct vmproxy *p, char *err, size_t errlen)
{
	const struct proxy_config *cfg = p->cfg;
	int *cpus = NULL;
	int r;

	r = helper_pool_new(2, &p->helpers);
	if (r < 0) {
		snprintf(err, errlen, "cannot start helper threads: %s", strerror(-r));
		return r;
	}
	r = lookup_queue_new(LOOKUP_THREADS, cfg->limits.max_pending_lookups, acceptor_lookup_run,
			     p, &p->lookups);
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
	return 0;
}

/* The acceptor's epoll set: stop eventfd, 1 s timer, lookup answers,
 * signals, and the listeners. */
static int start_acceptor(struct vmproxy *p, char *err, size_t errlen)
{
	const struct proxy_config *cfg = p->cfg;
	struct itimerspec its = { { 1, 0 }, { 1, 0 } };
	int r;

	p->epfd = epoll_create1(EPOLL_CLOEXEC);
	p->stopfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	p->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (p->epfd < 0 || p->stopfd < 0 || p->timerfd < 0) {
		snprintf(err, errlen, "epoll/eventfd/timerfd: %s", strerror(errno));
		return -errno;
	}
	timerfd_settime(p->timerfd, 0, &its, NULL);
	daemon_epoll_add(p, p->stopfd, &p->stopfd);
	daemon_epoll_add(p, p->timerfd, &p->timerfd);
	daemon_epoll_add(p, lookup_queue_fd(p->lookups), &p->lookups);
	if (p->sigfd >= 0)
		daemon_epoll_add(p, p->sigfd, &p->sigfd);

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
		daemon_epoll_add(p, p->listeners[i].fd, &p->listeners[i]);
		log_info("listening on %s", p->listeners[i].name);
	}
	return 0;
}

/* The /metrics endpoint (the "metrics" section) and the admin socket. */
static int start_servers(struct vmproxy *p, char *err, size_t errlen)
{
	const struct proxy_config *cfg = p->cfg;
	struct metrics_config mc;
	int r;

	r = parse_section(cfg, NULL, &mc, err, errlen);
	if (r < 0)
		return r;
	r = metrics_start(p, &mc, &p->metrics, err, errlen);
	if (r < 0)
		return r;
	if (cfg->admin.socket) {
		r = admin_start(p, cfg->admin.socket, cfg->admin.group, &p->admin, err, errlen);
		if (r < 0)
			return r;
	}
	return 0;
}

int vmproxy_start(struct vmproxy *p, char *err, size_t errlen)
{
	int r;

	r = start_balancer(p, err, errlen);
	if (r < 0)
		return r;
	r = vm_identity_new(p->cfg, &p->id, err, errlen);
	if (r < 0)
		return r;
	r = start_threads(p, err, errlen);
	if (r < 0)
		return r;
	r = start_acceptor(p, err, errlen);
	if (r < 0)
		return r;
	r = vm_identity_start_events(p->id, on_vm_gone, p);
	if (r < 0) {
		snprintf(err, errlen, "libvirt events: %s", strerror(-r));
		return r;
	}
	r = start_servers(p, err, errlen);
	if (r < 0)
		return r;
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
	struct thread_rates *load = calloc(n ? n : 1, sizeof(*load)), *old = NULL;
	struct poll_report *keep = calloc(n ? n : 1, sizeof(*keep));

	if (load)
		balancer_thread_rates(r, p->prev_threads, p->nprev_threads, n, dt, load);
	else
		log_warn("out of memory: the threads' load is not updated");
	for (unsigned i = 0; keep && i < n; i++) {
		keep[i] = r[i];
		keep[i].vms = NULL;
		keep[i].nvms = 0;
	}
	free(p->prev_threads);
	p->prev_threads = keep;
	p->nprev_threads = keep ? n : 0;
	pthread_mutex_lock(&p->load_lock);
	if (load) {
		old = p->load;
		p->load = load;
		p->nload = n;
	}
	pthread_mutex_unlock(&p->load_lock);
	free(old);
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
		int n = epoll_wait(p->epfd, evs, 32, acceptor_resume_listeners(p));

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
				acceptor_lookups_done(p);
			} else {
				acceptor_accept(p, ptr);
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

void vmproxy_counters(struct vmproxy *p, struct vmproxy_counters *c)
{
	memset(c, 0, sizeof(*c));
	c->threads = p->nthreads;
	c->accepted = atomic_load(&p->accepted);
	c->refused_unknown_peer = atomic_load(&p->refused_unknown);
	c->refused_limit = atomic_load(&p->refused_limit);
	c->refused_libvirt_unreachable = atomic_load(&p->refused_libvirt);
	c->refused_lookups_pending = atomic_load(&p->refused_lookups);
	c->lookups_pending = p->lookups ? lookup_pending(p->lookups) : 0;
	c->vms_gone = atomic_load(&p->vms_gone);
	vm_identity_stats(p->id, &c->libvirt);
	c->connections = total_conns(p);
	c->held_messages = total_held(p);
	c->draining = p->phase != RUNNING;
	c->balancer_enabled = atomic_load(&p->balancer_enabled);
	pthread_mutex_lock(&p->load_lock);
	c->load = p->nload ? malloc(p->nload * sizeof(*c->load)) : NULL;
	if (c->load) {
		memcpy(c->load, p->load, p->nload * sizeof(*c->load));
		c->nload = p->nload;
	}
	pthread_mutex_unlock(&p->load_lock);
	c->listeners = p->nlisteners ? calloc(p->nlisteners, sizeof(*c->listeners)) : NULL;
	for (size_t i = 0; c->listeners && i < p->nlisteners; i++) {
		const struct listener *l = &p->listeners[i];
		struct vmproxy_listener_counters *lc = &c->listeners[i];

		snprintf(lc->name, sizeof(lc->name), "%s", l->name);
		lc->accepted = l->accepted;
		lc->refused = l->refused;
		lc->accept_errors = l->accept_errors;
		c->nlisteners = i + 1;
	}
}

void vmproxy_counters_release(struct vmproxy_counters *c)
{
	free(c->load);
	free(c->listeners);
	c->load = NULL;
	c->nload = 0;
	c->listeners = NULL;
	c->nlisteners = 0;
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
	free(p->load);
	pthread_mutex_destroy(&p->load_lock);
	for (size_t i = 0; i < p->nretired; i++) {
		for (char **e = p->retired[i]; *e; e++)
			free(*e);
		free(p->retired[i]);
	}
	free(p->retired);
	proxy_config_free(p->cfg);
	free(p);
}
