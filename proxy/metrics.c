/* metrics.c -- see metrics.h. A scrape asks every poll thread for its
 * report by mail (bounded wait), so the HTTP thread never reads a poll
 * thread's memory; connections and request time are bounded by MHD. */
#include "metrics.h"

#include <dirent.h>
#include <stdatomic.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "certfile.h"
#include "daemon.h"
#include "log.h"
#include "metrics_http.h"
#include "prom.h"
#include "report_json.h"

#define SCRAPE_QUERY_TIMEOUT_MS 2000

struct metrics_server {
	struct vmproxy *p;
	struct metrics_http *http;
	_Atomic bool per_vm; /* a reload changes it while scrapes run */
	char *tls_files[2];  /* upstream.tls.ca and .cert, for their expiry */
};

int metrics_config_parse(struct conf_ctx *c, json_t *obj, struct metrics_config *out)
{
	static const char *const keys[] = { "listen", "per_vm", NULL };
	const char *listen = NULL;
	int r = 0;

	memset(out, 0, sizeof(*out));
	if (!obj)
		return 0;
	if (!json_is_object(obj))
		return conf_error(c, "metrics", "expected an object");
	r |= conf_check_keys(c, obj, "metrics", keys);
	r |= conf_get_string(c, obj, "metrics", "listen", true, &listen);
	r |= conf_get_bool(c, obj, "metrics", "per_vm", false, &out->per_vm);
	if (listen) {
		struct sockaddr_in sa;

		if (metrics_http_parse_listen(listen, &sa) < 0)
			return conf_error(c, "metrics.listen",
					  "expected a numeric IPv4 \"ADDRESS:PORT\", got \"%.64s\"",
					  listen);
		snprintf(out->listen, sizeof(out->listen), "%s", listen);
	}
	return r ? -EINVAL : 0;
}

static double num(json_t *o, const char *k)
{
	return json_number_value(json_object_get(o, k));
}

