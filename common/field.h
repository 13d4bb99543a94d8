/* field.h -- building rabbitmq-c field-table entries (client and server
 * properties, capabilities, message headers) in one line each. KEY and
 * string values are borrowed, not copied. */
#pragma once

#include <amqp.h>
#include <stdbool.h>
#include <stdint.h>

static inline amqp_table_entry_t field_bool(const char *key, bool v)
{
	amqp_table_entry_t e;

	e.key = amqp_cstring_bytes(key);
	e.value.kind = AMQP_FIELD_KIND_BOOLEAN;
	e.value.value.boolean = v;
	return e;
}

static inline amqp_table_entry_t field_utf8(const char *key, const char *v)
{
	amqp_table_entry_t e;

	e.key = amqp_cstring_bytes(key);
	e.value.kind = AMQP_FIELD_KIND_UTF8;
	e.value.value.bytes = amqp_cstring_bytes(v);
	return e;
}

static inline amqp_table_entry_t field_i64(const char *key, int64_t v)
{
	amqp_table_entry_t e;

	e.key = amqp_cstring_bytes(key);
	e.value.kind = AMQP_FIELD_KIND_I64;
	e.value.value.i64 = v;
	return e;
}

/* A nested table of N ENTRIES under KEY. */
static inline amqp_table_entry_t field_table(const char *key, amqp_table_entry_t *entries, int n)
{
	amqp_table_entry_t e;

	e.key = amqp_cstring_bytes(key);
	e.value.kind = AMQP_FIELD_KIND_TABLE;
	e.value.value.table.num_entries = n;
	e.value.value.table.entries = entries;
	return e;
}
