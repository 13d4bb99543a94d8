/* upstream.c -- see upstream.h.
 *
 * rabbitmq-c writes block without a timeout, so a publish is attempted only
 * when the socket's send queue has room for the whole message plus slack
 * (SO_MEMINFO: queued bytes against the send buffer; a SIOCOUTQ-based check
 * ignores per-segment overhead and lets writes block). The send buffer is
 * fixed large enough for the biggest allowed message, so the check can
 * always pass once the broker reads. Frames rabbitmq-c already buffered do
 * not wake epoll, hence the drain loop after every wake-up and publish. A
 * connection that returned an error is destroyed, never reused. */
#include "upstream.h"

#include <amqp.h>
#include <errno.h>
#include <stdarg.h>
#include <linux/sock_diag.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backoff.h"
#include "broker.h"
#include "clock.h"
#include "log.h"

#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif

#define UPSTREAM_CHANNEL 1
#define PUBLISH_SLACK	 8192
#define DRAIN_EVERY	 64 /* publishes between drains inside one kick */

enum link_state {
	LINK_DOWN,
	LINK_CONNECTING,
	LINK_UP,
};

struct connect_job {
	struct helper_job job;
	struct mail mail;
	struct mailbox *mb;
	struct broker_opts opts;
	char name[160];
	int sndbuf;
	amqp_connection_state_t conn;
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
	amqp_connection_state_t conn;
	_Atomic int fd;
	/* Held by the watchdog from reading fd to its shutdown(), and by the
	 * owner while it retires fd before closing it: the watchdog never
	 * shuts down a descriptor number that was closed and reused. */
	pthread_mutex_t fd_lock;
	_Atomic uint64_t busy_since_ms; /* a rabbitmq-c call is running since */
	uint64_t next_tag;
	struct upstream_msg *unc_head, *unc_tail;
	uint32_t n_unconfirmed;
	struct backoff backoff;
	uint64_t reconnect_at;
	size_t node;	    /* index into cfg->upstream.hosts */
	size_t node_tries;  /* failed connects since the last full round */
	size_t round_first; /* the node whose failure began this round */
	uint32_t spread;    /* fixed per host and link: where it starts and moves */
	uint64_t last_drain_ms;
	uint64_t last_progress_ms; /* last confirm, or when the queue became non-empty */
	bool broker_blocked;
	bool relink; /* reconnect once nothing is unconfirmed (SIGHUP: new TLS files) */
	amqp_pool_t scratch;
	amqp_bytes_t exchange;
	char name[160];
	struct upstream_stats st;
};

uint32_t upstream_link_spread(const char *hostname, unsigned thread_id)
{
	uint32_t h = 2166136261u;

	for (const char *p = hostname ? hostname : ""; *p; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	return (h >> 8) + thread_id;
}

static int sndbuf_for(const struct proxy_config *cfg)
{
	uint64_t want = 2 * cfg->guest.max_message_bytes + (256u << 10);

	if (want < (4u << 20))
		want = 4u << 20;
	if (want > (512u << 20))
		want = 512u << 20;
	return (int)want;
}

static void connect_run(struct helper_job *job)
{
	struct connect_job *cj = (struct connect_job *)job;

	cj->r = broker_connect(&cj->opts, &cj->conn, cj->err, sizeof(cj->err));
	if (cj->r == 0) {
		cj->r = broker_channel_open(cj->conn, UPSTREAM_CHANNEL, true, cj->err,
					    sizeof(cj->err));
		if (cj->r == 0) {
			int fd = amqp_get_sockfd(cj->conn);
			/* Fixed, so the publish guard can always be met. */
			if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &cj->sndbuf,
				       sizeof(cj->sndbuf)) < 0)
				log_warn("%s: SO_SNDBUF: %s", cj->name, strerror(errno));
		} else {
			amqp_destroy_connection(cj->conn);
			cj->conn = NULL;
		}
	}
	cj->mail.type = MAIL_UPSTREAM_CONNECTED;
	mailbox_post(cj->mb, &cj->mail);
}

