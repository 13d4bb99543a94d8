/* amqp_frame.h -- AMQP 0-9-1 framing for the guest-facing server: frame
 * header layout, big-endian helpers, and a bounded, non-recursive
 * validator for encoded field tables, run before rabbitmq-c's decoder
 * (which recurses without limit) ever sees a guest's table. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define AMQP_FRAME_HEADER_SIZE 7 /* type u8, channel u16, size u32 */
#define AMQP_FRAME_END_OCTET   0xCE
#define AMQP_FRAME_MIN_SIZE    4096 /* frame_max floor, and the limit before tune */

enum amqp_frame_type {
	AMQP_FT_METHOD = 1,
	AMQP_FT_HEADER = 2,
	AMQP_FT_BODY = 3,
	AMQP_FT_HEARTBEAT = 8,
};

static inline uint16_t amqp_frame_get16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t amqp_frame_get32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t amqp_frame_get64(const uint8_t *p)
{
	return ((uint64_t)amqp_frame_get32(p) << 32) | amqp_frame_get32(p + 4);
}

static inline void amqp_frame_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void amqp_frame_put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* Validate the entries of an encoded field table (P, LEN: the bytes after
 * the table's 4-byte length). Arrays and nested tables count towards
 * MAX_DEPTH (the outer table is depth 1). Returns 0, -ELOOP when nested too
 * deep, or -EBADMSG when malformed (truncated, unknown field type, bad
 * lengths). Never recurses. */
int amqp_frame_check_table(const uint8_t *p, size_t len, unsigned max_depth);

/* Validate a length-prefixed table at P (AVAIL bytes available); on success
 * *CONSUMED is 4 + its length. */
int amqp_frame_check_table_prefixed(const uint8_t *p, size_t avail, unsigned max_depth,
				    size_t *consumed);

/* Skip a short string at P: on success *CONSUMED is 1 + its length. */
int amqp_frame_skip_shortstr(const uint8_t *p, size_t avail, size_t *consumed);
