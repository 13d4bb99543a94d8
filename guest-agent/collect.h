/* collect.h -- guest metrics from /proc and /sys (under a root prefix, so
 * tests read fixture trees): one JSON document per sample, with rates and
 * percentages over the interval since the previous sample. */
#pragma once

#include <jansson.h>
#include <stdint.h>
#include <sys/statvfs.h>

#define COLLECT_MAX_ITEMS 1024 /* CPUs, disks, interfaces, mounts: past it, counted and dropped */

struct collect_cpu {
	uint64_t t[8]; /* user nice system idle iowait irq softirq steal, in ticks */
};

struct collect_dev {
	char name[64];
	uint64_t a, b; /* disks: read and written bytes; interfaces: rx and tx bytes */
};

struct collect_state {
	const char *root; /* "" for the real /proc and /sys */
	int (*statvfs_fn)(const char *path, struct statvfs *st);
	uint64_t prev_ms; /* monotonic time of the previous sample, 0 before the first */
	unsigned ncpu;
	struct collect_cpu prev_total, prev_cpu[COLLECT_MAX_ITEMS];
	unsigned ndisk, nnet;
	struct collect_dev prev_disk[COLLECT_MAX_ITEMS], prev_net[COLLECT_MAX_ITEMS];
	uint64_t dropped; /* items past COLLECT_MAX_ITEMS or unparsable lines */
};

/* ROOT "" reads the live system. */
void collect_init(struct collect_state *st, const char *root);

/* The boot id (36 characters) into BUF; 0 or -errno. */
int collect_boot_id(struct collect_state *st, char *buf, size_t len);

/* Every real in a sample is rounded to COLLECT_DECIMALS decimals of its
 * unit (seconds, percent, bytes per second), the resolution of its sources:
 * /proc/stat ticks and /proc/uptime are 1/100 s, /proc/loadavg has two
 * decimals. */
#define COLLECT_DECIMALS 2

/* One sample document without "seq" (the caller adds it), taken at
 * NOW_MONO_MS and stamped with WALL_MS. A new reference; NULL on
 * allocation failure. */
json_t *collect_sample(struct collect_state *st, uint64_t now_mono_ms, uint64_t wall_ms,
		       unsigned interval_s);

/* DOC as JSON text (json_dumps FLAGS) with each real printed as its
 * shortest decimal form: 3.68, not 3.6800000000000002. A string the caller
 * frees; NULL on allocation failure. */
char *collect_format(const json_t *doc, size_t flags);
