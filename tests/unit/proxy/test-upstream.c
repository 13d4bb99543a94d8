/* test-upstream.c -- the upstream link's I/O and state machine against a
 * scripted broker on a loopback socket in the same thread (plain AMQP, so
 * the bytes can be read back): connect and handshake driven by epoll,
 * publishing bounded by the window, confirms out of order settled in tag
 * order, link loss handing everything back oldest first, and a broker that
 * accepts but never answers timing out. Nothing here blocks: the test is
 * the poll thread and the broker at once. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "amqp_wire.h"
#include "clock.h"
#include "config.h"
#include "helper.h"
#include "mailbox.h"
#include "upstream.h"

#define MAX_MSGS 64

struct fx {
	struct proxy_config cfg;
	struct helper_pool *helpers;
	struct mailbox mb;
	int epfd, lfd, bfd; /* listener and the broker's end */
	struct upstream *up;
	/* the poll thread's side */
	struct upstream_msg *queue[MAX_MSGS]; /* waiting, front first */
	int nqueue;
	uint64_t confirmed[MAX_MSGS];
	bool acked[MAX_MSGS];
	int nconfirmed, nrequeued, ups, downs;
	int unables, ables; /* ops->publishing calls */
	int blocks, unblocks; /* ops->broker_flow calls */
	uint16_t unable_code;
	/* the broker's side */
	uint8_t rx[1 << 16], copy[1 << 16];
	size_t rxlen;
	int publishes; /* basic.publish frames seen */
	amqp_pool_t pool;
};

static struct upstream_msg *op_peek(void *ud)
{
	struct fx *f = ud;

	return f->nqueue ? f->queue[0] : NULL;
}

static void op_pop(void *ud, struct upstream_msg *m)
{
	struct fx *f = ud;

	assert_ptr_equal(f->queue[0], m);
	memmove(f->queue, f->queue + 1, sizeof(f->queue[0]) * (size_t)--f->nqueue);
}

static void op_confirmed(void *ud, struct upstream_msg *m, bool ack)
{
	struct fx *f = ud;

	f->confirmed[f->nconfirmed] = m->guest_tag;
	f->acked[f->nconfirmed++] = ack;
	free(m);
}

static void op_requeue(void *ud, struct upstream_msg *m)
{
	struct fx *f = ud;

	memmove(f->queue + 1, f->queue, sizeof(f->queue[0]) * (size_t)f->nqueue++);
	f->queue[0] = m;
	f->nrequeued++;
}

static void op_state(void *ud, bool up)
{
	struct fx *f = ud;

	if (up)
		f->ups++;
	else
		f->downs++;
}

static void op_publishing(void *ud, bool able, uint16_t code)
{
	struct fx *f = ud;

	if (able) {
		f->ables++;
	} else {
		f->unables++;
		f->unable_code = code;
	}
}

static void op_broker_flow(void *ud, bool blocked)
{
	struct fx *f = ud;

	if (blocked)
		f->blocks++;
	else
		f->unblocks++;
}

/* No returns here (NULL). */
static const struct upstream_ops ops = {
	.peek = op_peek,
	.pop = op_pop,
	.confirmed = op_confirmed,
	.requeue = op_requeue,
	.state_changed = op_state,
	.publishing = op_publishing,
	.broker_flow = op_broker_flow,
};

