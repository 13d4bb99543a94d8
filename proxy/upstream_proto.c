/* upstream_proto.c -- see upstream_proto.h. The link engine's core: output,
 * errors, input framing, timers and the owner's calls. The other units are
 * upstream_handshake.c (the connection class), upstream_publish.c (the
 * publish channel: publish, confirms, returns) and upstream_inbox.c (the
 * inbox channel); they share upstream_proto_impl.h.
 *
 * Output is one growing buffer: the owner writes it with as few TLS writes
 * as the data needs (a whole loop iteration's publishes at once), which is
 * the point of owning the frame layer. Input frames are parsed in place
 * from what the owner read; only a frame split across reads is copied. */
#include "upstream_proto_impl.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"

#define OUT_KEEP (256u << 10) /* larger idle output buffers are given back */

static const uint8_t protocol_header[8] = { 'A', 'M', 'Q', 'P', 0, 0, 9, 1 };

const char *up_state_name(enum upstream_proto_state st)
{
	static const char *const names[] = {
		[UPSTREAM_PROTO_START] = "waiting for connection.start",
		[UPSTREAM_PROTO_TUNE] = "waiting for connection.tune",
		[UPSTREAM_PROTO_OPEN] = "waiting for connection.open-ok",
		[UPSTREAM_PROTO_CHANNEL_OPEN] = "waiting for channel.open-ok",
		[UPSTREAM_PROTO_SELECT] = "waiting for confirm.select-ok",
		[UPSTREAM_PROTO_READY] = "publishing",
		[UPSTREAM_PROTO_CLOSING] = "closing",
		[UPSTREAM_PROTO_CLOSED] = "closed",
	};
	return names[st];
}

/* ---- output ------------------------------------------------------------------ */

bool up_out_reserve(struct upstream_proto *p, size_t n)
{
	size_t pending = p->out_len - p->out_off;
	size_t cap;
	uint8_t *o;

	if (p->out_off > 0 && p->out_len + n > p->out_cap) {
		memmove(p->out, p->out + p->out_off, pending);
		p->out_len = pending;
		p->out_off = 0;
	}
	if (p->out_len + n <= p->out_cap)
		return true;
	cap = p->out_cap ? p->out_cap : 16384;
	while (cap < p->out_len + n)
		cap *= 2;
	o = realloc(p->out, cap);
	if (!o)
		return false;
	p->out = o;
	p->out_cap = cap;
	return true;
}

void up_put_frame_header(uint8_t *b, uint8_t type, uint16_t ch, uint32_t size)
{
	b[0] = type;
	amqp_frame_put16(b + 1, ch);
	amqp_frame_put32(b + 3, size);
}

/* Append METHOD_ID with DECODED arguments as a method frame on CH. */
int up_send_method(struct upstream_proto *p, uint16_t ch, amqp_method_number_t id,
		   void *decoded)
{
	size_t room = 4096;
	uint8_t *b;
	int n;

	for (;;) {
		if (!up_out_reserve(p, room + 12))
			return -ENOMEM;
		b = p->out + p->out_len;
		n = amqp_encode_method(id, decoded, (amqp_bytes_t){ room, b + 11 });
		if (n != AMQP_STATUS_BAD_AMQP_DATA || room >= p->frame_max)
			break;
		room *= 4; /* a large client-properties table */
	}
	if (n < 0)
		return -EINVAL;
	up_put_frame_header(b, AMQP_FT_METHOD, ch, (uint32_t)n + 4);
	amqp_frame_put32(b + 7, id);
	b[11 + n] = AMQP_FRAME_END_OCTET;
	p->out_len += (size_t)n + 12;
	return 0;
}

static void send_heartbeat(struct upstream_proto *p)
{
	static const uint8_t hb[8] = { AMQP_FT_HEARTBEAT, 0, 0, 0, 0, 0, 0, AMQP_FRAME_END_OCTET };

	if (up_out_reserve(p, sizeof(hb))) {
		memcpy(p->out + p->out_len, hb, sizeof(hb));
		p->out_len += sizeof(hb);
	}
}

