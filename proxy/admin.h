/* admin.h -- the admin Unix socket used by vmproxyctl: one JSON request
 * per connection, one JSON reply; peers must be root, the daemon's own
 * user, or members of the configured group (SO_PEERCRED). */
#pragma once

#include <jansson.h>
#include <stddef.h>

#define ADMIN_MAX_REQUEST 65536

struct admin;
struct vmproxy;

/* Listen on PATH (replacing a stale socket) and serve requests on a thread
 * of its own. GROUP may be NULL. */
int admin_start(struct vmproxy *p, const char *path, const char *group, struct admin **out,
		char *err, size_t errlen);

/* Stop the thread and unlink the socket. Accepts NULL. */
void admin_stop(struct admin *a);

/* Answer one request (a JSON text of LEN bytes). Returns a new reply
 * object, {"ok":false,"error":...} for a bad request. Used by the socket
 * thread and by tests. */
json_t *admin_handle_request(struct vmproxy *p, const char *req, size_t len);
