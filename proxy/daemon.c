/* daemon.c -- see daemon.h. The acceptor runs on the thread that calls
 * vmproxy_run: it accepts, resolves the peer's VM (which may wait on a
 * libvirt RPC on a cache miss: the acceptor is not a poll thread, so no
 * guest traffic waits with it), picks the VM's poll thread from the
 * partition table and hands the fd over by mailbox. */
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
#include "partition.h"
#include "poll_thread.h"

#define ACCEPTS_PER_WAKE 64
#define MAX_VMS		 100000
#define CLOSE_GRACE_MS	 3000

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
	json_t *prev_vm_msgs; /* uuid -> messages_in at the last sample */
	json_t *prev_threads;	/* the previous sample's thread reports */
	pthread_mutex_t load_lock; /* guards load, read by admin and metrics */
	json_t *load;		/* per thread rates at the last sample */
	_Atomic bool balancer_enabled;
	_Atomic uint32_t next_conn_id;
	_Atomic uint64_t accepted, refused_unknown, refused_limit, vms_gone;
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

static void on_vm_gone(void *ud, const struct vm_info *vm)
{
	struct vmproxy *p = ud;
	struct vm_gone_mail *m;
	unsigned t;

	atomic_fetch_add(&p->vms_gone, 1);
	if (partition_lookup(p->partition, vm->uuid, &t) < 0)
		return; /* no connections from it */
	m = calloc(1, sizeof(*m));
	if (!m)
		return;
	m->mail.type = MAIL_VM_GONE;
	snprintf(m->uuid, sizeof(m->uuid), "%s", vm->uuid);
	poll_thread_post(p->threads[t], &m->mail);
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
		p->prev_vm_msgs = json_object();
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
	if (p->sigfd >= 0)
		add_fd(p, p->sigfd, &p->sigfd);

	p->listeners = calloc(cfg->n_listeners, sizeof(*p->listeners));
	if (!p->listeners)
		return -ENOMEM;
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

int vmproxy_identify_peer(struct vm_identity *id, const struct listener_config *lc,
			  const struct sockaddr_storage *ss, socklen_t len, struct vm_info *vm)
{
	switch (lc->type) {
	case LISTENER_TCP:
		return vm_identity_by_address(id, (const struct sockaddr *)ss, len, vm);
	case LISTENER_VSOCK: {
		const struct sockaddr_vm *svm = (const struct sockaddr_vm *)ss;

		if (ss->ss_family != AF_VSOCK || len < sizeof(*svm))
			return -ENOENT;
		return vm_identity_by_cid(id, svm->svm_cid, vm);
	}
	case LISTENER_UNIX:
		return vm_identity_by_name(id, lc->vm, vm);
	}
	return -ENOENT;
}

static int identify(struct vmproxy *p, struct listener *l, const struct sockaddr_storage *ss,
		    socklen_t len, struct vm_info *vm)
{
	return vmproxy_identify_peer(p->id, l->cfg, ss, len, vm);
}

static void accept_some(struct vmproxy *p, struct listener *l)
{
	for (int i = 0; i < ACCEPTS_PER_WAKE; i++) {
		struct sockaddr_storage ss;
		struct new_conn_mail *m;
		struct vm_info vm;
		char peer[80];
		socklen_t len;
		unsigned t;
		int fd, r;

		r = listener_accept(l, &fd, &ss, &len);
		if (r == -EAGAIN)
			return;
		if (r < 0) {
			/* EMFILE and friends: the listener stays; try next wake-up. */
			log_warn("%s: accept: %s", l->name, strerror(-r));
			return;
		}
		listener_peer_str(&ss, len, peer, sizeof(peer));
		if (p->phase != RUNNING) {
			close(fd);
			continue;
		}
		r = identify(p, l, &ss, len, &vm);
		if (r < 0) {
			l->refused++;
			atomic_fetch_add(&p->refused_unknown, 1);
			log_warn("%s: refused connection from %s: no VM known for this peer", l->name,
				 peer);
			close(fd);
			continue;
		}
		if (partition_total_conns(p->partition) >= p->cfg->limits.max_connections) {
			atomic_fetch_add(&p->refused_limit, 1);
			log_warn("vm=%s: refused connection from %s: the daemon holds its limit of "
				 "%u connections", vm.name, peer, p->cfg->limits.max_connections);
			close(fd);
			continue;
		}
		r = partition_assign_conn(p->partition, vm.uuid, p->cfg->guest.max_connections_per_vm,
					  &t);
		if (r < 0) {
			atomic_fetch_add(&p->refused_limit, 1);
			log_warn("vm=%s: refused connection from %s: %s", vm.name, peer,
				 r == -EMFILE ? "the VM holds guest.max_connections_per_vm connections"
					      : strerror(-r));
			close(fd);
			continue;
		}
		m = calloc(1, sizeof(*m));
		if (!m) {
			partition_release_conn(p->partition, vm.uuid);
			close(fd);
			continue;
		}
		m->mail.type = MAIL_NEW_CONN;
		m->fd = fd;
		m->conn_id = atomic_fetch_add(&p->next_conn_id, 1) + 1;
		m->vm = vm;
		snprintf(m->peer, sizeof(m->peer), "%s", peer);
		l->accepted++;
		atomic_fetch_add(&p->accepted, 1);
		log_debug("vm=%s conn=%u: accepted from %s on %s, thread %u", vm.name, m->conn_id,
			  peer, l->name, t);
		poll_thread_post(p->threads[t], &m->mail);
	}
}

static void post_all(struct vmproxy *p, enum mail_type type)
{
	for (unsigned i = 0; i < p->nthreads; i++) {
		struct mail *m = calloc(1, sizeof(*m));
		if (!m)
			continue;
		m->type = type;
		poll_thread_post(p->threads[i], m);
	}
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
	post_all(p, MAIL_PAUSE);
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
	struct migrate_out_mail *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	m->mail.type = MAIL_MIGRATE_OUT;
	snprintf(m->uuid, sizeof(m->uuid), "%s", uuid);
	m->to = to;
	m->timeout_ms = p->balancer.cfg.migrate_timeout_ms;
	m->res = res;
	poll_thread_post(p->threads[from], &m->mail);
	return 0;
}

static double rate(json_t *now, json_t *prev, const char *key, double dt)
{
	double a = json_number_value(json_object_get(now, key));
	double b = json_number_value(json_object_get(prev, key));

	return dt > 0 && a >= b ? (a - b) / dt : 0;
}

/* Per-thread rates between this sample (THREADS) and the previous one:
 * messages and bytes in and out per second, CPU use, loop latency. */
static void thread_load(struct vmproxy *p, json_t *threads, double dt)
{
	json_t *load = json_array(), *t;
	size_t i;

	json_array_foreach(threads, i, t) {
		json_t *prev = json_array_get(p->prev_threads, i);

		json_array_append_new(load, json_pack(
			"{s:i, s:f, s:f, s:f, s:f, s:f, s:I, s:I, s:I, s:I}", "thread", (int)i,
			"messages_in_per_s", rate(t, prev, "messages_in", dt), "bytes_in_per_s",
			rate(t, prev, "bytes_in", dt), "messages_out_per_s",
			rate(t, prev, "messages_out", dt), "bytes_out_per_s",
			rate(t, prev, "bytes_out", dt), "cpu_percent",
			100 * rate(t, prev, "cpu_seconds", dt), "connections",
			json_integer_value(json_object_get(t, "connections")), "held_messages",
			json_integer_value(json_object_get(t, "held_messages")), "held_bytes",
			json_integer_value(json_object_get(t, "held_bytes")), "loop_max_us",
			json_integer_value(json_object_get(t, "loop_max_us"))));
	}
	json_decref(p->prev_threads);
	p->prev_threads = json_incref(threads);
	pthread_mutex_lock(&p->load_lock);
	json_decref(p->load);
	p->load = load;
	pthread_mutex_unlock(&p->load_lock);
}

/* Sample every thread (by query mail), turn counters into rates and let
 * the balancer decide; carry out at most one move per sample. */
static void balance(struct vmproxy *p, uint64_t now)
{
	json_t *threads = vmproxy_query_threads(p, 1000), *t, *v, *next_prev = json_object();
	double dt = p->last_sample_ms ? (double)(now - p->last_sample_ms) / 1000.0 : 0;
	struct bal_thread *bt = calloc(p->nthreads, sizeof(*bt));
	struct bal_vm **vms = calloc(p->nthreads, sizeof(*vms));
	struct bal_move move;
	size_t i, j;

	if (!threads || !bt || !vms)
		goto out;
	thread_load(p, threads, dt);
	json_array_foreach(threads, i, t) {
		json_t *list = json_object_get(t, "vms");

		bt[i].id = (unsigned)i;
		vms[i] = calloc(json_array_size(list) + 1, sizeof(struct bal_vm));
		if (!vms[i])
			goto out;
		json_array_foreach(list, j, v) {
			const char *uuid = json_string_value(json_object_get(v, "uuid"));
			json_int_t now_msgs = json_integer_value(json_object_get(v, "messages_in"));
			json_t *prev = json_object_get(p->prev_vm_msgs, uuid ? uuid : "");
			double rate = 0;

			if (!uuid)
				continue;
			if (prev && dt > 0 && now_msgs >= json_integer_value(prev))
				rate = (double)(now_msgs - json_integer_value(prev)) / dt;
			json_object_set_new(next_prev, uuid, json_integer(now_msgs));
			snprintf(vms[i][bt[i].nvms].uuid, sizeof(vms[i][0].uuid), "%s", uuid);
			vms[i][bt[i].nvms].load = rate;
			bt[i].load += rate;
			bt[i].nvms++;
		}
		bt[i].vms = vms[i];
	}
	json_decref(p->prev_vm_msgs);
	p->prev_vm_msgs = next_prev;
	next_prev = NULL;
	p->last_sample_ms = now;
	p->balancer.cfg.enabled = atomic_load(&p->balancer_enabled);
	if (dt > 0 && p->balancer.cfg.enabled &&
	    balancer_step(&p->balancer, bt, p->nthreads, now, &move)) {
		log_info("balancer: thread %u at %.0f msgs/s, thread %u at %.0f: moving vm %s",
			 move.from, bt[move.from].load, move.to, bt[move.to].load, move.uuid);
		post_migrate(p, move.uuid, move.from, move.to, NULL);
	}
out:
	for (i = 0; vms && i < p->nthreads; i++)
		free(vms[i]);
	free(vms);
	free(bt);
	json_decref(next_prev);
	json_decref(threads);
}

int vmproxy_migrate(struct vmproxy *p, const char *vm, unsigned to, char *msg, size_t msglen)
{
	json_t *threads = vmproxy_query_threads(p, 2000), *t, *v;
	struct migrate_result res;
	const char *uuid = NULL;
	unsigned from = 0;
	size_t i, j;
	int r;

	json_array_foreach(threads, i, t) {
		json_array_foreach(json_object_get(t, "vms"), j, v) {
			const char *u = json_string_value(json_object_get(v, "uuid"));
			const char *n = json_string_value(json_object_get(v, "name"));
			if ((u && strcmp(u, vm) == 0) || (n && strcmp(n, vm) == 0)) {
				uuid = u;
				from = (unsigned)i;
			}
		}
	}
	if (!uuid) {
		snprintf(msg, msglen, "no VM \"%.64s\" has connections here", vm);
		json_decref(threads);
		return -ENOENT;
	}
	if (to >= p->nthreads) {
		snprintf(msg, msglen, "there is no thread %u (0..%u)", to, p->nthreads - 1);
		json_decref(threads);
		return -EINVAL;
	}
	memset(&res, 0, sizeof(res));
	pthread_mutex_init(&res.lock, NULL);
	pthread_cond_init(&res.cond, NULL);
	r = post_migrate(p, uuid, from, to, &res);
	json_decref(threads);
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
		if (poll_thread_watchdog(p->threads[i], now, p->cfg->upstream.stuck_timeout_ms))
			log_error("thread=%u: upstream call stuck for more than %u ms: link shut down",
				  i, p->cfg->upstream.stuck_timeout_ms);
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
			post_all(p, MAIL_DRAIN);
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
			int r = log_reopen(p->log_file);
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
				post_all(p, MAIL_RELINK);
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
		int n = epoll_wait(p->epfd, evs, 32, -1);

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

json_t *vmproxy_query_threads(struct vmproxy *p, int timeout_ms)
{
	struct query q;
	struct timespec ts;
	json_t *res;
	bool complete;

	pthread_mutex_init(&q.lock, NULL);
	pthread_cond_init(&q.cond, NULL);
	q.result = json_array();
	for (unsigned i = 0; i < p->nthreads; i++)
		json_array_append_new(q.result, json_null());
	q.pending = 0;
	pthread_mutex_lock(&q.lock);
	for (unsigned i = 0; i < p->nthreads; i++) {
		struct query_mail *m = calloc(1, sizeof(*m));
		if (!m)
			continue;
		m->mail.type = MAIL_QUERY;
		m->q = &q;
		q.pending++;
		poll_thread_post(p->threads[i], &m->mail);
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	while (q.pending > 0)
		if (pthread_cond_timedwait(&q.cond, &q.lock, &ts) == ETIMEDOUT)
			break;
	/* A late thread must still find Q alive: wait for it without bound,
	 * since it will answer (or discard the mail) before it exits. */
	complete = q.pending == 0;
	while (q.pending > 0)
		pthread_cond_wait(&q.cond, &q.lock);
	pthread_mutex_unlock(&q.lock);
	res = q.result;
	pthread_mutex_destroy(&q.lock);
	pthread_cond_destroy(&q.cond);
	if (!complete)
		log_warn("a poll thread answered a query late");
	return res;
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
	json_object_set_new(o, "vms_gone", json_integer((json_int_t)atomic_load(&p->vms_gone)));
	json_object_set_new(o, "connections", json_integer(total_conns(p)));
	json_object_set_new(o, "held_messages", json_integer((json_int_t)total_held(p)));
	json_object_set_new(o, "draining", json_boolean(p->phase != RUNNING));
	json_object_set_new(o, "balancer_enabled", json_boolean(atomic_load(&p->balancer_enabled)));
	if (p->load) {
		pthread_mutex_lock(&p->load_lock);
		json_object_set_new(o, "load", json_deep_copy(p->load));
		pthread_mutex_unlock(&p->load_lock);
	}
	for (size_t i = 0; i < p->nlisteners; i++)
		json_array_append_new(ls, json_pack("{s:s, s:I, s:I}", "name", p->listeners[i].name,
						    "accepted",
						    (json_int_t)p->listeners[i].accepted, "refused",
						    (json_int_t)p->listeners[i].refused));
	json_object_set_new(o, "listeners", ls);
	return o;
}

void vmproxy_free(struct vmproxy *p)
{
	if (!p)
		return;
	metrics_stop(p->metrics);
	admin_stop(p->admin);
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
	json_decref(p->prev_vm_msgs);
	json_decref(p->prev_threads);
	if (p->load) {
		json_decref(p->load);
		pthread_mutex_destroy(&p->load_lock);
	}
	proxy_config_free(p->cfg);
	free(p);
}
