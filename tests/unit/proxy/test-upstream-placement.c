/* test-upstream-placement.c -- where upstream links go on a broker cluster: a
 * fleet's links are balanced over the nodes, a round of failover visits
 * every node once and ends where it began, and the links of a lost node
 * spread over all the survivors rather than onto one neighbour. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "upstream.h"

#define HOSTS 3000
#define THREADS 4

static void host_name(char *buf, size_t len, int i)
{
	snprintf(buf, len, "hv-%04d.dc1.example.net", i);
}

/* Within 10 % of a fair share. */
static void assert_balanced(const unsigned *count, size_t n, unsigned total)
{
	for (size_t i = 0; i < n; i++) {
		double share = (double)count[i] * (double)n / total;

		if (share < 0.9 || share > 1.1)
			fail_msg("node %zu has %u of %u (%.2f of a fair share)", i, count[i], total,
				 share);
	}
}

static void test_fleet_is_balanced(void **state)
{
	char name[64];

	for (size_t n = 2; n <= 7; n++) {
		unsigned count[8] = { 0 };

		for (int h = 0; h < HOSTS; h++) {
			host_name(name, sizeof(name), h);
			for (unsigned t = 0; t < THREADS; t++)
				count[upstream_link_spread(name, t) % n]++;
		}
		assert_balanced(count, n, HOSTS * THREADS);
	}
}

static void test_one_host_uses_consecutive_nodes(void **state)
{
	uint32_t s0 = upstream_link_spread("hv-1", 0);

	for (unsigned t = 1; t < 6; t++)
		assert_int_equal(upstream_link_spread("hv-1", t) % 3, (s0 + t) % 3);
	/* Stable: the same host starts on the same nodes after a restart, so the
	 * spread depends on the name's bytes alone: not on where they are in
	 * memory nor on what was asked before; and another name moves it. */
	char copy[8];
	uint32_t before = upstream_link_spread("hv-1", 2);

	snprintf(copy, sizeof(copy), "hv-%d", 1);
	for (int h = 0; h < 100; h++) {
		char other[16];

		snprintf(other, sizeof(other), "hv-x%d", h);
		(void)upstream_link_spread(other, (unsigned)h);
	}
	assert_int_equal(upstream_link_spread(copy, 2), before);
	assert_int_not_equal(upstream_link_spread("hv-2", 2), before);
}

static void test_a_round_visits_every_node_once(void **state)
{
	char name[64];

	for (size_t n = 1; n <= 7; n++) {
		for (int h = 0; h < 200; h++) {
			host_name(name, sizeof(name), h);
			uint32_t spread = upstream_link_spread(name, (unsigned)h % THREADS);

			for (size_t first = 0; first < n; first++) {
				unsigned seen[8] = { 0 };

				for (size_t k = 1; k < n; k++) {
					size_t node = upstream_failover_node(spread, first, k, n);

					assert_true(node < n);
					assert_int_not_equal(node, first);
					seen[node]++;
				}
				for (size_t i = 0; i < n; i++)
					if (i != first)
						assert_int_equal(seen[i], 1);
				assert_int_equal(upstream_failover_node(spread, first, n, n), first);
			}
		}
	}
}

static void test_lost_node_spreads_over_survivors(void **state)
{
	char name[64];

	for (size_t n = 3; n <= 5; n++) {
		unsigned count[8] = { 0 }, moved = 0;

		for (int h = 0; h < HOSTS; h++) {
			host_name(name, sizeof(name), h);
			for (unsigned t = 0; t < THREADS; t++) {
				uint32_t spread = upstream_link_spread(name, t);

				if (spread % n != 0)
					continue; /* node 0 is lost: only its links move */
				count[upstream_failover_node(spread, 0, 1, n)]++;
				moved++;
			}
		}
		assert_int_equal(count[0], 0);
		assert_balanced(count + 1, n - 1, moved);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_fleet_is_balanced),
		cmocka_unit_test(test_one_host_uses_consecutive_nodes),
		cmocka_unit_test(test_a_round_visits_every_node_once),
		cmocka_unit_test(test_lost_node_spreads_over_survivors),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
