/* lookup.h -- identity lookups that must ask libvirt, run on their own
 * threads so that the acceptor never waits for an RPC: the acceptor
 * submits a job (a bounded number may be pending), a lookup thread
 * resolves it and queues it back, and an eventfd tells the acceptor to
 * take the finished ones. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "helper.h"
#include "vm_identity.h"

struct lookup_queue;

struct lookup_job {
	struct helper_job hj;
	struct lookup_queue *q;
	struct lookup_job *next_done;
	/* Filled by the submitter. */
	int fd;
	size_t listener;
	struct sockaddr_storage ss;
	socklen_t len;
	uint64_t submitted_ms;
	/* Filled by the lookup: 0 and VM, or -errno. */
	int result;
	struct vm_info vm;
};

/* Resolves JOB (blocking allowed): sets job->result and job->vm. */
typedef void (*lookup_fn)(void *userdata, struct lookup_job *job);

/* NTHREADS lookup threads, at most MAX_PENDING jobs submitted and not yet
 * taken back. 0 or -errno. */
int lookup_queue_new(unsigned nthreads, unsigned max_pending, lookup_fn fn, void *userdata,
		     struct lookup_queue **out);

/* Readable when finished jobs wait to be taken (level: drain it with
 * lookup_take_done, which also clears it). */
int lookup_queue_fd(struct lookup_queue *q);

/* Hand JOB (malloc'd; ownership passes) to a lookup thread. -EBUSY when
 * MAX_PENDING are pending: the job stays the caller's. */
int lookup_submit(struct lookup_queue *q, struct lookup_job *job);

/* The finished jobs in the order they finished (a list through
 * next_done), or NULL; each is the caller's to free. */
struct lookup_job *lookup_take_done(struct lookup_queue *q);

/* Jobs submitted and not yet taken back. */
unsigned lookup_pending(struct lookup_queue *q);

/* Stop the threads after their current lookup (jobs still queued are
 * finished with -ESHUTDOWN, not looked up); jobs not taken back have their
 * fd closed. Accepts NULL. */
void lookup_queue_free(struct lookup_queue *q);
