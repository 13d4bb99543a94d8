/* guest_session.c -- see guest_session.h. The engine's core: the session's
 * lifetime, its output, errors, input framing, timers and the control API.
 * The other units are guest_handshake.c (the connection class),
 * guest_channel.c (channels, confirms, method dispatch on a channel),
 * guest_publish.c (publish assembly) and guest_consume.c (the inbox); they
 * share guest_session_impl.h.
 *
 * Framing is ours; method and property bodies go through rabbitmq-c's
 * codec after our own bounds checks: only methods the engine acts on are
 * decoded at all, and every field table a guest sent (client properties,
 * AMQPLAIN responses, exchange.declare arguments, message headers) is
 * depth-checked first, since rabbitmq-c 0.11's table decoder recurses
 * without a limit.
 *
 * Errors follow RabbitMQ: a hard error sends connection.close and then only
 * close/close-ok are processed; a soft error sends channel.close and the
 * channel drops everything but close/close-ok until the guest confirms. */
#include "guest_session_impl.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"

#define CLOSE_OK_TIMEOUT_MS 3000
#define DEFAULT_MAX_UNCONFIRMED 10000

static const uint8_t protocol_header[8] = { 'A', 'M', 'Q', 'P', 0, 0, 9, 1 };
/* The 0-9 header, which RabbitMQ treats as 0-9-1. */
static const uint8_t protocol_header_09[8] = { 'A', 'M', 'Q', 'P', 1, 1, 0, 9 };

void guest_session_config_init(struct guest_session_config *c)
{
	memset(c, 0, sizeof(*c));
	c->channel_max = 64;
	c->frame_max = 131072;
	c->heartbeat = 60;
	c->max_message_bytes = 1u << 20;
	c->max_output_bytes = 4u << 20;
	c->handshake_timeout_ms = 10000;
	c->max_table_depth = 8;
	c->max_unconfirmed = DEFAULT_MAX_UNCONFIRMED;
	c->max_consumers = 4;
	c->max_unacked = 1024;
}

/* ---- output -------------------------------------------------------------- */

void gs_emit_closed(struct guest_session *s)
{
	struct guest_event ev;

	if (s->closed_emitted)
		return;
	s->closed_emitted = true;
	if (!s->cfg->on_event)
		return;
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_CLOSED;
	ev.reply_code = s->close_code;
	ev.text = s->close_text;
	s->cfg->on_event(s->ud, &ev);
}

/* The guest does not read: drop the connection, output and all. */
static void drop(struct guest_session *s, const char *why)
{
	s->dropped = true;
	s->st = ST_CLOSED;
	s->out_off = s->out_len = 0;
	s->close_code = 0;
	snprintf(s->close_text, sizeof(s->close_text), "%s", why);
	gs_emit_closed(s);
}

static bool out_reserve(struct guest_session *s, size_t n)
{
	size_t pending = s->out_len - s->out_off;

	if (s->dropped)
		return false;
	if (pending + n > s->cfg->max_output_bytes) {
		drop(s, "output buffer limit reached: the guest does not read");
		return false;
	}
	if (s->out_off > 0 && s->out_len + n > s->out_cap) {
		memmove(s->out, s->out + s->out_off, pending);
		s->out_len = pending;
		s->out_off = 0;
	}
	if (s->out_len + n > s->out_cap) {
		size_t cap = s->out_cap ? s->out_cap : 512;
		uint8_t *o;

		while (cap < s->out_len + n)
			cap *= 2;
		o = realloc(s->out, cap);
		if (!o) {
			drop(s, "out of memory");
			return false;
		}
		s->out = o;
		s->out_cap = cap;
	}
	return true;
}

static void out_raw(struct guest_session *s, const void *p, size_t n)
{
	if (n == 0)
		return; /* P may be NULL (empty properties or body) */
	if (!out_reserve(s, n))
		return;
	memcpy(s->out + s->out_len, p, n);
	s->out_len += n;
}

