/* upstream.c -- see upstream.h.
 *
 * The link is one more event source of its poll thread: a non-blocking
 * socket and OpenSSL object in the thread's epoll (edge-triggered, read
 * and write interest registered once), driven through its states by
 * readiness and by deadlines that upstream_tick checks. Only what can block
 * by nature runs on a helper thread: name resolution and loading the TLS
 * files into an SSL_CTX; the result comes back as mail.
 *
 * Write path: publishes are appended to the protocol engine's output
 * buffer (upstream_proto) and written once per loop iteration with as few
 * SSL_write calls as the data needs; OpenSSL cuts records of up to 16 KiB.
 * A full socket (WANT_WRITE) keeps the buffer and the next EPOLLOUT edge
 * continues; a full buffer pauses publishing. Read path: on EPOLLIN,
 * SSL_read until WANT_READ, and confirms settle messages through a ring
 * indexed by delivery tag. */
#include "upstream.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backoff.h"
#include "clock.h"
#include "hash.h"
#include "log.h"
#include "upstream_proto.h"
#include "upstream_tls.h"

#define OUTPUT_MAX	  (256u << 10) /* unsent bytes past which publishing pauses */
#define READ_BUF	  (64u << 10)
#define READS_PER_WAKE	  16	  /* then the loop comes back to the link next time */
#define CLOSE_TIMEOUT_MS  2000	  /* waiting for close-ok on a planned reconnect */
#define SESSION_OK_MS	  60000	  /* a link up this long resets the backoff by itself */

enum link_state {
	LINK_DOWN,
	LINK_RESOLVING,	 /* helper: getaddrinfo and the TLS files */
	LINK_CONNECTING, /* non-blocking connect() in progress */
	LINK_TLS,	 /* TLS handshake */
	LINK_AMQP,	 /* AMQP handshake up to confirm.select-ok */
	LINK_UP,
	LINK_CLOSING, /* planned reconnect: connection.close sent */
};

static const char *const state_names[] = {
	[LINK_DOWN] = "down",
	[LINK_RESOLVING] = "resolving the broker's address",
	[LINK_CONNECTING] = "connecting",
	[LINK_TLS] = "in the TLS handshake",
	[LINK_AMQP] = "in the AMQP handshake",
	[LINK_UP] = "up",
	[LINK_CLOSING] = "closing",
};

/* Runs on a helper: everything about a connect that may block. */
struct resolve_job {
	struct helper_job job;
	struct mail mail;
	struct mailbox *mb;
	const struct proxy_config *cfg;
	uint64_t gen;
	char host[256];
	char port[8];
	struct addrinfo *ai;
	SSL_CTX *ctx;
	int r;
	char err[300];
};

struct upstream {
	const struct proxy_config *cfg;
	unsigned thread_id;
	int epfd;
	struct helper_pool *helpers;
	struct mailbox *mb;
	const struct upstream_ops *ops;
	void *ud;

	enum link_state state;
	int fd;
	SSL_CTX *ctx;
	SSL *ssl;
	struct addrinfo *ai, *ai_cur;
	char server_name[256];
	struct upstream_proto proto;
	bool proto_live;
	uint64_t resolve_gen; /* of the resolve whose answer is awaited */
	struct upstream_proto_config pcfg;
	uint64_t deadline; /* of the current connect, handshake or close */
	uint64_t up_since;
	bool read_more;	   /* the read budget ran out with data possibly left */
	bool io_failed;	   /* a fatal read or write error: no more I/O on it */
	bool session_ok;   /* this connection got a confirm: the backoff resets */
	bool unable;	   /* told ops->publishing the link cannot publish */
	/* Inbox channel generations continue across connections: a delivery
	 * tag of an earlier connection never matches the current one. */
	uint32_t inbox_gen;

	/* Published and not yet handed back, by delivery tag: the message with
	 * tag t is ring[t & ring_mask], for low_tag <= t <= proto.next_tag. */
	struct upstream_msg **ring;
	uint64_t ring_mask;
	uint64_t low_tag;
	uint32_t n_unconfirmed;

	struct backoff backoff;
	uint64_t reconnect_at;
	size_t node;	    /* index into cfg->upstream.hosts */
	size_t node_tries;  /* failed connects since the last full round */
	size_t round_first; /* the node whose failure began this round */
	uint32_t spread;    /* fixed per host and link: where it starts and moves */
	uint64_t last_progress_ms; /* last confirm, or when the ring became non-empty */
	bool broker_blocked;
	bool relink; /* reconnect once nothing is unconfirmed (SIGHUP: new TLS files) */
	char name[160];
	struct upstream_stats st;
	uint8_t rbuf[READ_BUF];
};

uint32_t upstream_link_spread(const char *hostname, unsigned thread_id)
{
	return (hash_fnv1a32(hostname ? hostname : "") >> 8) + thread_id;
}

