/* test-backoff.c -- delays stay within [ceiling/2, ceiling], grow to the cap, reset. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "backoff.h"

static void test_grows_and_caps(void **state)
{
	struct backoff b;
	uint32_t ceiling = 100;

	backoff_init(&b, 100, 5000, 42);
	for (int i = 0; i < 20; i++) {
		uint32_t d = backoff_next(&b);
		assert_in_range(d, ceiling / 2, ceiling);
		ceiling = ceiling * 2 > 5000 ? 5000 : ceiling * 2;
	}
	assert_int_equal(b.ceiling_ms, 5000);
}

static void test_reset(void **state)
{
	struct backoff b;

	backoff_init(&b, 200, 10000, 7);
	for (int i = 0; i < 10; i++)
		backoff_next(&b);
	backoff_reset(&b);
	assert_in_range(backoff_next(&b), 100, 200);
}

static void test_jitter_varies(void **state)
{
	struct backoff b;
	uint32_t first, differ = 0;

	backoff_init(&b, 1000, 1000, 3);
	first = backoff_next(&b);
	for (int i = 0; i < 50; i++)
		differ += backoff_next(&b) != first;
	assert_true(differ > 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_grows_and_caps),
		cmocka_unit_test(test_reset),
		cmocka_unit_test(test_jitter_varies),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
