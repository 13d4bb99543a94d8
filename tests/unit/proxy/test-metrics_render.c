/* test-metrics_render.c -- every field of a poll thread's typed report
 * reaches its /metrics series with its own value and thread label (through
 * report_json, as a scrape does: a key spelt differently on the two sides
 * would read 0), every sample has its family's HELP and TYPE once, per-VM
 * series appear only when enabled, and label values are escaped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "metrics.h"
#include "report_json.h"

/* Distinct values: field K of thread T is T * 1000 + K + 1. */
static uint64_t val(unsigned t, unsigned k)
{
	return (uint64_t)t * 1000 + k + 1;
}

static void fill(struct poll_report *r, unsigned t)
{
	memset(r, 0, sizeof(*r));
	r->thread = t;
	r->cpu = (int)t;
	r->answered = true;
	r->connections = (uint32_t)val(t, 0);
	r->vm_count = (uint32_t)val(t, 1);
	r->messages_in = val(t, 2);
	r->bytes_in = val(t, 3);
	r->messages_out = val(t, 4);
	r->bytes_out = val(t, 5);
	r->guest_reads = val(t, 6);
	r->guest_writes = val(t, 7);
	r->held_messages = val(t, 8);
	r->held_bytes = val(t, 9);
	r->blocked = t == 1;
	r->cpu_seconds = (double)val(t, 10);
	r->loop_busy_seconds = (double)val(t, 11);
	r->migrations_in = val(t, 12);
	r->migrations_out = val(t, 13);
	r->link.published = val(t, 14);
	r->link.acked = val(t, 15);
	r->link.nacked = val(t, 16);
	r->link.republished = val(t, 17);
	r->link.returned = val(t, 18);
	r->link.reconnects = val(t, 19);
	r->link.unconfirmed = (uint32_t)val(t, 20);
	r->link.broker_blocked = t == 0;
	r->link.writes = val(t, 21);
	r->link.reads = val(t, 22);
	r->link.up = t == 0;
	snprintf(r->link.node, sizeof(r->link.node), "node%u:5671", t);
	r->link.refusals[0].code = 403;
	r->link.refusals[0].count = val(t, 23);
	r->link.refusals[1].code = 530;
	r->link.refusals[1].count = val(t, 24);
}

static const struct {
	const char *series;
	int k; /* field index in fill(); -1: a boolean, see want() */
} per_thread[] = {
        {"vmproxy_thread_connections", 0},          {"vmproxy_thread_vms", 1},
        {"vmproxy_thread_messages_in_total", 2},    {"vmproxy_thread_bytes_in_total", 3},
        {"vmproxy_thread_messages_out_total", 4},   {"vmproxy_thread_bytes_out_total", 5},
        {"vmproxy_thread_guest_reads_total", 6},    {"vmproxy_thread_guest_writes_total", 7},
        {"vmproxy_thread_held_messages", 8},        {"vmproxy_thread_held_bytes", 9},
        {"vmproxy_thread_cpu_seconds_total", 10},   {"vmproxy_thread_loop_busy_seconds_total", 11},
        {"vmproxy_thread_migrations_in_total", 12}, {"vmproxy_thread_migrations_out_total", 13},
        {"vmproxy_upstream_published_total", 14},   {"vmproxy_upstream_acked_total", 15},
        {"vmproxy_upstream_nacked_total", 16},      {"vmproxy_upstream_republished_total", 17},
        {"vmproxy_upstream_returned_total", 18},    {"vmproxy_upstream_connects_total", 19},
        {"vmproxy_upstream_unconfirmed", 20},       {"vmproxy_upstream_writes_total", 21},
        {"vmproxy_upstream_reads_total", 22},
};

/* The value of the sample line that starts with PREFIX (name and labels,
 * up to the space); fails the test when there is not exactly one. */
static double sample(const char *text, const char *prefix)
{
	size_t n = strlen(prefix), found = 0;
	double v = -1;

	for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		if (strncmp(p, prefix, n) == 0 && p[n] == ' ') {
			v = strtod(p + n + 1, NULL);
			found++;
		}
	}
	if (found != 1)
		fail_msg("%zu sample lines \"%s\"", found, prefix);
	return v;
}

static size_t count_lines(const char *text, const char *prefix)
{
	size_t n = strlen(prefix), found = 0;

	for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
		if (strncmp(p, prefix, n) == 0)
			found++;
	return found;
}

static char *render(bool per_vm, struct poll_report *r, unsigned n)
{
	json_t *threads = report_json_threads(r, n, per_vm);
	struct vmproxy_counters counters = {
		.accepted = 11,
		.refused_unknown_peer = 12,
		.refused_limit = 13,
		.vms_gone = 14,
		.draining = true,
	};
	char *text = metrics_render(threads, &counters, per_vm);

	json_decref(threads);
	assert_non_null(text);
	return text;
}

