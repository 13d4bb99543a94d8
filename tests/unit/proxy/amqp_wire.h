/* amqp_wire.h -- a test-side AMQP 0-9-1 frame builder and parser, kept
 * independent of the engine's framing so that the tests check it rather
 * than mirror it. Method and property bodies go through rabbitmq-c. */
#pragma once

#include <amqp.h>
#include <amqp_framing.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A growable byte buffer; wire_buf_free releases it. */
struct wire_buf {
	uint8_t *p;
	size_t len, cap;
};

void wire_buf_free(struct wire_buf *b);
void wire_raw(struct wire_buf *b, const void *p, size_t n);
/* A frame of TYPE on CH with PAYLOAD; END is the end octet (0xCE normally). */
void wire_frame_end(struct wire_buf *b, uint8_t type, uint16_t ch, const void *payload, size_t n,
                    uint8_t end);
void wire_frame(struct wire_buf *b, uint8_t type, uint16_t ch, const void *payload, size_t n);
/* A method frame with rabbitmq-c's encoding of DECODED. */
void wire_method(struct wire_buf *b, uint16_t ch, amqp_method_number_t id, void *decoded);
/* A content header for CLASS_ID with BODY_SIZE and PROPS (NULL: none). */
void wire_header(struct wire_buf *b, uint16_t ch, uint16_t class_id, uint64_t body_size,
                 const amqp_basic_properties_t *props);
void wire_body(struct wire_buf *b, uint16_t ch, const void *p, size_t n);
void wire_heartbeat(struct wire_buf *b, uint16_t ch);
void wire_protocol_header(struct wire_buf *b);

/* A parsed frame; DECODED is in the parser's pool for method frames
 * (NULL when rabbitmq-c cannot decode the method). */
struct wire_frame {
	uint8_t type;
	uint16_t ch;
	uint32_t size;
	const uint8_t *payload;
	amqp_method_number_t id;
	void *decoded;
};

/* Parse N bytes of complete frames into OUT (at most MAX). Returns the
 * number of frames, or -1 when the bytes are not whole, well-terminated
 * frames (a bad end octet, a truncated frame). */
int wire_parse(const uint8_t *p, size_t n, struct wire_frame *out, int max, amqp_pool_t *pool);

/* An encoded field table nested DEPTH levels deep (the outer table
 * included), with its 4-byte length prefix; malloc'd into *LEN bytes. */
uint8_t *wire_deep_table(unsigned depth, size_t *len);
