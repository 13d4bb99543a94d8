/* dedup.c -- see dedup.h. Open addressing with linear probing and
 * backward-shift deletion, plus a ring of the keys in insertion order. */
#include "dedup.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"

struct dedup {
	uint64_t *slots; /* 0 = empty; keys are never 0 */
	size_t nslots;	 /* power of two, >= 2 * capacity */
	uint64_t *ring;
	size_t cap, head, n;
};

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

uint64_t dedup_key(const char *vm_uuid, const char *boot_id, int64_t seq)
{
	uint64_t h = HASH_FNV1A64_OFFSET;

	/* 0xff never occurs in either string: it separates them. */
	h = hash_fnv1a64_byte(hash_fnv1a64_more(h, vm_uuid), 0xff);
	h = hash_fnv1a64_byte(hash_fnv1a64_more(h, boot_id), 0xff);
	h = mix(h ^ mix((uint64_t)seq));
	return h ? h : 1;
}

int dedup_new(size_t capacity, struct dedup **out)
{
	struct dedup *d = calloc(1, sizeof(*d));

	if (!d)
		return -ENOMEM;
	if (capacity < 16)
		capacity = 16;
	d->cap = capacity;
	d->nslots = 32;
	while (d->nslots < 2 * capacity)
		d->nslots <<= 1;
	d->slots = calloc(d->nslots, sizeof(uint64_t));
	d->ring = calloc(capacity, sizeof(uint64_t));
	if (!d->slots || !d->ring) {
		dedup_free(d);
		return -ENOMEM;
	}
	*out = d;
	return 0;
}

void dedup_free(struct dedup *d)
{
	if (!d)
		return;
	free(d->slots);
	free(d->ring);
	free(d);
}

static size_t find(const struct dedup *d, uint64_t key)
{
	size_t i = key & (d->nslots - 1);

	while (d->slots[i] && d->slots[i] != key)
		i = (i + 1) & (d->nslots - 1);
	return i;
}

bool dedup_seen(const struct dedup *d, uint64_t key)
{
	return d->slots[find(d, key)] == key;
}

static void remove_key(struct dedup *d, uint64_t key)
{
	size_t i = find(d, key), j = i;

	if (d->slots[i] != key)
		return;
	d->slots[i] = 0;
	/* Shift back the following entries of the cluster that may now be
	 * unreachable. */
	for (;;) {
		size_t home;

		j = (j + 1) & (d->nslots - 1);
		if (!d->slots[j])
			return;
		home = d->slots[j] & (d->nslots - 1);
		if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
			d->slots[i] = d->slots[j];
			d->slots[j] = 0;
			i = j;
		}
	}
}

void dedup_add(struct dedup *d, uint64_t key)
{
	size_t i = find(d, key);

	if (d->slots[i] == key)
		return;
	if (d->n == d->cap) {
		remove_key(d, d->ring[d->head]);
		d->head = (d->head + 1) % d->cap;
		d->n--;
		i = find(d, key);
	}
	d->slots[i] = key;
	d->ring[(d->head + d->n) % d->cap] = key;
	d->n++;
}

size_t dedup_count(const struct dedup *d)
{
	return d->n;
}
