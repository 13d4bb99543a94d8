/* guest_session.h -- the guest-facing AMQP 0-9-1 server engine: bytes in,
 * bytes and events out. No sockets, no threads, no clock of its own: the
 * caller feeds what the guest sent, writes what the engine produced, passes
 * the time in, and settles publishes when the broker confirmed them. */
#pragma once

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct guest_session;

/* Authentication hook: MECHANISM is "PLAIN", "AMQPLAIN" or "EXTERNAL";
 * USER is the parsed login name ("" for EXTERNAL or when absent). Return 0
 * to accept, negative to refuse (403 ACCESS_REFUSED). */
typedef int (*guest_auth_fn)(void *userdata, const char *mechanism, const char *user);

/* A complete basic.publish. Pointers are valid only during the callback,
 * except BODY, whose ownership passes to the callee (free() it). */
struct guest_publish {
	uint16_t channel;
	uint32_t channel_gen;	  /* distinguishes reopened channels with the same number */
	uint64_t delivery_tag;	  /* 1, 2, ... per channel in confirm mode; 0 otherwise */
	bool confirm;		  /* the channel is in confirm mode: settle this publish */
	bool mandatory;
	amqp_bytes_t exchange;
	amqp_bytes_t routing_key;
	const amqp_basic_properties_t *properties; /* decoded, depth-checked */
	amqp_bytes_t raw_properties; /* the header frame's property flags + list, as sent */
	void *body;		      /* malloc'd, owned by the callee; NULL when body_len 0 */
	size_t body_len;
};

/* How a guest settled (or gave back) a delivery. */
enum guest_settle_kind {
	GUEST_SETTLE_ACK,
	GUEST_SETTLE_NACK,
	GUEST_SETTLE_REJECT,
	GUEST_SETTLE_RELEASE, /* its channel or consumer went away unsettled: requeue */
};

/* One delivery the guest settled, with what the owner attached to it in
 * guest_session_deliver. */
struct guest_settle {
	enum guest_settle_kind kind;
	bool requeue;
	uint32_t consumer_id;
	uint64_t up_tag;
	uint32_t up_gen;
};

enum guest_event_type {
	GUEST_EVENT_OPENED,	    /* connection.open accepted: user and vhost known */
	GUEST_EVENT_PUBLISH,	    /* .publish */
	/* The inbox (config inbox_name): answer each with guest_session_*_ok
	 * or guest_session_fail on the same channel generation. */
	GUEST_EVENT_DECLARE, /* queue.declare of the inbox (.passive) */
	GUEST_EVENT_CONSUME, /* basic.consume of it: .consumer_id, .prefetch, .no_ack */
	GUEST_EVENT_CANCEL,  /* consumer .consumer_id is gone (cancel-ok already sent, or
				its channel closed); no answer */
	GUEST_EVENT_SETTLE,  /* .settle: one delivery acked, nacked, rejected or released */
	GUEST_EVENT_GET,     /* basic.get of the inbox (.no_ack): answer with
				guest_session_get_ok or _get_empty */
	GUEST_EVENT_CHANNEL_CLOSED, /* .channel, .channel_gen: no further confirms needed */
	GUEST_EVENT_CLOSED,	    /* the connection is finished: close the socket once
				       the output is flushed (guest_session_done) */
};

struct guest_event {
	enum guest_event_type type;
	uint16_t channel;
	uint32_t channel_gen;
	uint16_t reply_code; /* CLOSED: the code sent or received (200 clean) */
	const char *text;    /* CLOSED: why, for the log */
	struct guest_publish publish;
	bool passive;	      /* DECLARE */
	bool no_ack;	      /* CONSUME */
	uint16_t prefetch;    /* CONSUME: the channel's basic.qos (0: none) */
	uint32_t consumer_id; /* CONSUME, CANCEL */
	struct guest_settle settle;
};

/* Events are delivered synchronously from guest_session_feed/_tick. The
 * callback must not destroy the session. */
typedef void (*guest_event_fn)(void *userdata, const struct guest_event *ev);

