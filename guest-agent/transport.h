/* transport.h -- the agent's way to the host: an AMQP connection over
 * vsock (rabbitmq-c given a connected AF_VSOCK socket) or TCP (optionally
 * TLS, optionally from a given source address), publishing one message at a
 * time in confirm mode and waiting for its confirm. Connecting and each
 * publish are bounded by timeout_ms, whatever blocks (the connect, a send
 * into a window the peer stopped opening, the confirm): a SIGALRM watchdog
 * shuts the socket down when the time is up. transport_abort_from_signal
 * does the same from a SIGTERM handler. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "broker.h"

struct transport_opts {
	const char *endpoint;	    /* "vsock://CID:PORT" or "tcp://HOST:PORT" */
	const char *source_address; /* tcp only, numeric, plain AMQP only */
	const char *vhost, *user, *password;
	const char *ca, *cert, *key; /* TLS over tcp when ca is set */
	const char *exchange;
	int timeout_ms;
	const char *inbox; /* consume control messages from this queue; NULL: none */
};

#define TRANSPORT_CONTROL_MAX 4096 /* larger control messages are rejected */

/* A control message from the inbox; BODY is malloc'd (the caller frees it)
 * and settled with transport_settle(TAG). */
struct transport_control {
	uint64_t tag;
	char *body;
	size_t len;
};

enum transport_result {
	TRANSPORT_CONFIRMED = 0,
	TRANSPORT_NACKED = 2,	 /* the broker nacked it */
	TRANSPORT_REFUSED = 3,	 /* the server closed the channel or connection */
	TRANSPORT_TIMEOUT = 4,	 /* no confirm (or no handshake) in time */
	TRANSPORT_NO_CONNECT = 5, /* nothing listening, or the connection broke */
	TRANSPORT_INTERRUPTED = 6, /* transport_abort_from_signal was called */
};

struct transport;

/* Check O->endpoint; ERR says what is wrong. Installs the SIGALRM handler
 * the watchdog uses (the agent uses SIGALRM for nothing else). */
int transport_new(const struct transport_opts *o, struct transport **out, char *err,
		  size_t errlen);
void transport_free(struct transport *t);

/* Publish BODY with routing key RK and message id MSGID (may be NULL),
 * connecting first if needed, and wait for the confirm. Anything but
 * TRANSPORT_CONFIRMED leaves the connection closed; ERR says why. */
enum transport_result transport_publish(struct transport *t, const char *rk, const char *msgid,
					const void *body, size_t len, uint64_t timestamp_s, char *err,
					size_t errlen);

bool transport_connected(const struct transport *t);

/* Wait at most MS for a control message (sleep when not connected, or
 * when the inbox could not be consumed); a signal ends the wait early.
 * Returns 1 with *OUT filled, 0 when none came, or -1 when the connection
 * was lost (closed; the next publish connects again). */
int transport_wait(struct transport *t, int ms, struct transport_control *out);

/* Ack (ACK) or reject without requeue control message TAG. */
void transport_settle(struct transport *t, uint64_t tag, bool ack);

/* Async-signal-safe: end the connect or publish in progress (and every
 * later one) with TRANSPORT_INTERRUPTED, by shutting its socket down. */
void transport_abort_from_signal(void);
