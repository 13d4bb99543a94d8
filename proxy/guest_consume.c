/* guest_consume.c -- the guest engine's side of the per-VM inbox: queue
 * declare, consumers (consume, cancel, deliver), basic.get, the guest's
 * acks, nacks and rejects, and recover. The owner answers through the
 * guest_session_*_ok calls. Part of the engine behind guest_session.h. */
#include "guest_session_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"

/* EV as an event of TYPE on channel CH of generation GEN. */
static void event_init(struct guest_event *ev, enum guest_event_type type, uint16_t ch,
		       uint32_t gen)
{
	memset(ev, 0, sizeof(*ev));
	ev->type = type;
	ev->channel = ch;
	ev->channel_gen = gen;
}

/* C waits for the inbox's answer to METHOD (a guest request that the
 * broker answers); EV is the event that asks for it. */
static void chan_request(struct chan *c, amqp_method_number_t method, bool nowait,
			 enum guest_event_type type, struct guest_event *ev)
{
	c->pending = method;
	c->pending_nowait = nowait;
	event_init(ev, type, c->id, c->gen);
}

static void cons_remove(struct guest_session *s, uint16_t i)
{
	struct guest_event ev;

	event_init(&ev, GUEST_EVENT_CANCEL, s->cons[i].ch, s->cons[i].gen);
	ev.consumer_id = s->cons[i].id;
	s->cons[i] = s->cons[--s->ncons];
	gs_emit(s, &ev);
}

static void emit_settle(struct guest_session *s, struct chan *c, const struct dlv *d,
			enum guest_settle_kind kind, bool requeue)
{
	struct guest_event ev;

	event_init(&ev, GUEST_EVENT_SETTLE, c->id, c->gen);
	ev.settle.kind = kind;
	ev.settle.requeue = requeue;
	ev.settle.consumer_id = d->cid;
	ev.settle.up_tag = d->up_tag;
	ev.settle.up_gen = d->up_gen;
	gs_emit(s, &ev);
}

/* Give back what the inbox handed this channel: its deliveries (requeued)
 * and its consumers. */
void gs_chan_release(struct guest_session *s, struct chan *c)
{
	uint32_t n = c->ndl;

	c->ndl = 0;
	for (uint32_t i = 0; i < n; i++)
		emit_settle(s, c, &c->dl[i], GUEST_SETTLE_RELEASE, true);
	for (uint16_t i = s->ncons; i-- > 0;)
		if (s->cons[i].ch == c->id && s->cons[i].gen == c->gen)
			cons_remove(s, i);
}

static bool is_inbox(const struct guest_session *s, const struct chan *c, amqp_bytes_t q,
		     bool empty_ok)
{
	const char *n = s->cfg->inbox_name;

	if (!n)
		return false;
	if (q.len == 0)
		return empty_ok && c->declared;
	return q.len == strlen(n) && memcmp(q.bytes, n, q.len) == 0;
}

static void refuse_queue(struct guest_session *s, struct chan *c, amqp_method_number_t id,
			 amqp_bytes_t q)
{
	if (!s->cfg->inbox_name) {
		gs_chan_error(s, c, 403, id, "%s is not permitted through this proxy: guests may "
					     "only publish", gs_method_name(id));
		return;
	}
	gs_chan_error(s, c, 403, id, "access to queue '%.*s' in vhost '%s' refused for user '%s'",
		      (int)(q.len > 64 ? 64 : q.len), (const char *)q.bytes,
		      s->cfg->vhost ? s->cfg->vhost : "/", s->user);
}

/* Depth-check the table at the end of ARGS, after SKIP short strings that
 * follow the reserved u16 and before the bits octet; then decode. */
