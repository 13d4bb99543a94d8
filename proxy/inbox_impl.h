/* inbox_impl.h -- the inboxes' own state, shared by the files the module is
 * made of and private to them: inbox.c (the state, its consumers and
 * requests, and the broker requests they send), inbox_guest.c (what guest
 * sessions ask: declare, get, consume, cancel, settle; connections closing,
 * leaving and arriving) and inbox_link.c (the link's side: replies,
 * deliveries, gets, cancels by the broker, the channel lost and back).
 * Functions named inbox_ here and not in inbox.h are theirs alone.
 *
 * Every consumer of a guest is one consumer on the link's inbox channel,
 * with its own tag ("vmproxyd.<thread>.<seq>") and the guest's prefetch
 * (capped at inbox.max_prefetch) as its basic.qos: the broker never has
 * more than that many unacked deliveries out to it, so a guest that stops
 * acking, or stops reading its socket, stops the flow for that consumer
 * alone and holds at most prefetch x inbox.max_message_bytes here.
 * Deliveries are settled at the broker one by one (never "multiple": the
 * channel is shared by every VM of the thread), and only on the channel
 * generation that delivered them; after the channel or link was lost the
 * broker has requeued them already, and a late guest ack is dropped.
 *
 * Requests to the broker are pipelined (declare, bind, qos, consume) and
 * answered in order; one guest operation is one struct inbox_req whose
 * replies are counted down. A connection that closes meanwhile is cut
 * loose from its requests and consumers (conn set to NULL), so nothing
 * here holds a reference to a guest connection. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "inbox.h"

#define TAG_PREFIX "vmproxyd."
#define BUCKETS    256

enum cons_state {
	CONS_SUBSCRIBING, /* qos + consume sent */
	CONS_LIVE,
	CONS_CANCELLING, /* basic.cancel sent; freed at cancel-ok */
	CONS_DOWN,       /* the inbox channel or link was lost: subscribe again */
};

struct inbox_cons {
	struct inbox_cons *next, *hnext;
	struct guest_conn *conn; /* NULL: the guest is gone, cancel at the broker */
	uint16_t ch;
	uint32_t ch_gen, cid;
	uint64_t seq;
	enum cons_state st;
	bool no_ack;
	uint16_t prefetch; /* as sent in basic.qos */
	char tag[48];
	char uuid[VM_UUID_LEN + 1];
	char queue[VM_UUID_LEN + 16];
};

enum req_what {
	REQ_DECLARE,     /* a guest's queue.declare */
	REQ_CONSUME,     /* a guest's basic.consume */
	REQ_RESUBSCRIBE, /* a consumer's subscription after the channel was lost */
	REQ_CANCEL,      /* a consumer's basic.cancel */
	REQ_GET,         /* a guest's basic.get */
};

struct inbox_req {
	struct inbox_req *prev, *next; /* the inbox's outstanding requests */
	enum req_what what;
	struct guest_conn *conn; /* NULL once it closed */
	uint16_t ch;
	uint32_t ch_gen;
	struct inbox_cons *k;
	unsigned replies; /* still to come */
	bool failed;
	uint16_t code;
	char text[200];
	uint32_t count, consumers;
	bool no_ack;                /* GET */
	char uuid[VM_UUID_LEN + 1]; /* GET: whose routing key prefix to strip */
};

struct inbox {
	const struct proxy_config *cfg;
	unsigned thread_id;
	inbox_wake_fn wake;
	void *ud;
	struct upstream *up;
	struct inbox_cons *cons; /* all */
	struct inbox_cons *bucket[BUCKETS];
	uint32_t ncons;
	struct inbox_req *reqs;
	uint64_t next_seq;
	amqp_table_entry_t args[4];
	amqp_table_t qargs;
};

/* ---- inbox.c: consumers and requests -------------------------------------------- */

/* The engine of connection C; NULL without a connection or once its
 * socket is shut (deliveries and replies then have no guest to go to). */
static inline struct guest_session *inbox_session(const struct guest_conn *c)
{
	return c ? guest_conn_session(c) : NULL;
}

/* The consumer whose broker tag is TAG, or NULL. */
struct inbox_cons *inbox_cons_by_tag(struct inbox *ib, amqp_bytes_t tag);
/* A new consumer of C (of VM) for the CONSUME event EV (or one like it),
 * its tag and prefetch set, state SUBSCRIBING (0); NULL when out of memory. */
struct inbox_cons *inbox_cons_new(struct inbox *ib, struct guest_conn *c,
                                  const struct vm_info *vm, const struct guest_event *ev);
/* Unlink and free K; requests that refer to it get k NULL. */
void inbox_cons_free(struct inbox *ib, struct inbox_cons *k);
/* A new outstanding request WHAT of C (NULL: of nobody) on guest channel
 * CH of generation CH_GEN, about K; NULL when out of memory. */
struct inbox_req *inbox_req_new(struct inbox *ib, enum req_what what, struct guest_conn *c,
                                uint16_t ch, uint32_t ch_gen, struct inbox_cons *k);
/* Unlink and free R. */
void inbox_req_free(struct inbox *ib, struct inbox_req *r);
/* C (may be NULL) has output: the thread's wake callback. */
void inbox_wake(struct inbox *ib, struct guest_conn *c);
/* Declare and bind QUEUE for UUID's key, then consume for K or get (GET);
 * R counts the replies. False when not all could be sent: R failed, and
 * answered after the replies that were queued (none: the caller answers). */
bool inbox_send_chain(struct inbox *ib, struct inbox_req *r, const char *queue, const char *uuid,
                      struct inbox_cons *k, bool get);
/* K's guest is gone (conn set NULL): cancel it at the broker, or free it
 * when nothing is there. */
void inbox_cancel_upstream(struct inbox *ib, struct inbox_cons *k);
/* Subscribe K on the link (WHAT: REQ_CONSUME or REQ_RESUBSCRIBE), state
 * SUBSCRIBING; a failure reaches the guest through the request's end. */
void inbox_subscribe(struct inbox *ib, struct inbox_cons *k, enum req_what what);
