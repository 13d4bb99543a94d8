/* hash.h -- FNV-1a string hashes, for the hash tables and placement
 * decisions that key on VM uuids and host names (bounded by the VM count
 * the acceptor admits), and the consumer's JSON Lines duplicate filter
 * (dedup.c, whose keys include the guest's boot id). Not collision
 * resistant. */
#pragma once

#include <stdint.h>

#define HASH_FNV1A64_OFFSET 1469598103934665603ull

/* One more byte B into the 64-bit hash H. */
static inline uint64_t hash_fnv1a64_byte(uint64_t h, unsigned char b)
{
	return (h ^ b) * 1099511628211ull;
}

/* String S's bytes into H (for keys made of several strings). */
static inline uint64_t hash_fnv1a64_more(uint64_t h, const char *s)
{
	while (*s)
		h = hash_fnv1a64_byte(h, (unsigned char)*s++);
	return h;
}

static inline uint64_t hash_fnv1a64(const char *s)
{
	return hash_fnv1a64_more(HASH_FNV1A64_OFFSET, s);
}

static inline uint32_t hash_fnv1a32(const char *s)
{
	uint32_t h = 2166136261u;

	while (*s)
		h = (h ^ (unsigned char)*s++) * 16777619u;
	return h;
}
