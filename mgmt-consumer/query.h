/* query.h -- "vmproxy-consumer query": what the configured store holds,
 * as a table or JSON: the latest sample of each VM (--stale: only the stale
 * ones), or one VM's series of one metric over a time range. */
#pragma once

#include <stddef.h>
#include <stdint.h>

struct store;

/* ARGV[0] is "query". Returns the exit status. */
int query_main(int argc, char **argv);

/* "90s", "15m", "1h", "7d" (or a plain number of seconds) in ms; <0 when
 * not a duration. */
int64_t query_parse_duration(const char *s);

/* The uuid of VM, a uuid or a name only one VM in store ST has, into UUID
 * (LEN >= 37). Returns 0, -ENOENT (no such VM), -EEXIST (the name is not
 * unique) or -EIO (the store failed: store_error says why). */
int query_vm_uuid(struct store *st, const char *vm, char *uuid, size_t len);
