/* test-stamp.c -- header stamping: spoofed x-vm-* and x-vmproxy-* headers
 * removed whatever their case, user_id dropped, the guest's other headers
 * and properties kept in order, x-vm-cid only for vsock, and a stamp that
 * does not fit refused rather than truncated. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "field.h"
#include "stamp.h"

static const struct stamp vm = { "6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60", "web-1", 0, "hv-7",
				 1700000000123 };

/* Stamp IN, decode the result back into *OUT (in POOL). */
static int roundtrip(const struct stamp *s, const amqp_basic_properties_t *in, amqp_pool_t *pool,
		     amqp_basic_properties_t **out)
{
	static uint8_t buf[65536];
	amqp_pool_t scratch;
	int n;

	init_amqp_pool(&scratch, 4096);
	n = stamp_encode(s, in, &scratch, buf, sizeof(buf));
	empty_amqp_pool(&scratch);
	if (n < 0)
		return n;
	assert_int_equal(amqp_decode_properties(AMQP_BASIC_CLASS, pool,
						(amqp_bytes_t){ (size_t)n, buf }, (void **)out),
			 0);
	return n;
}

static const amqp_field_value_t *header(const amqp_basic_properties_t *p, const char *key,
					int *count)
{
	const amqp_field_value_t *v = NULL;

	*count = 0;
	for (int i = 0; i < p->headers.num_entries; i++) {
		const amqp_bytes_t k = p->headers.entries[i].key;
		if (k.len == strlen(key) && memcmp(k.bytes, key, k.len) == 0) {
			v = &p->headers.entries[i].value;
			(*count)++;
		}
	}
	return v;
}

/* Header KEY, which must be there. */
static const amqp_field_value_t *present(const amqp_basic_properties_t *p, const char *key)
{
	int n;
	const amqp_field_value_t *v = header(p, key, &n);

	if (!v) {
		fail_msg("no header \"%s\"", key);
		abort(); /* not reached: fail_msg ends the test */
	}
	assert_int_equal(n, 1);
	return v;
}

static void assert_utf8(const amqp_basic_properties_t *p, const char *key, const char *want)
{
	const amqp_field_value_t *v = present(p, key);

	assert_int_equal(v->kind, AMQP_FIELD_KIND_UTF8);
	assert_int_equal(v->value.bytes.len, strlen(want));
	assert_memory_equal(v->value.bytes.bytes, want, strlen(want));
}

static void test_spoofed_headers_removed_in_any_case(void **state)
{
	amqp_table_entry_t guest[] = {
		field_utf8("X-VM-UUID", "00000000-0000-0000-0000-000000000000"),
		field_utf8("x-vm-name", "someone-else"),
		field_i64("x-Vm-Cid", 3),
		field_utf8("x-vmproxy-host", "forged"),
		field_utf8("X-VMPROXY-RECEIVED-MS", "0"),
		field_utf8("x-vmproxy-anything", "x"),
		field_utf8("app", "kept"),
		field_utf8("x-vmx", "kept too"), /* not the reserved prefix "x-vm-" */
		field_i64("x-vm", 1),	  /* nor this */
	};
	amqp_basic_properties_t in = { ._flags = AMQP_BASIC_HEADERS_FLAG |
						 AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_USER_ID_FLAG,
				       .content_type = amqp_cstring_bytes("application/json"),
				       .user_id = amqp_cstring_bytes("admin"),
				       .headers = { 9, guest } };
	amqp_basic_properties_t *out;
	amqp_pool_t pool;
	int n;

	(void)state;
	init_amqp_pool(&pool, 4096);
	assert_true(roundtrip(&vm, &in, &pool, &out) > 0);
	assert_false(out->_flags & AMQP_BASIC_USER_ID_FLAG);
	assert_true(out->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG);
	assert_int_equal(out->content_type.len, 16);
	assert_utf8(out, "x-vm-uuid", vm.uuid);
	assert_utf8(out, "x-vm-name", "web-1");
	assert_utf8(out, "x-vmproxy-host", "hv-7");
	assert_null(header(out, "x-vm-cid", &n)); /* not vsock: no CID, not the guest's 3 */
	assert_null(header(out, "X-VM-UUID", &n));
	assert_null(header(out, "x-vmproxy-anything", &n));
	assert_utf8(out, "app", "kept");
	assert_utf8(out, "x-vmx", "kept too");
	assert_int_equal(present(out, "x-vm")->value.i64, 1);
	assert_int_equal(present(out, "x-vmproxy-received-ms")->value.i64, vm.received_ms);
	/* The guest's own headers first, in their order, then the stamp. */
	assert_int_equal(out->headers.num_entries, 3 + 4);
	assert_memory_equal(out->headers.entries[0].key.bytes, "app", 3);
	empty_amqp_pool(&pool);
}

static void test_cid_is_the_connections(void **state)
{
	struct stamp s = vm;
	amqp_basic_properties_t in = { 0 }, *out;
	amqp_pool_t pool;

	(void)state;
	s.cid = 42;
	init_amqp_pool(&pool, 4096);
	assert_true(roundtrip(&s, &in, &pool, &out) > 0);
	assert_true(out->_flags & AMQP_BASIC_HEADERS_FLAG);
	assert_int_equal(present(out, "x-vm-cid")->value.i64, 42);
	empty_amqp_pool(&pool);
}

static void test_does_not_fit(void **state)
{
	amqp_basic_properties_t in = { 0 };
	amqp_pool_t pool;
	uint8_t small[64];

	(void)state;
	init_amqp_pool(&pool, 4096);
	assert_true(stamp_encode(&vm, &in, &pool, small, sizeof(small)) < 0);
	empty_amqp_pool(&pool);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_spoofed_headers_removed_in_any_case),
		cmocka_unit_test(test_cid_is_the_connections),
		cmocka_unit_test(test_does_not_fit),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