/* Encode METHOD_ID with DECODED arguments as a method frame on CHANNEL. */
void gs_send_method(struct guest_session *s, uint16_t channel, amqp_method_number_t id,
		    void *decoded)
{
	uint8_t buf[4096];
	amqp_bytes_t enc = { sizeof(buf) - 12, buf + 11 };
	int n;

	/* Acks settled earlier go out before anything sent after them. */
	gs_flush_due_acks(s);
	n = amqp_encode_method(id, decoded, enc);
	if (n < 0) {
		drop(s, "cannot encode a reply");
		return;
	}
	buf[0] = AMQP_FT_METHOD;
	amqp_frame_put16(buf + 1, channel);
	amqp_frame_put32(buf + 3, (uint32_t)n + 4);
	amqp_frame_put32(buf + 7, id);
	buf[11 + n] = AMQP_FRAME_END_OCTET;
	out_raw(s, buf, (size_t)n + 12);
}

static void send_heartbeat(struct guest_session *s)
{
	static const uint8_t hb[8] = { AMQP_FT_HEARTBEAT, 0, 0, 0, 0, 0, 0, AMQP_FRAME_END_OCTET };

	out_raw(s, hb, sizeof(hb));
}

void gs_emit(struct guest_session *s, struct guest_event *ev)
{
	if (s->cfg->on_event)
		s->cfg->on_event(s->ud, ev);
}

/* Content header and body frames of a message on CHANNEL. */
void gs_send_content(struct guest_session *s, uint16_t channel, amqp_bytes_t properties,
		     amqp_bytes_t body)
{
	size_t chunk = s->frame_max - 8;
	uint8_t h[7 + 12];

	h[0] = AMQP_FT_HEADER;
	amqp_frame_put16(h + 1, channel);
	amqp_frame_put32(h + 3, (uint32_t)(12 + properties.len));
	amqp_frame_put16(h + 7, AMQP_BASIC_CLASS);
	amqp_frame_put16(h + 9, 0);
	amqp_frame_put32(h + 11, (uint32_t)((uint64_t)body.len >> 32));
	amqp_frame_put32(h + 15, (uint32_t)body.len);
	out_raw(s, h, sizeof(h));
	out_raw(s, properties.bytes, properties.len);
	out_raw(s, (const uint8_t[]){ AMQP_FRAME_END_OCTET }, 1);
	for (size_t off = 0; off < body.len; off += chunk) {
		size_t len = body.len - off < chunk ? body.len - off : chunk;

		h[0] = AMQP_FT_BODY;
		amqp_frame_put32(h + 3, (uint32_t)len);
		out_raw(s, h, 7);
		out_raw(s, (const uint8_t *)body.bytes + off, len);
		out_raw(s, (const uint8_t[]){ AMQP_FRAME_END_OCTET }, 1);
	}
}

/* ---- errors ---------------------------------------------------------------- */

const char *gs_code_name(uint16_t code)
{
	switch (code) {
	case 200: return "OK";
	case 320: return "CONNECTION_FORCED";
	case 403: return "ACCESS_REFUSED";
	case 404: return "NOT_FOUND";
	case 406: return "PRECONDITION_FAILED";
	case 501: return "FRAME_ERROR";
	case 502: return "SYNTAX_ERROR";
	case 503: return "COMMAND_INVALID";
	case 504: return "CHANNEL_ERROR";
	case 505: return "UNEXPECTED_FRAME";
	case 530: return "NOT_ALLOWED";
	case 540: return "NOT_IMPLEMENTED";
	case 541: return "INTERNAL_ERROR";
	}
	return "ERROR";
}

/* Send connection.close with TEXT (already "NAME - detail") and wait for
 * close-ok, at most CLOSE_OK_TIMEOUT_MS. */
