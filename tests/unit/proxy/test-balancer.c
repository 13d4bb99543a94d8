/* test-balancer.c -- given per-thread and per-VM loads, which whole VM
 * moves where, and when (ratio, floor, hold time). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "balancer.h"

static struct balancer_config cfg(void)
{
	struct balancer_config c;
	struct conf_ctx ctx;

	conf_ctx_init(&ctx, "t.json");
	assert_int_equal(balancer_config_parse(&ctx, NULL, &c), 0);
	c.hold_ms = 0;
	return c;
}

static struct bal_vm vm(const char *name, double load)
{
	struct bal_vm v;

	snprintf(v.uuid, sizeof(v.uuid), "%s", name);
	v.load = load;
	return v;
}

static struct bal_thread th(unsigned id, const struct bal_vm *vms, size_t n)
{
	struct bal_thread t = { .id = id, .vms = vms, .nvms = n, .load = 0 };

	for (size_t i = 0; i < n; i++)
		t.load += vms[i].load;
	return t;
}

static void test_balanced_no_move(void **state)
{
	struct balancer_config c = cfg();
	struct bal_vm a[] = { vm("a", 100), vm("b", 100) }, b[] = { vm("c", 150) };
	struct bal_thread t[] = { th(0, a, 2), th(1, b, 1) };
	struct bal_move m;

	/* 200 vs 150 is within 1.5 */
	assert_int_equal(balancer_plan(&c, t, 2, &m), 0);
}

static void test_skew_moves_the_vm_that_halves_the_gap(void **state)
{
	struct balancer_config c = cfg();
	struct bal_vm a[] = { vm("small", 50), vm("mid", 300), vm("big", 700) }, b[] = { vm("x", 100) };
	struct bal_thread t[] = { th(0, a, 3), th(1, b, 1) };
	struct bal_move m;

	/* gap 1050 - 100 = 950: moving "mid" leaves |950 - 600| = 350, "big" 450 */
	assert_int_equal(balancer_plan(&c, t, 2, &m), 1);
	assert_string_equal(m.uuid, "mid");
	assert_int_equal(m.from, 0);
	assert_int_equal(m.to, 1);
}

static void test_idle_thread_gets_load(void **state)
{
	struct balancer_config c = cfg();
	struct bal_vm a[] = { vm("a", 400), vm("b", 400), vm("c", 400), vm("d", 400) };
	struct bal_thread t[] = { th(0, a, 4), th(1, NULL, 0), th(2, NULL, 0) };
	struct bal_move m;

	assert_int_equal(balancer_plan(&c, t, 3, &m), 1);
	assert_int_equal(m.from, 0);
	assert_true(m.to == 1 || m.to == 2);
}

static void test_single_big_vm_is_not_bounced(void **state)
{
	struct balancer_config c = cfg();
	struct bal_vm a[] = { vm("huge", 1000) };
	struct bal_thread t[] = { th(0, a, 1), th(1, NULL, 0) };
	struct bal_move m;

	/* Moving it only swaps the imbalance: |1000 - 2000| is no better. */
	assert_int_equal(balancer_plan(&c, t, 2, &m), 0);
}

static void test_floor(void **state)
{
	struct balancer_config c = cfg();
	struct bal_vm a[] = { vm("a", 20), vm("b", 20) };
	struct bal_thread t[] = { th(0, a, 2), th(1, NULL, 0) };
	struct bal_move m;

	/* 40 msgs/s in all is below min_load: not worth a migration */
	assert_int_equal(balancer_plan(&c, t, 2, &m), 0);
	c.min_load = 10;
	assert_int_equal(balancer_plan(&c, t, 2, &m), 1);
}

