/* upstream_handshake.c -- the link engine's connection class: answering
 * connection.start (PLAIN or EXTERNAL) and tune, opening the channels, and
 * the broker's close and blocked notices. Part of the engine behind
 * upstream_proto.h. */
#include "upstream_proto_impl.h"

#include <stdio.h>
#include <string.h>

#include "field.h"
#include "log.h"

static bool offers(amqp_bytes_t list, const char *mech)
{
	size_t n = strlen(mech);
	const char *s = list.bytes, *end = s + list.len;

	while (s < end) {
		const char *sp = memchr(s, ' ', (size_t)(end - s));
		size_t len = (size_t)((sp ? sp : end) - s);

		if (len == n && memcmp(s, mech, n) == 0)
			return true;
		s += len + 1;
	}
	return false;
}

static void on_start(struct upstream_proto *p, const amqp_connection_start_t *m)
{
	const struct upstream_proto_config *c = p->cfg;
	const char *mech = c->mechanism == BROKER_AUTH_EXTERNAL ? "EXTERNAL" : "PLAIN";
	amqp_table_entry_t caps[] = {
		field_bool("connection.blocked", true),
		field_bool("authentication_failure_close", true),
		field_bool("publisher_confirms", true),
		field_bool("basic.nack", true),
		field_bool("consumer_cancel_notify", true),
	};
	amqp_table_entry_t props[5];
	amqp_connection_start_ok_t ok;
	char resp[1024];
	int n = 0, rlen = 0;

	if (m->version_major != 0 || m->version_minor != 9) {
		up_fail(p, 0, "broker speaks AMQP %u-%u, not 0-9-1", m->version_major,
			m->version_minor);
		return;
	}
	if (!offers(m->mechanisms, mech)) {
		char offered[110];
		up_fail(p, 0, "broker does not offer the %s mechanism (offers \"%s\")", mech,
			log_sanitize(offered, sizeof(offered), m->mechanisms.bytes,
				  (unsigned)m->mechanisms.len));
		return;
	}
	props[n++] = field_table("capabilities", caps, (int)(sizeof(caps) / sizeof(caps[0])));
	if (c->connection_name)
		props[n++] = field_utf8("connection_name", c->connection_name);
	props[n++] = field_utf8("product", c->product ? c->product : "vmproxyd");
	props[n++] = field_utf8("version", VMPROXY_VERSION);
	props[n++] = field_utf8("platform", "C");
	if (c->mechanism == BROKER_AUTH_PLAIN) {
		/* "\0user\0password" */
		rlen = snprintf(resp, sizeof(resp), "%c%s%c%s", 0, c->user ? c->user : "guest", 0,
				c->password ? c->password : "guest");
		if (rlen < 0 || (size_t)rlen >= sizeof(resp)) {
			up_fail(p, 0, "PLAIN user name and password too long");
			return;
		}
	}
	/* EXTERNAL: the broker takes the name from the client certificate. */
	ok.client_properties = (amqp_table_t){ n, props };
	ok.mechanism = amqp_cstring_bytes(mech);
	ok.response = (amqp_bytes_t){ (size_t)rlen, resp };
	ok.locale = amqp_cstring_bytes("en_US");
	if (up_send_method(p, 0, AMQP_CONNECTION_START_OK_METHOD, &ok) < 0) {
		up_fail(p, 0, "cannot encode connection.start-ok");
		return;
	}
	p->st = UPSTREAM_PROTO_TUNE;
}

static void on_tune(struct upstream_proto *p, const amqp_connection_tune_t *m, uint64_t now)
{
	amqp_connection_tune_ok_t ok;
	amqp_connection_open_t op = { 0 };
	uint16_t hb = p->cfg->heartbeat;

	if (m->frame_max != 0 && m->frame_max < AMQP_FRAME_MIN_SIZE) {
		up_fail(p, 530, "broker's frame_max %u is below the minimum %u", m->frame_max,
			AMQP_FRAME_MIN_SIZE);
		return;
	}
	p->frame_max = UPSTREAM_PROTO_FRAME_MAX;
	if (m->frame_max != 0 && m->frame_max < p->frame_max)
		p->frame_max = m->frame_max;
	/* As rabbitmq-c: the broker's interval when shorter than ours. */
	if (hb && m->heartbeat && m->heartbeat < hb)
		hb = m->heartbeat;
	p->heartbeat = hb;
	ok.channel_max = m->channel_max && m->channel_max < 16 ? m->channel_max : 16;
	ok.frame_max = p->frame_max;
	ok.heartbeat = hb;
	op.virtual_host = amqp_cstring_bytes(p->cfg->vhost ? p->cfg->vhost : "/");
	op.capabilities = amqp_cstring_bytes("");
	if (up_send_method(p, 0, AMQP_CONNECTION_TUNE_OK_METHOD, &ok) < 0 ||
	    up_send_method(p, 0, AMQP_CONNECTION_OPEN_METHOD, &op) < 0) {
		up_fail(p, 0, "out of memory");
		return;
	}
	p->last_rx_ms = now;
	p->st = UPSTREAM_PROTO_OPEN;
}

void up_on_connection_method(struct upstream_proto *p, amqp_method_number_t id, void *m,
			     uint64_t now)
{
	switch (id) {
	case AMQP_CONNECTION_START_METHOD:
		if (p->st != UPSTREAM_PROTO_START)
			break;
		on_start(p, m);
		return;
	case AMQP_CONNECTION_TUNE_METHOD:
		if (p->st != UPSTREAM_PROTO_TUNE)
			break;
		on_tune(p, m, now);
		return;
	case AMQP_CONNECTION_OPEN_OK_METHOD: {
		amqp_channel_open_t co = { 0 };
		if (p->st != UPSTREAM_PROTO_OPEN)
			break;
		co.out_of_band = amqp_cstring_bytes("");
		up_send_method(p, UPSTREAM_PROTO_CHANNEL, AMQP_CHANNEL_OPEN_METHOD, &co);
		p->st = UPSTREAM_PROTO_CHANNEL_OPEN;
		return;
	}
	case AMQP_CONNECTION_CLOSE_METHOD: {
		const amqp_connection_close_t *c = m;
		amqp_connection_close_ok_t ok = { 0 };
		char text[170];
		p->close_received = true;
		p->broker_code = c->reply_code;
		up_send_method(p, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		up_fail(p, c->reply_code, "broker closed the connection: %u \"%s\"", c->reply_code,
			log_sanitize(text, sizeof(text), c->reply_text.bytes,
				  (unsigned)c->reply_text.len));
		return;
	}
	case AMQP_CONNECTION_CLOSE_OK_METHOD:
		if (p->st != UPSTREAM_PROTO_CLOSING)
			break;
		p->st = UPSTREAM_PROTO_CLOSED;
		return;
	case AMQP_CONNECTION_BLOCKED_METHOD: {
		const amqp_connection_blocked_t *b = m;
		char reason[128];
		p->ops->flow(p->ud, true,
			     log_sanitize(reason, sizeof(reason), b->reason.bytes,
					  (unsigned)b->reason.len));
		return;
	}
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		p->ops->flow(p->ud, false, NULL);
		return;
	default:
		break;
	}
	up_fail(p, 503, "unexpected method 0x%08x on channel 0 while %s", id, up_state_name(p->st));
}