static void conn_close_with(struct guest_session *s, uint16_t code, amqp_method_number_t cause,
			    const char *text)
{
	amqp_connection_close_t m;

	if (s->st == ST_CLOSING || s->st == ST_CLOSED)
		return;
	s->close_code = code;
	snprintf(s->close_text, sizeof(s->close_text), "%s", text);
	memset(&m, 0, sizeof(m));
	m.reply_code = code;
	m.reply_text = amqp_cstring_bytes(s->close_text);
	m.class_id = (uint16_t)(cause >> 16);
	m.method_id = (uint16_t)(cause & 0xffff);
	gs_send_method(s, 0, AMQP_CONNECTION_CLOSE_METHOD, &m);
	if (s->st != ST_CLOSED)
		s->st = ST_CLOSING;
	s->close_deadline = s->now_ms + CLOSE_OK_TIMEOUT_MS;
}

void gs_conn_error(struct guest_session *s, uint16_t code, amqp_method_number_t cause,
		   const char *fmt, ...)
{
	char detail[200], text[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	snprintf(text, sizeof(text), "%s - %s", gs_code_name(code), detail);
	conn_close_with(s, code, cause, text);
}

void gs_chan_error(struct guest_session *s, struct chan *c, uint16_t code,
		   amqp_method_number_t cause, const char *fmt, ...)
{
	amqp_channel_close_t m;
	char detail[200], text[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	snprintf(text, sizeof(text), "%s - %s", gs_code_name(code), detail);
	memset(&m, 0, sizeof(m));
	m.reply_code = code;
	m.reply_text = amqp_cstring_bytes(text);
	m.class_id = (uint16_t)(cause >> 16);
	m.method_id = (uint16_t)(cause & 0xffff);
	gs_send_method(s, c->id, AMQP_CHANNEL_CLOSE_METHOD, &m);
	c->closing = true;
	c->pub = PUB_NONE;
	free(c->body);
	c->body = NULL;
	c->body_cap = c->body_got = c->body_size = 0;
}

/* ---- session lifetime ---------------------------------------------------- */

struct guest_session *guest_session_new(const struct guest_session_config *config,
					void *userdata, uint64_t now_ms)
{
	struct guest_session *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->cfg = config;
	s->ud = userdata;
	s->st = ST_HEADER;
	s->frame_max = AMQP_FRAME_MIN_SIZE;
	s->created_ms = s->last_rx_ms = s->last_tx_ms = s->now_ms = now_ms;
	init_amqp_pool(&s->pool, 1024);
	return s;
}

void guest_session_set_config(struct guest_session *s, const struct guest_session_config *config)
{
	s->cfg = config;
}

void guest_session_free(struct guest_session *s)
{
	if (!s)
		return;
	while (s->nchans)
		gs_chan_free(s, s->chans[0]);
	free(s->chans);
	free(s->cons);
	free(s->in);
	free(s->out);
	empty_amqp_pool(&s->pool);
	free(s);
}

/* ---- input ----------------------------------------------------------------- */

static void on_method(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len)
{
	amqp_method_number_t id;

	if (len < 4) {
		gs_conn_error(s, 501, 0, "type 1, method frame of %zu octets", len);
		return;
	}
	id = amqp_frame_get32(p);
	p += 4;
	len -= 4;
	if (s->st == ST_CLOSING) {
		if (ch == 0 && id == AMQP_CONNECTION_CLOSE_OK_METHOD) {
			s->st = ST_CLOSED;
			gs_emit_closed(s);
		} else if (ch == 0 && id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_ok_t ok = { 0 };
			gs_send_method(s, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
			s->st = ST_CLOSED;
			gs_emit_closed(s);
		}
		return;
	}
	if (ch == 0) {
		gs_on_connection_method(s, id, p, len);
		return;
	}
	if (s->st != ST_RUNNING) {
		/* rabbit_reader: frames on channels before "running" are
		 * unexpected frames. */
		gs_conn_error(s, 505, id, "type 1 on channel %u before connection.open", ch);
		return;
	}
	gs_on_channel_method(s, ch, id, p, len);
}

static void on_frame(struct guest_session *s, uint8_t type, uint16_t ch, const uint8_t *p,
		     size_t len)
{
	if (s->st == ST_CLOSING && type != AMQP_FT_METHOD)
		return;
	if (s->st != ST_RUNNING && s->st != ST_CLOSING && type != AMQP_FT_METHOD &&
	    type != AMQP_FT_HEARTBEAT) {
		gs_conn_error(s, 505, 0, "unexpected frame type %u during the handshake", type);
		return;
	}
	switch (type) {
	case AMQP_FT_METHOD:
		on_method(s, ch, p, len);
		break;
	case AMQP_FT_HEADER:
		gs_on_header(s, ch, p, len);
		break;
	case AMQP_FT_BODY:
		gs_on_body(s, ch, p, len);
		break;
	case AMQP_FT_HEARTBEAT:
		/* The spec's rule (501) for heartbeats on a channel; RabbitMQ
		 * answers those 505. A heartbeat with a payload is unknown to
		 * RabbitMQ's frame analysis: 501. */
		if (ch != 0)
			gs_conn_error(s, 501, 0, "heartbeat frame on channel %u", ch);
		else if (len != 0)
			gs_conn_error(s, 501, 0, "type 8, heartbeat frame with a %zu-byte payload",
				      len);
		break;
	default:
		gs_conn_error(s, 501, 0, "unknown frame type %u", type);
		break;
	}
	/* Keep one page for the next frame; give back what a large table
	 * needed, so that idle sessions stay small. */
	if (s->pool.pages.num_blocks > 1)
		empty_amqp_pool(&s->pool);
	else
		recycle_amqp_pool(&s->pool);
}

/* Consume complete frames from P (N bytes); returns how many were used. */
static size_t parse(struct guest_session *s, const uint8_t *p, size_t n)
{
	size_t used = 0;

	while (s->st != ST_CLOSED) {
		const uint8_t *f = p + used;
		size_t avail = n - used;
		uint32_t size;

		if (s->st == ST_HEADER) {
			if (avail < 8)
				break;
			used += 8;
			if (memcmp(f, protocol_header, 8) != 0 &&
			    memcmp(f, protocol_header_09, 8) != 0) {
				out_raw(s, protocol_header, 8);
				s->close_code = 0;
				snprintf(s->close_text, sizeof(s->close_text),
					 "bad protocol header: not AMQP 0-9-1");
				s->st = ST_CLOSED;
				gs_emit_closed(s);
				break;
			}
			gs_send_start(s);
			s->st = ST_START_OK;
			continue;
		}
		if (avail < AMQP_FRAME_HEADER_SIZE)
			break;
		size = amqp_frame_get32(f + 3);
		if (size > s->frame_max - 8) {
			gs_conn_error(s, 501, 0, "type %u, frame_too_large: %u > %u", f[0], size,
				      s->frame_max - 8);
			s->lost_sync = true;
			break;
		}
		if (avail < (size_t)size + 8)
			break;
		if (f[7 + size] != AMQP_FRAME_END_OCTET) {
			gs_conn_error(s, 501, 0, "type %u, invalid_frame_end_marker: %u", f[0],
				      f[7 + size]);
			s->lost_sync = true;
			break;
		}
		used += (size_t)size + 8;
		on_frame(s, f[0], amqp_frame_get16(f + 1), f + 7, size);
	}
	if (s->st == ST_CLOSED || s->lost_sync)
		used = n;
	return used;
}

/* Bytes the partial frame at P (N buffered) needs before it can be
 * parsed: the protocol header, a frame header, or the whole frame. A frame
 * header announcing an oversized frame needs nothing more: parse() refuses
 * it as it is. */
static size_t frame_need(const struct guest_session *s, const uint8_t *p, size_t n)
{
	uint32_t size;

	if (s->st == ST_HEADER)
		return 8;
	if (n < AMQP_FRAME_HEADER_SIZE)
		return AMQP_FRAME_HEADER_SIZE;
	size = amqp_frame_get32(p + 3);
	if (size > s->frame_max - 8)
		return AMQP_FRAME_HEADER_SIZE;
	return (size_t)size + 8;
}

/* Room for N buffered input bytes; the buffer grows with what arrived, so
 * a guest that trickles a large frame costs only what it sent. */
static bool in_reserve(struct guest_session *s, size_t n)
{
	size_t cap = s->in_cap ? s->in_cap : 256;
	uint8_t *b;

	if (n <= s->in_cap)
		return true;
	while (cap < n)
		cap *= 2;
	b = realloc(s->in, cap);
	if (!b)
		return false;
	s->in = b;
	s->in_cap = cap;
	return true;
}

int guest_session_feed(struct guest_session *s, const void *data, size_t len, uint64_t now_ms)
{
	const uint8_t *p = data;

	s->now_ms = now_ms;
	if (len)
		s->last_rx_ms = now_ms;
	if (s->st == ST_CLOSED)
		return -EPROTO;
	s->lost_sync = false;
	/* Whole frames are parsed in place; only the one frame that straddles
	 * two feeds is copied, and the buffer never holds more than it. */
	while (len > 0 && s->st != ST_CLOSED && !s->lost_sync) {
		size_t need, take, used;

		if (s->in_len == 0) {
			used = parse(s, p, len);
			p += used;
			len -= used;
			if (len == 0 || s->st == ST_CLOSED || s->lost_sync)
				break;
		}
		need = frame_need(s, s->in, s->in_len);
		take = need - s->in_len < len ? need - s->in_len : len;
		if (!in_reserve(s, s->in_len + take)) {
			drop(s, "out of memory");
			break;
		}
		memcpy(s->in + s->in_len, p, take);
		s->in_len += take;
		p += take;
		len -= take;
		if (s->in_len < frame_need(s, s->in, s->in_len))
			continue; /* a frame header completed: now its payload */
		used = parse(s, s->in, s->in_len);
		if (used != s->in_len && s->st != ST_CLOSED) {
			/* Cannot happen: the buffer holds exactly one frame. */
			gs_conn_error(s, 501, 0, "frame larger than the input buffer");
			break;
		}
		s->in_len = 0;
	}
	if (s->in_len == 0 && s->in_cap > 1024) {
		free(s->in); /* idle connections keep no large input buffer */
		s->in = NULL;
		s->in_cap = 0;
	}
	return s->st == ST_CLOSING || s->st == ST_CLOSED ? -EPROTO : 0;
}

/* ---- timers, output, control --------------------------------------------- */

/* Milliseconds from THEN to NOW; 0 if the caller's clock went backwards
 * between two calls (a tick with an older "now" than the last feed). */
static uint64_t since(uint64_t now, uint64_t then)
{
	return now > then ? now - then : 0;
}

uint64_t guest_session_tick(struct guest_session *s, uint64_t now_ms)
{
	uint64_t next = UINT64_MAX;

	s->now_ms = now_ms;
	switch (s->st) {
	case ST_HEADER:
	case ST_START_OK:
	case ST_TUNE_OK:
	case ST_OPEN:
		if (since(now_ms, s->created_ms) >= s->cfg->handshake_timeout_ms) {
			s->close_code = 0;
			snprintf(s->close_text, sizeof(s->close_text),
				 "handshake not completed within %u ms", s->cfg->handshake_timeout_ms);
			s->st = ST_CLOSED;
			gs_emit_closed(s);
			return UINT64_MAX;
		}
		return s->created_ms + s->cfg->handshake_timeout_ms;
	case ST_RUNNING:
		break;
	case ST_CLOSING:
		if (now_ms >= s->close_deadline) {
			s->st = ST_CLOSED;
			gs_emit_closed(s);
			return UINT64_MAX;
		}
		return s->close_deadline;
	case ST_CLOSED:
		return UINT64_MAX;
	}
	if (s->heartbeat) {
		uint64_t hb = (uint64_t)s->heartbeat * 1000, hb_due;

		if (!s->rx_paused && since(now_ms, s->last_rx_ms) >= 2 * hb) {
			s->close_code = 0;
			snprintf(s->close_text, sizeof(s->close_text),
				 "missed heartbeats from client, timeout: %us", s->heartbeat);
			s->st = ST_CLOSED;
			s->out_off = s->out_len = 0;
			gs_emit_closed(s);
			return UINT64_MAX;
		}
		if (since(now_ms, s->last_tx_ms) >= hb / 2 && s->out_len == s->out_off) {
			send_heartbeat(s);
			s->last_tx_ms = now_ms; /* queued; counted as sent */
		}
		/* With output pending the guest gets bytes once it reads: check
		 * again in half an interval rather than at a time now past. */
		hb_due = s->last_tx_ms + hb / 2;
		if (hb_due <= now_ms)
			hb_due = now_ms + hb / 2;
		next = s->rx_paused ? UINT64_MAX : s->last_rx_ms + 2 * hb;
		if (hb_due < next)
			next = hb_due;
	}
	return next;
}

size_t guest_session_output(struct guest_session *s, const void **data)
{
	static const uint8_t nothing;

	gs_flush_due_acks(s);
	if (s->out_len == s->out_off) {
		/* s->out may be NULL: no arithmetic on it; callers still get a
		 * valid pointer for their zero-length copies. */
		*data = &nothing;
		return 0;
	}
	*data = s->out + s->out_off;
	return s->out_len - s->out_off;
}

void guest_session_output_consumed(struct guest_session *s, size_t n, uint64_t now_ms)
{
	s->now_ms = now_ms;
	if (n > s->out_len - s->out_off)
		n = s->out_len - s->out_off;
	s->out_off += n;
	if (n)
		s->last_tx_ms = now_ms;
	if (s->out_off == s->out_len) {
		s->out_off = s->out_len = 0;
		if (s->out_cap > 4096) {
			free(s->out); /* idle connections keep no large output buffer */
			s->out = NULL;
			s->out_cap = 0;
		}
	}
}

void guest_session_close(struct guest_session *s, uint16_t code, const char *text)
{
	switch (s->st) {
	case ST_RUNNING:
	case ST_START_OK:
	case ST_TUNE_OK:
	case ST_OPEN:
		conn_close_with(s, code, 0, text ? text : gs_code_name(code));
		break;
	case ST_HEADER:
		s->close_code = code;
		snprintf(s->close_text, sizeof(s->close_text), "%s", text ? text : "");
		s->st = ST_CLOSED;
		gs_emit_closed(s);
		break;
	case ST_CLOSING:
	case ST_CLOSED:
		break;
	}
}

void guest_session_set_blocked(struct guest_session *s, bool blocked, const char *reason)
{
	if (!s->cap_blocked || s->st != ST_RUNNING || s->blocked_sent == blocked)
		return;
	s->blocked_sent = blocked;
	if (blocked) {
		amqp_connection_blocked_t m = {
			.reason = amqp_cstring_bytes(reason ? reason : "blocked"),
		};
		gs_send_method(s, 0, AMQP_CONNECTION_BLOCKED_METHOD, &m);
	} else {
		amqp_connection_unblocked_t m = { 0 };
		gs_send_method(s, 0, AMQP_CONNECTION_UNBLOCKED_METHOD, &m);
	}
}

bool guest_session_wants_read(const struct guest_session *s)
{
	if (s->st == ST_CLOSING || s->st == ST_CLOSED)
		return false;
	if (s->out_len - s->out_off > s->cfg->max_output_bytes / 2)
		return false;
	for (uint16_t i = 0; i < s->nchans; i++)
		if (s->chans[i]->confirm &&
		    gs_chan_unconfirmed(s->chans[i]) >= s->cfg->max_unconfirmed)
			return false;
	return true;
}

void guest_session_set_reading(struct guest_session *s, bool reading, uint64_t now_ms)
{
	if (s->rx_paused == !reading)
		return;
	s->rx_paused = !reading;
	if (reading)
		s->last_rx_ms = now_ms;
}

bool guest_session_done(const struct guest_session *s)
{
	return s->st == ST_CLOSED && s->out_len == s->out_off;
}

const char *guest_session_user(const struct guest_session *s)
{
	return s->user;
}

bool guest_session_is_open(const struct guest_session *s)
{
	return s->st == ST_RUNNING;
}