size_t upstream_failover_node(uint32_t spread, size_t first, size_t tries, size_t n)
{
	if (n <= 1 || tries % n == 0)
		return n ? first % n : 0;
	return (first + (spread / n + tries % n - 1) % (n - 1) + 1) % n;
}

/* ---- the helper's part: resolve, and load the TLS files --------------------------- */

static void resolve_run(struct helper_job *job)
{
	struct resolve_job *rj = (struct resolve_job *)job;
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	int r = getaddrinfo(rj->host, rj->port, &hints, &rj->ai);

	if (r != 0) {
		snprintf(rj->err, sizeof(rj->err), "cannot resolve \"%s\": %s", rj->host,
			 r == EAI_SYSTEM ? strerror(errno) : gai_strerror(r));
		rj->ai = NULL;
		rj->r = -EHOSTUNREACH;
	} else if (rj->cfg->upstream.tls) {
		rj->ctx = upstream_tls_context(rj->cfg, rj->err, sizeof(rj->err));
		rj->r = rj->ctx ? 0 : -EINVAL;
	}
	ERR_clear_error(); /* this thread's queue: nothing left for another user */
	rj->mail.type = UPSTREAM_MAIL_RESOLVED;
	mailbox_post(rj->mb, &rj->mail);
}

void upstream_mail_discard(struct mail *m)
{
	struct resolve_job *rj = (struct resolve_job *)((char *)m - offsetof(struct resolve_job, mail));

	if (rj->ai)
		freeaddrinfo(rj->ai);
	SSL_CTX_free(rj->ctx);
	free(rj);
}

/* ---- life of one connection ---------------------------------------------------- */

int upstream_new(const struct proxy_config *cfg, unsigned thread_id, int epfd,
		 struct helper_pool *helpers, struct mailbox *mb, const struct upstream_ops *ops,
		 void *userdata, struct upstream **out)
{
	struct upstream *up = calloc(1, sizeof(*up));
	uint64_t cap = 64;

	if (!up)
		return -ENOMEM;
	while (cap < cfg->upstream.max_in_flight)
		cap *= 2;
	up->ring = calloc(cap, sizeof(*up->ring));
	if (!up->ring) {
		free(up);
		return -ENOMEM;
	}
	up->ring_mask = cap - 1;
	up->cfg = cfg;
	up->thread_id = thread_id;
	up->epfd = epfd;
	up->helpers = helpers;
	up->mb = mb;
	up->ops = ops;
	up->ud = userdata;
	up->state = LINK_DOWN;
	up->fd = -1;
	backoff_init(&up->backoff, 200, 30000, 0);
	/* Spread the links over the cluster's nodes: a host's threads on
	 * consecutive nodes, from a node that depends on the host name, so a
	 * fleet's links are balanced even when the thread count is not a
	 * multiple of the node count. */
	up->spread = upstream_link_spread(cfg->hostname, thread_id);
	up->node = cfg->upstream.n_hosts ? up->spread % cfg->upstream.n_hosts : 0;
	snprintf(up->name, sizeof(up->name), "vmproxyd/%s/thread-%u", cfg->hostname, thread_id);
	up->pcfg.vhost = cfg->upstream.vhost;
	up->pcfg.mechanism = cfg->upstream.mechanism;
	up->pcfg.user = cfg->upstream.user;
	up->pcfg.password = cfg->upstream.password;
	up->pcfg.heartbeat = cfg->upstream.heartbeat;
	up->pcfg.connection_name = up->name;
	up->pcfg.product = "vmproxyd";
	up->pcfg.exchange = cfg->upstream.exchange;
	up->pcfg.max_output = OUTPUT_MAX;
	up->pcfg.max_return = cfg->guest.max_message_bytes;
	up->pcfg.max_delivery = cfg->inbox.max_message_bytes;
	*out = up;
	return 0;
}

/* Hand every published, unsettled message back, newest first, so the
 * oldest ends up in front of its queue. */
static void requeue_all(struct upstream *up)
{
	uint64_t t = up->low_tag + up->n_unconfirmed;

	while (t-- > up->low_tag) {
		struct upstream_msg *m = up->ring[t & up->ring_mask];

		up->ring[t & up->ring_mask] = NULL;
		m->next = NULL;
		m->outcome = 0;
		up->st.republished++;
		up->ops->requeue(up->ud, m);
	}
	up->n_unconfirmed = 0;
}

/* Write what the protocol engine has queued, as far as the socket takes it.
 * Returns 0 (all written or would block) or -1 with the reason in ERR. */
