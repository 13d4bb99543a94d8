/* config.c -- see config.h. Every error names the file, the key path and
 * what was expected; unknown keys are errors, so a typo is never silently
 * ignored. */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "balancer.h"
#include "conf.h"
#include "metrics.h"

static char *dup_or_null(const char *s)
{
	return s ? strdup(s) : NULL;
}

static int check_readable(struct conf_ctx *c, const char *path, const char *file)
{
	if (file && access(file, R_OK) < 0)
		return conf_error(c, path, "cannot read \"%s\": %s", file, strerror(errno));
	return 0;
}

static bool valid_uuid(const char *s, char out[37])
{
	static const int dash[] = { 8, 13, 18, 23 };

	if (strlen(s) != 36)
		return false;
	for (int i = 0; i < 36; i++) {
		bool want_dash = i == dash[0] || i == dash[1] || i == dash[2] || i == dash[3];
		char ch = s[i];

		if (want_dash != (ch == '-'))
			return false;
		if (!want_dash) {
			if (ch >= 'A' && ch <= 'F')
				ch = (char)(ch - 'A' + 'a');
			if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')))
				return false;
		}
		out[i] = ch;
	}
	out[36] = '\0';
	return true;
}

/* A "tcp" listener V at key path P. */
static int parse_tcp_listener(struct conf_ctx *c, json_t *v, const char *p,
			      struct listener_config *l)
{
	static const char *const keys[] = { "type", "address", "port", NULL };
	const char *s = "0.0.0.0";
	uint64_t port = 5672;
	struct in6_addr a6;
	struct in_addr a4;
	char kp[80];
	int r = 0;

	r |= conf_check_keys(c, v, p, keys);
	r |= conf_get_uint(c, v, p, "port", false, 1, 65535, &port);
	r |= conf_get_string(c, v, p, "address", false, &s);
	if (inet_pton(AF_INET, s, &a4) != 1 && inet_pton(AF_INET6, s, &a6) != 1)
		r |= conf_error(c, conf_path(kp, sizeof(kp), p, "address"),
				"expected a numeric IPv4 or IPv6 address, got \"%.64s\"", s);
	l->address = strdup(s);
	l->port = (uint32_t)port;
	return r;
}

/* The socket file's "mode" and "group" of a unix or firecracker listener. */
static int parse_socket_file(struct conf_ctx *c, json_t *v, const char *p,
			     struct listener_config *l)
{
	const char *s = NULL;
	char kp[80];
	int r = 0;

	l->mode = 0660;
	r |= conf_get_string(c, v, p, "mode", false, &s);
	if (s) {
		char *end;
		unsigned long m;

		errno = 0;
		m = strtoul(s, &end, 8);
		if (!*s || *end || errno || m > 0777)
			r |= conf_error(c, conf_path(kp, sizeof(kp), p, "mode"),
					"expected an octal mode such as \"0660\"");
		else
			l->mode = (unsigned)m;
	}
	s = NULL;
	r |= conf_get_string(c, v, p, "group", false, &s);
	if (s && !getgrnam(s))
		r |= conf_error(c, conf_path(kp, sizeof(kp), p, "group"), "no group \"%s\"", s);
	l->group = dup_or_null(s);
	return r;
}

/* A "unix" or "firecracker" listener V at key path P: a socket path that
 * names its VM. */
static int parse_vm_socket_listener(struct conf_ctx *c, json_t *v, const char *p,
				    struct listener_config *l)
{
	static const char *const unix_keys[] = { "type", "path", "vm", "uuid", "mode", "group",
						 NULL };
	static const char *const fc_keys[] = { "type", "uds_path", "port", "vm", "uuid", "mode",
					       "group", NULL };
	bool fc = l->type == LISTENER_FIRECRACKER;
	const char *s = NULL;
	uint64_t port = 5672;
	char kp[80];
	int r = 0;

