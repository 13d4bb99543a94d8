/* test-admin.c -- the admin protocol's error replies: bad JSON, not an
 * object, unknown command, missing arguments, oversized request. These
 * are answered before any poll thread is asked, so no daemon is needed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "admin.h"

static void expect_error(const char *req, size_t len, const char *needle)
{
	json_t *r = admin_handle_request(NULL, req, len);
	const char *err;

	assert_non_null(r);
	assert_true(json_is_false(json_object_get(r, "ok")));
	err = json_string_value(json_object_get(r, "error"));
	assert_non_null(err);
	if (!strstr(err, needle))
		fail_msg("error \"%s\" does not mention \"%s\"", err, needle);
	json_decref(r);
}

static void test_bad_json(void **state)
{
	expect_error("{\"command\": ", 12, "bad JSON");
	expect_error("", 0, "bad JSON");
}

static void test_not_an_object(void **state)
{
	expect_error("[1,2]", 5, "object with a string \"command\"");
	expect_error("{\"command\": 7}", 14, "object with a string \"command\"");
}

static void test_unknown_command(void **state)
{
	const char *req = "{\"command\": \"reboot\"}";

	expect_error(req, strlen(req), "unknown command \"reboot\"");
}

static void test_unknown_command_is_sanitized(void **state)
{
	const char *req = "{\"command\": \"a\\nb\\\"c\"}";
	json_t *r = admin_handle_request(NULL, req, strlen(req));
	const char *err = json_string_value(json_object_get(r, "error"));

	assert_non_null(err);
	assert_null(strchr(err, '\n'));
	json_decref(r);
}

/* jansson's error text quotes the bytes it stopped at: a raw newline of
 * the request must not reach the reply's one-line error. */
static void test_bad_json_error_is_sanitized(void **state)
{
	const char *req = "{\"command\": \"a\\u80a\nb\"}";
	json_t *r = admin_handle_request(NULL, req, strlen(req));
	const char *err = json_string_value(json_object_get(r, "error"));

	assert_non_null(err);
	assert_non_null(strstr(err, "bad JSON"));
	assert_null(strchr(err, '\n'));
	json_decref(r);
}

static void test_missing_arguments(void **state)
{
	const char *a = "{\"command\": \"migrate\", \"vm\": \"x\"}";
	const char *b = "{\"command\": \"migrate\", \"thread\": 1}";
	const char *c = "{\"command\": \"balancer\", \"enabled\": \"yes\"}";

	expect_error(a, strlen(a), "\"migrate\" needs");
	expect_error(b, strlen(b), "\"migrate\" needs");
	expect_error(c, strlen(c), "\"enabled\" must be true or false");
}

static void test_oversized(void **state)
{
	size_t n = ADMIN_MAX_REQUEST + 100;
	char *big = malloc(n);

	memset(big, ' ', n);
	memcpy(big, "{\"command\":\"status\"", 19);
	big[n - 1] = '}';
	expect_error(big, n, "request larger than 65536 bytes");
	free(big);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_bad_json),
		cmocka_unit_test(test_not_an_object),
		cmocka_unit_test(test_unknown_command),
		cmocka_unit_test(test_unknown_command_is_sanitized),
		cmocka_unit_test(test_bad_json_error_is_sanitized),
		cmocka_unit_test(test_missing_arguments),
		cmocka_unit_test(test_oversized),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
