/* transport.h -- the agent's way to the host: an AMQP connection over
 * vsock (rabbitmq-c given a connected AF_VSOCK socket) or TCP (optionally
 * TLS, optionally from a given source address), publishing one message at a
 * time in confirm mode and waiting for its confirm. */
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
};

struct transport;

/* Check O->endpoint; ERR says what is wrong. */
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
