/* config_impl.h -- private to the configuration loader's own files
 * (config.c, config_listen.c, config_upstream.c, config_guest.c): the
 * sections each parses for proxy_config_load. Every parser takes the
 * parsed file's ROOT object, fills its part of CFG, reports each error
 * through C and returns 0, -EINVAL (reported) or -ENOMEM. */
#pragma once

#include <jansson.h>

#include "conf.h"
#include "config.h"

/* ---- config.c: the loader, shared helpers ------------------------------------- */

/* A copy of S, or NULL when S is NULL (or out of memory). */
char *config_dup_or_null(const char *s);
/* conf_get_string's KEY of OBJ, copied into *OUT (NULL when absent or
 * invalid); -ENOMEM when the copy fails. */
int config_get_string_dup(struct conf_ctx *c, json_t *obj, const char *section, const char *key,
			  bool required, char **out);

/* ---- config_listen.c: listeners and identity ---------------------------------- */

/* "listeners": one or more tcp, vsock, unix or firecracker listeners. */
int config_parse_listeners(struct conf_ctx *c, json_t *root, struct proxy_config *cfg);
/* "identity": libvirt, the static table, the policy for unknown peers. */
int config_parse_identity(struct conf_ctx *c, json_t *root, struct proxy_config *cfg);
/* After both parsed cleanly: every listener's peers can be identified. */
int config_check_listener_identity(struct conf_ctx *c, const struct proxy_config *cfg);

/* ---- config_upstream.c: the broker -------------------------------------------- */

/* "upstream" (required): hosts, port, vhost, tls, auth, exchange, timers. */
int config_parse_upstream(struct conf_ctx *c, json_t *root, struct proxy_config *cfg);

/* ---- config_guest.c: what guests see ------------------------------------------ */

/* "guest": exchanges allowed, message and channel bounds, timers. */
int config_parse_guest(struct conf_ctx *c, json_t *root, struct proxy_config *cfg);
/* "inbox": the per-VM inbox queue, its bounds and the consumers' limits. */
int config_parse_inbox(struct conf_ctx *c, json_t *root, struct proxy_config *cfg);
