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

/* What a poll thread reports about one of its VMs. */
struct poll_vm_report {
	struct vm_info info;
	uint32_t connections;
	uint64_t held_bytes, held_messages, messages_in, bytes_in, acked, nacked;
	bool blocked, migrating;
};

/* What a poll thread reports about itself (poll_threads_query): counters since it
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

/* How a requested migration ended, for a caller that waits (admin). */
struct migrate_result {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
	int status; /* 0, -ENOENT, -EBUSY, -ETIMEDOUT, -EINVAL */
	char msg[200];
};

/* Counters readable from any thread (relaxed atomics, for the watchdog,
 * drain and sd_notify; reports go through poll_threads_query). */
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

/* Any thread: the requests a poll thread takes, each by a mail whose type
 * and layout are the thread's own. Each returns 0 once posted, or -ENOMEM
 * when its mail could not be allocated: then nothing was sent. */

/* Delegate guest connection FD (stolen on success, still the caller's on
 * failure), number CONN_ID, of VM, from PEER (for logs). */
int poll_thread_delegate(struct poll_thread *pt, int fd, uint32_t conn_id,
			 const struct vm_info *vm, const char *peer);

/* A change to VM UUID that concerns its connections: close them with 320
 * at once (VM_STOPPED); once the messages read from them are confirmed and
 * acked, or SETTLE_MS have passed, without reading more
 * (VM_MIGRATING_AWAY); or those whose vsock CID is not CID
 * (VM_CID_CHANGED). */
int poll_thread_vm_change(struct poll_thread *pt, const char *uuid, enum vm_change how,
			  uint32_t cid, uint32_t settle_ms);

/* Move VM UUID with all its connections to thread TO once its messages
 * are all confirmed (bounded by TIMEOUT_MS, then the move is abandoned and
 * the VM resumes where it is). RES (may be NULL) gets the outcome. */
int poll_thread_migrate(struct poll_thread *pt, const char *uuid, unsigned to,
			uint32_t timeout_ms, struct migrate_result *res);

/* Guest session settings a reload changed: the thread copies them into
 * its own session configuration, which its sessions read. ALLOWED must
 * outlive every session (the daemon keeps replaced lists). */
int poll_thread_reconfig(struct poll_thread *pt, const char *const *allowed,
			 uint16_t channel_max, uint16_t heartbeat, uint32_t handshake_timeout_ms);

enum poll_control {
	POLL_PAUSE,  /* shutdown: stop reading guests, keep settling */
	POLL_DRAIN,  /* shutdown: close every guest with 320 */
	POLL_RELINK, /* SIGHUP: reconnect the link when idle, re-reading TLS files */
};
int poll_thread_control(struct poll_thread *pt, enum poll_control what);

/* Ask the N THREADS for their reports and wait at most TIMEOUT_MS: the N
 * reports in thread order (free with poll_reports_free), or NULL when
 * memory ran out or *LATE threads did not answer in time. An answer that
 * comes after the asker gave up is dropped safely. A thread whose mail
 * could not be allocated is not asked: its report has answered false. */
struct poll_report *poll_threads_query(struct poll_thread *const *threads, unsigned n,
				       int timeout_ms, unsigned *late);

/* Stop the loop and join. Accepts NULL and a thread never started. */
void poll_thread_stop(struct poll_thread *pt);

/* Free a stopped thread: close its connections, drop held messages and
 * discard its mail. Accepts NULL. */
void poll_thread_free(struct poll_thread *pt);

const struct poll_gauges *poll_thread_gauges(const struct poll_thread *pt);

