/* fuzz-metrics_validate.c -- libFuzzer harness for the consumer's check of
 * a published document: the input is a message body as any guest may
 * publish it (through the proxy, unchanged), parsed as the consumer parses
 * it and validated. A verdict is either NULL or a reason: a non-empty,
 * printable, single-line text, since it is written to the quarantine. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "validate.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_error_t jerr;
	json_t *doc = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
	const char *why;

	if (!doc)
		return 0;
	why = metrics_validate(doc);
	if (why) {
		size_t n = strlen(why);

		if (n == 0 || memchr(why, '\n', n))
			abort();
	}
	json_decref(doc);
	return 0;
}
