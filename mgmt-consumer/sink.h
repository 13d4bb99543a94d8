/* sink.h -- JSON Lines files in a directory, one per UTC day and size
 * step ("PREFIX-YYYY-MM-DD.NNNN.jsonl"), appended in batches that are
 * fsynced before the caller acknowledges anything. */
#pragma once

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct sink;

/* Files PREFIX-*.jsonl in DIR (created), rotated past MAX_BYTES or when the
 * UTC day changes. NOW (NULL: time()) is the clock, for tests. */
int sink_open(const char *dir, const char *prefix, uint64_t max_bytes, time_t (*now)(time_t *),
	      struct sink **out);
void sink_close(struct sink *s);

/* Append one line (LINE without the newline). Buffered until sink_sync. */
int sink_append(struct sink *s, const char *line, size_t len);

/* Forget what was appended since the last sink_sync (an abandoned batch:
 * its messages were not acked and come back). */
void sink_discard(struct sink *s);

/* Write and fsync everything appended. 0 or -errno. */
int sink_sync(struct sink *s);

/* Call FN on up to MAX of the last lines of the newest files (oldest
 * first): what a restarted consumer uses to remember what it stored. */
int sink_replay_tail(const char *dir, const char *prefix, size_t max,
		     void (*fn)(void *ud, const char *line, size_t len), void *ud);

/* The file currently appended to (for logs and tests). */
const char *sink_current(const struct sink *s);