static void *decode_with_table(struct guest_session *s, amqp_method_number_t id,
			       const uint8_t *args, size_t len, int strs)
{
	size_t off = 2, n;
	void *m;
	int r;

	for (int i = 0; i < strs; i++) {
		if (off > len || amqp_frame_skip_shortstr(args + off, len - off, &n) < 0) {
			gs_conn_error(s, 501, id, "cannot decode %s", gs_method_name(id));
			return NULL;
		}
		off += n;
	}
	if (++off > len) {
		gs_conn_error(s, 501, id, "cannot decode %s", gs_method_name(id));
		return NULL;
	}
	r = amqp_frame_check_table_prefixed(args + off, len - off, s->cfg->max_table_depth, &n);
	if (r < 0 || amqp_decode_method(id, &s->pool, (amqp_bytes_t){ len, (void *)args }, &m) < 0) {
		gs_conn_error(s, 502, id,
			      r == -ELOOP ? "arguments nested too deep" : "malformed %s",
			      gs_method_name(id));
		return NULL;
	}
	return m;
}

/* One inbox request at a time per channel: the answer comes from the
 * broker, and later requests would have to wait behind it. */
static bool check_not_pending(struct guest_session *s, struct chan *c, amqp_method_number_t id)
{
	if (!c->pending)
		return true;
	gs_conn_error(s, 503, id,
		      "%s while %s on channel %u is still unanswered: wait for its reply",
		      gs_method_name(id), gs_method_name_r(c->pending, (char[64]){ 0 }, 64), c->id);
	return false;
}

void gs_on_queue_declare(struct guest_session *s, struct chan *c, const uint8_t *args,
			 size_t len)
{
	amqp_queue_declare_t *m = decode_with_table(s, AMQP_QUEUE_DECLARE_METHOD, args, len, 1);
	struct guest_event ev;

	if (!m)
		return;
	if (!is_inbox(s, c, m->queue, false)) {
		refuse_queue(s, c, AMQP_QUEUE_DECLARE_METHOD, m->queue);
		return;
	}
	if (!check_not_pending(s, c, AMQP_QUEUE_DECLARE_METHOD))
		return;
	chan_request(c, AMQP_QUEUE_DECLARE_METHOD, m->nowait, GUEST_EVENT_DECLARE, &ev);
	ev.passive = m->passive;
	gs_emit(s, &ev);
}

void gs_on_get(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_get_t *m;
	struct guest_event ev;

	if (amqp_decode_method(AMQP_BASIC_GET_METHOD, &s->pool, (amqp_bytes_t){ len, (void *)args },
			       (void **)&m) < 0) {
		gs_conn_error(s, 501, AMQP_BASIC_GET_METHOD, "cannot decode basic.get");
		return;
	}
	if (!is_inbox(s, c, m->queue, true)) {
		refuse_queue(s, c, AMQP_BASIC_GET_METHOD, m->queue);
		return;
	}
	if (!check_not_pending(s, c, AMQP_BASIC_GET_METHOD))
		return;
	if (!m->no_ack && c->ndl >= s->cfg->max_unacked) {
		gs_chan_error(s, c, 406, AMQP_BASIC_GET_METHOD,
			      "more than %u unacknowledged deliveries on channel %u",
			      s->cfg->max_unacked, c->id);
		return;
	}
	chan_request(c, AMQP_BASIC_GET_METHOD, false, GUEST_EVENT_GET, &ev);
	c->get_no_ack = m->no_ack;
	ev.no_ack = m->no_ack;
	gs_emit(s, &ev);
}

/* basic.recover(-async) with requeue: the channel's unsettled deliveries
 * go back to the queue (RELEASE events) and are delivered again, marked
 * redelivered, as RabbitMQ does; requeue=false is not supported there
 * either. */
void gs_on_recover(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		   const uint8_t *args, size_t len)
{
	bool requeue = len >= 1 && (args[0] & 1);
	uint32_t n = c->ndl;

	if (len < 1) {
		gs_conn_error(s, 501, id, "cannot decode %s", gs_method_name(id));
		return;
	}
	if (!requeue) {
		gs_conn_error(s, 540, id, "requeue=false");
		return;
	}
	c->ndl = 0;
	for (uint32_t i = 0; i < n; i++)
		emit_settle(s, c, &c->dl[i], GUEST_SETTLE_RELEASE, true);
	if (id == AMQP_BASIC_RECOVER_METHOD) {
		amqp_basic_recover_ok_t ok = { 0 };
		gs_send_method(s, c->id, AMQP_BASIC_RECOVER_OK_METHOD, &ok);
	}
}

