/* fuzz-guest_session.c -- libFuzzer harness for the guest-facing AMQP
 * engine: the input is what a guest sends, fed in chunks whose sizes come
 * from the input itself, with time passing, output drained or left to pile
 * up, and every confirmed publish settled (acked or nacked, in or out of
 * order) the way the proxy would. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "guest_session.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_PENDING 64

struct pending {
	uint16_t ch;
	uint32_t gen;
	uint64_t tag;
};

struct harness {
	struct pending p[MAX_PENDING];
	unsigned n;
	bool closed;
};

static void on_event(void *ud, const struct guest_event *ev)
{
	struct harness *h = ud;

	switch (ev->type) {
	case GUEST_EVENT_PUBLISH:
		/* Touch the body so that a bad length shows up under ASan. */
		if (ev->publish.body_len) {
			volatile uint8_t x = ((uint8_t *)ev->publish.body)[0];
			x ^= ((uint8_t *)ev->publish.body)[ev->publish.body_len - 1];
			(void)x;
		}
		free(ev->publish.body);
		if (ev->publish.confirm && h->n < MAX_PENDING)
			h->p[h->n++] =
			        (struct pending){ev->publish.channel, ev->publish.channel_gen,
			                         ev->publish.delivery_tag};
		break;
	case GUEST_EVENT_CLOSED:
		h->closed = true;
		break;
	default:
		break;
	}
}

static int auth(void *ud, const char *mech, const char *user)
{
	return strcmp(user, "refused") == 0 ? -1 : 0;
}

/* Settle what was announced: reversed when R is odd, every fifth nacked. */
static void settle_all(struct guest_session *s, struct harness *h, uint8_t r)
{
	for (unsigned i = 0; i < h->n; i++) {
		struct pending *p = &h->p[(r & 1) ? h->n - 1 - i : i];

		guest_session_settle(s, p->ch, p->gen, p->tag, p->tag % 5 != 0);
	}
	h->n = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char *const allowed[] = {"metrics", "amq.topic", NULL};
	struct guest_session_config cfg;
	struct guest_session *s;
	struct harness h;
	uint64_t now = 5000;
	size_t off = 0;
	unsigned round = 0;

	memset(&h, 0, sizeof(h));
	guest_session_config_init(&cfg);
	cfg.channel_max = 8;
	cfg.max_message_bytes = 8192;
	cfg.max_output_bytes = 16384;
	cfg.max_unconfirmed = 32;
	cfg.allowed_exchanges = allowed;
	cfg.vhost = (size && (data[0] & 0x80)) ? "vmproxy" : NULL;
	cfg.auth = auth;
	cfg.on_event = on_event;
	s = guest_session_new(&cfg, &h, now);
	if (!s)
		return 0;
	while (off < size && !guest_session_done(s)) {
		/* The chunk length comes from the byte at the split point; all
		 * bytes are still fed, so valid sessions stay valid. */
		uint8_t k = data[off];
		size_t n = (size_t)(k % 97) + 1;
		const void *out;
		size_t pending;

		if (n > size - off)
			n = size - off;
		guest_session_feed(s, data + off, n, now);
		off += n;
		settle_all(s, &h, k);
		if (k % 7 == 3)
			guest_session_set_blocked(s, (k & 0x10) != 0, "memory");
		pending = guest_session_output(s, &out);
		/* Let output pile up now and then: the guest that does not read. */
		if (k % 11 != 5)
			guest_session_output_consumed(s, k % 13 == 0 ? pending / 2 : pending, now);
		/* Mostly a few ms per chunk, so that sessions get through the
		 * handshake; now and then 30 s, so heartbeats fire and time out. */
		now += (uint64_t)(k & 0x07) * 20;
		if (k >= 0xf0)
			now += 30000;
		guest_session_tick(s, now);
		(void)guest_session_wants_read(s);
		(void)guest_session_user(s);
		if (++round == 400 && !h.closed)
			guest_session_close(s, 320, "CONNECTION_FORCED - fuzz");
	}
	/* The end of the input: time runs out. */
	settle_all(s, &h, 0);
	guest_session_tick(s, now + 600000);
	guest_session_free(s);
	return 0;
}
