/* listener.h -- the endpoints guests connect to: TCP, AF_VSOCK, and per-VM
 * Unix sockets (whose path names the VM), including Firecracker's
 * "<uds_path>_<port>". Non-blocking listening sockets. */
#pragma once

#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "config.h"

struct listener {
	const struct listener_config *cfg;
	int fd;
	uint64_t accepted, refused;
	uint64_t accept_errors;	    /* EMFILE and the like, each pausing it */
	uint64_t paused_until_ms;   /* out of the epoll set until then; 0: not paused */
	uint64_t last_error_log_ms; /* accept errors are logged at most every 10 s */
	uint64_t last_refusal_log_ms, refusals_unlogged; /* refusals: a line a second */
	dev_t sock_dev;		    /* unix, firecracker: the socket file bound, */
	ino_t sock_ino;		    /* removed at close only if still there */
	char name[128]; /* "tcp 127.0.0.1:5672", "vsock port 5672", "unix /run/vm1.sock" */
};

/* Bind and listen. Errors name the endpoint in ERR. Returns 0 or -errno.
 * A Unix socket path that something is listening on is never replaced
 * (-EADDRINUSE); a dead socket file is; any other file is an error. A
 * missing directory is created with the listener's mode plus search
 * permission (0660: 0770) and its group. */
int listener_open(const struct listener_config *lc, struct listener *out, char *err,
		  size_t errlen);

/* Accept one connection: 0 with *FD (non-blocking, close-on-exec) and the
 * peer's address, -EAGAIN when none is waiting, or -errno. */
int listener_accept(struct listener *l, int *fd, struct sockaddr_storage *peer, socklen_t *len);

/* Close, and unlink a Unix socket path if it is still the file bound.
 * Accepts an unopened listener. */
void listener_close(struct listener *l);

/* "127.0.0.1:4242", "vsock cid 5 port 1025" or "unix" for logs. */
const char *listener_peer_str(const struct sockaddr_storage *sa, socklen_t len, char *buf,
			      size_t buflen);
