/* guest_channel.c -- the guest engine's channels: open and close, the
 * publisher-confirm window and its acks, and the dispatch of methods on a
 * channel to the publish and inbox units. Part of the engine behind
 * guest_session.h. */
#include "guest_session_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct chan *gs_chan_find(struct guest_session *s, uint16_t id)
{
	for (uint16_t i = 0; i < s->nchans; i++)
		if (s->chans[i]->id == id)
			return s->chans[i];
	return NULL;
}

static struct chan *chan_new(struct guest_session *s, uint16_t id)
{
	struct chan *c;

	if (s->nchans == s->capchans) {
		uint16_t cap = s->capchans ? (uint16_t)(s->capchans * 2) : 2;
		struct chan **a = realloc(s->chans, cap * sizeof(*a));
		if (!a)
			return NULL;
		s->chans = a;
		s->capchans = cap;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->id = id;
	c->gen = ++s->next_gen;
	c->low = 1;
	s->chans[s->nchans++] = c;
	return c;
}

static void chan_emit_closed(struct guest_session *s, struct chan *c)
{
	struct guest_event ev;

	gs_chan_release(s, c);
	if (!s->cfg->on_event)
		return;
	memset(&ev, 0, sizeof(ev));
	ev.type = GUEST_EVENT_CHANNEL_CLOSED;
	ev.channel = c->id;
	ev.channel_gen = c->gen;
	s->cfg->on_event(s->ud, &ev);
}

void gs_chan_free(struct guest_session *s, struct chan *c)
{
	for (uint16_t i = 0; i < s->nchans; i++) {
		if (s->chans[i] == c) {
			s->chans[i] = s->chans[--s->nchans];
			break;
		}
	}
	free(c->win);
	free(c->meta);
	free(c->body);
	free(c->dl);
	free(c);
}

/* Room in the confirm window for tag next_tag + 1. */
bool gs_win_grow(struct guest_session *s, struct chan *c)
{
	uint64_t need = gs_chan_unconfirmed(c) + 1;
	uint32_t ncap;
	uint8_t *nw;

	if (need > (uint64_t)s->cfg->max_unconfirmed + UNCONFIRMED_SLACK)
		return false;
	if (need <= c->cap)
		return true;
	ncap = c->cap ? c->cap : 64;
	while (ncap < need)
		ncap *= 2;
	nw = calloc(ncap, 1);
	if (!nw)
		return false;
	for (uint64_t t = c->low; t <= c->next_tag; t++)
		nw[t % ncap] = c->win[t % c->cap];
	free(c->win);
	c->win = nw;
	c->cap = ncap;
	return true;
}

/* Send acks/nacks for settled tags from the bottom of the window, one
 * frame per run of equal outcomes; "multiple" only over settled tags. */
static void chan_flush_acks(struct guest_session *s, struct chan *c)
{
	while (c->low <= c->next_tag && c->win[c->low % c->cap] != 0) {
		uint8_t outcome = c->win[c->low % c->cap];
		uint64_t end = c->low;

		while (end + 1 <= c->next_tag && c->win[(end + 1) % c->cap] == outcome)
			end++;
		if (outcome == 1) {
			amqp_basic_ack_t a = { .delivery_tag = end, .multiple = end > c->low };
			gs_send_method(s, c->id, AMQP_BASIC_ACK_METHOD, &a);
		} else {
			amqp_basic_nack_t n = { .delivery_tag = end, .multiple = end > c->low,
						.requeue = 0 };
			gs_send_method(s, c->id, AMQP_BASIC_NACK_METHOD, &n);
		}
		for (uint64_t t = c->low; t <= end; t++)
			c->win[t % c->cap] = 0;
		c->low = end + 1;
	}
}

/* Settled tags are acked when the output is next taken (or before any
 * other frame), so the confirms of one loop iteration become as few
 * "multiple" acks as the tags allow. */
void gs_flush_due_acks(struct guest_session *s)
{
	if (!s->acks_due)
		return;
	s->acks_due = false;
	for (uint16_t i = 0; i < s->nchans; i++) {
		struct chan *c = s->chans[i];

		if (c->acks_due) {
			c->acks_due = false;
			chan_flush_acks(s, c);
		}
	}
}

static bool refused_method(amqp_method_number_t id)
{
	switch (id) {
	case AMQP_EXCHANGE_DELETE_METHOD:
	case AMQP_EXCHANGE_BIND_METHOD:
	case AMQP_EXCHANGE_UNBIND_METHOD:
	case AMQP_QUEUE_BIND_METHOD:
	case AMQP_QUEUE_PURGE_METHOD:
	case AMQP_QUEUE_DELETE_METHOD:
	case AMQP_QUEUE_UNBIND_METHOD:
		return true;
	}
	return false;
}

/* RabbitMQ's spelling of a method ("basic.recover-async") from
 * rabbitmq-c's constant name ("AMQP_BASIC_RECOVER_ASYNC_METHOD"). */
const char *gs_method_name_r(amqp_method_number_t id, char *buf, size_t size)
{
	const char *n = amqp_method_name(id);
	size_t len, o = 0;
	bool dot = false;

	if (!n || strncmp(n, "AMQP_", 5) != 0)
		return "unknown";
	n += 5;
	len = strlen(n);
	if (len > 7 && strcmp(n + len - 7, "_METHOD") == 0)
		len -= 7;
	for (size_t i = 0; i < len && o < size - 1; i++) {
		char c = n[i];
		if (c == '_') {
			c = dot ? '-' : '.';
			dot = true;
		} else if (c >= 'A' && c <= 'Z') {
			c = (char)(c - 'A' + 'a');
		}
		buf[o++] = c;
	}
	buf[o] = '\0';
	return buf;
}

/* The same in a per-thread buffer: one use per message. */
const char *gs_method_name(amqp_method_number_t id)
{
	static _Thread_local char buf[64];

	return gs_method_name_r(id, buf, sizeof(buf));
}

/* A method on channel C, which we are closing. Only the close handshake
 * matters now (RabbitMQ drops the rest). Closes that crossed: both sides
 * answer close-ok, and the channel waits for ours, as RabbitMQ does; but a
 * client that reopens the number instead is taken to be done with it: then
 * *CP is freed and set to NULL, and false says to go on with the open. */
static bool on_closing(struct guest_session *s, struct chan **cp, uint16_t ch,
		       amqp_method_number_t id)
{
	struct chan *c = *cp;

	switch (id) {
	case AMQP_CHANNEL_CLOSE_METHOD: {
		amqp_channel_close_ok_t ok = { 0 };
		gs_send_method(s, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		if (!c->crossed)
			chan_emit_closed(s, c);
		c->crossed = true;
		return true;
	}
	case AMQP_CHANNEL_CLOSE_OK_METHOD:
		if (!c->crossed)
			chan_emit_closed(s, c);
		gs_chan_free(s, c);
		return true;
	case AMQP_CHANNEL_OPEN_METHOD:
		if (!c->crossed)
			return true;
		gs_chan_free(s, c);
		*cp = NULL;
		return false;
	default:
		return true;
	}
}

static void on_channel_open(struct guest_session *s, struct chan *c, uint16_t ch,
			    amqp_method_number_t id)
{
	amqp_channel_open_ok_t ok;

	if (c) {
		gs_conn_error(s, 504, id, "second 'channel.open' seen");
		return;
	}
	if (ch > s->channel_max) {
		gs_conn_error(s, 530, id, "channel number %u above the negotiated channel_max (%u)",
			      ch, s->channel_max);
		return;
	}
	c = chan_new(s, ch);
	if (!c) {
		gs_conn_error(s, 541, id, "out of memory");
		return;
	}
	ok.channel_id = amqp_cstring_bytes("");
	gs_send_method(s, ch, AMQP_CHANNEL_OPEN_OK_METHOD, &ok);
}

static void on_flow(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		    const uint8_t *args, size_t len)
{
	amqp_channel_flow_t *m;
	amqp_bytes_t b = { len, (void *)args };

	if (amqp_decode_method(id, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 501, id, "cannot decode channel.flow");
		return;
	}
	amqp_channel_flow_ok_t ok = { .active = 1 };
	/* As RabbitMQ since 3.3: a client cannot stop the server. */
	if (!m->active) {
		gs_conn_error(s, 540, id, "active=false");
		return;
	}
	gs_send_method(s, c->id, AMQP_CHANNEL_FLOW_OK_METHOD, &ok);
}

static void on_confirm_select(struct guest_session *s, struct chan *c, amqp_method_number_t id,
			      const uint8_t *args, size_t len)
{
	amqp_confirm_select_t *m;
	amqp_bytes_t b = { len, (void *)args };

	if (amqp_decode_method(id, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 501, id, "cannot decode confirm.select");
		return;
	}
	c->confirm = true;
	if (!m->nowait) {
		amqp_confirm_select_ok_t ok = { 0 };
		gs_send_method(s, c->id, AMQP_CONFIRM_SELECT_OK_METHOD, &ok);
	}
}

/* basic.qos: the prefetch of the inbox consumers created after it. */
static void on_qos(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		   const uint8_t *args, size_t len)
{
	amqp_basic_qos_t *m;
	amqp_bytes_t b = { len, (void *)args };
	amqp_basic_qos_ok_t ok = { 0 };

	if (amqp_decode_method(id, &s->pool, b, (void **)&m) < 0) {
		gs_conn_error(s, 501, id, "cannot decode basic.qos");
		return;
	}
	if (m->prefetch_size != 0) {
		gs_conn_error(s, 540, id, "prefetch_size!=0 (%u)", m->prefetch_size);
		return;
	}
	c->prefetch = m->prefetch_count;
	gs_send_method(s, c->id, AMQP_BASIC_QOS_OK_METHOD, &ok);
}

/* Method ID on channel C of a running connection, no content pending. */
static void run_method(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		       const uint8_t *args, size_t len)
{
	uint16_t ch = c->id;

	switch (id) {
	case AMQP_CHANNEL_CLOSE_METHOD: {
		amqp_channel_close_ok_t ok = { 0 };
		gs_send_method(s, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
		chan_emit_closed(s, c);
		gs_chan_free(s, c);
		return;
	}
	case AMQP_CHANNEL_CLOSE_OK_METHOD:
		return;
	case AMQP_CHANNEL_FLOW_METHOD:
		on_flow(s, c, id, args, len);
		return;
	case AMQP_CONFIRM_SELECT_METHOD:
		on_confirm_select(s, c, id, args, len);
		return;
	case AMQP_BASIC_QOS_METHOD:
		on_qos(s, c, id, args, len);
		return;
	case AMQP_BASIC_PUBLISH_METHOD:
		gs_on_publish(s, c, args, len);
		return;
	case AMQP_EXCHANGE_DECLARE_METHOD:
		gs_on_exchange_declare(s, c, args, len);
		return;
	case AMQP_BASIC_ACK_METHOD:
	case AMQP_BASIC_NACK_METHOD:
	case AMQP_BASIC_REJECT_METHOD:
		gs_on_settle(s, c, id, args, len);
		return;
	case AMQP_QUEUE_DECLARE_METHOD:
		gs_on_queue_declare(s, c, args, len);
		return;
	case AMQP_BASIC_CONSUME_METHOD:
		gs_on_consume(s, c, args, len);
		return;
	case AMQP_BASIC_CANCEL_METHOD:
		gs_on_cancel(s, c, args, len);
		return;
	case AMQP_BASIC_GET_METHOD:
		gs_on_get(s, c, args, len);
		return;
	case AMQP_BASIC_RECOVER_METHOD:
	case AMQP_BASIC_RECOVER_ASYNC_METHOD:
		gs_on_recover(s, c, id, args, len);
		return;
	case AMQP_TX_SELECT_METHOD:
	case AMQP_TX_COMMIT_METHOD:
	case AMQP_TX_ROLLBACK_METHOD:
		gs_conn_error(s, 540, id, "%s not supported by this proxy", gs_method_name(id));
		return;
	}
	if (refused_method(id)) {
		gs_chan_error(s, c, 403, id, "%s is not permitted through this proxy: guests may "
					     "only publish", gs_method_name(id));
		return;
	}
	gs_conn_error(s, 540, id, "method %s (%u,%u) not implemented", gs_method_name(id), id >> 16,
		      id & 0xffff);
}

void gs_on_channel_method(struct guest_session *s, uint16_t ch, amqp_method_number_t id,
			  const uint8_t *args, size_t len)
{
	struct chan *c = gs_chan_find(s, ch);

	if (c && c->closing && on_closing(s, &c, ch, id))
		return;
	if (id == AMQP_CHANNEL_OPEN_METHOD) {
		on_channel_open(s, c, ch, id);
		return;
	}
	if (!c) {
		gs_conn_error(s, 504, id, "expected 'channel.open'");
		return;
	}
	if (c->pub == PUB_HEADER) {
		gs_conn_error(s, 505, id, "expected content header for class 60, got non content "
					  "header frame instead");
		return;
	}
	if (c->pub == PUB_BODY) {
		gs_conn_error(s, 505, id,
			      "expected content body, got non content body frame instead");
		return;
	}
	run_method(s, c, id, args, len);
}

int guest_session_settle(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			 uint64_t delivery_tag, bool ack)
{
	struct chan *c = gs_chan_find(s, channel);

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING)
		return 0;
	if (!c->confirm || delivery_tag < c->low || delivery_tag > c->next_tag ||
	    c->win[delivery_tag % c->cap] != 0)
		return -ENOENT;
	c->win[delivery_tag % c->cap] = ack ? 1 : 2;
	c->acks_due = true;
	s->acks_due = true;
	return 0;
}
