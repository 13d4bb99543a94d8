/* helper.h -- threads for work that blocks by nature (a link's name
 * resolution and TLS files, the acceptor's libvirt lookups) so that poll
 * threads and the acceptor never block; a job posts its own result back
 * (a poll thread's mailbox, the lookup queue). */
#pragma once

struct helper_pool;

struct helper_job {
	struct helper_job *next;
	/* Runs on a helper thread; owns JOB from then on. */
	void (*run)(struct helper_job *job);
};

/* Start NTHREADS helper threads. Returns 0 or -errno. */
int helper_pool_new(unsigned nthreads, struct helper_pool **out);

/* Queue JOB (ownership passes to the pool until run is called). */
void helper_pool_submit(struct helper_pool *p, struct helper_job *job);

/* Stop the threads after their current job; queued jobs are run with
 * nothing else, so their run() must cope (they are run, not dropped, so
 * that their owners get an answer). Accepts NULL. */
void helper_pool_free(struct helper_pool *p);
