/* conf.c -- see conf.h */
#include "conf.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void conf_ctx_init(struct conf_ctx *c, const char *file)
{
	c->file = file ? file : "<config>";
	c->err[0] = '\0';
	c->nerr = 0;
}

int conf_error(struct conf_ctx *c, const char *key_path, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (c->nerr++ > 0)
		return -EINVAL;
	n = snprintf(c->err, sizeof(c->err), "%s: %s: ", c->file,
		     key_path && *key_path ? key_path : "(top level)");
	if (n < 0 || (size_t)n >= sizeof(c->err))
		return -EINVAL;
	va_start(ap, fmt);
	vsnprintf(c->err + n, sizeof(c->err) - (size_t)n, fmt, ap);
	va_end(ap);
	/* Key names and values come from the file: an escaped newline or other
	 * control byte in them must not break the error's single line. */
	for (char *e = c->err; *e; e++)
		if ((unsigned char)*e < 0x20 || *e == 0x7f)
			*e = '?';
	return -EINVAL;
}

const char *conf_path(char *buf, size_t len, const char *path, const char *key)
{
	if (!path || !*path)
		snprintf(buf, len, "%s", key);
	else
		snprintf(buf, len, "%s.%s", path, key);
	return buf;
}

const char *conf_path_index(char *buf, size_t len, const char *path, size_t index)
{
	snprintf(buf, len, "%s[%zu]", path ? path : "", index);
	return buf;
}

static const char *type_name(const json_t *v)
{
	switch (json_typeof(v)) {
	case JSON_OBJECT:
		return "an object";
	case JSON_ARRAY:
		return "an array";
	case JSON_STRING:
		return "a string";
	case JSON_INTEGER:
		return "an integer";
	case JSON_REAL:
		return "a number";
	case JSON_TRUE:
	case JSON_FALSE:
		return "a boolean";
	case JSON_NULL:
		return "null";
	}
	return "?";
}

int conf_load_file(struct conf_ctx *c, json_t **out)
{
	json_error_t jerr;
	json_t *root;

	root = json_load_file(c->file, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		if (jerr.line < 0)
			return conf_error(c, NULL, "%s", jerr.text);
		return conf_error(c, NULL, "line %d column %d: %s", jerr.line, jerr.column,
				  jerr.text);
	}
	if (!json_is_object(root)) {
		conf_error(c, NULL, "expected an object, got %s", type_name(root));
		json_decref(root);
		return -EINVAL;
	}
	*out = root;
	return 0;
}

int conf_check_keys(struct conf_ctx *c, json_t *obj, const char *path, const char *const *allowed)
{
	const char *key;
	json_t *v;
	int r = 0;

	json_object_foreach(obj, key, v)
	{
		const char *const *a;
		char p[256];

		for (a = allowed; *a; a++)
			if (strcmp(*a, key) == 0)
				break;
		if (!*a)
			r = conf_error(c, conf_path(p, sizeof(p), path, key), "unknown key");
	}
	return r;
}

static json_t *lookup(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		      bool required, char *p, size_t plen, int *r)
{
	json_t *v = json_object_get(obj, key);

	conf_path(p, plen, path, key);
	*r = 0;
	if (!v && required)
		*r = conf_error(c, p, "missing required key");
	return v;
}

int conf_get_string(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		    bool required, const char **out)
{
	char p[256];
	int r;
	json_t *v = lookup(c, obj, path, key, required, p, sizeof(p), &r);

	if (!v)
		return r;
	if (!json_is_string(v))
		return conf_error(c, p, "expected a string, got %s", type_name(v));
	if (strlen(json_string_value(v)) != json_string_length(v))
		return conf_error(c, p, "expected a string without NUL bytes");
	*out = json_string_value(v);
	return 0;
}

