/* guest_publish.c -- the guest engine's publish assembly: basic.publish,
 * its content header (properties checked before rabbitmq-c decodes them)
 * and body frames into one GUEST_EVENT_PUBLISH; the exchange checks and
 * basic.return. Part of the engine behind guest_session.h. */
#include "guest_session_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"

/* A channel keeps its publish metadata buffer between messages up to this
 * size. */
#define META_KEEP 1024

static bool exchange_allowed(const struct guest_session *s, const char *name, size_t len)
{
	const char *const *a = s->cfg->allowed_exchanges;

	for (; a && *a; a++)
		if (strlen(*a) == len && memcmp(*a, name, len) == 0)
			return true;
	return false;
}

static void complete_publish(struct guest_session *s, struct chan *c)
{
	struct guest_event ev;
	amqp_basic_properties_t *props = NULL;
	amqp_bytes_t raw = { c->props_len, c->meta + c->exchange_len + c->rk_len };

	if (amqp_decode_properties(AMQP_BASIC_CLASS, &s->pool, raw, (void **)&props) < 0) {
		/* Validated when the header arrived: cannot happen. */
		gs_conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD, "cannot decode content header");
		return;
	}
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_PUBLISH;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	ev.publish.channel = c->id;
	ev.publish.channel_gen = c->gen;
	if (c->confirm) {
		if (!gs_win_grow(s, c)) {
			gs_chan_error(s, c, 406, AMQP_BASIC_PUBLISH_METHOD,
				      "more than %u unconfirmed messages on channel %u",
				      s->cfg->max_unconfirmed + UNCONFIRMED_SLACK, c->id);
			return;
		}
		c->next_tag++;
		c->win[c->next_tag % c->cap] = 0;
		ev.publish.delivery_tag = c->next_tag;
		ev.publish.confirm = true;
	}
	ev.publish.mandatory = c->mandatory;
	ev.publish.exchange = (amqp_bytes_t){ c->exchange_len, c->meta };
	ev.publish.routing_key = (amqp_bytes_t){ c->rk_len, c->meta + c->exchange_len };
	ev.publish.properties = props;
	ev.publish.raw_properties = raw;
	ev.publish.body = c->body;
	ev.publish.body_len = (size_t)c->body_size;
	c->body = NULL;
	c->body_cap = c->body_got = c->body_size = 0;
	c->pub = PUB_NONE;
	if (s->cfg->on_event)
		s->cfg->on_event(s->ud, &ev);
	else
		free(ev.publish.body);
	c->props_len = 0;
	if (c->meta_cap > META_KEEP) {
		free(c->meta);
		c->meta = NULL;
		c->meta_cap = 0;
	}
}

/* Room for N bytes of publish metadata, keeping what is there. */
static bool meta_reserve(struct chan *c, size_t n)
{
	uint8_t *m;

	if (n <= c->meta_cap)
		return true;
	if (n < 256)
		n = 256;
	m = realloc(c->meta, n);
	if (!m)
		return false;
	c->meta = m;
	c->meta_cap = (uint32_t)n;
	return true;
}

void gs_on_publish(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_publish_t *m;
	amqp_bytes_t b = { len, (void *)args };

	if (amqp_decode_method(AMQP_BASIC_PUBLISH_METHOD, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD, "cannot decode basic.publish");
		return;
	}
	if (m->immediate) {
		gs_conn_error(s, 540, AMQP_BASIC_PUBLISH_METHOD, "immediate=true");
		return;
	}
	if (!exchange_allowed(s, m->exchange.bytes, m->exchange.len)) {
		gs_chan_error(s, c, 403, AMQP_BASIC_PUBLISH_METHOD,
			      "access to exchange '%.*s' in vhost '%s' refused for user '%s'",
			      (int)(m->exchange.len > 64 ? 64 : m->exchange.len),
			      (const char *)m->exchange.bytes, s->cfg->vhost ? s->cfg->vhost : "/",
			      s->user);
		return;
	}
	if (!meta_reserve(c, m->exchange.len + m->routing_key.len)) {
		gs_conn_error(s, 541, AMQP_BASIC_PUBLISH_METHOD, "out of memory");
		return;
	}
	c->pub = PUB_HEADER;
	c->mandatory = m->mandatory;
	c->exchange_len = (uint8_t)m->exchange.len;
	memcpy(c->meta, m->exchange.bytes, m->exchange.len);
	c->rk_len = (uint8_t)m->routing_key.len;
	memcpy(c->meta + c->exchange_len, m->routing_key.bytes, m->routing_key.len);
}

