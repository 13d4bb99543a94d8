/* report_json.c -- see report_json.h */
#include "report_json.h"

#include <stdio.h>

#include "daemon.h"

static json_t *link_json(const struct upstream_stats *st)
{
	json_t *o = json_object(), *ref = json_object();

	json_object_set_new(o, "up", json_boolean(st->up));
	json_object_set_new(o, "node", json_string(st->node));
	json_object_set_new(o, "published", json_integer((json_int_t)st->published));
	json_object_set_new(o, "acked", json_integer((json_int_t)st->acked));
	json_object_set_new(o, "nacked", json_integer((json_int_t)st->nacked));
	json_object_set_new(o, "republished", json_integer((json_int_t)st->republished));
	json_object_set_new(o, "returned", json_integer((json_int_t)st->returned));
	json_object_set_new(o, "delivered", json_integer((json_int_t)st->delivered));
	json_object_set_new(o, "deliveries_refused",
			    json_integer((json_int_t)st->deliveries_refused));
	json_object_set_new(o, "connects", json_integer((json_int_t)st->reconnects));
	json_object_set_new(o, "unconfirmed", json_integer(st->unconfirmed));
	json_object_set_new(o, "broker_blocked", json_boolean(st->broker_blocked));
	json_object_set_new(o, "last_error", json_string(st->last_error));
	json_object_set_new(o, "writes", json_integer((json_int_t)st->writes));
	json_object_set_new(o, "reads", json_integer((json_int_t)st->reads));
	for (size_t i = 0; i < UPSTREAM_REFUSAL_CODES && st->refusals[i].code; i++) {
		char code[8];

		snprintf(code, sizeof(code), "%u", st->refusals[i].code);
		json_object_set_new(ref, code, json_integer((json_int_t)st->refusals[i].count));
	}
	json_object_set_new(o, "refusals", ref);
	return o;
}

static json_t *vm_json(const struct poll_vm_report *v)
{
	json_t *o = json_object();

	json_object_set_new(o, "uuid", json_string(v->info.uuid));
	json_object_set_new(o, "name", json_string(v->info.name));
	json_object_set_new(o, "cid", json_integer((json_int_t)v->info.cid));
	json_object_set_new(o, "connections", json_integer((json_int_t)v->connections));
	json_object_set_new(o, "held_bytes", json_integer((json_int_t)v->held_bytes));
	json_object_set_new(o, "held_messages", json_integer((json_int_t)v->held_messages));
	json_object_set_new(o, "messages_in", json_integer((json_int_t)v->messages_in));
	json_object_set_new(o, "bytes_in", json_integer((json_int_t)v->bytes_in));
	json_object_set_new(o, "acked", json_integer((json_int_t)v->acked));
	json_object_set_new(o, "nacked", json_integer((json_int_t)v->nacked));
	json_object_set_new(o, "blocked", json_boolean(v->blocked));
	json_object_set_new(o, "migrating", json_boolean(v->migrating));
	return o;
}

static json_t *thread_json(const struct poll_report *r, bool with_vms)
{
	json_t *o = json_object();

	json_object_set_new(o, "thread", json_integer(r->thread));
	json_object_set_new(o, "cpu", json_integer(r->cpu));
	json_object_set_new(o, "connections", json_integer(r->connections));
	json_object_set_new(o, "vm_count", json_integer(r->vm_count));
	json_object_set_new(o, "held_bytes", json_integer((json_int_t)r->held_bytes));
	json_object_set_new(o, "held_messages", json_integer((json_int_t)r->held_messages));
	json_object_set_new(o, "blocked", json_boolean(r->blocked));
	json_object_set_new(o, "messages_in", json_integer((json_int_t)r->messages_in));
	json_object_set_new(o, "bytes_in", json_integer((json_int_t)r->bytes_in));
	json_object_set_new(o, "messages_out", json_integer((json_int_t)r->messages_out));
	json_object_set_new(o, "bytes_out", json_integer((json_int_t)r->bytes_out));
	json_object_set_new(o, "guest_reads", json_integer((json_int_t)r->guest_reads));
	json_object_set_new(o, "guest_writes", json_integer((json_int_t)r->guest_writes));
	json_object_set_new(o, "migrations_in", json_integer((json_int_t)r->migrations_in));
	json_object_set_new(o, "migrations_out", json_integer((json_int_t)r->migrations_out));
	json_object_set_new(o, "cpu_seconds", json_real(r->cpu_seconds));
	json_object_set_new(o, "loop_busy_seconds", json_real(r->loop_busy_seconds));
	json_object_set_new(o, "loop_max_us", json_integer((json_int_t)r->loop_max_us));
	json_object_set_new(o, "upstream", link_json(&r->link));
	if (with_vms) {
		json_t *vms = json_array();

		for (size_t i = 0; i < r->nvms; i++)
			json_array_append_new(vms, vm_json(&r->vms[i]));
		json_object_set_new(o, "vms", vms);
	}
	return o;
}

