/* validate.c -- see validate.h */
#include "validate.h"

#include <string.h>

const char *metrics_validate(json_t *doc)
{
	json_t *host, *v;
	static const char *const objects[] = { "cpu", "memory", "load", NULL };
	static const char *const arrays[] = { "disks", "network", "filesystems", NULL };

	if (!json_is_object(doc))
		return "not a JSON object";
	v = json_object_get(doc, "schema");
	if (!json_is_string(v) || strcmp(json_string_value(v), "vmproxy.metrics/1") != 0)
		return "schema is not \"vmproxy.metrics/1\"";
	v = json_object_get(doc, "seq");
	if (!json_is_integer(v) || json_integer_value(v) < 1)
		return "seq is not an integer >= 1";
	v = json_object_get(doc, "time_ms");
	if (!json_is_integer(v) || json_integer_value(v) < 0)
		return "time_ms is not an integer >= 0";
	host = json_object_get(doc, "host");
	if (!json_is_object(host))
		return "host is not an object";
	if (!json_is_string(json_object_get(host, "hostname")))
		return "host.hostname is not a string";
	v = json_object_get(host, "boot_id");
	if (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) > 64)
		return "host.boot_id is not a string of 1 to 64 bytes";
	for (const char *const *k = objects; *k; k++)
		if ((v = json_object_get(doc, *k)) && !json_is_object(v))
			return "cpu, memory and load must be objects";
	for (const char *const *k = arrays; *k; k++)
		if ((v = json_object_get(doc, *k)) && !json_is_array(v))
			return "disks, network and filesystems must be arrays";
	v = json_object_get(doc, "interval_s");
	if (v && !json_is_integer(v))
		return "interval_s is not an integer";
	return NULL;
}
