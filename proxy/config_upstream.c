/* config_upstream.c -- the configuration's "upstream" section: the broker
 * nodes, TLS files, authentication and the link's timers. Part of the
 * loader behind config.h. */
#include "config_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int check_readable(struct conf_ctx *c, const char *path, const char *file)
{
	if (file && access(file, R_OK) < 0)
		return conf_error(c, path, "cannot read \"%s\": %s", file, strerror(errno));
	return 0;
}

/* upstream.host or upstream.hosts (one of them required; host alone is
 * a list of one). 0, -EINVAL (reported) or -ENOMEM. */
static int parse_upstream_hosts(struct conf_ctx *c, json_t *u, struct proxy_config *cfg)
{
	static const char *const host_keys[] = { "host", "port", "server_name", NULL };
	json_t *hosts = NULL, *v;
	const char *s = NULL;
	size_t i;
	int r = 0;

	r |= conf_get_array(c, u, "upstream", "hosts", false, &hosts);
	r |= conf_get_string(c, u, "upstream", "host", !hosts, &s);
	if (hosts) {
		if (json_array_size(hosts) == 0 || json_array_size(hosts) > 64)
			return conf_error(c, "upstream.hosts", "expected 1 to 64 broker nodes");
		cfg->upstream.hosts = calloc(json_array_size(hosts), sizeof(*cfg->upstream.hosts));
		if (!cfg->upstream.hosts)
			return -ENOMEM;
		json_array_foreach(hosts, i, v) {
			struct upstream_host *h = &cfg->upstream.hosts[i];
			const char *hs = NULL, *sn = NULL;
			uint64_t hp = cfg->upstream.port;
			char p[64];

			conf_path_index(p, sizeof(p), "upstream.hosts", i);
			cfg->upstream.n_hosts = i + 1;
			if (!json_is_object(v)) {
				r |= conf_error(c, p, "expected an object");
				continue;
			}
			r |= conf_check_keys(c, v, p, host_keys);
			r |= conf_get_string(c, v, p, "host", true, &hs);
			r |= conf_get_uint(c, v, p, "port", false, 1, 65535, &hp);
			r |= conf_get_string(c, v, p, "server_name", false, &sn);
			h->host = config_dup_or_null(hs);
			h->port = (uint16_t)hp;
			h->server_name = config_dup_or_null(sn);
		}
		if (!s && cfg->upstream.hosts[0].host) {
			cfg->upstream.host = strdup(cfg->upstream.hosts[0].host);
			cfg->upstream.port = cfg->upstream.hosts[0].port;
		}
	}
	if (s)
		cfg->upstream.host = strdup(s);
	if (!hosts && cfg->upstream.host) {
		cfg->upstream.hosts = calloc(1, sizeof(*cfg->upstream.hosts));
		if (!cfg->upstream.hosts)
			return -ENOMEM;
		cfg->upstream.hosts[0].host = strdup(cfg->upstream.host);
		cfg->upstream.hosts[0].port = cfg->upstream.port;
		cfg->upstream.n_hosts = 1;
	}
	return r ? -EINVAL : 0;
}

/* upstream.tls: the CA, an optional client certificate and key, readable. */
static int parse_upstream_tls(struct conf_ctx *c, json_t *tls, struct proxy_config *cfg)
{
	static const char *const tls_keys[] = { "ca", "cert", "key", "verify_hostname", NULL };
	int r = 0;

	r |= conf_check_keys(c, tls, "upstream.tls", tls_keys);
	r |= config_get_string_dup(c, tls, "upstream.tls", "ca", true, &cfg->upstream.ca);
	r |= check_readable(c, "upstream.tls.ca", cfg->upstream.ca);
	r |= config_get_string_dup(c, tls, "upstream.tls", "cert", false, &cfg->upstream.cert);
	r |= check_readable(c, "upstream.tls.cert", cfg->upstream.cert);
	r |= config_get_string_dup(c, tls, "upstream.tls", "key", cfg->upstream.cert != NULL, &cfg->upstream.key);
	r |= check_readable(c, "upstream.tls.key", cfg->upstream.key);
	r |= conf_get_bool(c, tls, "upstream.tls", "verify_hostname", false,
			   &cfg->upstream.verify_hostname);
	return r;
}

