/* prom.h -- writing the Prometheus text exposition format (0.0.4): metric
 * families with HELP and TYPE, samples with escaped label values. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct prom_buf {
	char *data;
	size_t len, cap;
	bool oom; /* an allocation failed: the text is incomplete */
};

void prom_init(struct prom_buf *b);
void prom_free(struct prom_buf *b);

/* "# HELP NAME HELP" and "# TYPE NAME TYPE" (counter, gauge, ...). */
void prom_family(struct prom_buf *b, const char *name, const char *type, const char *help);

/* One sample: NAME{k1="v1",...} VALUE. The variadic part is label name
 * and value pairs ending with NULL; values are escaped (\\, \", \n) and
 * capped at 256 bytes. */
void prom_sample(struct prom_buf *b, const char *name, double value, ...)
	__attribute__((sentinel));