	if (!fc) {
		r |= conf_check_keys(c, v, p, unix_keys);
		r |= conf_get_string(c, v, p, "path", true, &s);
		l->path = dup_or_null(s);
	} else {
		/* Firecracker hands a guest's connection to host port P to
		 * "<uds_path>_P". */
		r |= conf_check_keys(c, v, p, fc_keys);
		r |= conf_get_uint(c, v, p, "port", false, 1, 0xfffffffe, &port);
		l->port = (uint32_t)port;
		r |= conf_get_string(c, v, p, "uds_path", true, &s);
		l->uds_path = dup_or_null(s);
		if (s && (l->path = malloc(strlen(s) + 16)) != NULL)
			sprintf(l->path, "%s_%u", s, l->port);
	}
	s = NULL;
	r |= conf_get_string(c, v, p, "vm", true, &s);
	l->vm = dup_or_null(s);
	s = NULL;
	r |= conf_get_string(c, v, p, "uuid", false, &s);
	if (s) {
		char canon[37];

		if (!valid_uuid(s, canon))
			r |= conf_error(c, conf_path(kp, sizeof(kp), p, "uuid"),
					"expected a UUID like 6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60, "
					"got \"%.64s\"",
					s);
		else
			l->uuid = strdup(canon);
	}
	if (l->path && strlen(l->path) > 107)
		r |= conf_error(c, conf_path(kp, sizeof(kp), p, fc ? "uds_path" : "path"),
				"expected a path of at most 107 bytes%s",
				fc ? " with \"_<port>\" appended" : "");
	return r | parse_socket_file(c, v, p, l);
}

static int parse_listeners(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const types[] = { "tcp", "vsock", "unix", "firecracker", NULL };
	static const char *const vsock_keys[] = { "type", "port", NULL };
	json_t *arr = NULL, *v;
	size_t i;
	int r = 0;

	if (conf_get_array(c, root, "", "listeners", true, &arr) < 0)
		return -EINVAL;
	if (json_array_size(arr) == 0)
		return conf_error(c, "listeners", "expected at least one listener");
	if (json_array_size(arr) > 256)
		return conf_error(c, "listeners", "expected at most 256 listeners");
	cfg->listeners = calloc(json_array_size(arr), sizeof(*cfg->listeners));
	if (!cfg->listeners)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		struct listener_config *l = &cfg->listeners[i];
		char p[64];
		unsigned type = 0;
		uint64_t port = 5672;

		conf_path_index(p, sizeof(p), "listeners", i);
		if (!json_is_object(v)) {
			r = conf_error(c, p, "expected an object");
			continue;
		}
		if (conf_get_enum(c, v, p, "type", true, types, &type) < 0) {
			r = -EINVAL;
			continue;
		}
		l->type = (enum listener_type)type;
		cfg->n_listeners = i + 1;
		switch (l->type) {
		case LISTENER_TCP:
			r |= parse_tcp_listener(c, v, p, l);
			break;
		case LISTENER_VSOCK:
			r |= conf_check_keys(c, v, p, vsock_keys);
			r |= conf_get_uint(c, v, p, "port", false, 1, 0xfffffffe, &port);
			l->port = (uint32_t)port;
			break;
		case LISTENER_UNIX:
		case LISTENER_FIRECRACKER:
			r |= parse_vm_socket_listener(c, v, p, l);
			break;
		}
	}
	return r ? -EINVAL : 0;
}