static void test_hold_time(void **state)
{
	struct balancer_config c = cfg();
	struct bal_vm a[] = { vm("a", 500), vm("b", 500) };
	struct bal_thread t[] = { th(0, a, 2), th(1, NULL, 0) };
	struct bal_thread even[] = { th(0, a, 1), th(1, a + 1, 1) };
	struct balancer b;
	struct bal_move m;

	c.hold_ms = 10000;
	balancer_init(&b, &c);
	assert_int_equal(balancer_step(&b, t, 2, 1000, &m), 0);
	assert_int_equal(balancer_step(&b, t, 2, 9000, &m), 0);
	/* Balanced in between: the clock starts again. */
	assert_int_equal(balancer_step(&b, even, 2, 10000, &m), 0);
	assert_int_equal(balancer_step(&b, t, 2, 12000, &m), 0);
	assert_int_equal(balancer_step(&b, t, 2, 21999, &m), 0);
	assert_int_equal(balancer_step(&b, t, 2, 22000, &m), 1);
	assert_int_equal(m.from, 0);
	/* Disabled: never. */
	b.cfg.enabled = false;
	assert_int_equal(balancer_step(&b, t, 2, 99999, &m), 0);
}

static void test_config_errors(void **state)
{
	struct conf_ctx ctx;
	struct balancer_config c;
	json_t *o = json_loads("{\"ratio\": 0.5}", 0, NULL);

	conf_ctx_init(&ctx, "/etc/vmproxyd.json");
	assert_int_equal(balancer_config_parse(&ctx, o, &c), -22);
	assert_string_equal(ctx.err, "/etc/vmproxyd.json: balancer.ratio: expected a number in "
				     "[1.05, 100]");
	json_decref(o);
	o = json_loads("{\"interval\": 5}", 0, NULL);
	conf_ctx_init(&ctx, "x.json");
	assert_int_equal(balancer_config_parse(&ctx, o, &c), -22);
	assert_string_equal(ctx.err, "x.json: balancer.interval: unknown key");
	json_decref(o);
}

/* The defaults docs/configuration.md gives for the "balancer" object. */
static void test_documented_defaults(void **state)
{
	struct balancer_config c;
	struct conf_ctx ctx;
	json_t *empty = json_object();

	conf_ctx_init(&ctx, "t.json");
	assert_int_equal(balancer_config_parse(&ctx, NULL, &c), 0);
	assert_true(c.enabled);
	assert_int_equal(c.interval_ms, 5000);
	assert_true(c.ratio == 1.5);
	assert_int_equal(c.hold_ms, 10000);
	assert_true(c.min_load == 50);
	assert_int_equal(c.migrate_timeout_ms, 5000);
	/* an empty object is the same as none */
	memset(&c, 0, sizeof(c));
	assert_int_equal(balancer_config_parse(&ctx, empty, &c), 0);
	assert_true(c.enabled);
	assert_int_equal(c.interval_ms, 5000);
	json_decref(empty);
}

/* Reports of two threads: thread 0 with VMs a and b, thread 1 with c,
 * at the given messages_in counters. */
static void reports(struct poll_report r[2], struct poll_vm_report v[3], uint64_t a, uint64_t b,
		    uint64_t c)
{
	memset(r, 0, 2 * sizeof(*r));
	memset(v, 0, 3 * sizeof(*v));
	snprintf(v[0].info.uuid, sizeof(v[0].info.uuid), "a");
	snprintf(v[1].info.uuid, sizeof(v[1].info.uuid), "b");
	snprintf(v[2].info.uuid, sizeof(v[2].info.uuid), "c");
	v[0].messages_in = a;
	v[1].messages_in = b;
	v[2].messages_in = c;
	r[0].vms = &v[0];
	r[0].nvms = 2;
	r[1].thread = 1;
	r[1].vms = &v[2];
	r[1].nvms = 1;
}

/* Loads are rates between samples: the first sample only records; then
 * a at 1000/s and b at 400/s on thread 0 against c at 100/s on thread 1
 * move b (the gap 1300 becomes 500); a counter that went back (a VM that
 * moved away and back) counts 0, as does a VM new since the sample. */
