/* config_guest.c -- the configuration's "guest" and "inbox" sections: what
 * a guest's session may do and the inbox queue it consumes from. Part of
 * the loader behind config.h. */
#include "config_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int config_parse_guest(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
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

int config_parse_inbox(struct conf_ctx *c, json_t *root, struct proxy_config *cfg)
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
