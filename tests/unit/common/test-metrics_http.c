/* test-metrics_http.c -- the listen address of a metrics endpoint: numeric
 * IPv4 and a port in range, nothing else; a second server on a taken
 * address fails cleanly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics_http.h"

static char *render(void *ud)
{
	return strdup(ud);
}

static void test_parse(void **state)
{
	struct sockaddr_in sa;

	assert_int_equal(metrics_http_parse_listen("127.0.0.1:9464", &sa), 0);
	assert_int_equal(ntohs(sa.sin_port), 9464);
	assert_int_equal(ntohl(sa.sin_addr.s_addr), 0x7f000001);
	assert_int_equal(metrics_http_parse_listen("0.0.0.0:1", &sa), 0);
	assert_int_equal(metrics_http_parse_listen("localhost:9464", &sa), -EINVAL);
	assert_int_equal(metrics_http_parse_listen("127.0.0.1:0", &sa), -EINVAL);
	assert_int_equal(metrics_http_parse_listen("127.0.0.1:65536", &sa), -EINVAL);
	assert_int_equal(metrics_http_parse_listen("127.0.0.1:80x", &sa), -EINVAL);
	assert_int_equal(metrics_http_parse_listen("127.0.0.1", &sa), -EINVAL);
	assert_int_equal(metrics_http_parse_listen(NULL, &sa), -EINVAL);
}

static void test_address_in_use(void **state)
{
	struct metrics_http *a = NULL, *b = NULL;
	char listen[32];
	int r = -1;

	/* Find a free port by trying a few. */
	for (int port = 39464; port < 39564 && r < 0; port++) {
		snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
		r = metrics_http_start(listen, render, "x 1\n", &a);
	}
	assert_int_equal(r, 0);
	assert_int_equal(metrics_http_start(listen, render, "x 1\n", &b), -EADDRINUSE);
	assert_null(b);
	metrics_http_stop(a);
	metrics_http_stop(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse),
		cmocka_unit_test(test_address_in_use),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