static void test_every_field_reaches_its_series(void **state)
{
	struct poll_report r[2];
	char *text, prefix[160];

	(void)state;
	fill(&r[0], 0);
	fill(&r[1], 1);
	text = render(false, r, 2);
	for (unsigned t = 0; t < 2; t++) {
		for (size_t i = 0; i < sizeof(per_thread) / sizeof(per_thread[0]); i++) {
			snprintf(prefix, sizeof(prefix), "%s{thread=\"%u\"}", per_thread[i].series,
			         t);
			assert_true(sample(text, prefix) ==
			            (double)val(t, (unsigned)per_thread[i].k));
		}
		snprintf(prefix, sizeof(prefix), "vmproxy_thread_blocked{thread=\"%u\"}", t);
		assert_true(sample(text, prefix) == (t == 1));
		snprintf(prefix, sizeof(prefix), "vmproxy_upstream_broker_blocked{thread=\"%u\"}",
		         t);
		assert_true(sample(text, prefix) == (t == 0));
		snprintf(prefix, sizeof(prefix),
		         "vmproxy_upstream_up{thread=\"%u\",node=\"node%u:5671\"}", t, t);
		assert_true(sample(text, prefix) == (t == 0));
		snprintf(prefix, sizeof(prefix),
		         "vmproxy_upstream_refusals_total{thread=\"%u\",code=\"403\"}", t);
		assert_true(sample(text, prefix) == (double)val(t, 23));
		snprintf(prefix, sizeof(prefix),
		         "vmproxy_upstream_refusals_total{thread=\"%u\",code=\"530\"}", t);
		assert_true(sample(text, prefix) == (double)val(t, 24));
	}
	assert_true(sample(text, "vmproxy_connections_accepted_total") == 11);
	assert_true(sample(text, "vmproxy_connections_refused_total{reason=\"unknown_peer\"}") ==
	            12);
	assert_true(sample(text, "vmproxy_connections_refused_total{reason=\"limit\"}") == 13);
	assert_true(sample(text, "vmproxy_vm_stops_total") == 14);
	assert_true(sample(text, "vmproxy_draining") == 1);
	assert_int_equal(count_lines(text, "vmproxy_vm_"),
	                 count_lines(text, "vmproxy_vm_stops_total"));
	free(text);
}

/* Each family is announced once, before its first sample. */
static void test_help_and_type_once_per_family(void **state)
{
	struct poll_report r[2];
	char *text, *copy, *line, *save = NULL;
	char seen[128][96];
	size_t nseen = 0;

	(void)state;
	fill(&r[0], 0);
	fill(&r[1], 1);
	text = render(false, r, 2);
	copy = strdup(text);
	for (line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char name[96];

		if (strncmp(line, "# TYPE ", 7) == 0) {
			assert_int_equal(sscanf(line + 7, "%95s", name), 1);
			for (size_t i = 0; i < nseen; i++)
				assert_string_not_equal(seen[i], name);
			assert_true(nseen < 128);
			strcpy(seen[nseen++], name);
			continue;
		}
		if (line[0] == '#')
			continue;
		assert_int_equal(sscanf(line, "%95[a-z_]", name), 1);
		assert_true(nseen > 0);
		assert_string_equal(seen[nseen - 1], name); /* under its own TYPE */
	}
	for (size_t i = 0; i < nseen; i++) {
		char help[sizeof(seen[0]) + 16];

		snprintf(help, sizeof(help), "# HELP %.95s ", seen[i]);
		assert_int_equal(count_lines(text, help), 1);
	}
	free(copy);
	free(text);
}

static void test_per_vm_series_and_escaping(void **state)
{
	struct poll_report r[1];
	struct poll_vm_report vm = {
	        .connections = 3, .messages_in = 40, .bytes_in = 500, .held_bytes = 60};
	char *text;

	(void)state;
	fill(&r[0], 0);
	snprintf(vm.info.uuid, sizeof(vm.info.uuid), "%s", "6695eb01-f6a4-8304-79aa-97f2502e193f");
	snprintf(vm.info.name, sizeof(vm.info.name), "%s", "web\"1\\a\nb");
	r[0].vms = &vm;
	r[0].nvms = 1;

	text = render(false, r, 1);
	assert_int_equal(count_lines(text, "vmproxy_vm_connections"), 0);
	free(text);

	text = render(true, r, 1);
#define VM_LABELS                                                                                  \
	"{vm_uuid=\"6695eb01-f6a4-8304-79aa-97f2502e193f\",vm_name=\"web\\\"1\\\\a\\nb\",thread="  \
	"\"0\"}"
	assert_true(sample(text, "vmproxy_vm_connections" VM_LABELS) == 3);
	assert_true(sample(text, "vmproxy_vm_messages_in_total" VM_LABELS) == 40);
	assert_true(sample(text, "vmproxy_vm_bytes_in_total" VM_LABELS) == 500);
	assert_true(sample(text, "vmproxy_vm_held_bytes" VM_LABELS) == 60);
	/* The name's newline is escaped: no line starts with its second half. */
	assert_int_equal(count_lines(text, "b\""), 0);
	free(text);
}

