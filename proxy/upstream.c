/* upstream.c -- see upstream.h: the link's life (resolve, connect, TLS
 * and AMQP handshakes, failover and backoff, planned reconnects, timers).
 * Its data path is in upstream_io.c (upstream_impl.h).
 *
 * The link is one more event source of its poll thread: a non-blocking
 * socket and OpenSSL object in the thread's epoll (edge-triggered, read
 * and write interest registered once), driven through its states by
 * readiness and by deadlines that upstream_tick checks. Only what can block
 * by nature runs on a helper thread: name resolution and loading the TLS
 * files into an SSL_CTX; the result comes back as mail.
 */
#include "upstream_impl.h"

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
#include "upstream_tls.h"

static const char *const state_names[] = {
	[LINK_DOWN] = "down",
	[LINK_RESOLVING] = "resolving the broker's address",
	[LINK_CONNECTING] = "connecting",
	[LINK_TLS] = "in the TLS handshake",
	[LINK_AMQP] = "in the AMQP handshake",
	[LINK_UP] = "up",
	[LINK_CLOSING] = "closing",
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

/* Tear the connection down (no I/O but a last try to write what is queued,
 * such as a connection.close). */
void uplink_close(struct upstream *up, uint64_t now)
{
	char err[8];

	if (up->proto_live && up->fd >= 0 && !up->io_failed &&
	    (up->state == LINK_AMQP || up->state == LINK_UP || up->state == LINK_CLOSING))
		uplink_flush_output(up, now, err, sizeof(err));
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

void uplink_set_publishing(struct upstream *up, bool able, uint16_t code)
{
	up->unable = !able;
	if (up->ops->publishing)
		up->ops->publishing(up->ud, able, code);
}

void uplink_set_broker_blocked(struct upstream *up, bool blocked)
{
	if (blocked == up->broker_blocked)
		return;
	up->broker_blocked = blocked;
	if (up->ops->broker_flow)
		up->ops->broker_flow(up->ud, blocked);
}

/* The connection ended in failure: everything unsettled is republished on
 * the next one. A connection that never had a message confirmed (a refusal
 * right after login, say) counts as a failed attempt like a failed connect,
 * so a broker refusing every publish sees reconnects back off to 30 s. */
void uplink_fail(struct upstream *up, uint64_t now, const char *fmt, ...)
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
	uplink_close(up, now);
	uplink_requeue_all(up);
	up->state = LINK_DOWN;
	uplink_set_broker_blocked(up, false);
	up->reconnect_at = now + delay;
	if (was_up)
		up->ops->state_changed(up->ud, false);
	/* node_tries is 0 when this failure starts a backoff wait. */
	if (!ok && up->node_tries == 0 && !up->unable)
		uplink_set_publishing(up, false, code);
}

void upstream_free(struct upstream *up)
{
	if (!up)
		return;
	uplink_close(up, clock_mono_ms());
	uplink_requeue_all(up);
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
	uplink_fail(up, now, "connect %s (%s)%s: %s", up->st.node, addr,
		  up->cfg->upstream.tls ? " (TLS)" : "", strerror(err ? err : ECONNREFUSED));
}

static void start_amqp(struct upstream *up, uint64_t now)
{
	if (upstream_proto_init(&up->proto, &up->pcfg, &uplink_proto_ops, up, now) < 0) {
		uplink_fail(up, now, "out of memory");
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
		uplink_fail(up, now, "SSL_new: out of memory");
		return;
	}
	if (!is_ip_literal(up->server_name))
		SSL_set_tlsext_host_name(up->ssl, up->server_name);
	if (up->cfg->upstream.verify_hostname) {
		SSL_set_hostflags(up->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
		if (SSL_set1_host(up->ssl, up->server_name) != 1) {
			uplink_fail(up, now, "cannot verify against the name \"%s\"", up->server_name);
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
		uplink_fail(up, now, "%s", err);
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
		uplink_fail(up, now, "connect %s%s: %s", up->st.node,
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
		uplink_fail(up, now, "TLS handshake with %s: certificate verify failed: %s",
			  up->st.node, X509_verify_cert_error_string(v));
	else
		uplink_fail(up, now, "TLS handshake with %s: %s", up->st.node,
			  upstream_tls_error(buf, sizeof(buf), e));
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

void uplink_step(struct upstream *up, uint64_t now)
{
	/* Each stage may complete at once and hand over to the next. */
	if (up->state == LINK_CONNECTING)
		connect_done(up, now);
	if (up->state == LINK_TLS)
		tls_handshake(up, now);
	if (up->state == LINK_AMQP || up->state == LINK_UP || up->state == LINK_CLOSING) {
		uplink_service(up, now, true);
		relink_if_idle(up, now);
		if (up->state == LINK_CLOSING)
			uplink_service(up, now, false); /* the close goes out now */
	}
}

void upstream_handle_events(struct upstream *up, uint32_t events, uint64_t now)
{
	(void)events; /* errors show as a failed read, write or SO_ERROR */
	uplink_step(up, now);
}

void upstream_kick(struct upstream *up, uint64_t now)
{
	if (up->state != LINK_UP)
		return;
	uplink_service(up, now, up->read_more);
	relink_if_idle(up, now);
	if (up->state == LINK_CLOSING)
		uplink_service(up, now, false);
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
		uplink_service(up, now, false);
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
			uplink_fail(up, now, "%s: no progress for %u ms (upstream.connect_timeout_ms)",
				  state_names[up->state], up->cfg->upstream.connect_timeout_ms);
			return up->reconnect_at;
		}
		if (up->state == LINK_AMQP) {
			next = upstream_proto_tick(&up->proto, now);
			if (next == 0) {
				uplink_fail(up, now, "%s", up->proto.error);
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
			uplink_service(up, now, false);
			return now;
		}
		return up->deadline;
	case LINK_UP:
		break;
	}
	/* A broker that blocked publishers (resource alarm) is not stuck. */
	if (up->n_unconfirmed > 0 && !up->broker_blocked &&
	    now - up->last_progress_ms > up->cfg->upstream.stuck_timeout_ms) {
		uplink_fail(up, now, "no confirm from the broker for %u ms",
			  up->cfg->upstream.stuck_timeout_ms);
		return up->reconnect_at;
	}
	next = upstream_proto_tick(&up->proto, now);
	if (next == 0) {
		uplink_fail(up, now, "%s", up->proto.error);
		return up->reconnect_at;
	}
	uplink_service(up, now, up->read_more); /* a heartbeat it queued goes out now */
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