/* End the link with CODE: connection.close queued unless the broker already
 * closed it or the handshake has not got that far. */
void up_fail(struct upstream_proto *p, uint16_t code, const char *fmt, ...)
{
	va_list ap;

	if (p->st == UPSTREAM_PROTO_CLOSED)
		return;
	va_start(ap, fmt);
	vsnprintf(p->error, sizeof(p->error), fmt, ap);
	va_end(ap);
	p->error_code = code;
	if (code && !p->close_received && p->st > UPSTREAM_PROTO_START &&
	    p->st != UPSTREAM_PROTO_CLOSING) {
		amqp_connection_close_t cl = { .reply_code = code,
					       .reply_text = amqp_cstring_bytes(p->error) };
		up_send_method(p, 0, AMQP_CONNECTION_CLOSE_METHOD, &cl);
	}
	p->st = UPSTREAM_PROTO_CLOSED;
}

/* ---- frames from the broker ----------------------------------------------------- */

/* Tables the broker sends are checked before rabbitmq-c's recursive decoder
 * sees them: connection.start's server properties are the only ones a
 * publish-only link receives. */
static int check_tables(amqp_method_number_t id, const uint8_t *args, size_t len)
{
	size_t used;

	if (id != AMQP_CONNECTION_START_METHOD)
		return 0;
	if (len < 2)
		return -EBADMSG;
	return amqp_frame_check_table_prefixed(args + 2, len - 2, UPSTREAM_PROTO_TABLE_DEPTH,
					       &used);
}

static void on_method(struct upstream_proto *p, uint16_t ch, const uint8_t *f, size_t len,
		      uint64_t now)
{
	amqp_method_number_t id;
	void *m = NULL;
	int r;

	if (len < 4) {
		up_fail(p, 501, "method frame of %zu bytes", len);
		return;
	}
	id = amqp_frame_get32(f);
	if (p->st == UPSTREAM_PROTO_CLOSING && id != AMQP_CONNECTION_CLOSE_OK_METHOD &&
	    id != AMQP_CONNECTION_CLOSE_METHOD && id != AMQP_BASIC_ACK_METHOD &&
	    id != AMQP_BASIC_NACK_METHOD)
		return; /* what crosses our close is moot */
	r = check_tables(id, f + 4, len - 4);
	if (r == 0)
		r = amqp_decode_method(id, &p->pool, (amqp_bytes_t){ len - 4, (void *)(f + 4) }, &m);
	if (r < 0 || !m) {
		up_fail(p, 502, "SYNTAX_ERROR - malformed method 0x%08x (%zu bytes)", id, len);
		return;
	}
	if (ch == 0)
		up_on_connection_method(p, id, m, now);
	else if (ch == UPSTREAM_PROTO_INBOX_CHANNEL)
		up_on_inbox_method(p, id, m);
	else if (p->ret.active)
		up_fail(p, 505, "UNEXPECTED_FRAME - method 0x%08x where returned content was due",
			id);
	else
		up_on_channel_method(p, id, m);
}

static void on_frame(struct upstream_proto *p, uint8_t type, uint16_t ch, const uint8_t *f,
		     size_t len, uint64_t now)
{
	if (ch != 0 && ch != UPSTREAM_PROTO_CHANNEL &&
	    !(ch == UPSTREAM_PROTO_INBOX_CHANNEL && p->ib.open)) {
		up_fail(p, 504, "CHANNEL_ERROR - frame on channel %u, which was never opened", ch);
		return;
	}
	switch (type) {
	case AMQP_FT_METHOD:
		on_method(p, ch, f, len, now);
		break;
	case AMQP_FT_HEARTBEAT:
		if (ch != 0 || len != 0)
			up_fail(p, 501, "FRAME_ERROR - malformed heartbeat frame");
		break;
	case AMQP_FT_HEADER:
		if (ch == UPSTREAM_PROTO_INBOX_CHANNEL)
			up_on_deliver_header(p, f, len);
		else if (ch != UPSTREAM_PROTO_CHANNEL)
			up_fail(p, 504, "CHANNEL_ERROR - content header on channel 0");
		else
			up_on_return_header(p, f, len);
		break;
	case AMQP_FT_BODY:
		if (ch == UPSTREAM_PROTO_INBOX_CHANNEL)
			up_on_deliver_body(p, f, len);
		else if (ch != UPSTREAM_PROTO_CHANNEL)
			up_fail(p, 504, "CHANNEL_ERROR - body frame on channel 0");
		else
			up_on_return_body(p, f, len);
		break;
	default:
		up_fail(p, 501, "FRAME_ERROR - unknown frame type %u", type);
		break;
	}
	if (p->pool.pages.num_blocks > 1)
		empty_amqp_pool(&p->pool);
	else
		recycle_amqp_pool(&p->pool);
}

