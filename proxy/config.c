/* config.c -- see config.h: the loader and its top level, the small
 * sections (threads, limits, admin and the single keys), what a reload may
 * not change, and freeing; the larger sections are in config_listen.c,
 * config_upstream.c and config_guest.c. Every error names the file, the key
 * path and what was expected; unknown keys are errors, so a typo is never
 * silently ignored. */
#include "config_impl.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "balancer.h"
#include "conf.h"
#include "metrics.h"

char *config_dup_or_null(const char *s)
{
	return s ? strdup(s) : NULL;
}

int config_get_string_dup(struct conf_ctx *c, json_t *obj, const char *section, const char *key,
			  bool required, char **out)
{
	const char *s = NULL;
	int r = conf_get_string(c, obj, section, key, required, &s);

	*out = config_dup_or_null(s);
	return s && !*out ? -ENOMEM : r;
}

static int parse_threads(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const keys[] = { "count", "cpus", NULL };
	json_t *t = NULL, *arr = NULL, *v;
	uint64_t count = 0;
	size_t i;
	int r = 0;

	if (conf_get_object(c, root, "", "threads", false, &t) < 0)
		return -EINVAL;
	if (!t)
		return 0;
	r |= conf_check_keys(c, t, "threads", keys);
	r |= conf_get_uint(c, t, "threads", "count", false, 0, 1024, &count);
	cfg->threads.count = (unsigned)count;
	r |= conf_get_array(c, t, "threads", "cpus", false, &arr);
	if (arr && json_array_size(arr)) {
		if (json_array_size(arr) > CPU_SETSIZE)
			return conf_error(c, "threads.cpus", "expected at most %d CPUs", CPU_SETSIZE);
		cfg->threads.cpus = calloc(json_array_size(arr), sizeof(int));
		if (!cfg->threads.cpus)
			return -ENOMEM;
		json_array_foreach(arr, i, v) {
			char p[64];
			conf_path_index(p, sizeof(p), "threads.cpus", i);
			if (!json_is_integer(v) || json_integer_value(v) < 0 ||
			    json_integer_value(v) >= CPU_SETSIZE) {
				r |= conf_error(c, p, "expected a CPU number in [0, %d]",
						CPU_SETSIZE - 1);
				continue;
			}
			for (size_t j = 0; j < i; j++)
				if (cfg->threads.cpus[j] == (int)json_integer_value(v))
					r |= conf_error(c, p, "CPU %d is listed twice",
							(int)json_integer_value(v));
			cfg->threads.cpus[i] = (int)json_integer_value(v);
		}
		cfg->threads.n_cpus = json_array_size(arr);
	}
	return r ? -EINVAL : 0;
}

static int parse_limits(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const keys[] = { "unconfirmed_bytes_per_vm",
					    "unconfirmed_bytes_per_thread", "max_connections",
					    "max_pending_lookups", NULL };
	json_t *l = NULL;
	uint64_t n;
	int r = 0;

	cfg->limits.unconfirmed_bytes_per_vm = 8u << 20;
	cfg->limits.unconfirmed_bytes_per_thread = 64u << 20;
	cfg->limits.max_connections = 65536;
	cfg->limits.max_pending_lookups = 256;
	if (conf_get_object(c, root, "", "limits", false, &l) < 0)
		return -EINVAL;
	if (!l)
		return 0;
	r |= conf_check_keys(c, l, "limits", keys);
	n = cfg->limits.unconfirmed_bytes_per_vm;
	r |= conf_get_uint(c, l, "limits", "unconfirmed_bytes_per_vm", false, 4096, 1ull << 40, &n);
	cfg->limits.unconfirmed_bytes_per_vm = n;
	n = cfg->limits.unconfirmed_bytes_per_thread;
	r |= conf_get_uint(c, l, "limits", "unconfirmed_bytes_per_thread", false, 4096, 1ull << 42,
			   &n);
	cfg->limits.unconfirmed_bytes_per_thread = n;
	r |= conf_get_u32(c, l, "limits", "max_connections", 1, 10000000, &cfg->limits.max_connections);
	r |= conf_get_u32(c, l, "limits", "max_pending_lookups", 1, 65536, &cfg->limits.max_pending_lookups);
	if (!r && cfg->limits.unconfirmed_bytes_per_vm > cfg->limits.unconfirmed_bytes_per_thread)
		r = conf_error(c, "limits.unconfirmed_bytes_per_vm",
			       "expected at most limits.unconfirmed_bytes_per_thread (%llu)",
			       (unsigned long long)cfg->limits.unconfirmed_bytes_per_thread);
	return r ? -EINVAL : 0;
}

