/* daemon.h -- vmproxyd as an object: identity, helper threads, poll
 * threads, listeners and the admin socket wired together, and the acceptor
 * loop that partitions new connections. main.c is a thin shell around it;
 * tests run it in-process. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "balancer.h"
#include "config.h"
#include "poll_thread.h"
#include "vm_identity.h"

struct vmproxy;

/* Who is behind a connection accepted on a listener configured as LC, from
 * the peer address accept() gave (a vsock peer by its CID, a TCP peer by
 * its address, a per-VM Unix socket by the listener's VM). 0 and *VM, or a
 * negative errno: refused. What the acceptor calls; tests call it with made-up
 * peer addresses (vsock loopback is not everywhere). */
int vmproxy_identify_peer(struct vm_identity *id, const struct listener_config *lc,
			  const struct sockaddr_storage *ss, socklen_t len, struct vm_info *vm);
/* The same without waiting on libvirt: -EAGAIN when only a blocking
 * lookup can answer (vm_identity_by_*_cached). */
int vmproxy_identify_peer_cached(struct vm_identity *id, const struct listener_config *lc,
				 const struct sockaddr_storage *ss, socklen_t len,
				 struct vm_info *vm);

/* Takes ownership of CFG. */
int vmproxy_new(struct proxy_config *cfg, struct vmproxy **out);

/* Open libvirt, start helpers, poll threads, listeners and the admin
 * socket. Errors are described in ERR. Returns 0 or -errno. */
int vmproxy_start(struct vmproxy *p, char *err, size_t errlen);

/* Handle SIGTERM/SIGINT (drain) and SIGHUP (reopen LOG_FILE, if any) in
 * vmproxy_run through a signalfd. The caller must have blocked them in
 * every thread (before vmproxy_start). */
void vmproxy_handle_signals(struct vmproxy *p, const char *log_file);

/* The acceptor loop; returns after a drain completes. 0 or -errno. */
int vmproxy_run(struct vmproxy *p);

/* From any thread: stop accepting, wait for confirms (drain_timeout_ms),
 * close guests with 320, and make vmproxy_run return. */
void vmproxy_stop(struct vmproxy *p);

/* Stop threads and free everything. Accepts NULL. */
void vmproxy_free(struct vmproxy *p);

struct vm_identity *vmproxy_identity(struct vmproxy *p);
/* The running configuration (a reload changes only what it may). */
const struct proxy_config *vmproxy_config(struct vmproxy *p);
/* --log-level was given: a reload leaves the level alone. */
void vmproxy_pin_log_level(struct vmproxy *p);

/* Ask every poll thread for its report (claim 5: by message, never by
 * reading its memory). A new array of *N reports in thread order (free with
 * poll_reports_free), or NULL if a thread did not answer within TIMEOUT_MS. */
struct poll_report *vmproxy_query_threads(struct vmproxy *p, int timeout_ms, unsigned *n);

/* Move VM (name or uuid) with all its connections to poll thread TO and
 * wait for the outcome (bounded by the balancer's migrate_timeout_ms).
 * Returns 0, -ENOENT, -EINVAL, -EBUSY or -ETIMEDOUT with MSG describing it. */
int vmproxy_migrate(struct vmproxy *p, const char *vm, unsigned to, char *msg, size_t msglen);

/* Switch the automatic balancer on or off at run time. */
void vmproxy_set_balancer(struct vmproxy *p, bool enabled);

/* The acceptor's decision on one accepted connection, as if listener
 * number LISTENER had accepted FD from peer SS: identify the VM (VM, may
 * be NULL) and hand FD to its poll thread. 0 when admitted, else -errno
 * with FD closed (-EPERM: a reserved vsock CID). For tests, which can give
 * a vsock listener a peer CID without a vsock peer. */
int vmproxy_admit(struct vmproxy *p, size_t listener, int fd, const struct sockaddr_storage *ss,
		  socklen_t len, struct vm_info *vm);

/* One listener's counters. */
struct vmproxy_listener_counters {
	char name[128];
	uint64_t accepted, refused, accept_errors;
};

/* Daemon-wide counters. The admin socket serves them as its "daemon"
 * object (report_json_counters), /metrics as its vmproxy_* series. */
struct vmproxy_counters {
	unsigned threads;
	uint64_t accepted;
	uint64_t refused_unknown_peer, refused_limit, refused_libvirt_unreachable,
		refused_lookups_pending;
	uint64_t lookups_pending; /* connections waiting for a lookup now */
	uint64_t vms_gone;
	struct vm_identity_stats libvirt;
	uint64_t connections, held_messages;
	bool draining, balancer_enabled;
	/* The per-thread rates at the last sample, a copy (NULL: none yet,
	 * or out of memory). */
	struct thread_rates *load;
	unsigned nload;
	struct vmproxy_listener_counters *listeners; /* NULL when out of memory */
	size_t nlisteners;
};

/* Fill C from any thread; release it with vmproxy_counters_release. */
void vmproxy_counters(struct vmproxy *p, struct vmproxy_counters *c);
/* What vmproxy_counters allocated in C. */
void vmproxy_counters_release(struct vmproxy_counters *c);
