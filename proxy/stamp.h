/* stamp.h -- what vmproxyd does to a guest message's properties on the way
 * to the broker: the guest's user_id is dropped, headers it sent named
 * x-vm-* or x-vmproxy-* (in any case) are removed, and the proxy's own
 * stamp (who sent it, where, when) is added. */
#pragma once

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct stamp {
	const char *uuid;    /* x-vm-uuid */
	const char *name;    /* x-vm-name */
	uint32_t cid;	     /* x-vm-cid, the connection's vsock CID; 0: not vsock, no header */
	const char *host;    /* x-vmproxy-host */
	int64_t received_ms; /* x-vmproxy-received-ms, wall clock */
};

/* True for a header name the guest may not set (x-vm-*, x-vmproxy-*). */
bool stamp_reserved_header(amqp_bytes_t key);

/* Encode IN, stamped with S, as basic properties (flags and list, the form
 * a content header carries) into OUT (LEN bytes). POOL is scratch space,
 * recycled before returning. Returns the encoded length, or a negative
 * rabbitmq-c status (AMQP_STATUS_BAD_AMQP_DATA when OUT is too small). */
int stamp_encode(const struct stamp *s, const amqp_basic_properties_t *in, amqp_pool_t *pool,
		 void *out, size_t len);
