/* balancer.c -- see balancer.h */
#include "balancer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int balancer_config_parse(struct conf_ctx *c, json_t *obj, struct balancer_config *out)
{
	static const char *const keys[] = { "enabled", "interval_ms", "ratio", "hold_ms",
					    "min_load", "migrate_timeout_ms", NULL };
	uint64_t u;
	int r = 0;

	out->enabled = true;
	out->interval_ms = 5000;
	out->ratio = 1.5;
	out->hold_ms = 10000;
	out->min_load = 50;
	out->migrate_timeout_ms = 5000;
	if (!obj)
		return 0;
	if (!json_is_object(obj))
		return conf_error(c, "balancer", "expected an object");
	r |= conf_check_keys(c, obj, "balancer", keys);
	r |= conf_get_bool(c, obj, "balancer", "enabled", false, &out->enabled);
	u = out->interval_ms;
	r |= conf_get_uint(c, obj, "balancer", "interval_ms", false, 100, 3600000, &u);
	out->interval_ms = (uint32_t)u;
	u = out->hold_ms;
	r |= conf_get_uint(c, obj, "balancer", "hold_ms", false, 0, 86400000, &u);
	out->hold_ms = (uint32_t)u;
	u = out->migrate_timeout_ms;
	r |= conf_get_uint(c, obj, "balancer", "migrate_timeout_ms", false, 100, 600000, &u);
	out->migrate_timeout_ms = (uint32_t)u;
	{
		json_t *v = json_object_get(obj, "ratio");
		if (v) {
			if (!json_is_number(v) || json_number_value(v) < 1.05 ||
			    json_number_value(v) > 100)
				r |= conf_error(c, "balancer.ratio",
						"expected a number in [1.05, 100]");
			else
				out->ratio = json_number_value(v);
		}
		v = json_object_get(obj, "min_load");
		if (v) {
			if (!json_is_number(v) || json_number_value(v) < 0)
				r |= conf_error(c, "balancer.min_load",
						"expected a number >= 0 (messages/s)");
			else
				out->min_load = json_number_value(v);
		}
	}
	return r ? -EINVAL : 0;
}

static bool imbalanced(const struct balancer_config *cfg, const struct bal_thread *hi,
		       const struct bal_thread *lo)
{
	return hi->load >= cfg->min_load && hi->load > cfg->ratio * lo->load;
}

int balancer_plan(const struct balancer_config *cfg, const struct bal_thread *threads, size_t n,
		  struct bal_move *move)
{
	const struct bal_thread *hi = NULL, *lo = NULL;
	const struct bal_vm *best = NULL;
	double gap, best_after;

	for (size_t i = 0; i < n; i++) {
		if (!hi || threads[i].load > hi->load)
			hi = &threads[i];
		if (!lo || threads[i].load < lo->load)
			lo = &threads[i];
	}
	if (!hi || hi == lo || !imbalanced(cfg, hi, lo))
		return 0;
	gap = hi->load - lo->load;
	best_after = gap;
	for (size_t i = 0; i < hi->nvms; i++) {
		const struct bal_vm *v = &hi->vms[i];
		/* The gap after moving v: |(hi - v) - (lo + v)|. */
		double after = fabs(gap - 2 * v->load);

		if (v->load <= 0)
			continue;
		if (after < best_after) {
			best_after = after;
			best = v;
		}
	}
	if (!best)
		return 0; /* every VM is bigger than the gap it would close */
	memcpy(move->uuid, best->uuid, sizeof(move->uuid));
	move->from = hi->id;
	move->to = lo->id;
	move->from_load = hi->load;
	move->to_load = lo->load;
	return 1;
}

void balancer_init(struct balancer *b, const struct balancer_config *cfg)
{
	memset(b, 0, sizeof(*b));
	b->cfg = *cfg;
}

void balancer_free(struct balancer *b)
{
	free(b->prev);
	b->prev = NULL;
	b->nprev = 0;
}

static int prev_cmp(const void *a, const void *b)
{
	return strcmp(((const struct bal_prev *)a)->uuid, ((const struct bal_prev *)b)->uuid);
}

