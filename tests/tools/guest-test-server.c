/* guest-test-server.c -- a loopback AMQP 0-9-1 server made of nothing but
 * the guest session engine, for interoperability tests with real clients
 * (pika, amqp-tools): one guest_session per TCP connection on one epoll
 * loop; every confirmed publish is acked at once (nacked when its routing
 * key is "nack-me") and reported as one JSON line on stdout.
 *
 *     guest-test-server PORT
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "clock.h"
#include "guest_session.h"

#define MAX_CONNS   64
#define MAX_SETTLES 4096

struct settle {
	uint16_t ch;
	uint32_t gen;
	uint64_t tag;
	bool ack;
};

struct conn {
	int fd;
	unsigned id;
	bool out_armed;
	struct guest_session *s;
	struct guest_session_config cfg;
	struct settle settles[MAX_SETTLES];
	unsigned nsettles;
};

static const char *const allowed[] = {"metrics", NULL};
static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	stop = 1;
}

/* Print B as a JSON string (control and non-ASCII bytes escaped). */
static void json_str(const amqp_bytes_t b)
{
	const uint8_t *p = b.bytes;

	putchar('"');
	for (size_t i = 0; i < b.len; i++) {
		if (p[i] == '"' || p[i] == '\\')
			printf("\\%c", p[i]);
		else if (p[i] < 0x20 || p[i] > 0x7e)
			printf("\\u%04x", p[i]);
		else
			putchar(p[i]);
	}
	putchar('"');
}

static void on_event(void *ud, const struct guest_event *ev)
{
	struct conn *c = ud;
	const struct guest_publish *p = &ev->publish;
	bool nack;

	switch (ev->type) {
	case GUEST_EVENT_OPENED:
		printf("{\"event\": \"opened\", \"conn\": %u, \"user\": ", c->id);
		json_str(amqp_cstring_bytes(guest_session_user(c->s)));
		printf("}\n");
		break;
	case GUEST_EVENT_PUBLISH:
		nack = p->routing_key.len == 7 && memcmp(p->routing_key.bytes, "nack-me", 7) == 0;
		printf("{\"event\": \"publish\", \"conn\": %u, \"channel\": %u, \"exchange\": ",
		       c->id, p->channel);
		json_str(p->exchange);
		printf(", \"routing_key\": ");
		json_str(p->routing_key);
		printf(", \"body_len\": %zu, \"delivery_tag\": %llu, \"confirm\": %s, \"settle\": "
		       "\"%s\"}\n",
		       p->body_len, (unsigned long long)p->delivery_tag,
		       p->confirm ? "true" : "false",
		       !p->confirm ? "none"
		       : nack      ? "nack"
		                   : "ack");
		free(p->body);
		/* Settled after the feed returns, never inside the callback. */
		if (p->confirm && c->nsettles < MAX_SETTLES)
			c->settles[c->nsettles++] =
			        (struct settle){p->channel, p->channel_gen, p->delivery_tag, !nack};
		break;
	case GUEST_EVENT_DECLARE:
	case GUEST_EVENT_CONSUME:
	case GUEST_EVENT_CANCEL:
	case GUEST_EVENT_SETTLE:
	case GUEST_EVENT_GET:
		break; /* no inbox is configured here: never sent */
	case GUEST_EVENT_CHANNEL_CLOSED:
		printf("{\"event\": \"channel_closed\", \"conn\": %u, \"channel\": %u}\n", c->id,
		       ev->channel);
		break;
	case GUEST_EVENT_CLOSED:
		printf("{\"event\": \"closed\", \"conn\": %u, \"reply_code\": %u, \"text\": ",
		       c->id, ev->reply_code);
		json_str(amqp_cstring_bytes(ev->text ? ev->text : ""));
		printf("}\n");
		break;
	}
	fflush(stdout);
}

static void conn_free(int ep, struct conn *c)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	guest_session_free(c->s);
	free(c);
}

/* Settle, write what can be written, and rearm epoll. False when the
 * connection is finished. */
