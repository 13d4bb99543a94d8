/* poll_thread_impl.h -- a poll thread's own state, shared by the files it
 * is made of and private to them: poll_thread.c (its VMs, connections and
 * loop), poll_publish.c (guest publishes held per VM, the link's view of
 * them, confirms and backpressure), poll_migrate.c (VMs moving to another
 * thread or away to another host) and poll_request.c (what other threads
 * ask of it). Functions named pt_ are theirs alone. Ownership: a guest_conn
 * (opaque, guest_conn.h) lives while its socket is open or while any of its
 * messages is held (its references); a vm_state while it has connections or
 * held messages. Neither is
 * freed inside an engine callback: a closing connection is marked and
 * closed after the dispatch round. */
#pragma once

#include <amqp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "guest_conn.h"
#include "guest_session.h"
#include "inbox.h"
#include "mailbox.h"
#include "poll_thread.h"
#include "upstream.h"
#include "vm_queue.h"

#define READ_CHUNK     65536
#define MAX_EVENTS     256
#define SCAN_EVERY_MS  250
#define VM_BUCKETS     1024
#define PROPS_BUF_SIZE (256u << 10)

struct vm_state {
	struct vm_info info;
	struct vm_state *hash_next;
	struct guest_conn_list conns;
	uint32_t refs; /* connections + held messages */
	uint64_t held_bytes, held_msgs;
	struct upstream_msg *pend_head, *pend_tail; /* waiting for the link */
	struct vmq_entry q;			    /* in the thread's fair queue */
	bool blocked; /* over its unconfirmed-bytes bound */
	bool migrating; /* quiescing: not read, waiting for confirms */
	unsigned migrate_to;
	uint64_t migrate_deadline, migrate_started;
	struct migrate_result *migrate_res;
	struct vm_state *mig_next; /* the thread's migrating list (holds a reference) */
	uint64_t msgs_in, bytes_in, acked, nacked;
	bool leaving;            /* migrating to another host: not read, closed once settled */
	uint64_t leave_deadline; /* closed then even if messages are still unconfirmed */
};

/* What a poll thread's mailbox carries (struct mail.type); the link's
 * resolve results (UPSTREAM_MAIL_RESOLVED) arrive there too. */
enum mail_type {
	MAIL_NEW_CONN = 1, /* acceptor: a delegated guest connection */
	MAIL_VM_GONE,	   /* libvirt: close a VM's connections with 320 */
	MAIL_QUERY,	   /* admin, balancer, metrics: report what the thread owns */
	MAIL_PAUSE,	   /* shutdown: stop reading guests, keep settling */
	MAIL_DRAIN,	   /* shutdown: close every guest with 320 */
	MAIL_STOP,	   /* shutdown: leave the loop */
	MAIL_MIGRATE_OUT,  /* balancer, admin: hand a VM to another thread */
	MAIL_MIGRATE_IN,   /* another poll thread: adopt a VM's connections */
	MAIL_RELINK,	   /* SIGHUP: reconnect the link when idle, re-reading TLS files */
	MAIL_RECONFIG,	   /* SIGHUP: new guest session settings */
};
_Static_assert(UPSTREAM_MAIL_RESOLVED > MAIL_RECONFIG, "mail types overlap");

struct new_conn_mail {
	struct mail mail;
	int fd;
	uint32_t conn_id;
	struct vm_info vm;
	char peer[80];
};

/* MAIL_VM_GONE: see poll_thread_vm_change. */
struct vm_gone_mail {
	struct mail mail;
	char uuid[VM_UUID_LEN + 1];
	enum vm_change how;
	uint32_t cid;
	uint32_t settle_ms;
};

struct reconfig_mail {
	struct mail mail;
	const char *const *allowed_exchanges;
	uint16_t channel_max;
	uint16_t heartbeat;
	uint32_t handshake_timeout_ms;
};

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

struct query_mail {
	struct mail mail;
	struct query *q;
};

struct migrate_out_mail {
	struct mail mail;
	char uuid[VM_UUID_LEN + 1];
	unsigned to;
	uint32_t timeout_ms;
	struct migrate_result *res;
};

/* MAIL_MIGRATE_IN: a quiesced VM and its connections, from thread FROM. */
struct migrate_in_mail {
	struct mail mail;
	struct vm_state *vm;
	unsigned from;
};

struct poll_thread {
	unsigned id;
	int cpu;
	const struct poll_shared *sh;
	pthread_t tid;
	int epfd;
	struct mailbox mb;
	struct upstream *up;
	struct inbox *inbox; /* the VMs' inbox consumers on the link */

