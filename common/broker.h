/* broker.h -- the client side of a broker connection, shared by the proxy's
 * upstream links, the agent and the consumer: socket (TCP, TLS, or a given
 * fd), SASL login and client properties, with rabbitmq-c's errors turned
 * into text at this boundary. Blocking: never call it from a poll thread. */
#pragma once

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum broker_auth {
	BROKER_AUTH_PLAIN,
	BROKER_AUTH_EXTERNAL,
};

struct broker_opts {
	const char *host;	 /* name or address; also the TLS server name */
	uint16_t port;
	const char *vhost;	 /* "/" when NULL */
	bool tls;
	const char *ca;		 /* PEM file; required with tls (rabbitmq-c has no default CA) */
	const char *cert;	 /* client certificate PEM, optional */
	const char *key;	 /* its private key PEM, required with cert */
	bool verify_hostname;	 /* check the server certificate names host */
	enum broker_auth auth;
	const char *user;	 /* PLAIN; "guest" when NULL */
	const char *password;	 /* PLAIN; "guest" when NULL */
	uint16_t heartbeat;	 /* seconds, 0 disables */
	uint32_t frame_max;	 /* 0: 131072 */
	uint16_t channel_max;	 /* 0: 16 */
	const char *connection_name;
	const char *product;	 /* client property "product" */
	int timeout_ms;		 /* connect, TLS handshake and login; 0: 10000 */
	int fd;			 /* >= 0: an already-connected socket to use (stolen), plain
				    AMQP over it; host is then only for messages */
};

/* Zero O and set fd = -1 and the defaults above. */
void broker_opts_init(struct broker_opts *o);

/* Connect and log in. On success *OUT is a connection with no channel open
 * and 0 is returned; on failure -errno-like code, a message in ERR, and
 * nothing to free (O->fd is closed in both cases when it was given). */
int broker_connect(const struct broker_opts *o, amqp_connection_state_t *out, char *err,
		   size_t errlen);

/* Open CHANNEL and, when CONFIRM, put it in confirm mode. Blocking RPC. */
int broker_channel_open(amqp_connection_state_t conn, amqp_channel_t channel, bool confirm,
			char *err, size_t errlen);

/* Describe an RPC reply ("server connection error 403: ACCESS_REFUSED - ..."). */
const char *broker_reply_describe(amqp_rpc_reply_t r, char *buf, size_t len);

/* Close politely (bounded by the rpc timeout) and destroy; accepts NULL. */
void broker_close(amqp_connection_state_t conn);
