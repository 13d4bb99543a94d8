/* test-log.c -- what reaches the log of an untrusted string: log_sanitize
 * replaces control bytes and quotes, keeps what fits the caller's buffer
 * and marks the cut with "..."; log_escape keeps the whole text on one
 * line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "log.h"

static void test_sanitize_replaces_and_keeps_short_text(void **state)
{
	char buf[80];

	(void)state;
	assert_string_equal(log_sanitize(buf, sizeof(buf), "a\"b\nc\x7f\x01", 7), "a?b?c??");
	assert_string_equal(log_sanitize(buf, sizeof(buf), "", 0), "");
	/* DATA_LEN counts: a NUL inside is a byte like any other. */
	assert_string_equal(log_sanitize(buf, sizeof(buf), "ab\0cd", 5), "ab?cd");
}

/* The buffer is the cap: a broker's 120-character reply text is kept
 * whole in a 170-byte buffer and cut, marked, in an 80-byte one. */
static void test_sanitize_cap_is_the_buffer(void **state)
{
	char text[121], big[170], small[80], want[80];

	(void)state;
	for (int i = 0; i < 120; i++)
		text[i] = (char)('a' + i % 26);
	text[120] = '\0';
	assert_string_equal(log_sanitize(big, sizeof(big), text, 120), text);
	log_sanitize(small, sizeof(small), text, 120);
	memcpy(want, text, 76);
	memcpy(want + 76, "...", 4);
	assert_string_equal(small, want);
	assert_int_equal(strlen(small), sizeof(small) - 1);
}

static void test_sanitize_tiny_buffers(void **state)
{
	char b[5] = "xxxx";

	(void)state;
	assert_string_equal(log_sanitize(b, 5, "abcdef", 6), "a...");
	assert_string_equal(log_sanitize(b, 4, "abcdef", 6), "...");
	assert_string_equal(log_sanitize(b, 1, "abcdef", 6), "");
	b[0] = 'x';
	log_sanitize(b, 0, "abcdef", 6); /* writes nothing */
	assert_int_equal(b[0], 'x');
}

static void test_escape_one_line(void **state)
{
	char buf[64];

	(void)state;
	log_escape(buf, sizeof(buf), "bye\nERROR forged line\r\tx");
	assert_null(strchr(buf, '\n'));
	assert_null(strchr(buf, '\r'));
	assert_non_null(strstr(buf, "forged line"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sanitize_replaces_and_keeps_short_text),
		cmocka_unit_test(test_sanitize_cap_is_the_buffer),
		cmocka_unit_test(test_sanitize_tiny_buffers),
		cmocka_unit_test(test_escape_one_line),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