static int parse_misc(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const admin_keys[] = { "socket", "group", NULL };
	static const char *const levels[] = { "error", "warn", "info", "debug", NULL };
	json_t *a = NULL, *b = NULL, *m = NULL;
	const char *s;
	unsigned lvl = 2;
	uint64_t n = 10000;
	int r = 0;

	r |= conf_get_object(c, root, "", "admin", false, &a);
	if (a) {
		r |= conf_check_keys(c, a, "admin", admin_keys);
		r |= config_get_string_dup(c, a, "admin", "socket", false, &cfg->admin.socket);
		r |= config_get_string_dup(c, a, "admin", "group", false, &cfg->admin.group);
	}
	r |= conf_get_uint(c, root, "", "drain_timeout_ms", false, 0, 3600000, &n);
	cfg->drain_timeout_ms = (uint32_t)n;
	r |= conf_get_enum(c, root, "", "log_level", false, levels, &lvl);
	cfg->log_level = strdup(levels[lvl]);
	s = NULL;
	r |= conf_get_string(c, root, "", "hostname", false, &s);
	if (s) {
		cfg->hostname = strdup(s);
	} else {
		char h[256] = "localhost";
		gethostname(h, sizeof(h) - 1);
		h[sizeof(h) - 1] = '\0';
		cfg->hostname = strdup(h);
	}
	r |= conf_get_object(c, root, "", "balancer", false, &b);
	r |= conf_get_object(c, root, "", "metrics", false, &m);
	cfg->balancer_raw = json_incref(b);
	cfg->metrics_raw = json_incref(m);
	/* Their own modules parse them again at start; validating them here
	 * means --check-config and a reload see the same errors as a start. */
	{
		struct balancer_config bc;
		struct metrics_config mc;

		if (b)
			r |= balancer_config_parse(c, b, &bc);
		if (m)
			r |= metrics_config_parse(c, m, &mc);
	}
	return r ? -EINVAL : 0;
}

int proxy_config_load(const char *file, struct proxy_config **out, char *err, size_t errlen)
{
	static const char *const keys[] = { "listeners", "identity",  "threads",
					    "upstream",	 "guest",     "inbox",	"limits",
					    "admin",	 "balancer",  "metrics",
					    "drain_timeout_ms", "log_level", "hostname", NULL };
	struct proxy_config *cfg;
	struct conf_ctx c;
	json_t *root = NULL;
	int r = 0;

	conf_ctx_init(&c, file);
	if (conf_load_file(&c, &root) < 0) {
		snprintf(err, errlen, "%s", c.err);
		return -EINVAL;
	}
	cfg = calloc(1, sizeof(*cfg));
	if (!cfg) {
		json_decref(root);
		snprintf(err, errlen, "%s: out of memory", file);
		return -ENOMEM;
	}
	cfg->file = strdup(file);
	r |= conf_check_keys(&c, root, "", keys);
	r |= config_parse_listeners(&c, root, cfg);
	r |= config_parse_identity(&c, root, cfg);
	if (r == 0)
		r |= config_check_listener_identity(&c, cfg);
	r |= parse_threads(&c, root, cfg);
	r |= config_parse_upstream(&c, root, cfg);
	r |= config_parse_guest(&c, root, cfg);
	r |= config_parse_inbox(&c, root, cfg);
	r |= parse_limits(&c, root, cfg);
	r |= parse_misc(&c, root, cfg);
	cfg->raw = root;
	if (r || c.nerr) {
		snprintf(err, errlen, "%s", c.nerr ? c.err : "out of memory");
		proxy_config_free(cfg);
		return c.nerr ? -EINVAL : -ENOMEM;
	}
	*out = cfg;
	return 0;
}