/* Bytes the frame at B (N available) needs: a frame header, or all of it.
 * A header announcing an oversized frame needs nothing more. */
static size_t frame_need(const struct upstream_proto *p, const uint8_t *b, size_t n)
{
	uint32_t size;

	if (n < AMQP_FRAME_HEADER_SIZE)
		return AMQP_FRAME_HEADER_SIZE;
	size = amqp_frame_get32(b + 3);
	if (size > p->frame_max - 8)
		return AMQP_FRAME_HEADER_SIZE;
	return (size_t)size + 8;
}

/* Consume complete frames from B; returns how many bytes were used. */
static size_t parse(struct upstream_proto *p, const uint8_t *b, size_t n, uint64_t now)
{
	size_t used = 0;

	while (p->st != UPSTREAM_PROTO_CLOSED && n - used >= AMQP_FRAME_HEADER_SIZE) {
		const uint8_t *f = b + used;
		uint32_t size = amqp_frame_get32(f + 3);

		if (size > p->frame_max - 8) {
			up_fail(p, 501, "FRAME_ERROR - frame of %u bytes over frame_max %u", size,
				p->frame_max);
			break;
		}
		if (n - used < (size_t)size + 8)
			break;
		if (f[7 + size] != AMQP_FRAME_END_OCTET) {
			up_fail(p, 501, "FRAME_ERROR - invalid frame end octet 0x%02x",
				f[7 + size]);
			break;
		}
		used += (size_t)size + 8;
		on_frame(p, f[0], amqp_frame_get16(f + 1), f + 7, size, now);
	}
	return p->st == UPSTREAM_PROTO_CLOSED ? n : used;
}

static bool in_append(struct upstream_proto *p, const uint8_t *d, size_t n)
{
	if (p->in_len + n > p->in_cap) {
		size_t cap = p->in_cap ? p->in_cap : 4096;
		uint8_t *b;

		while (cap < p->in_len + n)
			cap *= 2;
		b = realloc(p->in, cap);
		if (!b)
			return false;
		p->in = b;
		p->in_cap = cap;
	}
	memcpy(p->in + p->in_len, d, n);
	p->in_len += n;
	return true;
}

int upstream_proto_feed(struct upstream_proto *p, const void *data, size_t len, uint64_t now_ms)
{
	const uint8_t *d = data;

	if (p->st == UPSTREAM_PROTO_CLOSED)
		return -EPROTO;
	if (len)
		p->last_rx_ms = now_ms;
	while (len > 0 && p->st != UPSTREAM_PROTO_CLOSED) {
		size_t used;

		if (p->in_len > 0) {
			/* Complete the carried-over frame first. */
			size_t need = frame_need(p, p->in, p->in_len);
			size_t take = need - p->in_len < len ? need - p->in_len : len;

			if (!in_append(p, d, take)) {
				up_fail(p, 0, "out of memory");
				break;
			}
			d += take;
			len -= take;
			if (p->in_len < frame_need(p, p->in, p->in_len))
				continue;
			used = parse(p, p->in, p->in_len, now_ms);
			if (used < p->in_len) /* cannot happen: need was met */
				up_fail(p, 0, "internal error: frame carried over twice");
			p->in_len = 0;
			continue;
		}
		used = parse(p, d, len, now_ms);
		d += used;
		len -= used;
		if (len > 0 && p->st != UPSTREAM_PROTO_CLOSED && !in_append(p, d, len))
			up_fail(p, 0, "out of memory");
		break;
	}
	if (p->in_cap > 2 * (size_t)p->frame_max && p->in_len == 0) {
		free(p->in);
		p->in = NULL;
		p->in_cap = 0;
	}
	return p->st == UPSTREAM_PROTO_CLOSED ? -EPROTO : 0;
}

