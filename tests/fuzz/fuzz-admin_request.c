/* fuzz-admin_request.c -- libFuzzer harness for the admin protocol's
 * request parser: the input is one request as a local client sends it on
 * the admin socket. Requests that would reach the daemon (a well-formed
 * status, threads, vms, vm, drain, balancer or migrate) need a running
 * daemon and are left out; everything else must get a reply
 * {"ok": false, "error": TEXT} with TEXT one printable line. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "admin.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The same reading of the request as admin_handle_request: true when it
 * is one that the daemon would be asked to answer. */
static bool reaches_daemon(const uint8_t *data, size_t size)
{
	json_error_t jerr;
	json_t *r;
	const char *cmd;
	bool daemon = false;

	if (size > ADMIN_MAX_REQUEST)
		return false;
	r = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
	if (!r)
		return false;
	cmd = json_string_value(json_object_get(r, "command"));
	if (json_is_object(r) && cmd) {
		json_t *th = json_object_get(r, "thread"), *en = json_object_get(r, "enabled");

		if (!strcmp(cmd, "status") || !strcmp(cmd, "threads") || !strcmp(cmd, "vms") ||
		    !strcmp(cmd, "vm") || !strcmp(cmd, "drain"))
			daemon = true;
		else if (!strcmp(cmd, "balancer"))
			daemon = !en || json_is_boolean(en);
		else if (!strcmp(cmd, "migrate"))
			daemon = json_is_string(json_object_get(r, "vm")) && json_is_integer(th) &&
				 json_integer_value(th) >= 0 && json_integer_value(th) <= 65535;
	}
	json_decref(r);
	return daemon;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_t *reply;
	const char *err;

	if (reaches_daemon(data, size))
		return 0;
	reply = admin_handle_request(NULL, (const char *)data, size);
	if (!reply || !json_is_false(json_object_get(reply, "ok")))
		abort();
	err = json_string_value(json_object_get(reply, "error"));
	if (!err || !*err || strchr(err, '\n'))
		abort();
	/* The reply goes back on the socket as one JSON line. */
	char *text = json_dumps(reply, JSON_COMPACT);

	if (!text || strchr(text, '\n'))
		abort();
	free(text);
	json_decref(reply);
	return 0;
}
