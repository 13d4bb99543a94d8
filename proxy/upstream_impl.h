/* upstream_impl.h -- a link's own state, shared by its two files and
 * private to them: upstream.c (its life: resolve, connect, handshakes,
 * failover, timers) and upstream_io.c (its data path: reads, batched
 * publishes and writes, confirms, returns, the inbox relays). Functions
 * named uplink_ are theirs alone. */
#pragma once

#include <netdb.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stdint.h>

#include "backoff.h"
#include "helper.h"
#include "mailbox.h"
#include "upstream.h"
#include "upstream_proto.h"

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

/* ---- upstream.c ------------------------------------------------------------------ */

/* End the connection (no last write after a fatal I/O error), hand its
 * unconfirmed messages back, and go down. */
void uplink_close(struct upstream *up, uint64_t now);
/* The connection failed for the reason FMT says: logged, counted, closed,
 * and the next attempt scheduled by the backoff and the node rotation. */
void uplink_fail(struct upstream *up, uint64_t now, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Tell the owner (ops->publishing) the link can or cannot publish. */
void uplink_set_publishing(struct upstream *up, bool able, uint16_t code);
/* Record whether the broker blocks the link, telling the owner
 * (ops->broker_flow) of a change. */
void uplink_set_broker_blocked(struct upstream *up, bool blocked);
/* Advance the state machine as far as it goes without waiting. */
void uplink_step(struct upstream *up, uint64_t now);

/* ---- upstream_io.c --------------------------------------------------------------- */

/* The protocol engine's callbacks into the link. */
extern const struct upstream_proto_ops uplink_proto_ops;
/* Hand every published, unsettled message back to the owner, oldest first. */
void uplink_requeue_all(struct upstream *up);
/* Write what the engine has buffered: 0 (all written or the socket is
 * full), -1 with ERR on a fatal error. */
int uplink_flush_output(struct upstream *up, uint64_t now, char *err, size_t errlen);
/* Read what the broker sent (when READABLE), publish what the window
 * allows, and write it out. */
void uplink_service(struct upstream *up, uint64_t now, bool readable);
