/* config_listen.c -- the configuration's "listeners" and "identity"
 * sections, and the check that every listener's peers can be named. Part
 * of the loader behind config.h. */
#include "config_impl.h"

#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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
	l->group = config_dup_or_null(s);
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
		r |= config_get_string_dup(c, v, p, "path", true, &l->path);
	} else {
		/* Firecracker hands a guest's connection to host port P to
		 * "<uds_path>_P". */
		r |= conf_check_keys(c, v, p, fc_keys);
		r |= conf_get_uint(c, v, p, "port", false, 1, 0xfffffffe, &port);
		l->port = (uint32_t)port;
		r |= config_get_string_dup(c, v, p, "uds_path", true, &l->uds_path);
		if (l->uds_path) {
			l->path = malloc(strlen(l->uds_path) + 16);
			if (!l->path)
				r |= -ENOMEM;
			else
				sprintf(l->path, "%s_%u", l->uds_path, l->port);
		}
	}
	r |= config_get_string_dup(c, v, p, "vm", true, &l->vm);
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

int config_parse_listeners(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
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

int config_parse_identity(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
{
	static const char *const keys[] = { "libvirt_uri", "libvirt_read_write", "static",
					    "unknown_peers", NULL };
	static const char *const entry_keys[] = { "address", "vm", "uuid", NULL };
	static const char *const policies[] = { "reject", "by_address", NULL };
	json_t *id = NULL, *arr = NULL, *v;
	unsigned pol = 0;
	size_t i;
	int r = 0;

	if (conf_get_object(c, root, "", "identity", false, &id) < 0)
		return -EINVAL;
	cfg->identity.unknown_peers = UNKNOWN_PEERS_REJECT;
	if (!id)
		return 0;
	r |= conf_check_keys(c, id, "identity", keys);
	r |= config_get_string_dup(c, id, "identity", "libvirt_uri", false,
				   &cfg->identity.libvirt_uri);
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
		e->address = config_dup_or_null(addr);
		e->vm = config_dup_or_null(vm);
		e->uuid = uuid && valid_uuid(uuid, canon) ? strdup(canon) : NULL;
	}
	return r ? -EINVAL : 0;
}

/* A listener whose peers only libvirt can name needs libvirt: a vsock
 * listener without identity.libvirt_uri would refuse every guest. */
int config_check_listener_identity(struct conf_ctx *c, const struct proxy_config *cfg)
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
