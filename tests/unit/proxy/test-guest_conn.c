/* test-guest_conn.c -- a guest connection's life on a real socket pair and
 * epoll instance: the engine reached through it, epoll interest, the lists
 * and the dirty list it is on, references, shutting and discarding. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "guest_conn.h"

/* cmocka's assert_non_null() is not known to the compiler to stop the test. */
#pragma GCC diagnostic ignored "-Wnull-dereference"

static const unsigned char AMQP_HEADER[8] = { 'A', 'M', 'Q', 'P', 0, 0, 9, 1 };

struct fx {
	struct guest_session_config cfg;
	int epfd;
	int peer[4];	/* the guests' ends */
	int ours[4];	/* the connections' ends */
	void *last_ud;	/* userdata of the last engine event */
	int nevents;
};

static struct fx *cur;

static void on_event(void *ud, const struct guest_event *ev)
{
	(void)ev;
	cur->last_ud = ud;
	cur->nevents++;
}

static int setup(void **state)
{
	static struct fx f;

	memset(&f, 0, sizeof(f));
	guest_session_config_init(&f.cfg);
	f.cfg.on_event = on_event;
	f.epfd = epoll_create1(EPOLL_CLOEXEC);
	assert_true(f.epfd >= 0);
	for (int i = 0; i < 4; i++) {
		int sv[2];
		assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
		f.peer[i] = sv[0];
		f.ours[i] = sv[1];
	}
	cur = &f;
	*state = &f;
	return 0;
}

/* Socket I's connection end, which the connection made of it owns. */
static int take(struct fx *f, int i)
{
	int fd = f->ours[i];

	f->ours[i] = -1;
	return fd;
}

static int teardown(void **state)
{
	struct fx *f = *state;

	for (int i = 0; i < 4; i++) {
		close(f->peer[i]);
		if (f->ours[i] >= 0)
			close(f->ours[i]);
	}
	close(f->epfd);
	return 0;
}

/* The events ready on EPFD within TIMEOUT_MS, for connection C (0: none). */
static uint32_t ready(int epfd, const struct guest_conn *c, int timeout_ms)
{
	struct epoll_event e;
	int n = epoll_wait(epfd, &e, 1, timeout_ms);

	if (n <= 0)
		return 0;
	assert_ptr_equal(e.data.ptr, c);
	return e.events;
}

/* Whether the peer's end of the socket is at end of file. */
static bool peer_sees_eof(int fd)
{
	char b;

	return recv(fd, &b, 1, MSG_DONTWAIT) == 0;
}

static void test_engine_through_socket(void **state)
{
	struct fx *f = *state;
	struct guest_conn *c = guest_conn_new(take(f, 0), 7, 42, "10.0.0.9:5000", &f->cfg, 1000);
	unsigned char buf[4096];
	uint64_t writes = 0;
	ssize_t n;

	assert_non_null(c);
	assert_int_equal(guest_conn_id(c), 7);
	assert_int_equal(guest_conn_cid(c), 42);
	assert_string_equal(guest_conn_peer(c), "10.0.0.9:5000");
	assert_non_null(guest_conn_session(c));
	assert_int_equal(guest_conn_watch(c, f->epfd, true), 0);
	assert_int_equal(ready(f->epfd, c, 0), 0);

	/* The protocol header in: the engine answers connection.start. */
	assert_int_equal(send(f->peer[0], AMQP_HEADER, sizeof(AMQP_HEADER), 0), 8);
	assert_true(ready(f->epfd, c, 1000) & EPOLLIN);
	assert_int_equal(guest_conn_read(c, buf, sizeof(buf), 1000), 8);
	assert_int_equal(guest_conn_read(c, buf, sizeof(buf), 1000), -EAGAIN);
	assert_int_equal(guest_conn_bytes_in(c), 8);
	assert_int_equal(guest_conn_flush(c, 1000, &writes), 0);
	assert_int_equal(writes, 1);
	n = recv(f->peer[0], buf, sizeof(buf), MSG_DONTWAIT);
	assert_true(n > 12);
	assert_int_equal(guest_conn_bytes_out(c), (uint64_t)n);
	assert_int_equal(buf[0], 1); /* a method frame */
	assert_int_equal((buf[7] << 8 | buf[8]), 10); /* connection */
	assert_int_equal((buf[9] << 8 | buf[10]), 10); /* start */

	/* Not reading: data waits, and is seen once reading again. */
	guest_conn_set_interest(c, f->epfd, false, false, 1000);
	assert_int_equal(send(f->peer[0], "x", 1, 0), 1);
	assert_int_equal(ready(f->epfd, c, 0), 0);
	guest_conn_set_interest(c, f->epfd, true, true, 1000);
	assert_int_equal(ready(f->epfd, c, 1000), EPOLLIN | EPOLLOUT);
	guest_conn_set_interest(c, f->epfd, false, true, 1000);
	assert_int_equal(ready(f->epfd, c, 1000), EPOLLOUT);

	assert_int_equal(guest_conn_read(c, buf, sizeof(buf), 1001), 1);

	/* Peer gone: EOF. */
	close(f->peer[0]);
	f->peer[0] = socket(AF_UNIX, SOCK_STREAM, 0); /* for teardown */
	guest_conn_set_interest(c, f->epfd, true, false, 1002);
	assert_true(ready(f->epfd, c, 1000) & (EPOLLIN | EPOLLHUP));
	assert_false(guest_conn_closing(c));
	guest_conn_close_later(c);
	assert_true(guest_conn_closing(c));

	guest_session_free(guest_conn_shut(c, f->epfd));
	assert_null(guest_conn_session(c));
	assert_int_equal(ready(f->epfd, c, 0), 0); /* out of epoll */
	assert_true(guest_conn_unref(c));
}

