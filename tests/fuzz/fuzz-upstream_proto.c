/* fuzz-upstream_proto.c -- libFuzzer harness for the upstream link's
 * protocol engine: the input is what a broker sends, after one control
 * byte. It is fed in chunks whose sizes come from the input, the engine
 * publishes whenever it is ready (so confirms can name real tags), output
 * is drained or left to pile up, and time passes so heartbeat checks run.
 * Whatever the bytes, the engine must not crash, leak or report a confirm
 * for a tag it never gave out. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "upstream_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct harness {
	struct upstream_proto *p;
		unsigned confirms;
	unsigned answered; /* inbox cookies answered, as bits */
	bool asked;
};

static void on_ready(void *ud)
{
	(void)ud;
}

static void on_confirm(void *ud, uint64_t tag, bool multiple, bool ack)
{
	struct harness *h = ud;

	(void)multiple;
	(void)ack;
	if (tag == 0 || tag > h->p->next_tag)
		abort(); /* the engine let through a tag it never gave out */
	h->confirms++;
}

static void on_flow(void *ud, bool blocked, const char *reason)
{
	(void)ud;
	if (blocked && !reason)
		abort();
}

/* Inbox requests carry cookies 1 .. 4; each is answered once. */
static void on_inbox_reply(void *ud, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
			   uint16_t code, const char *text, uint32_t count, uint32_t consumers)
{
	struct harness *h = ud;

	(void)kind;
	(void)ok;
	(void)code;
	(void)text;
	(void)count;
	(void)consumers;
	if (cookie == 0 || cookie > 4 || (h->answered & (1u << cookie)))
		abort();
	h->answered |= 1u << cookie;
}

static void on_inbox_deliver(void *ud, const struct upstream_proto_delivery *d)
{
	struct harness *h = ud;

	if (d->body.len > 4096 || (d->body.len && !d->body.bytes))
		abort();
	upstream_proto_inbox_settle(h->p, d->gen, d->delivery_tag, UPSTREAM_ACK, false);
}

static void on_inbox_got(void *ud, uint64_t cookie, const struct upstream_proto_delivery *d,
			 uint32_t count)
{
	(void)count;
	on_inbox_reply(ud, cookie, UPSTREAM_INBOX_GET, true, 0, NULL, 0, 0);
	on_inbox_deliver(ud, d);
}

static const struct upstream_proto_ops ops = {
	.ready = on_ready,
	.confirm = on_confirm,
	.flow = on_flow,
	.inbox_reply = on_inbox_reply,
	.inbox_deliver = on_inbox_deliver,
	.inbox_got = on_inbox_got,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint8_t props[] = { 0x90, 0x00, 4, 't', 'e', 'x', 't', 2 };
	struct upstream_proto_config cfg = {
		.vhost = "/", .user = "u", .password = "p", .heartbeat = 5,
		.connection_name = "fuzz", .product = "vmproxyd", .exchange = "x",
				.max_output = 1u << 16, .max_delivery = 4096,
	};
	struct upstream_proto p;
	struct harness h = { &p, 0 };
	uint64_t now = 1000;
	uint8_t ctl;
	size_t off = 1;

	if (size < 1)
		return 0;
	ctl = data[0];
	cfg.mechanism = (ctl & 1) ? BROKER_AUTH_EXTERNAL : BROKER_AUTH_PLAIN;
	if (upstream_proto_init(&p, &cfg, &ops, &h, now) < 0)
		return 0;
	while (off < size) {
		/* Chunk sizes from the bytes themselves: 1 .. 64, or the rest. */
		size_t chunk = (ctl & 2) ? (size_t)(data[off] % 64) + 1 : size - off;
		const void *out;

		if (chunk > size - off)
			chunk = size - off;
		if (upstream_proto_feed(&p, data + off, chunk, now) < 0)
			break;
		off += chunk;
				if (upstream_proto_ready(&p))
			for (int i = 0; i < 3; i++)
				upstream_proto_publish(&p, "rk", 2, false, props, sizeof(props), "body", 4);
		if (upstream_proto_ready(&p) && (ctl & 16) && !h.asked) {
			/* Open the inbox channel: declare, bind, consume, get. */
			h.asked = true;
			upstream_proto_inbox_declare(&p, "q", NULL, 1);
			upstream_proto_inbox_bind(&p, "q", "x", "k.#", 2);
			upstream_proto_inbox_consume(&p, "q", "vmproxyd.0.1", 5, 3);
			upstream_proto_inbox_get(&p, "q", 4);
		}
		if (!(ctl & 4) || (off & 1))
			upstream_proto_consumed(&p, upstream_proto_output(&p, &out), now);
		now += (ctl & 8) ? 3000 : 10;
		if (upstream_proto_tick(&p, now) == 0)
			break;
	}
		upstream_proto_inbox_abort(&p, "end");
	if (h.asked && h.answered != 0x1e)
		abort(); /* a request was never answered */
	upstream_proto_destroy(&p);
	return 0;
}
