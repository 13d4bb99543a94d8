/* upstream.h -- a poll thread's one AMQP link to the management broker
 * (non-blocking TLS, our frames, rabbitmq-c's codec): an event source of
 * the thread's epoll that publishes the thread's held messages in confirm
 * mode and hands back broker confirms. Name resolution and the TLS files
 * are loaded on a helper thread; connect, handshakes, publishing and
 * closing are states driven by readiness and deadlines. Reconnects with
 * backoff and fails over across upstream.hosts; on link loss every
 * unconfirmed message is handed back for republishing in order. */
#pragma once

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "helper.h"
#include "mailbox.h"
#include "upstream_proto.h"

struct vm_state;
struct guest_conn;

/* A guest message held until the broker confirms it. Allocated by the poll
 * thread with the routing key and encoded properties inline. */
struct upstream_msg {
	struct upstream_msg *next;
	struct vm_state *vm;	 /* counted reference */
	struct guest_conn *conn; /* counted reference */
	uint64_t guest_tag;	 /* 0 when the guest channel is not in confirm mode */
	uint64_t tag;		 /* upstream delivery tag once published */
	uint32_t chan_gen;
	uint16_t channel;
	bool confirm;
	bool mandatory; /* the guest asked for it back if no queue takes it */
	bool returned;	/* the broker returned it (a confirm still follows) */
	int8_t outcome; /* 0 unsettled, 1 acked, -1 nacked */
	uint32_t size;	/* what it counts against the bounds */
	uint16_t rk_len;
	uint16_t guest_rk_off; /* the guest's own routing key starts here in data */
	uint8_t ex_len;	       /* the guest's exchange name, after the properties */
	uint32_t props_len;
	void *body;
	size_t body_len;
	unsigned char data[]; /* routing key, encoded basic properties, guest exchange */
};

struct upstream_ops {
	/* The next message to publish, without removing it; NULL when none. */
	struct upstream_msg *(*peek)(void *userdata);
	/* Remove the message peek returned: it is being published. */
	void (*pop)(void *userdata, struct upstream_msg *m);
	/* The broker acked (ACK) or nacked it; the callee owns M. */
	void (*confirmed)(void *userdata, struct upstream_msg *m, bool ack);
	/* The link was lost before M was confirmed: put M back at the front of
	 * its queue. Called newest first, so the oldest ends up in front. */
	void (*requeue)(void *userdata, struct upstream_msg *m);
	/* The link came up or went down. */
	void (*state_changed)(void *userdata, bool up);
	/* The broker returned M (mandatory, no queue took it) with CODE and
	 * TEXT; M stays unconfirmed until its confirm. */
	void (*returned)(void *userdata, struct upstream_msg *m, uint16_t code, const char *text);
	/* The link became unable to publish (ABLE false) or able again. Unable:
	 * a connection that never had a message confirmed failed (a refused
	 * publish, a failed connect, handshake or login) and the link backs
	 * off, every node of upstream.hosts having failed in this round; CODE
	 * is the broker's close code (403 for a refused publish) or 0. Able
	 * again: a confirm arrives, or the link comes up with nothing to
	 * publish. One failure after a connection that worked is not enough:
	 * the link reconnects with its backoff started again. May be NULL. */
	void (*publishing)(void *userdata, bool able, uint16_t code);
	/* The broker blocked the link's publishing (BLOCKED: connection.blocked,
	 * a resource alarm) or unblocked it; unblocked also when the link that
	 * was blocked ends. May be NULL. */
	void (*broker_flow)(void *userdata, bool blocked);
	/* The inbox channel's events, as upstream_proto_ops describes them;
	 * inbox_closed also comes when the link ends. May be NULL. */
	void (*inbox_reply)(void *userdata, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
			    uint16_t code, const char *text, uint32_t count, uint32_t consumers);
	void (*inbox_deliver)(void *userdata, const struct upstream_proto_delivery *d);
	void (*inbox_got)(void *userdata, uint64_t cookie, const struct upstream_proto_delivery *d,
			  uint32_t count);
	void (*inbox_cancelled)(void *userdata, amqp_bytes_t tag);
	void (*inbox_closed)(void *userdata, uint16_t code, const char *text);
};

