/* guest_conn.h -- one guest's AMQP connection on a poll thread: its socket
 * and epoll interest, its guest_session engine, its places in its VM's and
 * its thread's lists, and the references that keep it alive while the
 * broker has not yet confirmed its messages. Opaque: the poll thread that
 * owns it reaches it only through these functions, on its own thread. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "guest_session.h"

struct guest_conn;
struct vm_state;
struct poll_thread;

/* The heads of the two lists a connection is on: its VM's connections and
 * its thread's (the owner embeds them; COUNT is theirs to read). */
struct guest_conn_list {
	struct guest_conn *head;
	uint32_t count;
};

/* A connection for socket FD (which it owns from here), with its engine made
 * from CONFIG; the engine's events carry the connection as userdata. ID,
 * CID (0: not vsock) and PEER are for logs and stamping. One reference, the
 * open socket's. Returns NULL when out of memory (FD is then not closed). */
struct guest_conn *guest_conn_new(int fd, uint32_t id, uint32_t cid, const char *peer,
				  const struct guest_session_config *config, uint64_t now_ms);

/* One more reference (a held message, a dispatch in progress). */
void guest_conn_ref(struct guest_conn *c);
/* Drop one; at the last the connection is freed and true returned. */
bool guest_conn_unref(struct guest_conn *c);

/* Its engine, or NULL once the socket is shut. */
struct guest_session *guest_conn_session(const struct guest_conn *c);
uint32_t guest_conn_id(const struct guest_conn *c);
uint32_t guest_conn_cid(const struct guest_conn *c);
const char *guest_conn_peer(const struct guest_conn *c);

/* Whom it belongs to: set when adopted and when it moves with its VM. */
struct vm_state *guest_conn_vm(const struct guest_conn *c);
struct poll_thread *guest_conn_thread(const struct guest_conn *c);
void guest_conn_set_owner(struct guest_conn *c, struct poll_thread *pt, struct vm_state *vm);

/* Add its socket to epoll instance EPFD, reading or not yet (see
 * guest_conn_set_interest), or take it out. Returns 0 or -errno. */
int guest_conn_watch(struct guest_conn *c, int epfd, bool read);
void guest_conn_unwatch(struct guest_conn *c, int epfd);
/* Read when READ and the engine wants to, write when WRITE. When reading
 * starts or stops the engine's receive timer is told (at NOW_MS). */
void guest_conn_set_interest(struct guest_conn *c, int epfd, bool read, bool write,
			     uint64_t now_ms);

/* Read once (at most LEN bytes into BUF) and feed the engine. Returns the
 * bytes read, 0 on EOF, -EAGAIN when nothing was there, or -errno. */
int guest_conn_read(struct guest_conn *c, void *buf, size_t len, uint64_t now_ms);
/* Write as much pending output as the socket takes, counting the send()
 * calls in *WRITES. Returns 0 when all was written, -EAGAIN when some is
 * left, or -errno on a dead socket. */
int guest_conn_flush(struct guest_conn *c, uint64_t now_ms, uint64_t *writes);
uint64_t guest_conn_bytes_in(const struct guest_conn *c);
uint64_t guest_conn_bytes_out(const struct guest_conn *c);

/* Shut after this dispatch round (the peer went away, a write failed). */
void guest_conn_close_later(struct guest_conn *c);
bool guest_conn_closing(const struct guest_conn *c);
/* Take it out of EPFD, close its socket and detach its engine, which is
 * returned for the caller to free once others are told (guest_session_free);
 * from here guest_conn_session() is NULL. The references are untouched. */
struct guest_session *guest_conn_shut(struct guest_conn *c, int epfd);

/* When the engine's timers are due next (0: at the next scan). */
uint64_t guest_conn_deadline(const struct guest_conn *c);
void guest_conn_set_deadline(struct guest_conn *c, uint64_t at_ms);

/* The owner's list of connections to service (write, re-arm, close) after
 * the dispatch round: push C unless it is on it or shut; returns true when
 * it was pushed. Pop returns NULL when the list is empty. */
bool guest_conn_push_dirty(struct guest_conn **list, struct guest_conn *c);
struct guest_conn *guest_conn_pop_dirty(struct guest_conn **list);

/* Link C at the front of its VM's list VM (NULL: left alone) and of its
 * thread's list ALL; unlink it. Iterate with the _next functions (a
 * connection may be unlinked while iterating only after reading next). */
void guest_conn_link(struct guest_conn *c, struct guest_conn_list *vm, struct guest_conn_list *all);
void guest_conn_unlink(struct guest_conn *c, struct guest_conn_list *vm,
		       struct guest_conn_list *all);
struct guest_conn *guest_conn_vm_next(const struct guest_conn *c);
struct guest_conn *guest_conn_all_next(const struct guest_conn *c);

/* A connection the daemon abandons while stopping (not on any epoll, no
 * held messages): close its socket, free it and its engine. */
void guest_conn_discard(struct guest_conn *c);
