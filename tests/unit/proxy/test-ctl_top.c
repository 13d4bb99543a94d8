/* test-ctl_top.c -- vmproxyctl top's frames from canned status and vms
 * replies: rates and CPU % as differences between two polls ("-" on the
 * first), VMs ordered by rate, as many as the rows allow, lines cut at the
 * columns. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl_top.h"

static json_t *status(double cpu0, long in0, long out0, int up1)
{
	return json_pack("{s:b, s:{s:i, s:i, s:i, s:i, s:i, s:b}, s:["
			 "{s:i, s:i, s:i, s:i, s:I, s:I, s:f, s:{s:b, s:s, s:i}},"
			 "{s:i, s:i, s:i, s:i, s:I, s:I, s:f, s:{s:b, s:s, s:i}}]}",
			 "ok", 1, "daemon", "connections", 3, "held_messages", 0, "accepted", 5,
			 "refused_unknown_peer", 1, "refused_limit", 0, "draining", 0, "threads",
			 "thread", 0, "cpu", 2, "connections", 2, "vm_count", 2, "messages_in",
			 (json_int_t)in0, "messages_out", (json_int_t)out0, "cpu_seconds", cpu0,
			 "upstream", "up", 1, "node", "rabbit-a:5671", "unconfirmed", 7, "thread", 1,
			 "cpu", 3, "connections", 1, "vm_count", 1, "messages_in", (json_int_t)10,
			 "messages_out", (json_int_t)10, "cpu_seconds", 1.0, "upstream", "up", up1,
			 "node", "rabbit-b:5671", "unconfirmed", 0);
}

static json_t *vm(const char *name, const char *uuid, int thread, long in)
{
	return json_pack("{s:s, s:s, s:i, s:i, s:I, s:i, s:b, s:b}", "name", name, "uuid", uuid,
			 "thread", thread, "connections", 1, "messages_in", (json_int_t)in,
			 "held_bytes", 0, "blocked", 0, "migrating", 0);
}

static json_t *vms(long a, long b, long c)
{
	return json_pack("{s:b, s:[o, o, o]}", "ok", 1, "vms", vm("alpha", "u-a", 0, a),
			 vm("bravo", "u-b", 0, b), vm("charlie", "u-c", 1, c));
}

/* The frame as text (the caller frees it). */
static char *frame(struct ctl_top *t, json_t *st, json_t *v, double now, int cols, int rows)
{
	char *text = NULL;
	size_t len = 0;
	FILE *out = open_memstream(&text, &len);

	assert_non_null(out);
	ctl_top_render(t, st, v, now, cols, rows, out);
	fclose(out);
	json_decref(st);
	json_decref(v);
	return text;
}

/* The line of TEXT that starts with PREFIX, copied into BUF. */
static const char *line_of(const char *text, const char *prefix, char *buf, size_t len)
{
	for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
		if (strncmp(p, prefix, strlen(prefix)) == 0) {
			size_t n = strcspn(p, "\n");

			snprintf(buf, len, "%.*s", (int)(n < len ? n : len - 1), p);
			return buf;
		}
	}
	return NULL;
}

static int count_lines(const char *text)
{
	int n = 0;

	for (; *text; text++)
		n += *text == '\n';
	return n;
}

static void test_rates_from_two_polls(void **state)
{
	struct ctl_top t = { 0 };
	char *f, buf[256];
	char a[8], b[8], c[8], d[8], e[8], g[8], h[8], i[16], j[8];

	f = frame(&t, status(2.0, 100, 90, 1), vms(50, 40, 10), 100.0, 0, 0);
	/* First frame: no rates yet. */
	assert_non_null(line_of(f, "0 ", buf, sizeof(buf)));
	assert_int_equal(sscanf(buf, "%7s %7s %7s %7s %7s %7s %7s %7s %15s", a, b, c, d, e, g, h, j,
				i),
			 9);
	assert_string_equal(c, "-");
	assert_string_equal(g, "-");
	assert_non_null(line_of(f, "alpha", buf, sizeof(buf)));
	assert_non_null(strstr(buf, " - "));
	free(f);

	/* Two seconds later: thread 0 used 0.5 s of CPU, took 200 messages in
	 * and sent 180 out; bravo sent 300, alpha 20, charlie nothing. */
	f = frame(&t, status(2.5, 300, 270, 0), vms(70, 340, 10), 102.0, 0, 0);
	assert_non_null(line_of(f, "0 ", buf, sizeof(buf)));
	assert_int_equal(sscanf(buf, "%7s %7s %7s %7s %7s %7s %7s %7s %7s %15s", a, b, c, d, e, g,
				h, j, i, i),
			 10);
	assert_string_equal(b, "2");	 /* pinned CPU */
	assert_string_equal(c, "25.0");	 /* CPU % */
	assert_string_equal(g, "100.0"); /* messages in per second */
	assert_string_equal(h, "90.0");	 /* out */
	assert_string_equal(j, "up");
	assert_string_equal(i, "rabbit-a:5671");
	assert_non_null(line_of(f, "1 ", buf, sizeof(buf)));
	assert_non_null(strstr(buf, " DOWN "));
	/* Busiest first: bravo 150/s, alpha 10/s, charlie 0/s. */
	assert_true(strstr(f, "bravo") < strstr(f, "alpha"));
	assert_true(strstr(f, "alpha") < strstr(f, "charlie"));
	assert_non_null(line_of(f, "bravo", buf, sizeof(buf)));
	assert_non_null(strstr(buf, " 150.0 "));
	assert_non_null(strstr(f, "BUSIEST VMS (3 of 3)"));
	free(f);
	ctl_top_clear(&t);
}

static void test_fits_the_terminal(void **state)
{
	struct ctl_top t = { 0 };
	char *f;

	/* 10 rows: 2 header lines, 3 for the threads, 3 around the VM list:
	 * room for 2 VMs; every line at most 40 columns. */
	f = frame(&t, status(2.0, 100, 90, 1), vms(50, 40, 10), 100.0, 40, 10);
	assert_int_equal(count_lines(f), 10);
	assert_non_null(strstr(f, "BUSIEST VMS (2 of 3)"));
	assert_null(strstr(f, "charlie"));
	for (char *p = f; *p;) {
		size_t n = strcspn(p, "\n");

		assert_true(n <= 40);
		p += n + (p[n] ? 1 : 0);
	}
	free(f);
	/* Fewer rows than the threads need: the frame stops at the bottom. */
	f = frame(&t, status(2.0, 100, 90, 1), vms(50, 40, 10), 101.0, 40, 4);
	assert_int_equal(count_lines(f), 4);
	assert_null(strstr(f, "alpha"));
	free(f);
	ctl_top_clear(&t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rates_from_two_polls),
		cmocka_unit_test(test_fits_the_terminal),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
