/* inbox.c -- see inbox.h: the inboxes' state, their consumers and requests,
 * and the broker requests these send (subscribe, cancel). */
#include "inbox_impl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "field.h"
#include "list.h"

int inbox_new(const struct proxy_config *cfg, unsigned thread_id, inbox_wake_fn wake,
              void *userdata, struct inbox **out)
{
	struct inbox *ib = calloc(1, sizeof(*ib));

	if (!ib)
		return -ENOMEM;
	ib->cfg = cfg;
	ib->thread_id = thread_id;
	ib->wake = wake;
	ib->ud = userdata;
	ib->args[0] = field_utf8("x-queue-type", cfg->inbox.quorum ? "quorum" : "classic");
	ib->args[1] = field_i64("x-max-length", cfg->inbox.max_length);
	ib->args[2] = field_i64("x-message-ttl", cfg->inbox.message_ttl_ms);
	/* A full inbox refuses (nacks) new control messages: the sender
	 * learns of it, and what the VM has not read yet is kept. */
	ib->args[3] = field_utf8("x-overflow", "reject-publish");
	ib->qargs = (amqp_table_t){4, ib->args};
	*out = ib;
	return 0;
}

void inbox_set_link(struct inbox *ib, struct upstream *up)
{
	ib->up = up;
}

void inbox_free(struct inbox *ib)
{
	if (!ib)
		return;
	while (ib->cons) {
		struct inbox_cons *k = ib->cons;
		ib->cons = k->next;
		free(k);
	}
	while (ib->reqs) {
		struct inbox_req *r = ib->reqs;
		ib->reqs = r->next;
		free(r);
	}
	free(ib);
}

void inbox_session_config(const struct proxy_config *cfg, struct guest_session_config *sc)
{
	sc->inbox_name = cfg->inbox.enabled ? cfg->inbox.name : NULL;
	sc->max_consumers = cfg->inbox.max_consumers;
	/* What the broker may have out to one connection's consumers. */
	sc->max_unacked = (uint32_t)cfg->inbox.max_consumers * cfg->inbox.max_prefetch;
}

/* ---- consumers ---------------------------------------------------------------- */

static unsigned bucket_of(uint64_t seq)
{
	return (unsigned)(seq % BUCKETS);
}

struct inbox_cons *inbox_cons_by_tag(struct inbox *ib, amqp_bytes_t tag)
{
	char buf[48];
	const char *dot;
	uint64_t seq;

	if (tag.len >= sizeof(buf) || tag.len <= sizeof(TAG_PREFIX))
		return NULL;
	memcpy(buf, tag.bytes, tag.len);
	buf[tag.len] = '\0';
	dot = strrchr(buf, '.');
	if (!dot || sscanf(dot + 1, "%" SCNu64, &seq) != 1)
		return NULL;
	for (struct inbox_cons *k = ib->bucket[bucket_of(seq)]; k; k = k->hnext)
		if (k->seq == seq && strcmp(k->tag, buf) == 0)
			return k;
	return NULL;
}

struct inbox_cons *inbox_cons_new(struct inbox *ib, struct guest_conn *c,
                                  const struct vm_info *vm, const struct guest_event *ev)
{
	struct inbox_cons *k = calloc(1, sizeof(*k));
	uint16_t max = ib->cfg->inbox.max_prefetch;

	if (!k)
		return NULL;
	k->conn = c;
	k->ch = ev->channel;
	k->ch_gen = ev->channel_gen;
	k->cid = ev->consumer_id;
	k->no_ack = ev->no_ack;
	k->prefetch = ev->prefetch == 0 || ev->prefetch > max ? max : ev->prefetch;
	k->seq = ++ib->next_seq;
	snprintf(k->tag, sizeof(k->tag), TAG_PREFIX "%u.%" PRIu64, ib->thread_id, k->seq);
	snprintf(k->uuid, sizeof(k->uuid), "%s", vm->uuid);
	snprintf(k->queue, sizeof(k->queue), "vm.%s.inbox", vm->uuid);
	k->next = ib->cons;
	ib->cons = k;
	k->hnext = ib->bucket[bucket_of(k->seq)];
	ib->bucket[bucket_of(k->seq)] = k;
	ib->ncons++;
	return k;
}

void inbox_cons_free(struct inbox *ib, struct inbox_cons *k)
{
	struct inbox_cons **pp;

	for (pp = &ib->cons; *pp; pp = &(*pp)->next) {
		if (*pp == k) {
			*pp = k->next;
			break;
		}
	}
	for (pp = &ib->bucket[bucket_of(k->seq)]; *pp; pp = &(*pp)->hnext) {
		if (*pp == k) {
			*pp = k->hnext;
			break;
		}
	}
	for (struct inbox_req *r = ib->reqs; r; r = r->next)
		if (r->k == k)
			r->k = NULL;
	ib->ncons--;
	free(k);
}

