/* metrics.h -- vmproxyd's Prometheus endpoint (libmicrohttpd): per-thread and
 * per-upstream-link series gathered by query mail, process metrics, and
 * per-VM totals when enabled (they cost one series set per VM). */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "conf.h"

struct metrics_config {
	char listen[128]; /* "127.0.0.1:9464"; empty: no endpoint */
	bool per_vm;
};

/* The "metrics" object of the config file (NULL: no endpoint). */
int metrics_config_parse(struct conf_ctx *c, json_t *obj, struct metrics_config *out);

struct vmproxy;
struct metrics_server;

int metrics_start(struct vmproxy *p, const struct metrics_config *cfg,
		  struct metrics_server **out, char *err, size_t errlen);
void metrics_stop(struct metrics_server *m);

/* A reload changed metrics.per_vm; accepts NULL (no endpoint). */
void metrics_set_per_vm(struct metrics_server *m, bool per_vm);

struct vmproxy_counters;

/* The exposition text for THREADS (report_json_threads of
 * vmproxy_query_threads) and COUNTERS (vmproxy_counters): malloc'd,
 * NUL-terminated; NULL on allocation failure. */
char *metrics_render(json_t *threads, const struct vmproxy_counters *counters, bool per_vm);
