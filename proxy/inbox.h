/* inbox.h -- per-VM inboxes on a poll thread's upstream link: a guest's
 * queue.declare and basic.consume of the virtual inbox name become the
 * declare, bind and consume of its own VM's broker queue (vm.<uuid>.inbox)
 * on the link's inbox channel; deliveries go to the guest re-tagged per
 * guest channel, and its acks, nacks and rejects go back to the broker. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "guest_conn.h"
#include "guest_session.h"
#include "upstream.h"
#include "vm_identity.h"

struct inbox;

/* Output for C's session was produced: write it out (the thread's
 * mark_dirty). */
typedef void (*inbox_wake_fn)(void *userdata, struct guest_conn *c);

/* The inboxes of poll thread THREAD_ID, whose link is UP (set later with
 * inbox_set_link when NULL). CFG outlives it. */
int inbox_new(const struct proxy_config *cfg, unsigned thread_id, inbox_wake_fn wake,
              void *userdata, struct inbox **out);
/* Free everything; guests are not told (their sessions are going too).
 * Accepts NULL. */
void inbox_free(struct inbox *ib);
void inbox_set_link(struct inbox *ib, struct upstream *up);

/* The session settings the inbox needs (name, consumer and unacked bounds). */
void inbox_session_config(const struct proxy_config *cfg, struct guest_session_config *sc);

/* A DECLARE, CONSUME, CANCEL or SETTLE event of C's session; C belongs to
 * VM, whose inbox is the only one C can reach. */
void inbox_guest_event(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm,
                       const struct guest_event *ev);

/* C's session SESS (already taken off C) is about to be freed: its
 * unsettled deliveries go back to the broker (requeued), its consumers are
 * cancelled there, and nothing refers to C afterwards. */
void inbox_conn_closing(struct inbox *ib, struct guest_conn *c, struct guest_session *sess);

/* C moves to another poll thread with its VM: its consumers are cancelled
 * on this thread's link and its unsettled deliveries requeued there (the
 * guest's later acks of them are accepted and dropped); the guest keeps its
 * consumers, which inbox_conn_arrived subscribes on the new thread's link,
 * where the requeued messages come again, redelivered. */
void inbox_conn_leaving(struct inbox *ib, struct guest_conn *c);
/* C (of VM) arrived from another poll thread: subscribe its session's
 * consumers on this thread's link (now, or when the link comes up). */
void inbox_conn_arrived(struct inbox *ib, struct guest_conn *c, const struct vm_info *vm);

/* The link came up: consumers the link's loss interrupted subscribe again
 * (the broker redelivers what they had not acked, redelivered=true). */
void inbox_link_up(struct inbox *ib);

/* Unsettled deliveries and consumers of connection C (for tests and the
 * migration check); C NULL: of the whole thread. */
uint32_t inbox_consumers(const struct inbox *ib, const struct guest_conn *c);

/* The link's inbox events (struct upstream_ops members). */
void inbox_on_reply(struct inbox *ib, uint64_t cookie, enum upstream_inbox_req kind, bool ok,
                    uint16_t code, const char *text, uint32_t count, uint32_t consumers);
void inbox_on_deliver(struct inbox *ib, const struct upstream_proto_delivery *d);
void inbox_on_got(struct inbox *ib, uint64_t cookie, const struct upstream_proto_delivery *d,
                  uint32_t count);
void inbox_on_cancelled(struct inbox *ib, amqp_bytes_t tag);
void inbox_on_closed(struct inbox *ib, uint16_t code, const char *text);
