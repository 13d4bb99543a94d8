/* guest_conn.c -- see guest_conn.h */
#include "guest_conn.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

int guest_conn_read(struct guest_conn *c, void *buf, size_t len, uint64_t now_ms)
{
	ssize_t n = recv(c->fd, buf, len, MSG_DONTWAIT);

	if (n < 0)
		return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? -EAGAIN : -errno;
	if (n == 0)
		return 0;
	c->bytes_in += (uint64_t)n;
	guest_session_feed(c->sess, buf, (size_t)n, now_ms);
	return (int)n;
}

int guest_conn_flush(struct guest_conn *c, uint64_t now_ms, uint64_t *writes)
{
	for (;;) {
		const void *data;
		size_t len = guest_session_output(c->sess, &data);
		ssize_t n;

		if (len == 0)
			return 0;
		(*writes)++;
		n = send(c->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return -EAGAIN;
			if (errno == EINTR)
				continue;
			return -errno;
		}
		c->bytes_out += (uint64_t)n;
		guest_session_output_consumed(c->sess, (size_t)n, now_ms);
	}
}
