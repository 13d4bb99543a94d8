/* guest_session_impl.h -- private to the guest engine's own files
 * (guest_session.c, guest_handshake.c, guest_channel.c, guest_publish.c,
 * guest_consume.c): the session and channel structs and what the units
 * call in one another. Nothing outside the engine includes it. */
#pragma once

#include "guest_session.h"

/* Publishes that may complete after a channel reached max_unconfirmed,
 * from input already read (one read is at most 64 KiB of tiny frames). */
#define UNCONFIRMED_SLACK 65536

enum conn_state {
	ST_HEADER,   /* waiting for the protocol header */
	ST_START_OK, /* sent start */
	ST_TUNE_OK,  /* sent tune */
	ST_OPEN,     /* got tune-ok, waiting for connection.open */
	ST_RUNNING,
	ST_CLOSING, /* sent connection.close, waiting for close-ok */
	ST_CLOSED,
};

enum pub_state {
	PUB_NONE,
	PUB_HEADER, /* got basic.publish, want the content header */
	PUB_BODY,   /* got the header, want body frames */
};

/* A delivery not yet settled by the guest, with the owner's tags. */
struct dlv {
	uint64_t tag, up_tag;
	uint32_t up_gen, cid;
};

struct consumer {
	uint32_t id;
	uint16_t ch;
	uint32_t gen;
		bool no_ack;
	bool ready; /* consume-ok given */
	uint16_t prefetch; /* the channel's basic.qos when it was created */
	uint8_t tag_len;
	char tag[256];
};

struct chan {
	uint16_t id;
	uint32_t gen;
	bool closing; /* we sent channel.close, waiting for close-ok */
	bool crossed; /* ... and the guest's own channel.close came meanwhile */
	bool confirm;
	bool acks_due; /* settled tags not yet acked to the guest */
	/* Confirm window: tags in [low, next_tag] not yet acked to the guest;
	 * win[tag % cap] is 0 unsettled, 1 acked, 2 nacked. */
	uint64_t next_tag, low;
	uint8_t *win;
	uint32_t cap;
	/* Publish assembly. */
	enum pub_state pub;
	bool mandatory;
	uint8_t exchange_len, rk_len;
	/* exchange, routing key, then the raw property flags + list; the
	 * buffer is kept for the next message */
	uint8_t *meta;
	uint32_t props_len, meta_cap;
	uint64_t body_size, body_got;
	uint8_t *body;
	uint64_t body_cap;
	/* Inbox. */
	uint16_t prefetch;		/* basic.qos for consumers created after it */
	amqp_method_number_t pending;	/* an inbox request awaiting the owner's answer */
	bool pending_nowait;
	bool get_no_ack; /* of the pending basic.get */
	bool declared;			/* the inbox was declared: "" names it */
	uint64_t dnext;			/* the last delivery tag given */
	struct dlv *dl;			/* unsettled deliveries, by tag ascending */
	uint32_t ndl, capdl;
};

struct guest_session {
	const struct guest_session_config *cfg;
	void *ud; /* the owner's, passed to on_event */
	enum conn_state st;
	uint8_t *in;
	size_t in_len, in_cap;
	uint8_t *out;
	size_t out_off, out_len, out_cap;
	uint32_t frame_max;
	uint16_t channel_max;
	uint16_t heartbeat;
	uint64_t created_ms, last_rx_ms, last_tx_ms, close_deadline;
	bool cap_blocked, cap_auth_close, cap_cancel_notify;
	struct consumer *cons;
	uint16_t ncons, capcons;
	uint32_t next_cid;
	bool blocked_sent;
	bool closed_emitted;
	bool dropped;	 /* output is discarded from now on */
	bool rx_paused;	 /* the caller does not read: no receive timeout */
	bool lost_sync;	 /* bad framing: the rest of this feed is discarded */
	bool acks_due;	 /* some channel has settled tags to ack */
	uint64_t now_ms; /* the latest time the caller passed in */
	uint16_t close_code;
	char close_text[256];
	char user[128];
	uint32_t next_gen;
	struct chan **chans;
	uint16_t nchans, capchans;
	amqp_pool_t pool;
};

