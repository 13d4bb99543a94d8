/* vm_queue.h -- the fair queue of a poll thread's VMs that have messages
 * waiting for its link: round robin, one message per turn, and while
 * several VMs wait none may hold more than its share of the link's window
 * unconfirmed. The entries are embedded in the owner's per-VM state; the
 * messages themselves stay in the owner's lists. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

struct vmq_entry {
	struct vmq_entry *next;
	uint32_t inflight; /* published on the link, not yet confirmed */
	bool queued;
};

struct vm_queue {
	struct vmq_entry *head, *tail;
	uint32_t len;
	struct vmq_entry *pick, *pick_prev; /* what vm_queue_pick chose */
};

/* Queue E at the tail, unless it is queued already. */
void vm_queue_add(struct vm_queue *q, struct vmq_entry *e);

/* The first queued entry under its share of WINDOW: with W entries
 * queued, WINDOW / min(W, 4) (at least 1), unbounded for a single entry
 * (the link bounds the whole window). NULL when every queued entry is at
 * its share. Remembered for vm_queue_sent. */
struct vmq_entry *vm_queue_pick(struct vm_queue *q, uint32_t window);

/* The picked entry had one message published: it counts one more in
 * flight and goes to the tail when MORE (it has further messages), else
 * out of the queue. */
void vm_queue_sent(struct vm_queue *q, bool more);

/* A message of E was confirmed, nacked or handed back by the link. */
static inline void vm_queue_settled(struct vmq_entry *e)
{
	e->inflight--;
}
