/* test-spool.c -- the agent's spool: in order, removed only when told,
 * survives a reopen (agent restart), bounded (oldest dropped and counted),
 * unreadable files removed, sequence persisted per boot. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "spool.h"

static char dir[64];

static int setup(void **state)
{
	snprintf(dir, sizeof(dir), "/tmp/vmproxy-spool-XXXXXX");
	return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd);
}

static void expect_peek(struct spool *sp, const char *want, char *name)
{
	char *data;
	size_t len;

	assert_int_equal(spool_peek(sp, &data, &len, name, 80), 0);
	assert_int_equal(len, strlen(want));
	assert_memory_equal(data, want, len);
	free(data);
}

static void test_order_and_reopen(void **state)
{
	struct spool *sp;
	char name[80];

	assert_int_equal(spool_open(dir, 1 << 20, &sp), 0);
	assert_int_equal(spool_put(sp, 1000, 1, "one", 3), 0);
	assert_int_equal(spool_put(sp, 1000, 2, "two", 3), 0);
	assert_int_equal(spool_put(sp, 2000, 3, "three", 5), 0);
	expect_peek(sp, "one", name);
	/* Not removed until confirmed: peek again gives the same. */
	expect_peek(sp, "one", name);
	assert_int_equal(spool_remove(sp, name), 0);
	spool_close(sp);

	assert_int_equal(spool_open(dir, 1 << 20, &sp), 0);
	assert_int_equal(spool_count(sp), 2);
	assert_int_equal(spool_bytes(sp), 8);
	expect_peek(sp, "two", name);
	assert_int_equal(spool_remove(sp, name), 0);
	expect_peek(sp, "three", name);
	assert_int_equal(spool_remove(sp, name), 0);
	assert_int_equal(spool_peek(sp, &(char *){ NULL }, &(size_t){ 0 }, name, 80), -ENOENT);
	spool_close(sp);
}

static void test_bound_drops_oldest(void **state)
{
	struct spool *sp;
	char name[80], data[100], data_str[101];

	memset(data, 'x', sizeof(data));
	memcpy(data_str, data, sizeof(data));
	data_str[100] = '\0';
	assert_int_equal(spool_open(dir, 350, &sp), 0);
	for (int i = 1; i <= 5; i++)
		assert_int_equal(spool_put(sp, 1000, (uint64_t)i, data, sizeof(data)), 0);
	/* 350 bytes hold 3 samples of 100: the 2 oldest went. */
	assert_int_equal(spool_count(sp), 3);
	assert_int_equal(spool_dropped(sp), 2);
	assert_true(spool_bytes(sp) <= 350);
	expect_peek(sp, data_str, name);
	assert_non_null(strstr(name, "-000000000003.json"));
	assert_int_equal(spool_put(sp, 1000, 9, data, sizeof(data)), 0);
	assert_int_equal(spool_count(sp), 3);
	assert_int_equal(spool_dropped(sp), 3);
	spool_close(sp);
}

static void test_too_big(void **state)
{
	struct spool *sp;
	char data[200] = { 0 };

	assert_int_equal(spool_open(dir, 100, &sp), 0);
	assert_int_equal(spool_put(sp, 1, 1, data, sizeof(data)), -EFBIG);
	spool_close(sp);
}

static void test_unreadable_removed(void **state)
{
	struct spool *sp;
	char path[160], name[80];
	FILE *f;

	snprintf(path, sizeof(path), "%s/0000000000000001-000000000001.json", dir);
	f = fopen(path, "w"); /* empty: unreadable as a sample */
	fclose(f);
	assert_int_equal(spool_open(dir, 1 << 20, &sp), 0);
	assert_int_equal(spool_put(sp, 5000, 2, "ok", 2), 0);
	expect_peek(sp, "ok", name);
	assert_int_equal(spool_dropped(sp), 1);
	spool_close(sp);
}

static void test_seq_per_boot(void **state)
{
	struct spool *sp;

	assert_int_equal(spool_open(dir, 1 << 20, &sp), 0);
	assert_int_equal(spool_load_seq(sp, "boot-a"), 0);
	assert_int_equal(spool_save_seq(sp, "boot-a", 41), 0);
	spool_close(sp);
	assert_int_equal(spool_open(dir, 1 << 20, &sp), 0);
	assert_int_equal(spool_load_seq(sp, "boot-a"), 41);
	assert_int_equal(spool_load_seq(sp, "boot-b"), 0); /* a new boot starts over */
	spool_close(sp);
}

/* The agent spools a sample, then saves its seq. Killed in between, the
 * next run continues after the spooled sample: no seq skipped or reused. */
static void test_seq_after_crash_between_spool_and_state(void **state)
{
	static const char a42[] = "{\"boot_id\":\"boot-a\",\"seq\":42}";
	struct spool *sp;

	assert_int_equal(spool_open(dir, 1 << 20, &sp), 0);
	assert_int_equal(spool_save_seq(sp, "boot-a", 41), 0);
	assert_int_equal(spool_put(sp, 1000, 42, a42, strlen(a42)), 0);
	spool_close(sp); /* the crash: state still says 41 */
	assert_int_equal(spool_open(dir, 1 << 20, &sp), 0);
	assert_int_equal(spool_load_seq(sp, "boot-a"), 42);
	/* A sample of another boot does not move this boot's sequence. */
	assert_int_equal(spool_load_seq(sp, "boot-b"), 0);
	spool_close(sp);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_order_and_reopen, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bound_drops_oldest, setup, teardown),
		cmocka_unit_test_setup_teardown(test_too_big, setup, teardown),
		cmocka_unit_test_setup_teardown(test_seq_after_crash_between_spool_and_state, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_unreadable_removed, setup, teardown),
		cmocka_unit_test_setup_teardown(test_seq_per_boot, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
