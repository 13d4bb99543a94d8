/* upstream_proto.h -- the client side of AMQP 0-9-1 for an upstream link,
 * without I/O: bytes from the broker in, frames for the broker out, and
 * events (link ready, confirms, flow) to the owner. Handshake (start/
 * start-ok with PLAIN or EXTERNAL, tune/tune-ok, open, channel.open,
 * confirm.select), publishing with pre-encoded properties, confirms,
 * heartbeats and closing. Methods go through rabbitmq-c's codec; the frame
 * layer is ours. Anything malformed or unexpected from the broker ends the
 * link: there is nothing to recover on it, the owner republishes. */
#pragma once

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker.h"

#define UPSTREAM_PROTO_CHANNEL	 1
#define UPSTREAM_PROTO_FRAME_MAX 131072 /* what we propose in tune-ok */
#define UPSTREAM_PROTO_TABLE_DEPTH 16	/* nested tables accepted from the broker */
/* Consuming (per-VM inboxes) runs on a channel of its own, opened when
 * first needed: a broker channel error there (a refused declare, say)
 * costs the consumers, never the publishing channel. */
#define UPSTREAM_PROTO_INBOX_CHANNEL 2

enum upstream_proto_state {
	UPSTREAM_PROTO_START,	/* header sent, waiting for connection.start */
	UPSTREAM_PROTO_TUNE,	/* start-ok sent, waiting for tune (or secure) */
	UPSTREAM_PROTO_OPEN,	/* tune-ok and open sent, waiting for open-ok */
	UPSTREAM_PROTO_CHANNEL_OPEN, /* channel.open sent */
	UPSTREAM_PROTO_SELECT,	/* confirm.select sent */
	UPSTREAM_PROTO_READY,	/* publishing */
	UPSTREAM_PROTO_CLOSING, /* connection.close sent, waiting for close-ok */
	UPSTREAM_PROTO_CLOSED,	/* over: close-ok received, or an error */
};

/* A message the broker returned (basic.return with its content): it was
 * published mandatory and no queue took it. Valid during the callback. */
struct upstream_proto_return {
	uint16_t code;	  /* 312 NO_ROUTE, ... */
	const char *text; /* sanitized for logs */
	amqp_bytes_t exchange, routing_key;
	amqp_bytes_t properties; /* flags and list, as the content header carried them */
	amqp_bytes_t body;
};

/* A message delivered to one of the link's consumers. Valid during the
 * callback. */
struct upstream_proto_delivery {
	amqp_bytes_t consumer_tag;
	uint64_t delivery_tag; /* settle it with upstream_proto_inbox_settle */
	uint32_t gen;	       /* of the inbox channel it came on */
	bool redelivered;
	amqp_bytes_t exchange, routing_key;
	amqp_bytes_t properties; /* flags and list, as the content header carried them */
	amqp_bytes_t body;
};

/* The inbox channel's synchronous requests, answered in order. */
enum upstream_inbox_req {
	UPSTREAM_INBOX_DECLARE, /* queue.declare: message and consumer counts */
	UPSTREAM_INBOX_BIND,	/* queue.bind */
	UPSTREAM_INBOX_CONSUME, /* basic.qos, then basic.consume */
	UPSTREAM_INBOX_CANCEL,	/* basic.cancel */
	UPSTREAM_INBOX_GET,	/* basic.get: inbox_got with the message, or a reply when empty */
};