int upstream_new(const struct proxy_config *cfg, unsigned thread_id, int epfd,
		 struct helper_pool *helpers, struct mailbox *mb, const struct upstream_ops *ops,
		 void *userdata, struct upstream **out)
{
	struct upstream *up = calloc(1, sizeof(*up));

	if (!up)
		return -ENOMEM;
	up->cfg = cfg;
	up->thread_id = thread_id;
	up->epfd = epfd;
	up->helpers = helpers;
	up->mb = mb;
	up->ops = ops;
	up->ud = userdata;
	up->state = LINK_DOWN;
	atomic_store(&up->fd, -1);
	pthread_mutex_init(&up->fd_lock, NULL);
	backoff_init(&up->backoff, 200, 30000, 0);
	/* Spread the links over the cluster's nodes: a host's threads on
	 * consecutive nodes, from a node that depends on the host name, so a
	 * fleet's links are balanced even when the thread count is not a
	 * multiple of the node count. */
	up->spread = upstream_link_spread(cfg->hostname, thread_id);
	up->node = cfg->upstream.n_hosts ? up->spread % cfg->upstream.n_hosts : 0;
	init_amqp_pool(&up->scratch, 4096);
	up->exchange = amqp_cstring_bytes(cfg->upstream.exchange);
	snprintf(up->name, sizeof(up->name), "vmproxyd/%s/thread-%u", cfg->hostname, thread_id);
	*out = up;
	return 0;
}

static void requeue_all(struct upstream *up)
{
	struct upstream_msg *rev = NULL, *m, *n;

	/* Reverse, then hand back newest first: the oldest ends up in front. */
	for (m = up->unc_head; m; m = n) {
		n = m->next;
		m->next = rev;
		rev = m;
	}
	up->unc_head = up->unc_tail = NULL;
	for (m = rev; m; m = n) {
		n = m->next;
		m->next = NULL;
		m->outcome = 0;
		up->st.republished++;
		up->ops->requeue(up->ud, m);
	}
	up->n_unconfirmed = 0;
}

static void link_close(struct upstream *up)
{
	int fd = atomic_load(&up->fd);

	if (fd >= 0)
		epoll_ctl(up->epfd, EPOLL_CTL_DEL, fd, NULL);
	pthread_mutex_lock(&up->fd_lock);
	atomic_store(&up->fd, -1);
	pthread_mutex_unlock(&up->fd_lock);
	if (up->conn)
		amqp_destroy_connection(up->conn);
	up->conn = NULL;
}

