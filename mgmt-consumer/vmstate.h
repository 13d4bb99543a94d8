/* vmstate.h -- the latest metrics of every VM seen, for the Prometheus
 * endpoint, with a staleness flag after a number of missed intervals.
 * Shared by the consumer loop (updates) and the HTTP thread (renders). */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vmstate;

/* At most MAX_VMS VMs tracked (new ones past it are counted, not kept);
 * STALE_AFTER missed intervals make a VM stale. */
int vmstate_new(size_t max_vms, unsigned stale_after, struct vmstate **out);
void vmstate_free(struct vmstate *st);

/* A stored sample DOC of VM UUID (NAME) seen at NOW (unix seconds). */
void vmstate_update(struct vmstate *st, const char *uuid, const char *name, json_t *doc,
		    double now);

/* Count one message by result: "stored", "duplicate" or "quarantined";
 * vmstate_add counts N ("expired" counts samples removed by retention). */
void vmstate_count(struct vmstate *st, const char *result);
void vmstate_add(struct vmstate *st, const char *result, uint64_t n);
void vmstate_count_store_error(struct vmstate *st);
size_t vmstate_count_vms(struct vmstate *st);

/* The queues consumed (copied), and whether this instance is the active
 * consumer of queue I. */
int vmstate_set_shards(struct vmstate *st, const char *const *queues, size_t n);
void vmstate_shard_active(struct vmstate *st, size_t i, bool active);
void vmstate_count_reconnect(struct vmstate *st);
void vmstate_observe_fsync(struct vmstate *st, double seconds);

/* Exposition text at NOW (unix seconds); malloc'd, NULL on failure. */
char *vmstate_render(struct vmstate *st, double now);