bool proxy_config_restart_key(const struct proxy_config *old, const struct proxy_config *new,
			      char *key, size_t keylen)
{
	static const char *const fixed[] = { "listeners", "threads", "upstream", "inbox", "limits",
					     "admin", "hostname", NULL };
	json_t *a, *b, *ia, *ib;
	const char *k;
	size_t i;

	/* identity: only appending static entries is applied at a reload. */
	ia = json_object_get(old->raw, "identity");
	ib = json_object_get(new->raw, "identity");
	if ((ia || ib) && !(ia && ib && json_equal(ia, ib))) {
		json_object_foreach(ia ? ia : ib, k, a) {
			b = json_object_get(ia ? ib : ia, k);
			if (strcmp(k, "static") != 0 && !(b && json_equal(a, b))) {
				snprintf(key, keylen, "identity.%s", k);
				return true;
			}
		}
		json_object_foreach(ib ? ib : ia, k, a) {
			if (strcmp(k, "static") != 0 && !json_object_get(ib ? ia : ib, k)) {
				snprintf(key, keylen, "identity.%s", k);
				return true;
			}
		}
		a = json_object_get(ia, "static");
		b = json_object_get(ib, "static");
		if (json_array_size(b) < json_array_size(a)) {
			snprintf(key, keylen, "identity.static");
			return true;
		}
		for (i = 0; i < json_array_size(a); i++) {
			if (!json_equal(json_array_get(a, i), json_array_get(b, i))) {
				snprintf(key, keylen, "identity.static[%zu]", i);
				return true;
			}
		}
	}
	for (i = 0; fixed[i]; i++) {
		a = json_object_get(old->raw, fixed[i]);
		b = json_object_get(new->raw, fixed[i]);
		if ((a || b) && !(a && b && json_equal(a, b))) {
			snprintf(key, keylen, "%s", fixed[i]);
			return true;
		}
	}
	/* The upstream links size their socket buffers from it at connect. */
	if (old->guest.max_message_bytes != new->guest.max_message_bytes) {
		snprintf(key, keylen, "guest.max_message_bytes");
		return true;
	}
	a = json_object_get(old->metrics_raw, "listen");
	b = json_object_get(new->metrics_raw, "listen");
	if ((a || b) && !(a && b && json_equal(a, b))) {
		snprintf(key, keylen, "metrics.listen");
		return true;
	}
	return false;
}

void proxy_config_free(struct proxy_config *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n_listeners; i++) {
		free(c->listeners[i].address);
		free(c->listeners[i].path);
		free(c->listeners[i].vm);
		free(c->listeners[i].uuid);
		free(c->listeners[i].uds_path);
		free(c->listeners[i].group);
	}
	free(c->listeners);
	free(c->identity.libvirt_uri);
	for (size_t i = 0; i < c->identity.n_statics; i++) {
		free(c->identity.statics[i].address);
		free(c->identity.statics[i].vm);
		free(c->identity.statics[i].uuid);
	}
	free(c->identity.statics);
	free(c->threads.cpus);
	for (size_t i = 0; i < c->upstream.n_hosts; i++) {
		free(c->upstream.hosts[i].host);
		free(c->upstream.hosts[i].server_name);
	}
	free(c->upstream.hosts);
	free(c->upstream.host);
	free(c->upstream.vhost);
	free(c->upstream.ca);
	free(c->upstream.cert);
	free(c->upstream.key);
	free(c->upstream.user);
	free(c->upstream.password);
	free(c->upstream.exchange);
	for (char **e = c->guest.allowed_exchanges; e && *e; e++)
		free(*e);
	free(c->guest.allowed_exchanges);
	free(c->inbox.name);
	free(c->inbox.exchange);
	free(c->admin.socket);
	free(c->admin.group);
	json_decref(c->balancer_raw);
	json_decref(c->metrics_raw);
	json_decref(c->raw);
	free(c->log_level);
	free(c->hostname);
	free(c->file);
	free(c);
}
