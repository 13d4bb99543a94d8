/* prom.c -- see prom.h */
#include "prom.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LABEL_VALUE_MAX 256

void prom_init(struct prom_buf *b)
{
	memset(b, 0, sizeof(*b));
}

void prom_free(struct prom_buf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

static void put(struct prom_buf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *d;

		while (b->len + n + 1 > cap)
			cap *= 2;
		d = realloc(b->data, cap);
		if (!d) {
			b->oom = true;
			return;
		}
		b->data = d;
		b->cap = cap;
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
}

static void puts_(struct prom_buf *b, const char *s)
{
	put(b, s, strlen(s));
}

void prom_family(struct prom_buf *b, const char *name, const char *type, const char *help)
{
	puts_(b, "# HELP ");
	puts_(b, name);
	put(b, " ", 1);
	puts_(b, help);
	puts_(b, "\n# TYPE ");
	puts_(b, name);
	put(b, " ", 1);
	puts_(b, type);
	put(b, "\n", 1);
}

static void put_escaped(struct prom_buf *b, const char *v)
{
	size_t n = 0;

	for (; *v && n < LABEL_VALUE_MAX; v++, n++) {
		switch (*v) {
		case '\\':
			put(b, "\\\\", 2);
			break;
		case '"':
			put(b, "\\\"", 2);
			break;
		case '\n':
			put(b, "\\n", 2);
			break;
		default:
			put(b, v, 1);
		}
	}
}

void prom_sample(struct prom_buf *b, const char *name, double value, ...)
{
	const char *k;
	char num[64];
	bool first = true;
	va_list ap;

	puts_(b, name);
	va_start(ap, value);
	while ((k = va_arg(ap, const char *))) {
		const char *v = va_arg(ap, const char *);

		put(b, first ? "{" : ",", 1);
		first = false;
		puts_(b, k);
		put(b, "=\"", 2);
		put_escaped(b, v ? v : "");
		put(b, "\"", 1);
	}
	va_end(ap);
	if (!first)
		put(b, "}", 1);
	if (isnan(value))
		snprintf(num, sizeof(num), " NaN\n");
	else if (isinf(value))
		snprintf(num, sizeof(num), " %s\n", value > 0 ? "+Inf" : "-Inf");
	else if (value == floor(value) && fabs(value) < 1e15)
		snprintf(num, sizeof(num), " %.0f\n", value);
	else
		snprintf(num, sizeof(num), " %.17g\n", value);
	puts_(b, num);
}
