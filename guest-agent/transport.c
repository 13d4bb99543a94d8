/* transport.c -- see transport.h */
#include "transport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <inttypes.h>
#include <time.h>

#include "clock.h"
#include "log.h"

/* The socket of the connection (or connect) in progress, for the signal
 * handlers to shut down; -1 when none. */
static volatile sig_atomic_t cur_fd = -1;
static volatile sig_atomic_t timed_out, interrupted;

static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
	if (cur_fd >= 0)
		shutdown(cur_fd, SHUT_RDWR);
}

void transport_abort_from_signal(void)
{
	interrupted = 1;
	if (cur_fd >= 0)
		shutdown(cur_fd, SHUT_RDWR);
}

/* Arm the watchdog for MS from now (0: disarm). */
static void watchdog(int ms)
{
	struct itimerval it = { { 0, 0 }, { ms / 1000, (ms % 1000) * 1000 } };

	timed_out = 0;
	setitimer(ITIMER_REAL, &it, NULL);
}

struct transport {
	struct transport_opts o;
	bool vsock;
	unsigned cid, port;
	char host[256];
	amqp_connection_state_t conn;
	uint64_t tag;
	bool consuming; /* the inbox consumer is on channel 2 */
	bool inbox_warned;
	/* Control messages that came while waiting for a confirm. */
	struct transport_control pending[4];
	unsigned npending;
};

#define CONTROL_CHANNEL 2

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
	{
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_alarm; /* no SA_RESTART: a blocked call returns */
		sigemptyset(&sa.sa_mask);
		sigaction(SIGALRM, &sa, NULL);
	}
	*out = t;
	return 0;
}

static void disconnect(struct transport *t)
{
	cur_fd = -1; /* before the descriptor is closed and its number reused */
	if (t->conn)
		amqp_destroy_connection(t->conn);
	t->conn = NULL;
	t->consuming = false;
	/* Unsettled control messages are redelivered on the next connection. */
	for (unsigned i = 0; i < t->npending; i++)
		free(t->pending[i].body);
	t->npending = 0;
}

void transport_free(struct transport *t)
{
	if (!t)
		return;
	if (t->conn) {
		/* Bounded too: a peer that stopped reading cannot hold the exit. */
		watchdog(t->o.timeout_ms > 0 ? t->o.timeout_ms : 10000);
		broker_close(t->conn);
		cur_fd = -1;
		watchdog(0);
	}
	for (unsigned i = 0; i < t->npending; i++)
		free(t->pending[i].body);
	free(t);
}

/* connect() bounded by TIMEOUT_MS and by transport_abort_from_signal:
 * 0 or -errno (-ETIMEDOUT, -EINTR when interrupted). */
