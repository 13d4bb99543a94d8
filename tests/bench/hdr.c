/* hdr.c -- see hdr.h */
#include "hdr.h"

static unsigned bucket_of(uint64_t v)
{
	unsigned exp = 0;

	while ((v >> exp) >= HDR_SUB)
		exp++;
	/* exp 0 holds 0..63 exactly; for exp e > 0, v >> e is in [32, 63]:
	 * 32 buckets of width 2^e. */
	unsigned idx = exp == 0 ? (unsigned)v : exp * HDR_SUB + (unsigned)((v >> exp) - HDR_SUB / 2);
	return idx < HDR_BUCKETS ? idx : HDR_BUCKETS - 1;
}

static uint64_t bucket_top(unsigned idx)
{
	unsigned exp = idx / HDR_SUB, sub = idx % HDR_SUB;

	if (exp == 0)
		return sub;
	return ((uint64_t)(sub + HDR_SUB / 2) << exp) + ((1ull << exp) - 1);
}

void hdr_record(struct hdr *h, uint64_t v)
{
	h->counts[bucket_of(v)]++;
	h->total++;
	h->sum += v;
	if (v > h->max)
		h->max = v;
}

uint64_t hdr_quantile(const struct hdr *h, double q)
{
	uint64_t want, seen = 0;

	if (h->total == 0)
		return 0;
	want = (uint64_t)(q * (double)h->total + 0.5);
	if (want == 0)
		want = 1;
	for (unsigned i = 0; i < HDR_BUCKETS; i++) {
		seen += h->counts[i];
		if (seen >= want) {
			uint64_t top = bucket_top(i);
			return top < h->max ? top : h->max;
		}
	}
	return h->max;
}

void hdr_merge(struct hdr *into, const struct hdr *from)
{
	for (unsigned i = 0; i < HDR_BUCKETS; i++)
		into->counts[i] += from->counts[i];
	into->total += from->total;
	into->sum += from->sum;
	if (from->max > into->max)
		into->max = from->max;
}
