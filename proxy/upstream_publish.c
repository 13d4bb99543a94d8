/* upstream_publish.c -- the link engine's publish channel: basic.publish
 * frames, the broker's confirms, and returned messages assembled for the
 * owner. Part of the engine behind upstream_proto.h. */
#include "upstream_proto_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"
#include "log.h"

void up_ret_reset(struct upstream_proto *p)
{
	free(p->ret.meta);
	free(p->ret.body);
	memset(&p->ret, 0, sizeof(p->ret));
}

static void ret_deliver(struct upstream_proto *p)
{
	struct upstream_proto_return r = {
		.code = p->ret.code,
		.text = p->ret.text,
		.exchange = { p->ret.ex_len, p->ret.meta },
		.routing_key = { p->ret.rk_len, p->ret.meta + p->ret.ex_len },
		.properties = { p->ret.props_len, p->ret.meta + p->ret.ex_len + p->ret.rk_len },
		.body = { (size_t)p->ret.size, p->ret.body },
	};

	if (p->ops->returned)
		p->ops->returned(p->ud, &r);
	up_ret_reset(p);
}

static void on_return(struct upstream_proto *p, const amqp_basic_return_t *m)
{
	if (m->exchange.len > 255 || m->routing_key.len > 255) {
		up_fail(p, 502, "SYNTAX_ERROR - basic.return with an oversize name");
		return;
	}
	p->ret.active = true;
	p->ret.code = m->reply_code;
	log_sanitize(p->ret.text, sizeof(p->ret.text), m->reply_text.bytes,
		     (unsigned)m->reply_text.len);
	p->ret.meta = malloc(m->exchange.len + m->routing_key.len + 1);
	if (!p->ret.meta) {
		up_fail(p, 0, "out of memory");
		return;
	}
	p->ret.ex_len = (uint8_t)m->exchange.len;
	p->ret.rk_len = (uint8_t)m->routing_key.len;
	if (m->exchange.len)
		memcpy(p->ret.meta, m->exchange.bytes, m->exchange.len);
	if (m->routing_key.len)
		memcpy(p->ret.meta + m->exchange.len, m->routing_key.bytes, m->routing_key.len);
}

/* The content header of a returned message: class, weight, body size and
 * the properties, which are kept as they came. */
void up_on_return_header(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	uint64_t size;
	uint8_t *meta;

	if (!p->ret.active || p->ret.header) {
		up_fail(p, 505, "UNEXPECTED_FRAME - content header without basic.return");
		return;
	}
	if (len < HEADER_FRAME_FIXED || amqp_frame_get16(f) != AMQP_BASIC_CLASS) {
		up_fail(p, 501, "FRAME_ERROR - malformed content header");
		return;
	}
	size = amqp_frame_get64(f + 4);
	if (size > p->cfg->max_return) {
		up_fail(p, 505,
			"UNEXPECTED_FRAME - returned body of %llu bytes, larger than anything "
			"published", (unsigned long long)size);
		return;
	}
	meta = realloc(p->ret.meta, p->ret.ex_len + p->ret.rk_len + (len - HEADER_FRAME_FIXED) + 1);
	p->ret.body = size ? malloc((size_t)size) : NULL;
	if (!meta || (size && !p->ret.body)) {
		if (meta)
			p->ret.meta = meta;
		up_fail(p, 0, "out of memory");
		return;
	}
	p->ret.meta = meta;
	p->ret.props_len = (uint32_t)(len - HEADER_FRAME_FIXED);
	memcpy(meta + p->ret.ex_len + p->ret.rk_len, f + HEADER_FRAME_FIXED, p->ret.props_len);
	p->ret.header = true;
	p->ret.size = size;
	if (size == 0)
		ret_deliver(p);
}

void up_on_return_body(struct upstream_proto *p, const uint8_t *f, size_t len)
{
	if (!p->ret.header) {
		up_fail(p, 505, "UNEXPECTED_FRAME - body frame without basic.return");
		return;
	}
	if (len > p->ret.size - p->ret.got) {
		up_fail(p, 505, "UNEXPECTED_FRAME - returned body longer than its header said");
		return;
	}
	memcpy(p->ret.body + p->ret.got, f, len);
	p->ret.got += len;
	if (p->ret.got == p->ret.size)
		ret_deliver(p);
}

