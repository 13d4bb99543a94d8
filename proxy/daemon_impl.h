/* daemon_impl.h -- private to the daemon's own files (daemon.c,
 * acceptor.c, reload.c): struct vmproxy and what they share. Everything
 * else uses daemon.h. */
#pragma once

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "admin.h"
#include "balancer.h"
#include "config.h"
#include "daemon.h"
#include "helper.h"
#include "listener.h"
#include "lookup.h"
#include "metrics.h"
#include "partition.h"
#include "poll_thread.h"
#include "vm_identity.h"

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
	struct thread_rates *load; /* per thread rates at the last sample */
	unsigned nload;
	_Atomic bool balancer_enabled;
	bool log_level_pinned;	      /* --log-level given: reloads keep it */
	char ***retired;	      /* exchange lists replaced by reloads: a session may
				       * still be reading one, so they live until exit */
	size_t nretired;
	_Atomic uint32_t next_conn_id;
	_Atomic uint64_t accepted, refused_unknown, refused_limit, refused_libvirt, refused_lookups,
		vms_gone;
};

/* daemon.c: add FD to the acceptor's epoll set for EPOLLIN with PTR as
 * its data. 0 or -errno. */
int daemon_epoll_add(struct vmproxy *p, int fd, void *ptr);

/* acceptor.c, all on the acceptor's thread except acceptor_lookup_run. */
/* Accept what is waiting on L (a bounded number per call) and admit,
 * refuse or hand each connection to a lookup thread. */
void acceptor_accept(struct vmproxy *p, struct listener *l);
/* The lookup queue's eventfd fired: admit or refuse what the lookup
 * threads have identified. */
void acceptor_lookups_done(struct vmproxy *p);
/* Put paused listeners whose time has come back into the epoll set; the
 * epoll_wait timeout until the next one (-1: none paused). */
int acceptor_resume_listeners(struct vmproxy *p);
/* The lookup threads' job function (UD is the struct vmproxy): identify
 * JOB's peer, waiting on libvirt if need be. On a lookup thread. */
void acceptor_lookup_run(void *ud, struct lookup_job *job);

/* reload.c: SIGHUP's configuration reload. On the acceptor's thread,
 * while running (not draining). */
void reload_config(struct vmproxy *p);