/* upstream.auth: PLAIN with user and password, or EXTERNAL with the
 * client certificate. */
static int parse_upstream_auth(struct conf_ctx *c, json_t *u, struct proxy_config *cfg)
{
	static const char *const auth_keys[] = { "mechanism", "user", "password", NULL };
	static const char *const mechs[] = { "PLAIN", "EXTERNAL", NULL };
	json_t *auth = NULL;
	unsigned mech = 0;
	int r = 0;

	r |= conf_get_object(c, u, "upstream", "auth", false, &auth);
	if (auth) {
		r |= conf_check_keys(c, auth, "upstream.auth", auth_keys);
		r |= conf_get_enum(c, auth, "upstream.auth", "mechanism", false, mechs, &mech);
		r |= config_get_string_dup(c, auth, "upstream.auth", "user", false, &cfg->upstream.user);
		r |= config_get_string_dup(c, auth, "upstream.auth", "password", false, &cfg->upstream.password);
	}
	cfg->upstream.mechanism = mech == 1 ? BROKER_AUTH_EXTERNAL : BROKER_AUTH_PLAIN;
	if (cfg->upstream.mechanism == BROKER_AUTH_EXTERNAL && !cfg->upstream.cert)
		r |= conf_error(c, "upstream.auth.mechanism",
				"EXTERNAL needs upstream.tls with a client \"cert\" and \"key\"");
	if (cfg->upstream.mechanism == BROKER_AUTH_PLAIN &&
	    (!cfg->upstream.user || !cfg->upstream.password))
		r |= conf_error(c, "upstream.auth", "PLAIN needs \"user\" and \"password\"");
	return r;
}

int config_parse_upstream(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const keys[] = { "host",	 "hosts",     "port",
					    "vhost",	 "tls",	      "auth",
					    "exchange",	 "heartbeat", "connect_timeout_ms",
					    "stuck_timeout_ms", "max_in_flight", NULL };
	json_t *u = NULL, *tls = NULL;
	const char *s;
	uint64_t n;
	int r = 0, r2;

	if (conf_get_object(c, root, "", "upstream", true, &u) < 0)
		return -EINVAL;
	r |= conf_check_keys(c, u, "upstream", keys);
	r |= conf_get_object(c, u, "upstream", "tls", false, &tls);
	cfg->upstream.tls = tls != NULL;
	n = cfg->upstream.tls ? 5671 : 5672;
	r |= conf_get_uint(c, u, "upstream", "port", false, 1, 65535, &n);
	cfg->upstream.port = (uint16_t)n;
	r2 = parse_upstream_hosts(c, u, cfg);
	if (r2 < 0 && r2 != -EINVAL)
		return r2;
	r |= r2;
	s = "/";
	r |= conf_get_string(c, u, "upstream", "vhost", false, &s);
	cfg->upstream.vhost = strdup(s);
	r |= config_get_string_dup(c, u, "upstream", "exchange", true, &cfg->upstream.exchange);
	cfg->upstream.heartbeat = 30;
	r |= conf_get_u16(c, u, "upstream", "heartbeat", 0, 3600, &cfg->upstream.heartbeat);
	cfg->upstream.connect_timeout_ms = 10000;
	r |= conf_get_u32(c, u, "upstream", "connect_timeout_ms", 100, 600000, &cfg->upstream.connect_timeout_ms);
	cfg->upstream.stuck_timeout_ms = 30000;
	r |= conf_get_u32(c, u, "upstream", "stuck_timeout_ms", 1000, 3600000, &cfg->upstream.stuck_timeout_ms);
	cfg->upstream.max_in_flight = 256;
	r |= conf_get_u32(c, u, "upstream", "max_in_flight", 1, 1000000, &cfg->upstream.max_in_flight);
	cfg->upstream.verify_hostname = true;
	if (tls)
		r |= parse_upstream_tls(c, tls, cfg);
	r |= parse_upstream_auth(c, u, cfg);
	return r ? -EINVAL : 0;
}