void up_on_channel_method(struct upstream_proto *p, amqp_method_number_t id, void *m)
{
	switch (id) {
	case AMQP_CHANNEL_OPEN_OK_METHOD: {
		amqp_confirm_select_t cs = { .nowait = 0 };
		if (p->st != UPSTREAM_PROTO_CHANNEL_OPEN)
			break;
		up_send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CONFIRM_SELECT_METHOD, &cs);
		p->st = UPSTREAM_PROTO_SELECT;
		return;
	}
	case AMQP_CONFIRM_SELECT_OK_METHOD:
		if (p->st != UPSTREAM_PROTO_SELECT)
			break;
		p->st = UPSTREAM_PROTO_READY;
		p->ops->ready(p->ud);
		return;
	case AMQP_BASIC_ACK_METHOD:
	case AMQP_BASIC_NACK_METHOD: {
		bool ack = id == AMQP_BASIC_ACK_METHOD;
		uint64_t tag = ack ? ((amqp_basic_ack_t *)m)->delivery_tag
				   : ((amqp_basic_nack_t *)m)->delivery_tag;
		bool multiple = ack ? ((amqp_basic_ack_t *)m)->multiple
				    : ((amqp_basic_nack_t *)m)->multiple;
		if (p->st != UPSTREAM_PROTO_READY && p->st != UPSTREAM_PROTO_CLOSING)
			break;
		if (tag == 0 || tag > p->next_tag) {
			up_fail(p, 406,
				"PRECONDITION_FAILED - confirm for unknown delivery tag %llu",
				(unsigned long long)tag);
			return;
		}
		p->ops->confirm(p->ud, tag, multiple, ack);
		return;
	}
	case AMQP_BASIC_RETURN_METHOD:
		if (p->st != UPSTREAM_PROTO_READY && p->st != UPSTREAM_PROTO_CLOSING)
			break;
		on_return(p, m);
		return;
	case AMQP_CHANNEL_FLOW_METHOD: {
		amqp_channel_flow_ok_t ok = { .active = ((amqp_channel_flow_t *)m)->active };
		up_send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CHANNEL_FLOW_OK_METHOD, &ok);
		p->ops->flow(p->ud, !ok.active, ok.active ? NULL : "channel.flow");
		return;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		const amqp_channel_close_t *c = m;
		amqp_channel_close_ok_t ok = { 0 };
		char text[170];
		up_send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		p->broker_code = c->reply_code;
		/* The channel's unconfirmed messages are lost to it: the link
		 * ends, and they are republished on the next one. */
		up_fail(p, c->reply_code, "broker closed the channel: %u \"%s\"", c->reply_code,
			log_sanitize(text, sizeof(text), c->reply_text.bytes,
				  (unsigned)c->reply_text.len));
		return;
	}
	default:
		break;
	}
	up_fail(p, 503, "unexpected method 0x%08x on channel %u while %s", id,
		UPSTREAM_PROTO_CHANNEL, up_state_name(p->st));
}

int64_t upstream_proto_publish(struct upstream_proto *p, const void *rk, size_t rk_len,
			       bool mandatory, const void *props, size_t props_len,
			       const void *body, size_t body_len)
{
	amqp_basic_publish_t pub = { 0 };
	size_t chunk = p->frame_max - 8;
	size_t nbody = body_len ? (body_len + chunk - 1) / chunk : 0;
	size_t start = p->out_len;
	uint8_t *b;
	int n;

	if (p->st != UPSTREAM_PROTO_READY || p->out_len - p->out_off > p->cfg->max_output)
		return -EAGAIN;
	if (HEADER_FRAME_FIXED + props_len > chunk || rk_len > 255)
		return -EMSGSIZE;
	if (!up_out_reserve(p, 12 + 4 + 2 * 256 + 8 + 8 + HEADER_FRAME_FIXED + props_len +
				    nbody * 8 + body_len))
		return -EAGAIN;
	start = p->out_len;
	b = p->out + start;
	pub.exchange = amqp_cstring_bytes(p->cfg->exchange);
	pub.routing_key = (amqp_bytes_t){ rk_len, (void *)rk };
	pub.mandatory = mandatory;
	n = amqp_encode_method(AMQP_BASIC_PUBLISH_METHOD, &pub,
			       (amqp_bytes_t){ 2 * 256 + 8, b + 11 });
	if (n < 0)
		return -EMSGSIZE;
	up_put_frame_header(b, AMQP_FT_METHOD, UPSTREAM_PROTO_CHANNEL, (uint32_t)n + 4);
	amqp_frame_put32(b + 7, AMQP_BASIC_PUBLISH_METHOD);
	b[11 + n] = AMQP_FRAME_END_OCTET;
	b += 12 + n;

	up_put_frame_header(b, AMQP_FT_HEADER, UPSTREAM_PROTO_CHANNEL,
			    (uint32_t)(HEADER_FRAME_FIXED + props_len));
	amqp_frame_put16(b + 7, AMQP_BASIC_CLASS);
	amqp_frame_put16(b + 9, 0);
	amqp_frame_put32(b + 11, (uint32_t)((uint64_t)body_len >> 32));
	amqp_frame_put32(b + 15, (uint32_t)body_len);
	if (props_len)
		memcpy(b + 7 + HEADER_FRAME_FIXED, props, props_len);
	b[7 + HEADER_FRAME_FIXED + props_len] = AMQP_FRAME_END_OCTET;
	b += 8 + HEADER_FRAME_FIXED + props_len;

	for (size_t off = 0; off < body_len; off += chunk) {
		size_t len = body_len - off < chunk ? body_len - off : chunk;

		up_put_frame_header(b, AMQP_FT_BODY, UPSTREAM_PROTO_CHANNEL, (uint32_t)len);
		memcpy(b + 7, (const uint8_t *)body + off, len);
		b[7 + len] = AMQP_FRAME_END_OCTET;
		b += 8 + len;
	}
	p->out_len = (size_t)(b - p->out);
	return (int64_t)++p->next_tag;
}
