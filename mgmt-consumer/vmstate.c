/* vmstate.c -- see vmstate.h */
#include "vmstate.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prom.h"

struct vm_latest {
	char uuid[40];
	char name[128];
	double cpu, mem_used, mem_avail, load1, disk_r, disk_w, net_rx, net_tx;
	double last_seen, interval;
};

struct vmstate {
	pthread_mutex_t lock;
	struct vm_latest *vms;
	size_t n, max;
	unsigned stale_after;
	uint64_t stored, duplicate, quarantined, reconnects, untracked, expired, store_errors;
	char **shards;
	bool *active;
	size_t nshards;
	double fsync_sum;
	uint64_t fsync_count;
};

int vmstate_new(size_t max_vms, unsigned stale_after, struct vmstate **out)
{
	struct vmstate *st = calloc(1, sizeof(*st));

	if (!st)
		return -ENOMEM;
	st->max = max_vms;
	st->stale_after = stale_after ? stale_after : 1;
	pthread_mutex_init(&st->lock, NULL);
	*out = st;
	return 0;
}

void vmstate_free(struct vmstate *st)
{
	if (!st)
		return;
	pthread_mutex_destroy(&st->lock);
	for (size_t i = 0; i < st->nshards; i++)
		free(st->shards[i]);
	free(st->shards);
	free(st->active);
	free(st->vms);
	free(st);
}

static double num(json_t *o, const char *a, const char *b)
{
	json_t *v = json_object_get(o, a);

	return json_number_value(b ? json_object_get(v, b) : v);
}

static double sum(json_t *arr, const char *key)
{
	double t = 0;
	size_t i;
	json_t *v;

	json_array_foreach(arr, i, v)
		t += json_number_value(json_object_get(v, key));
	return t;
}

void vmstate_update(struct vmstate *st, const char *uuid, const char *name, json_t *doc,
		    double now)
{
	struct vm_latest *v = NULL;

	pthread_mutex_lock(&st->lock);
	for (size_t i = 0; i < st->n; i++)
		if (!strcmp(st->vms[i].uuid, uuid))
			v = &st->vms[i];
	if (!v) {
		if (st->n == st->max) {
			st->untracked++;
			pthread_mutex_unlock(&st->lock);
			return;
		}
		if (st->n % 64 == 0) {
			struct vm_latest *nv = realloc(st->vms, (st->n + 64) * sizeof(*nv));
			if (!nv) {
				pthread_mutex_unlock(&st->lock);
				return;
			}
			st->vms = nv;
		}
		v = &st->vms[st->n++];
		memset(v, 0, sizeof(*v));
		snprintf(v->uuid, sizeof(v->uuid), "%s", uuid);
	}
	snprintf(v->name, sizeof(v->name), "%s", name ? name : "");
	v->cpu = num(doc, "cpu", "busy_pct");
	v->mem_used = num(doc, "memory", "used_pct");
	v->mem_avail = num(doc, "memory", "available_bytes");
	v->load1 = num(doc, "load", "load1");
	v->disk_r = sum(json_object_get(doc, "disks"), "read_bytes_per_s");
	v->disk_w = sum(json_object_get(doc, "disks"), "write_bytes_per_s");
	v->net_rx = sum(json_object_get(doc, "network"), "rx_bytes_per_s");
	v->net_tx = sum(json_object_get(doc, "network"), "tx_bytes_per_s");
	v->interval = num(doc, "interval_s", NULL);
	v->last_seen = now;
	pthread_mutex_unlock(&st->lock);
}

void vmstate_add(struct vmstate *st, const char *result, uint64_t n)
{
	pthread_mutex_lock(&st->lock);
	if (!strcmp(result, "stored"))
		st->stored += n;
	else if (!strcmp(result, "duplicate"))
		st->duplicate += n;
	else if (!strcmp(result, "expired"))
		st->expired += n;
	else
		st->quarantined += n;
	pthread_mutex_unlock(&st->lock);
}

void vmstate_count(struct vmstate *st, const char *result)
{
	vmstate_add(st, result, 1);
}

void vmstate_count_store_error(struct vmstate *st)
{
	pthread_mutex_lock(&st->lock);
	st->store_errors++;
	pthread_mutex_unlock(&st->lock);
}

size_t vmstate_count_vms(struct vmstate *st)
{
	size_t n;

	pthread_mutex_lock(&st->lock);
	n = st->n;
	pthread_mutex_unlock(&st->lock);
	return n;
}

int vmstate_set_shards(struct vmstate *st, const char *const *queues, size_t n)
{
	st->shards = calloc(n, sizeof(char *));
	st->active = calloc(n, sizeof(bool));
	if (!st->shards || !st->active)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++)
		if (!(st->shards[i] = strdup(queues[i])))
			return -ENOMEM;
	st->nshards = n;
	return 0;
}

void vmstate_shard_active(struct vmstate *st, size_t i, bool active)
{
	pthread_mutex_lock(&st->lock);
	if (i < st->nshards)
		st->active[i] = active;
	pthread_mutex_unlock(&st->lock);
}

void vmstate_count_reconnect(struct vmstate *st)
{
	pthread_mutex_lock(&st->lock);
	st->reconnects++;
	pthread_mutex_unlock(&st->lock);
}