static inline uint64_t gs_chan_unconfirmed(const struct chan *c)
{
	return c->next_tag + 1 - c->low;
}

/* ---- guest_session.c: output and errors ----------------------------------- */

/* Report GUEST_EVENT_CLOSED once, with the session's close code and text. */
void gs_emit_closed(struct guest_session *s);
/* Pass EV to the owner's on_event, if any. */
void gs_emit(struct guest_session *s, struct guest_event *ev);
/* Encode method ID with DECODED arguments as a frame on CHANNEL, after
 * any acks due; an output overflow drops the session. */
void gs_send_method(struct guest_session *s, uint16_t channel, amqp_method_number_t id,
		    void *decoded);
/* Content header and body frames of a message on CHANNEL. */
void gs_send_content(struct guest_session *s, uint16_t channel, amqp_bytes_t properties,
		     amqp_bytes_t body);
/* RabbitMQ's name for a reply code ("NOT_FOUND"), "ERROR" if unknown. */
const char *gs_code_name(uint16_t code);
/* Hard error: connection.close with "NAME - detail", then wait for close-ok. */
void gs_conn_error(struct guest_session *s, uint16_t code, amqp_method_number_t cause,
		   const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* Soft error: channel.close; the channel drops all but close/close-ok. */
void gs_chan_error(struct guest_session *s, struct chan *c, uint16_t code,
		   amqp_method_number_t cause, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

/* ---- guest_handshake.c: the connection class ------------------------------- */

/* Send connection.start (after the protocol header). */
void gs_send_start(struct guest_session *s);
/* A method on channel 0 once the protocol header was read, before or after
 * connection.open; ARGS are the method's LEN argument bytes. */
void gs_on_connection_method(struct guest_session *s, amqp_method_number_t id,
			     const uint8_t *args, size_t len);

/* ---- guest_channel.c: channels, confirms, methods on a channel ------------- */

/* The open (or closing) channel number ID, or NULL. */
struct chan *gs_chan_find(struct guest_session *s, uint16_t id);
/* Free C and take it off the session's list (no events). */
void gs_chan_free(struct guest_session *s, struct chan *c);
/* Room in C's confirm window for tag next_tag + 1; false past the bound. */
bool gs_win_grow(struct guest_session *s, struct chan *c);
/* Send the acks/nacks of tags settled since the last flush. */
void gs_flush_due_acks(struct guest_session *s);
/* RabbitMQ's spelling of a method ("basic.recover-async") in BUF. */
const char *gs_method_name_r(amqp_method_number_t id, char *buf, size_t size);
/* The same in a per-thread buffer: one use per message. */
const char *gs_method_name(amqp_method_number_t id);
/* Method ID on channel CH of a running connection. */
void gs_on_channel_method(struct guest_session *s, uint16_t ch, amqp_method_number_t id,
			  const uint8_t *args, size_t len);

/* ---- guest_publish.c: publish assembly ------------------------------------- */

/* Method handlers take channel C and the method's LEN argument bytes ARGS;
 * an error is answered on the connection or the channel. */
void gs_on_publish(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len);
void gs_on_exchange_declare(struct guest_session *s, struct chan *c, const uint8_t *args,
			    size_t len);
/* Content header and body frames on channel CH. */
void gs_on_header(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len);
void gs_on_body(struct guest_session *s, uint16_t ch, const uint8_t *p, size_t len);

/* ---- guest_consume.c: the inbox ------------------------------------------- */

/* Give back what the inbox handed channel C: its deliveries (requeued) and
 * its consumers. */
void gs_chan_release(struct guest_session *s, struct chan *c);
/* The inbox's method handlers, as those of guest_publish.c. */
void gs_on_queue_declare(struct guest_session *s, struct chan *c, const uint8_t *args,
			 size_t len);
void gs_on_get(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len);
void gs_on_recover(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		   const uint8_t *args, size_t len);
void gs_on_consume(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len);
void gs_on_cancel(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len);
/* basic.ack, basic.nack or basic.reject (ID) of inbox deliveries. */
void gs_on_settle(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		  const uint8_t *args, size_t len);