static struct consumer *cons_by_tag(struct guest_session *s, amqp_bytes_t tag)
{
	for (uint16_t i = 0; i < s->ncons; i++)
		if (s->cons[i].tag_len == tag.len && memcmp(s->cons[i].tag, tag.bytes, tag.len) == 0)
			return &s->cons[i];
	return NULL;
}

static struct consumer *cons_by_id(struct guest_session *s, uint32_t id, uint16_t *index)
{
	for (uint16_t i = 0; i < s->ncons; i++) {
		if (s->cons[i].id == id) {
			if (index)
				*index = i;
			return &s->cons[i];
		}
	}
	return NULL;
}

void gs_on_consume(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_consume_t *m = decode_with_table(s, AMQP_BASIC_CONSUME_METHOD, args, len, 2);
	struct guest_event ev;
	struct consumer *k;

	if (!m)
		return;
	if (!is_inbox(s, c, m->queue, true)) {
		refuse_queue(s, c, AMQP_BASIC_CONSUME_METHOD, m->queue);
		return;
	}
	if (!check_not_pending(s, c, AMQP_BASIC_CONSUME_METHOD))
		return;
	if (m->consumer_tag.len && cons_by_tag(s, m->consumer_tag)) {
		gs_conn_error(s, 530, AMQP_BASIC_CONSUME_METHOD,
			      "attempt to reuse consumer tag '%.*s'",
			      (int)(m->consumer_tag.len > 64 ? 64 : m->consumer_tag.len),
			      (const char *)m->consumer_tag.bytes);
		return;
	}
	if (s->ncons >= s->cfg->max_consumers) {
		gs_chan_error(s, c, 406, AMQP_BASIC_CONSUME_METHOD,
			      "more than %u consumers on this connection", s->cfg->max_consumers);
		return;
	}
	if (s->ncons == s->capcons) {
		uint16_t cap = s->capcons ? (uint16_t)(s->capcons * 2) : 2;
		struct consumer *a = realloc(s->cons, cap * sizeof(*a));
		if (!a) {
			gs_conn_error(s, 541, AMQP_BASIC_CONSUME_METHOD, "out of memory");
			return;
		}
		s->cons = a;
		s->capcons = cap;
	}
	k = &s->cons[s->ncons++];
	memset(k, 0, sizeof(*k));
	k->id = ++s->next_cid;
	k->ch = c->id;
	k->gen = c->gen;
		k->no_ack = m->no_ack;
	k->prefetch = c->prefetch;
	if (m->consumer_tag.len) {
		k->tag_len = (uint8_t)m->consumer_tag.len;
		memcpy(k->tag, m->consumer_tag.bytes, m->consumer_tag.len);
	} else {
		k->tag_len = (uint8_t)snprintf(k->tag, sizeof(k->tag), "amq.ctag-vmproxy-%u", k->id);
	}
	chan_request(c, AMQP_BASIC_CONSUME_METHOD, m->nowait, GUEST_EVENT_CONSUME, &ev);
	ev.consumer_id = k->id;
	ev.prefetch = c->prefetch;
	ev.no_ack = m->no_ack;
	gs_emit(s, &ev);
}