/* Messages per second of VM UUID, now at NOW_MSGS, over DT seconds. */
static double vm_rate(const struct balancer *b, const char *uuid, uint64_t now_msgs, double dt)
{
	struct bal_prev key;
	const struct bal_prev *p;

	if (dt <= 0 || !b->prev)
		return 0;
	snprintf(key.uuid, sizeof(key.uuid), "%s", uuid);
	p = bsearch(&key, b->prev, b->nprev, sizeof(*p), prev_cmp);
	if (!p || now_msgs < p->messages_in)
		return 0;
	return (double)(now_msgs - p->messages_in) / dt;
}

static double rate(double now, double prev, double dt)
{
	return dt > 0 && now >= prev ? (now - prev) / dt : 0;
}

void balancer_thread_rates(const struct poll_report *r, const struct poll_report *prev,
			   unsigned nprev, unsigned n, double dt, struct thread_rates *out)
{
	static const struct poll_report none;

	for (unsigned i = 0; i < n; i++) {
		const struct poll_report *t = &r[i], *p = prev && i < nprev ? &prev[i] : &none;

		out[i] = (struct thread_rates){
			.messages_in_per_s = rate((double)t->messages_in, (double)p->messages_in, dt),
			.bytes_in_per_s = rate((double)t->bytes_in, (double)p->bytes_in, dt),
			.messages_out_per_s = rate((double)t->messages_out, (double)p->messages_out, dt),
			.bytes_out_per_s = rate((double)t->bytes_out, (double)p->bytes_out, dt),
			.cpu_percent = 100 * rate(t->cpu_seconds, p->cpu_seconds, dt),
			.connections = t->connections,
			.held_messages = t->held_messages,
			.held_bytes = t->held_bytes,
			.loop_max_us = t->loop_max_us,
		};
	}
}

int balancer_observe(struct balancer *b, const struct poll_report *reports, unsigned n,
		     uint64_t now_ms, struct bal_move *move)
{
	double dt = b->last_sample_ms ? (double)(now_ms - b->last_sample_ms) / 1000.0 : 0;
	struct bal_thread *bt = calloc(n ? n : 1, sizeof(*bt));
	struct bal_vm *vms;
	struct bal_prev *next;
	size_t total = 0, k = 0;
	int r = 0;

	for (unsigned i = 0; i < n; i++)
		total += reports[i].nvms;
	vms = calloc(total ? total : 1, sizeof(*vms));
	next = calloc(total ? total : 1, sizeof(*next));
	if (!bt || !vms || !next) {
		r = -ENOMEM;
		goto out;
	}
	for (unsigned i = 0; i < n; i++) {
		bt[i].id = i;
		bt[i].vms = &vms[k];
		for (size_t j = 0; j < reports[i].nvms; j++, k++) {
			const struct poll_vm_report *v = &reports[i].vms[j];

			snprintf(vms[k].uuid, sizeof(vms[k].uuid), "%s", v->info.uuid);
			vms[k].load = vm_rate(b, v->info.uuid, v->messages_in, dt);
			bt[i].load += vms[k].load;
			bt[i].nvms++;
			memcpy(next[k].uuid, vms[k].uuid, sizeof(next[k].uuid));
			next[k].messages_in = v->messages_in;
		}
	}
	qsort(next, total, sizeof(*next), prev_cmp);
	free(b->prev);
	b->prev = next;
	b->nprev = total;
	next = NULL;
	b->last_sample_ms = now_ms ? now_ms : 1;
	if (dt > 0)
		r = balancer_step(b, bt, n, now_ms, move);
out:
	free(next);
	free(vms);
	free(bt);
	return r;
}

int balancer_step(struct balancer *b, const struct bal_thread *threads, size_t n, uint64_t now_ms,
		  struct bal_move *move)
{
	struct bal_move m;

	if (!b->cfg.enabled || !balancer_plan(&b->cfg, threads, n, &m)) {
		b->imbalanced_since = 0;
		return 0;
	}
	if (b->imbalanced_since == 0)
		b->imbalanced_since = now_ms ? now_ms : 1;
	if (now_ms - b->imbalanced_since < b->cfg.hold_ms)
		return 0;
	/* Acted: the next move needs the imbalance to persist anew. */
	b->imbalanced_since = 0;
	*move = m;
	return 1;
}
