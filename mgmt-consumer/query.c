/* query.c -- see query.h */
#include "query.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "consumer.h"

int64_t query_parse_duration(const char *s)
{
	char *end;
	unsigned long long v;
	int64_t unit = 1000;

	if (!s || *s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || v > 100000000ull)
		return -1;
	if (*end) {
		switch (*end) {
		case 's':
			unit = 1000;
			break;
		case 'm':
			unit = 60000;
			break;
		case 'h':
			unit = 3600000;
			break;
		case 'd':
			unit = 86400000;
			break;
		default:
			return -1;
		}
		if (end[1])
			return -1;
	}
	return (int64_t)v * unit;
}

static void iso(int64_t ms, char *out, size_t len)
{
	time_t t = (time_t)(ms / 1000);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* ---- the latest sample of each VM ------------------------------------------ */

static const char latest_sql[] =
        "SELECT v.uuid, v.name, v.last_seen_ms, v.last_host, s.boot_id, s.seq, s.time_ms, "
        "s.interval_s, s.cpu_busy_percent, s.memory_used_percent, s.memory_available_bytes, "
        "s.load1, s.disk_read_bytes_per_second, s.disk_write_bytes_per_second, "
        "s.network_receive_bytes_per_second, s.network_transmit_bytes_per_second "
        "FROM vms v LEFT JOIN samples s ON s.id = (SELECT id FROM samples "
        "WHERE vm_uuid = v.uuid ORDER BY time_ms DESC, seq DESC LIMIT 1) "
        "ORDER BY v.name, v.uuid";

struct latest {
	bool json, only_stale;
	int64_t now_ms;
	uint64_t stale_after;
	json_t *out;
	size_t rows;
};

static json_t *num_or_null(const char *v, bool integer)
{
	if (!v)
		return json_null();
	return integer ? json_integer(strtoll(v, NULL, 10)) : json_real(strtod(v, NULL));
}

static int latest_row(void *ud, int ncols, const char *const *c)
{
	struct latest *l = ud;
	int64_t seen = c[2] ? strtoll(c[2], NULL, 10) : 0;
	int64_t interval = c[7] ? strtoll(c[7], NULL, 10) : 0;
	bool stale;

	if (ncols < 16)
		return -1;
	if (interval <= 0)
		interval = 10;
	/* As on /metrics: stale after stale_after_intervals of its interval. */
	stale = l->now_ms - seen > (int64_t)l->stale_after * interval * 1000;
	if (l->only_stale && !stale)
		return 0;
	l->rows++;
	if (l->json) {
		json_t *o = json_pack("{s:s, s:o, s:I, s:o, s:b, s:o, s:o, s:o}", "vm_uuid", c[0],
		                      "vm_name", c[1] ? json_string(c[1]) : json_null(),
		                      "last_seen_ms", (json_int_t)seen, "last_host",
		                      c[3] ? json_string(c[3]) : json_null(), "stale", stale,
		                      "boot_id", c[4] ? json_string(c[4]) : json_null(), "seq",
		                      num_or_null(c[5], true), "time_ms", num_or_null(c[6], true));
		for (int g = 0; g < STORE_NGAUGES; g++)
			json_object_set_new(o, store_gauge_columns[g],
			                    num_or_null(c[8 + g], false));
		json_array_append_new(l->out, o);
	} else {
		char when[32];

		iso(seen, when, sizeof(when));
		printf("%-36s  %-20s  %-20s  %-5s  %10s  %8.2f  %8.2f  %8.2f\n", c[0],
		       c[1] ? c[1] : "-", when, stale ? "yes" : "no", c[5] ? c[5] : "-",
		       c[8] ? strtod(c[8], NULL) : 0.0, c[9] ? strtod(c[9], NULL) : 0.0,
		       c[11] ? strtod(c[11], NULL) : 0.0);
	}
	return 0;
}

/* ---- one VM's series ---------------------------------------------------- */

struct series {
	bool json;
	json_t *out;
	size_t rows;
};

static int series_row(void *ud, int ncols, const char *const *c)
{
	struct series *q = ud;

	if (ncols < 4)
		return -1;
	q->rows++;
	if (q->json) {
		json_array_append_new(q->out, json_pack("{s:I, s:I, s:s, s:o}", "time_ms",
		                                        (json_int_t)strtoll(c[0], NULL, 10), "seq",
		                                        (json_int_t)strtoll(c[1], NULL, 10),
		                                        "boot_id", c[2] ? c[2] : "", "value",
		                                        num_or_null(c[3], false)));
	} else {
		char when[32];

		iso(strtoll(c[0], NULL, 10), when, sizeof(when));
		printf("%-20s  %13s  %10s  %s\n", when, c[0], c[1], c[3] ? c[3] : "-");
	}
	return 0;
}

struct uuids {
	char uuid[64];
	size_t n;
};

static int uuid_row(void *ud, int ncols, const char *const *c)
{
	struct uuids *u = ud;

	if (ncols >= 1 && c[0] && u->n++ == 0)
		snprintf(u->uuid, sizeof(u->uuid), "%s", c[0]);
	return 0;
}

int query_vm_uuid(struct store *st, const char *vm, char *uuid, size_t len)
{
	const char *p[1] = {vm};
	struct uuids u = {"", 0};

	if (store_select(st, "SELECT uuid FROM vms WHERE uuid = $1", 1, p, uuid_row, &u) < 0 ||
	    (!u.n && store_select(st, "SELECT uuid FROM vms WHERE name = $1 ORDER BY uuid", 1, p,
	                          uuid_row, &u) < 0))
		return -EIO;
	if (u.n != 1)
		return u.n ? -EEXIST : -ENOENT;
	snprintf(uuid, len, "%s", u.uuid);
	return 0;
}

static void query_usage(FILE *f)
{
	fprintf(f, "Usage: vmproxy-consumer query --config FILE [--stale] [--json]\n"
	           "       vmproxy-consumer query --config FILE --vm NAME|UUID --metric M\n"
	           "                              [--since DUR] [--until DUR] [--json]\n"
	           "DUR: a time before now: 90s, 15m, 1h, 7d (--since 1h by default).\n"
	           "Metrics:");
	for (int g = 0; g < STORE_NGAUGES; g++)
		fprintf(f, " %s", store_gauge_columns[g]);
	fprintf(f, "\n");
}

int query_main(int argc, char **argv)
{
	static const struct option opts[] = {
	        {"config", 1, NULL, 'c'}, {"stale", 0, NULL, 's'},  {"json", 0, NULL, 'j'},
	        {"vm", 1, NULL, 'v'},     {"metric", 1, NULL, 'm'}, {"since", 1, NULL, 'S'},
	        {"until", 1, NULL, 'U'},  {"help", 0, NULL, 'h'},   {NULL, 0, NULL, 0},
	};
	const char *config = NULL, *vm = NULL, *metric = NULL, *since = "1h", *until = NULL;
	bool json = false, only_stale = false;
	struct ccfg c;
	struct store *st = NULL;
	json_t *root = NULL, *out = NULL;
	char dbpath[600], err[600];
	int ch, rc = 1, col = -1;

	consumer_config_defaults(&c);
	optind = 1;
	while ((ch = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			config = optarg;
			break;
		case 's':
			only_stale = true;
			break;
		case 'j':
			json = true;
			break;
		case 'v':
			vm = optarg;
			break;
		case 'm':
			metric = optarg;
			break;
		case 'S':
			since = optarg;
			break;
		case 'U':
			until = optarg;
			break;
		case 'h':
			query_usage(stdout);
			return 0;
		default:
			query_usage(stderr);
			return 2;
		}
	}
	if (!config || optind != argc || (!vm != !metric) || (vm && only_stale)) {
		query_usage(stderr);
		return 2;
	}
	if (metric) {
		for (int g = 0; g < STORE_NGAUGES; g++)
			if (!strcmp(metric, store_gauge_columns[g]))
				col = g;
		if (col < 0) {
			fprintf(stderr, "vmproxy-consumer query: --metric: unknown metric \"%s\"\n",
			        metric);
			query_usage(stderr);
			return 2;
		}
	}
	if (query_parse_duration(since) < 0 || (until && query_parse_duration(until) < 0)) {
		fprintf(stderr, "vmproxy-consumer query: --since/--until: expected a duration "
		                "such as 90s, 15m, 1h or 7d\n");
		return 2;
	}
	if (consumer_parse_config(config, &c, &root) < 0)
		return 1;
	consumer_store_options(&c, dbpath, sizeof(dbpath));
	c.store.existing = true;
	if (c.store.kind == STORE_JSONL) {
		fprintf(stderr,
		        "vmproxy-consumer query: %s: sink.type is jsonl; the JSON Lines "
		        "files are read with jq or grep\n",
		        config);
		goto out;
	}
	if (store_open(&c.store, &st, err, sizeof(err)) < 0) {
		fprintf(stderr, "vmproxy-consumer query: %s\n", err);
		goto out;
	}
	out = json ? json_array() : NULL;
	if (!vm) {
		struct latest l = {json,          only_stale, (int64_t)clock_wall_ms(),
		                   c.stale_after, out,        0};

		if (!json)
			printf("%-36s  %-20s  %-20s  %-5s  %10s  %8s  %8s  %8s\n", "VM_UUID",
			       "NAME", "LAST_SEEN", "STALE", "SEQ", "CPU%", "MEM%", "LOAD1");
		if (store_select(st, latest_sql, 0, NULL, latest_row, &l) < 0) {
			fprintf(stderr, "vmproxy-consumer query: %s\n", store_error(st));
			goto out;
		}
	} else {
		int64_t now = (int64_t)clock_wall_ms();
		char from[24], to[24], sql[512];
		const char *p[3] = {vm, from, to};
		struct uuids u = {"", 0};
		struct series q = {json, out, 0};
		int e = query_vm_uuid(st, vm, u.uuid, sizeof(u.uuid));

		if (e == -EIO) {
			fprintf(stderr, "vmproxy-consumer query: %s\n", store_error(st));
			goto out;
		}
		if (e < 0) {
			fprintf(stderr, "vmproxy-consumer query: --vm \"%s\": %s\n", vm,
			        e == -EEXIST ? "more than one VM has that name: give its uuid"
			                     : "no such VM in the store");
			goto out;
		}
		snprintf(from, sizeof(from), "%" PRId64, now - query_parse_duration(since));
		snprintf(to, sizeof(to), "%" PRId64,
		         until ? now - query_parse_duration(until) : INT64_MAX);
		p[0] = u.uuid;
		/* The column name comes from store_gauge_columns, never the user. */
		snprintf(sql, sizeof(sql),
		         "SELECT time_ms, seq, boot_id, %s FROM samples WHERE vm_uuid = $1 AND "
		         "time_ms >= CAST($2 AS BIGINT) AND time_ms <= CAST($3 AS BIGINT) "
		         "ORDER BY time_ms, seq",
		         store_gauge_columns[col]);
		if (!json)
			printf("%-20s  %13s  %10s  %s\n", "TIME", "TIME_MS", "SEQ", metric);
		if (store_select(st, sql, 3, p, series_row, &q) < 0) {
			fprintf(stderr, "vmproxy-consumer query: %s\n", store_error(st));
			goto out;
		}
	}
	if (json) {
		char *text = json_dumps(out, JSON_INDENT(1));
		if (text)
			puts(text);
		free(text);
	}
	rc = 0;
out:
	json_decref(out);
	store_close(st);
	json_decref(root);
	return rc;
}