static bool conn_pump(int ep, struct conn *c)
{
	const void *out;
	size_t n;
	struct epoll_event e;

	for (unsigned i = 0; i < c->nsettles; i++)
		guest_session_settle(c->s, c->settles[i].ch, c->settles[i].gen, c->settles[i].tag,
		                     c->settles[i].ack);
	c->nsettles = 0;
	while ((n = guest_session_output(c->s, &out)) > 0) {
		ssize_t w = send(c->fd, out, n, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (w < 0)
			return false;
		guest_session_output_consumed(c->s, (size_t)w, clock_mono_ms());
	}
	if (guest_session_done(c->s))
		return false;
	e.events = (guest_session_wants_read(c->s) ? EPOLLIN : 0) |
	           (guest_session_output(c->s, &out) ? EPOLLOUT : 0);
	e.data.ptr = c;
	epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
	return true;
}

static int listen_on(unsigned port)
{
	struct sockaddr_in a;
	int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 64) < 0) {
		int e = -errno;
		close(fd);
		return e;
	}
	return fd;
}

int main(int argc, char **argv)
{
	struct conn *conns[MAX_CONNS] = {0};
	unsigned next_id = 1, port;
	int ep, lfd;
	struct epoll_event e;

	if (argc != 2 || (port = (unsigned)strtoul(argv[1], NULL, 10)) == 0 || port > 65535) {
		fprintf(stderr, "usage: guest-test-server PORT\n");
		return 2;
	}
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	lfd = listen_on(port);
	if (lfd < 0) {
		fprintf(stderr, "guest-test-server: cannot listen on 127.0.0.1:%u: %s\n", port,
		        strerror(-lfd));
		return 1;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	e.events = EPOLLIN;
	e.data.ptr = NULL;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &e);
	printf("{\"event\": \"listening\", \"port\": %u}\n", port);
	fflush(stdout);

	while (!stop) {
		struct epoll_event evs[16];
		uint64_t now = clock_mono_ms(), next = now + 1000;
		int n, timeout;

		for (int i = 0; i < MAX_CONNS; i++) {
			uint64_t d;

			if (!conns[i])
				continue;
			d = guest_session_tick(conns[i]->s, now);
			if (d < next)
				next = d;
			if (!conn_pump(ep, conns[i])) {
				conn_free(ep, conns[i]);
				conns[i] = NULL;
			}
		}
		timeout = next > now ? (int)(next - now) : 0;
		n = epoll_wait(ep, evs, 16, timeout);
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			int slot;

			if (!c) {
				int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

				if (fd < 0)
					continue;
				for (slot = 0; slot < MAX_CONNS && conns[slot]; slot++)
					;
				c = slot < MAX_CONNS ? calloc(1, sizeof(*c)) : NULL;
				if (!c) {
					close(fd);
					continue;
				}
				c->fd = fd;
				c->id = next_id++;
				guest_session_config_init(&c->cfg);
				c->cfg.allowed_exchanges = allowed;
				c->cfg.product = "vmproxy guest-test-server";
				c->cfg.on_event = on_event;
				c->s = guest_session_new(&c->cfg, c, clock_mono_ms());
				if (!c->s) {
					close(fd);
					free(c);
					continue;
				}
				e.events = EPOLLIN;
				e.data.ptr = c;
				epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
				conns[slot] = c;
				continue;
			}
			for (slot = 0; slot < MAX_CONNS && conns[slot] != c; slot++)
				;
			if (slot == MAX_CONNS)
				continue;
			if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
				uint8_t buf[65536];
				ssize_t r = recv(c->fd, buf, sizeof(buf), 0);

				if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
					if (!guest_session_done(c->s))
						printf("{\"event\": \"eof\", \"conn\": %u}\n",
						       c->id);
					fflush(stdout);
					conn_free(ep, c);
					conns[slot] = NULL;
					continue;
				}
				if (r > 0)
					guest_session_feed(c->s, buf, (size_t)r, clock_mono_ms());
			}
			if (!conn_pump(ep, c)) {
				conn_free(ep, c);
				conns[slot] = NULL;
			}
		}
	}
	for (int i = 0; i < MAX_CONNS; i++)
		if (conns[i])
			conn_free(ep, conns[i]);
	close(ep);
	close(lfd);
	return 0;
}