/* The engine's events carry their connection (no thread-wide "current
 * connection"): one whose answer to the protocol header overflows its
 * output bound is dropped, and says so with itself as the userdata. */
static void test_events_carry_the_connection(void **state)
{
	struct fx *f = *state;
	struct guest_conn *a, *b;
	unsigned char buf[64];

	f->cfg.max_output_bytes = 16;
	a = guest_conn_new(take(f, 0), 1, 0, "a", &f->cfg, 0);
	b = guest_conn_new(take(f, 1), 2, 0, "b", &f->cfg, 0);
	assert_non_null(a);
	assert_non_null(b);
	assert_int_equal(send(f->peer[1], AMQP_HEADER, sizeof(AMQP_HEADER), 0), 8);
	assert_int_equal(guest_conn_read(b, buf, sizeof(buf), 1), 8);
	assert_int_equal(f->nevents, 1);
	assert_ptr_equal(f->last_ud, b);
	assert_int_equal(send(f->peer[0], AMQP_HEADER, sizeof(AMQP_HEADER), 0), 8);
	assert_int_equal(guest_conn_read(a, buf, sizeof(buf), 1), 8);
	assert_int_equal(f->nevents, 2);
	assert_ptr_equal(f->last_ud, a);
	guest_conn_discard(a);
	guest_conn_discard(b);
}

static void test_refs_keep_it_after_shut(void **state)
{
	struct fx *f = *state;
	struct guest_conn *c = guest_conn_new(take(f, 1), 1, 0, "p", &f->cfg, 0);
	struct guest_session *s;

	assert_non_null(c);
	assert_int_equal(guest_conn_watch(c, f->epfd, true), 0);
	guest_conn_ref(c); /* a held message */
	s = guest_conn_shut(c, f->epfd);
	assert_non_null(s);
	guest_session_free(s);
	assert_true(peer_sees_eof(f->peer[1])); /* the socket closed at the shut */
	assert_null(guest_conn_session(c));
	assert_null(guest_conn_shut(c, f->epfd)); /* a second shut does nothing */
	assert_false(guest_conn_unref(c));	   /* the message still holds it */
	assert_int_equal(guest_conn_id(c), 1);
	assert_true(guest_conn_unref(c));
}

static void test_owner_and_deadline(void **state)
{
	struct fx *f = *state;
	struct guest_conn *c = guest_conn_new(take(f, 1), 1, 0, "p", &f->cfg, 0);
	int a, b;

	assert_non_null(c);
	assert_null(guest_conn_vm(c));
	assert_null(guest_conn_thread(c));
	guest_conn_set_owner(c, (struct poll_thread *)&a, (struct vm_state *)&b);
	assert_ptr_equal(guest_conn_thread(c), &a);
	assert_ptr_equal(guest_conn_vm(c), &b);
	assert_int_equal(guest_conn_deadline(c), 0);
	guest_conn_set_deadline(c, 12345);
	assert_int_equal(guest_conn_deadline(c), 12345);
	guest_conn_discard(c);
	assert_true(peer_sees_eof(f->peer[1]));
}

