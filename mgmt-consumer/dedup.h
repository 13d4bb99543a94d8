/* dedup.h -- a bounded window of recently stored (VM uuid, boot id, seq)
 * keys, kept as 64-bit hashes in insertion order: the oldest is forgotten
 * when the window is full. A hash collision would drop one real sample;
 * with a window of 10^6 keys that chance is about 3 * 10^-8 per sample. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct dedup;

/* A window of CAPACITY keys (at least 16). */
int dedup_new(size_t capacity, struct dedup **out);
void dedup_free(struct dedup *d);

uint64_t dedup_key(const char *vm_uuid, const char *boot_id, int64_t seq);

/* True when KEY is in the window. */
bool dedup_seen(const struct dedup *d, uint64_t key);

/* Add KEY (no-op when present), evicting the oldest when full. */
void dedup_add(struct dedup *d, uint64_t key);

size_t dedup_count(const struct dedup *d);