static int connect_bounded(int fd, const struct sockaddr *sa, socklen_t len, int timeout_ms)
{
	uint64_t deadline = clock_mono_ms() + (uint64_t)timeout_ms;
	int fl = fcntl(fd, F_GETFL), e = 0;
	socklen_t elen = sizeof(e);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	if (connect(fd, sa, len) == 0)
		return 0;
	if (errno != EINPROGRESS)
		return -errno;
	for (;;) {
		struct pollfd pfd = { .fd = fd, .events = POLLOUT };
		uint64_t now = clock_mono_ms();
		int r;

		if (interrupted)
			return -EINTR;
		if (now >= deadline)
			return -ETIMEDOUT;
		r = poll(&pfd, 1, (int)(deadline - now));
		if (r < 0 && errno != EINTR)
			return -errno;
		if (r > 0)
			break;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen) < 0)
		return -errno;
	return -e;
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
		/* The kernel gives up a vsock connect after 2 s by default: it
		 * may take --timeout. */
		struct timeval tv = { t->o.timeout_ms / 1000, (t->o.timeout_ms % 1000) * 1000 };
		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0) {
			cur_fd = fd;
			setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv));
			e = -connect_bounded(fd, (struct sockaddr *)&svm, sizeof(svm),
					     t->o.timeout_ms);
			if (e == 0)
				return fd;
		} else {
			e = errno;
		}
		if (e == ETIMEDOUT)
			snprintf(err, errlen, "vsock cid %u port %u: no connection within %d ms",
				 t->cid, t->port, t->o.timeout_ms);
		else
			snprintf(err, errlen, "vsock cid %u port %u: %s", t->cid, t->port,
				 e == EINTR ? "interrupted" : strerror(e));
	} else {
		struct sockaddr_in src = { .sin_family = AF_INET }, dst = { .sin_family = AF_INET };
		if (inet_pton(AF_INET, t->o.source_address, &src.sin_addr) != 1 ||
		    inet_pton(AF_INET, t->host, &dst.sin_addr) != 1) {
			snprintf(err, errlen, "with --source-address both addresses must be numeric IPv4");
			return -EINVAL;
		}
		dst.sin_port = htons((uint16_t)t->port);
		fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0) {
			cur_fd = fd;
			e = bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0
				    ? errno
				    : -connect_bounded(fd, (struct sockaddr *)&dst, sizeof(dst),
						       t->o.timeout_ms);
			if (e == 0)
				return fd;
		} else {
			e = errno;
		}
		if (e == ETIMEDOUT)
			snprintf(err, errlen, "tcp %s:%u from %s: no connection within %d ms",
				 t->host, t->port, t->o.source_address, t->o.timeout_ms);
		else
			snprintf(err, errlen, "tcp %s:%u from %s: %s", t->host, t->port,
				 t->o.source_address, e == EINTR ? "interrupted" : strerror(e));
	}
	cur_fd = -1;
	if (fd >= 0)
		close(fd);
	return -e;
}

/* Consume the inbox on its own channel, one message at a time. A proxy
 * without inboxes refuses (403 on that channel): the agent then runs
 * without control messages, and says so once. */
static void subscribe(struct transport *t)
{
	amqp_bytes_t q = amqp_cstring_bytes(t->o.inbox);
	amqp_rpc_reply_t r;
	char why[200];

	watchdog(t->o.timeout_ms + 1000);
	amqp_channel_open(t->conn, CONTROL_CHANNEL);
	r = amqp_get_rpc_reply(t->conn);
	if (r.reply_type == AMQP_RESPONSE_NORMAL) {
		amqp_queue_declare(t->conn, CONTROL_CHANNEL, q, 0, 0, 0, 0, amqp_empty_table);
		r = amqp_get_rpc_reply(t->conn);
	}
	if (r.reply_type == AMQP_RESPONSE_NORMAL) {
		amqp_basic_qos(t->conn, CONTROL_CHANNEL, 0, 1, 0);
		r = amqp_get_rpc_reply(t->conn);
	}
	if (r.reply_type == AMQP_RESPONSE_NORMAL) {
		amqp_basic_consume(t->conn, CONTROL_CHANNEL, q, amqp_empty_bytes, 0, 0, 0,
				   amqp_empty_table);
		r = amqp_get_rpc_reply(t->conn);
	}
	watchdog(0);
	if (r.reply_type == AMQP_RESPONSE_NORMAL) {
		t->consuming = true;
		log_info("consuming control messages from \"%s\"", t->o.inbox);
		return;
	}
	if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
	    r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
		amqp_channel_close_ok_t ok = { 0 };
		amqp_send_method(t->conn, CONTROL_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
	}
	if (!t->inbox_warned)
		log_warn("no control messages: consuming \"%s\" failed: %s; sampling goes on",
			 t->o.inbox, broker_reply_describe(r, why, sizeof(why)));
	t->inbox_warned = true;
}

/* A basic.deliver frame F on the control channel: read its content and
 * keep it (or reject what is too large). Returns -1 on a lost connection. */
static int take_delivery(struct transport *t, const amqp_frame_t *f)
{
	amqp_basic_deliver_t *d = f->payload.method.decoded;
	uint64_t tag = d->delivery_tag;
	amqp_message_t msg;
	amqp_rpc_reply_t r;

	r = amqp_read_message(t->conn, CONTROL_CHANNEL, &msg, 0);
	if (r.reply_type != AMQP_RESPONSE_NORMAL)
		return -1;
	if (msg.body.len > TRANSPORT_CONTROL_MAX || t->npending == 4) {
		log_warn("control message %" PRIu64 " of %zu bytes rejected: larger than %u bytes",
			 tag, msg.body.len, TRANSPORT_CONTROL_MAX);
		transport_settle(t, tag, false);
	} else {
		char *b = malloc(msg.body.len + 1);
		if (b) {
			memcpy(b, msg.body.bytes, msg.body.len);
			b[msg.body.len] = '\0';
			t->pending[t->npending++] = (struct transport_control){ tag, b, msg.body.len };
		}
	}
	amqp_destroy_message(&msg);
	return 0;
}