#define UPSTREAM_REFUSAL_CODES 16 /* AMQP has 13 codes of 400 and above */

struct upstream_stats {
	uint64_t published, acked, nacked, reconnects, republished, returned;
	uint64_t delivered;	     /* inbox deliveries received (passed to guests) */
	uint64_t deliveries_refused; /* inbox deliveries over the size bound, rejected */
	uint64_t writes, reads; /* SSL_write/SSL_read (or send/recv) calls on the link */
	struct {
		uint16_t code; /* 0: unused slot */
		uint64_t count;
	} refusals[UPSTREAM_REFUSAL_CODES]; /* broker closes with 4xx/5xx codes */
	uint32_t unconfirmed;
	bool up, broker_blocked;
	char last_error[320];
	char node[128]; /* host:port of the current or last link */
};

struct upstream;

/* A link for poll thread THREAD_ID that registers its socket in EPFD and
 * gets resolve results through MB (UPSTREAM_MAIL_RESOLVED). CFG outlives
 * it. The first connect starts with upstream_tick. */
int upstream_new(const struct proxy_config *cfg, unsigned thread_id, int epfd,
		 struct helper_pool *helpers, struct mailbox *mb, const struct upstream_ops *ops,
		 void *userdata, struct upstream **out);

/* Destroy the connection; unconfirmed messages go back through requeue.
 * A resolve still running on a helper delivers its result to the mailbox,
 * which the owner drains with upstream_mail_discard. Accepts NULL. */
void upstream_free(struct upstream *up);

/* Readiness of the link socket (registered with data.ptr = UP): advance
 * the connect or handshake, or read the broker's frames. */
void upstream_handle_events(struct upstream *up, uint32_t events, uint64_t now_ms);

/* The type of the mail a link's helper posts to its owner's mailbox with
 * the resolve result; owners number their own mails below it. */
#define UPSTREAM_MAIL_RESOLVED 0x1000

/* An UPSTREAM_MAIL_RESOLVED arrived (steals M). */
void upstream_handle_mail(struct upstream *up, struct mail *m, uint64_t now_ms);
/* Free an UPSTREAM_MAIL_RESOLVED without a link to give it to. */
void upstream_mail_discard(struct mail *m);

/* Once per loop iteration: append what the window allows to the output
 * and write it with as few TLS writes as it needs. Never blocks. */
void upstream_kick(struct upstream *up, uint64_t now_ms);

/* Reconnect (to re-read the TLS files, and to return to the link's home
 * node after a failover) once every message published on the link is
 * settled; nothing new is published meanwhile, so nothing is republished.
 * A link that is down reads the files at its next connect. */
void upstream_relink(struct upstream *up, uint64_t now_ms);

/* Reconnect timer, connect and handshake deadlines, heartbeats, stuck-link
 * detection (no confirm for upstream.stuck_timeout_ms). Returns the next
 * deadline (absolute ms). */
uint64_t upstream_tick(struct upstream *up, uint64_t now_ms);

bool upstream_is_up(const struct upstream *up);

/* The link's protocol engine while the link is up (for the inbox requests
 * of upstream_proto.h, written out with the next upstream_kick), else NULL. */
struct upstream_proto *upstream_inbox_proto(struct upstream *up);
void upstream_get_stats(const struct upstream *up, struct upstream_stats *st);

/* Where links go on a cluster (upstream.hosts with n nodes). A link's
 * SPREAD is fixed by the host name and its thread; it starts on node
 * spread % n, so a host's threads take consecutive nodes from a host-chosen
 * one. When node FIRST fails, try number TRIES (1 .. n-1) of the round goes
 * to upstream_failover_node(spread, first, tries, n): every other node once,
 * from an offset that depends on the spread; try n is FIRST again. */
uint32_t upstream_link_spread(const char *hostname, unsigned thread_id);
size_t upstream_failover_node(uint32_t spread, size_t first, size_t tries, size_t n);
