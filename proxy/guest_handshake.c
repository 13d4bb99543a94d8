/* guest_handshake.c -- the guest engine's connection class: protocol
 * negotiation (start, start-ok with PLAIN, AMQPLAIN or EXTERNAL, tune,
 * open) and the connection methods of a running session. Part of the
 * engine behind guest_session.h. */
#include "guest_session_impl.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "amqp_frame.h"
#include "field.h"

void gs_send_start(struct guest_session *s)
{
	amqp_table_entry_t caps[] = {
		field_bool("publisher_confirms", true),
		field_bool("basic.nack", true),
		field_bool("connection.blocked", true),
		field_bool("authentication_failure_close", true),
		field_bool("consumer_cancel_notify", true),
		field_bool("exchange_exchange_bindings", true),
		field_bool("per_consumer_qos", true),
	};
	amqp_table_entry_t props[4];
	amqp_connection_start_t m;

	props[0] = field_table("capabilities", caps, (int)(sizeof(caps) / sizeof(caps[0])));
	props[1] = field_utf8("product", s->cfg->product ? s->cfg->product : "vmproxy");
	props[2] = field_utf8("version", VMPROXY_VERSION);
	props[3] = field_utf8("platform", "Linux");
	memset(&m, 0, sizeof(m));
	m.version_major = 0;
	m.version_minor = 9;
	m.server_properties.num_entries = 4;
	m.server_properties.entries = props;
	m.mechanisms = amqp_cstring_bytes("PLAIN AMQPLAIN EXTERNAL");
	m.locales = amqp_cstring_bytes("en_US");
	gs_send_method(s, 0, AMQP_CONNECTION_START_METHOD, &m);
}

static bool table_bool(const amqp_table_t *t, const char *key)
{
	for (int i = 0; i < t->num_entries; i++) {
		const amqp_table_entry_t *e = &t->entries[i];
		if (e->key.len == strlen(key) && memcmp(e->key.bytes, key, e->key.len) == 0)
			return e->value.kind == AMQP_FIELD_KIND_BOOLEAN && e->value.value.boolean;
	}
	return false;
}

static const amqp_field_value_t *table_get(const amqp_table_t *t, const char *key)
{
	for (int i = 0; i < t->num_entries; i++) {
		const amqp_table_entry_t *e = &t->entries[i];
		if (e->key.len == strlen(key) && memcmp(e->key.bytes, key, e->key.len) == 0)
			return &e->value;
	}
	return NULL;
}

static void copy_user(struct guest_session *s, const void *p, size_t n)
{
	if (n >= sizeof(s->user))
		n = sizeof(s->user) - 1;
	memcpy(s->user, p, n);
	s->user[n] = '\0';
}

static void refuse_login(struct guest_session *s, const char *mech)
{
	if (s->cap_auth_close) {
		gs_conn_error(s, 403, AMQP_CONNECTION_START_OK_METHOD,
			      "Login was refused using authentication mechanism %s. For details "
			      "see the broker logfile.", mech);
		return;
	}
	/* Clients without authentication_failure_close see the socket close. */
	s->close_code = 403;
	snprintf(s->close_text, sizeof(s->close_text),
		 "ACCESS_REFUSED - login refused using authentication mechanism %s", mech);
	s->st = ST_CLOSED;
	gs_emit_closed(s);
}

/* A response the mechanism cannot parse is a protocol error in RabbitMQ
 * (502), not a refused login. */
static void bad_response(struct guest_session *s, const char *mech)
{
	gs_conn_error(s, 502, AMQP_CONNECTION_START_OK_METHOD, "%s response is malformed", mech);
}

/* PLAIN: [authzid] NUL authcid NUL passwd. False when refused. */
static bool login_plain(struct guest_session *s, amqp_bytes_t resp, const char *mech)
{
	const uint8_t *p = resp.bytes, *nul1, *nul2;
	size_t n = resp.len;

	nul1 = n ? memchr(p, 0, n) : NULL;
	nul2 = nul1 ? memchr(nul1 + 1, 0, n - (size_t)(nul1 + 1 - p)) : NULL;
	if (!nul1 || !nul2) {
		bad_response(s, mech);
		return false;
	}
	copy_user(s, nul1 + 1, (size_t)(nul2 - nul1 - 1));
	return true;
}

/* AMQPLAIN: the response is a table's entries without the length prefix:
 * check them, then hand rabbitmq-c a prefixed copy. False when refused. */
