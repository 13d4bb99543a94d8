/* conf.h -- typed access to JSON configuration files (jansson) with errors
 * that name the file, the key path and what was expected. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct conf_ctx {
	const char *file; /* for messages */
	char err[512];    /* first error, "FILE: KEY: expected ..., got ..." */
	int nerr;
};

void conf_ctx_init(struct conf_ctx *c, const char *file);

/* Record an error about KEY_PATH (e.g. "upstream.tls.ca"); only the first
 * one is kept in c->err. Always returns -EINVAL. */
int conf_error(struct conf_ctx *c, const char *key_path, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Parse c->file into *out (a new reference). The top level must be an object.
 * Returns 0 or -EINVAL with c->err set (line and column for syntax errors). */
int conf_load_file(struct conf_ctx *c, json_t **out);

/* Reject keys of OBJ not in ALLOWED (NULL-terminated), naming PATH.key. */
int conf_check_keys(struct conf_ctx *c, json_t *obj, const char *path, const char *const *allowed);

/* Typed getters. PATH names OBJ ("" for the top level). A missing key leaves
 * *out untouched and returns 0 unless REQUIRED, then -EINVAL. A present key
 * of the wrong type or out of range is always -EINVAL.
 * Strings point into OBJ: copy them if OBJ goes away. */
int conf_get_string(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		    bool required, const char **out);
int conf_get_uint(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		  bool required, uint64_t min, uint64_t max, uint64_t *out);
/* conf_get_uint into a 32- or 16-bit field that holds its default:
 * *INOUT is left as it is when KEY is absent (MAX fits the field). */
int conf_get_u32(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		 uint32_t min, uint32_t max, uint32_t *inout);
int conf_get_u16(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		 uint16_t min, uint16_t max, uint16_t *inout);

int conf_get_bool(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		  bool required, bool *out);
/* An object or array member; *out is a borrowed reference. */
int conf_get_object(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		    bool required, json_t **out);
int conf_get_array(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		   bool required, json_t **out);
/* One of CHOICES (NULL-terminated); *out is its index. */
int conf_get_enum(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		  bool required, const char *const *choices, unsigned *out);

/* Join PATH and KEY (or "[index]") into BUF for nested messages. */
const char *conf_path(char *buf, size_t len, const char *path, const char *key);
const char *conf_path_index(char *buf, size_t len, const char *path, size_t index);

/* For --check-config: directory DIR (configuration key KEY of FILE) is
 * writable, or can be created in its parent. Prints "FILE: KEY "DIR": why"
 * on stderr when not; returns the number of problems (0 or 1). */
int conf_check_dir(const char *file, const char *key, const char *dir);
