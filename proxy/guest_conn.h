/* guest_conn.h -- one guest's AMQP connection on a poll thread: its socket,
 * its guest_session engine, and the references that keep it alive while
 * the broker has not yet confirmed its messages. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "guest_session.h"

struct vm_state;
struct poll_thread;

struct guest_conn {
	struct guest_session *sess; /* NULL once the socket is closed */
	struct vm_state *vm;
	struct poll_thread *pt; /* the thread that owns it now */
	int fd;
	uint32_t id;
	uint32_t cid;	     /* vsock CID it came from (0: not vsock), for x-vm-cid */
	uint32_t refs;	     /* 1 while open + 1 per held message */
	uint32_t ep_events;  /* currently registered with epoll */
	bool dirty;	     /* on the thread's flush list */
	bool closing;	     /* close after this dispatch round */
	struct guest_conn *dirty_next;
	struct guest_conn *vm_prev, *vm_next;	/* the VM's connections */
	struct guest_conn *all_prev, *all_next; /* the thread's connections */
	uint64_t deadline;			/* next guest_session_tick */
	uint64_t bytes_in, bytes_out, msgs_in;
	char peer[80];
};

/* Read once (at most LEN bytes into BUF) and feed the engine. Returns the
 * bytes read, 0 on EOF, -EAGAIN when nothing was there, or -errno. */
int guest_conn_read(struct guest_conn *c, void *buf, size_t len, uint64_t now_ms);

/* Write as much pending output as the socket takes, counting the send()
 * calls in *WRITES. Returns 0 when all was written, -EAGAIN when some is
 * left, or -errno on a dead socket. */
int guest_conn_flush(struct guest_conn *c, uint64_t now_ms, uint64_t *writes);