/* A message whose guest_tag is ID, queued at the back. */
static void enqueue(struct fx *f, uint64_t id)
{
	static const uint8_t props[] = { 0x10, 0x00, 2 }; /* delivery_mode 2 */
	struct upstream_msg *m = calloc(1, sizeof(*m) + 4 + sizeof(props));

	assert_non_null(m);
	m->guest_tag = id;
	m->rk_len = 4;
	memcpy(m->data, "vm.k", 4);
	m->props_len = sizeof(props);
	memcpy(m->data + 4, props, sizeof(props));
	m->body = "body";
	m->body_len = 4;
	f->queue[f->nqueue++] = m;
}

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	struct epoll_event ev = { .events = EPOLLIN };

	assert_non_null(f);
	f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	assert_int_equal(bind(f->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(f->lfd, 4), 0);
	assert_int_equal(getsockname(f->lfd, (struct sockaddr *)&a, &alen), 0);
	f->bfd = -1;
	f->cfg.hostname = "hv-test";
	f->cfg.upstream.host = "127.0.0.1";
	f->cfg.upstream.port = ntohs(a.sin_port);
	f->cfg.upstream.vhost = "/";
	f->cfg.upstream.mechanism = BROKER_AUTH_PLAIN;
	f->cfg.upstream.user = "u";
	f->cfg.upstream.password = "p";
	f->cfg.upstream.exchange = "vm.metrics";
	f->cfg.upstream.connect_timeout_ms = 1500;
	f->cfg.upstream.stuck_timeout_ms = 60000;
	f->cfg.upstream.max_in_flight = 8;
	assert_int_equal(helper_pool_new(1, &f->helpers), 0);
	assert_int_equal(mailbox_init(&f->mb), 0);
	f->epfd = epoll_create1(EPOLL_CLOEXEC);
	ev.data.ptr = &f->mb;
	assert_int_equal(epoll_ctl(f->epfd, EPOLL_CTL_ADD, mailbox_fd(&f->mb), &ev), 0);
	assert_int_equal(upstream_new(&f->cfg, 0, f->epfd, f->helpers, &f->mb, &ops, f, &f->up), 0);
	init_amqp_pool(&f->pool, 4096);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;
	struct mail *m;

	upstream_free(f->up);
	helper_pool_free(f->helpers);
	mailbox_ack(&f->mb);
	while ((m = mailbox_take(&f->mb)))
		upstream_mail_discard(m);
	mailbox_destroy(&f->mb);
	for (int i = 0; i < f->nqueue; i++)
		free(f->queue[i]);
	if (f->bfd >= 0)
		close(f->bfd);
	close(f->lfd);
	close(f->epfd);
	empty_amqp_pool(&f->pool);
	free(f);
	return 0;
}

/* One iteration of a poll thread's loop, waiting at most WAIT_MS. */
static void loop_once(struct fx *f, int wait_ms)
{
	struct epoll_event evs[8];
	uint64_t now = clock_mono_ms(), next = upstream_tick(f->up, now);
	int timeout = next <= now ? 0 : (int)(next - now < (uint64_t)wait_ms ? next - now : (uint64_t)wait_ms);
	int n = epoll_wait(f->epfd, evs, 8, timeout);

	now = clock_mono_ms();
	for (int i = 0; i < n; i++) {
		if (evs[i].data.ptr == &f->mb) {
			struct mail *m;
			mailbox_ack(&f->mb);
			while ((m = mailbox_take(&f->mb)))
				upstream_handle_mail(f->up, m, now);
		} else {
			upstream_handle_events(f->up, evs[i].events, now);
		}
	}
	upstream_kick(f->up, now);
}