static void test_observe_rates(void **state)
{
	struct balancer_config c = cfg();
	struct balancer b;
	struct poll_report r[2];
	struct poll_vm_report v[3];
	struct bal_move m;

	(void)state;
	balancer_init(&b, &c);
	reports(r, v, 5000, 2000, 700);
	assert_int_equal(balancer_observe(&b, r, 2, 10000, &m), 0);
	reports(r, v, 7000, 2800, 900); /* 2 s later */
	assert_int_equal(balancer_observe(&b, r, 2, 12000, &m), 1);
	assert_string_equal(m.uuid, "b");
	assert_int_equal(m.from, 0);
	assert_int_equal(m.to, 1);
	assert_true(m.from_load == 1400);
	assert_true(m.to_load == 100);

	/* a's counter went back: 0, so thread 0 carries b's 400 only, against
	 * c's 100: b (the only VM with load) would overshoot, nothing moves. */
	reports(r, v, 10, 3600, 1100);
	assert_int_equal(balancer_observe(&b, r, 2, 14000, &m), 0);
	/* From there a counts again: 2000/s against 0 and 0. */
	reports(r, v, 4010, 3600, 1100);
	assert_int_equal(balancer_observe(&b, r, 2, 16000, &m), 0); /* a alone: no better split */
	balancer_free(&b);
	balancer_free(&b); /* twice is harmless */
}

/* The admin socket's per-thread load: rates against the previous sample,
 * from zero for a thread it did not have, none for a counter that went
 * back (a restart of the count) or without time between. */
static void test_thread_rates(void **state)
{
	struct poll_report prev[1] = { { .messages_in = 100, .bytes_in = 1000, .messages_out = 50,
					  .bytes_out = 500, .cpu_seconds = 1.0 } };
	struct poll_report now[2] = {
		{ .messages_in = 300, .bytes_in = 5000, .messages_out = 40, .bytes_out = 900,
		  .cpu_seconds = 1.5, .connections = 3, .held_messages = 7, .held_bytes = 70,
		  .loop_max_us = 12 },
		{ .messages_in = 20, .bytes_in = 200, .cpu_seconds = 0.2 },
	};
	struct thread_rates out[2];

	(void)state;
	balancer_thread_rates(now, prev, 1, 2, 2.0, out);
	assert_true(out[0].messages_in_per_s == 100.0);
	assert_true(out[0].bytes_in_per_s == 2000.0);
	assert_true(out[0].messages_out_per_s == 0.0); /* went back */
	assert_true(out[0].bytes_out_per_s == 200.0);
	assert_true(out[0].cpu_percent == 25.0);
	assert_int_equal(out[0].connections, 3);
	assert_int_equal(out[0].held_messages, 7);
	assert_int_equal(out[0].held_bytes, 70);
	assert_int_equal(out[0].loop_max_us, 12);
	assert_true(out[1].messages_in_per_s == 10.0); /* new thread: from zero */
	assert_true(out[1].bytes_in_per_s == 100.0);
	assert_true(out[1].cpu_percent == 10.0);

	balancer_thread_rates(now, NULL, 0, 1, 0, out); /* the first sample */
	assert_true(out[0].messages_in_per_s == 0.0);
	assert_true(out[0].cpu_percent == 0.0);
	assert_int_equal(out[0].connections, 3);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_documented_defaults),
		cmocka_unit_test(test_balanced_no_move),
		cmocka_unit_test(test_skew_moves_the_vm_that_halves_the_gap),
		cmocka_unit_test(test_idle_thread_gets_load),
		cmocka_unit_test(test_single_big_vm_is_not_bounced),
		cmocka_unit_test(test_floor),
		cmocka_unit_test(test_hold_time),
		cmocka_unit_test(test_config_errors),
		cmocka_unit_test(test_observe_rates),
		cmocka_unit_test(test_thread_rates),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