void gs_on_exchange_declare(struct guest_session *s, struct chan *c, const uint8_t *args,
			    size_t len)
{
	amqp_exchange_declare_t *m;
	amqp_bytes_t b = { len, (void *)args };
	size_t off = 2, n;
	int r;

	/* reserved u16, exchange, type, bits, arguments: check the table. */
	if (off > len || amqp_frame_skip_shortstr(args + off, len - off, &n) < 0 ||
	    (off += n) > len || amqp_frame_skip_shortstr(args + off, len - off, &n) < 0 ||
	    (off += n + 1) > len) {
		gs_conn_error(s, 501, AMQP_EXCHANGE_DECLARE_METHOD,
			      "cannot decode exchange.declare");
		return;
	}
	r = amqp_frame_check_table_prefixed(args + off, len - off, s->cfg->max_table_depth, &n);
	if (r < 0 ||
	    amqp_decode_method(AMQP_EXCHANGE_DECLARE_METHOD, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 502, AMQP_EXCHANGE_DECLARE_METHOD,
			      r == -ELOOP ? "arguments nested too deep"
					  : "malformed exchange.declare");
		return;
	}
	if (!exchange_allowed(s, m->exchange.bytes, m->exchange.len)) {
		gs_chan_error(s, c, 403, AMQP_EXCHANGE_DECLARE_METHOD,
			      "access to exchange '%.*s' in vhost '%s' refused for user '%s'",
			      (int)(m->exchange.len > 64 ? 64 : m->exchange.len),
			      (const char *)m->exchange.bytes, s->cfg->vhost ? s->cfg->vhost : "/",
			      s->user);
		return;
	}
	if (!m->nowait) {
		amqp_exchange_declare_ok_t ok = { 0 };
		gs_send_method(s, c->id, AMQP_EXCHANGE_DECLARE_OK_METHOD, &ok);
	}
}

/* The channel a content frame (expected in state WANT) belongs to, or
 * NULL when the frame is answered with an error or dropped because the
 * channel is closing. Codes and texts are rabbit_command_assembler's: a
 * content frame where a method was expected (channel 0, a channel not
 * open, no publish pending) is 505 like one out of order. */
static struct chan *content_chan(struct guest_session *s, uint16_t ch, enum pub_state want)
{
	struct chan *c = ch != 0 ? gs_chan_find(s, ch) : NULL;

	if (c && c->closing)
		return NULL;
	if (!c || c->pub == PUB_NONE) {
		gs_conn_error(s, 505, 0, "expected method frame, got non method frame instead");
		return NULL;
	}
	if (c->pub != want) {
		if (c->pub == PUB_HEADER)
			gs_conn_error(s, 505, AMQP_BASIC_PUBLISH_METHOD,
				      "expected content header for class 60, got non content "
				      "header frame instead");
		else
			gs_conn_error(s, 505, AMQP_BASIC_PUBLISH_METHOD,
				      "expected content body, got non content body frame instead");
		return NULL;
	}
	return c;
}

/* The property flags and list of a content header (P, LEN bytes): the
 * strings before the headers table and the table itself, depth-checked.
 * Property flags: basic's 14 properties fit in one word, so the
 * continuation bit is malformed. It must be refused, not ignored:
 * rabbitmq-c would read more flag words (shifting them past 32 bits)
 * and find a headers table where this scan did not check one.
 * Returns 0, -ELOOP (nested deeper than DEPTH) or -EBADMSG. */
static int check_properties(const uint8_t *p, size_t len, unsigned depth)
{
	uint16_t flags = amqp_frame_get16(p);
	size_t off = 2, n;
	int r;

	if (flags & 0x0001)
		return -EBADMSG;
	if (flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
		if (amqp_frame_skip_shortstr(p + off, len - off, &n) < 0)
			return -EBADMSG;
		off += n;
	}
	if (flags & AMQP_BASIC_CONTENT_ENCODING_FLAG) {
		if (amqp_frame_skip_shortstr(p + off, len - off, &n) < 0)
			return -EBADMSG;
		off += n;
	}
	if (flags & AMQP_BASIC_HEADERS_FLAG) {
		r = amqp_frame_check_table_prefixed(p + off, len - off, depth, &n);
		if (r == -ELOOP)
			return r;
		if (r < 0)
			return -EBADMSG;
	}
	return 0;
}

