/* hdr.h -- a log-linear latency histogram (HDR-style: 64 linear
 * sub-buckets per power of two, so about 1.5% relative precision) for the
 * load generator's confirm latencies, in microseconds. */
#pragma once

#include <stdint.h>

#define HDR_SUB	    64
#define HDR_BUCKETS (HDR_SUB * 40)

struct hdr {
	uint64_t counts[HDR_BUCKETS];
	uint64_t total, max, sum;
};

void hdr_record(struct hdr *h, uint64_t value);
/* The value below which Q (0..1) of the samples fall; 0 when empty. */
uint64_t hdr_quantile(const struct hdr *h, double q);
void hdr_merge(struct hdr *into, const struct hdr *from);