int conf_get_uint(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		  bool required, uint64_t min, uint64_t max, uint64_t *out)
{
	char p[256];
	int r;
	json_t *v = lookup(c, obj, path, key, required, p, sizeof(p), &r);
	json_int_t i;

	if (!v)
		return r;
	if (!json_is_integer(v))
		return conf_error(c, p, "expected an integer in [%" PRIu64 ", %" PRIu64 "], got %s",
				  min, max, type_name(v));
	i = json_integer_value(v);
	if (i < 0 || (uint64_t)i < min || (uint64_t)i > max)
		return conf_error(c, p, "expected an integer in [%" PRIu64 ", %" PRIu64
				  "], got %" JSON_INTEGER_FORMAT, min, max, i);
	*out = (uint64_t)i;
	return 0;
}

int conf_get_u32(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		 uint32_t min, uint32_t max, uint32_t *inout)
{
	uint64_t v = *inout;
	int r = conf_get_uint(c, obj, path, key, false, min, max, &v);

	if (r == 0)
		*inout = (uint32_t)v;
	return r;
}

int conf_get_u16(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		 uint16_t min, uint16_t max, uint16_t *inout)
{
	uint64_t v = *inout;
	int r = conf_get_uint(c, obj, path, key, false, min, max, &v);

	if (r == 0)
		*inout = (uint16_t)v;
	return r;
}

/* The value at KEY when it has json type TYPE (JSON_TRUE: either boolean),
 * described as WANT in the error otherwise. */
static int get_typed(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		     bool required, json_type type, const char *want, json_t **out)
{
	char p[256];
	int r;
	json_t *v = lookup(c, obj, path, key, required, p, sizeof(p), &r);

	if (!v)
		return r;
	if (type == JSON_TRUE ? !json_is_boolean(v) : json_typeof(v) != type)
		return conf_error(c, p, "expected %s, got %s", want, type_name(v));
	*out = v;
	return 0;
}

int conf_get_bool(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		  bool required, bool *out)
{
	json_t *v = NULL;
	int r = get_typed(c, obj, path, key, required, JSON_TRUE, "true or false", &v);

	if (r == 0 && v)
		*out = json_is_true(v);
	return r;
}

int conf_get_object(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		    bool required, json_t **out)
{
	return get_typed(c, obj, path, key, required, JSON_OBJECT, "an object", out);
}

int conf_get_array(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		   bool required, json_t **out)
{
	return get_typed(c, obj, path, key, required, JSON_ARRAY, "an array", out);
}

int conf_get_enum(struct conf_ctx *c, json_t *obj, const char *path, const char *key,
		  bool required, const char *const *choices, unsigned *out)
{
	const char *s = NULL;
	char p[256], list[200];
	size_t n = 0;
	int r;

	r = conf_get_string(c, obj, path, key, required, &s);
	if (r < 0 || !s)
		return r;
	for (unsigned i = 0; choices[i]; i++) {
		if (strcmp(choices[i], s) == 0) {
			*out = i;
			return 0;
		}
	}
	list[0] = '\0';
	for (unsigned i = 0; choices[i] && n < sizeof(list); i++)
		n += (size_t)snprintf(list + n, sizeof(list) - n, "%s\"%s\"", i ? ", " : "",
				      choices[i]);
	return conf_error(c, conf_path(p, sizeof(p), path, key), "expected one of %s, got \"%.64s\"",
			  list, s);
}

int conf_check_dir(const char *file, const char *key, const char *dir)
{
	char parent[4096], *slash;
	struct stat st;

	if (stat(dir, &st) == 0) {
		if (S_ISDIR(st.st_mode) && access(dir, W_OK | X_OK) == 0)
			return 0;
		fprintf(stderr, "%s: %s \"%s\": %s\n", file, key, dir,
			S_ISDIR(st.st_mode) ? strerror(errno) : "not a directory");
		return 1;
	}
	snprintf(parent, sizeof(parent), "%s", dir);
	slash = strrchr(parent, '/');
	if (slash == parent)
		slash[1] = '\0';
	else if (slash)
		*slash = '\0';
	else
		snprintf(parent, sizeof(parent), ".");
	if (access(parent, W_OK | X_OK) == 0)
		return 0;
	fprintf(stderr, "%s: %s \"%s\": cannot be created in \"%s\": %s\n", file, key, dir,
		parent, strerror(errno));
	return 1;
}
