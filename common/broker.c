/* broker.c -- see broker.h */
#include "broker.h"
#include "field.h"

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

void broker_opts_init(struct broker_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->fd = -1;
	o->port = 5672;
	o->verify_hostname = true;
	o->heartbeat = 30;
}

const char *broker_reply_describe(amqp_rpc_reply_t r, char *buf, size_t len)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		snprintf(buf, len, "ok");
		break;
	case AMQP_RESPONSE_NONE:
		snprintf(buf, len, "missing RPC reply");
		break;
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		snprintf(buf, len, "%s", amqp_error_string2(r.library_error));
		break;
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			const amqp_connection_close_t *m = r.reply.decoded;
			snprintf(buf, len, "server connection error %u: %.*s", m->reply_code,
				 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		} else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
			const amqp_channel_close_t *m = r.reply.decoded;
			snprintf(buf, len, "server channel error %u: %.*s", m->reply_code,
				 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		} else {
			snprintf(buf, len, "unexpected server method 0x%08x", r.reply.id);
		}
		break;
	}
	return buf;
}

static int reply_errno(amqp_rpc_reply_t r)
{
	if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION)
		return -EACCES;
	if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
	    r.library_error == AMQP_STATUS_TIMEOUT)
		return -ETIMEDOUT;
	return -ECONNABORTED;
}

static int setup_tls(const struct broker_opts *o, amqp_socket_t *s, char *err, size_t errlen)
{
	int r;

	if (!o->ca) {
		snprintf(err, errlen, "TLS needs a CA file (no default CA paths)");
		return -EINVAL;
	}
	r = amqp_ssl_socket_set_ssl_versions(s, AMQP_TLSv1_2, AMQP_TLSvLATEST);
	if (r == AMQP_STATUS_OK)
		r = amqp_ssl_socket_set_cacert(s, o->ca);
	if (r != AMQP_STATUS_OK) {
		snprintf(err, errlen, "CA file \"%s\": %s", o->ca, amqp_error_string2(r));
		return -EINVAL;
	}
	if (o->cert) {
		if (!o->key) {
			snprintf(err, errlen, "client certificate given without a key");
			return -EINVAL;
		}
		r = amqp_ssl_socket_set_key(s, o->cert, o->key);
		if (r != AMQP_STATUS_OK) {
			snprintf(err, errlen, "client certificate \"%s\" / key \"%s\": %s",
				 o->cert, o->key, amqp_error_string2(r));
			return -EINVAL;
		}
	}
	amqp_ssl_socket_set_verify_peer(s, 1);
	amqp_ssl_socket_set_verify_hostname(s, o->verify_hostname ? 1 : 0);
	return 0;
}

/* Connect socket object S as O says (its descriptor, or host and port with
 * TLS when asked), within TV. O's descriptor is closed on failure. */
