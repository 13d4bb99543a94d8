/* test-listener.c -- listener_open's errors name the endpoint and return the
 * errno of the call that failed, for every kind of endpoint; accept gives
 * -EAGAIN when nobody waits; a Unix socket path is replaced only when dead
 * and unlinked at close only while it is still the file bound. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "listener.h"

static char dir[] = "/tmp/test-listener-XXXXXX";

static uint16_t bound_port(int fd)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);

	assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
	return ntohs(sin.sin_port);
}

static void test_tcp_accept_and_eagain(void **state)
{
	struct listener_config lc = {.type = LISTENER_TCP, .address = "127.0.0.1", .port = 0};
	struct listener l;
	struct sockaddr_storage peer;
	struct sockaddr_in to = {.sin_family = AF_INET};
	socklen_t len;
	char err[256] = "";
	int fd, c, one = 0;
	socklen_t ol = sizeof(one);

	(void)state;
	assert_int_equal(listener_open(&lc, &l, err, sizeof(err)), 0);
	assert_string_equal(l.name, "tcp 127.0.0.1:0");
	assert_int_equal(listener_accept(&l, &fd, &peer, &len), -EAGAIN);

	c = socket(AF_INET, SOCK_STREAM, 0);
	to.sin_port = htons(bound_port(l.fd));
	to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(connect(c, (struct sockaddr *)&to, sizeof(to)), 0);
	/* The connection is complete once connect returned: accept has it. */
	assert_int_equal(listener_accept(&l, &fd, &peer, &len), 0);
	assert_int_equal(peer.ss_family, AF_INET);
	assert_int_equal(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, &ol), 0);
	assert_int_not_equal(one, 0);
	close(fd);
	close(c);
	listener_close(&l);
	assert_int_equal(l.fd, -1);
	listener_close(&l); /* twice is harmless */
}

static void test_tcp_errors(void **state)
{
	struct listener_config lc = {.type = LISTENER_TCP, .address = "127.0.0.1", .port = 0};
	struct listener a, b;
	char err[256] = "", want[256];

	(void)state;
	assert_int_equal(listener_open(&lc, &a, err, sizeof(err)), 0);
	lc.port = bound_port(a.fd);
	assert_int_equal(listener_open(&lc, &b, err, sizeof(err)), -EADDRINUSE);
	snprintf(want, sizeof(want), "tcp 127.0.0.1:%u: %s", lc.port, strerror(EADDRINUSE));
	assert_string_equal(err, want);
	assert_int_equal(b.fd, -1);
	listener_close(&b);
	listener_close(&a);

	/* An address this host does not have (TEST-NET-1: never assigned). */
	lc.address = "192.0.2.1";
	lc.port = 0;
	assert_int_equal(listener_open(&lc, &b, err, sizeof(err)), -EADDRNOTAVAIL);
	assert_string_equal(err, "tcp 192.0.2.1:0: Cannot assign requested address");

	lc.address = "localhost";
	assert_int_equal(listener_open(&lc, &b, err, sizeof(err)), -EINVAL);
	assert_string_equal(err, "tcp listener: \"localhost\" is not a numeric address");
}

static void test_vsock(void **state)
{
	struct listener_config lc = {.type = LISTENER_VSOCK, .port = 40123};
	struct listener a, b;
	char err[256] = "";
	int r;

	(void)state;
	r = listener_open(&lc, &a, err, sizeof(err));
	if (r == -EAFNOSUPPORT || r == -ENODEV) {
		/* The error still names the endpoint. */
		assert_non_null(strstr(err, "vsock port 40123: "));
		skip();
	}
	assert_int_equal(r, 0);
	assert_string_equal(a.name, "vsock port 40123");
	assert_int_equal(listener_open(&lc, &b, err, sizeof(err)), -EADDRINUSE);
	assert_string_equal(err, "vsock port 40123: Address already in use");
	listener_close(&a);
}

static void unix_config(struct listener_config *lc, const char *name)
{
	char *path;

	assert_true(asprintf(&path, "%s/%s", dir, name) > 0);
	*lc = (struct listener_config){.type = LISTENER_UNIX, .path = path, .mode = 0660};
}

