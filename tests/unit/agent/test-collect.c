/* test-collect.c -- the collectors against fixture copies of /proc and
 * /sys: totals and per-core CPU, no swap, 96 CPUs, odd and malformed
 * interface lines, whole disks only, pseudo filesystems skipped, rates and
 * percentages from two samples, reals rounded to two decimals and printed
 * as such. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ctype.h>
#include <stdbool.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "collect.h"

static char root[512];

static int fake_statvfs(const char *path, struct statvfs *st)
{
	memset(st, 0, sizeof(*st));
	st->f_frsize = 4096;
	st->f_blocks = 1000;
	st->f_bfree = 400;
	st->f_bavail = 300;
	st->f_files = 5000;
	st->f_ffree = 4000;
	return strcmp(path, "/data") == 0 ? -1 : 0; /* one mount fails: skipped */
}

static json_t *sample(const char *fixture, struct collect_state *st, uint64_t now)
{
	snprintf(root, sizeof(root), "%s/%s", getenv("AGENT_FIXTURES"), fixture);
	if (st->prev_ms == 0) {
		collect_init(st, root);
		st->statvfs_fn = fake_statvfs;
	}
	return collect_sample(st, now, 1700000000000ull, 10);
}

static json_t *path(json_t *o, const char *a, const char *b)
{
	json_t *v = json_object_get(o, a);

	return b ? json_object_get(v, b) : v;
}

static struct collect_state st;

/* X rounded to the two decimals the agent keeps. */
static double two(double x)
{
	return round(x * 100) / 100;
}

static void test_two_cpu(void **state)
{
	json_t *d = sample("two-cpu", &st, 1000);

	assert_string_equal(json_string_value(path(d, "schema", NULL)), "vmproxy.metrics/1");
	assert_string_equal(json_string_value(path(d, "host", "boot_id")),
			    "0b4f3f8e-6b6d-4a57-9a3e-1d2c3b4a5f60");
	assert_int_equal(json_integer_value(path(d, "cpu", "count")), 2);
	/* total: user 200 nice 10 system 100 idle 1600 iowait 5 softirq 3 steal 1 */
	assert_float_equal(json_number_value(path(d, "cpu", "busy_pct")),
			   two(100.0 * (200 + 10 + 100 + 3 + 1) /
			       (200 + 10 + 100 + 1600 + 5 + 3 + 1)),
			   1e-9);
	assert_int_equal(json_array_size(path(d, "cpu", "per_core")), 2);
	assert_float_equal(json_number_value(path(d, "memory", "used_pct")), 25.0, 1e-9);
	assert_float_equal(json_number_value(path(d, "memory", "swap_used_pct")), 25.0, 1e-9);
	assert_int_equal(json_integer_value(path(d, "memory", "total_bytes")), 2000000ll * 1024);
	assert_float_equal(json_number_value(path(d, "load", "load1")), 0.5, 1e-9);
	assert_float_equal(json_number_value(path(d, "host", "uptime_s")), 12345.67, 1e-6);
	/* vda only: vda1 is a partition, loop0 and ram0 are skipped. */
	assert_int_equal(json_array_size(path(d, "disks", NULL)), 1);
	assert_string_equal(json_string_value(json_object_get(
				    json_array_get(path(d, "disks", NULL), 0), "device")),
			    "vda");
	assert_int_equal(json_integer_value(json_object_get(
				 json_array_get(path(d, "disks", NULL), 0), "read_bytes")),
			 20000 * 512);
	assert_int_equal(json_array_size(path(d, "network", NULL)), 2);
	/* "/" only: /data's statvfs fails, the rest are pseudo filesystems. */
	assert_int_equal(json_array_size(path(d, "filesystems", NULL)), 1);
	assert_float_equal(json_number_value(json_object_get(
				   json_array_get(path(d, "filesystems", NULL), 0), "used_pct")),
			   two(100.0 * 600 / (600 + 300)), 1e-9);
	json_decref(d);
	memset(&st, 0, sizeof(st));
}

static void test_rates_from_two_samples(void **state)
{
	json_t *a = sample("two-cpu", &st, 1000), *b, *eth;

	json_decref(a);
	/* Same counters 2 s later: all rates 0, busy 0 (no ticks passed). */
	b = sample("two-cpu", &st, 3000);
	eth = json_array_get(path(b, "network", NULL), 1);
	assert_string_equal(json_string_value(json_object_get(eth, "interface")), "eth0");
	assert_float_equal(json_number_value(json_object_get(eth, "rx_bytes_per_s")), 0, 1e-9);
	assert_float_equal(json_number_value(path(b, "cpu", "busy_pct")), 0, 1e-9);
	json_decref(b);
	/* Another tree 10 s later, eth0 received 100000 bytes more. */
	snprintf(root, sizeof(root), "%s/two-cpu", getenv("AGENT_FIXTURES"));
	st.prev_net[1].a -= 100000;
	b = collect_sample(&st, 13000, 0, 10);
	eth = json_array_get(path(b, "network", NULL), 1);
	assert_float_equal(json_number_value(json_object_get(eth, "rx_bytes_per_s")), 10000.0,
			   1e-9);
	json_decref(b);
	memset(&st, 0, sizeof(st));
}

