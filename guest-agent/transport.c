/* transport.c -- see transport.h */
#include "transport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/vm_sockets.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "clock.h"

struct transport {
	struct transport_opts o;
	bool vsock;
	unsigned cid, port;
	char host[256];
	amqp_connection_state_t conn;
	uint64_t tag;
};

int transport_new(const struct transport_opts *o, struct transport **out, char *err,
		  size_t errlen)
{
	struct transport *t = calloc(1, sizeof(*t));
	const char *e = o->endpoint;

	if (!t)
		return -ENOMEM;
	t->o = *o;
	if (strncmp(e, "vsock://", 8) == 0) {
		t->vsock = true;
		if (sscanf(e + 8, "%u:%u", &t->cid, &t->port) != 2 || t->port == 0) {
			snprintf(err, errlen, "endpoint \"%s\": expected vsock://CID:PORT", e);
			free(t);
			return -EINVAL;
		}
	} else if (strncmp(e, "tcp://", 6) == 0) {
		const char *colon = strrchr(e + 6, ':');
		if (!colon || colon == e + 6 || (size_t)(colon - e - 6) >= sizeof(t->host) ||
		    sscanf(colon + 1, "%u", &t->port) != 1 || t->port == 0 || t->port > 65535) {
			snprintf(err, errlen, "endpoint \"%s\": expected tcp://HOST:PORT", e);
			free(t);
			return -EINVAL;
		}
		memcpy(t->host, e + 6, (size_t)(colon - e - 6));
	} else {
		snprintf(err, errlen, "endpoint \"%s\": expected vsock://CID:PORT or tcp://HOST:PORT",
			 e);
		free(t);
		return -EINVAL;
	}
	if (o->source_address && (t->vsock || o->ca)) {
		snprintf(err, errlen, "--source-address works with plain tcp:// endpoints only");
		free(t);
		return -EINVAL;
	}
	*out = t;
	return 0;
}

static void disconnect(struct transport *t)
{
	if (t->conn)
		amqp_destroy_connection(t->conn);
	t->conn = NULL;
}

void transport_free(struct transport *t)
{
	if (!t)
		return;
	if (t->conn)
		broker_close(t->conn);
	free(t);
}

bool transport_connected(const struct transport *t)
{
	return t->conn != NULL;
}

/* A connected socket for vsock or a bound TCP source; -errno. */
static int make_fd(struct transport *t, char *err, size_t errlen)
{
	int fd, e;

	if (t->vsock) {
		struct sockaddr_vm svm = { .svm_family = AF_VSOCK, .svm_cid = t->cid,
					   .svm_port = t->port };
		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && connect(fd, (struct sockaddr *)&svm, sizeof(svm)) == 0)
			return fd;
		e = errno;
		snprintf(err, errlen, "vsock cid %u port %u: %s", t->cid, t->port, strerror(e));
	} else {
		struct sockaddr_in src = { .sin_family = AF_INET }, dst = { .sin_family = AF_INET };
		if (inet_pton(AF_INET, t->o.source_address, &src.sin_addr) != 1 ||
		    inet_pton(AF_INET, t->host, &dst.sin_addr) != 1) {
			snprintf(err, errlen, "with --source-address both addresses must be numeric IPv4");
			return -EINVAL;
		}
		dst.sin_port = htons((uint16_t)t->port);
		fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && bind(fd, (struct sockaddr *)&src, sizeof(src)) == 0 &&
		    connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == 0)
			return fd;
		e = errno;
		snprintf(err, errlen, "tcp %s:%u from %s: %s", t->host, t->port, t->o.source_address,
			 strerror(e));
	}
	if (fd >= 0)
		close(fd);
	return -e;
}

static enum transport_result connect_now(struct transport *t, char *err, size_t errlen)
{
	struct broker_opts bo;
	int r;