void gs_on_cancel(struct guest_session *s, struct chan *c, const uint8_t *args, size_t len)
{
	amqp_basic_cancel_t *m;
	struct consumer *k;
	uint8_t tag[256];
	size_t tag_len;
	bool nowait;

	if (amqp_decode_method(AMQP_BASIC_CANCEL_METHOD, &s->pool, (amqp_bytes_t){ len, (void *)args },
			       (void **)&m) < 0) {
		gs_conn_error(s, 501, AMQP_BASIC_CANCEL_METHOD, "cannot decode basic.cancel");
		return;
	}
	tag_len = m->consumer_tag.len > 255 ? 255 : m->consumer_tag.len;
	if (tag_len)
		memcpy(tag, m->consumer_tag.bytes, tag_len);
	nowait = m->nowait;
	k = cons_by_tag(s, (amqp_bytes_t){ tag_len, tag });
	if (k && k->ch == c->id && k->gen == c->gen) {
		if (!k->ready) {
			gs_conn_error(s, 503, AMQP_BASIC_CANCEL_METHOD,
				      "basic.cancel before the consumer's basic.consume-ok");
			return;
		}
		cons_remove(s, (uint16_t)(k - s->cons));
	}
	/* As RabbitMQ: an unknown tag is cancelled all the same. */
	if (!nowait) {
		amqp_basic_cancel_ok_t ok = { .consumer_tag = { tag_len, tag } };
		gs_send_method(s, c->id, AMQP_BASIC_CANCEL_OK_METHOD, &ok);
	}
}

/* Index of the delivery with TAG in C's list, or -1. */
static int64_t dlv_find(const struct chan *c, uint64_t tag)
{
	uint32_t lo = 0, hi = c->ndl;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		if (c->dl[mid].tag < tag)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < c->ndl && c->dl[lo].tag == tag ? (int64_t)lo : -1;
}

void gs_on_settle(struct guest_session *s, struct chan *c, amqp_method_number_t id,
		  const uint8_t *args, size_t len)
{
	enum guest_settle_kind kind = GUEST_SETTLE_ACK;
	uint64_t tag;
	bool multiple = false, requeue = false;
	uint32_t from, to;
	void *m;

	if (amqp_decode_method(id, &s->pool, (amqp_bytes_t){ len, (void *)args }, &m) < 0) {
		gs_conn_error(s, 501, id, "cannot decode %s", gs_method_name(id));
		return;
	}
	if (id == AMQP_BASIC_ACK_METHOD) {
		tag = ((amqp_basic_ack_t *)m)->delivery_tag;
		multiple = ((amqp_basic_ack_t *)m)->multiple;
	} else if (id == AMQP_BASIC_NACK_METHOD) {
		kind = GUEST_SETTLE_NACK;
		tag = ((amqp_basic_nack_t *)m)->delivery_tag;
		multiple = ((amqp_basic_nack_t *)m)->multiple;
		requeue = ((amqp_basic_nack_t *)m)->requeue;
	} else {
		kind = GUEST_SETTLE_REJECT;
		tag = ((amqp_basic_reject_t *)m)->delivery_tag;
		requeue = ((amqp_basic_reject_t *)m)->requeue;
	}
	if (multiple && tag == 0) {
		from = 0;
		to = c->ndl; /* everything outstanding */
	} else {
		int64_t i = dlv_find(c, tag);
		if (i < 0) {
			gs_chan_error(s, c, 406, id, "unknown delivery tag %llu",
				      (unsigned long long)tag);
			return;
		}
		from = multiple ? 0 : (uint32_t)i;
		to = (uint32_t)i + 1;
	}
	for (uint32_t i = from; i < to; i++)
		emit_settle(s, c, &c->dl[i], kind, requeue);
	memmove(c->dl + from, c->dl + to, (c->ndl - to) * sizeof(*c->dl));
	c->ndl -= to - from;
	if (c->capdl > 64 && c->ndl == 0) {
		free(c->dl);
		c->dl = NULL;
		c->capdl = 0;
	}
}

static struct chan *answer_chan(struct guest_session *s, uint16_t channel, uint32_t gen,
				amqp_method_number_t want)
{
	struct chan *c = gs_chan_find(s, channel);

	if (!c || c->gen != gen || c->closing || s->st != ST_RUNNING || c->pending != want)
		return NULL;
	c->pending = 0;
	return c;
}