/* Every daemon-wide counter reaches its series with its own value; the
 * libvirt families have samples only when libvirt is configured. */
static void test_daemon_counters_reach_their_series(void **state)
{
	struct vmproxy_counters c = {
		.accepted = 101, .refused_unknown_peer = 102, .refused_limit = 103,
		.refused_libvirt_unreachable = 104, .refused_lookups_pending = 105,
		.lookups_pending = 106, .vms_gone = 107,
		.libvirt = { .libvirt_configured = true, .libvirt_disconnects = 108,
			     .libvirt_reconnects = 109, .libvirt_reconnect_failures = 110,
			     .served_unreachable = 111 },
	};
	static const struct {
		const char *line;
		double v;
	} want[] = {
		{ "vmproxy_connections_accepted_total", 101 },
		{ "vmproxy_connections_refused_total{reason=\"unknown_peer\"}", 102 },
		{ "vmproxy_connections_refused_total{reason=\"limit\"}", 103 },
		{ "vmproxy_connections_refused_total{reason=\"libvirt_unreachable\"}", 104 },
		{ "vmproxy_connections_refused_total{reason=\"lookups_pending\"}", 105 },
		{ "vmproxy_identity_lookups_pending", 106 },
		{ "vmproxy_vm_stops_total", 107 },
		{ "vmproxy_libvirt_connected", 0 },
		{ "vmproxy_libvirt_disconnects_total", 108 },
		{ "vmproxy_libvirt_reconnects_total", 109 },
		{ "vmproxy_libvirt_reconnect_failures_total", 110 },
		{ "vmproxy_libvirt_served_from_cache_total", 111 },
		{ "vmproxy_draining", 0 },
	};
	struct poll_report r[1];
	json_t *threads;
	char *text;

	(void)state;
	fill(&r[0], 0);
	threads = report_json_threads(r, 1, false);
	text = metrics_render(threads, &c, false);
	json_decref(threads);
	assert_non_null(text);
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
		assert_true(sample(text, want[i].line) == want[i].v);
	free(text);

	/* Connected, draining; without libvirt_uri no libvirt samples. */
	c.libvirt.libvirt_connected = true;
	c.draining = true;
	threads = report_json_threads(r, 1, false);
	text = metrics_render(threads, &c, false);
	assert_true(sample(text, "vmproxy_libvirt_connected") == 1);
	assert_true(sample(text, "vmproxy_draining") == 1);
	free(text);
	c.libvirt.libvirt_configured = false;
	text = metrics_render(threads, &c, false);
	json_decref(threads);
	assert_int_equal(count_lines(text, "vmproxy_libvirt_connected "), 0);
	assert_int_equal(count_lines(text, "vmproxy_libvirt_disconnects_total "), 0);
	assert_int_equal(count_lines(text, "# TYPE vmproxy_libvirt_connected gauge"), 1);
	free(text);
}

/* The admin socket's "load": each thread's rates under the keys
 * vmproxyctl status reads, with their own values. */
static void test_load_keys(void **state)
{
	struct thread_rates l[2] = {
		{ 1.5, 2.5, 3.5, 4.5, 5.5, 6, 7, 8, 9 },
		{ 11.5, 12.5, 13.5, 14.5, 15.5, 16, 17, 18, 19 },
	};
	static const char *const dkeys[] = { "messages_in_per_s", "bytes_in_per_s",
					     "messages_out_per_s", "bytes_out_per_s",
					     "cpu_percent" };
	static const char *const ikeys[] = { "connections", "held_messages", "held_bytes",
					     "loop_max_us" };
	json_t *a = report_json_load(l, 2);

	(void)state;
	assert_int_equal(json_array_size(a), 2);
	for (unsigned t = 0; t < 2; t++) {
		json_t *o = json_array_get(a, t);

		assert_int_equal(json_integer_value(json_object_get(o, "thread")), t);
		for (unsigned k = 0; k < 5; k++)
			assert_true(json_real_value(json_object_get(o, dkeys[k])) ==
				    10.0 * t + 1.5 + k);
		for (unsigned k = 0; k < 4; k++)
			assert_int_equal(json_integer_value(json_object_get(o, ikeys[k])),
					 10 * t + 6 + k);
	}
	json_decref(a);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test(test_every_field_reaches_its_series),
	        cmocka_unit_test(test_help_and_type_once_per_family),
	        cmocka_unit_test(test_per_vm_series_and_escaping),
	        cmocka_unit_test(test_daemon_counters_reach_their_series),
	        cmocka_unit_test(test_load_keys),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