	broker_opts_init(&bo);
	bo.host = t->vsock ? "vsock" : t->host;
	bo.port = (uint16_t)t->port;
	bo.vhost = t->o.vhost;
	bo.user = t->o.user;
	bo.password = t->o.password;
	bo.tls = t->o.ca != NULL;
	bo.ca = t->o.ca;
	bo.cert = t->o.cert;
	bo.key = t->o.key;
	bo.heartbeat = 0;
	bo.timeout_ms = t->o.timeout_ms;
	bo.product = "vmproxy-agent";
	bo.connection_name = "vmproxy-agent";
	if (t->vsock || t->o.source_address) {
		bo.fd = make_fd(t, err, errlen);
		if (bo.fd < 0)
			return TRANSPORT_NO_CONNECT;
	}
	r = broker_connect(&bo, &t->conn, err, errlen);
	if (r == 0)
		r = broker_channel_open(t->conn, 1, true, err, errlen);
	if (r < 0) {
		disconnect(t);
		if (r == -ETIMEDOUT)
			return TRANSPORT_TIMEOUT;
		return r == -EACCES ? TRANSPORT_REFUSED : TRANSPORT_NO_CONNECT;
	}
	t->tag = 0;
	return TRANSPORT_CONFIRMED;
}

enum transport_result transport_publish(struct transport *t, const char *rk, const char *msgid,
					const void *body, size_t len, uint64_t timestamp_s, char *err,
					size_t errlen)
{
	amqp_basic_properties_t p;
	uint64_t deadline;
	int r;

	if (!t->conn) {
		enum transport_result cr = connect_now(t, err, errlen);
		if (cr != TRANSPORT_CONFIRMED)
			return cr;
	}
	memset(&p, 0, sizeof(p));
	p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
		   AMQP_BASIC_TIMESTAMP_FLAG;
	p.content_type = amqp_cstring_bytes("application/json");
	p.delivery_mode = 2;
	p.timestamp = timestamp_s;
	if (msgid) {
		p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
		p.message_id = amqp_cstring_bytes(msgid);
	}
	r = amqp_basic_publish(t->conn, 1, amqp_cstring_bytes(t->o.exchange), amqp_cstring_bytes(rk),
			       0, 0, &p, (amqp_bytes_t){ len, (void *)body });
	if (r != AMQP_STATUS_OK) {
		snprintf(err, errlen, "publish: %s", amqp_error_string2(r));
		disconnect(t);
		return TRANSPORT_NO_CONNECT;
	}
	t->tag++;
	deadline = clock_mono_ms() + (uint64_t)t->o.timeout_ms;
	for (;;) {
		uint64_t now = clock_mono_ms();
		struct timeval tv;
		amqp_frame_t f;

		if (now >= deadline) {
			snprintf(err, errlen, "no confirm within %d ms", t->o.timeout_ms);
			disconnect(t);
			return TRANSPORT_TIMEOUT;
		}
		tv.tv_sec = (long)((deadline - now) / 1000);
		tv.tv_usec = (long)((deadline - now) % 1000) * 1000;
		r = amqp_simple_wait_frame_noblock(t->conn, &f, &tv);
		if (r == AMQP_STATUS_TIMEOUT)
			continue;
		if (r != AMQP_STATUS_OK) {
			snprintf(err, errlen, "connection lost: %s", amqp_error_string2(r));
			disconnect(t);
			return TRANSPORT_NO_CONNECT;
		}
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue;
		switch (f.payload.method.id) {
		case AMQP_BASIC_ACK_METHOD: {
			amqp_basic_ack_t *a = f.payload.method.decoded;
			if (a->delivery_tag >= t->tag) {
				amqp_maybe_release_buffers(t->conn);
				return TRANSPORT_CONFIRMED;
			}
			break;
		}
		case AMQP_BASIC_NACK_METHOD: {
			amqp_basic_nack_t *n = f.payload.method.decoded;
			if (n->delivery_tag >= t->tag) {
				snprintf(err, errlen, "the broker nacked the message");
				amqp_maybe_release_buffers(t->conn);
				return TRANSPORT_NACKED;
			}
			break;
		}
		case AMQP_CHANNEL_CLOSE_METHOD: {
			amqp_channel_close_t *c = f.payload.method.decoded;
			snprintf(err, errlen, "refused: %u %.*s", c->reply_code,
				 (int)c->reply_text.len, (char *)c->reply_text.bytes);
			disconnect(t);
			return TRANSPORT_REFUSED;
		}
		case AMQP_CONNECTION_CLOSE_METHOD: {
			amqp_connection_close_t *c = f.payload.method.decoded;
			snprintf(err, errlen, "refused: %u %.*s", c->reply_code,
				 (int)c->reply_text.len, (char *)c->reply_text.bytes);
			disconnect(t);
			return TRANSPORT_REFUSED;
		}
		}
	}
}