void guest_session_declare_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t count, uint32_t consumers)
{
	struct chan *c = answer_chan(s, channel, channel_gen, AMQP_QUEUE_DECLARE_METHOD);

	if (!c)
		return;
	c->declared = true;
	if (!c->pending_nowait) {
		amqp_queue_declare_ok_t ok = { .queue = amqp_cstring_bytes(s->cfg->inbox_name),
					       .message_count = count,
					       .consumer_count = consumers };
		gs_send_method(s, c->id, AMQP_QUEUE_DECLARE_OK_METHOD, &ok);
	}
}

void guest_session_consume_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t consumer_id)
{
	struct chan *c = answer_chan(s, channel, channel_gen, AMQP_BASIC_CONSUME_METHOD);
	struct consumer *k = cons_by_id(s, consumer_id, NULL);

	if (!c || !k)
		return;
	k->ready = true;
	if (!c->pending_nowait) {
		amqp_basic_consume_ok_t ok = { .consumer_tag = { k->tag_len, k->tag } };
		gs_send_method(s, c->id, AMQP_BASIC_CONSUME_OK_METHOD, &ok);
	}
}

void guest_session_fail(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			uint16_t code, const char *text)
{
	struct chan *c = gs_chan_find(s, channel);
	amqp_method_number_t id;
	const char *name = gs_code_name(code);
	size_t n = strlen(name);

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING || !c->pending)
		return;
	id = c->pending;
	c->pending = 0;
	if (!text)
		text = "";
	/* The broker's text already starts with the code's name. */
	if (strncmp(text, name, n) == 0 && strncmp(text + n, " - ", 3) == 0)
		text += n + 3;
	gs_chan_error(s, c, code, id, "%s", text);
}

void guest_session_cancel_consumer(struct guest_session *s, uint32_t consumer_id, const char *why)
{
	uint16_t i;
	struct consumer *k = cons_by_id(s, consumer_id, &i);
	struct chan *c;

	if (!k || s->st != ST_RUNNING)
		return;
	c = gs_chan_find(s, k->ch);
	if (!c || c->gen != k->gen || c->closing)
		return;
	if (!k->ready) {
		/* Its basic.consume is still unanswered: that answer fails. */
		c->pending = AMQP_BASIC_CONSUME_METHOD;
		guest_session_fail(s, c->id, c->gen, 506, why);
		return;
	}
	if (!s->cap_cancel_notify) {
		gs_chan_error(s, c, 506, AMQP_BASIC_CONSUME_METHOD, "%s", why);
		return;
	}
	amqp_basic_cancel_t m = { .consumer_tag = { k->tag_len, k->tag }, .nowait = 1 };
	gs_send_method(s, c->id, AMQP_BASIC_CANCEL_METHOD, &m);
	cons_remove(s, i);
}

int64_t guest_session_get_ok(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			     bool redelivered, amqp_bytes_t exchange, amqp_bytes_t routing_key,
			     uint32_t count, amqp_bytes_t properties, amqp_bytes_t body,
			     uint64_t up_tag, uint32_t up_gen)
{
	struct chan *c = gs_chan_find(s, channel);
	amqp_basic_get_ok_t g;

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING ||
	    c->pending != AMQP_BASIC_GET_METHOD)
		return -ENOENT;
	if (12 + properties.len > s->frame_max - 8 || exchange.len > 255 || routing_key.len > 255)
		return -EMSGSIZE;
	if (!c->get_no_ack && c->ndl == c->capdl) {
		uint32_t cap = c->capdl ? c->capdl * 2 : 16;
		struct dlv *a = realloc(c->dl, cap * sizeof(*a));
		if (!a)
			return -ENOENT;
		c->dl = a;
		c->capdl = cap;
	}
	c->pending = 0;
	g.delivery_tag = ++c->dnext;
	g.redelivered = redelivered;
	g.exchange = exchange;
	g.routing_key = routing_key;
	g.message_count = count;
	gs_send_method(s, channel, AMQP_BASIC_GET_OK_METHOD, &g);
	gs_send_content(s, channel, properties, body);
	if (!c->get_no_ack)
		c->dl[c->ndl++] = (struct dlv){ .tag = c->dnext, .up_tag = up_tag, .up_gen = up_gen };
	return (int64_t)c->dnext;
}

