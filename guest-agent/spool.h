/* spool.h -- the agent's bounded on-disk spool: every sample is written
 * (and fsynced) before it is published and removed only once the broker
 * confirmed it; when full, the oldest samples are dropped and counted. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define SPOOL_MAX_FILES 100000

struct spool;

/* Open (creating) DIR, bounded to MAX_BYTES of samples. Files left by a
 * previous run are kept, in order. Returns 0 or -errno. */
int spool_open(const char *dir, uint64_t max_bytes, struct spool **out);
void spool_close(struct spool *sp);

/* Store DATA under a name that sorts by TIME_MS then SEQ. Drops the oldest
 * samples while the spool would exceed its bound (a sample larger than the
 * bound is refused with -EFBIG). Returns 0 or -errno. */
int spool_put(struct spool *sp, uint64_t time_ms, uint64_t seq, const void *data, size_t len);

/* The oldest sample: a malloc'd copy in *DATA (caller frees) and its name
 * in NAME. -ENOENT when empty. Unreadable files are removed and counted. */
int spool_peek(struct spool *sp, char **data, size_t *len, char *name, size_t namelen);

/* Remove the sample NAME (after its confirm). */
int spool_remove(struct spool *sp, const char *name);

size_t spool_count(const struct spool *sp);
uint64_t spool_bytes(const struct spool *sp);
uint64_t spool_dropped(const struct spool *sp);

/* Persist and load the per-boot sequence (file "state" in the spool dir).
 * The agent spools a sample before it saves its seq; loading also looks at
 * the newest spooled sample, so a crash between the two neither skips nor
 * reuses a seq. */
int spool_save_seq(struct spool *sp, const char *boot_id, uint64_t seq);
uint64_t spool_load_seq(struct spool *sp, const char *boot_id);