static int parse_identity(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const keys[] = { "libvirt_uri", "libvirt_read_write", "static",
					    "unknown_peers", NULL };
	static const char *const entry_keys[] = { "address", "vm", "uuid", NULL };
	static const char *const policies[] = { "reject", "by_address", NULL };
	json_t *id = NULL, *arr = NULL, *v;
	const char *s = NULL;
	unsigned pol = 0;
	size_t i;
	int r = 0;

	if (conf_get_object(c, root, "", "identity", false, &id) < 0)
		return -EINVAL;
	cfg->identity.unknown_peers = UNKNOWN_PEERS_REJECT;
	if (!id)
		return 0;
	r |= conf_check_keys(c, id, "identity", keys);
	r |= conf_get_string(c, id, "identity", "libvirt_uri", false, &s);
	cfg->identity.libvirt_uri = dup_or_null(s);
	r |= conf_get_bool(c, id, "identity", "libvirt_read_write", false,
			   &cfg->identity.libvirt_read_write);
	r |= conf_get_enum(c, id, "identity", "unknown_peers", false, policies, &pol);
	cfg->identity.unknown_peers = (enum unknown_peers)pol;
	r |= conf_get_array(c, id, "identity", "static", false, &arr);
	if (!arr)
		return r ? -EINVAL : 0;
	if (json_array_size(arr) > 100000)
		return conf_error(c, "identity.static", "expected at most 100000 entries");
	cfg->identity.statics = calloc(json_array_size(arr) + 1, sizeof(*cfg->identity.statics));
	if (!cfg->identity.statics)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		struct static_identity *e = &cfg->identity.statics[i];
		char p[64], kp[80], canon[37];
		const char *addr = NULL, *vm = NULL, *uuid = NULL;
		unsigned char bin[16];

		conf_path_index(p, sizeof(p), "identity.static", i);
		cfg->identity.n_statics = i + 1;
		if (!json_is_object(v)) {
			r = conf_error(c, p, "expected an object");
			continue;
		}
		r |= conf_check_keys(c, v, p, entry_keys);
		r |= conf_get_string(c, v, p, "address", true, &addr);
		r |= conf_get_string(c, v, p, "vm", true, &vm);
		r |= conf_get_string(c, v, p, "uuid", false, &uuid);
		if (addr && inet_pton(AF_INET, addr, bin) != 1 && inet_pton(AF_INET6, addr, bin) != 1)
			r |= conf_error(c, conf_path(kp, sizeof(kp), p, "address"),
					"expected a numeric IPv4 or IPv6 address, got \"%.64s\"", addr);
		if (uuid && !valid_uuid(uuid, canon))
			r |= conf_error(c, conf_path(kp, sizeof(kp), p, "uuid"),
					"expected a UUID like 6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60, "
					"got \"%.64s\"", uuid);
		if (!uuid && !cfg->identity.libvirt_uri)
			r |= conf_error(c, conf_path(kp, sizeof(kp), p, "uuid"),
					"required when identity.libvirt_uri is not set");
		for (size_t j = 0; addr && j < i; j++)
			if (cfg->identity.statics[j].address &&
			    strcmp(cfg->identity.statics[j].address, addr) == 0)
				r |= conf_error(c, conf_path(kp, sizeof(kp), p, "address"),
						"\"%s\" is already mapped by identity.static[%zu]",
						addr, j);
		e->address = dup_or_null(addr);
		e->vm = dup_or_null(vm);
		e->uuid = uuid && valid_uuid(uuid, canon) ? strdup(canon) : NULL;
	}
	return r ? -EINVAL : 0;
}

/* A listener whose peers only libvirt can name needs libvirt: a vsock
 * listener without identity.libvirt_uri would refuse every guest. */
