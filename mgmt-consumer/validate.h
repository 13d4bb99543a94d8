/* validate.h -- the checks a sample must pass to be stored (the required
 * part of common/metrics.schema.json, and the types of what is present). */
#pragma once

#include <jansson.h>

/* NULL when DOC is a valid sample, else why not (a static string). */
const char *metrics_validate(json_t *doc);