static int flush_output(struct upstream *up, uint64_t now, char *err, size_t errlen)
{
	for (;;) {
		const void *data;
		size_t len = upstream_proto_output(&up->proto, &data);
		ssize_t n;

		if (len == 0)
			return 0;
		up->st.writes++;
		if (up->ssl) {
			int r, e;

			ERR_clear_error();
			r = SSL_write(up->ssl, data, len > INT32_MAX ? INT32_MAX : (int)len);
			if (r <= 0) {
				e = SSL_get_error(up->ssl, r);
				if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
					return 0;
				up->io_failed = true;
				snprintf(err, errlen, "TLS write: %s", upstream_tls_error((char[200]){ 0 }, 200, e));
				return -1;
			}
			n = r;
		} else {
			n = send(up->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
			if (n < 0) {
				if (errno == EAGAIN || errno == EWOULDBLOCK)
					return 0;
				if (errno == EINTR)
					continue;
				up->io_failed = true;
				snprintf(err, errlen, "write: %s", strerror(errno));
				return -1;
			}
		}
		upstream_proto_consumed(&up->proto, (size_t)n, now);
	}
}

/* Tear the connection down (no I/O but a last try to write what is queued,
 * such as a connection.close). */
static void link_close(struct upstream *up, uint64_t now)
{
	char err[8];

	if (up->proto_live && up->fd >= 0 && !up->io_failed &&
	    (up->state == LINK_AMQP || up->state == LINK_UP || up->state == LINK_CLOSING))
		flush_output(up, now, err, sizeof(err));
	if (up->ssl) {
		SSL_free(up->ssl);
		up->ssl = NULL;
	}
	if (up->fd >= 0) {
		epoll_ctl(up->epfd, EPOLL_CTL_DEL, up->fd, NULL);
		close(up->fd);
		up->fd = -1;
	}
	if (up->proto_live) {
		up->st.deliveries_refused += up->proto.ib.refused;
		up->st.delivered += up->proto.ib.delivered;
		up->proto.ib.refused = up->proto.ib.delivered = 0;
				upstream_proto_inbox_abort(&up->proto, "the link to the broker ended");
		up->inbox_gen = up->proto.ib.gen;
		upstream_proto_destroy(&up->proto);
		up->proto_live = false;
	}
	if (up->ai) {
		freeaddrinfo(up->ai);
		up->ai = up->ai_cur = NULL;
	}
	SSL_CTX_free(up->ctx);
	up->ctx = NULL;
	up->read_more = false;
	up->io_failed = false;
}

/* After a failure on the current node: another node at once while some
 * node of this round has not been tried, then the first one again after a
 * backoff. The other nodes are tried in order from an offset that depends
 * on the host and the link, so the links of a lost node spread over all
 * the survivors instead of all landing on its neighbour. */
static uint32_t next_node_delay(struct upstream *up)
{
	size_t n = up->cfg->upstream.n_hosts;

	if (n <= 1)
		return backoff_next(&up->backoff);
	if (up->node_tries == 0)
		up->round_first = up->node;
	up->node = upstream_failover_node(up->spread, up->round_first, ++up->node_tries, n);
	if (up->node_tries < n)
		return 50;
	up->node_tries = 0;
	return backoff_next(&up->backoff);
}

static void count_refusal(struct upstream *up, uint16_t code)
{
	size_t i;

	/* Closes the broker chose for a reason (4xx and 5xx), not a shutdown. */
	if (code < 400)
		return;
	for (i = 0; i < UPSTREAM_REFUSAL_CODES && up->st.refusals[i].code; i++)
		if (up->st.refusals[i].code == code)
			break;
	if (i == UPSTREAM_REFUSAL_CODES)
		return; /* more distinct codes than AMQP defines: not counted */
	up->st.refusals[i].code = code;
	up->st.refusals[i].count++;
}

static void set_publishing(struct upstream *up, bool able, uint16_t code)
{
	up->unable = !able;
	if (up->ops->publishing)
		up->ops->publishing(up->ud, able, code);
}

static void link_fail(struct upstream *up, uint64_t now, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* The connection ended in failure: everything unsettled is republished on
 * the next one. A connection that never had a message confirmed (a refusal
 * right after login, say) counts as a failed attempt like a failed connect,
 * so a broker refusing every publish sees reconnects back off to 30 s. */
static void link_fail(struct upstream *up, uint64_t now, const char *fmt, ...)
{
	bool was_up = up->state == LINK_UP || up->state == LINK_CLOSING;
	bool ok = up->session_ok || (was_up && now - up->up_since >= SESSION_OK_MS);
	uint16_t code = up->proto_live ? up->proto.broker_code : 0;
	uint32_t delay;
	va_list ap;

	if (ok) {
		backoff_reset(&up->backoff);
		up->node_tries = 0;
	}
	up->session_ok = false;
	delay = next_node_delay(up);
	va_start(ap, fmt);
	vsnprintf(up->st.last_error, sizeof(up->st.last_error), fmt, ap);
	va_end(ap);
	if (code)
		count_refusal(up, code);
	if (was_up)
		log_warn("thread=%u upstream %s: %s; %u unconfirmed messages will be "
			 "republished, reconnecting in %u ms",
			 up->thread_id, up->st.node, up->st.last_error, up->n_unconfirmed, delay);
	else
		log_warn("thread=%u upstream %s: %s; retrying in %u ms", up->thread_id,
			 up->st.node, up->st.last_error, delay);
	link_close(up, now);
	requeue_all(up);
	up->state = LINK_DOWN;
	up->broker_blocked = false;
	up->reconnect_at = now + delay;
	if (was_up)
		up->ops->state_changed(up->ud, false);
	/* node_tries is 0 when this failure starts a backoff wait. */
	if (!ok && up->node_tries == 0 && !up->unable)
		set_publishing(up, false, code);
}

void upstream_free(struct upstream *up)
{
	if (!up)
		return;
	link_close(up, clock_mono_ms());
	requeue_all(up);
	free(up->ring);
	free(up);
}

static void start_resolve(struct upstream *up, uint64_t now)
{
	const struct proxy_config *c = up->cfg;
	const struct upstream_host *h = c->upstream.n_hosts ? &c->upstream.hosts[up->node] : NULL;
	const char *host = h ? h->host : c->upstream.host;
	const char *sni = h && h->server_name ? h->server_name : host;
	uint16_t port = h && h->port ? h->port : c->upstream.port;
	struct resolve_job *rj = calloc(1, sizeof(*rj));

	if (!rj) {
		up->reconnect_at = now + 1000;
		return;
	}
	rj->job.run = resolve_run;
	rj->mb = up->mb;
	rj->cfg = c;
	rj->gen = ++up->resolve_gen;
	snprintf(rj->host, sizeof(rj->host), "%s", host);
	snprintf(rj->port, sizeof(rj->port), "%u", port);
	snprintf(up->server_name, sizeof(up->server_name), "%s", sni);
	snprintf(up->st.node, sizeof(up->st.node), "%s:%u", sni, port);
	up->state = LINK_RESOLVING;
	up->deadline = now + c->upstream.connect_timeout_ms;
	helper_pool_submit(up->helpers, &rj->job);
}

/* connect() to the current address; on immediate failure, the next ones. */
static void try_connect(struct upstream *up, uint64_t now)
{
	struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP };
	char addr[INET6_ADDRSTRLEN] = "?";
	int one = 1, err = 0;

	for (; up->ai_cur; up->ai_cur = up->ai_cur->ai_next) {
		struct addrinfo *a = up->ai_cur;
		int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
				a->ai_protocol);

		if (fd < 0) {
			err = errno;
			continue;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (connect(fd, a->ai_addr, a->ai_addrlen) < 0 && errno != EINPROGRESS) {
			err = errno;
			close(fd);
			continue;
		}
		ev.data.ptr = up;
		if (epoll_ctl(up->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			err = errno;
			close(fd);
			continue;
		}
		up->fd = fd;
		up->state = LINK_CONNECTING;
		return;
	}
	if (up->ai && up->ai->ai_family == AF_INET)
		inet_ntop(AF_INET, &((struct sockaddr_in *)up->ai->ai_addr)->sin_addr, addr,
			  sizeof(addr));
	link_fail(up, now, "connect %s (%s)%s: %s", up->st.node, addr,
		  up->cfg->upstream.tls ? " (TLS)" : "", strerror(err ? err : ECONNREFUSED));
}

static void proto_ready(void *ud);
static void proto_confirm(void *ud, uint64_t tag, bool multiple, bool ack);
static void proto_flow(void *ud, bool blocked, const char *reason);
static void proto_returned(void *ud, const struct upstream_proto_return *r);

static void proto_inbox_reply(void *ud, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
			      uint16_t code, const char *text, uint32_t count, uint32_t consumers)
{
	struct upstream *up = ud;

	if (up->ops->inbox_reply)
		up->ops->inbox_reply(up->ud, cookie, kind, ok, code, text, count, consumers);
}

static void proto_inbox_deliver(void *ud, const struct upstream_proto_delivery *d)
{
	struct upstream *up = ud;

	if (up->ops->inbox_deliver)
		up->ops->inbox_deliver(up->ud, d);
	else
		upstream_proto_inbox_settle(&up->proto, d->gen, d->delivery_tag, UPSTREAM_NACK, true);
}

static void proto_inbox_got(void *ud, uint64_t cookie, const struct upstream_proto_delivery *d,
			    uint32_t count)
{
	struct upstream *up = ud;

	if (up->ops->inbox_got)
		up->ops->inbox_got(up->ud, cookie, d, count);
	else
		upstream_proto_inbox_settle(&up->proto, d->gen, d->delivery_tag, UPSTREAM_NACK, true);
}

static void proto_inbox_cancelled(void *ud, amqp_bytes_t tag)
{
	struct upstream *up = ud;

	if (up->ops->inbox_cancelled)
		up->ops->inbox_cancelled(up->ud, tag);
}

static void proto_inbox_closed(void *ud, uint16_t code, const char *text)
{
	struct upstream *up = ud;

	if (code)
		log_warn("thread=%u upstream %s: the broker closed the inbox channel: %u \"%s\"; "
			 "its consumers are subscribed again", up->thread_id, up->st.node, code,
			 text ? text : "");
	if (up->ops->inbox_closed)
		up->ops->inbox_closed(up->ud, code, text);
}

static const struct upstream_proto_ops proto_ops = {
	.ready = proto_ready,
	.confirm = proto_confirm,
	.flow = proto_flow,
	.returned = proto_returned,
	.inbox_reply = proto_inbox_reply,
		.inbox_deliver = proto_inbox_deliver,
	.inbox_got = proto_inbox_got,

	.inbox_cancelled = proto_inbox_cancelled,
	.inbox_closed = proto_inbox_closed,
};

static void start_amqp(struct upstream *up, uint64_t now)
{
	if (upstream_proto_init(&up->proto, &up->pcfg, &proto_ops, up, now) < 0) {
		link_fail(up, now, "out of memory");
		return;
	}
	up->proto.ib.gen = up->inbox_gen;
	up->proto_live = true;
	up->state = LINK_AMQP;
}

static bool is_ip_literal(const char *s)
{
	unsigned char b[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, s, b) == 1 || inet_pton(AF_INET6, s, b) == 1;
}

static void start_tls(struct upstream *up, uint64_t now)
{
	up->ssl = SSL_new(up->ctx);
	if (!up->ssl || SSL_set_fd(up->ssl, up->fd) != 1) {
		link_fail(up, now, "SSL_new: out of memory");
		return;
	}
	if (!is_ip_literal(up->server_name))
		SSL_set_tlsext_host_name(up->ssl, up->server_name);
	if (up->cfg->upstream.verify_hostname) {
		SSL_set_hostflags(up->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
		if (SSL_set1_host(up->ssl, up->server_name) != 1) {
			link_fail(up, now, "cannot verify against the name \"%s\"", up->server_name);
			return;
		}
	}
	SSL_set_connect_state(up->ssl);
	up->state = LINK_TLS;
}

/* Resolve result from the helper: connect to the first address. */
void upstream_handle_mail(struct upstream *up, struct mail *m, uint64_t now)
{
	struct resolve_job *rj = (struct resolve_job *)((char *)m - offsetof(struct resolve_job, mail));

	if (up->state != LINK_RESOLVING || rj->gen != up->resolve_gen) {
		upstream_mail_discard(m); /* an attempt given up on (timed out) */
		return;
	}
	if (rj->r < 0) {
		char err[300];

		snprintf(err, sizeof(err), "%s", rj->err);
		upstream_mail_discard(m);
		link_fail(up, now, "%s", err);
		return;
	}
	up->ai = up->ai_cur = rj->ai;
	up->ctx = rj->ctx;
	rj->ai = NULL;
	rj->ctx = NULL;
	upstream_mail_discard(m);
	try_connect(up, now);
}

/* ---- handshakes ---------------------------------------------------------------- */

static void connect_done(struct upstream *up, uint64_t now)
{
	int err = 0;
	socklen_t len = sizeof(err);

	if (getsockopt(up->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err == EINPROGRESS || err == EALREADY)
		return;
	if (err) {
		/* This address refused: the next one, if any. */
		epoll_ctl(up->epfd, EPOLL_CTL_DEL, up->fd, NULL);
		close(up->fd);
		up->fd = -1;
		if (up->ai_cur->ai_next) {
			up->ai_cur = up->ai_cur->ai_next;
			try_connect(up, now);
			return;
		}
		link_fail(up, now, "connect %s%s: %s", up->st.node,
			  up->cfg->upstream.tls ? " (TLS)" : "", strerror(err));
		return;
	}
	if (up->cfg->upstream.tls)
		start_tls(up, now);
	else
		start_amqp(up, now);
}

static void tls_handshake(struct upstream *up, uint64_t now)
{
	int r, e;
	char buf[200];
	long v;

	ERR_clear_error();
	r = SSL_do_handshake(up->ssl);
	if (r == 1) {
		start_amqp(up, now);
		return;
	}
	e = SSL_get_error(up->ssl, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
		return;
	v = SSL_get_verify_result(up->ssl);
	if (v != X509_V_OK)
		link_fail(up, now, "TLS handshake with %s: certificate verify failed: %s",
			  up->st.node, X509_verify_cert_error_string(v));
	else
		link_fail(up, now, "TLS handshake with %s: %s", up->st.node,
			  upstream_tls_error(buf, sizeof(buf), e));
}

/* ---- confirms -------------------------------------------------------------------- */

static void proto_ready(void *ud)
{
	struct upstream *up = ud;
	uint64_t now = clock_mono_ms();

	up->state = LINK_UP;
	up->up_since = now;
	up->low_tag = 1;
	up->last_progress_ms = now;
	up->st.reconnects++;
	up->st.last_error[0] = '\0';
	log_info("thread=%u upstream %s: link up as \"%s\" (%s, heartbeat %u s, frame_max %u)",
		 up->thread_id, up->st.node, up->name, up->ssl ? SSL_get_version(up->ssl) : "plain",
		 up->proto.heartbeat, up->proto.frame_max);
	up->ops->state_changed(up->ud, true);
	/* Nothing waits to prove the link: the guests may publish again (a
	 * refusal of what they publish fails it again, a step further in the
	 * backoff). Otherwise the first confirm tells. */
	if (up->unable && !up->ops->peek(up->ud))
		set_publishing(up, true, 0);
}

/* Settle one message, or all up to TAG when MULTIPLE; what is settled at
 * the front is handed back in tag order. Constant work per message. */
static void proto_confirm(void *ud, uint64_t tag, bool multiple, bool ack)
{
	struct upstream *up = ud;
	uint64_t end = up->low_tag + up->n_unconfirmed; /* one past the newest */
	int8_t outcome = ack ? 1 : -1;

	if (tag >= end || tag < up->low_tag)
		return; /* settled already (a repeated confirm) */
	if (multiple) {
		for (uint64_t t = up->low_tag; t <= tag; t++) {
			struct upstream_msg *m = up->ring[t & up->ring_mask];
			if (m->outcome == 0)
				m->outcome = outcome;
		}
	} else if (up->ring[tag & up->ring_mask]->outcome == 0) {
		up->ring[tag & up->ring_mask]->outcome = outcome;
	}
	while (up->n_unconfirmed > 0) {
		struct upstream_msg *m = up->ring[up->low_tag & up->ring_mask];

		if (m->outcome == 0)
			break;
		up->ring[up->low_tag & up->ring_mask] = NULL;
		up->low_tag++;
		up->n_unconfirmed--;
		if (m->outcome > 0) {
			up->st.acked++;
			up->session_ok = true;
			if (up->unable)
				set_publishing(up, true, 0);
		} else {
			up->st.nacked++;
		}
		up->ops->confirmed(up->ud, m, m->outcome > 0);
	}
	up->last_progress_ms = clock_mono_ms();
}

static void proto_flow(void *ud, bool blocked, const char *reason)
{
	struct upstream *up = ud;

	if (blocked == up->broker_blocked)
		return;
	up->broker_blocked = blocked;
	if (blocked)
		log_warn("thread=%u upstream %s: broker blocked the link: \"%s\"", up->thread_id,
			 up->st.node, reason);
	else
		log_info("thread=%u upstream %s: broker unblocked the link", up->thread_id,
			 up->st.node);
	up->last_progress_ms = clock_mono_ms();
}

/* A return names no delivery tag: it is the oldest unsettled mandatory
 * message with the same routing key and body (identical ones are
 * interchangeable). Returns are rare; the scan is bounded by the window. */
static void proto_returned(void *ud, const struct upstream_proto_return *r)
{
	struct upstream *up = ud;

	for (uint64_t t = up->low_tag; t < up->low_tag + up->n_unconfirmed; t++) {
		struct upstream_msg *m = up->ring[t & up->ring_mask];

		if (!m->mandatory || m->returned || m->rk_len != r->routing_key.len ||
		    m->body_len != r->body.len || memcmp(m->data, r->routing_key.bytes, m->rk_len) ||
		    (m->body_len && memcmp(m->body, r->body.bytes, m->body_len)))
			continue;
		m->returned = true;
		up->st.returned++;
		up->ops->returned(up->ud, m, r->code, r->text);
		return;
	}
	log_warn("thread=%u upstream %s: the broker returned a message this link has no record "
		 "of (%u \"%s\"); ignored", up->thread_id, up->st.node, r->code, r->text);
}

/* ---- reading and writing ------------------------------------------------------------ */

/* Read until the socket has nothing more (or the budget is spent) and feed
 * the protocol engine. Returns -1 when the link failed. */
static int read_input(struct upstream *up, uint64_t now)
{
	char err[200];

	up->read_more = false;
	for (int i = 0; i < READS_PER_WAKE; i++) {
		ssize_t n;

		up->st.reads++;
		if (up->ssl) {
			int r, e;

			ERR_clear_error();
			r = SSL_read(up->ssl, up->rbuf, sizeof(up->rbuf));
			if (r <= 0) {
				e = SSL_get_error(up->ssl, r);
				if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
					return 0;
				up->io_failed = true; /* OpenSSL: no further I/O on it */
				link_fail(up, now, "TLS read: %s", upstream_tls_error(err, sizeof(err), e));
				return -1;
			}
			n = r;
		} else {
			n = recv(up->fd, up->rbuf, sizeof(up->rbuf), MSG_DONTWAIT);
			if (n < 0) {
				if (errno == EAGAIN || errno == EWOULDBLOCK)
					return 0;
				if (errno == EINTR)
					continue;
				up->io_failed = true;
				link_fail(up, now, "read: %s", strerror(errno));
				return -1;
			}
			if (n == 0) {
				up->io_failed = true;
				link_fail(up, now, "the broker closed the connection");
				return -1;
			}
		}
		upstream_proto_feed(&up->proto, up->rbuf, (size_t)n, now);
		if (up->proto.st == UPSTREAM_PROTO_CLOSED)
			return 0; /* the caller ends the link once the output is written */
	}
	up->read_more = true;
	return 0;
}

/* Whether the link may take more messages now. */
static bool can_publish(const struct upstream *up)
{
	return up->state == LINK_UP && !up->broker_blocked && !up->relink &&
	       up->n_unconfirmed < up->cfg->upstream.max_in_flight;
}

/* Append what the window and the output bound allow to the output buffer. */
static void publish_some(struct upstream *up, uint64_t now)
{
	/* A bounded window keeps the queue in the proxy, where VMs take
	 * turns, rather than in the socket and the broker, where a busy VM's
	 * messages would sit in front of everyone else's. */
	while (can_publish(up)) {
		struct upstream_msg *m = up->ops->peek(up->ud);
		int64_t tag;

		if (!m)
			break;
		tag = upstream_proto_publish(&up->proto, m->data, m->rk_len, m->mandatory,
					     m->data + m->rk_len, m->props_len, m->body, m->body_len);
		if (tag == -EAGAIN)
			break; /* output full: the next write makes room */
		up->ops->pop(up->ud, m);
		m->next = NULL;
		m->outcome = 0;
		m->returned = false;
		if (tag < 0) {
			/* Its properties do not fit in one frame of this link:
			 * it can never be published, so the guest gets a nack. */
			log_warn("thread=%u upstream %s: a message's properties (%u bytes) do not "
				 "fit in a frame of %u bytes: nacked", up->thread_id, up->st.node,
				 m->props_len, up->proto.frame_max);
			up->st.nacked++;
			up->ops->confirmed(up->ud, m, false);
			continue;
		}
		m->tag = (uint64_t)tag;
		up->ring[m->tag & up->ring_mask] = m;
		if (up->n_unconfirmed++ == 0)
			up->last_progress_ms = now;
		up->st.published++;
	}
}

/* The connection's part of a loop iteration once connected: input read,
 * output written, the protocol's verdict applied. */
static void service(struct upstream *up, uint64_t now, bool readable)
{
	char err[240];

	if (readable && read_input(up, now) < 0)
		return;
	if (up->state == LINK_UP)
		publish_some(up, now);
	if (flush_output(up, now, err, sizeof(err)) < 0) {
		link_fail(up, now, "%s", err);
		return;
	}
	if (up->proto.st != UPSTREAM_PROTO_CLOSED)
		return;
	if (up->proto.error[0]) {
		char e[240];

		snprintf(e, sizeof(e), "%s", up->proto.error);
		link_fail(up, now, "%s", e);
		return;
	}
	/* close-ok for our close: a planned reconnect, to the home node. */
	link_close(up, now);
	up->state = LINK_DOWN;
	up->broker_blocked = false;
	up->reconnect_at = now;
	up->node = up->cfg->upstream.n_hosts ? up->spread % up->cfg->upstream.n_hosts : 0;
	up->node_tries = 0;
	up->ops->state_changed(up->ud, false);
}

/* A requested relink happens once every published message is settled:
 * nothing is republished, nothing is duplicated. connection.close is sent
 * and close-ok awaited (bounded), then the link connects again at once,
 * reading the TLS files anew, on its home node (where it started): links
 * that failed over come back once their node has returned. */
static void relink_if_idle(struct upstream *up, uint64_t now)
{
	if (!up->relink || up->state != LINK_UP || up->n_unconfirmed > 0)
		return;
	up->relink = false;
	log_info("thread=%u upstream %s: reconnecting to re-read the TLS files", up->thread_id,
		 up->st.node);
	upstream_proto_close(&up->proto, 200, "vmproxyd: reconnecting to re-read TLS files");
	up->state = LINK_CLOSING;
	up->deadline = now + CLOSE_TIMEOUT_MS;
}

static void step(struct upstream *up, uint64_t now)
{
	/* Each stage may complete at once and hand over to the next. */
	if (up->state == LINK_CONNECTING)
		connect_done(up, now);
	if (up->state == LINK_TLS)
		tls_handshake(up, now);
	if (up->state == LINK_AMQP || up->state == LINK_UP || up->state == LINK_CLOSING) {
		service(up, now, true);
		relink_if_idle(up, now);
		if (up->state == LINK_CLOSING)
			service(up, now, false); /* the close goes out now */
	}
}

void upstream_handle_events(struct upstream *up, uint32_t events, uint64_t now)
{
	(void)events; /* errors show as a failed read, write or SO_ERROR */
	step(up, now);
}

void upstream_kick(struct upstream *up, uint64_t now)
{
	if (up->state != LINK_UP)
		return;
	service(up, now, up->read_more);
	relink_if_idle(up, now);
	if (up->state == LINK_CLOSING)
		service(up, now, false);
}

void upstream_relink(struct upstream *up, uint64_t now)
{
	if (up->state != LINK_UP) {
		/* The next connect reads the files anyway; one in progress
		 * may have read the old ones. */
		if (up->state != LINK_DOWN)
			up->relink = true;
		return;
	}
	up->relink = true;
	relink_if_idle(up, now);
	if (up->state == LINK_CLOSING)
		service(up, now, false);
}

uint64_t upstream_tick(struct upstream *up, uint64_t now)
{
	uint64_t next;

	switch (up->state) {
	case LINK_DOWN:
		if (now < up->reconnect_at)
			return up->reconnect_at;
		start_resolve(up, now);
		return up->deadline;
	case LINK_RESOLVING:
	case LINK_CONNECTING:
	case LINK_TLS:
	case LINK_AMQP:
		if (now >= up->deadline) {
			link_fail(up, now, "%s: no progress for %u ms (upstream.connect_timeout_ms)",
				  state_names[up->state], up->cfg->upstream.connect_timeout_ms);
			return up->reconnect_at;
		}
		if (up->state == LINK_AMQP) {
			next = upstream_proto_tick(&up->proto, now);
			if (next == 0) {
				link_fail(up, now, "%s", up->proto.error);
				return up->reconnect_at;
			}
			if (next < up->deadline)
				return next;
		}
		return up->deadline;
	case LINK_CLOSING:
		if (now >= up->deadline) {
			log_info("thread=%u upstream %s: no close-ok in %u ms; closing anyway",
				 up->thread_id, up->st.node, CLOSE_TIMEOUT_MS);
			up->proto.st = UPSTREAM_PROTO_CLOSED;
			up->proto.error[0] = '\0';
			service(up, now, false);
			return now;
		}
		return up->deadline;
	case LINK_UP:
		break;
	}
	/* A broker that blocked publishers (resource alarm) is not stuck. */
	if (up->n_unconfirmed > 0 && !up->broker_blocked &&
	    now - up->last_progress_ms > up->cfg->upstream.stuck_timeout_ms) {
		link_fail(up, now, "no confirm from the broker for %u ms",
			  up->cfg->upstream.stuck_timeout_ms);
		return up->reconnect_at;
	}
	next = upstream_proto_tick(&up->proto, now);
	if (next == 0) {
		link_fail(up, now, "%s", up->proto.error);
		return up->reconnect_at;
	}
	service(up, now, up->read_more); /* a heartbeat it queued goes out now */
	if (up->state != LINK_UP)
		return up->state == LINK_DOWN ? up->reconnect_at : now;
	if (up->read_more)
		return now;
	if (up->relink && up->n_unconfirmed == 0)
		return now;
	if (up->n_unconfirmed > 0 && !up->broker_blocked &&
	    up->last_progress_ms + up->cfg->upstream.stuck_timeout_ms + 1 < next)
		next = up->last_progress_ms + up->cfg->upstream.stuck_timeout_ms + 1;
	return next;
}

bool upstream_is_up(const struct upstream *up)
{
	return up->state == LINK_UP;
}

struct upstream_proto *upstream_inbox_proto(struct upstream *up)
{
	return up->state == LINK_UP && up->proto_live ? &up->proto : NULL;
}

void upstream_get_stats(const struct upstream *up, struct upstream_stats *st)
{
	*st = up->st;
	if (up->proto_live) {
		st->deliveries_refused += up->proto.ib.refused;
		st->delivered += up->proto.ib.delivered;
	}
	st->unconfirmed = up->n_unconfirmed;
	st->up = up->state == LINK_UP;
	st->broker_blocked = up->broker_blocked;
}
