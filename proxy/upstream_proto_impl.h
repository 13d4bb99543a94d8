/* upstream_proto_impl.h -- private to the link engine's own files
 * (upstream_proto.c, upstream_handshake.c, upstream_publish.c,
 * upstream_inbox.c): what the units call in one another. The state itself,
 * struct upstream_proto, is in upstream_proto.h because its owner embeds it. */
#pragma once

#include "upstream_proto.h"

#define HEADER_FRAME_FIXED 12 /* class u16, weight u16, body size u64 */

/* ---- upstream_proto.c: output, errors ---------------------------------------- */

/* A name for state ST in error texts ("waiting for connection.tune"). */
const char *up_state_name(enum upstream_proto_state st);
/* Room for N more output bytes; false when out of memory. */
bool up_out_reserve(struct upstream_proto *p, size_t n);
/* The 7-byte frame header of a TYPE frame of SIZE payload bytes on CH at B. */
void up_put_frame_header(uint8_t *b, uint8_t type, uint16_t ch, uint32_t size);
/* Append method ID with DECODED arguments as a method frame on CH; 0,
 * -ENOMEM or -EINVAL (cannot encode). */
int up_send_method(struct upstream_proto *p, uint16_t ch, amqp_method_number_t id,
		   void *decoded);
/* End the link with CODE: connection.close queued unless the broker already
 * closed it or the handshake has not got that far. */
void up_fail(struct upstream_proto *p, uint16_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* ---- upstream_handshake.c: the connection class ------------------------------ */

/* Decoded method ID (arguments M) on channel 0 at NOW. */
void up_on_connection_method(struct upstream_proto *p, amqp_method_number_t id, void *m,
			     uint64_t now);

/* ---- upstream_publish.c: the publish channel, confirms, returns -------------- */

/* Decoded method ID (arguments M) on UPSTREAM_PROTO_CHANNEL. */
void up_on_channel_method(struct upstream_proto *p, amqp_method_number_t id, void *m);
/* Content header and body frames of a basic.return. */
void up_on_return_header(struct upstream_proto *p, const uint8_t *f, size_t len);
void up_on_return_body(struct upstream_proto *p, const uint8_t *f, size_t len);
/* Forget a returned message being assembled. */
void up_ret_reset(struct upstream_proto *p);

/* ---- upstream_inbox.c: the inbox channel ------------------------------------- */

/* Decoded method ID (arguments M) on UPSTREAM_PROTO_INBOX_CHANNEL. */
void up_on_inbox_method(struct upstream_proto *p, amqp_method_number_t id, void *m);
/* Content header and body frames of a delivery or get-ok. */
void up_on_deliver_header(struct upstream_proto *p, const uint8_t *f, size_t len);
void up_on_deliver_body(struct upstream_proto *p, const uint8_t *f, size_t len);
/* Forget a delivery being assembled. */
void up_ib_reset_delivery(struct upstream_proto *p);
