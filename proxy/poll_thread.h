/* poll_thread.h -- a CPU-pinned event loop that owns the guest connections
 * of the VMs delegated to it and exactly one upstream link. It shares no
 * mutable state with other poll threads: everything reaches it through its
 * mailbox. */
#pragma once

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "guest_session.h"
#include "helper.h"
#include "mailbox.h"
#include "partition.h"
#include "upstream.h"
#include "vm_identity.h"

/* What every poll thread reads and nobody changes while they run. */
struct poll_shared {
	const struct proxy_config *cfg;
	struct partition *partition;
	struct helper_pool *helpers;
	const char *const *allowed_exchanges;
	struct guest_session_config scfg; /* every session, on every thread */
	struct poll_thread **threads;	  /* for handing VMs over */
	unsigned nthreads;
};

/* The engine configuration every guest session uses: limits from CFG,
 * exchanges ALLOWED (NULL-terminated), events to the running poll thread. */
void poll_thread_session_config(const struct proxy_config *cfg, const char *const *allowed,
				struct guest_session_config *out);

/* MAIL_NEW_CONN: the acceptor delegates FD (stolen) of VM. */
struct new_conn_mail {
	struct mail mail;
	int fd;
	uint32_t conn_id;
	struct vm_info vm;
	char peer[80];
};

/* MAIL_VM_GONE: close every connection of UUID with 320: at once
 * (VM_STOPPED); once the messages read from them are confirmed and acked,
 * or SETTLE_MS have passed, without reading more (VM_MIGRATING_AWAY); or
 * those whose vsock CID is not CID (VM_CID_CHANGED). */
struct vm_gone_mail {
	struct mail mail;
	char uuid[VM_UUID_LEN + 1];
	enum vm_change how;
	uint32_t cid;
	uint32_t settle_ms;
};

/* MAIL_RECONFIG: guest session settings a reload changed; the thread copies
 * them into its own session configuration, which its sessions read. The
 * exchange list outlives every session (the daemon keeps replaced ones). */
struct reconfig_mail {
	struct mail mail;
	const char *const *allowed_exchanges;
	uint16_t channel_max;
	uint16_t heartbeat;
	uint32_t handshake_timeout_ms;
};

/* What a poll thread reports about one of its VMs. */
struct poll_vm_report {
	struct vm_info info;
	uint32_t connections;
	uint64_t held_bytes, held_messages, messages_in, bytes_in, acked, nacked;
	bool blocked, migrating;
};

/* What a poll thread reports about itself (MAIL_QUERY): counters since it
 * started, gauges now, its link's statistics and its VMs. */
struct poll_report {
	unsigned thread;
	int cpu;
	uint32_t connections, vm_count;
	uint64_t held_bytes, held_messages;
	uint64_t messages_in, bytes_in, messages_out, bytes_out;
	uint64_t guest_reads, guest_writes, migrations_in, migrations_out;
	bool blocked;
	bool answered; /* false: the thread did not fill it in */
	double cpu_seconds, loop_busy_seconds;
	uint64_t loop_max_us; /* the longest loop iteration since the previous report */
	struct upstream_stats link;
	struct poll_vm_report *vms; /* malloc'd */
	size_t nvms;
};

/* Free the VM lists of N reports and the array itself. Accepts NULL. */
void poll_reports_free(struct poll_report *r, unsigned n);

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

/* Any thread: answer Q for thread ID with R (its VM list stolen; NULL when
 * the mail is discarded) and drop the mail's reference. */
void query_answer(struct query *q, unsigned id, struct poll_report *r);

/* Drop one reference to Q with its lock held; the last one frees it. */
void query_unref_locked(struct query *q);

struct query_mail {
	struct mail mail;
	struct query *q;
};

/* How a requested migration ended, for a caller that waits (admin). */
struct migrate_result {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
	int status; /* 0, -ENOENT, -EBUSY, -ETIMEDOUT, -EINVAL */
	char msg[200];
};

/* MAIL_MIGRATE_OUT: move VM UUID with all its connections to thread TO,
 * once its messages are all confirmed (bounded by TIMEOUT_MS, then the
 * move is abandoned and the VM resumes where it is). RES may be NULL. */
struct migrate_out_mail {
	struct mail mail;
	char uuid[VM_UUID_LEN + 1];
	unsigned to;
	uint32_t timeout_ms;
	struct migrate_result *res;
};

/* Record the outcome in RES (if any) and wake its waiter. */
void migrate_result_set(struct migrate_result *res, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Counters readable from any thread (relaxed atomics, for the watchdog,
 * drain and sd_notify; reports go through MAIL_QUERY). */
struct poll_gauges {
	_Atomic uint64_t loop_ms;	/* last loop iteration */
	_Atomic uint64_t held_messages; /* not yet confirmed by the broker */
	_Atomic uint32_t connections;
	_Atomic bool link_up;
};

struct poll_thread;

/* Create thread ID, to be pinned to CPU (-1: not pinned). */
int poll_thread_new(unsigned id, int cpu, const struct poll_shared *sh, struct poll_thread **out);
int poll_thread_start(struct poll_thread *pt);

/* Any thread: deliver M (ownership passes to the poll thread). */
void poll_thread_post(struct poll_thread *pt, struct mail *m);

/* Post MAIL_STOP and join. Accepts NULL and a thread never started. */
void poll_thread_stop(struct poll_thread *pt);

/* Free a stopped thread: close its connections, drop held messages and
 * discard its mail. Accepts NULL. */
void poll_thread_free(struct poll_thread *pt);

const struct poll_gauges *poll_thread_gauges(const struct poll_thread *pt);

