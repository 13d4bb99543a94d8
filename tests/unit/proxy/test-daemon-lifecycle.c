/* test-daemon-lifecycle.c -- the whole daemon in-process, with libvirt's test
 * driver: a guest connected through its VM's Unix socket is closed with
 * 320 CONNECTION_FORCED when its domain is destroyed, and another VM's
 * connection is not touched. In-process because the test driver keeps its
 * state private to each libvirt connection: the destroy must happen on the
 * daemon's own. No broker is needed: the upstream link just keeps retrying. */
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
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"
#include "log.h"
#include "vm_identity.h"

static char dir[] = "/tmp/vmproxy-lifecycle-XXXXXX";
static char sock_a[200], sock_b[200];

static void *run(void *arg)
{
	vmproxy_run(arg);
	return NULL;
}

static amqp_connection_state_t guest_connect(const char *path)
{
	amqp_connection_state_t c = amqp_new_connection();
	amqp_socket_t *s = amqp_tcp_socket_new(c);
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	amqp_rpc_reply_t r;

	strcpy(sun.sun_path, path);
	assert_int_equal(connect(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
	amqp_tcp_socket_set_sockfd(s, fd);
	r = amqp_login(c, "/", 16, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
	assert_int_equal(r.reply_type, AMQP_RESPONSE_NORMAL);
	amqp_channel_open(c, 1);
	r = amqp_get_rpc_reply(c);
	assert_int_equal(r.reply_type, AMQP_RESPONSE_NORMAL);
	return c;
}

static void test_destroyed_domain_closes_its_connections(void **state)
{
	const char *node = getenv("VMPROXY_TEST_NODE_XML");
	char cfgpath[256], err[600];
	struct proxy_config *cfg;
	struct vmproxy *p;
	amqp_connection_state_t a, b;
	amqp_frame_t f;
	struct timeval tv = { 10, 0 };
	pthread_t tid;
	struct stat st;
	FILE *fp;

	assert_non_null(node);
	assert_non_null(mkdtemp(dir));
	snprintf(sock_a, sizeof(sock_a), "%s/a.sock", dir);
	snprintf(sock_b, sizeof(sock_b), "%s/b.sock", dir);
	snprintf(cfgpath, sizeof(cfgpath), "%s/vmproxyd.json", dir);
	fp = fopen(cfgpath, "w");
	assert_non_null(fp);
	fprintf(fp,
		"{\"listeners\": [{\"type\": \"unix\", \"path\": \"%s\", \"vm\": \"guest-a\"},"
		" {\"type\": \"unix\", \"path\": \"%s\", \"vm\": \"guest-b\", \"mode\": \"0600\"}],"
		" \"identity\": {\"libvirt_uri\": \"test://%s\", \"libvirt_read_write\": true},"
		" \"threads\": {\"count\": 1},"
		" \"upstream\": {\"host\": \"127.0.0.1\", \"port\": 9, \"exchange\": \"vm.metrics\","
		" \"auth\": {\"mechanism\": \"PLAIN\", \"user\": \"u\", \"password\": \"p\"}},"
		" \"guest\": {\"allowed_exchanges\": [\"metrics\"]}}",
		sock_a, sock_b, node);
	fclose(fp);

	assert_int_equal(proxy_config_load(cfgpath, &cfg, err, sizeof(err)), 0);
	assert_int_equal(vmproxy_new(cfg, &p), 0);
	if (vmproxy_start(p, err, sizeof(err)) < 0)
		fail_msg("start: %s", err);
	assert_int_equal(pthread_create(&tid, NULL, run, p), 0);

	/* Socket modes are the configured ones (default 0660), whatever the umask. */
	assert_int_equal(stat(sock_a, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0660);
	assert_int_equal(stat(sock_b, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0600);

	a = guest_connect(sock_a);
	b = guest_connect(sock_b);

	assert_int_equal(vm_identity_destroy_domain(vmproxy_identity(p), "guest-a"), 0);

	/* The proxy closes guest-a's connection with 320 (bounded wait). */
	for (;;) {
		int r = amqp_simple_wait_frame_noblock(a, &f, &tv);
		assert_int_equal(r, AMQP_STATUS_OK);
		if (f.frame_type == AMQP_FRAME_METHOD &&
		    f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD)
			break;
	}
	assert_int_equal(((amqp_connection_close_t *)f.payload.method.decoded)->reply_code, 320);

	/* guest-b is untouched: a round trip on a new channel still works. */
	amqp_channel_open(b, 2);
	assert_int_equal(amqp_get_rpc_reply(b).reply_type, AMQP_RESPONSE_NORMAL);

	amqp_destroy_connection(a);
	amqp_connection_close(b, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(b);
	vmproxy_stop(p);
	pthread_join(tid, NULL);
	vmproxy_free(p);
	unlink(cfgpath);
	rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_destroyed_domain_closes_its_connections),
	};

	log_init("test-daemon-lifecycle", LOG_LEVEL_WARN);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
