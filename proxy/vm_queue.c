/* vm_queue.c -- see vm_queue.h */
#include "vm_queue.h"

#include <stddef.h>

/* At most this many VMs share the window at once: with more waiting, each
 * still gets a quarter, so the scan for one under its share stays short. */
#define SHARE_WAYS 4

void vm_queue_add(struct vm_queue *q, struct vmq_entry *e)
{
	if (e->queued)
		return;
	e->queued = true;
	e->next = NULL;
	if (q->tail)
		q->tail->next = e;
	else
		q->head = e;
	q->tail = e;
	q->len++;
}

struct vmq_entry *vm_queue_pick(struct vm_queue *q, uint32_t window)
{
	uint32_t share = UINT32_MAX;
	struct vmq_entry *prev = NULL;

	if (q->len > 1) {
		share = window / (q->len < SHARE_WAYS ? q->len : SHARE_WAYS);
		if (share == 0)
			share = 1;
	}
	for (struct vmq_entry *e = q->head; e; prev = e, e = e->next) {
		if (e->inflight < share) {
			q->pick = e;
			q->pick_prev = prev;
			return e;
		}
	}
	return NULL;
}

void vm_queue_sent(struct vm_queue *q, bool more)
{
	struct vmq_entry *e = q->pick, *prev = q->pick_prev;

	e->inflight++;
	if (prev)
		prev->next = e->next;
	else
		q->head = e->next;
	if (q->tail == e)
		q->tail = prev;
	e->next = NULL;
	e->queued = false;
	q->len--;
	q->pick = q->pick_prev = NULL;
	if (more)
		vm_queue_add(q, e);
}