int transport_wait(struct transport *t, int ms, struct transport_control *out)
{
	uint64_t deadline = clock_mono_ms() + (uint64_t)(ms > 0 ? ms : 0);

	for (;;) {
		uint64_t now = clock_mono_ms();
		struct timeval tv;
		amqp_frame_t f;
		int r;

		if (t->npending) {
			*out = t->pending[0];
			memmove(t->pending, t->pending + 1, --t->npending * sizeof(t->pending[0]));
			return 1;
		}
		if (interrupted || now >= deadline)
			return 0;
		if (!t->conn || !t->consuming) {
			struct timespec ts = { (time_t)((deadline - now) / 1000),
					       (long)((deadline - now) % 1000) * 1000000L };
			nanosleep(&ts, NULL); /* a signal ends it early */
			return 0;
		}
		tv.tv_sec = (long)((deadline - now) / 1000);
		tv.tv_usec = (long)((deadline - now) % 1000) * 1000;
		r = amqp_simple_wait_frame_noblock(t->conn, &f, &tv);
		if (r == AMQP_STATUS_TIMEOUT)
			return 0;
		if (r != AMQP_STATUS_OK) {
			disconnect(t);
			return -1;
		}
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue;
		if (f.payload.method.id == AMQP_BASIC_DELIVER_METHOD && f.channel == CONTROL_CHANNEL) {
			if (take_delivery(t, &f) < 0) {
				disconnect(t);
				return -1;
			}
		} else if (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
			   f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD ||
			   f.payload.method.id == AMQP_BASIC_CANCEL_METHOD) {
			/* Consumer or connection gone: start over at the next publish. */
			disconnect(t);
			return -1;
		}
	}
}

void transport_settle(struct transport *t, uint64_t tag, bool ack)
{
	if (!t->conn || !t->consuming)
		return;
	if (ack)
		amqp_basic_ack(t->conn, CONTROL_CHANNEL, tag, 0);
	else
		amqp_basic_reject(t->conn, CONTROL_CHANNEL, tag, 0);
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
	if (interrupted) {
		snprintf(err, errlen, "interrupted");
		return TRANSPORT_INTERRUPTED;
	}
	/* The connect and the handshake have their own timeouts; the
	 * watchdog catches whatever blocks past them. */
	watchdog(t->o.timeout_ms + 1000);
	if (t->vsock || t->o.source_address) {
		bo.fd = make_fd(t, err, errlen);
		if (bo.fd < 0) {
			watchdog(0);
			if (bo.fd == -EINTR || interrupted)
				return TRANSPORT_INTERRUPTED;
			return bo.fd == -ETIMEDOUT ? TRANSPORT_TIMEOUT : TRANSPORT_NO_CONNECT;
		}
	}
	r = broker_connect(&bo, &t->conn, err, errlen);
	if (r == 0) {
		cur_fd = amqp_get_sockfd(t->conn);
		if (interrupted) /* the signal came before the socket was known */
			shutdown(cur_fd, SHUT_RDWR);
		r = broker_channel_open(t->conn, 1, true, err, errlen);
	}
	watchdog(0);
	if (r < 0) {
		disconnect(t);
		if (interrupted) {
			snprintf(err, errlen, "interrupted");
			return TRANSPORT_INTERRUPTED;
		}
		if (timed_out)
			snprintf(err, errlen, "no connection and handshake within %d ms",
				 t->o.timeout_ms + 1000);
		if (r == -ETIMEDOUT || timed_out)
			return TRANSPORT_TIMEOUT;
		return r == -EACCES ? TRANSPORT_REFUSED : TRANSPORT_NO_CONNECT;
	}
	t->tag = 0;
	if (t->o.inbox)
		subscribe(t);
	return TRANSPORT_CONFIRMED;
}