static void process_metrics(struct prom_buf *b)
{
	struct rusage ru;
	long rss_pages = 0, page = sysconf(_SC_PAGESIZE);
	FILE *f = fopen("/proc/self/statm", "r");
	unsigned fds = 0;
	DIR *d;

	if (f) {
		if (fscanf(f, "%*s %ld", &rss_pages) != 1)
			rss_pages = 0;
		fclose(f);
	}
	prom_family(b, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
	prom_sample(b, "process_resident_memory_bytes", (double)rss_pages * (double)page, NULL);
	getrusage(RUSAGE_SELF, &ru);
	prom_family(b, "process_cpu_seconds_total", "counter", "User and system CPU time spent.");
	prom_sample(b, "process_cpu_seconds_total",
		    (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
			    (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6,
		    NULL);
	d = opendir("/proc/self/fd");
	if (d) {
		while (readdir(d))
			fds++;
		closedir(d);
		prom_family(b, "process_open_fds", "gauge", "Open file descriptors.");
		prom_sample(b, "process_open_fds", fds > 2 ? fds - 2 : 0, NULL);
	}
}

/* One family over every thread: VALUE_KEY of the thread object (or of its
 * "upstream" object when UP). */
static void per_thread(struct prom_buf *b, json_t *threads, const char *name, const char *type,
		       const char *help, const char *key, bool up)
{
	json_t *t;
	size_t i;

	prom_family(b, name, type, help);
	json_array_foreach(threads, i, t) {
		json_t *src = up ? json_object_get(t, "upstream") : t;
		json_t *v = json_object_get(src, key);
		char th[24];

		snprintf(th, sizeof(th), "%zu", i);
		prom_sample(b, name, json_is_boolean(v) ? (json_is_true(v) ? 1 : 0) : json_number_value(v),
			    "thread", th, NULL);
	}
}

/* The libvirt connection: without identity.libvirt_uri the families have
 * no sample. */
static void render_libvirt(struct prom_buf *b, const struct vm_identity_stats *lv)
{
	bool on = lv->libvirt_configured;

	prom_family(b, "vmproxy_libvirt_connected", "gauge",
		    "1 while the libvirt connection is up, 0 while it is being reopened.");
	if (on)
		prom_sample(b, "vmproxy_libvirt_connected", lv->libvirt_connected ? 1 : 0, NULL);
	prom_family(b, "vmproxy_libvirt_disconnects_total", "counter",
		    "libvirt connections lost (libvirtd gone, keepalive timeout).");
	if (on)
		prom_sample(b, "vmproxy_libvirt_disconnects_total", (double)lv->libvirt_disconnects, NULL);
	prom_family(b, "vmproxy_libvirt_reconnects_total", "counter",
		    "libvirt connections reopened after a loss.");
	if (on)
		prom_sample(b, "vmproxy_libvirt_reconnects_total", (double)lv->libvirt_reconnects, NULL);
	prom_family(b, "vmproxy_libvirt_reconnect_failures_total", "counter",
		    "Attempts to reopen the libvirt connection that failed.");
	if (on)
		prom_sample(b, "vmproxy_libvirt_reconnect_failures_total",
			    (double)lv->libvirt_reconnect_failures, NULL);
	prom_family(b, "vmproxy_libvirt_served_from_cache_total", "counter",
		    "Peers identified from the caches while libvirt was unreachable.");
	if (on)
		prom_sample(b, "vmproxy_libvirt_served_from_cache_total",
			    (double)lv->served_unreachable, NULL);
}

/* Daemon-wide counters (vmproxy_counters). */
static void render_daemon(struct prom_buf *b, const struct vmproxy_counters *c)
{
	prom_family(b, "vmproxy_build_info", "gauge", "vmproxyd version.");
	prom_sample(b, "vmproxy_build_info", 1, "version", VMPROXY_VERSION, NULL);
	prom_family(b, "vmproxy_connections_accepted_total", "counter",
		    "Guest connections accepted and delegated to a poll thread.");
	prom_sample(b, "vmproxy_connections_accepted_total", (double)c->accepted, NULL);
	prom_family(b, "vmproxy_connections_refused_total", "counter",
		    "Guest connections refused, by reason.");
	prom_sample(b, "vmproxy_connections_refused_total", (double)c->refused_unknown_peer,
		    "reason", "unknown_peer", NULL);
	prom_sample(b, "vmproxy_connections_refused_total", (double)c->refused_limit,
		    "reason", "limit", NULL);
	prom_sample(b, "vmproxy_connections_refused_total",
		    (double)c->refused_libvirt_unreachable, "reason", "libvirt_unreachable",
		    NULL);
	prom_sample(b, "vmproxy_connections_refused_total",
		    (double)c->refused_lookups_pending, "reason", "lookups_pending", NULL);
	prom_family(b, "vmproxy_identity_lookups_pending", "gauge",
		    "New connections waiting for an identity lookup that asks libvirt.");
	prom_sample(b, "vmproxy_identity_lookups_pending", (double)c->lookups_pending, NULL);
	render_libvirt(b, &c->libvirt);
	prom_family(b, "vmproxy_vm_stops_total", "counter",
		    "libvirt lifecycle events that ended a VM here.");
	prom_sample(b, "vmproxy_vm_stops_total", (double)c->vms_gone, NULL);
	prom_family(b, "vmproxy_draining", "gauge", "1 while shutting down.");
	prom_sample(b, "vmproxy_draining", c->draining ? 1 : 0, NULL);
}

/* Per poll thread. */
static void render_threads(struct prom_buf *b, json_t *threads)
{
	per_thread(b, threads, "vmproxy_thread_connections", "gauge",
		   "Guest connections served by the poll thread.", "connections", false);
	per_thread(b, threads, "vmproxy_thread_vms", "gauge", "VMs delegated to the poll thread.",
		   "vm_count", false);
	per_thread(b, threads, "vmproxy_thread_messages_in_total", "counter",
		   "Messages received from guests.", "messages_in", false);
	per_thread(b, threads, "vmproxy_thread_bytes_in_total", "counter",
		   "Message body bytes received from guests.", "bytes_in", false);
	per_thread(b, threads, "vmproxy_thread_messages_out_total", "counter",
		   "Messages published on the upstream link.", "messages_out", false);
	per_thread(b, threads, "vmproxy_thread_bytes_out_total", "counter",
		   "Message body bytes published on the upstream link.", "bytes_out", false);
	per_thread(b, threads, "vmproxy_thread_guest_reads_total", "counter",
		   "recv() calls on guest sockets.", "guest_reads", false);
	per_thread(b, threads, "vmproxy_thread_guest_writes_total", "counter",
		   "send() calls on guest sockets.", "guest_writes", false);
	per_thread(b, threads, "vmproxy_thread_held_messages", "gauge",
		   "Messages held until the broker confirms them.", "held_messages", false);
	per_thread(b, threads, "vmproxy_thread_held_bytes", "gauge",
		   "Bytes held until the broker confirms them.", "held_bytes", false);
	per_thread(b, threads, "vmproxy_thread_blocked", "gauge",
		   "1 while the thread is over its unconfirmed-bytes bound.", "blocked", false);
	per_thread(b, threads, "vmproxy_thread_cpu_seconds_total", "counter",
		   "CPU time of the poll thread.", "cpu_seconds", false);
	per_thread(b, threads, "vmproxy_thread_loop_busy_seconds_total", "counter",
		   "Time the poll thread spent handling events.", "loop_busy_seconds", false);
	per_thread(b, threads, "vmproxy_thread_migrations_in_total", "counter",
		   "VMs moved to this thread.", "migrations_in", false);
	per_thread(b, threads, "vmproxy_thread_migrations_out_total", "counter",
		   "VMs moved away from this thread.", "migrations_out", false);
}

/* Per upstream link (one per poll thread). */
static void render_links(struct prom_buf *b, json_t *threads)
{
	json_t *t;
	size_t i;

	prom_family(b, "vmproxy_upstream_up", "gauge", "1 while the thread's broker link is up.");
	json_array_foreach(threads, i, t) {
		json_t *u = json_object_get(t, "upstream");
		char th[24];
		snprintf(th, sizeof(th), "%zu", i);
		prom_sample(b, "vmproxy_upstream_up", json_is_true(json_object_get(u, "up")),
			    "thread", th, "node", json_string_value(json_object_get(u, "node")), NULL);
	}
	per_thread(b, threads, "vmproxy_upstream_published_total", "counter",
		   "Messages published on the link (republished ones again).", "published", true);
	per_thread(b, threads, "vmproxy_upstream_acked_total", "counter",
		   "Publisher confirms (acks) from the broker.", "acked", true);
	per_thread(b, threads, "vmproxy_upstream_nacked_total", "counter",
		   "Publisher nacks from the broker.", "nacked", true);
	per_thread(b, threads, "vmproxy_upstream_republished_total", "counter",
		   "Messages handed back for republishing after a link loss.", "republished", true);
	per_thread(b, threads, "vmproxy_upstream_returned_total", "counter",
		   "Mandatory messages the broker returned as unroutable (sent back to the guest).",
		   "returned", true);
	per_thread(b, threads, "vmproxy_upstream_delivered_total", "counter",
		   "Inbox deliveries from the broker to guest consumers.", "delivered", true);
	per_thread(b, threads, "vmproxy_upstream_deliveries_refused_total", "counter",
		   "Inbox deliveries over inbox.max_message_bytes, rejected at the broker.",
		   "deliveries_refused", true);
	per_thread(b, threads, "vmproxy_upstream_connects_total", "counter",
		   "Successful link connects (the first one included).", "connects", true);
	per_thread(b, threads, "vmproxy_upstream_unconfirmed", "gauge",
		   "Messages published and not yet confirmed.", "unconfirmed", true);
	per_thread(b, threads, "vmproxy_upstream_broker_blocked", "gauge",
		   "1 while the broker has blocked the link (resource alarm).", "broker_blocked",
		   true);
	per_thread(b, threads, "vmproxy_upstream_writes_total", "counter",
		   "Write calls (SSL_write, or send without TLS) on the link.", "writes", true);
	per_thread(b, threads, "vmproxy_upstream_reads_total", "counter",
		   "Read calls (SSL_read, or recv without TLS) on the link.", "reads", true);
	prom_family(b, "vmproxy_upstream_refusals_total", "counter",
		    "Links the broker closed with a 4xx or 5xx reply code, by code.");
	json_array_foreach(threads, i, t) {
		json_t *r, *refusals = json_object_get(json_object_get(t, "upstream"), "refusals");
		const char *code;
		char th[24];

		snprintf(th, sizeof(th), "%zu", i);
		json_object_foreach(refusals, code, r)
			prom_sample(b, "vmproxy_upstream_refusals_total", json_number_value(r),
				    "thread", th, "code", code, NULL);
	}
}

/* Per VM (metrics.per_vm). */
static void render_vms(struct prom_buf *b, json_t *threads)
{
	static const struct {
		const char *name, *type, *help, *key;
	} fams[] = {
		{ "vmproxy_vm_connections", "gauge", "Guest connections of the VM.",
		  "connections" },
		{ "vmproxy_vm_messages_in_total", "counter", "Messages received from the VM.",
		  "messages_in" },
		{ "vmproxy_vm_bytes_in_total", "counter", "Body bytes received from the VM.",
		  "bytes_in" },
		{ "vmproxy_vm_held_bytes", "gauge", "Bytes of the VM held for confirms.",
		  "held_bytes" },
	};
	json_t *t, *v;
	size_t i, j;

	for (size_t f = 0; f < sizeof(fams) / sizeof(fams[0]); f++) {
		prom_family(b, fams[f].name, fams[f].type, fams[f].help);
		json_array_foreach(threads, i, t) {
			char th[24];
			snprintf(th, sizeof(th), "%zu", i);
			json_array_foreach(json_object_get(t, "vms"), j, v)
				prom_sample(b, fams[f].name, num(v, fams[f].key), "vm_uuid",
					    json_string_value(json_object_get(v, "uuid")),
					    "vm_name",
					    json_string_value(json_object_get(v, "name")),
					    "thread", th, NULL);
		}
	}
}

char *metrics_render(json_t *threads, const struct vmproxy_counters *counters, bool per_vm)
{
	struct prom_buf b;

	prom_init(&b);
	render_daemon(&b, counters);
	render_threads(&b, threads);
	render_links(&b, threads);
	if (per_vm)
		render_vms(&b, threads);
	process_metrics(&b);
	if (b.oom) {
		prom_free(&b);
		return NULL;
	}
	return b.data;
}

static char *render(void *ud)
{
	struct metrics_server *m = ud;
	unsigned n = 0;
	struct poll_report *r = vmproxy_query_threads(m->p, SCRAPE_QUERY_TIMEOUT_MS, &n);
	json_t *threads = r ? report_json_threads(r, n, true) : NULL;
	struct vmproxy_counters counters;
	char *body;
	struct prom_buf certs;

	vmproxy_counters(m->p, &counters);
	body = metrics_render(threads, &counters, atomic_load(&m->per_vm));
	json_decref(threads);
	poll_reports_free(r, n);
	vmproxy_counters_release(&counters);
	if (!body)
		return NULL;
	prom_init(&certs);
	certfile_prom_expiry(&certs, (const char *const *)m->tls_files, 2);
	if (!certs.oom && certs.len) {
		size_t len = strlen(body);
		char *all = realloc(body, len + certs.len + 1);

		if (all) {
			memcpy(all + len, certs.data, certs.len);
			all[len + certs.len] = '\0';
			body = all;
		}
	}
	prom_free(&certs);
	return body;
}

void metrics_set_per_vm(struct metrics_server *m, bool per_vm)
{
	if (m)
		atomic_store(&m->per_vm, per_vm);
}

int metrics_start(struct vmproxy *p, const struct metrics_config *cfg,
		  struct metrics_server **out, char *err, size_t errlen)
{
	struct metrics_server *m;
	int r;

	*out = NULL;
	if (!cfg->listen[0])
		return 0;
	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->p = p;
	atomic_store(&m->per_vm, cfg->per_vm);
	{
		const struct proxy_config *pc = vmproxy_config(p);

		m->tls_files[0] = pc->upstream.ca ? strdup(pc->upstream.ca) : NULL;
		m->tls_files[1] = pc->upstream.cert ? strdup(pc->upstream.cert) : NULL;
	}
	r = metrics_http_start(cfg->listen, render, m, &m->http);
	if (r < 0) {
		snprintf(err, errlen, "metrics.listen %s: cannot listen (address in use?)",
			 cfg->listen);
		free(m->tls_files[0]);
		free(m->tls_files[1]);
		free(m);
		return r;
	}
	log_info("metrics on http://%s/metrics", cfg->listen);
	*out = m;
	return 0;
}

void metrics_stop(struct metrics_server *m)
{
	if (!m)
		return;
	metrics_http_stop(m->http);
	free(m->tls_files[0]);
	free(m->tls_files[1]);
	free(m);
}