static bool login_amqplain(struct guest_session *s, amqp_bytes_t resp, const char *mech)
{
	uint8_t *buf = amqp_pool_alloc(&s->pool, resp.len + 4);
	amqp_bytes_t wrapped = { resp.len + 4, buf };
	const amqp_field_value_t *login;
	amqp_table_t t;
	size_t off = 0;

	if (!buf || amqp_frame_check_table(resp.bytes, resp.len, s->cfg->max_table_depth) < 0) {
		bad_response(s, mech);
		return false;
	}
	amqp_frame_put32(buf, (uint32_t)resp.len);
	memcpy(buf + 4, resp.bytes, resp.len);
	if (amqp_decode_table(wrapped, &s->pool, &t, &off) != AMQP_STATUS_OK) {
		bad_response(s, mech);
		return false;
	}
	login = table_get(&t, "LOGIN");
	if (!login || (login->kind != AMQP_FIELD_KIND_UTF8 &&
		       login->kind != AMQP_FIELD_KIND_BYTES)) {
		bad_response(s, mech);
		return false;
	}
	copy_user(s, login->value.bytes.bytes, login->value.bytes.len);
	return true;
}

static void on_start_ok(struct guest_session *s, const uint8_t *args, size_t len)
{
	amqp_connection_start_ok_t *m;
	amqp_bytes_t b = { len, (void *)args };
	const amqp_field_value_t *caps;
	char mech[32];
	size_t used;
	int r;

	/* client_properties is the first argument: check it before decoding. */
	r = amqp_frame_check_table_prefixed(args, len, s->cfg->max_table_depth, &used);
	if (r == -ELOOP) {
		gs_conn_error(s, 502, AMQP_CONNECTION_START_OK_METHOD,
			      "client_properties nested deeper than %u levels",
			      s->cfg->max_table_depth);
		return;
	}
	if (r < 0) {
		gs_conn_error(s, 502, AMQP_CONNECTION_START_OK_METHOD,
			      "malformed client_properties");
		return;
	}
	if (amqp_decode_method(AMQP_CONNECTION_START_OK_METHOD, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 501, AMQP_CONNECTION_START_OK_METHOD,
			      "cannot decode connection.start-ok");
		return;
	}
	caps = table_get(&m->client_properties, "capabilities");
	if (caps && caps->kind == AMQP_FIELD_KIND_TABLE) {
		s->cap_blocked = table_bool(&caps->value.table, "connection.blocked");
		s->cap_auth_close = table_bool(&caps->value.table, "authentication_failure_close");
		s->cap_cancel_notify = table_bool(&caps->value.table, "consumer_cancel_notify");
	}
	snprintf(mech, sizeof(mech), "%.*s", (int)(m->mechanism.len < 31 ? m->mechanism.len : 31),
		 (const char *)m->mechanism.bytes);
	if (strcmp(mech, "PLAIN") == 0) {
		if (!login_plain(s, m->response, mech))
			return;
	} else if (strcmp(mech, "AMQPLAIN") == 0) {
		if (!login_amqplain(s, m->response, mech))
			return;
	} else if (strcmp(mech, "EXTERNAL") == 0) {
		s->user[0] = '\0';
	} else {
		char shown[40];
		snprintf(shown, sizeof(shown), "%s", mech);
		for (char *c = shown; *c; c++)
			if (*c < 0x20 || *c > 0x7e)
				*c = '?';
		gs_conn_error(s, 503, AMQP_CONNECTION_START_OK_METHOD,
			      "unknown authentication mechanism '%s'", shown);
		return;
	}
	if (s->cfg->auth && s->cfg->auth(s->cfg->auth_userdata, mech, s->user) < 0) {
		refuse_login(s, mech);
		return;
	}
	{
		amqp_connection_tune_t t = {
			.channel_max = s->cfg->channel_max,
			.frame_max = s->cfg->frame_max,
			.heartbeat = s->cfg->heartbeat,
		};
		gs_send_method(s, 0, AMQP_CONNECTION_TUNE_METHOD, &t);
	}
	s->st = ST_TUNE_OK;
}

