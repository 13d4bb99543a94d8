/* helper.c -- see helper.h. A mutex and condition variable guard the job
 * list: jobs are rare (a reconnect), so this lock is never on a data path. */
#include "helper.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

struct helper_pool {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct helper_job *head, *tail;
	bool stopping;
	unsigned nthreads;
	pthread_t threads[];
};

static void *helper_main(void *arg)
{
	struct helper_pool *p = arg;

	pthread_setname_np(pthread_self(), "vmproxy-helper");
	pthread_mutex_lock(&p->lock);
	for (;;) {
		struct helper_job *job;

		while (!p->head && !p->stopping)
			pthread_cond_wait(&p->cond, &p->lock);
		job = p->head;
		if (!job)
			break;
		p->head = job->next;
		if (!p->head)
			p->tail = NULL;
		pthread_mutex_unlock(&p->lock);
		job->run(job);
		pthread_mutex_lock(&p->lock);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int helper_pool_new(unsigned nthreads, struct helper_pool **out)
{
	struct helper_pool *p;
	unsigned i;
	int r;

	p = calloc(1, sizeof(*p) + nthreads * sizeof(pthread_t));
	if (!p)
		return -ENOMEM;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond, NULL);
	for (i = 0; i < nthreads; i++) {
		r = pthread_create(&p->threads[i], NULL, helper_main, p);
		if (r) {
			log_error("cannot start helper thread: %s", strerror(r));
			p->nthreads = i;
			helper_pool_free(p);
			return -r;
		}
	}
	p->nthreads = nthreads;
	*out = p;
	return 0;
}

void helper_pool_submit(struct helper_pool *p, struct helper_job *job)
{
	job->next = NULL;
	pthread_mutex_lock(&p->lock);
	if (p->tail)
		p->tail->next = job;
	else
		p->head = job;
	p->tail = job;
	pthread_cond_signal(&p->cond);
	pthread_mutex_unlock(&p->lock);
}

void helper_pool_free(struct helper_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	p->stopping = true;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->lock);
	for (unsigned i = 0; i < p->nthreads; i++)
		pthread_join(p->threads[i], NULL);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->cond);
	free(p);
}
