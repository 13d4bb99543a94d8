/* upstream_io.c -- a link's data path: the broker's bytes read into the
 * protocol engine, the thread's held messages published in batches and
 * written with as few TLS writes as they need, confirms and returns
 * settling messages through the tag-indexed ring, and the inbox channel's
 * events relayed to the owner.
 *
 * Write path: publishes are appended to the protocol engine's output
 * buffer (upstream_proto) and written once per loop iteration with as few
 * SSL_write calls as the data needs; OpenSSL cuts records of up to 16 KiB.
 * A full socket (WANT_WRITE) keeps the buffer and the next EPOLLOUT edge
 * continues; a full buffer pauses publishing. Read path: on EPOLLIN,
 * SSL_read until WANT_READ, and confirms settle messages through a ring
 * indexed by delivery tag. */
#include "upstream_impl.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "clock.h"
#include "log.h"
#include "upstream_tls.h"

/* ---- handing back and writing out --------------------------------------------- */

/* Hand every published, unsettled message back, newest first, so the
 * oldest ends up in front of its queue. */
void uplink_requeue_all(struct upstream *up)
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
int uplink_flush_output(struct upstream *up, uint64_t now, char *err, size_t errlen)
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

/* ---- the protocol engine's callbacks ------------------------------------------- */

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

const struct upstream_proto_ops uplink_proto_ops = {
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
		uplink_set_publishing(up, true, 0);
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
				uplink_set_publishing(up, true, 0);
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
	uplink_set_broker_blocked(up, blocked);
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
				uplink_fail(up, now, "TLS read: %s", upstream_tls_error(err, sizeof(err), e));
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
				uplink_fail(up, now, "read: %s", strerror(errno));
				return -1;
			}
			if (n == 0) {
				up->io_failed = true;
				uplink_fail(up, now, "the broker closed the connection");
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
void uplink_service(struct upstream *up, uint64_t now, bool readable)
{
	char err[240];

	if (readable && read_input(up, now) < 0)
		return;
	if (up->state == LINK_UP)
		publish_some(up, now);
	if (uplink_flush_output(up, now, err, sizeof(err)) < 0) {
		uplink_fail(up, now, "%s", err);
		return;
	}
	if (up->proto.st != UPSTREAM_PROTO_CLOSED)
		return;
	if (up->proto.error[0]) {
		char e[240];

		snprintf(e, sizeof(e), "%s", up->proto.error);
		uplink_fail(up, now, "%s", e);
		return;
	}
	/* close-ok for our close: a planned reconnect, to the home node. */
	uplink_close(up, now);
	up->state = LINK_DOWN;
	uplink_set_broker_blocked(up, false);
	up->reconnect_at = now;
	up->node = up->cfg->upstream.n_hosts ? up->spread % up->cfg->upstream.n_hosts : 0;
	up->node_tries = 0;
	up->ops->state_changed(up->ud, false);
}