/* Content header: class u16, weight u16, body size u64, flags + list. */
void gs_on_header(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len)
{
	struct chan *c = content_chan(s, ch, PUB_HEADER);
	amqp_basic_properties_t *props;
	amqp_bytes_t raw;
	int r;

	if (!c)
		return;
	if (len < 12) {
		gs_conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD,
			      "type 2, content header of %zu octets", len);
		return;
	}
	if (amqp_frame_get16(p) != AMQP_BASIC_CLASS) {
		gs_conn_error(s, 505, AMQP_BASIC_PUBLISH_METHOD,
			      "expected content header for class 60, got one for class %u instead",
			      amqp_frame_get16(p));
		return;
	}
	if (len < 14)
		goto bad; /* no property flags */
	c->body_size = amqp_frame_get64(p + 4);
	if (c->body_size > s->cfg->max_message_bytes) {
		gs_chan_error(s, c, 406, AMQP_BASIC_PUBLISH_METHOD,
			      "message size %llu is larger than configured max size %llu",
			      (unsigned long long)c->body_size,
			      (unsigned long long)s->cfg->max_message_bytes);
		return;
	}
	raw.bytes = (void *)(p + 12);
	raw.len = len - 12;
	r = check_properties(p + 12, len - 12, s->cfg->max_table_depth);
	if (r == -ELOOP) {
		gs_conn_error(s, 502, AMQP_BASIC_PUBLISH_METHOD,
			      "message headers nested deeper than %u levels", s->cfg->max_table_depth);
		return;
	}
	if (r < 0)
		goto bad;
	if (amqp_decode_properties(AMQP_BASIC_CLASS, &s->pool, raw, (void **)&props) < 0)
		goto bad;
	if (!meta_reserve(c, (size_t)c->exchange_len + c->rk_len + raw.len)) {
		gs_conn_error(s, 541, AMQP_BASIC_PUBLISH_METHOD, "out of memory");
		return;
	}
	memcpy(c->meta + c->exchange_len + c->rk_len, raw.bytes, raw.len);
	c->props_len = (uint32_t)raw.len;
	c->body_got = 0;
	c->pub = PUB_BODY;
	if (c->body_size == 0)
		complete_publish(s, c);
	return;
bad:
	gs_conn_error(s, 502, AMQP_BASIC_PUBLISH_METHOD, "malformed content header properties");
}

void gs_on_body(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len)
{
	struct chan *c = content_chan(s, ch, PUB_BODY);

	if (!c)
		return;
	if (len == 0)
		return; /* an empty body frame adds nothing */
	if (len > c->body_size - c->body_got) {
		gs_conn_error(s, 501, AMQP_BASIC_PUBLISH_METHOD,
			      "content body exceeds the declared size %llu",
			      (unsigned long long)c->body_size);
		return;
	}
	if (c->body_got + len > c->body_cap) {
		/* Grow with what arrives, not with what was declared. */
		uint64_t cap = c->body_cap ? c->body_cap : 4096;
		uint8_t *nb;

		while (cap < c->body_got + len)
			cap *= 2;
		if (cap > c->body_size)
			cap = c->body_size;
		nb = realloc(c->body, (size_t)cap);
		if (!nb) {
			gs_conn_error(s, 541, AMQP_BASIC_PUBLISH_METHOD, "out of memory");
			return;
		}
		c->body = nb;
		c->body_cap = cap;
	}
	memcpy(c->body + c->body_got, p, len);
	c->body_got += len;
	if (c->body_got == c->body_size)
		complete_publish(s, c);
}

void guest_session_return(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			  uint16_t code, const char *text, amqp_bytes_t exchange,
			  amqp_bytes_t routing_key, amqp_bytes_t properties, amqp_bytes_t body)
{
	struct chan *c = gs_chan_find(s, channel);
	amqp_basic_return_t r = { .reply_code = code, .reply_text = amqp_cstring_bytes(text),
				  .exchange = exchange, .routing_key = routing_key };
	size_t chunk = s->frame_max - 8;

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING ||
	    12 + properties.len > chunk)
		return;
	gs_send_method(s, channel, AMQP_BASIC_RETURN_METHOD, &r);
	gs_send_content(s, channel, properties, body);
}