static void test_lists(void **state)
{
	struct fx *f = *state;
	struct guest_conn_list vm = { 0 }, other = { 0 }, all = { 0 };
	struct guest_conn *c[3], *it;
	int n;

	for (int i = 0; i < 3; i++) {
		c[i] = guest_conn_new(take(f, i), (uint32_t)i, 0, "p", &f->cfg, 0);
		assert_non_null(c[i]);
	}
	guest_conn_link(c[0], &vm, &all);
	guest_conn_link(c[1], &other, &all);
	guest_conn_link(c[2], &vm, &all);
	assert_int_equal(vm.count, 2);
	assert_int_equal(other.count, 1);
	assert_int_equal(all.count, 3);
	/* Newest first. */
	assert_ptr_equal(vm.head, c[2]);
	assert_ptr_equal(guest_conn_vm_next(c[2]), c[0]);
	assert_null(guest_conn_vm_next(c[0]));
	n = 0;
	for (it = all.head; it; it = guest_conn_all_next(it))
		assert_ptr_equal(it, c[2 - n++]);
	assert_int_equal(n, 3);

	/* The middle one leaves the thread but stays on its VM's list (a
	 * move between threads); then the head leaves both. */
	guest_conn_unlink(c[1], NULL, &all);
	assert_int_equal(all.count, 2);
	assert_ptr_equal(guest_conn_all_next(c[2]), c[0]);
	assert_ptr_equal(other.head, c[1]);
	guest_conn_unlink(c[2], &vm, &all);
	assert_ptr_equal(vm.head, c[0]);
	assert_ptr_equal(all.head, c[0]);
	assert_null(guest_conn_vm_next(c[2]));
	assert_null(guest_conn_all_next(c[2]));
	assert_int_equal(vm.count, 1);
	assert_int_equal(all.count, 1);
	/* Linked again elsewhere: the old links are gone. */
	guest_conn_link(c[1], &vm, &all);
	assert_ptr_equal(vm.head, c[1]);
	assert_ptr_equal(guest_conn_vm_next(c[1]), c[0]);
	guest_conn_unlink(c[1], &vm, &all);
	guest_conn_unlink(c[0], &vm, &all);
	assert_null(vm.head);
	assert_null(all.head);
	assert_int_equal(vm.count + all.count, 0);
	for (int i = 0; i < 3; i++)
		guest_conn_discard(c[i]);
}

static void test_dirty_list(void **state)
{
	struct fx *f = *state;
	struct guest_conn *dirty = NULL, *a, *b;

	a = guest_conn_new(take(f, 0), 1, 0, "a", &f->cfg, 0);
	b = guest_conn_new(take(f, 1), 2, 0, "b", &f->cfg, 0);
	assert_non_null(a);
	assert_non_null(b);
	assert_true(guest_conn_push_dirty(&dirty, a));
	assert_false(guest_conn_push_dirty(&dirty, a)); /* once */
	assert_true(guest_conn_push_dirty(&dirty, b));
	assert_ptr_equal(guest_conn_pop_dirty(&dirty), b);
	assert_true(guest_conn_push_dirty(&dirty, b)); /* off it: again */
	assert_ptr_equal(guest_conn_pop_dirty(&dirty), b);
	assert_ptr_equal(guest_conn_pop_dirty(&dirty), a);
	assert_null(guest_conn_pop_dirty(&dirty));

	/* A shut connection has nothing to write: never pushed. */
	guest_session_free(guest_conn_shut(b, f->epfd));
	assert_false(guest_conn_push_dirty(&dirty, b));
	assert_null(dirty);
	assert_true(guest_conn_unref(b));
	guest_conn_discard(a);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_engine_through_socket, setup, teardown),
		cmocka_unit_test_setup_teardown(test_events_carry_the_connection, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refs_keep_it_after_shut, setup, teardown),
		cmocka_unit_test_setup_teardown(test_owner_and_deadline, setup, teardown),
		cmocka_unit_test_setup_teardown(test_lists, setup, teardown),
		cmocka_unit_test_setup_teardown(test_dirty_list, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
