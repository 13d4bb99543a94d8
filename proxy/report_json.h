/* report_json.h -- poll thread reports and the daemon's counters as the
 * JSON the admin socket and /metrics serve: the one place the daemon's
 * typed reports become text keys (docs/admin.md names them). */
#pragma once

#include <jansson.h>

#include "poll_thread.h"

/* One object per report (thread order), each with its "upstream" object
 * and, when WITH_VMS, its "vms" array. A new reference. */
json_t *report_json_threads(const struct poll_report *r, unsigned n, bool with_vms);

struct thread_rates;
struct vmproxy_counters;

/* The per-thread rates L (N of them, in thread order): an array of
 * objects with messages and bytes in and out per second, CPU percent and
 * the gauges. A new reference. */
json_t *report_json_load(const struct thread_rates *l, unsigned n);

/* The admin socket's "daemon" object from C (docs/admin.md). A new
 * reference. */
json_t *report_json_counters(const struct vmproxy_counters *c);
