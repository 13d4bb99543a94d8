/* backoff.h -- exponential backoff with full jitter for reconnect loops. */
#pragma once

#include <stdint.h>

struct backoff {
	uint32_t base_ms; /* first ceiling */
	uint32_t max_ms;  /* ceiling never grows past this */
	uint32_t ceiling_ms;
	uint64_t rng;
};

/* Initialise with a ceiling starting at BASE_MS and doubling to MAX_MS.
 * SEED 0 picks one from the clock and the address of B. */
void backoff_init(struct backoff *b, uint32_t base_ms, uint32_t max_ms, uint64_t seed);

/* The next delay: uniform in [ceiling/2, ceiling], then the ceiling doubles. */
uint32_t backoff_next(struct backoff *b);

/* After a success: the next failure waits about BASE_MS again. */
void backoff_reset(struct backoff *b);