void guest_session_get_empty(struct guest_session *s, uint16_t channel, uint32_t channel_gen)
{
	struct chan *c = answer_chan(s, channel, channel_gen, AMQP_BASIC_GET_METHOD);
	amqp_basic_get_empty_t e = { .cluster_id = amqp_empty_bytes };

	if (c)
		gs_send_method(s, c->id, AMQP_BASIC_GET_EMPTY_METHOD, &e);
}

int64_t guest_session_deliver(struct guest_session *s, uint16_t channel, uint32_t channel_gen,
			      uint32_t consumer_id, bool redelivered, amqp_bytes_t exchange,
			      amqp_bytes_t routing_key, amqp_bytes_t properties, amqp_bytes_t body,
			      uint64_t up_tag, uint32_t up_gen)
{
	struct chan *c = gs_chan_find(s, channel);
	struct consumer *k = cons_by_id(s, consumer_id, NULL);
	amqp_basic_deliver_t d;

	if (!c || c->gen != channel_gen || c->closing || s->st != ST_RUNNING || !k || !k->ready ||
	    k->ch != channel || k->gen != channel_gen)
		return -ENOENT;
	if (12 + properties.len > s->frame_max - 8 || exchange.len > 255 || routing_key.len > 255)
		return -EMSGSIZE;
	if (!k->no_ack) {
		if (c->ndl >= s->cfg->max_unacked)
			return -ENOSPC;
		if (c->ndl == c->capdl) {
			uint32_t cap = c->capdl ? c->capdl * 2 : 16;
			struct dlv *a = realloc(c->dl, cap * sizeof(*a));
			if (!a)
				return -ENOSPC;
			c->dl = a;
			c->capdl = cap;
		}
	}
	d.consumer_tag = (amqp_bytes_t){ k->tag_len, k->tag };
	d.delivery_tag = ++c->dnext;
	d.redelivered = redelivered;
	d.exchange = exchange;
	d.routing_key = routing_key;
	gs_send_method(s, channel, AMQP_BASIC_DELIVER_METHOD, &d);
	gs_send_content(s, channel, properties, body);
	if (!k->no_ack)
		c->dl[c->ndl++] = (struct dlv){ .tag = c->dnext, .up_tag = up_tag, .up_gen = up_gen,
						.cid = consumer_id };
	return (int64_t)c->dnext;
}

void guest_session_release_all(struct guest_session *s)
{
	for (uint16_t i = 0; i < s->nchans; i++)
		gs_chan_release(s, s->chans[i]);
	while (s->ncons)
		cons_remove(s, (uint16_t)(s->ncons - 1));
}

void guest_session_detach_deliveries(struct guest_session *s,
				     void (*fn)(void *ud, uint64_t up_tag, uint32_t up_gen),
				     void *ud)
{
	for (uint16_t i = 0; i < s->nchans; i++) {
		struct chan *c = s->chans[i];

		for (uint32_t j = 0; j < c->ndl; j++) {
			if (c->dl[j].up_gen)
				fn(ud, c->dl[j].up_tag, c->dl[j].up_gen);
			c->dl[j].up_gen = 0;
		}
	}
}

void guest_session_foreach_consumer(struct guest_session *s,
				    void (*fn)(void *ud, uint16_t channel, uint32_t channel_gen,
					       uint32_t consumer_id, uint16_t prefetch, bool no_ack),
				    void *ud)
{
	for (uint16_t i = 0; i < s->ncons; i++)
		if (s->cons[i].ready)
			fn(ud, s->cons[i].ch, s->cons[i].gen, s->cons[i].id, s->cons[i].prefetch,
			   s->cons[i].no_ack);
}

uint32_t guest_session_unacked(const struct guest_session *s)
{
	uint32_t n = 0;

	for (uint16_t i = 0; i < s->nchans; i++)
		n += s->chans[i]->ndl;
	return n;
}
