/* fuzz-stamp.c -- libFuzzer harness for header stamping: the input builds
 * a guest's basic properties (headers with keys, kinds and values taken
 * from the bytes, reserved names in any case among them, nested tables and
 * arrays, user_id). Whatever the guest sent, the stamped result must decode,
 * carry exactly one of each stamp header with the proxy's values, no
 * user_id and no other reserved header, and keep every other guest header
 * in order. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "stamp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_ENTRIES 32

static const char *const names[] = {
	"x-vm-uuid", "X-VM-NAME", "x-Vm-Cid", "x-vmproxy-host", "X-VMPROXY-received-ms",
	"x-vm-", "x-vmproxy-", "x-vm", "x-vmproxy", "app", "x-vmx", "",
};

struct input {
	const uint8_t *p;
	size_t n;
};

static uint8_t take(struct input *in)
{
	if (!in->n)
		return 0;
	in->n--;
	return *in->p++;
}

static amqp_bytes_t take_bytes(struct input *in, size_t max)
{
	size_t len = take(in) % (max + 1);
	amqp_bytes_t b;

	if (len > in->n)
		len = in->n;
	b.len = len;
	b.bytes = (void *)in->p;
	in->p += len;
	in->n -= len;
	return b;
}

static void fill_value(struct input *in, amqp_field_value_t *v, amqp_pool_t *pool, int depth)
{
	uint8_t k = take(in) % 5;

	if (depth >= 3 && k >= 3)
		k = 0;
	switch (k) {
	case 0:
		v->kind = AMQP_FIELD_KIND_UTF8;
		v->value.bytes = take_bytes(in, 40);
		break;
	case 1:
		v->kind = AMQP_FIELD_KIND_I64;
		v->value.i64 = (int64_t)take(in) << 40 | take(in);
		break;
	case 2:
		v->kind = AMQP_FIELD_KIND_BOOLEAN;
		v->value.boolean = take(in) & 1;
		break;
	case 3: {
		int n = take(in) % 4;
		amqp_table_entry_t *e = amqp_pool_alloc(pool, sizeof(*e) * 4);
		v->kind = AMQP_FIELD_KIND_TABLE;
		v->value.table.num_entries = e ? n : 0;
		v->value.table.entries = e;
		for (int i = 0; e && i < n; i++) {
			e[i].key = take_bytes(in, 12);
			fill_value(in, &e[i].value, pool, depth + 1);
		}
		break;
	}
	default: {
		int n = take(in) % 4;
		amqp_field_value_t *a = amqp_pool_alloc(pool, sizeof(*a) * 4);
		v->kind = AMQP_FIELD_KIND_ARRAY;
		v->value.array.num_entries = a ? n : 0;
		v->value.array.entries = a;
		for (int i = 0; a && i < n; i++)
			fill_value(in, &a[i], pool, depth + 1);
		break;
	}
	}
}

static bool same_key(amqp_bytes_t k, const char *s)
{
	return k.len == strlen(s) && memcmp(k.bytes, s, k.len) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t out[1 << 20];
	struct input in = { data, size };
	struct stamp st = { "6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60", "vm", 0, "hv", 12345 };
	amqp_table_entry_t e[MAX_ENTRIES];
	amqp_basic_properties_t p = { 0 }, *dec = NULL;
	amqp_pool_t pool, scratch, dpool;
	int n = take(&in) % (MAX_ENTRIES + 1), kept = 0, r;

	init_amqp_pool(&pool, 4096);
	init_amqp_pool(&scratch, 4096);
	init_amqp_pool(&dpool, 4096);
	st.cid = take(&in) & 1 ? 7 : 0;
	if (take(&in) & 1) {
		p._flags |= AMQP_BASIC_USER_ID_FLAG;
		p.user_id = take_bytes(&in, 20);
	}
	if (n) {
		p._flags |= AMQP_BASIC_HEADERS_FLAG;
		p.headers.num_entries = n;
		p.headers.entries = e;
	}
	for (int i = 0; i < n; i++) {
		uint8_t sel = take(&in);
		e[i].key = sel < 128 ? amqp_cstring_bytes(names[sel % (sizeof(names) / sizeof(names[0]))])
				     : take_bytes(&in, 20);
		fill_value(&in, &e[i].value, &pool, 1);
		if (!stamp_reserved_header(e[i].key))
			kept++;
	}
	r = stamp_encode(&st, &p, &scratch, out, sizeof(out));
	if (r < 0)
		abort(); /* everything built here fits in 1 MiB */
	if (amqp_decode_properties(AMQP_BASIC_CLASS, &dpool, (amqp_bytes_t){ (size_t)r, out },
				   (void **)&dec) != 0)
		abort();
	if ((dec->_flags & AMQP_BASIC_USER_ID_FLAG) || !(dec->_flags & AMQP_BASIC_HEADERS_FLAG))
		abort();
	if (dec->headers.num_entries != kept + 4 + (st.cid ? 1 : 0))
		abort();
	for (int i = 0, j = 0; i < n; i++) {
		if (stamp_reserved_header(e[i].key))
			continue;
		if (dec->headers.entries[j].key.len != e[i].key.len ||
		    (e[i].key.len &&
		     memcmp(dec->headers.entries[j].key.bytes, e[i].key.bytes, e[i].key.len) != 0))
			abort(); /* a guest header lost or reordered */
		j++;
	}
	for (int i = kept; i < dec->headers.num_entries; i++) {
		amqp_bytes_t k = dec->headers.entries[i].key;
		if (!stamp_reserved_header(k))
			abort();
		if (same_key(k, "x-vm-uuid") &&
		    (dec->headers.entries[i].value.value.bytes.len != strlen(st.uuid)))
			abort();
	}
	empty_amqp_pool(&pool);
	empty_amqp_pool(&scratch);
	empty_amqp_pool(&dpool);
	return 0;
}
