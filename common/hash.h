/* hash.h -- FNV-1a string hashes, for the hash tables and placement
 * decisions that key on VM uuids and host names (not for anything a peer
 * could exploit by choosing keys: those tables are bounded by the VM count
 * the acceptor admits). */
#pragma once

#include <stdint.h>

static inline uint64_t hash_fnv1a64(const char *s)
{
	uint64_t h = 1469598103934665603ull;

	while (*s)
		h = (h ^ (unsigned char)*s++) * 1099511628211ull;
	return h;
}

static inline uint32_t hash_fnv1a32(const char *s)
{
	uint32_t h = 2166136261u;

	while (*s)
		h = (h ^ (unsigned char)*s++) * 16777619u;
	return h;
}
