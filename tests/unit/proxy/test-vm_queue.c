/* test-vm_queue.c -- the poll thread's fair queue of VMs: one message per
 * turn in round robin, a VM at its share of the window is passed over
 * until one of its messages settles, the share is window / min(waiting,
 * 4) and at least 1, a lone VM is not limited, and an entry is queued at
 * most once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "vm_queue.h"

#define NVM 6

struct vm {
	struct vmq_entry q;
	unsigned waiting; /* messages not yet published */
};

static struct vm vms[NVM];

static int setup(void **state)
{
	(void)state;
	memset(vms, 0, sizeof(vms));
	return 0;
}

static int index_of(const struct vmq_entry *e)
{
	return e ? (int)((const struct vm *)e - vms) : -1;
}

/* Publish one message from the picked VM; -1 when none may send. */
static int send_one(struct vm_queue *q, uint32_t window)
{
	struct vmq_entry *e = vm_queue_pick(q, window);
	int i = index_of(e);

	if (i < 0)
		return -1;
	vms[i].waiting--;
	vm_queue_sent(q, vms[i].waiting > 0);
	return i;
}

static void test_round_robin(void **state)
{
	struct vm_queue q = {0};
	int order[9];

	(void)state;
	for (int i = 0; i < 3; i++) {
		vms[i].waiting = 3;
		vm_queue_add(&q, &vms[i].q);
	}
	for (int n = 0; n < 9; n++)
		order[n] = send_one(&q, 1000);
	for (int n = 0; n < 9; n++)
		assert_int_equal(order[n], n % 3);
	assert_int_equal(q.len, 0);
	assert_null(q.head);
	assert_null(q.tail);
	assert_int_equal(send_one(&q, 1000), -1);
	for (int i = 0; i < 3; i++)
		assert_int_equal(vms[i].q.inflight, 3);
}

static void test_added_once(void **state)
{
	struct vm_queue q = {0};

	(void)state;
	vms[0].waiting = 1;
	vm_queue_add(&q, &vms[0].q);
	vm_queue_add(&q, &vms[0].q);
	assert_int_equal(q.len, 1);
	assert_int_equal(send_one(&q, 10), 0);
	assert_int_equal(send_one(&q, 10), -1);
}

/* Two VMs waiting, window 8: each may hold 4 unconfirmed. A flooding VM
 * at its share is passed over; the other one keeps its turns. */
static void test_share_of_two(void **state)
{
	struct vm_queue q = {0};

	(void)state;
	vms[0].waiting = 100;
	vms[1].waiting = 100;
	vm_queue_add(&q, &vms[0].q);
	vm_queue_add(&q, &vms[1].q);
	for (int n = 0; n < 8; n++)
		assert_int_equal(send_one(&q, 8), n % 2);
	assert_int_equal(send_one(&q, 8), -1); /* both at 4 */
	vm_queue_settled(&vms[1].q);
	assert_int_equal(send_one(&q, 8), 1);
	assert_int_equal(send_one(&q, 8), -1);
	vm_queue_settled(&vms[0].q);
	vm_queue_settled(&vms[0].q);
	assert_int_equal(send_one(&q, 8), 0);
	assert_int_equal(send_one(&q, 8), 0);
	assert_int_equal(send_one(&q, 8), -1);
}

/* With more than four VMs waiting, each still gets a quarter. */
static void test_share_caps_at_four_ways(void **state)
{
	struct vm_queue q = {0};

	(void)state;
	for (int i = 0; i < NVM; i++) {
		vms[i].waiting = 100;
		vm_queue_add(&q, &vms[i].q);
	}
	vms[0].q.inflight = 24; /* window 100: share 25 */
	assert_int_equal(send_one(&q, 100), 0);
	assert_int_equal(vms[0].q.inflight, 25);
	for (int i = 1; i < NVM; i++)
		assert_int_equal(send_one(&q, 100), i);
	assert_int_equal(send_one(&q, 100), 1); /* 0 is at 25 */
}

static void test_share_at_least_one(void **state)
{
	struct vm_queue q = {0};

	(void)state;
	for (int i = 0; i < 4; i++) {
		vms[i].waiting = 2;
		vm_queue_add(&q, &vms[i].q);
	}
	/* Window 2, four ways: share 0 rounds up to 1. */
	for (int i = 0; i < 4; i++)
		assert_int_equal(send_one(&q, 2), i);
	assert_int_equal(send_one(&q, 2), -1);
}

/* Alone, a VM is limited by the link's window only. */
static void test_lone_vm_unlimited(void **state)
{
	struct vm_queue q = {0};

	(void)state;
	vms[0].waiting = 1000;
	vm_queue_add(&q, &vms[0].q);
	for (int n = 0; n < 1000; n++)
		assert_int_equal(send_one(&q, 4), 0);
	assert_int_equal(vms[0].q.inflight, 1000);
}

/* A VM passed over at its share keeps its place: once settled it is next
 * before the VMs behind it. */
static void test_passed_over_keeps_place(void **state)
{
	struct vm_queue q = {0};

	(void)state;
	for (int i = 0; i < 3; i++) {
		vms[i].waiting = 10;
		vm_queue_add(&q, &vms[i].q);
	}
	vms[0].q.inflight = 3; /* window 9, three ways: share 3 */
	assert_int_equal(send_one(&q, 9), 1);
	vm_queue_settled(&vms[0].q);
	assert_int_equal(send_one(&q, 9), 0);
	assert_int_equal(send_one(&q, 9), 2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	        cmocka_unit_test_setup(test_round_robin, setup),
	        cmocka_unit_test_setup(test_added_once, setup),
	        cmocka_unit_test_setup(test_share_of_two, setup),
	        cmocka_unit_test_setup(test_share_caps_at_four_ways, setup),
	        cmocka_unit_test_setup(test_share_at_least_one, setup),
	        cmocka_unit_test_setup(test_lone_vm_unlimited, setup),
	        cmocka_unit_test_setup(test_passed_over_keeps_place, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