struct upstream_proto_ops {
	/* confirm.select-ok arrived: publishing may start. */
	void (*ready)(void *ud);
	/* basic.ack (ACK) or basic.nack for TAG, or every tag up to it when
	 * MULTIPLE. Tags are not checked here: the owner does. */
	void (*confirm)(void *ud, uint64_t tag, bool multiple, bool ack);
	/* connection.blocked (BLOCKED, with the broker's REASON) or unblocked. */
	void (*flow)(void *ud, bool blocked, const char *reason);
	/* basic.return and its content; it comes before the confirm of the
	 * returned message. */
	void (*returned)(void *ud, const struct upstream_proto_return *r);
	/* The answer to the inbox request made with COOKIE: CODE 0 when it
	 * succeeded (COUNT and CONSUMERS from declare-ok), else the code the
	 * broker closed the inbox channel with, or 0 with OK false when the
	 * link ended first. Every request is answered exactly once, also
	 * from upstream_proto_inbox_abort. */
	void (*inbox_reply)(void *ud, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
			    uint16_t code, const char *text, uint32_t count, uint32_t consumers);
	/* basic.deliver and its content, for a consumer of the inbox channel. */
	void (*inbox_deliver)(void *ud, const struct upstream_proto_delivery *d);
	/* basic.get-ok and its content: the answer to the GET made with COOKIE
	 * (COUNT messages are left); a get-empty is an inbox_reply, OK true. */
	void (*inbox_got)(void *ud, uint64_t cookie, const struct upstream_proto_delivery *d,
			  uint32_t count);
	/* The broker cancelled consumer TAG (its queue was deleted, say). */
	void (*inbox_cancelled)(void *ud, amqp_bytes_t tag);
	/* The inbox channel is gone (the broker closed it with CODE, or the
	 * link ended: CODE 0), after every pending request was answered: its
	 * consumers and unsettled deliveries are void; the broker requeues
	 * the deliveries. */
	void (*inbox_closed)(void *ud, uint16_t code, const char *text);
};

struct upstream_proto_config {
	const char *vhost; /* "/" when NULL */
	enum broker_auth mechanism;
	const char *user, *password; /* PLAIN */
	uint16_t heartbeat;	     /* proposed, seconds; 0 disables */
	const char *connection_name;
	const char *product;
	const char *exchange; /* every publish goes there */
	size_t max_output;    /* unsent output allowed before publish refuses */
	uint64_t max_return;  /* body of a returned message, at most (what was published) */
	uint64_t max_delivery; /* larger deliveries are rejected (not requeued), not passed on */
};

struct upstream_inbox_pending {
	struct upstream_inbox_pending *next;
	uint64_t cookie;
	enum upstream_inbox_req kind;
	uint32_t count, consumers; /* from declare-ok */
	uint8_t replies;	   /* CONSUME: qos-ok seen */
};

struct upstream_proto {
	const struct upstream_proto_config *cfg;
	const struct upstream_proto_ops *ops;
	void *ud;
	enum upstream_proto_state st;
	uint32_t frame_max; /* negotiated; frames from the broker are held to it */
	uint16_t heartbeat; /* negotiated, seconds */
	uint64_t next_tag;  /* the last tag given to a publish */
	uint64_t last_rx_ms, last_tx_ms;
	uint16_t error_code; /* AMQP reply code of the failure, or 0 */
	uint16_t broker_code; /* the code of a close the broker sent, or 0 */
	bool close_received; /* the broker closed the connection */
	char error[240];     /* why the link ended; empty while it lives */
	uint8_t *out;
	size_t out_off, out_len, out_cap;
	uint8_t *in; /* a partial frame carried over between feeds */
	size_t in_len, in_cap;
	amqp_pool_t pool;
	struct {
		bool active, header; /* basic.return seen; its content header seen */
		uint16_t code;
		char text[130];
		uint8_t *meta; /* exchange, routing key, then properties */
		uint8_t ex_len, rk_len;
		uint32_t props_len;
		uint8_t *body;
		uint64_t size, got;
	} ret; /* a returned message being assembled */
	struct {
		bool open;  /* channel.open sent (answers come in order after it) */
		uint32_t gen; /* counts the channel's openings */
		struct upstream_inbox_pending *head, *tail;
		uint32_t npending;
		uint64_t refused;   /* deliveries over max_delivery, rejected */
		uint64_t delivered; /* passed on to the owner */
		/* A delivery being assembled. */
		bool active, header, discard;
		bool redelivered;
		bool get_ok;	     /* the content answers the oldest pending GET */
		uint32_t got_count; /* its message count */
		uint64_t tag;
		uint8_t ctag_len, ex_len, rk_len;
		uint8_t *meta; /* consumer tag, exchange, routing key, properties */
		uint32_t props_len;
		uint8_t *body;
		uint64_t size, got;
	} ib;
};

