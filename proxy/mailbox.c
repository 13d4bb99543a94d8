/* mailbox.c -- see mailbox.h. The queue is the classic intrusive MPSC list
 * with a stub node: a producer exchanges the head and then links the old
 * head to itself, so between those two steps the list is briefly cut; the
 * consumer then sees "empty" and the producer's eventfd write, which comes
 * after the link, wakes it again. */
#include "mailbox.h"

#include <errno.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

int mailbox_init(struct mailbox *mb)
{
	atomic_store(&mb->stub.next, NULL);
	atomic_store(&mb->head, &mb->stub);
	mb->tail = &mb->stub;
	atomic_store(&mb->signalled, false);
	mb->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	return mb->efd < 0 ? -errno : 0;
}

void mailbox_destroy(struct mailbox *mb)
{
	if (mb->efd >= 0)
		close(mb->efd);
	mb->efd = -1;
}

int mailbox_fd(const struct mailbox *mb)
{
	return mb->efd;
}

static void push(struct mailbox *mb, struct mail *m)
{
	struct mail *prev;

	atomic_store_explicit(&m->next, NULL, memory_order_relaxed);
	prev = atomic_exchange_explicit(&mb->head, m, memory_order_acq_rel);
	atomic_store_explicit(&prev->next, m, memory_order_release);
}

void mailbox_post(struct mailbox *mb, struct mail *m)
{
	uint64_t one = 1;

	push(mb, m);
	if (!atomic_exchange_explicit(&mb->signalled, true, memory_order_acq_rel)) {
		/* EAGAIN means the counter is already non-zero: awake anyway. */
		if (write(mb->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
			log_error("mailbox: cannot wake its owner (eventfd: %s); the mail waits for "
				  "its next wake-up", strerror(errno));
	}
}

void mailbox_ack(struct mailbox *mb)
{
	uint64_t v;

	/* Drain first, then clear: clearing first would let a producer set
	 * the flag and write the eventfd in between, and this read would eat
	 * that wake-up while the flag stays set, so the next producer would
	 * not write either. The exchange also acquires what producers
	 * published before they saw the flag set. */
	if (read(mb->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		v = 0;
	atomic_exchange_explicit(&mb->signalled, false, memory_order_acq_rel);
}

struct mail *mailbox_take(struct mailbox *mb)
{
	struct mail *tail = mb->tail;
	struct mail *next = atomic_load_explicit(&tail->next, memory_order_acquire);

	if (tail == &mb->stub) {
		if (!next)
			return NULL;
		mb->tail = next;
		tail = next;
		next = atomic_load_explicit(&next->next, memory_order_acquire);
	}
	if (next) {
		mb->tail = next;
		return tail;
	}
	if (tail != atomic_load_explicit(&mb->head, memory_order_acquire))
		return NULL; /* a producer is between exchange and link */
	push(mb, &mb->stub);
	next = atomic_load_explicit(&tail->next, memory_order_acquire);
	if (next) {
		mb->tail = next;
		return tail;
	}
	return NULL;
}