struct guest_session_config {
	uint16_t channel_max;	       /* proposed in tune; default 64 */
	uint32_t frame_max;	       /* proposed in tune; default 131072 */
	uint16_t heartbeat;	       /* proposed in tune, seconds; default 60 */
	uint64_t max_message_bytes;    /* larger declared body: 406 on the channel; default 1 MiB */
	size_t max_output_bytes;       /* unsent output past this: connection dropped; 4 MiB */
	uint32_t handshake_timeout_ms; /* header to open-ok; default 10000 */
	unsigned max_table_depth;      /* nested field tables; default 8 */
	uint32_t max_unconfirmed;      /* per channel; past it guest_session_wants_read is false;
					  default 10000. Input already read may go 65536 past it;
					  further than that closes the channel (406) */
	const char *const *allowed_exchanges; /* NULL-terminated; NULL allows none */
	const char *vhost;		      /* NULL: any vhost is accepted */
	const char *product;		      /* server property "product" */
	guest_auth_fn auth;		      /* NULL accepts everyone */
	void *auth_userdata;
	guest_event_fn on_event; /* called with the session's own userdata */
	const char *inbox_name;	 /* the one queue a guest may declare and consume; NULL none */
	uint16_t max_consumers;	 /* per connection; default 4 */
	uint32_t max_unacked;	 /* deliveries per channel; default 1024 */
};

/* Fill C with the defaults above (no exchange allowed, no callbacks). */
void guest_session_config_init(struct guest_session_config *c);

/* A new session in the "waiting for protocol header" state. CONFIG and the
 * strings it points to must outlive the session; its events are delivered
 * with USERDATA (the caller's connection). NOW_MS starts the handshake
 * timer. NULL on allocation failure. */
struct guest_session *guest_session_new(const struct guest_session_config *config,
					void *userdata, uint64_t now_ms);
void guest_session_free(struct guest_session *s);

/* From now on S reads CONFIG (same lifetime rules as at creation): a
 * session that moved to another thread reads that thread's copy. */
void guest_session_set_config(struct guest_session *s, const struct guest_session_config *config);

/* Feed LEN bytes the guest sent at NOW_MS. Consumes all of them (partial
 * frames are buffered, bounded by frame_max). Returns 0, or -EPROTO once the
 * session is closing or closed (the rest is discarded). */
int guest_session_feed(struct guest_session *s, const void *data, size_t len, uint64_t now_ms);

/* Timers: heartbeats due, heartbeat and handshake timeouts. Returns the
 * next absolute deadline in ms (UINT64_MAX for none). */
uint64_t guest_session_tick(struct guest_session *s, uint64_t now_ms);

/* Output not yet written to the guest. */
size_t guest_session_output(struct guest_session *s, const void **data);
/* N bytes of the output were written. NOW_MS feeds the heartbeat timer. */
void guest_session_output_consumed(struct guest_session *s, size_t n, uint64_t now_ms);

/* Settle a publish that was announced with confirm=true: ACK false nacks.
 * Acks go out in delivery-tag order, when the output is next taken (or
 * before any other frame), so that the settlements of one loop iteration
 * coalesce into "multiple" acks; "multiple" never covers a tag that is not
 * settled. Settling a closed channel's generation is a no-op.
 * Returns 0 or -ENOENT for an unknown tag. */
int guest_session_settle(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			 uint64_t delivery_tag, bool ack);

/* A publish the broker returned (mandatory, unroutable): basic.return with
 * CODE and TEXT, the guest's own EXCHANGE and ROUTING_KEY, and the message
 * (PROPERTIES as a content header carries them, BODY), on CHANNEL of
 * generation CHANNEL_GEN. Nothing when that channel is gone. */
void guest_session_return(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			  uint16_t code, const char *text, amqp_bytes_t exchange,
			  amqp_bytes_t routing_key, amqp_bytes_t properties, amqp_bytes_t body);

/* Answers to DECLARE and CONSUME events (nothing when that channel
 * generation is gone). declare-ok names the inbox with COUNT messages and
 * CONSUMERS; consume-ok carries the consumer's tag (not sent for nowait). */
void guest_session_declare_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t count, uint32_t consumers);
void guest_session_consume_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t consumer_id);
/* Answers to GET: get-ok with the channel's next delivery tag and the
 * message (as for guest_session_deliver; COUNT messages left), or
 * get-empty. get_ok returns the tag, or -ENOENT when the request is gone. */