static int open_socket(const struct broker_opts *o, amqp_socket_t *s, struct timeval *tv,
		       char *err, size_t errlen)
{
	int r;

	if (o->fd >= 0) {
		/* rabbitmq-c expects the non-blocking sockets it makes itself:
		 * with a blocking one its "noblock" reads would block. */
		int fl = fcntl(o->fd, F_GETFL);
		if (fl < 0 || fcntl(o->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
			snprintf(err, errlen, "socket: %s", strerror(errno));
			r = -errno;
			close(o->fd);
			return r;
		}
		amqp_tcp_socket_set_sockfd(s, o->fd);
		return 0;
	}
	if (o->tls) {
		r = setup_tls(o, s, err, errlen);
		if (r < 0)
			return r;
	}
	r = amqp_socket_open_noblock(s, o->host, o->port, tv);
	if (r != AMQP_STATUS_OK) {
		snprintf(err, errlen, "connect %s:%u%s: %s", o->host, o->port,
			 o->tls ? " (TLS)" : "", amqp_error_string2(r));
		return r == AMQP_STATUS_TIMEOUT ? -ETIMEDOUT : -ECONNREFUSED;
	}
	return 0;
}

/* connection.start-ok with our client properties, and the login O asks for. */
static amqp_rpc_reply_t login(amqp_connection_state_t conn, const struct broker_opts *o)
{
	amqp_table_entry_t caps[] = {
		field_bool("connection.blocked", true),
		field_bool("authentication_failure_close", true),
		field_bool("publisher_confirms", true),
		field_bool("basic.nack", true),
		field_bool("consumer_cancel_notify", true),
	};
	amqp_table_entry_t props[4];
	amqp_table_t table;
	const char *vhost = o->vhost ? o->vhost : "/";
	int channel_max = o->channel_max ? o->channel_max : 16;
	int frame_max = o->frame_max ? (int)o->frame_max : 131072;
	int n = 0;

	props[n++] = field_table("capabilities", caps, (int)(sizeof(caps) / sizeof(caps[0])));
	if (o->connection_name)
		props[n++] = field_utf8("connection_name", o->connection_name);
	if (o->product) {
		/* Ours replace rabbitmq-c's own product and version. */
		props[n++] = field_utf8("product", o->product);
		props[n++] = field_utf8("version", VMPROXY_VERSION);
	}
	table.num_entries = n;
	table.entries = props;
	if (o->auth == BROKER_AUTH_EXTERNAL)
		/* RabbitMQ takes the name from the certificate; rabbitmq-c
		 * fails to allocate an empty response. */
		return amqp_login_with_properties(conn, vhost, channel_max, frame_max, o->heartbeat,
						  &table, AMQP_SASL_METHOD_EXTERNAL,
						  o->user && *o->user ? o->user : "cert");
	return amqp_login_with_properties(conn, vhost, channel_max, frame_max, o->heartbeat, &table,
					  AMQP_SASL_METHOD_PLAIN, o->user ? o->user : "guest",
					  o->password ? o->password : "guest");
}

int broker_connect(const struct broker_opts *o, amqp_connection_state_t *out, char *err,
		   size_t errlen)
{
	amqp_connection_state_t conn;
	amqp_socket_t *s;
	amqp_rpc_reply_t rr;
	struct timeval tv;
	int timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 10000;
	int r;
	char desc[300];

	conn = amqp_new_connection();
	if (!conn) {
		if (o->fd >= 0)
			close(o->fd);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	s = o->tls && o->fd < 0 ? amqp_ssl_socket_new(conn) : amqp_tcp_socket_new(conn);
	if (!s) {
		if (o->fd >= 0)
			close(o->fd);
		snprintf(err, errlen, "cannot create socket object");
		r = -ENOMEM;
		goto fail;
	}
	tv.tv_sec = timeout_ms / 1000;
	tv.tv_usec = (timeout_ms % 1000) * 1000;
	amqp_set_handshake_timeout(conn, &tv);
	amqp_set_rpc_timeout(conn, &tv);
	r = open_socket(o, s, &tv, err, errlen);
	if (r < 0)
		goto fail;
	rr = login(conn, o);
	if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
		snprintf(err, errlen, "login to %s:%u vhost \"%s\": %s", o->host ? o->host : "fd",
			 o->port, o->vhost ? o->vhost : "/",
			 broker_reply_describe(rr, desc, sizeof(desc)));
		r = reply_errno(rr);
		goto fail;
	}
	*out = conn;
	return 0;
fail:
	amqp_destroy_connection(conn);
	return r;
}

int broker_channel_open(amqp_connection_state_t conn, amqp_channel_t channel, bool confirm,
			char *err, size_t errlen)
{
	amqp_rpc_reply_t rr;
	char desc[300];

	amqp_channel_open(conn, channel);
	rr = amqp_get_rpc_reply(conn);
	if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
		snprintf(err, errlen, "channel.open: %s",
			 broker_reply_describe(rr, desc, sizeof(desc)));
		return reply_errno(rr);
	}
	if (confirm) {
		amqp_confirm_select(conn, channel);
		rr = amqp_get_rpc_reply(conn);
		if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
			snprintf(err, errlen, "confirm.select: %s",
				 broker_reply_describe(rr, desc, sizeof(desc)));
			return reply_errno(rr);
		}
	}
	return 0;
}

void broker_close(amqp_connection_state_t conn)
{
	if (!conn)
		return;
	amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(conn);
}
