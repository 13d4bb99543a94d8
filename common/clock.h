/* clock.h -- monotonic and wall-clock time in milliseconds. */
#pragma once

#include <stdint.h>

/* CLOCK_MONOTONIC in milliseconds: for timeouts and intervals. */
uint64_t clock_mono_ms(void);

/* CLOCK_MONOTONIC in nanoseconds: for latency measurements. */
uint64_t clock_mono_ns(void);

/* CLOCK_REALTIME in milliseconds since the epoch: for stamps only. */
uint64_t clock_wall_ms(void);
