/* test-poll_thread-vm_change.c -- what poll threads do with a VM's change notices
 * (poll_thread_vm_change). A VM-stopped notice addressed to the poll thread
 * that owned the VM when libvirt's event was handled, delivered after the
 * VM moved to another thread, still closes the VM's connections there with
 * 320 (it is forwarded to the new owner, not dropped). A VM migrating to
 * another host has its guests closed with 320 only once what was read from
 * them is settled, or at the bound, unacked. A changed CID closes the
 * connections made from the old one only. Two real poll threads with guests
 * on socketpairs; no broker (the links keep retrying, so what a guest
 * publishes stays held). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "helper.h"
#include "partition.h"
#include "poll_thread.h"

#define UUID "0b5e0c1a-7a3e-4f55-9d1e-000000000001"

static struct proxy_config *load_config(void)
{
	char dir[] = "/tmp/vmproxy-gone-order-XXXXXX";
	char path[256], err[600];
	struct proxy_config *cfg;
	FILE *fp;

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/vmproxyd.json", dir);
	fp = fopen(path, "w");
	assert_non_null(fp);
	fprintf(fp, "{\"listeners\": [{\"type\": \"tcp\", \"port\": 5672}],"
		    " \"identity\": {\"static\": [{\"address\": \"127.0.0.9\", \"vm\": \"a\","
		    " \"uuid\": \"" UUID "\"}]},"
		    " \"threads\": {\"count\": 2},"
		    " \"upstream\": {\"host\": \"127.0.0.1\", \"port\": 9, \"exchange\": \"x\","
		    " \"auth\": {\"mechanism\": \"PLAIN\", \"user\": \"u\", \"password\": \"p\"}},"
		    " \"guest\": {\"allowed_exchanges\": [\"metrics\"]}}");
	fclose(fp);
	if (proxy_config_load(path, &cfg, err, sizeof(err)) < 0)
		fail_msg("config: %s", err);
	unlink(path);
	rmdir(dir);
	return cfg;
}

static void migrate(struct poll_thread *from, unsigned to)
{
	struct migrate_result res;

	memset(&res, 0, sizeof(res));
	pthread_mutex_init(&res.lock, NULL);
	pthread_cond_init(&res.cond, NULL);
	assert_int_equal(poll_thread_migrate(from, UUID, to, 5000, &res), 0);
	pthread_mutex_lock(&res.lock);
	while (!res.done)
		pthread_cond_wait(&res.cond, &res.lock);
	pthread_mutex_unlock(&res.lock);
	if (res.status != 0)
		fail_msg("migrate: %s", res.msg);
	pthread_mutex_destroy(&res.lock);
	pthread_cond_destroy(&res.cond);
}

static void test_vm_gone_follows_the_vm(void **state)
{
	struct proxy_config *cfg = load_config();
	struct poll_shared sh;
	struct poll_thread *threads[2];
	struct partition *part;
	struct helper_pool *helpers;
	struct vm_info vm = { .uuid = UUID, .name = "a" };
	amqp_connection_state_t guest;
	amqp_socket_t *s;
	amqp_rpc_reply_t rr;
	amqp_frame_t f;
	struct timeval tv = {10, 0};
	unsigned owner, to;
	int sv[2];

	(void)state;
	assert_int_equal(partition_new(2, 16, &part), 0);
	assert_int_equal(helper_pool_new(1, &helpers), 0);
	memset(&sh, 0, sizeof(sh));
	sh.cfg = cfg;
	sh.partition = part;
	sh.helpers = helpers;
	sh.allowed_exchanges = (const char *const *)cfg->guest.allowed_exchanges;
	poll_thread_session_config(cfg, sh.allowed_exchanges, &sh.scfg);
	sh.threads = threads;
	sh.nthreads = 2;
	for (unsigned i = 0; i < 2; i++) {
		assert_int_equal(poll_thread_new(i, -1, &sh, &threads[i]), 0);
		assert_int_equal(poll_thread_start(threads[i]), 0);
	}

	/* A guest of VM UUID, delegated as the acceptor does. */
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	assert_int_equal(partition_assign_conn(part, UUID, 16, &owner), 0);
	assert_int_equal(poll_thread_delegate(threads[owner], sv[0], 1, &vm, "test"), 0);
	/* Every read of the guest's is bounded (the fd is a blocking one). */
	assert_int_equal(setsockopt(sv[1], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
	guest = amqp_new_connection();
	s = amqp_tcp_socket_new(guest);
	amqp_tcp_socket_set_sockfd(s, sv[1]);
	rr = amqp_login(guest, "/", 16, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
	assert_int_equal(rr.reply_type, AMQP_RESPONSE_NORMAL);

	/* The VM moves; then the notice libvirt's event thread addressed to
	 * the old owner (it looked the partition up before the move) arrives
	 * there. */
	to = 1 - owner;
	migrate(threads[owner], to);
	/* The new owner reports the move done once it has the VM; the old one
	 * moves the partition entry right after posting it there, so the
	 * entry may lag the report by a moment (bounded wait). */
	for (int i = 0; i < 5000 && partition_lookup(part, UUID, &owner) == 0 && owner != to; i++)
		usleep(1000);
	assert_int_equal(partition_lookup(part, UUID, &owner), 0);
	assert_int_equal(owner, to);
	assert_int_equal(poll_thread_vm_change(threads[1 - to], UUID, VM_STOPPED, 0, 0), 0);

	/* The guest is closed with 320 by its new owner. */
	assert_int_equal(amqp_simple_wait_frame_noblock(guest, &f, &tv), AMQP_STATUS_OK);
	assert_int_equal(f.frame_type, AMQP_FRAME_METHOD);
	assert_int_equal(f.payload.method.id, AMQP_CONNECTION_CLOSE_METHOD);
	assert_int_equal(((amqp_connection_close_t *)f.payload.method.decoded)->reply_code, 320);
	/* A guest that never answers close-ok is closed at the close-ok
	 * timeout (3 s), not kept: end of file before the 10 s read bound. */
	{
		char buf[64];
		ssize_t got;

		while ((got = recv(sv[1], buf, sizeof(buf), 0)) > 0)
			;
		assert_int_equal(got, 0);
	}
	amqp_destroy_connection(guest);

	for (unsigned i = 0; i < 2; i++)
		poll_thread_stop(threads[i]);
	helper_pool_free(helpers);
	for (unsigned i = 0; i < 2; i++)
		poll_thread_free(threads[i]);
	partition_free(part);
	proxy_config_free(cfg);
}

/* Two poll threads as the daemon runs them. */
struct rig {
	struct proxy_config *cfg;
	struct poll_shared sh;
	struct poll_thread *threads[2];
	struct partition *part;
	struct helper_pool *helpers;
};

static void rig_start(struct rig *r)
{
	r->cfg = load_config();
	assert_int_equal(partition_new(2, 16, &r->part), 0);
	assert_int_equal(helper_pool_new(1, &r->helpers), 0);
	memset(&r->sh, 0, sizeof(r->sh));
	r->sh.cfg = r->cfg;
	r->sh.partition = r->part;
	r->sh.helpers = r->helpers;
	r->sh.allowed_exchanges = (const char *const *)r->cfg->guest.allowed_exchanges;
	poll_thread_session_config(r->cfg, r->sh.allowed_exchanges, &r->sh.scfg);
	r->sh.threads = r->threads;
	r->sh.nthreads = 2;
	for (unsigned i = 0; i < 2; i++) {
		assert_int_equal(poll_thread_new(i, -1, &r->sh, &r->threads[i]), 0);
		assert_int_equal(poll_thread_start(r->threads[i]), 0);
	}
}

static void rig_stop(struct rig *r)
{
	for (unsigned i = 0; i < 2; i++)
		poll_thread_stop(r->threads[i]);
	helper_pool_free(r->helpers);
	for (unsigned i = 0; i < 2; i++)
		poll_thread_free(r->threads[i]);
	partition_free(r->part);
	proxy_config_free(r->cfg);
}

/* A logged-in guest of VM UUID from CID, with channel 1 open; *OWNER is
 * its thread. */
static amqp_connection_state_t rig_guest(struct rig *r, uint32_t conn_id, uint32_t cid,
					 unsigned *owner)
{
	struct timeval tv = {10, 0};
	struct vm_info vm = { .uuid = UUID, .name = "a", .cid = cid };
	amqp_connection_state_t g = amqp_new_connection();
	amqp_socket_t *s = amqp_tcp_socket_new(g);
	amqp_rpc_reply_t rr;
	int sv[2];

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	assert_int_equal(setsockopt(sv[1], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
	assert_int_equal(partition_assign_conn(r->part, UUID, 16, owner), 0);
	assert_int_equal(poll_thread_delegate(r->threads[*owner], sv[0], conn_id, &vm, "test"), 0);
	amqp_tcp_socket_set_sockfd(s, sv[1]);
	rr = amqp_login(g, "/", 16, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
	assert_int_equal(rr.reply_type, AMQP_RESPONSE_NORMAL);
	amqp_channel_open(g, 1);
	assert_int_equal(amqp_get_rpc_reply(g).reply_type, AMQP_RESPONSE_NORMAL);
	return g;
}

static void post_change(struct rig *r, unsigned thread, enum vm_change how, uint32_t cid,
			uint32_t settle_ms)
{
	assert_int_equal(poll_thread_vm_change(r->threads[thread], UUID, how, cid, settle_ms), 0);
}

/* The guest's next frame is connection.close with CODE. */
static void expect_close(amqp_connection_state_t g, uint16_t code)
{
	struct timeval tv = {10, 0};
	amqp_frame_t f;

	assert_int_equal(amqp_simple_wait_frame_noblock(g, &f, &tv), AMQP_STATUS_OK);
	assert_int_equal(f.frame_type, AMQP_FRAME_METHOD);
	assert_int_equal(f.payload.method.id, AMQP_CONNECTION_CLOSE_METHOD);
	assert_int_equal(((amqp_connection_close_t *)f.payload.method.decoded)->reply_code, code);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_migrating_away_settles_first(void **state)
{
	struct rig r;
	amqp_connection_state_t g;
	amqp_bytes_t body = amqp_cstring_bytes("{}");
	unsigned owner, tries = 0;
	double t0, took;

	(void)state;
	rig_start(&r);
	g = rig_guest(&r, 1, 0, &owner);
	amqp_confirm_select(g, 1);
	assert_int_equal(amqp_get_rpc_reply(g).reply_type, AMQP_RESPONSE_NORMAL);
	assert_int_equal(amqp_basic_publish(g, 1, amqp_cstring_bytes("metrics"),
					    amqp_cstring_bytes("k"), 0, 0, NULL, body),
			 AMQP_STATUS_OK);
	/* Read and held (no link to publish it on): the gauge says so. */
	while (atomic_load(&poll_thread_gauges(r.threads[owner])->held_messages) != 1 &&
	       tries++ < 1000)
		usleep(10000);
	assert_int_equal(atomic_load(&poll_thread_gauges(r.threads[owner])->held_messages), 1);
	t0 = now_s();
	post_change(&r, owner, VM_MIGRATING_AWAY, 0, 1500);
	/* Not closed while the message is unconfirmed: at the bound, with no
	 * ack before the close (the guest's retry carries it). */
	expect_close(g, 320);
	took = now_s() - t0;
	if (took < 1.4)
		fail_msg("closed after %.3f s, before the 1.5 s bound, with a message held", took);
	amqp_destroy_connection(g);
	rig_stop(&r);

	/* Nothing held (a VM that never published): closed at once. */
	rig_start(&r);
	g = rig_guest(&r, 2, 0, &owner);
	post_change(&r, owner, VM_MIGRATING_AWAY, 0, 60000);
	expect_close(g, 320);
	amqp_destroy_connection(g);
	rig_stop(&r);
}

static void test_cid_change_closes_the_old_cid(void **state)
{
	struct rig r;
	amqp_connection_state_t old, cur;
	unsigned owner, owner2;

	(void)state;
	rig_start(&r);
	old = rig_guest(&r, 1, 21, &owner);
	cur = rig_guest(&r, 2, 22, &owner2);
	assert_int_equal(owner, owner2);
	post_change(&r, owner, VM_CID_CHANGED, 22, 0);
	expect_close(old, 320);
	/* The guest on the VM's CID goes on. */
	amqp_channel_open(cur, 2);
	assert_int_equal(amqp_get_rpc_reply(cur).reply_type, AMQP_RESPONSE_NORMAL);
	amqp_destroy_connection(old);
	amqp_destroy_connection(cur);
	rig_stop(&r);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_vm_gone_follows_the_vm),
		cmocka_unit_test(test_migrating_away_settles_first),
		cmocka_unit_test(test_cid_change_closes_the_old_cid),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