static void test_unix_errors(void **state)
{
	struct listener_config lc;
	struct listener l;
	char err[256] = "", want[512], longname[200];
	FILE *f;

	(void)state;
	memset(longname, 'a', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = '\0';
	unix_config(&lc, longname);
	assert_int_equal(listener_open(&lc, &l, err, sizeof(err)), -ENAMETOOLONG);
	assert_non_null(strstr(err, ": path longer than 107 bytes"));
	free(lc.path);

	unix_config(&lc, "plain-file");
	f = fopen(lc.path, "w");
	assert_non_null(f);
	fclose(f);
	assert_int_equal(listener_open(&lc, &l, err, sizeof(err)), -EEXIST);
	snprintf(want, sizeof(want), "unix %s: exists and is not a socket", lc.path);
	assert_string_equal(err, want);
	unlink(lc.path);
	free(lc.path);

	unix_config(&lc, "grouped.sock");
	lc.group = "no-such-group-here";
	assert_int_equal(listener_open(&lc, &l, err, sizeof(err)), -ENOENT);
	snprintf(want, sizeof(want), "unix %s: no group \"no-such-group-here\"", lc.path);
	assert_string_equal(err, want);
	free(lc.path);

	/* A directory in the way of the path's parent. */
	unix_config(&lc, "plain-file/vm.sock");
	{
		char *parent;

		assert_true(asprintf(&parent, "%s/plain-file", dir) > 0);
		f = fopen(parent, "w");
		assert_non_null(f);
		fclose(f);
		assert_int_equal(listener_open(&lc, &l, err, sizeof(err)), -ENOTDIR);
		snprintf(want, sizeof(want), "unix %s: %s is not a directory", lc.path, parent);
		assert_string_equal(err, want);
		unlink(parent);
		free(parent);
	}
	free(lc.path);
}

static void test_unix_live_dead_and_close(void **state)
{
	struct listener_config lc;
	struct listener a, b;
	struct stat st;
	char err[256] = "", want[512];

	(void)state;
	unix_config(&lc, "sub/dir/vm1.sock");
	assert_int_equal(listener_open(&lc, &a, err, sizeof(err)), 0);
	assert_int_equal(stat(lc.path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0660);
	{
		char *d;

		assert_true(asprintf(&d, "%s/sub/dir", dir) > 0);
		assert_int_equal(stat(d, &st), 0);
		assert_int_equal(st.st_mode & 07777, 0770); /* mode plus search */
		free(d);
	}

	/* Live: a second listener does not take it over. */
	assert_int_equal(listener_open(&lc, &b, err, sizeof(err)), -EADDRINUSE);
	snprintf(want, sizeof(want),
	         "unix %s: a process is listening on this socket; not "
	         "replacing it",
	         lc.path);
	assert_string_equal(err, want);

	/* Dead (closed without unlink, as after a crash): replaced. */
	close(a.fd);
	a.fd = -1;
	assert_int_equal(listener_open(&lc, &b, err, sizeof(err)), 0);
	listener_close(&b);
	assert_int_equal(stat(lc.path, &st), -1);
	assert_int_equal(errno, ENOENT);

	/* Taken over while A is open (its file moved away, another bound on
	 * the path): A's close leaves the other one's socket alone. */
	assert_int_equal(listener_open(&lc, &a, err, sizeof(err)), 0);
	{
		char *moved;

		assert_true(asprintf(&moved, "%s.moved", lc.path) > 0);
		assert_int_equal(rename(lc.path, moved), 0);
		assert_int_equal(listener_open(&lc, &b, err, sizeof(err)), 0);
		listener_close(&a);
		assert_int_equal(stat(lc.path, &st), 0);
		assert_true(S_ISSOCK(st.st_mode));
		listener_close(&b);
		assert_int_equal(stat(lc.path, &st), -1);
		unlink(moved);
		free(moved);
	}
	free(lc.path);
}

static int teardown(void **state)
{
	char cmd[128];

	(void)state;
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_tcp_accept_and_eagain),
	        cmocka_unit_test(test_tcp_errors),
	        cmocka_unit_test(test_vsock),
	        cmocka_unit_test(test_unix_errors),
	        cmocka_unit_test(test_unix_live_dead_and_close),
	};

	if (!mkdtemp(dir))
		return 1;
	return cmocka_run_group_tests(tests, NULL, teardown);
}
