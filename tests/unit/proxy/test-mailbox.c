/* test-mailbox.c -- the MPSC mailbox delivers every message exactly once,
 * in per-producer order, with four producers racing one consumer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <poll.h>
#include <pthread.h>
#include <stdlib.h>

#include "mailbox.h"

#define PRODUCERS 4
#define PER_PRODUCER 200000

struct item {
	struct mail mail;
	unsigned producer;
	unsigned seq;
};

static struct mailbox mb;

static void *producer(void *arg)
{
	unsigned id = (unsigned)(uintptr_t)arg;

	for (unsigned i = 0; i < PER_PRODUCER; i++) {
		struct item *it = malloc(sizeof(*it));
		it->producer = id;
		it->seq = i;
		mailbox_post(&mb, &it->mail);
	}
	return NULL;
}

static void test_empty(void **state)
{
	struct mailbox m;

	assert_int_equal(mailbox_init(&m), 0);
	assert_null(mailbox_take(&m));
	mailbox_destroy(&m);
}

static void test_single_thread_fifo(void **state)
{
	struct mailbox m;
	struct item items[5];

	assert_int_equal(mailbox_init(&m), 0);
	for (unsigned i = 0; i < 5; i++) {
		items[i].seq = i;
		mailbox_post(&m, &items[i].mail);
	}
	mailbox_ack(&m);
	for (unsigned i = 0; i < 5; i++) {
		struct item *it = (struct item *)mailbox_take(&m);
		assert_non_null(it);
		assert_int_equal(it->seq, i);
	}
	assert_null(mailbox_take(&m));
	mailbox_destroy(&m);
}

static void test_concurrent_producers(void **state)
{
	pthread_t t[PRODUCERS];
	unsigned next[PRODUCERS] = { 0 };
	unsigned long total = 0;

	assert_int_equal(mailbox_init(&mb), 0);
	for (unsigned i = 0; i < PRODUCERS; i++)
		pthread_create(&t[i], NULL, producer, (void *)(uintptr_t)i);
	while (total < (unsigned long)PRODUCERS * PER_PRODUCER) {
		struct pollfd pfd = { mailbox_fd(&mb), POLLIN, 0 };
		struct mail *m;

		/* Every message is announced by the eventfd: no wake-up is lost. */
		assert_true(poll(&pfd, 1, 10000) == 1);
		mailbox_ack(&mb);
		while ((m = mailbox_take(&mb))) {
			struct item *it = (struct item *)m;
			assert_int_equal(it->seq, next[it->producer]);
			next[it->producer]++;
			total++;
			free(it);
		}
	}
	for (unsigned i = 0; i < PRODUCERS; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(next[i], PER_PRODUCER);
	}
	assert_null(mailbox_take(&mb));
	mailbox_destroy(&mb);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_empty),
		cmocka_unit_test(test_single_thread_fifo),
		cmocka_unit_test(test_concurrent_producers),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