void vmstate_observe_fsync(struct vmstate *st, double seconds)
{
	pthread_mutex_lock(&st->lock);
	st->fsync_sum += seconds;
	st->fsync_count++;
	pthread_mutex_unlock(&st->lock);
}

char *vmstate_render(struct vmstate *st, double now)
{
	static const struct {
		const char *name, *help;
		size_t off;
	} gauges[] = {
		{ "vmproxy_vm_cpu_busy_percent", "CPU busy share over the last interval.",
		  offsetof(struct vm_latest, cpu) },
		{ "vmproxy_vm_memory_used_percent", "Memory in use (total - available).",
		  offsetof(struct vm_latest, mem_used) },
		{ "vmproxy_vm_memory_available_bytes", "MemAvailable.",
		  offsetof(struct vm_latest, mem_avail) },
		{ "vmproxy_vm_load1", "1-minute load average.", offsetof(struct vm_latest, load1) },
		{ "vmproxy_vm_disk_read_bytes_per_second", "Disk reads, all disks.",
		  offsetof(struct vm_latest, disk_r) },
		{ "vmproxy_vm_disk_write_bytes_per_second", "Disk writes, all disks.",
		  offsetof(struct vm_latest, disk_w) },
		{ "vmproxy_vm_network_receive_bytes_per_second", "Received, all interfaces.",
		  offsetof(struct vm_latest, net_rx) },
		{ "vmproxy_vm_network_transmit_bytes_per_second", "Transmitted, all interfaces.",
		  offsetof(struct vm_latest, net_tx) },
		{ "vmproxy_vm_last_seen_seconds", "Unix time of the VM's last stored sample.",
		  offsetof(struct vm_latest, last_seen) },
	};
	struct prom_buf b;

	prom_init(&b);
	pthread_mutex_lock(&st->lock);
	for (size_t g = 0; g < sizeof(gauges) / sizeof(gauges[0]); g++) {
		prom_family(&b, gauges[g].name, "gauge", gauges[g].help);
		for (size_t i = 0; i < st->n; i++)
			prom_sample(&b, gauges[g].name,
				    *(const double *)((const char *)&st->vms[i] + gauges[g].off),
				    "vm_uuid", st->vms[i].uuid, "vm_name", st->vms[i].name, NULL);
	}
	prom_family(&b, "vmproxy_vm_stale", "gauge",
		    "1 when the VM missed its configured number of intervals.");
	for (size_t i = 0; i < st->n; i++) {
		const struct vm_latest *v = &st->vms[i];
		double interval = v->interval > 0 ? v->interval : 10;
		prom_sample(&b, "vmproxy_vm_stale",
			    now - v->last_seen > st->stale_after * interval ? 1 : 0, "vm_uuid",
			    v->uuid, "vm_name", v->name, NULL);
	}
	prom_family(&b, "vmproxy_consumer_messages_total", "counter",
		    "Messages consumed, by what became of them.");
	prom_sample(&b, "vmproxy_consumer_messages_total", (double)st->stored, "result", "stored",
		    NULL);
	prom_sample(&b, "vmproxy_consumer_messages_total", (double)st->duplicate, "result",
		    "duplicate", NULL);
	prom_sample(&b, "vmproxy_consumer_messages_total", (double)st->quarantined, "result",
		    "quarantined", NULL);
	prom_family(&b, "vmproxy_consumer_reconnects_total", "counter", "Broker reconnects.");
	prom_sample(&b, "vmproxy_consumer_reconnects_total", (double)st->reconnects, NULL);
	prom_family(&b, "vmproxy_consumer_untracked_vms_total", "counter",
		    "Samples of VMs past the tracking bound (stored, not exposed).");
	prom_sample(&b, "vmproxy_consumer_untracked_vms_total", (double)st->untracked, NULL);
	prom_family(&b, "vmproxy_consumer_expired_samples_total", "counter",
		    "Samples deleted by sink.retention_days.");
	prom_sample(&b, "vmproxy_consumer_expired_samples_total", (double)st->expired, NULL);
	prom_family(&b, "vmproxy_consumer_store_errors_total", "counter",
		    "Batches the store failed to take (not acked, consumed again).");
	prom_sample(&b, "vmproxy_consumer_store_errors_total", (double)st->store_errors, NULL);
	prom_family(&b, "vmproxy_consumer_queue_active", "gauge",
		    "1 when this instance is the active consumer of the queue (it delivered to "
		    "us on the current connection).");
	for (size_t i = 0; i < st->nshards; i++)
		prom_sample(&b, "vmproxy_consumer_queue_active", st->active[i] ? 1 : 0, "queue",
			    st->shards[i], NULL);
	prom_family(&b, "vmproxy_consumer_batch_fsync_seconds", "summary",
		    "Time to commit a batch (write and fsync, or the database commit).");
	prom_sample(&b, "vmproxy_consumer_batch_fsync_seconds_sum", st->fsync_sum, NULL);
	prom_sample(&b, "vmproxy_consumer_batch_fsync_seconds_count", (double)st->fsync_count, NULL);
	pthread_mutex_unlock(&st->lock);
	if (b.oom) {
		prom_free(&b);
		return NULL;
	}
	return b.data;
}
