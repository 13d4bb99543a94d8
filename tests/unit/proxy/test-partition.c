/* test-partition.c -- all connections of a VM go to one thread, new VMs go
 * to the least loaded thread, per-VM and table bounds hold. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>

#include "partition.h"

static void test_same_vm_same_thread(void **state)
{
	struct partition *p;
	unsigned t1, t2, t3;

	assert_int_equal(partition_new(4, 100, &p), 0);
	assert_int_equal(partition_assign_conn(p, "vm-a", 16, &t1), 0);
	assert_int_equal(partition_assign_conn(p, "vm-b", 16, &t2), 0);
	assert_int_equal(partition_assign_conn(p, "vm-a", 16, &t3), 0);
	assert_int_equal(t1, t3);
	assert_int_not_equal(t1, t2);
	partition_free(p);
}

static void test_least_loaded(void **state)
{
	struct partition *p;
	unsigned t, busy;
	uint32_t vms, conns;

	assert_int_equal(partition_new(3, 100, &p), 0);
	/* One VM with 5 connections makes its thread the busiest. */
	assert_int_equal(partition_assign_conn(p, "heavy", 16, &busy), 0);
	for (int i = 0; i < 4; i++)
		assert_int_equal(partition_assign_conn(p, "heavy", 16, &t), 0);
	for (int i = 0; i < 4; i++) {
		char name[16];
		snprintf(name, sizeof(name), "light-%d", i);
		assert_int_equal(partition_assign_conn(p, name, 16, &t), 0);
		assert_int_not_equal(t, busy);
	}
	partition_thread_load(p, busy, &vms, &conns);
	assert_int_equal(vms, 1);
	assert_int_equal(conns, 5);
	assert_int_equal(partition_total_conns(p), 9);
	partition_free(p);
}

static void test_per_vm_limit(void **state)
{
	struct partition *p;
	unsigned t;

	assert_int_equal(partition_new(2, 100, &p), 0);
	for (int i = 0; i < 3; i++)
		assert_int_equal(partition_assign_conn(p, "vm", 3, &t), 0);
	assert_int_equal(partition_assign_conn(p, "vm", 3, &t), -EMFILE);
	partition_release_conn(p, "vm");
	assert_int_equal(partition_assign_conn(p, "vm", 3, &t), 0);
	partition_free(p);
}

static void test_table_limit_and_release(void **state)
{
	struct partition *p;
	unsigned t;

	assert_int_equal(partition_new(2, 2, &p), 0);
	assert_int_equal(partition_assign_conn(p, "a", 4, &t), 0);
	assert_int_equal(partition_assign_conn(p, "b", 4, &t), 0);
	assert_int_equal(partition_assign_conn(p, "c", 4, &t), -ENOSPC);
	partition_release_conn(p, "a");
	assert_int_equal(partition_lookup(p, "a", &t), -ENOENT);
	assert_int_equal(partition_assign_conn(p, "c", 4, &t), 0);
	partition_free(p);
}

static void test_move(void **state)
{
	struct partition *p;
	unsigned t, t2;
	uint32_t vms, conns;

	assert_int_equal(partition_new(2, 10, &p), 0);
	assert_int_equal(partition_assign_conn(p, "a", 4, &t), 0);
	assert_int_equal(partition_assign_conn(p, "a", 4, &t), 0);
	assert_int_equal(partition_move_vm(p, "a", 1 - t), 0);
	assert_int_equal(partition_lookup(p, "a", &t2), 0);
	assert_int_equal(t2, 1 - t);
	partition_thread_load(p, t2, &vms, &conns);
	assert_int_equal(conns, 2);
	partition_thread_load(p, t, &vms, &conns);
	assert_int_equal(conns, 0);
	assert_int_equal(partition_move_vm(p, "a", 7), -EINVAL);
	partition_free(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_same_vm_same_thread),
		cmocka_unit_test(test_least_loaded),
		cmocka_unit_test(test_per_vm_limit),
		cmocka_unit_test(test_table_limit_and_release),
		cmocka_unit_test(test_move),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
