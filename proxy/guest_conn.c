/* guest_conn.c -- see guest_conn.h */
#include "guest_conn.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "list.h"

struct guest_conn {
	struct guest_session *sess; /* NULL once the socket is shut */
	struct vm_state *vm;
	struct poll_thread *pt; /* the thread that owns it now */
	int fd;
	uint32_t id;
	uint32_t cid;	    /* vsock CID it came from (0: not vsock), for x-vm-cid */
	uint32_t refs;	    /* 1 while open + 1 per held message */
	uint32_t ep_events; /* currently registered with epoll */
	bool dirty;	    /* on the owner's dirty list */
	bool closing;	    /* shut after this dispatch round */
	struct guest_conn *dirty_next;
	struct guest_conn *vm_prev, *vm_next;	/* the VM's connections */
	struct guest_conn *all_prev, *all_next; /* the thread's connections */
	uint64_t deadline;			/* next guest_session_tick */
	uint64_t bytes_in, bytes_out;
	char peer[80];
};

struct guest_conn *guest_conn_new(int fd, uint32_t id, uint32_t cid, const char *peer,
				  const struct guest_session_config *config, uint64_t now_ms)
{
	struct guest_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->sess = guest_session_new(config, c, now_ms);
	if (!c->sess) {
		free(c);
		return NULL;
	}
	c->fd = fd;
	c->id = id;
	c->cid = cid;
	c->refs = 1;
	snprintf(c->peer, sizeof(c->peer), "%s", peer);
	return c;
}

void guest_conn_ref(struct guest_conn *c)
{
	c->refs++;
}

bool guest_conn_unref(struct guest_conn *c)
{
	if (--c->refs > 0)
		return false;
	if (c->sess) /* never shut: only on failure paths */
		guest_session_free(c->sess);
	if (c->fd >= 0)
		close(c->fd);
	free(c);
	return true;
}

struct guest_session *guest_conn_session(const struct guest_conn *c)
{
	return c->sess;
}

uint32_t guest_conn_id(const struct guest_conn *c)
{
	return c->id;
}

uint32_t guest_conn_cid(const struct guest_conn *c)
{
	return c->cid;
}

const char *guest_conn_peer(const struct guest_conn *c)
{
	return c->peer;
}

struct vm_state *guest_conn_vm(const struct guest_conn *c)
{
	return c->vm;
}

struct poll_thread *guest_conn_thread(const struct guest_conn *c)
{
	return c->pt;
}

void guest_conn_set_owner(struct guest_conn *c, struct poll_thread *pt, struct vm_state *vm)
{
	c->pt = pt;
	c->vm = vm;
}

/* ---- the socket ---------------------------------------------------------- */

int guest_conn_watch(struct guest_conn *c, int epfd, bool read)
{
	struct epoll_event e = { .events = read ? EPOLLIN : 0, .data.ptr = c };

	if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &e) < 0)
		return -errno;
	c->ep_events = e.events;
	return 0;
}

void guest_conn_unwatch(struct guest_conn *c, int epfd)
{
	epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
	c->ep_events = 0;
}

void guest_conn_set_interest(struct guest_conn *c, int epfd, bool read, bool write,
			     uint64_t now_ms)
{
	uint32_t ev = 0;
	struct epoll_event e;

	if (read && guest_session_wants_read(c->sess))
		ev |= EPOLLIN;
	if (write)
		ev |= EPOLLOUT;
	if (ev == c->ep_events)
		return;
	e.events = ev;
	e.data.ptr = c;
	if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e) == 0) {
		if ((ev ^ c->ep_events) & EPOLLIN)
			guest_session_set_reading(c->sess, ev & EPOLLIN, now_ms);
		c->ep_events = ev;
	}
}

int guest_conn_read(struct guest_conn *c, void *buf, size_t len, uint64_t now_ms)
{
	ssize_t n = recv(c->fd, buf, len, MSG_DONTWAIT);

	if (n < 0)
		return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? -EAGAIN : -errno;
	if (n == 0)
		return 0;
	c->bytes_in += (uint64_t)n;
	guest_session_feed(c->sess, buf, (size_t)n, now_ms);
	return (int)n;
}

int guest_conn_flush(struct guest_conn *c, uint64_t now_ms, uint64_t *writes)
{
	for (;;) {
		const void *data;
		size_t len = guest_session_output(c->sess, &data);
		ssize_t n;

		if (len == 0)
			return 0;
		(*writes)++;
		n = send(c->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return -EAGAIN;
			if (errno == EINTR)
				continue;
			return -errno;
		}
		c->bytes_out += (uint64_t)n;
		guest_session_output_consumed(c->sess, (size_t)n, now_ms);
	}
}

uint64_t guest_conn_bytes_in(const struct guest_conn *c)
{
	return c->bytes_in;
}

uint64_t guest_conn_bytes_out(const struct guest_conn *c)
{
	return c->bytes_out;
}

void guest_conn_close_later(struct guest_conn *c)
{
	c->closing = true;
}

bool guest_conn_closing(const struct guest_conn *c)
{
	return c->closing;
}

struct guest_session *guest_conn_shut(struct guest_conn *c, int epfd)
{
	struct guest_session *sess = c->sess;

	c->sess = NULL;
	if (c->fd >= 0) {
		epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
		close(c->fd);
		c->fd = -1;
	}
	c->ep_events = 0;
	return sess;
}

void guest_conn_discard(struct guest_conn *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	guest_session_free(c->sess);
	c->sess = NULL;
	free(c);
}

uint64_t guest_conn_deadline(const struct guest_conn *c)
{
	return c->deadline;
}

void guest_conn_set_deadline(struct guest_conn *c, uint64_t at_ms)
{
	c->deadline = at_ms;
}

/* ---- lists --------------------------------------------------------------- */

bool guest_conn_push_dirty(struct guest_conn **list, struct guest_conn *c)
{
	if (c->dirty || !c->sess)
		return false;
	c->dirty = true;
	c->dirty_next = *list;
	*list = c;
	return true;
}

struct guest_conn *guest_conn_pop_dirty(struct guest_conn **list)
{
	struct guest_conn *c = *list;

	if (c) {
		*list = c->dirty_next;
		c->dirty_next = NULL;
		c->dirty = false;
	}
	return c;
}

void guest_conn_link(struct guest_conn *c, struct guest_conn_list *vm, struct guest_conn_list *all)
{
	if (vm) {
		DLIST_PUSH(vm->head, c, vm_prev, vm_next);
		vm->count++;
	}
	DLIST_PUSH(all->head, c, all_prev, all_next);
	all->count++;
}

void guest_conn_unlink(struct guest_conn *c, struct guest_conn_list *vm,
		       struct guest_conn_list *all)
{
	if (vm) {
		DLIST_UNLINK(vm->head, c, vm_prev, vm_next);
		vm->count--;
	}
	DLIST_UNLINK(all->head, c, all_prev, all_next);
	all->count--;
}

struct guest_conn *guest_conn_vm_next(const struct guest_conn *c)
{
	return c->vm_next;
}

struct guest_conn *guest_conn_all_next(const struct guest_conn *c)
{
	return c->all_next;
}
