/* store.h -- where the consumer keeps samples: a small interface with three
 * backends chosen by sink.type in the configuration.
 *
 *   sqlite      one database file (WAL), the default
 *   postgresql  a server shared by several consumer instances
 *   jsonl       JSON Lines files (sink.c), deduplicated in memory (dedup.c)
 *
 * A batch is store_begin, store_put per sample, store_commit; only after
 * store_commit returned 0 may the caller acknowledge the batch. The two
 * databases deduplicate exactly with UNIQUE (vm_uuid, boot_id, seq) and
 * INSERT ... ON CONFLICT DO NOTHING; the schema is in store_schema(). */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum store_kind { STORE_SQLITE, STORE_POSTGRESQL, STORE_JSONL };

struct store_opts {
	enum store_kind kind;
	const char *path;        /* sqlite: the database file */
	const char *conninfo;    /* postgresql: a libpq connection string */
	const char *dir;         /* jsonl: the directory of the files */
	uint64_t max_file_bytes; /* jsonl: rotation size */
	uint64_t dedup_window;   /* jsonl: keys remembered */
	bool existing;           /* sqlite: the file must exist (the query command) */
};

/* The typed columns: the per-VM Prometheus gauges, by column name. */
enum {
	STORE_CPU_BUSY,
	STORE_MEM_USED,
	STORE_MEM_AVAIL,
	STORE_LOAD1,
	STORE_DISK_READ,
	STORE_DISK_WRITE,
	STORE_NET_RX,
	STORE_NET_TX,
	STORE_NGAUGES
};
extern const char *const store_gauge_columns[STORE_NGAUGES];

/* One validated sample. DOC is the parsed document, DOC_TEXT its raw JSON;
 * VM is the jsonl record's "vm" object ({uuid, name, cid, proxy_host,
 * received_ms}). */
struct store_sample {
	const char *vm_uuid, *vm_name, *boot_id, *proxy_host, *routing_key;
	int64_t seq, time_ms, received_ms, stored_ms, interval_s; /* received_ms < 0: unknown */
	double gauges[STORE_NGAUGES];
	json_t *doc, *vm;
	const char *doc_text;
	size_t doc_len;
};

/* Fill the gauges of S from its document. */
void store_sample_gauges(struct store_sample *s, json_t *doc);

struct store;

/* Open (and create the schema of) the store. On failure ERR says why. */
int store_open(const struct store_opts *o, struct store **out, char *err, size_t errlen);
void store_close(struct store *s);
enum store_kind store_kind(const struct store *s);

/* False once a call failed in a way only a reconnect mends (a database
 * connection lost); store_reconnect then tries once. */
bool store_ok(const struct store *s);
int store_reconnect(struct store *s);

int store_begin(struct store *s);
/* 1 when stored, 0 when the sample was already there (a duplicate), <0 on
 * error (the batch must then be abandoned with store_rollback). PostgreSQL
 * sends the rows of a batch without waiting for each (pipeline mode): its
 * store_put returns 1, and the batch's duplicates are counted by
 * store_batch_duplicates once store_commit returned. */
int store_put(struct store *s, const struct store_sample *smp);
uint64_t store_batch_duplicates(const struct store *s);
/* Whether the Ith store_put of the committed batch was a duplicate. */
bool store_batch_was_duplicate(const struct store *s, size_t i);
/* Durable when it returns 0; on failure nothing of the batch is kept. */
int store_commit(struct store *s);
void store_rollback(struct store *s);

/* Delete up to MAX_ROWS samples whose time_ms is before CUTOFF_MS. Returns
 * the rows deleted or <0. (jsonl: 0, files are removed by age outside.) */
int store_expire(struct store *s, int64_t cutoff_ms, int max_rows);

/* The VMs the store knows: FN(uuid, name, last_seen_ms, latest document or
 * NULL) for each (jsonl: none). */
typedef void (*store_vm_fn)(void *ud, const char *uuid, const char *name, int64_t last_seen_ms,
                            json_t *doc);
int store_load_vms(struct store *s, store_vm_fn fn, void *ud);

/* For the query command: rows of SQL with text parameters (NPARAMS of
 * PARAMS), each passed to FN as NCOLS strings (NULL for SQL NULL). The SQL
 * uses $1, $2... placeholders in both databases. <0 on error. */
typedef int (*store_row_fn)(void *ud, int ncols, const char *const *cols);
int store_select(struct store *s, const char *sql, int nparams, const char *const *params,
                 store_row_fn fn, void *ud);

/* jsonl: the stored samples remembered for deduplication (seeded at open
 * from the tail of the newest files). */
size_t store_remembered(const struct store *s);

/* The last error of S, for logs. */
const char *store_error(const struct store *s);

/* The schema's SQL (for docs and tests). */
const char *store_schema(enum store_kind kind);
