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

/* Async-signal-safe: end the connect or publish in progress (and every
 * later one) with TRANSPORT_INTERRUPTED, by shutting its socket down. */
void transport_abort_from_signal(void);
