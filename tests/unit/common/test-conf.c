/* test-conf.c -- configuration errors name the file, the key path and the expectation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "conf.h"

static char *write_tmp(const char *text)
{
	char *path = strdup("/tmp/test-conf-XXXXXX");
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
	return path;
}

static void test_syntax_error_has_line(void **state)
{
	char *path = write_tmp("{\n  \"a\": 1,\n  \"b\": \n}\n");
	struct conf_ctx c;
	json_t *root = NULL;

	conf_ctx_init(&c, path);
	assert_int_equal(conf_load_file(&c, &root), -22);
	assert_non_null(strstr(c.err, path));
	assert_non_null(strstr(c.err, "line 4"));
	unlink(path);
	free(path);
}

static void test_not_object(void **state)
{
	char *path = write_tmp("[1,2]");
	struct conf_ctx c;
	json_t *root = NULL;

	conf_ctx_init(&c, path);
	assert_int_equal(conf_load_file(&c, &root), -22);
	assert_non_null(strstr(c.err, "expected an object, got an array"));
	unlink(path);
	free(path);
}

static void test_typed_getters(void **state)
{
	json_t *root = json_loads("{\"up\":{\"port\":70000,\"host\":5,\"tls\":\"yes\","
				  "\"mech\":\"CRAM\",\"ok\":12}}", 0, NULL);
	json_t *up = json_object_get(root, "up");
	const char *const mechs[] = { "PLAIN", "EXTERNAL", NULL };
	struct conf_ctx c;
	uint64_t u = 0;
	const char *s = NULL;
	bool b;
	unsigned e;

	conf_ctx_init(&c, "x.json");
	assert_int_equal(conf_get_uint(&c, up, "up", "port", true, 1, 65535, &u), -22);
	assert_string_equal(c.err, "x.json: up.port: expected an integer in [1, 65535], got 70000");

	conf_ctx_init(&c, "x.json");
	assert_int_equal(conf_get_string(&c, up, "up", "host", true, &s), -22);
	assert_string_equal(c.err, "x.json: up.host: expected a string, got an integer");

	conf_ctx_init(&c, "x.json");
	assert_int_equal(conf_get_bool(&c, up, "up", "tls", false, &b), -22);
	assert_string_equal(c.err, "x.json: up.tls: expected true or false, got a string");

	conf_ctx_init(&c, "x.json");
	assert_int_equal(conf_get_enum(&c, up, "up", "mech", true, mechs, &e), -22);
	assert_string_equal(c.err,
			    "x.json: up.mech: expected one of \"PLAIN\", \"EXTERNAL\", got \"CRAM\"");

	conf_ctx_init(&c, "x.json");
	assert_int_equal(conf_get_string(&c, up, "up", "vhost", true, &s), -22);
	assert_string_equal(c.err, "x.json: up.vhost: missing required key");

	conf_ctx_init(&c, "x.json");
	u = 99;
	assert_int_equal(conf_get_uint(&c, up, "up", "absent", false, 0, 10, &u), 0);
	assert_int_equal(u, 99);
	assert_int_equal(conf_get_uint(&c, up, "up", "ok", true, 0, 100, &u), 0);
	assert_int_equal(u, 12);
	json_decref(root);
}

static void test_unknown_key(void **state)
{
	json_t *root = json_loads("{\"threads\":{\"count\":2,\"cpu\":[0]}}", 0, NULL);
	const char *const allowed[] = { "count", "cpus", NULL };
	struct conf_ctx c;

	conf_ctx_init(&c, "/etc/vmproxyd.json");
	assert_int_equal(conf_check_keys(&c, json_object_get(root, "threads"), "threads", allowed),
			 -22);
	assert_string_equal(c.err, "/etc/vmproxyd.json: threads.cpu: unknown key");
	json_decref(root);
}

/* A key or value from the file with an escaped newline or another control
 * byte: the error stays one line, the byte shown as '?'. */
static void test_error_stays_one_line(void **state)
{
	json_t *root =
		json_loads("{\"threads\":{\"co\\nunt\":2,\"mode\":\"a\\u001bb\"}}", 0, NULL);
	const char *const allowed[] = { "mode", NULL };
	const char *const modes[] = { "x", NULL };
	struct conf_ctx c;
	unsigned m;

	assert_non_null(root);
	conf_ctx_init(&c, "/etc/vmproxyd.json");
	assert_int_equal(conf_check_keys(&c, json_object_get(root, "threads"), "threads", allowed),
			 -22);
	assert_string_equal(c.err, "/etc/vmproxyd.json: threads.co?unt: unknown key");
	conf_ctx_init(&c, "/etc/vmproxyd.json");
	assert_int_equal(conf_get_enum(&c, json_object_get(root, "threads"), "threads", "mode",
				       false, modes, &m),
			 -22);
	assert_string_equal(c.err,
			    "/etc/vmproxyd.json: threads.mode: expected one of \"x\", got \"a?b\"");
	json_decref(root);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_syntax_error_has_line),
		cmocka_unit_test(test_not_object),
		cmocka_unit_test(test_typed_getters),
		cmocka_unit_test(test_unknown_key),
		cmocka_unit_test(test_error_stays_one_line),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
