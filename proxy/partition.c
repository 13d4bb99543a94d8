/* partition.c -- see partition.h */
#include "partition.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"

#define UUID_MAX 37

struct part_entry {
	struct part_entry *next;
	char uuid[UUID_MAX];
	unsigned thread;
	uint32_t conns;
};

struct partition {
	pthread_mutex_t lock;
	unsigned nthreads;
	uint32_t max_vms, nvms;
	unsigned rr; /* tie breaker among equally loaded threads */
	size_t nbuckets;
	struct part_entry **buckets;
	uint32_t *thread_vms, *thread_conns;
};

static uint64_t hash_str(const char *s)
{
	return hash_fnv1a64(s);
}

int partition_new(unsigned nthreads, uint32_t max_vms, struct partition **out)
{
	struct partition *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	p->nthreads = nthreads;
	p->max_vms = max_vms;
	p->nbuckets = 1024;
	while (p->nbuckets < max_vms && p->nbuckets < (1u << 20))
		p->nbuckets <<= 1;
	p->buckets = calloc(p->nbuckets, sizeof(*p->buckets));
	p->thread_vms = calloc(nthreads, sizeof(uint32_t));
	p->thread_conns = calloc(nthreads, sizeof(uint32_t));
	if (!p->buckets || !p->thread_vms || !p->thread_conns) {
		partition_free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->lock, NULL);
	*out = p;
	return 0;
}

void partition_free(struct partition *p)
{
	if (!p)
		return;
	if (p->buckets) {
		for (size_t i = 0; i < p->nbuckets; i++) {
			struct part_entry *e = p->buckets[i], *n;
			for (; e; e = n) {
				n = e->next;
				free(e);
			}
		}
		pthread_mutex_destroy(&p->lock);
	}
	free(p->buckets);
	free(p->thread_vms);
	free(p->thread_conns);
	free(p);
}

static struct part_entry **find(struct partition *p, const char *uuid)
{
	struct part_entry **pe = &p->buckets[hash_str(uuid) & (p->nbuckets - 1)];

	while (*pe && strcmp((*pe)->uuid, uuid) != 0)
		pe = &(*pe)->next;
	return pe;
}

static unsigned least_loaded(struct partition *p)
{
	unsigned best = p->rr % p->nthreads;

	for (unsigned k = 0; k < p->nthreads; k++) {
		unsigned i = (p->rr + k) % p->nthreads;
		if (p->thread_conns[i] < p->thread_conns[best] ||
		    (p->thread_conns[i] == p->thread_conns[best] &&
		     p->thread_vms[i] < p->thread_vms[best]))
			best = i;
	}
	p->rr++;
	return best;
}

int partition_assign_conn(struct partition *p, const char *uuid, uint32_t max_per_vm,
			  unsigned *thread)
{
	struct part_entry **pe, *e;
	int r = 0;

	if (strlen(uuid) >= UUID_MAX)
		return -EINVAL;
	pthread_mutex_lock(&p->lock);
	pe = find(p, uuid);
	e = *pe;
	if (e) {
		if (e->conns >= max_per_vm) {
			r = -EMFILE;
			goto out;
		}
	} else {
		if (p->nvms >= p->max_vms) {
			r = -ENOSPC;
			goto out;
		}
		e = calloc(1, sizeof(*e));
		if (!e) {
			r = -ENOMEM;
			goto out;
		}
		strcpy(e->uuid, uuid);
		e->thread = least_loaded(p);
		*pe = e;
		p->nvms++;
		p->thread_vms[e->thread]++;
	}
	e->conns++;
	p->thread_conns[e->thread]++;
	*thread = e->thread;
out:
	pthread_mutex_unlock(&p->lock);
	return r;
}

void partition_release_conn(struct partition *p, const char *uuid)
{
	struct part_entry **pe, *e;

	pthread_mutex_lock(&p->lock);
	pe = find(p, uuid);
	e = *pe;
	if (e && e->conns > 0) {
		e->conns--;
		p->thread_conns[e->thread]--;
		if (e->conns == 0) {
			*pe = e->next;
			p->thread_vms[e->thread]--;
			p->nvms--;
			free(e);
		}
	}
	pthread_mutex_unlock(&p->lock);
}

int partition_lookup(struct partition *p, const char *uuid, unsigned *thread)
{
	struct part_entry *e;
	int r = -ENOENT;

	pthread_mutex_lock(&p->lock);
	e = *find(p, uuid);
	if (e) {
		*thread = e->thread;
		r = 0;
	}
	pthread_mutex_unlock(&p->lock);
	return r;
}

int partition_move_vm(struct partition *p, const char *uuid, unsigned thread)
{
	struct part_entry *e;
	int r = -ENOENT;

	if (thread >= p->nthreads)
		return -EINVAL;
	pthread_mutex_lock(&p->lock);
	e = *find(p, uuid);
	if (e) {
		p->thread_vms[e->thread]--;
		p->thread_conns[e->thread] -= e->conns;
		e->thread = thread;
		p->thread_vms[thread]++;
		p->thread_conns[thread] += e->conns;
		r = 0;
	}
	pthread_mutex_unlock(&p->lock);
	return r;
}

void partition_thread_load(struct partition *p, unsigned thread, uint32_t *vms, uint32_t *conns)
{
	pthread_mutex_lock(&p->lock);
	*vms = thread < p->nthreads ? p->thread_vms[thread] : 0;
	*conns = thread < p->nthreads ? p->thread_conns[thread] : 0;
	pthread_mutex_unlock(&p->lock);
}

uint32_t partition_total_conns(struct partition *p)
{
	uint32_t n = 0;

	pthread_mutex_lock(&p->lock);
	for (unsigned i = 0; i < p->nthreads; i++)
		n += p->thread_conns[i];
	pthread_mutex_unlock(&p->lock);
	return n;
}
