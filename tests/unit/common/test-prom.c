/* test-prom.c -- exposition text: families, labels, escaping, numbers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "prom.h"

static void test_family_and_samples(void **state)
{
	struct prom_buf b;

	prom_init(&b);
	prom_family(&b, "x_total", "counter", "Things.");
	prom_sample(&b, "x_total", 42, "thread", "0", NULL);
	prom_sample(&b, "x_total", 1.5, NULL);
	assert_false(b.oom);
	assert_string_equal(b.data, "# HELP x_total Things.\n# TYPE x_total counter\n"
				    "x_total{thread=\"0\"} 42\nx_total 1.5\n");
	prom_free(&b);
}

static void test_escaping_and_cap(void **state)
{
	struct prom_buf b;
	char longv[600];

	prom_init(&b);
	prom_sample(&b, "g", 1, "name", "a\"b\\c\nd", NULL);
	assert_string_equal(b.data, "g{name=\"a\\\"b\\\\c\\nd\"} 1\n");
	prom_free(&b);

	memset(longv, 'v', sizeof(longv) - 1);
	longv[sizeof(longv) - 1] = '\0';
	prom_init(&b);
	prom_sample(&b, "g", 1, "name", longv, NULL);
	/* 'g{name="' + 256 'v' + '"} 1' and a newline */
	assert_int_equal(strlen(b.data), 8 + 256 + 5);
	prom_free(&b);
}

static void test_special_values(void **state)
{
	struct prom_buf b;

	prom_init(&b);
	prom_sample(&b, "a", NAN, NULL);
	prom_sample(&b, "b", INFINITY, NULL);
	prom_sample(&b, "c", 1e20, NULL);
	assert_string_equal(b.data, "a NaN\nb +Inf\nc 1e+20\n");
	prom_free(&b);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_family_and_samples),
		cmocka_unit_test(test_escaping_and_cap),
		cmocka_unit_test(test_special_values),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
