/* log.h -- leveled logging to stderr (journal-aware) shared by every vmproxy program.
 * One write(2) per line, so lines from several threads never interleave. */
#pragma once

#include <stdbool.h>

enum log_level {
	LOG_LEVEL_ERROR = 3,
	LOG_LEVEL_WARN = 4,
	LOG_LEVEL_INFO = 6,
	LOG_LEVEL_DEBUG = 7,
};

/* Set the program name and minimum level. When stderr is the journal
 * (JOURNAL_STREAM matches) lines carry "<N>" priority prefixes instead of
 * timestamps. Call once before threads start. */
void log_init(const char *ident, enum log_level min_level);

/* Parse "error", "warn", "info" or "debug"; returns 0 or -EINVAL. */
int log_level_parse(const char *s, enum log_level *out);

void log_set_level(enum log_level min_level);
bool log_enabled(enum log_level level);

/* Point stderr at PATH again (SIGHUP after rotation). NULL keeps stderr.
 * Returns 0 or -errno. */
int log_reopen(const char *path);

void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...)                                                                             \
	do {                                                                                       \
		if (log_enabled(LOG_LEVEL_DEBUG))                                                  \
			log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__);                                     \
	} while (0)

/* Copy an untrusted string into BUF for logging: non-printable bytes and
 * '"' as '?', truncated with "..." past LEN-4 characters (the buffer is
 * the cap: callers size it for what is worth keeping). Returns BUF.
 * Callers still put the result in quotes. */
const char *log_sanitize(char *buf, unsigned len, const void *data, unsigned data_len);

/* Copy STR into BUF (LEN bytes) with every byte outside printable ASCII
 * replaced by '?', truncated only by LEN: for texts that are ours but may
 * carry a peer's bytes (a close reason, a refused name). Returns BUF. */
const char *log_escape(char *buf, unsigned len, const char *str);