int64_t guest_session_get_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			     bool redelivered, amqp_bytes_t exchange, amqp_bytes_t routing_key,
			     uint32_t count, amqp_bytes_t properties, amqp_bytes_t body,
			     uint64_t up_tag, uint32_t up_gen);
void guest_session_get_empty(struct guest_session *s, uint16_t channel, uint32_t channel_gen);

/* Close CHANNEL (of CHANNEL_GEN) with CODE and TEXT ("NAME - detail"), as
 * the answer to its pending inbox request. */
void guest_session_fail(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			uint16_t code, const char *text);
/* The server cancels consumer CONSUMER_ID: basic.cancel to a client that
 * advertised consumer_cancel_notify, else its channel is closed (506).
 * Its unsettled deliveries stay ackable. A CANCEL event follows. */
void guest_session_cancel_consumer(struct guest_session *s, uint32_t consumer_id,
				   const char *why);

/* Deliver a message to consumer CONSUMER_ID on CHANNEL (generation
 * CHANNEL_GEN): basic.deliver with the next delivery tag of the channel,
 * content as given (PROPERTIES as a content header carries them). UP_TAG
 * and UP_GEN come back in the delivery's SETTLE event. Returns the guest's
 * delivery tag (> 0; a no_ack consumer's needs no settling), -ENOENT when
 * the channel or consumer is gone, -ENOSPC at max_unacked, or -EMSGSIZE
 * when the properties do not fit a frame. */
int64_t guest_session_deliver(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t consumer_id, bool redelivered, amqp_bytes_t exchange,
			      amqp_bytes_t routing_key, amqp_bytes_t properties, amqp_bytes_t body,
			      uint64_t up_tag, uint32_t up_gen);

/* Hand back everything the inbox gave the session: a SETTLE (RELEASE)
 * event for every unsettled delivery and a CANCEL event for every
 * consumer, synchronously. For a connection about to be freed. */
void guest_session_release_all(struct guest_session *s);

/* Call FN for every unsettled delivery (with what the owner attached to
 * it), then detach them: the guest may still settle them (no error), but
 * their SETTLE events carry UP_GEN 0. */
void guest_session_detach_deliveries(struct guest_session *s,
				     void (*fn)(void *ud, uint64_t up_tag, uint32_t up_gen),
				     void *ud);
/* Call FN for every consumer that has its consume-ok: its channel and
 * generation, id, the prefetch it was created with, and no_ack. */
void guest_session_foreach_consumer(struct guest_session *s,
				    void (*fn)(void *ud, uint16_t channel, uint32_t channel_gen,
					       uint32_t consumer_id, uint16_t prefetch, bool no_ack),
				    void *ud);

/* Unsettled deliveries on the session's channels. */
uint32_t guest_session_unacked(const struct guest_session *s);

/* Server-initiated close (320 CONNECTION_FORCED on VM stop or drain, ...).
 * After any connection.close it sends, the engine waits at most 3 s for
 * close-ok (answering a crossing connection.close), then reports CLOSED. */
void guest_session_close(struct guest_session *s, uint16_t code, const char *text);

/* Send connection.blocked (with REASON) or unblocked, when the client
 * advertised the capability and the state changes. */
void guest_session_set_blocked(struct guest_session *s, bool blocked, const char *reason);

/* False while the session is at a bound (output buffer above half its
 * limit, a channel at max_unconfirmed: settled tags count until their acks
 * are taken with the output) or closing: stop reading the socket. */
bool guest_session_wants_read(const struct guest_session *s);

/* The caller stopped (READING false) or resumed reading the socket at
 * NOW_MS. While it does not read, the guest's heartbeats cannot be seen,
 * so the missed-heartbeat timeout is suspended (as RabbitMQ does for a
 * blocked connection); it restarts from NOW_MS on resume. */
void guest_session_set_reading(struct guest_session *s, bool reading, uint64_t now_ms);

/* True once the connection is over and the output, if any, is flushed. */
bool guest_session_done(const struct guest_session *s);

/* For logs: the login name ("" before open) and whether the client
 * advertised connection.blocked. */
const char *guest_session_user(const struct guest_session *s);
bool guest_session_is_open(const struct guest_session *s);
