/* mailbox.h -- how threads talk to a poll thread: a lock-free multi-producer
 * single-consumer queue of intrusive nodes plus an eventfd that the owner
 * registers in its epoll. Producers never block; the owner drains. */
#pragma once

#include <stdatomic.h>
#include <stdbool.h>

struct mail {
	_Atomic(struct mail *) next;
	int type; /* the owner's own numbering */
};

struct mailbox {
	_Atomic(struct mail *) head; /* producers swap themselves in here */
	struct mail *tail;	     /* consumer side */
	struct mail stub;
	atomic_bool signalled; /* an eventfd write is pending: producers skip theirs */
	int efd;
};

/* Create the eventfd. Returns 0 or -errno. */
int mailbox_init(struct mailbox *mb);
void mailbox_destroy(struct mailbox *mb);

/* The fd to register with EPOLLIN in the owner's epoll. */
int mailbox_fd(const struct mailbox *mb);

/* Any thread: append M (ownership passes to the owner) and wake the owner. */
void mailbox_post(struct mailbox *mb, struct mail *m);

/* Owner only: clear the wake-up; call before draining with mailbox_take so
 * that a post racing with the drain wakes the owner again. */
void mailbox_ack(struct mailbox *mb);

/* Owner only: the oldest message, or NULL when empty (or when a producer is
 * midway through a post; its wake-up arrives after). */
struct mail *mailbox_take(struct mailbox *mb);