static int check_listener_identity(struct conf_ctx *c, const struct proxy_config *cfg)
{
	int r = 0;

	for (size_t i = 0; i < cfg->n_listeners; i++) {
		const struct listener_config *l = &cfg->listeners[i];
		char p[64];

		conf_path_index(p, sizeof(p), "listeners", i);
		if (l->type == LISTENER_VSOCK && !cfg->identity.libvirt_uri)
			r |= conf_error(c, p, "a vsock listener identifies guests by CID through "
					      "libvirt: identity.libvirt_uri is required");
		if ((l->type == LISTENER_UNIX || l->type == LISTENER_FIRECRACKER) && !l->uuid &&
		    !cfg->identity.libvirt_uri) {
			bool is_static = false;
			char kp[80];

			for (size_t j = 0; l->vm && j < cfg->identity.n_statics; j++)
				if (cfg->identity.statics[j].vm && cfg->identity.statics[j].uuid &&
				    (strcmp(cfg->identity.statics[j].vm, l->vm) == 0 ||
				     strcasecmp(cfg->identity.statics[j].uuid, l->vm) == 0))
					is_static = true;
			if (!is_static)
				r |= conf_error(c, conf_path(kp, sizeof(kp), p, "uuid"),
						"required when identity.libvirt_uri is not set");
		}
	}
	return r ? -EINVAL : 0;
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
			h->host = dup_or_null(hs);
			h->port = (uint16_t)hp;
			h->server_name = dup_or_null(sn);
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
	const char *s;
	int r = 0;

	r |= conf_check_keys(c, tls, "upstream.tls", tls_keys);
	s = NULL;
	r |= conf_get_string(c, tls, "upstream.tls", "ca", true, &s);
	cfg->upstream.ca = dup_or_null(s);
	r |= check_readable(c, "upstream.tls.ca", cfg->upstream.ca);
	s = NULL;
	r |= conf_get_string(c, tls, "upstream.tls", "cert", false, &s);
	cfg->upstream.cert = dup_or_null(s);
	r |= check_readable(c, "upstream.tls.cert", cfg->upstream.cert);
	s = NULL;
	r |= conf_get_string(c, tls, "upstream.tls", "key", cfg->upstream.cert != NULL, &s);
	cfg->upstream.key = dup_or_null(s);
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
	const char *s;
	int r = 0;

	r |= conf_get_object(c, u, "upstream", "auth", false, &auth);
	if (auth) {
		r |= conf_check_keys(c, auth, "upstream.auth", auth_keys);
		r |= conf_get_enum(c, auth, "upstream.auth", "mechanism", false, mechs, &mech);
		s = NULL;
		r |= conf_get_string(c, auth, "upstream.auth", "user", false, &s);
		cfg->upstream.user = dup_or_null(s);
		s = NULL;
		r |= conf_get_string(c, auth, "upstream.auth", "password", false, &s);
		cfg->upstream.password = dup_or_null(s);
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

static int parse_upstream(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
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
	s = NULL;
	r |= conf_get_string(c, u, "upstream", "exchange", true, &s);
	cfg->upstream.exchange = dup_or_null(s);
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

static int parse_guest(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const keys[] = { "allowed_exchanges", "max_message_bytes",
					    "channel_max", "max_connections_per_vm",
					    "heartbeat", "handshake_timeout_ms", NULL };
	json_t *g = NULL, *arr = NULL, *v;
	uint64_t n;
	size_t i;
	int r = 0;

	if (conf_get_object(c, root, "", "guest", false, &g) < 0)
		return -EINVAL;
	cfg->guest.max_message_bytes = 1u << 20;
	cfg->guest.channel_max = 64;
	cfg->guest.max_connections_per_vm = 16;
	cfg->guest.heartbeat = 60;
	cfg->guest.handshake_timeout_ms = 10000;
	if (g) {
		r |= conf_check_keys(c, g, "guest", keys);
		n = cfg->guest.max_message_bytes;
		r |= conf_get_uint(c, g, "guest", "max_message_bytes", false, 1, 128u << 20, &n);
		cfg->guest.max_message_bytes = n;
		r |= conf_get_u16(c, g, "guest", "channel_max", 1, 2047, &cfg->guest.channel_max);
		r |= conf_get_u32(c, g, "guest", "max_connections_per_vm", 1, 65535, &cfg->guest.max_connections_per_vm);
		r |= conf_get_u16(c, g, "guest", "heartbeat", 0, 3600, &cfg->guest.heartbeat);
		r |= conf_get_u32(c, g, "guest", "handshake_timeout_ms", 100, 600000, &cfg->guest.handshake_timeout_ms);
		r |= conf_get_array(c, g, "guest", "allowed_exchanges", false, &arr);
	}
	if (arr && json_array_size(arr) > 1024)
		return conf_error(c, "guest.allowed_exchanges", "expected at most 1024 names");
	cfg->guest.allowed_exchanges = calloc((arr ? json_array_size(arr) : 1) + 1, sizeof(char *));
	if (!cfg->guest.allowed_exchanges)
		return -ENOMEM;
	if (!arr) {
		cfg->guest.allowed_exchanges[0] = strdup("metrics");
		return r ? -EINVAL : 0;
	}
	json_array_foreach(arr, i, v) {
		char p[64];

		conf_path_index(p, sizeof(p), "guest.allowed_exchanges", i);
		if (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) > 255) {
			r |= conf_error(c, p, "expected an exchange name of 1 to 255 bytes");
			continue;
		}
		cfg->guest.allowed_exchanges[i] = strdup(json_string_value(v));
	}
	return r ? -EINVAL : 0;
}

static int parse_inbox(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const keys[] = { "enabled",	     "name",	       "exchange",
					    "queue_type",    "max_length",     "message_ttl_ms",
					    "max_prefetch",  "max_consumers",  "max_message_bytes",
					    NULL };
	static const char *const types[] = { "classic", "quorum", NULL };
	const char *name = "inbox", *exchange = "vm.control";
	unsigned type = 0;
	json_t *o = NULL;
	uint64_t n;
	int r = 0;

	cfg->inbox.enabled = true;
	cfg->inbox.max_length = 1000;
	cfg->inbox.message_ttl_ms = 86400000;
	cfg->inbox.max_prefetch = 100;
	cfg->inbox.max_consumers = 4;
	cfg->inbox.max_message_bytes = 64u << 10;
	if (conf_get_object(c, root, "", "inbox", false, &o) < 0)
		return -EINVAL;
	if (o) {
		r |= conf_check_keys(c, o, "inbox", keys);
		r |= conf_get_bool(c, o, "inbox", "enabled", false, &cfg->inbox.enabled);
		r |= conf_get_string(c, o, "inbox", "name", false, &name);
		r |= conf_get_string(c, o, "inbox", "exchange", false, &exchange);
		r |= conf_get_enum(c, o, "inbox", "queue_type", false, types, &type);
		r |= conf_get_u32(c, o, "inbox", "max_length", 1, 1000000, &cfg->inbox.max_length);
		r |= conf_get_u32(c, o, "inbox", "message_ttl_ms", 1000, 2147483647, &cfg->inbox.message_ttl_ms);
		r |= conf_get_u16(c, o, "inbox", "max_prefetch", 1, 65535, &cfg->inbox.max_prefetch);
		r |= conf_get_u16(c, o, "inbox", "max_consumers", 1, 64, &cfg->inbox.max_consumers);
		n = cfg->inbox.max_message_bytes;
		r |= conf_get_uint(c, o, "inbox", "max_message_bytes", false, 1, 16u << 20, &n);
		cfg->inbox.max_message_bytes = n;
	}
	if (r)
		return -EINVAL;
	if (name[0] == '\0' || strlen(name) > 200 || strncmp(name, "amq.", 4) == 0)
		return conf_error(c, "inbox.name",
				  "expected a queue name of 1 to 200 bytes, not starting with \"amq.\"");
	if (exchange[0] == '\0' || strlen(exchange) > 255)
		return conf_error(c, "inbox.exchange", "expected an exchange name of 1 to 255 bytes");
	cfg->inbox.quorum = type == 1;
	cfg->inbox.name = strdup(name);
	cfg->inbox.exchange = strdup(exchange);
	if (!cfg->inbox.name || !cfg->inbox.exchange)
		return -ENOMEM;
	return 0;
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
		s = NULL;
		r |= conf_get_string(c, a, "admin", "socket", false, &s);
		cfg->admin.socket = dup_or_null(s);
		s = NULL;
		r |= conf_get_string(c, a, "admin", "group", false, &s);
		cfg->admin.group = dup_or_null(s);
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
	r |= parse_listeners(&c, root, cfg);
	r |= parse_identity(&c, root, cfg);
	if (r == 0)
		r |= check_listener_identity(&c, cfg);
	r |= parse_threads(&c, root, cfg);
	r |= parse_upstream(&c, root, cfg);
	r |= parse_guest(&c, root, cfg);
	r |= parse_inbox(&c, root, cfg);
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