	struct vm_state *vms[VM_BUCKETS];
	uint32_t nvms;
	struct guest_conn_list conns; /* all of them */
	unsigned nleaving; /* VMs leaving for another host (vm_state.leaving) */
	struct guest_conn *dirty;
	struct vm_queue ring; /* VMs with messages waiting */
	struct vm_state *migrating;
	uint64_t msgs_in, bytes_in, msgs_out, bytes_out, migrations_in, migrations_out;
	uint64_t guest_reads, guest_writes; /* recv() and send() calls on guest sockets */
	uint64_t busy_ns, busy_max_ns; /* loop time spent working, since the last report */

	bool stopping;
	bool paused; /* draining: guests are no longer read */
	bool started;
	bool blocked; /* the whole thread is over its bound */
	bool link_unable; /* the link cannot publish: guests are told */
	char link_reason[96]; /* what connection.blocked says then */
	bool broker_blocked;  /* the broker blocks the link (resource alarm): guests are told */
	uint64_t held_bytes, held_msgs;
	uint64_t next_scan;

	struct guest_session_config scfg; /* this thread's sessions read it */
	amqp_pool_t pool;
	unsigned char *props_buf;
	unsigned char read_buf[READ_CHUNK];
	struct poll_gauges g;
};

/* ---- poll_thread.c: VMs and connections ------------------------------------ */

uint64_t pt_hash_uuid(const char *s);
/* The VM UUID of this thread, or NULL. */
struct vm_state *pt_vm_find(struct poll_thread *pt, const char *uuid);
/* Drop a reference to V; the last one frees it. */
void pt_vm_unref(struct poll_thread *pt, struct vm_state *v);
/* C has output or a state change: serviced after this dispatch round. */
void pt_mark_dirty(struct poll_thread *pt, struct guest_conn *c);
/* A held message is settled: its bytes leave its VM's and the thread's
 * counts, and it drops its references. */
void pt_msg_free(struct poll_thread *pt, struct upstream_msg *m);
/* Link C (whose vm is set) into its VM's and the thread's lists. */
void pt_conn_attach(struct poll_thread *pt, struct guest_conn *c);
/* Unlink C from the thread's list, and from its VM's list when FROM_VM. */
void pt_conn_detach(struct poll_thread *pt, struct guest_conn *c, bool from_vm);
/* Register what C should be woken for now: reads unless it is held back
 * (a bound, a move, a drain), writes when WANT_OUT. */
void pt_conn_update_epoll(struct poll_thread *pt, struct guest_conn *c, bool want_out,
			  uint64_t now);
/* Close every connection of V with CODE and TEXT (connection.close). */
void pt_close_vm_conns(struct poll_thread *pt, struct vm_state *v, uint16_t code,
		       const char *text);

/* ---- poll_publish.c: the publish path and backpressure ---------------------- */

/* The link's callbacks (struct upstream_ops) over the thread's queues. */
extern const struct upstream_ops pt_upstream_ops;
/* A guest published PUB on C: hold it for the link, or refuse it. */
void pt_on_publish(struct poll_thread *pt, struct guest_conn *c, const struct guest_publish *pub);
/* Tell C's guest it is blocked while its VM or thread is over a bound or
 * the link cannot publish, unblocked when none of them holds. */
void pt_conn_update_blocked(struct poll_thread *pt, struct guest_conn *c);
/* Block or unblock V and the thread against their unconfirmed-bytes
 * bounds after their held bytes changed (V may be NULL). */
void pt_check_bounds(struct poll_thread *pt, struct vm_state *v);
/* The inbox produced output for C (inbox_wake_fn). */
void pt_inbox_wake(void *ud, struct guest_conn *c);

/* ---- poll_migrate.c: VMs that move ------------------------------------------ */

/* Record the outcome in RES (if any) and wake its waiter. */
void pt_migrate_result_set(struct migrate_result *res, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* MAIL_MIGRATE_OUT: quiesce the VM for its move (MO is the caller's). */
void pt_migrate_out(struct poll_thread *pt, struct migrate_out_mail *mo, uint64_t now);
/* MAIL_MIGRATE_IN: adopt a quiesced VM and its connections. */
void pt_migrate_in(struct poll_thread *pt, struct migrate_in_mail *im, uint64_t now);
/* Hand over the migrating VMs that are settled; abandon the late ones. */
void pt_process_migrations(struct poll_thread *pt, uint64_t now);
/* MAIL_VM_GONE: act on the VM's change; false when GM was forwarded to
 * the VM's new owner (then not the caller's to free). */
bool pt_vm_gone(struct poll_thread *pt, struct vm_gone_mail *gm, uint64_t now);
/* Close the VMs leaving for another host once settled or out of time. */
void pt_process_leaving(struct poll_thread *pt, uint64_t now);

/* ---- poll_request.c: what other threads ask ---------------------------------- */

/* Fill R (its VM list malloc'd; none when out of memory). */
void pt_report(struct poll_thread *pt, struct poll_report *r);
/* Answer Q for thread ID with R (its VM list stolen; NULL when the mail
 * is discarded) and drop the mail's reference. */
void pt_query_answer(struct query *q, unsigned id, struct poll_report *r);