static void link_fail(struct upstream *up, uint64_t now_ms, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

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

size_t upstream_failover_node(uint32_t spread, size_t first, size_t tries, size_t n)
{
	if (n <= 1 || tries % n == 0)
		return n ? first % n : 0;
	return (first + (spread / n + tries % n - 1) % (n - 1) + 1) % n;
}

static void link_fail(struct upstream *up, uint64_t now_ms, const char *fmt, ...)
{
	uint32_t delay = next_node_delay(up);
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(up->st.last_error, sizeof(up->st.last_error), fmt, ap);
	va_end(ap);
	log_warn("thread=%u upstream %s: %s; %u unconfirmed messages will be republished, "
		 "reconnecting in %u ms",
		 up->thread_id, up->st.node, up->st.last_error, up->n_unconfirmed, delay);
	link_close(up);
	requeue_all(up);
	up->state = LINK_DOWN;
	up->broker_blocked = false;
	up->reconnect_at = now_ms + delay;
	up->ops->state_changed(up->ud, false);
}

void upstream_free(struct upstream *up)
{
	if (!up)
		return;
	link_close(up);
	requeue_all(up);
	empty_amqp_pool(&up->scratch);
	pthread_mutex_destroy(&up->fd_lock);
	free(up);
}

static void start_connect(struct upstream *up)
{
	const struct proxy_config *c = up->cfg;
	struct connect_job *cj = calloc(1, sizeof(*cj));
	const struct upstream_host *h = c->upstream.n_hosts ? &c->upstream.hosts[up->node] : NULL;
	/* rabbitmq-c verifies the certificate against the name it connects
	 * to: a node's server_name is therefore also what is connected to. */
	const char *host = h ? (h->server_name ? h->server_name : h->host) : c->upstream.host;
	uint16_t port = h && h->port ? h->port : c->upstream.port;

	if (!cj) {
		up->reconnect_at = clock_mono_ms() + 1000;
		return;
	}
	cj->job.run = connect_run;
	cj->mb = up->mb;
	broker_opts_init(&cj->opts);
	cj->opts.host = host;
	cj->opts.port = port;
	cj->opts.vhost = c->upstream.vhost;
	cj->opts.tls = c->upstream.tls;
	cj->opts.ca = c->upstream.ca;
	cj->opts.cert = c->upstream.cert;
	cj->opts.key = c->upstream.key;
	cj->opts.verify_hostname = c->upstream.verify_hostname;
	cj->opts.auth = c->upstream.mechanism;
	cj->opts.user = c->upstream.user;
	cj->opts.password = c->upstream.password;
	cj->opts.heartbeat = c->upstream.heartbeat;
	cj->opts.timeout_ms = (int)c->upstream.connect_timeout_ms;
	cj->opts.product = "vmproxyd";
	snprintf(cj->name, sizeof(cj->name), "%s", up->name);
	cj->opts.connection_name = cj->name;
	cj->sndbuf = sndbuf_for(c);
	snprintf(up->st.node, sizeof(up->st.node), "%s:%u", host, port);
	up->state = LINK_CONNECTING;
	helper_pool_submit(up->helpers, &cj->job);
}

void upstream_mail_discard(struct mail *m)
{
	struct connect_job *cj = (struct connect_job *)((char *)m - offsetof(struct connect_job, mail));

	if (cj->conn)
		amqp_destroy_connection(cj->conn);
	free(cj);
}

static void drain(struct upstream *up, uint64_t now_ms);

void upstream_handle_mail(struct upstream *up, struct mail *m, uint64_t now_ms)
{
	struct connect_job *cj = (struct connect_job *)((char *)m - offsetof(struct connect_job, mail));
	struct epoll_event ev;
	int fd;

	if (cj->r < 0) {
		uint32_t delay = next_node_delay(up);

		snprintf(up->st.last_error, sizeof(up->st.last_error), "%.150s", cj->err);
		log_warn("thread=%u upstream %s: %s; retrying in %u ms", up->thread_id,
			 up->st.node, cj->err, delay);
		up->state = LINK_DOWN;
		up->reconnect_at = now_ms + delay;
		upstream_mail_discard(m);
		return;
	}
	up->conn = cj->conn;
	cj->conn = NULL;
	upstream_mail_discard(m);
	fd = amqp_get_sockfd(up->conn);
	ev.events = EPOLLIN | EPOLLOUT | EPOLLET;
	ev.data.ptr = up;
	if (epoll_ctl(up->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		link_fail(up, now_ms, "epoll_ctl: %s", strerror(errno));
		return;
	}
	atomic_store(&up->fd, fd);
	up->state = LINK_UP;
	up->next_tag = 0;
	up->last_drain_ms = now_ms;
	up->last_progress_ms = now_ms;
	up->st.reconnects++;
	up->st.last_error[0] = '\0';
	up->node_tries = 0;
	backoff_reset(&up->backoff);
	log_info("thread=%u upstream %s: link up as \"%s\"", up->thread_id, up->st.node,
		 up->name);
	up->ops->state_changed(up->ud, true);
	upstream_kick(up, now_ms);
}

static void settle_one(struct upstream *up, struct upstream_msg *m, bool ack)
{
	if (ack)
		up->st.acked++;
	else
		up->st.nacked++;
	up->ops->confirmed(up->ud, m, ack);
}

/* Apply a basic.ack/nack from the broker. Confirms may arrive out of order
 * (single tags); whatever is settled at the front is handed back in order. */
static void handle_confirm(struct upstream *up, uint64_t tag, bool multiple, bool ack)
{
	struct upstream_msg *m;

	if (multiple) {
		for (m = up->unc_head; m && m->tag <= tag; m = m->next)
			if (m->outcome == 0)
				m->outcome = ack ? 1 : -1;
	} else {
		for (m = up->unc_head; m && m->tag < tag; m = m->next)
			;
		if (m && m->tag == tag)
			m->outcome = ack ? 1 : -1;
	}
	while ((m = up->unc_head) && m->outcome != 0) {
		up->unc_head = m->next;
		if (!up->unc_head)
			up->unc_tail = NULL;
		up->n_unconfirmed--;
		m->next = NULL;
		settle_one(up, m, m->outcome > 0);
	}
	up->last_progress_ms = clock_mono_ms();
}

static void busy_begin(struct upstream *up, uint64_t now_ms)
{
	atomic_store_explicit(&up->busy_since_ms, now_ms ? now_ms : 1, memory_order_relaxed);
}

static void busy_end(struct upstream *up)
{
	atomic_store_explicit(&up->busy_since_ms, 0, memory_order_relaxed);
}

static void drain(struct upstream *up, uint64_t now_ms)
{
	char desc[200];

	while (up->state == LINK_UP) {
		struct timeval tv = { 0, 0 };
		amqp_frame_t f;
		int r;

		busy_begin(up, now_ms);
		r = amqp_simple_wait_frame_noblock(up->conn, &f, &tv);
		busy_end(up);
		if (r == AMQP_STATUS_TIMEOUT)
			break;
		if (r != AMQP_STATUS_OK) {
			link_fail(up, now_ms, "%s", amqp_error_string2(r));
			return;
		}
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue;
		switch (f.payload.method.id) {
		case AMQP_BASIC_ACK_METHOD: {
			const amqp_basic_ack_t *a = f.payload.method.decoded;
			handle_confirm(up, a->delivery_tag, a->multiple, true);
			break;
		}
		case AMQP_BASIC_NACK_METHOD: {
			const amqp_basic_nack_t *a = f.payload.method.decoded;
			handle_confirm(up, a->delivery_tag, a->multiple, false);
			break;
		}
		case AMQP_CONNECTION_BLOCKED_METHOD: {
			const amqp_connection_blocked_t *b = f.payload.method.decoded;
			up->broker_blocked = true;
			log_warn("thread=%u upstream %s: broker blocked the link: %.*s",
				 up->thread_id, up->st.node, (int)b->reason.len,
				 (const char *)b->reason.bytes);
			break;
		}
		case AMQP_CONNECTION_UNBLOCKED_METHOD:
			up->broker_blocked = false;
			log_info("thread=%u upstream %s: broker unblocked the link", up->thread_id,
				 up->st.node);
			break;
		case AMQP_CHANNEL_CLOSE_METHOD: {
			const amqp_channel_close_t *c = f.payload.method.decoded;
			snprintf(desc, sizeof(desc), "broker closed the channel: %u %.*s",
				 c->reply_code, (int)c->reply_text.len,
				 (const char *)c->reply_text.bytes);
			link_fail(up, now_ms, "%s", desc);
			return;
		}
		case AMQP_CONNECTION_CLOSE_METHOD: {
			const amqp_connection_close_t *c = f.payload.method.decoded;
			amqp_connection_close_ok_t ok = { 0 };
			snprintf(desc, sizeof(desc), "broker closed the connection: %u %.*s",
				 c->reply_code, (int)c->reply_text.len,
				 (const char *)c->reply_text.bytes);
			amqp_send_method(up->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
			link_fail(up, now_ms, "%s", desc);
			return;
		}
		default:
			break;
		}
	}
	if (up->state == LINK_UP)
		amqp_maybe_release_buffers(up->conn);
	up->last_drain_ms = now_ms;
}

/* Room in the socket's send queue for BYTES more without blocking. */
static bool can_send(struct upstream *up, size_t bytes)
{
	uint32_t mem[SK_MEMINFO_VARS];
	socklen_t len = sizeof(mem);
	int fd = atomic_load(&up->fd);

	if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mem, &len) < 0)
		return false;
	return (uint64_t)mem[SK_MEMINFO_WMEM_QUEUED] + bytes + bytes / 64 + PUBLISH_SLACK <=
	       mem[SK_MEMINFO_SNDBUF];
}

static int publish_one(struct upstream *up, struct upstream_msg *m, uint64_t now_ms)
{
	amqp_bytes_t rk = { m->rk_len, m->data };
	amqp_bytes_t enc = { m->props_len, m->data + m->rk_len };
	amqp_bytes_t body = { m->body_len, m->body };
	amqp_basic_properties_t *props = NULL;
	int r;

	r = amqp_decode_properties(AMQP_BASIC_CLASS, &up->scratch, enc, (void **)&props);
	if (r < 0)
		return r;
	busy_begin(up, now_ms);
	r = amqp_basic_publish(up->conn, UPSTREAM_CHANNEL, up->exchange, rk, 0, 0, props, body);
	busy_end(up);
	recycle_amqp_pool(&up->scratch);
	return r;
}

/* Publish what the window and the socket allow. Returns true when the
 * window (not the socket or an empty queue) stopped it. */
static bool publish_some(struct upstream *up, uint64_t now_ms)
{
	unsigned n = 0;

	/* A bounded window keeps the queue in the proxy, where VMs take
	 * turns, rather than in the socket and the broker, where a busy VM's
	 * messages would sit in front of everyone else's. */
	while (up->state == LINK_UP && !up->broker_blocked && !up->relink) {
		struct upstream_msg *m;
		int r;

		if (up->n_unconfirmed >= up->cfg->upstream.max_in_flight)
			return true;
		m = up->ops->peek(up->ud);
		if (!m)
			break;
		if (!can_send(up, m->body_len + m->props_len + m->rk_len + 256))
			break; /* EPOLLOUT (edge) calls us again as the queue drains */
		up->ops->pop(up->ud, m);
		m->tag = ++up->next_tag;
		m->outcome = 0;
		m->next = NULL;
		if (up->unc_tail)
			up->unc_tail->next = m;
		else
			up->unc_head = m;
		up->unc_tail = m;
		if (up->n_unconfirmed++ == 0)
			up->last_progress_ms = now_ms;
		up->st.published++;
		r = publish_one(up, m, now_ms);
		if (r != AMQP_STATUS_OK) {
			/* It may or may not have reached the broker: republished. */
			link_fail(up, now_ms, "publish: %s", amqp_error_string2(r));
			return false;
		}
		if (++n % DRAIN_EVERY == 0)
			drain(up, now_ms);
	}
	return false;
}

/* A requested relink happens once every published message is settled:
 * nothing is republished, nothing is duplicated. The connection is closed
 * (connection.close sent, close-ok not awaited) and opened again at once,
 * reading the TLS files anew, on the link's home node (where it started):
 * links that failed over come back once their node has returned. */
static void relink_if_idle(struct upstream *up, uint64_t now_ms)
{
	amqp_connection_close_t cl = { .reply_code = 200 };

	if (!up->relink || up->state != LINK_UP || up->n_unconfirmed > 0)
		return;
	up->relink = false;
	cl.reply_text = amqp_cstring_bytes("vmproxyd: reconnecting to re-read TLS files");
	busy_begin(up, now_ms); /* an idle link's socket has room; the watchdog cuts it if not */
	amqp_send_method(up->conn, 0, AMQP_CONNECTION_CLOSE_METHOD, &cl);
	busy_end(up);
	log_info("thread=%u upstream %s: reconnecting to re-read the TLS files", up->thread_id,
		 up->st.node);
	link_close(up);
	up->state = LINK_DOWN;
	up->broker_blocked = false;
	up->reconnect_at = now_ms;
	up->node = up->cfg->upstream.n_hosts ? up->spread % up->cfg->upstream.n_hosts : 0;
	up->node_tries = 0;
	up->ops->state_changed(up->ud, false);
}

void upstream_relink(struct upstream *up, uint64_t now_ms)
{
	if (up->state == LINK_DOWN)
		return; /* the next connect reads the files anyway */
	up->relink = true;
	if (up->state == LINK_UP)
		upstream_kick(up, now_ms);
}

static void kick(struct upstream *up, uint64_t now_ms)
{
	drain(up, now_ms);
	for (;;) {
		uint32_t before;

		if (!publish_some(up, now_ms))
			break;
		/* Window full: the confirms this drain reads may already be
		 * all the broker will send for now, and they no longer wake
		 * epoll once read, so publish again while they free room. */
		before = up->n_unconfirmed;
		drain(up, now_ms);
		if (up->state != LINK_UP || up->n_unconfirmed >= before)
			return;
	}
	drain(up, now_ms);
}

void upstream_kick(struct upstream *up, uint64_t now_ms)
{
	if (up->state != LINK_UP)
		return;
	kick(up, now_ms);
	relink_if_idle(up, now_ms);
}

void upstream_handle_events(struct upstream *up, uint32_t events, uint64_t now_ms)
{
	if (up->state != LINK_UP)
		return;
	if (events & (EPOLLERR | EPOLLHUP)) {
		/* Let rabbitmq-c read what is left and report the error. */
		drain(up, now_ms);
		if (up->state == LINK_UP)
			link_fail(up, now_ms, "socket error or hang-up");
		return;
	}
	upstream_kick(up, now_ms);
}

uint64_t upstream_tick(struct upstream *up, uint64_t now_ms)
{
	uint64_t hb_ms = up->cfg->upstream.heartbeat ? up->cfg->upstream.heartbeat * 1000u / 4 : 5000;

	switch (up->state) {
	case LINK_DOWN:
		if (now_ms >= up->reconnect_at) {
			start_connect(up);
			return UINT64_MAX;
		}
		return up->reconnect_at;
	case LINK_CONNECTING:
		return UINT64_MAX;
	case LINK_UP:
		break;
	}
	/* A broker that blocked publishers (resource alarm) is not stuck. */
	if (up->n_unconfirmed > 0 && !up->broker_blocked &&
	    now_ms - up->last_progress_ms > up->cfg->upstream.stuck_timeout_ms) {
		link_fail(up, now_ms, "no confirm from the broker for %u ms",
			  up->cfg->upstream.stuck_timeout_ms);
		return up->reconnect_at;
	}
	if (now_ms - up->last_drain_ms >= hb_ms)
		upstream_kick(up, now_ms); /* heartbeats are sent and checked while draining */
	if (up->state != LINK_UP)
		return up->reconnect_at;
	return up->last_drain_ms + hb_ms;
}

bool upstream_is_up(const struct upstream *up)
{
	return up->state == LINK_UP;
}

void upstream_get_stats(const struct upstream *up, struct upstream_stats *st)
{
	*st = up->st;
	st->unconfirmed = up->n_unconfirmed;
	st->up = up->state == LINK_UP;
	st->broker_blocked = up->broker_blocked;
}

bool upstream_watchdog(struct upstream *up, uint64_t now_ms, uint64_t stuck_ms)
{
	uint64_t since;
	bool fired = false;
	int fd;

	pthread_mutex_lock(&up->fd_lock);
	since = atomic_load_explicit(&up->busy_since_ms, memory_order_relaxed);
	fd = atomic_load(&up->fd);
	if (since != 0 && fd >= 0 && now_ms - since >= stuck_ms) {
		/* The owner is blocked inside rabbitmq-c: make its call fail. */
		shutdown(fd, SHUT_RDWR);
		fired = true;
	}
	pthread_mutex_unlock(&up->fd_lock);
	return fired;
}