/* After a failed call: interrupted, timed out (the watchdog shut the socket
 * down) or OTHERWISE; the connection is dropped. */
static enum transport_result failed(struct transport *t, enum transport_result otherwise,
				    char *err, size_t errlen)
{
	watchdog(0);
	disconnect(t);
	if (interrupted) {
		snprintf(err, errlen, "interrupted");
		return TRANSPORT_INTERRUPTED;
	}
	if (timed_out) {
		snprintf(err, errlen,
			 "not sent and confirmed within %d ms (the peer stopped reading)",
			 t->o.timeout_ms);
		return TRANSPORT_TIMEOUT;
	}
	return otherwise;
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
	/* rabbitmq-c sends with no deadline and retries on EINTR: a peer that
	 * stops reading would hold a large body forever. The watchdog (a
	 * little after the confirm deadline) shuts the socket down. */
	deadline = clock_mono_ms() + (uint64_t)t->o.timeout_ms;
	watchdog(t->o.timeout_ms + 100);
	r = amqp_basic_publish(t->conn, 1, amqp_cstring_bytes(t->o.exchange), amqp_cstring_bytes(rk),
			       0, 0, &p, (amqp_bytes_t){ len, (void *)body });
	if (r != AMQP_STATUS_OK) {
		snprintf(err, errlen, "publish: %s", amqp_error_string2(r));
		return failed(t, TRANSPORT_NO_CONNECT, err, errlen);
	}
	t->tag++;
	for (;;) {
		uint64_t now = clock_mono_ms();
		struct timeval tv;
		amqp_frame_t f;

		if (interrupted)
			return failed(t, TRANSPORT_INTERRUPTED, err, errlen);
		if (now >= deadline) {
			snprintf(err, errlen, "no confirm within %d ms", t->o.timeout_ms);
			watchdog(0);
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
			return failed(t, TRANSPORT_NO_CONNECT, err, errlen);
		}
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue;
		if (f.channel == CONTROL_CHANNEL) {
			if (f.payload.method.id == AMQP_BASIC_DELIVER_METHOD) {
				if (take_delivery(t, &f) < 0) {
					snprintf(err, errlen, "connection lost reading a control message");
					return failed(t, TRANSPORT_NO_CONNECT, err, errlen);
				}
				continue;
			}
			if (f.payload.method.id != AMQP_CHANNEL_CLOSE_METHOD)
				continue;
			/* The inbox channel closed: the connection is started over. */
		}
		switch (f.payload.method.id) {
		case AMQP_BASIC_ACK_METHOD: {
			amqp_basic_ack_t *a = f.payload.method.decoded;
			if (a->delivery_tag >= t->tag) {
				watchdog(0);
				amqp_maybe_release_buffers(t->conn);
				return TRANSPORT_CONFIRMED;
			}
			break;
		}
		case AMQP_BASIC_NACK_METHOD: {
			amqp_basic_nack_t *n = f.payload.method.decoded;
			if (n->delivery_tag >= t->tag) {
				snprintf(err, errlen, "the broker nacked the message");
				watchdog(0);
				amqp_maybe_release_buffers(t->conn);
				return TRANSPORT_NACKED;
			}
			break;
		}
		case AMQP_CHANNEL_CLOSE_METHOD: {
			amqp_channel_close_t *c = f.payload.method.decoded;
			snprintf(err, errlen, "refused: %u %.*s", c->reply_code,
				 (int)c->reply_text.len, (char *)c->reply_text.bytes);
			watchdog(0);
			disconnect(t);
			return TRANSPORT_REFUSED;
		}
		case AMQP_CONNECTION_CLOSE_METHOD: {
			amqp_connection_close_t *c = f.payload.method.decoded;
			snprintf(err, errlen, "refused: %u %.*s", c->reply_code,
				 (int)c->reply_text.len, (char *)c->reply_text.bytes);
			watchdog(0);
			disconnect(t);
			return TRANSPORT_REFUSED;
		}
		}
	}
}