static void test_no_swap(void **state)
{
	json_t *d = sample("no-swap", &st, 1000);

	assert_int_equal(json_integer_value(path(d, "memory", "swap_total_bytes")), 0);
	assert_float_equal(json_number_value(path(d, "memory", "swap_used_pct")), 0, 1e-9);
	json_decref(d);
	memset(&st, 0, sizeof(st));
}

static void test_many_cpus(void **state)
{
	json_t *d = sample("many-cpu", &st, 1000);

	assert_int_equal(json_integer_value(path(d, "cpu", "count")), 96);
	assert_int_equal(json_integer_value(json_object_get(
				 json_array_get(path(d, "cpu", "per_core"), 95), "cpu")),
			 95);
	json_decref(d);
	memset(&st, 0, sizeof(st));
}

static void test_odd_lines(void **state)
{
	json_t *d = sample("odd-ifnames", &st, 1000), *net = path(d, "network", NULL);

	/* lo, eth0, the long name and the alias with a colon; "bad0" is dropped. */
	assert_int_equal(json_array_size(net), 4);
	assert_string_equal(json_string_value(json_object_get(json_array_get(net, 2), "interface")),
			    "enp0s31f6-long-nm");
	assert_string_equal(json_string_value(json_object_get(json_array_get(net, 3), "interface")),
			    "eth0:1");
	assert_int_equal(json_integer_value(json_object_get(json_array_get(net, 3), "tx_bytes")), 80);
	assert_int_equal(st.dropped, 2); /* bad0 and the garbage diskstats line */
	json_decref(d);
	memset(&st, 0, sizeof(st));
}

/* Every number in TEXT (JSON) has at most two decimals and no exponent;
 * returns the first that does not, or NULL. */
static const char *long_number(const char *text)
{
	bool in_string = false;

	for (const char *p = text; *p; p++) {
		if (in_string) {
			if (*p == '\\' && p[1])
				p++;
			else if (*p == '"')
				in_string = false;
		} else if (*p == '"') {
			in_string = true;
		} else if (isdigit((unsigned char)*p) || *p == '-') {
			const char *start = p, *dot = NULL;

			while (isdigit((unsigned char)*p) || strchr("-+.eE", *p)) {
				if (*p == '.')
					dot = p;
				if (*p == 'e' || *p == 'E' || (dot && p - dot > 2))
					return start;
				p++;
			}
			p--;
		}
	}
	return NULL;
}

static void test_number_text(void **state)
{
	json_t *d = sample("two-cpu", &st, 1000);
	char *text = collect_format(d, JSON_COMPACT | JSON_SORT_KEYS);
	const char *bad;

	assert_non_null(text);
	bad = long_number(text);
	if (bad)
		fail_msg("more than two decimals: %.40s", bad);
	/* busy 314 of 1919 ticks; cpu0 151 of 951; 5 iowait ticks at 100 Hz. */
	assert_non_null(strstr(text, "\"busy_pct\":16.36,"));
	assert_non_null(strstr(text, "\"busy_pct\":15.88,"));
	assert_non_null(strstr(text, "\"iowait_s\":0.05,"));
	assert_non_null(strstr(text, "\"uptime_s\":12345.67"));
	free(text);
	json_decref(d);
	memset(&st, 0, sizeof(st));
}

static void test_missing_tree(void **state)
{
	json_t *d = sample("does-not-exist", &st, 1000);

	/* Nothing to read is not a crash: the required keys are still there. */
	assert_non_null(d);
	assert_non_null(path(d, "host", "boot_id"));
	assert_null(path(d, "cpu", NULL));
	assert_int_equal(json_array_size(path(d, "disks", NULL)), 0);
	json_decref(d);
	memset(&st, 0, sizeof(st));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_two_cpu),	   cmocka_unit_test(test_rates_from_two_samples),
		cmocka_unit_test(test_no_swap),	   cmocka_unit_test(test_many_cpus),
		cmocka_unit_test(test_odd_lines),  cmocka_unit_test(test_missing_tree),
		cmocka_unit_test(test_number_text),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
