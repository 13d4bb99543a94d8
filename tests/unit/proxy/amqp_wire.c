/* amqp_wire.c -- see amqp_wire.h. */
#include "amqp_wire.h"

#include <stdlib.h>
#include <string.h>

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}

static uint32_t get32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

void wire_buf_free(struct wire_buf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

void wire_raw(struct wire_buf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;

		while (cap < b->len + n)
			cap *= 2;
		b->p = realloc(b->p, cap);
		if (!b->p)
			abort();
		b->cap = cap;
	}
	if (n)
		memcpy(b->p + b->len, p, n);
	b->len += n;
}

void wire_frame_end(struct wire_buf *b, uint8_t type, uint16_t ch, const void *payload, size_t n,
                    uint8_t end)
{
	uint8_t h[7];

	h[0] = type;
	put16(h + 1, ch);
	put32(h + 3, (uint32_t)n);
	wire_raw(b, h, sizeof(h));
	wire_raw(b, payload, n);
	wire_raw(b, &end, 1);
}

void wire_frame(struct wire_buf *b, uint8_t type, uint16_t ch, const void *payload, size_t n)
{
	wire_frame_end(b, type, ch, payload, n, 0xCE);
}

void wire_method(struct wire_buf *b, uint16_t ch, amqp_method_number_t id, void *decoded)
{
	uint8_t buf[65536];
	amqp_bytes_t enc = {sizeof(buf) - 4, buf + 4};
	int n = amqp_encode_method(id, decoded, enc);

	if (n < 0)
		abort();
	put32(buf, id);
	wire_frame(b, AMQP_FRAME_METHOD, ch, buf, (size_t)n + 4);
}

void wire_header(struct wire_buf *b, uint16_t ch, uint16_t class_id, uint64_t body_size,
                 const amqp_basic_properties_t *props)
{
	uint8_t buf[65536];
	amqp_basic_properties_t none;
	amqp_bytes_t enc = {sizeof(buf) - 12, buf + 12};
	int n;

	if (!props) {
		memset(&none, 0, sizeof(none));
		props = &none;
	}
	n = amqp_encode_properties(AMQP_BASIC_CLASS, (void *)props, enc);
	if (n < 0)
		abort();
	put16(buf, class_id);
	put16(buf + 2, 0);
	put32(buf + 4, (uint32_t)(body_size >> 32));
	put32(buf + 8, (uint32_t)body_size);
	wire_frame(b, AMQP_FRAME_HEADER, ch, buf, (size_t)n + 12);
}

void wire_body(struct wire_buf *b, uint16_t ch, const void *p, size_t n)
{
	wire_frame(b, AMQP_FRAME_BODY, ch, p, n);
}

void wire_heartbeat(struct wire_buf *b, uint16_t ch)
{
	wire_frame(b, AMQP_FRAME_HEARTBEAT, ch, NULL, 0);
}

void wire_protocol_header(struct wire_buf *b)
{
	static const uint8_t h[8] = {'A', 'M', 'Q', 'P', 0, 0, 9, 1};

	wire_raw(b, h, sizeof(h));
}

int wire_parse(const uint8_t *p, size_t n, struct wire_frame *out, int max, amqp_pool_t *pool)
{
	size_t off = 0;
	int k = 0;

	while (off < n) {
		struct wire_frame *f;
		uint32_t size;

		if (n - off < 8 || k == max)
			return -1;
		size = get32(p + off + 3);
		if (n - off < (size_t)size + 8 || p[off + 7 + size] != 0xCE)
			return -1;
		f = &out[k++];
		memset(f, 0, sizeof(*f));
		f->type = p[off];
		f->ch = (uint16_t)((p[off + 1] << 8) | p[off + 2]);
		f->size = size;
		f->payload = p + off + 7;
		if (f->type == AMQP_FRAME_METHOD && size >= 4) {
			amqp_bytes_t args = {size - 4, (void *)(f->payload + 4)};

			f->id = get32(f->payload);
			if (amqp_decode_method(f->id, pool, args, &f->decoded) < 0)
				f->decoded = NULL;
		}
		off += (size_t)size + 8;
	}
	return k;
}

uint8_t *wire_deep_table(unsigned depth, size_t *len)
{
	/* Each level is: u32 length, shortstr key "k", 'F', then the next table. */
	size_t per = 4 + 2 + 1, total = (size_t)depth * per - 3;
	uint8_t *t = malloc(total);
	size_t off = 0;

	if (!t)
		abort();
	for (unsigned i = 0; i < depth; i++) {
		size_t inner = total - off - 4;

		put32(t + off, (uint32_t)inner);
		off += 4;
		if (i + 1 == depth)
			break;
		t[off++] = 1;
		t[off++] = 'k';
		t[off++] = 'F';
	}
	*len = total;
	return t;
}