uint32_t inbox_consumers(const struct inbox *ib, const struct guest_conn *c)
{
	uint32_t n = 0;

	for (const struct inbox_cons *k = ib->cons; k; k = k->next)
		if (!c || k->conn == c)
			n++;
	return n;
}

/* ---- requests ------------------------------------------------------------------- */

struct inbox_req *inbox_req_new(struct inbox *ib, enum req_what what, struct guest_conn *c,
                                uint16_t ch, uint32_t ch_gen, struct inbox_cons *k)
{
	struct inbox_req *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	r->what = what;
	r->conn = c;
	r->ch = ch;
	r->ch_gen = ch_gen;
	r->k = k;
	DLIST_PUSH(ib->reqs, r, prev, next);
	return r;
}

void inbox_req_free(struct inbox *ib, struct inbox_req *r)
{
	DLIST_UNLINK(ib->reqs, r, prev, next);
	free(r);
}

void inbox_wake(struct inbox *ib, struct guest_conn *c)
{
	if (c && ib->wake)
		ib->wake(ib->ud, c);
}

/* Declare and bind K's queue (or VM's, for a plain declare), then, for a
 * subscription, qos and consume. R counts the replies; a request that
 * cannot even be queued fails R at once. Returns false then. */
bool inbox_send_chain(struct inbox *ib, struct inbox_req *r, const char *queue, const char *uuid,
                      struct inbox_cons *k, bool get)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	char key[VM_UUID_LEN + 3];
	uint64_t cookie = (uint64_t)(uintptr_t)r;
	int e;

	if (!p) {
		r->failed = true;
		r->code = 506;
		snprintf(r->text, sizeof(r->text), "the management link is down; try again later");
		return false;
	}
	snprintf(key, sizeof(key), "%s.#", uuid);
	e = upstream_proto_inbox_declare(p, queue, &ib->qargs, cookie);
	if (e == 0) {
		r->replies++;
		e = upstream_proto_inbox_bind(p, queue, ib->cfg->inbox.exchange, key, cookie);
	}
	if (e == 0 && k) {
		r->replies++;
		e = upstream_proto_inbox_consume(p, queue, k->tag, k->prefetch, cookie);
	} else if (e == 0 && get) {
		r->replies++;
		e = upstream_proto_inbox_get(p, queue, cookie);
	}
	if (e == 0) {
		r->replies++;
		return true;
	}
	/* What was queued is answered as usual; the request fails after it. */
	r->failed = true;
	r->code = 541;
	snprintf(r->text, sizeof(r->text), "cannot send to the broker: %s", strerror(-e));
	return false;
}

void inbox_cancel_upstream(struct inbox *ib, struct inbox_cons *k)
{
	struct upstream_proto *p = ib->up ? upstream_inbox_proto(ib->up) : NULL;
	struct inbox_req *r;

	k->conn = NULL;
	if (k->st != CONS_LIVE || !p) {
		/* DOWN: nothing at the broker. SUBSCRIBING: cancelled when its
		 * consume-ok comes. CANCELLING: under way. */
		if (k->st == CONS_DOWN || !p)
			inbox_cons_free(ib, k);
		return;
	}
	r = inbox_req_new(ib, REQ_CANCEL, NULL, 0, 0, k);
	if (!r || upstream_proto_inbox_cancel(p, k->tag, (uint64_t)(uintptr_t)r) < 0) {
		/* The consumer stays at the broker until the channel goes;
		 * its deliveries are requeued as they come (no guest). */
		if (r)
			inbox_req_free(ib, r);
		return;
	}
	r->replies = 1;
	k->st = CONS_CANCELLING;
}

void inbox_subscribe(struct inbox *ib, struct inbox_cons *k, enum req_what what)
{
	struct inbox_req *r = inbox_req_new(ib, what, k->conn, k->ch, k->ch_gen, k);

	k->st = CONS_SUBSCRIBING;
	if (!r) {
		if (inbox_session(k->conn))
			guest_session_cancel_consumer(inbox_session(k->conn), k->cid,
			                              "out of memory");
		inbox_wake(ib, k->conn);
		return;
	}
	if (!inbox_send_chain(ib, r, k->queue, k->uuid, k, false) && r->replies == 0)
		inbox_on_reply(ib, (uint64_t)(uintptr_t)r, UPSTREAM_INBOX_CONSUME, false, 0, NULL,
		               0, 0);
}