static void on_tune_ok(struct guest_session *s, const uint8_t *args, size_t len)
{
	amqp_connection_tune_ok_t *m;
	amqp_bytes_t b = { len, (void *)args };
	uint32_t fmax = s->cfg->frame_max;

	if (amqp_decode_method(AMQP_CONNECTION_TUNE_OK_METHOD, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 501, AMQP_CONNECTION_TUNE_OK_METHOD,
			      "cannot decode connection.tune-ok");
		return;
	}
	/* rabbit_reader's validate_negotiated_integer_value: with a server
	 * limit, 0 ("no limit") is above it; the close names connection.tune. */
	if (m->channel_max == 0 || m->channel_max > s->cfg->channel_max) {
		gs_conn_error(s, 530, AMQP_CONNECTION_TUNE_METHOD,
			      "negotiated channel_max = %u%s is higher than the maximum allowed "
			      "value (%u)", m->channel_max, m->channel_max ? "" : " (no limit)",
			      s->cfg->channel_max);
		return;
	}
	if (m->frame_max != 0 && m->frame_max < AMQP_FRAME_MIN_SIZE) {
		gs_conn_error(s, 530, AMQP_CONNECTION_TUNE_METHOD,
			      "negotiated frame_max = %u is lower than the minimum allowed value "
			      "(%u)", m->frame_max, AMQP_FRAME_MIN_SIZE);
		return;
	}
	if (m->frame_max == 0 || m->frame_max > fmax) {
		gs_conn_error(s, 530, AMQP_CONNECTION_TUNE_METHOD,
			      "negotiated frame_max = %u is higher than the maximum allowed value "
			      "(%u)", m->frame_max, fmax);
		return;
	}
	s->channel_max = m->channel_max;
	s->frame_max = m->frame_max;
	s->heartbeat = m->heartbeat;
	s->st = ST_OPEN;
}

static void on_open(struct guest_session *s, const uint8_t *args, size_t len)
{
	amqp_connection_open_t *m;
	amqp_bytes_t b = { len, (void *)args };
	amqp_connection_open_ok_t ok;
	struct guest_event ev;

	if (amqp_decode_method(AMQP_CONNECTION_OPEN_METHOD, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 501, AMQP_CONNECTION_OPEN_METHOD, "cannot decode connection.open");
		return;
	}
	if (s->cfg->vhost && (m->virtual_host.len != strlen(s->cfg->vhost) ||
			      memcmp(m->virtual_host.bytes, s->cfg->vhost, m->virtual_host.len))) {
		gs_conn_error(s, 530, AMQP_CONNECTION_OPEN_METHOD,
			      "access to vhost '%.*s' refused for user '%s'",
			      (int)(m->virtual_host.len > 64 ? 64 : m->virtual_host.len),
			      (const char *)m->virtual_host.bytes, s->user);
		return;
	}
	memset(&ok, 0, sizeof(ok));
	ok.known_hosts = amqp_cstring_bytes("");
	gs_send_method(s, 0, AMQP_CONNECTION_OPEN_OK_METHOD, &ok);
	s->st = ST_RUNNING;
	if (s->cfg->on_event) {
		memset(&ev, 0, sizeof(ev));
		ev.type = GUEST_EVENT_OPENED;
		s->cfg->on_event(s->ud, &ev);
	}
}

/* A method on channel 0 after the protocol header: the handshake in
 * order, then close and the notices a running connection ignores. */
void gs_on_connection_method(struct guest_session *s, amqp_method_number_t id,
			     const uint8_t *p, size_t len)
{
	static const amqp_method_number_t expect[] = {
		[ST_START_OK] = AMQP_CONNECTION_START_OK_METHOD,
		[ST_TUNE_OK] = AMQP_CONNECTION_TUNE_OK_METHOD,
		[ST_OPEN] = AMQP_CONNECTION_OPEN_METHOD,
	};
	/* rabbit_reader's names for these states */
	static const char *const state_name[] = {
		[ST_START_OK] = "starting",
		[ST_TUNE_OK] = "tuning",
		[ST_OPEN] = "opening",
		[ST_RUNNING] = "running",
	};

	if (id == AMQP_CONNECTION_CLOSE_METHOD) {
		amqp_connection_close_t *m;
		amqp_bytes_t b = { len, (void *)p };
		amqp_connection_close_ok_t ok = { 0 };

		s->close_code = 200;
		snprintf(s->close_text, sizeof(s->close_text), "closed by the client");
		if (amqp_decode_method(id, &s->pool, b, (void **)&m) == 0) {
			s->close_code = m->reply_code;
			snprintf(s->close_text, sizeof(s->close_text), "closed by the client: %.*s",
				 (int)(m->reply_text.len > 100 ? 100 : m->reply_text.len),
				 (const char *)m->reply_text.bytes);
		}
		gs_send_method(s, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		s->st = ST_CLOSED;
		gs_emit_closed(s);
		return;
	}
	if (s->st != ST_RUNNING) {
		if (id != expect[s->st]) {
			gs_conn_error(s, 504, id, "unexpected method in connection state %s",
				      state_name[s->st]);
			return;
		}
		if (s->st == ST_START_OK)
			on_start_ok(s, p, len);
		else if (s->st == ST_TUNE_OK)
			on_tune_ok(s, p, len);
		else
			on_open(s, p, len);
		return;
	}
	switch (id) {
	case AMQP_CONNECTION_CLOSE_OK_METHOD:
	case AMQP_CONNECTION_BLOCKED_METHOD:
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		return;
	}
	gs_conn_error(s, 504, id, "unexpected method in connection state %s",
		      state_name[s->st]);
}