/* Start a connection: the protocol header is the first output. CFG, OPS
 * and the strings they point to outlive P. Returns 0 or -ENOMEM. */
int upstream_proto_init(struct upstream_proto *p, const struct upstream_proto_config *cfg,
			const struct upstream_proto_ops *ops, void *ud, uint64_t now_ms);
void upstream_proto_destroy(struct upstream_proto *p);

/* LEN bytes from the broker at NOW_MS, all consumed (a partial frame is
 * kept, bounded by frame_max). Returns 0, or -EPROTO once the link is over
 * (the reason in p->error, a connection.close possibly queued as output). */
int upstream_proto_feed(struct upstream_proto *p, const void *data, size_t len, uint64_t now_ms);

/* Queue one basic.publish to the configured exchange with routing key RK
 * (MANDATORY: the broker returns it when no queue takes it),
 * encoded basic properties PROPS (flags and list, as amqp_encode_properties
 * writes them) copied verbatim into the content header, and BODY split over
 * frame_max. Returns the delivery tag (> 0), -EAGAIN when not ready or the
 * output is over max_output, or -EMSGSIZE when the header cannot fit in a
 * frame (the message can never be published on this link). */
int64_t upstream_proto_publish(struct upstream_proto *p, const void *rk, size_t rk_len,
			       bool mandatory, const void *props, size_t props_len,
			       const void *body, size_t body_len);

/* Inbox requests on UPSTREAM_PROTO_INBOX_CHANNEL (opened by the first of
 * them), answered through ops->inbox_reply with COOKIE. Each returns 0,
 * -EAGAIN when the link is not ready, -EMSGSIZE for a name over 255 bytes
 * or -ENOMEM. DECLARE is durable with ARGS (encoded by the caller, NULL
 * for none); CONSUME sends basic.qos PREFETCH (per consumer) before
 * basic.consume of QUEUE with TAG (manual acks). */
int upstream_proto_inbox_declare(struct upstream_proto *p, const char *queue,
				 const amqp_table_t *args, uint64_t cookie);
int upstream_proto_inbox_bind(struct upstream_proto *p, const char *queue, const char *exchange,
			      const char *key, uint64_t cookie);
int upstream_proto_inbox_consume(struct upstream_proto *p, const char *queue, const char *tag,
				 uint16_t prefetch, uint64_t cookie);
int upstream_proto_inbox_cancel(struct upstream_proto *p, const char *tag, uint64_t cookie);
/* basic.get of QUEUE (manual ack). */
int upstream_proto_inbox_get(struct upstream_proto *p, const char *queue, uint64_t cookie);

enum upstream_settle { UPSTREAM_ACK, UPSTREAM_NACK, UPSTREAM_REJECT };
/* Settle one delivery of inbox channel generation GEN (never "multiple":
 * the channel is shared by every VM of the link). Returns 0, or -ESTALE
 * when GEN is not the open channel's (the broker requeued it already). */
int upstream_proto_inbox_settle(struct upstream_proto *p, uint32_t gen, uint64_t tag,
				enum upstream_settle how, bool requeue);

/* Answer every pending inbox request as failed and report the channel
 * closed (code 0): the link is ending. Idempotent. */
void upstream_proto_inbox_abort(struct upstream_proto *p, const char *why);

/* Output not yet written, and how much of it was written at NOW_MS. */
size_t upstream_proto_output(const struct upstream_proto *p, const void **data);
void upstream_proto_consumed(struct upstream_proto *p, size_t n, uint64_t now_ms);

/* Heartbeats to send and the broker's to check. Returns the next deadline
 * (absolute ms, UINT64_MAX for none), or 0 when the broker missed two
 * heartbeats (the link is then over, reason in p->error). */
uint64_t upstream_proto_tick(struct upstream_proto *p, uint64_t now_ms);

/* Queue connection.close with CODE and TEXT; the link ends with close-ok. */
void upstream_proto_close(struct upstream_proto *p, uint16_t code, const char *text);

static inline bool upstream_proto_ready(const struct upstream_proto *p)
{
	return p->st == UPSTREAM_PROTO_READY;
}