json_t *report_json_threads(const struct poll_report *r, unsigned n, bool with_vms)
{
	json_t *a = json_array();

	for (unsigned i = 0; i < n; i++)
		json_array_append_new(a, thread_json(&r[i], with_vms));
	return a;
}

json_t *report_json_load(const struct thread_rates *l, unsigned n)
{
	json_t *load = json_array();

	for (unsigned i = 0; i < n; i++)
		json_array_append_new(
			load, json_pack("{s:i, s:f, s:f, s:f, s:f, s:f, s:I, s:I, s:I, s:I}", "thread",
					(int)i, "messages_in_per_s", l[i].messages_in_per_s,
					"bytes_in_per_s", l[i].bytes_in_per_s, "messages_out_per_s",
					l[i].messages_out_per_s, "bytes_out_per_s",
					l[i].bytes_out_per_s, "cpu_percent", l[i].cpu_percent,
					"connections", (json_int_t)l[i].connections,
					"held_messages", (json_int_t)l[i].held_messages,
					"held_bytes", (json_int_t)l[i].held_bytes, "loop_max_us",
					(json_int_t)l[i].loop_max_us));
	return load;
}

json_t *report_json_counters(const struct vmproxy_counters *c)
{
	json_t *o = json_object(), *ls = json_array();
	const struct vm_identity_stats *st = &c->libvirt;

	json_object_set_new(o, "threads", json_integer(c->threads));
	json_object_set_new(o, "accepted", json_integer((json_int_t)c->accepted));
	json_object_set_new(o, "refused_unknown_peer",
			    json_integer((json_int_t)c->refused_unknown_peer));
	json_object_set_new(o, "refused_limit", json_integer((json_int_t)c->refused_limit));
	json_object_set_new(o, "refused_libvirt_unreachable",
			    json_integer((json_int_t)c->refused_libvirt_unreachable));
	json_object_set_new(o, "refused_lookups_pending",
			    json_integer((json_int_t)c->refused_lookups_pending));
	json_object_set_new(o, "lookups_pending", json_integer((json_int_t)c->lookups_pending));
	json_object_set_new(o, "vms_gone", json_integer((json_int_t)c->vms_gone));
	json_object_set_new(
		o, "libvirt",
		json_pack("{s:s, s:I, s:I, s:I, s:I}", "state",
			  !st->libvirt_configured ? "none"
			  : st->libvirt_connected ? "connected"
						  : "disconnected",
			  "disconnects", (json_int_t)st->libvirt_disconnects, "reconnects",
			  (json_int_t)st->libvirt_reconnects, "reconnect_failures",
			  (json_int_t)st->libvirt_reconnect_failures, "served_from_cache",
			  (json_int_t)st->served_unreachable));
	json_object_set_new(o, "connections", json_integer((json_int_t)c->connections));
	json_object_set_new(o, "held_messages", json_integer((json_int_t)c->held_messages));
	json_object_set_new(o, "draining", json_boolean(c->draining));
	json_object_set_new(o, "balancer_enabled", json_boolean(c->balancer_enabled));
	json_object_set_new(o, "load", report_json_load(c->load, c->nload));
	for (size_t i = 0; i < c->nlisteners; i++) {
		const struct vmproxy_listener_counters *l = &c->listeners[i];

		json_array_append_new(ls, json_pack("{s:s, s:I, s:I, s:I}", "name", l->name,
						    "accepted", (json_int_t)l->accepted, "refused",
						    (json_int_t)l->refused, "accept_errors",
						    (json_int_t)l->accept_errors));
	}
	json_object_set_new(o, "listeners", ls);
	return o;
}
