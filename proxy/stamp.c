/* stamp.c -- see stamp.h */
#include "stamp.h"

#include <strings.h>

#include "field.h"

bool stamp_reserved_header(amqp_bytes_t key)
{
	return (key.len >= 5 && strncasecmp(key.bytes, "x-vm-", 5) == 0) ||
	       (key.len >= 10 && strncasecmp(key.bytes, "x-vmproxy-", 10) == 0);
}

int stamp_encode(const struct stamp *s, const amqp_basic_properties_t *in, amqp_pool_t *pool,
		 void *out, size_t len)
{
	amqp_basic_properties_t p = *in;
	const amqp_table_t *gh = (in->_flags & AMQP_BASIC_HEADERS_FLAG) ? &in->headers : NULL;
	int n = gh ? gh->num_entries : 0, k = 0;
	amqp_table_entry_t *e;
	int r;

	e = amqp_pool_alloc(pool, sizeof(*e) * (size_t)(n + 5));
	if (!e)
		return AMQP_STATUS_NO_MEMORY;
	for (int i = 0; i < n; i++)
		if (!stamp_reserved_header(gh->entries[i].key))
			e[k++] = gh->entries[i];
	e[k++] = field_utf8("x-vm-uuid", s->uuid);
	e[k++] = field_utf8("x-vm-name", s->name);
	if (s->cid)
		e[k++] = field_i64("x-vm-cid", s->cid);
	e[k++] = field_utf8("x-vmproxy-host", s->host);
	e[k++] = field_i64("x-vmproxy-received-ms", s->received_ms);
	p.headers.num_entries = k;
	p.headers.entries = e;
	p._flags |= AMQP_BASIC_HEADERS_FLAG;
	p._flags &= ~AMQP_BASIC_USER_ID_FLAG;
	r = amqp_encode_properties(AMQP_BASIC_CLASS, &p, (amqp_bytes_t){ len, out });
	recycle_amqp_pool(pool);
	return r;
}
