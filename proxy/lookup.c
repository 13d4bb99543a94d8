/* lookup.c -- see lookup.h. */
#include "lookup.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "log.h"

struct lookup_queue {
	struct helper_pool *pool;
	lookup_fn fn;
	void *ud;
	unsigned max_pending;
	atomic_uint pending;
	atomic_bool stopping;
	int efd;
	pthread_mutex_t lock;    /* the done list */
	struct lookup_job *done; /* the latest first */
};

int lookup_queue_new(unsigned nthreads, unsigned max_pending, lookup_fn fn, void *userdata,
		     struct lookup_queue **out)
{
	struct lookup_queue *q = calloc(1, sizeof(*q));
	int r;

	if (!q)
		return -ENOMEM;
	q->fn = fn;
	q->ud = userdata;
	q->max_pending = max_pending ? max_pending : 1;
	pthread_mutex_init(&q->lock, NULL);
	q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (q->efd < 0) {
		r = -errno;
		pthread_mutex_destroy(&q->lock);
		free(q);
		return r;
	}
	r = helper_pool_new(nthreads, &q->pool);
	if (r < 0) {
		close(q->efd);
		pthread_mutex_destroy(&q->lock);
		free(q);
		return r;
	}
	*out = q;
	return 0;
}

int lookup_queue_fd(struct lookup_queue *q)
{
	return q->efd;
}

static void run(struct helper_job *hj)
{
	struct lookup_job *job = (struct lookup_job *)hj;
	struct lookup_queue *q = job->q;
	uint64_t one = 1;

	if (atomic_load(&q->stopping))
		job->result = -ESHUTDOWN;
	else
		q->fn(q->ud, job);
	pthread_mutex_lock(&q->lock);
	job->next_done = q->done;
	q->done = job;
	pthread_mutex_unlock(&q->lock);
	if (write(q->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_error("identity lookup: cannot wake the acceptor: %s", strerror(errno));
}

int lookup_submit(struct lookup_queue *q, struct lookup_job *job)
{
	unsigned n = atomic_load(&q->pending);

	/* Only the acceptor submits, so no other thread raises it meanwhile. */
	if (n >= q->max_pending)
		return -EBUSY;
	atomic_fetch_add(&q->pending, 1);
	job->q = q;
	job->hj.run = run;
	helper_pool_submit(q->pool, &job->hj);
	return 0;
}

struct lookup_job *lookup_take_done(struct lookup_queue *q)
{
	struct lookup_job *latest, *first = NULL;
	uint64_t v;
	unsigned n = 0;

	if (read(q->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		log_error("identity lookup: eventfd: %s", strerror(errno));
	pthread_mutex_lock(&q->lock);
	latest = q->done;
	q->done = NULL;
	pthread_mutex_unlock(&q->lock);
	/* Reversed into the order they finished. */
	while (latest) {
		struct lookup_job *j = latest;

		latest = j->next_done;
		j->next_done = first;
		first = j;
		n++;
	}
	atomic_fetch_sub(&q->pending, n);
	return first;
}

unsigned lookup_pending(struct lookup_queue *q)
{
	return atomic_load(&q->pending);
}

void lookup_queue_free(struct lookup_queue *q)
{
	struct lookup_job *j, *next;

	if (!q)
		return;
	atomic_store(&q->stopping, true);
	helper_pool_free(q->pool);
	for (j = lookup_take_done(q); j; j = next) {
		next = j->next_done;
		close(j->fd);
		free(j);
	}
	close(q->efd);
	pthread_mutex_destroy(&q->lock);
	free(q);
}
