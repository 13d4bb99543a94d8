/* backoff.c -- see backoff.h */
#include "backoff.h"

#include "clock.h"

static uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

void backoff_init(struct backoff *b, uint32_t base_ms, uint32_t max_ms, uint64_t seed)
{
	if (base_ms == 0)
		base_ms = 1;
	if (max_ms < base_ms)
		max_ms = base_ms;
	b->base_ms = base_ms;
	b->max_ms = max_ms;
	b->ceiling_ms = base_ms;
	b->rng = seed ? seed : (clock_mono_ns() ^ (uint64_t)(uintptr_t)b) | 1;
}

uint32_t backoff_next(struct backoff *b)
{
	uint32_t c = b->ceiling_ms;
	uint32_t half = c / 2;
	uint32_t d = half + (uint32_t)(xorshift64(&b->rng) % ((uint64_t)(c - half) + 1));

	b->ceiling_ms = c > b->max_ms / 2 ? b->max_ms : c * 2;
	return d;
}

void backoff_reset(struct backoff *b)
{
	b->ceiling_ms = b->base_ms;
}