/* ---- the owner's side --------------------------------------------------------------- */

int upstream_proto_init(struct upstream_proto *p, const struct upstream_proto_config *cfg,
			const struct upstream_proto_ops *ops, void *ud, uint64_t now_ms)
{
	memset(p, 0, sizeof(*p));
	p->cfg = cfg;
	p->ops = ops;
	p->ud = ud;
	p->st = UPSTREAM_PROTO_START;
	p->frame_max = UPSTREAM_PROTO_FRAME_MAX; /* until tune: what we will accept */
	p->last_rx_ms = p->last_tx_ms = now_ms;
	init_amqp_pool(&p->pool, 4096);
	if (!up_out_reserve(p, sizeof(protocol_header)))
		return -ENOMEM;
	memcpy(p->out, protocol_header, sizeof(protocol_header));
	p->out_len = sizeof(protocol_header);
	return 0;
}

void upstream_proto_destroy(struct upstream_proto *p)
{
	up_ret_reset(p);
	up_ib_reset_delivery(p);
	while (p->ib.head) {
		struct upstream_inbox_pending *r = p->ib.head;
		p->ib.head = r->next;
		free(r);
	}
	p->ib.tail = NULL;
	p->ib.npending = 0;
	p->ib.open = false;
	empty_amqp_pool(&p->pool);
	free(p->out);
	free(p->in);
	p->out = p->in = NULL;
	p->out_len = p->out_off = p->out_cap = p->in_len = p->in_cap = 0;
}

size_t upstream_proto_output(const struct upstream_proto *p, const void **data)
{
	*data = p->out + p->out_off;
	return p->out_len - p->out_off;
}

void upstream_proto_consumed(struct upstream_proto *p, size_t n, uint64_t now_ms)
{
	if (n == 0)
		return;
	p->out_off += n;
	p->last_tx_ms = now_ms;
	if (p->out_off == p->out_len) {
		p->out_off = p->out_len = 0;
		if (p->out_cap > OUT_KEEP) {
			free(p->out);
			p->out = NULL;
			p->out_cap = 0;
		}
	}
}

uint64_t upstream_proto_tick(struct upstream_proto *p, uint64_t now_ms)
{
	uint64_t hb = (uint64_t)p->heartbeat * 1000, send_at, dead_at;

	if (!hb || p->st < UPSTREAM_PROTO_OPEN || p->st == UPSTREAM_PROTO_CLOSED)
		return UINT64_MAX;
	dead_at = p->last_rx_ms + 2 * hb;
	if (now_ms >= dead_at) {
		up_fail(p, 0, "missed heartbeats from the broker: nothing received for %llu s",
			(unsigned long long)(now_ms - p->last_rx_ms) / 1000);
		return 0;
	}
	send_at = p->last_tx_ms + hb / 2;
	if (now_ms >= send_at) {
		/* Output still waiting to be written says as much. */
		if (p->out_len == p->out_off)
			send_heartbeat(p);
		send_at = now_ms + hb / 2;
	}
	return send_at < dead_at ? send_at : dead_at;
}

void upstream_proto_close(struct upstream_proto *p, uint16_t code, const char *text)
{
	amqp_connection_close_t cl = { .reply_code = code, .reply_text = amqp_cstring_bytes(text) };

	if (p->st == UPSTREAM_PROTO_CLOSED || p->st == UPSTREAM_PROTO_CLOSING)
		return;
	if (p->st == UPSTREAM_PROTO_START) {
		p->st = UPSTREAM_PROTO_CLOSED;
		return;
	}
	up_send_method(p, 0, AMQP_CONNECTION_CLOSE_METHOD, &cl);
	p->st = UPSTREAM_PROTO_CLOSING;
}