/* The broker's side: accept when a connection is there, read what came. */
static void broker_read(struct fx *f)
{
	ssize_t n;

	if (f->bfd < 0) {
		f->bfd = accept4(f->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (f->bfd < 0)
			return;
	}
	n = recv(f->bfd, f->rx + f->rxlen, sizeof(f->rx) - f->rxlen, MSG_DONTWAIT);
	if (n > 0)
		f->rxlen += (size_t)n;
}

/* Run the loop until PRED(f) or LIMIT_MS pass; returns PRED's last value. */
static bool run_until(struct fx *f, bool (*pred)(struct fx *), int limit_ms)
{
	uint64_t end = clock_mono_ms() + (uint64_t)limit_ms;

	while (!pred(f) && clock_mono_ms() < end) {
		loop_once(f, 5);
		broker_read(f);
	}
	return pred(f);
}

/* Complete frames the link sent and the broker has not handled yet. */
static int take_frames(struct fx *f, struct wire_frame *out, int max)
{
	size_t off = 0, used = 0;
	int k = 0;

	if (f->rxlen >= 8 && memcmp(f->rx, "AMQP", 4) == 0)
		off = used = 8;
	while (k < max && f->rxlen - off >= 7) {
		uint32_t size = (uint32_t)f->rx[off + 3] << 24 | (uint32_t)f->rx[off + 4] << 16 |
				(uint32_t)f->rx[off + 5] << 8 | f->rx[off + 6];
		if (f->rxlen - off < (size_t)size + 8)
			break;
		off += (size_t)size + 8;
		k++;
	}
	/* Parsed from a copy, which stays valid while the buffer moves on. */
	memcpy(f->copy, f->rx + used, off - used);
	recycle_amqp_pool(&f->pool);
	k = wire_parse(f->copy, off - used, out, k, &f->pool);
	assert_true(k >= 0);
	memmove(f->rx, f->rx + off, f->rxlen - off);
	f->rxlen -= off;
	for (int i = 0; i < k; i++)
		if (out[i].type == 1 && out[i].id == AMQP_BASIC_PUBLISH_METHOD)
			f->publishes++;
	return k;
}

static void broker_send(struct fx *f, struct wire_buf *b)
{
	assert_int_equal(send(f->bfd, b->p, b->len, MSG_NOSIGNAL), (ssize_t)b->len);
	wire_buf_free(b);
}

static bool got_header(struct fx *f)
{
	return f->bfd >= 0 && f->rxlen >= 8;
}

static bool got_frames(struct fx *f)
{
	return f->rxlen > 0;
}

static bool is_up(struct fx *f)
{
	return upstream_is_up(f->up);
}

/* Expect method ID next from the link (waiting for it). */
static void expect_method(struct fx *f, amqp_method_number_t id)
{
	struct wire_frame fr[4];

	assert_true(run_until(f, got_frames, 3000));
	/* A frame may still be arriving: wait until it is whole. */
	for (int i = 0; i < 100 && take_frames(f, fr, 1) == 0; i++)
		run_until(f, got_frames, 50);
	assert_int_equal(fr[0].type, 1);
	assert_int_equal(fr[0].id, id);
}

static void handshake(struct fx *f)
{
	struct wire_buf b = { 0 };
	amqp_connection_start_t st = { .version_major = 0, .version_minor = 9 };
	amqp_connection_tune_t tu = { .channel_max = 2047, .frame_max = 131072, .heartbeat = 0 };
	amqp_connection_open_ok_t ook = { .known_hosts = amqp_cstring_bytes("") };
	amqp_channel_open_ok_t cok = { .channel_id = amqp_cstring_bytes("") };
	amqp_confirm_select_ok_t sok = { 0 };
	int ups = f->ups;

	assert_true(run_until(f, got_header, 3000));
	assert_memory_equal(f->rx, "AMQP\0\0\x09\x01", 8);
	memmove(f->rx, f->rx + 8, f->rxlen - 8);
	f->rxlen -= 8;
	st.mechanisms = amqp_cstring_bytes("PLAIN");
	st.locales = amqp_cstring_bytes("en_US");
	wire_method(&b, 0, AMQP_CONNECTION_START_METHOD, &st);
	broker_send(f, &b);
	expect_method(f, AMQP_CONNECTION_START_OK_METHOD);
	wire_method(&b, 0, AMQP_CONNECTION_TUNE_METHOD, &tu);
	broker_send(f, &b);
	expect_method(f, AMQP_CONNECTION_TUNE_OK_METHOD);
	expect_method(f, AMQP_CONNECTION_OPEN_METHOD);
	wire_method(&b, 0, AMQP_CONNECTION_OPEN_OK_METHOD, &ook);
	broker_send(f, &b);
	expect_method(f, AMQP_CHANNEL_OPEN_METHOD);
	wire_method(&b, 1, AMQP_CHANNEL_OPEN_OK_METHOD, &cok);
	broker_send(f, &b);
	expect_method(f, AMQP_CONFIRM_SELECT_METHOD);
	assert_false(upstream_is_up(f->up));
	wire_method(&b, 1, AMQP_CONFIRM_SELECT_OK_METHOD, &sok);
	broker_send(f, &b);
	assert_true(run_until(f, is_up, 3000));
	assert_int_equal(f->ups, ups + 1);
}

static void ack(struct fx *f, uint64_t tag, bool multiple, bool is_ack)
{
	struct wire_buf b = { 0 };

	if (is_ack) {
		amqp_basic_ack_t a = { .delivery_tag = tag, .multiple = multiple };
		wire_method(&b, 1, AMQP_BASIC_ACK_METHOD, &a);
	} else {
		amqp_basic_nack_t a = { .delivery_tag = tag, .multiple = multiple };
		wire_method(&b, 1, AMQP_BASIC_NACK_METHOD, &a);
	}
	broker_send(f, &b);
}

static int want_publishes, want_confirmed;

static bool seen_publishes(struct fx *f)
{
	struct wire_frame fr[64];

	take_frames(f, fr, 64);
	return f->publishes >= want_publishes;
}

static bool seen_confirmed(struct fx *f)
{
	return f->nconfirmed >= want_confirmed;
}

static void test_window_and_out_of_order_confirms(void **state)
{
	struct fx *f = *state;
	struct upstream_stats st;

	handshake(f);
	for (uint64_t i = 1; i <= 20; i++)
		enqueue(f, 100 + i);
	/* The window: 8 published, the rest waits in the proxy. */
	want_publishes = 8;
	assert_true(run_until(f, seen_publishes, 3000));
	run_until(f, seen_publishes, 100);
	assert_int_equal(f->publishes, 8);
	assert_int_equal(f->nqueue, 12);
	/* 3 then 2 settle nothing: 1 is still out. */
	ack(f, 3, false, true);
	ack(f, 2, false, false);
	run_until(f, seen_confirmed, 200);
	assert_int_equal(f->nconfirmed, 0);
	/* 1 settles 1, 2 (nacked) and 3, in that order. */
	ack(f, 1, false, true);
	want_confirmed = 3;
	assert_true(run_until(f, seen_confirmed, 3000));
	assert_int_equal(f->confirmed[0], 101);
	assert_int_equal(f->confirmed[1], 102);
	assert_false(f->acked[1]);
	assert_int_equal(f->confirmed[2], 103);
	/* Room for three more. */
	want_publishes = 11;
	assert_true(run_until(f, seen_publishes, 3000));
	/* One multiple ack settles everything up to 11. */
	ack(f, 11, true, true);
	want_confirmed = 11;
	assert_true(run_until(f, seen_confirmed, 3000));
	for (int i = 0; i < 11; i++)
		assert_int_equal(f->confirmed[i], 101 + (uint64_t)i);
	upstream_get_stats(f->up, &st);
	assert_int_equal(st.acked, 10);
	assert_int_equal(st.nacked, 1);
	assert_true(st.writes > 0 && st.reads > 0);
}

static bool is_down(struct fx *f)
{
	return f->downs > 0;
}

static void test_link_loss_hands_back_oldest_first(void **state)
{
	struct fx *f = *state;
	struct upstream_stats st;

	handshake(f);
	for (uint64_t i = 1; i <= 5; i++)
		enqueue(f, i);
	want_publishes = 5;
	assert_true(run_until(f, seen_publishes, 3000));
	ack(f, 2, true, true);
	want_confirmed = 2;
	assert_true(run_until(f, seen_confirmed, 3000));
	/* The broker goes away with 3, 4, 5 unconfirmed. */
	close(f->bfd);
	f->bfd = -1;
	assert_true(run_until(f, is_down, 3000));
	assert_int_equal(f->nrequeued, 3);
	assert_int_equal(f->nqueue, 3);
	for (int i = 0; i < 3; i++)
		assert_int_equal(f->queue[i]->guest_tag, 3 + (uint64_t)i);
	upstream_get_stats(f->up, &st);
	assert_int_equal(st.republished, 3);
	assert_false(st.up);
	assert_true(st.last_error[0] != '\0');
	/* It comes back by itself and publishes them again, in order. */
	f->rxlen = 0;
	f->publishes = 0;
	handshake(f);
	want_publishes = 3;
	assert_true(run_until(f, seen_publishes, 3000));
	ack(f, 3, true, true);
	want_confirmed = 5;
	assert_true(run_until(f, seen_confirmed, 3000));
	assert_int_equal(f->confirmed[2], 3);
	assert_int_equal(f->confirmed[4], 5);
}

static void test_silent_broker_times_out(void **state)
{
	struct fx *f = *state;
	struct upstream_stats st;
	uint64_t t0 = clock_mono_ms();

	/* Accepted, never answered: the handshake deadline ends the attempt. */
	assert_true(run_until(f, got_header, 3000));
	while (clock_mono_ms() - t0 < 4000) {
		loop_once(f, 20);
		upstream_get_stats(f->up, &st);
		if (st.last_error[0])
			break;
	}
	assert_non_null(strstr(st.last_error, "no progress"));
	assert_non_null(strstr(st.last_error, "connect_timeout_ms"));
	assert_false(st.up);
	assert_int_equal(f->ups, 0);
}

static int want_downs;

static bool seen_downs(struct fx *f)
{
	return f->downs >= want_downs;
}

/* The broker's end of a connection the link gave up: the next connect is
 * accepted afresh. */
static void broker_hang_up(struct fx *f)
{
	close(f->bfd);
	f->bfd = -1;
	f->rxlen = 0;
	f->publishes = 0;
}

/* A broker that takes the login and refuses the publishes (channel.close
 * 403): the link is unable to publish (guests are blocked) from that first
 * refusal, stays so over a reconnect whose republished messages are not
 * confirmed yet, and is able again at the first confirm. A link lost after
 * that, with a confirm in its session, reconnects at once: not unable. */
static void test_refusal_makes_the_link_unable_until_a_confirm(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = { 0 };
	amqp_channel_close_t cc = { .reply_code = 403,
				    .reply_text = amqp_cstring_bytes("ACCESS_REFUSED - no write") };

	handshake(f);
	enqueue(f, 1);
	enqueue(f, 2);
	want_publishes = 2;
	assert_true(run_until(f, seen_publishes, 3000));
	wire_method(&b, 1, AMQP_CHANNEL_CLOSE_METHOD, &cc);
	broker_send(f, &b);
	want_downs = 1;
	assert_true(run_until(f, seen_downs, 3000));
	assert_int_equal(f->unables, 1);
	assert_int_equal(f->unable_code, 403);
	assert_int_equal(f->ables, 0);
	broker_hang_up(f);

	/* Up again, the two republished: not proven until confirmed. */
	handshake(f);
	assert_true(run_until(f, seen_publishes, 3000));
	assert_int_equal(f->ables, 0);
	ack(f, 2, true, true);
	want_confirmed = 2;
	assert_true(run_until(f, seen_confirmed, 3000));
	assert_int_equal(f->ables, 1);

	/* Lost after a session that worked: one failure is not enough. */
	broker_hang_up(f);
	want_downs = 2;
	assert_true(run_until(f, seen_downs, 3000));
	assert_int_equal(f->unables, 1);
	handshake(f);
	assert_int_equal(f->unables, 1);
	assert_int_equal(f->ables, 1);
}

/* A broker that hangs up in the handshake: unable (code 0) at that first
 * failed attempt, able again as soon as a link is up with nothing waiting
 * to prove it. */
static void test_failed_connect_makes_the_link_unable_until_up(void **state)
{
	struct fx *f = *state;
	struct upstream_stats st;

	assert_true(run_until(f, got_header, 3000));
	broker_hang_up(f);
	for (int i = 0; i < 600 && f->unables == 0; i++)
		loop_once(f, 5);
	assert_int_equal(f->unables, 1);
	assert_int_equal(f->unable_code, 0);
	upstream_get_stats(f->up, &st);
	assert_false(st.up);
	assert_int_equal(f->ables, 0);
	handshake(f);
	assert_int_equal(f->ables, 1);
	assert_int_equal(f->unables, 1);
}

static bool seen_block(struct fx *f)
{
	return f->blocks > 0;
}

static bool seen_unblock(struct fx *f)
{
	return f->unblocks > 0;
}

static bool seen_second_block(struct fx *f)
{
	return f->blocks > 1;
}

/* A broker's resource alarm (connection.blocked): the owner hears it once
 * and the link publishes nothing while it lasts; connection.unblocked ends
 * it and what waited is published. A link lost while blocked is unblocked
 * for the owner (the next one has not been blocked). */
static void test_broker_block_reaches_the_owner(void **state)
{
	struct fx *f = *state;
	struct wire_buf b = { 0 };
	amqp_connection_blocked_t bl = { .reason = amqp_cstring_bytes("low on memory") };
	amqp_connection_unblocked_t ub = { 0 };
	struct wire_frame fr[64];

	handshake(f);
	enqueue(f, 1);
	want_publishes = 1;
	assert_true(run_until(f, seen_publishes, 3000));
	wire_method(&b, 0, AMQP_CONNECTION_BLOCKED_METHOD, &bl);
	wire_method(&b, 0, AMQP_CONNECTION_BLOCKED_METHOD, &bl); /* said twice */
	broker_send(f, &b);
	assert_true(run_until(f, seen_block, 3000));
	enqueue(f, 2);
	for (int i = 0; i < 20; i++) {
		loop_once(f, 1);
		broker_read(f);
		take_frames(f, fr, 64);
	}
	assert_int_equal(f->publishes, 1);
	assert_int_equal(f->blocks, 1);
	assert_int_equal(f->unblocks, 0);

	wire_method(&b, 0, AMQP_CONNECTION_UNBLOCKED_METHOD, &ub);
	broker_send(f, &b);
	assert_true(run_until(f, seen_unblock, 3000));
	want_publishes = 2;
	assert_true(run_until(f, seen_publishes, 3000));
	assert_int_equal(f->blocks, 1);

	wire_method(&b, 0, AMQP_CONNECTION_BLOCKED_METHOD, &bl);
	broker_send(f, &b);
	assert_true(run_until(f, seen_second_block, 3000));
	broker_hang_up(f);
	want_downs = 1;
	assert_true(run_until(f, seen_downs, 3000));
	assert_int_equal(f->blocks, 2);
	assert_int_equal(f->unblocks, 2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_window_and_out_of_order_confirms, setup, teardown),
		cmocka_unit_test_setup_teardown(test_link_loss_hands_back_oldest_first, setup, teardown),
		cmocka_unit_test_setup_teardown(test_silent_broker_times_out, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refusal_makes_the_link_unable_until_a_confirm,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_broker_block_reaches_the_owner, setup, teardown),
		cmocka_unit_test_setup_teardown(test_failed_connect_makes_the_link_unable_until_up,
						setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
