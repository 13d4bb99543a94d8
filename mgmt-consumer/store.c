/* store.c -- see store.h */
#include "store.h"

#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dedup.h"
#include "sink.h"

const char *const store_gauge_columns[STORE_NGAUGES] = {
        "cpu_busy_percent",
        "memory_used_percent",
        "memory_available_bytes",
        "load1",
        "disk_read_bytes_per_second",
        "disk_write_bytes_per_second",
        "network_receive_bytes_per_second",
        "network_transmit_bytes_per_second",
};

/* The same tables in both databases; only the types of the surrogate key
 * and of floating point columns are spelled differently. */
#define SCHEMA(ID, REAL)                                                                           \
	"CREATE TABLE IF NOT EXISTS samples (\n"                                                   \
	"  id " ID ",\n"                                                                           \
	"  vm_uuid TEXT NOT NULL,\n"                                                               \
	"  boot_id TEXT NOT NULL,\n"                                                               \
	"  seq BIGINT NOT NULL,\n"                                                                 \
	"  time_ms BIGINT NOT NULL,\n"                                                             \
	"  received_ms BIGINT,\n"                                                                  \
	"  stored_ms BIGINT NOT NULL,\n"                                                           \
	"  interval_s BIGINT,\n"                                                                   \
	"  cpu_busy_percent " REAL ",\n"                                                           \
	"  memory_used_percent " REAL ",\n"                                                        \
	"  memory_available_bytes " REAL ",\n"                                                     \
	"  load1 " REAL ",\n"                                                                      \
	"  disk_read_bytes_per_second " REAL ",\n"                                                 \
	"  disk_write_bytes_per_second " REAL ",\n"                                                \
	"  network_receive_bytes_per_second " REAL ",\n"                                           \
	"  network_transmit_bytes_per_second " REAL ",\n"                                          \
	"  routing_key TEXT,\n"                                                                    \
	"  doc TEXT NOT NULL,\n"                                                                   \
	"  UNIQUE (vm_uuid, boot_id, seq)\n"                                                       \
	");\n"                                                                                     \
	"CREATE INDEX IF NOT EXISTS samples_vm_time ON samples (vm_uuid, time_ms);\n"              \
	"CREATE INDEX IF NOT EXISTS samples_time ON samples (time_ms);\n"                          \
	"CREATE TABLE IF NOT EXISTS vms (\n"                                                       \
	"  uuid TEXT PRIMARY KEY,\n"                                                               \
	"  name TEXT,\n"                                                                           \
	"  last_seen_ms BIGINT NOT NULL,\n"                                                        \
	"  last_host TEXT\n"                                                                       \
	");\n"

static const char sqlite_schema[] = SCHEMA("INTEGER PRIMARY KEY", "REAL");
static const char pg_schema[] = SCHEMA("BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION");

#define COLS                                                                                       \
	"vm_uuid, boot_id, seq, time_ms, received_ms, stored_ms, interval_s, "                     \
	"cpu_busy_percent, memory_used_percent, memory_available_bytes, load1, "                   \
	"disk_read_bytes_per_second, disk_write_bytes_per_second, "                                \
	"network_receive_bytes_per_second, network_transmit_bytes_per_second, routing_key, doc"
#define NCOLS 17
static const char insert_sql[] =
        "INSERT INTO samples (" COLS ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
        "$12, $13, $14, $15, $16, $17) ON CONFLICT (vm_uuid, boot_id, seq) DO NOTHING";
/* PostgreSQL: the VM row is touched only when the sample was new (a
 * duplicate says nothing about the VM now); one statement per sample. */
static const char pg_insert_sql[] =
        "WITH ins AS (INSERT INTO samples (" COLS ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
        "$10, $11, $12, $13, $14, $15, $16, $17) ON CONFLICT (vm_uuid, boot_id, seq) DO NOTHING "
        "RETURNING vm_uuid) "
        "INSERT INTO vms (uuid, name, last_seen_ms, last_host) "
        "SELECT vm_uuid, CAST($18 AS TEXT), CAST($6 AS BIGINT), CAST($19 AS TEXT) FROM ins "
        "ON CONFLICT (uuid) DO UPDATE SET name = excluded.name, "
        "last_seen_ms = excluded.last_seen_ms, last_host = excluded.last_host";
static const char vm_sql[] =
        "INSERT INTO vms (uuid, name, last_seen_ms, last_host) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (uuid) DO UPDATE SET name = excluded.name, "
        "last_seen_ms = excluded.last_seen_ms, last_host = excluded.last_host";
static const char load_sql[] =
        "SELECT v.uuid, v.name, v.last_seen_ms, (SELECT s.doc FROM samples s "
        "WHERE s.vm_uuid = v.uuid ORDER BY s.time_ms DESC, s.seq DESC LIMIT 1) FROM vms v";
static const char expire_sql[] =
        "DELETE FROM samples WHERE id IN (SELECT id FROM samples WHERE time_ms < $1 LIMIT $2)";

const char *store_schema(enum store_kind kind)
{
	return kind == STORE_POSTGRESQL ? pg_schema : kind == STORE_SQLITE ? sqlite_schema : "";
}

#define PG_SYNC_EVERY 128

struct store {
	struct store_opts o;
	char err[512];
	bool broken;
	/* sqlite */
	sqlite3 *db;
	sqlite3_stmt *ins, *vm, *expire;
	/* postgresql: a batch is pipelined (libpq pipeline mode): the rows are
	 * sent without waiting, their results read at each sync point */
	PGconn *pg;
	struct {
		char kind;    /* b(egin), i(nsert), c(ommit), r(ollback) */
		uint32_t put; /* which store_put of the batch, for inserts */
	} queued[PG_SYNC_EVERY + 8];
	size_t nqueued, since_sync;
	uint32_t nput;
	uint64_t duplicates; /* of the current batch, known at sync points */
	uint8_t *dup;        /* by store_put index: 1 when it was a duplicate */
	size_t dup_cap;
	/* jsonl */
	struct sink *jsonl;
	struct dedup *dedup;
	uint64_t *pending; /* keys of the batch, added to the window at commit */
	size_t npending, pending_cap;
};

static int fail(struct store *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct store *s, const char *fmt, ...)
{
	va_list ap;
	size_t n;

	va_start(ap, fmt);
	vsnprintf(s->err, sizeof(s->err), fmt, ap);
	va_end(ap);
	n = strlen(s->err);
	while (n && (s->err[n - 1] == '\n' || s->err[n - 1] == ' '))
		s->err[--n] = '\0';
	return -EIO;
}

const char *store_error(const struct store *s)
{
	return s->err;
}

enum store_kind store_kind(const struct store *s)
{
	return s->o.kind;
}

bool store_ok(const struct store *s)
{
	return !s->broken;
}

static double num(json_t *o, const char *a, const char *b)
{
	json_t *v = json_object_get(o, a);

	return json_number_value(b ? json_object_get(v, b) : v);
}

static double sum(json_t *arr, const char *key)
{
	double t = 0;
	size_t i;
	json_t *v;

	json_array_foreach(arr, i, v) t += json_number_value(json_object_get(v, key));
	return t;
}

void store_sample_gauges(struct store_sample *s, json_t *doc)
{
	s->gauges[STORE_CPU_BUSY] = num(doc, "cpu", "busy_pct");
	s->gauges[STORE_MEM_USED] = num(doc, "memory", "used_pct");
	s->gauges[STORE_MEM_AVAIL] = num(doc, "memory", "available_bytes");
	s->gauges[STORE_LOAD1] = num(doc, "load", "load1");
	s->gauges[STORE_DISK_READ] = sum(json_object_get(doc, "disks"), "read_bytes_per_s");
	s->gauges[STORE_DISK_WRITE] = sum(json_object_get(doc, "disks"), "write_bytes_per_s");
	s->gauges[STORE_NET_RX] = sum(json_object_get(doc, "network"), "rx_bytes_per_s");
	s->gauges[STORE_NET_TX] = sum(json_object_get(doc, "network"), "tx_bytes_per_s");
}

/* ---- SQLite ------------------------------------------------------------- */

static int sq_fail(struct store *s, const char *what)
{
	return fail(s, "sqlite \"%s\": %s: %s", s->o.path, what, sqlite3_errmsg(s->db));
}

static int sq_open(struct store *s)
{
	char *msg = NULL;

	if (sqlite3_open_v2(s->o.path, &s->db,
	                    SQLITE_OPEN_READWRITE | (s->o.existing ? 0 : SQLITE_OPEN_CREATE) |
	                            SQLITE_OPEN_NOMUTEX,
	                    NULL) != SQLITE_OK)
		return s->db ? sq_fail(s, "open")
		             : fail(s, "sqlite \"%s\": out of memory", s->o.path);
	sqlite3_busy_timeout(s->db, 10000);
	/* WAL with a full sync at each commit: a committed batch survives a
	 * power loss, which is what acking it promises. */
	if (sqlite3_exec(s->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", NULL, NULL,
	                 &msg) != SQLITE_OK ||
	    sqlite3_exec(s->db, sqlite_schema, NULL, NULL, &msg) != SQLITE_OK) {
		fail(s, "sqlite \"%s\": schema: %s", s->o.path, msg ? msg : "?");
		sqlite3_free(msg);
		return -EIO;
	}
	if (sqlite3_prepare_v2(s->db, insert_sql, -1, &s->ins, NULL) != SQLITE_OK ||
	    sqlite3_prepare_v2(s->db, vm_sql, -1, &s->vm, NULL) != SQLITE_OK ||
	    sqlite3_prepare_v2(s->db, expire_sql, -1, &s->expire, NULL) != SQLITE_OK)
		return sq_fail(s, "prepare");
	return 0;
}

static void sq_close(struct store *s)
{
	sqlite3_finalize(s->ins);
	sqlite3_finalize(s->vm);
	sqlite3_finalize(s->expire);
	sqlite3_close(s->db);
	s->ins = s->vm = s->expire = NULL;
	s->db = NULL;
}

static int sq_exec(struct store *s, const char *sql)
{
	char *msg = NULL;

	if (sqlite3_exec(s->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
		fail(s, "sqlite \"%s\": %s: %s", s->o.path, sql, msg ? msg : "?");
		sqlite3_free(msg);
		return -EIO;
	}
	return 0;
}

static void sq_text(sqlite3_stmt *st, int i, const char *v)
{
	if (v)
		sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
	else
		sqlite3_bind_null(st, i);
}

static int sq_put(struct store *s, const struct store_sample *m)
{
	sqlite3_stmt *st = s->ins;
	int rc, stored;

	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	sq_text(st, 1, m->vm_uuid);
	sq_text(st, 2, m->boot_id);
	sqlite3_bind_int64(st, 3, m->seq);
	sqlite3_bind_int64(st, 4, m->time_ms);
	if (m->received_ms >= 0)
		sqlite3_bind_int64(st, 5, m->received_ms);
	sqlite3_bind_int64(st, 6, m->stored_ms);
	if (m->interval_s > 0)
		sqlite3_bind_int64(st, 7, m->interval_s);
	for (int g = 0; g < STORE_NGAUGES; g++)
		sqlite3_bind_double(st, 8 + g, m->gauges[g]);
	sq_text(st, 16, m->routing_key);
	sqlite3_bind_text(st, 17, m->doc_text, (int)m->doc_len, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc != SQLITE_DONE)
		return sq_fail(s, "insert");
	stored = sqlite3_changes(s->db) > 0;
	if (!stored)
		return 0; /* a duplicate says nothing about the VM now */
	st = s->vm;
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	sq_text(st, 1, m->vm_uuid);
	sq_text(st, 2, m->vm_name);
	sqlite3_bind_int64(st, 3, m->stored_ms);
	sq_text(st, 4, m->proxy_host);
	if (sqlite3_step(st) != SQLITE_DONE)
		return sq_fail(s, "insert into vms");
	return stored;
}

static int sq_select(struct store *s, const char *sql, int nparams, const char *const *params,
                     store_row_fn fn, void *ud)
{
	sqlite3_stmt *st;
	const char *cols[32];
	int rc, n;

	if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK)
		return sq_fail(s, "prepare");
	for (int i = 0; i < nparams; i++) {
		char name[16];
		int idx;

		snprintf(name, sizeof(name), "$%d", i + 1);
		idx = sqlite3_bind_parameter_index(st, name);
		if (idx > 0)
			sq_text(st, idx, params[i]);
	}
	n = sqlite3_column_count(st);
	if (n > 32)
		n = 32;
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		for (int i = 0; i < n; i++)
			cols[i] = (const char *)sqlite3_column_text(st, i);
		if (fn(ud, n, cols) < 0)
			break;
	}
	sqlite3_finalize(st);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return sq_fail(s, "select");
	return 0;
}

/* ---- PostgreSQL --------------------------------------------------------- */

static int pg_fail(struct store *s, const char *what, PGresult *r)
{
	const char *msg = r ? PQresultErrorMessage(r) : "";

	if (!msg || !*msg)
		msg = PQerrorMessage(s->pg);
	fail(s, "postgresql: %s: %s", what, msg);
	if (PQstatus(s->pg) != CONNECTION_OK)
		s->broken = true;
	PQclear(r);
	return -EIO;
}

static int pg_cmd(struct store *s, const char *sql)
{
	PGresult *r = PQexec(s->pg, sql);

	if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
		return pg_fail(s, sql, r);
	PQclear(r);
	return 0;
}

static int pg_open(struct store *s)
{
	PGresult *r;

	s->pg = PQconnectdb(s->o.conninfo);
	if (!s->pg || PQstatus(s->pg) != CONNECTION_OK) {
		s->broken = true;
		return fail(s, "postgresql: connect: %s",
		            s->pg ? PQerrorMessage(s->pg) : "out of memory");
	}
	/* Several instances may start at once: one creates the schema. */
	if (pg_cmd(s, "SET client_min_messages = warning") < 0 ||
	    pg_cmd(s, "SELECT pg_advisory_lock(74201117)") < 0)
		return -EIO;
	r = PQexec(s->pg, pg_schema);
	if (PQresultStatus(r) != PGRES_COMMAND_OK) {
		pg_fail(s, "schema", r);
		return -EIO;
	}
	PQclear(r);
	if (pg_cmd(s, "SELECT pg_advisory_unlock(74201117)") < 0)
		return -EIO;
	r = PQprepare(s->pg, "ins", pg_insert_sql, 0, NULL);
	if (PQresultStatus(r) != PGRES_COMMAND_OK)
		return pg_fail(s, "prepare", r);
	PQclear(r);
	s->broken = false;
	return 0;
}

/* Read the results of the commands queued since the last sync point, up to
 * and including the sync. */
static int pg_drain(struct store *s)
{
	size_t k = 0;
	int err = 0;

	for (;;) {
		PGresult *r = PQgetResult(s->pg);
		ExecStatusType st;

		if (!r) {
			if (PQstatus(s->pg) != CONNECTION_OK) {
				s->broken = true;
				if (!err)
					fail(s, "postgresql: %s", PQerrorMessage(s->pg));
				return -EIO;
			}
			continue; /* between two commands' results */
		}
		st = PQresultStatus(r);
		if (st == PGRES_PIPELINE_SYNC) {
			PQclear(r);
			break;
		}
		if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
			if (k < s->nqueued && s->queued[k].kind == 'i' &&
			    atoi(PQcmdTuples(r)) == 0) {
				s->duplicates++;
				if (s->queued[k].put < s->dup_cap)
					s->dup[s->queued[k].put] = 1;
			}
		} else if (!err) {
			/* The first error; the rest of the pipeline is aborted. */
			err = 1;
			fail(s, "postgresql: %s: %s",
			     k < s->nqueued && s->queued[k].kind == 'i' ? "insert" : "batch",
			     st == PGRES_PIPELINE_ABORTED ? "aborted" : PQresultErrorMessage(r));
			if (PQstatus(s->pg) != CONNECTION_OK)
				s->broken = true;
		}
		k++;
		PQclear(r);
	}
	s->nqueued = 0;
	s->since_sync = 0;
	return err ? -EIO : 0;
}

static int pg_send_sync(struct store *s)
{
	if (!PQpipelineSync(s->pg)) {
		s->broken = PQstatus(s->pg) != CONNECTION_OK;
		return fail(s, "postgresql: sync: %s", PQerrorMessage(s->pg));
	}
	return pg_drain(s);
}

static int pg_queue(struct store *s, char kind, const char *stmt, const char *sql, int n,
                    const char *const *p)
{
	int ok = stmt ? PQsendQueryPrepared(s->pg, stmt, n, p, NULL, NULL, 0)
	              : PQsendQueryParams(s->pg, sql, 0, NULL, NULL, NULL, NULL, 0);

	if (!ok) {
		s->broken = PQstatus(s->pg) != CONNECTION_OK;
		return fail(s, "postgresql: send: %s", PQerrorMessage(s->pg));
	}
	s->queued[s->nqueued].kind = kind;
	s->queued[s->nqueued++].put = s->nput;
	return 0;
}

static int pg_begin(struct store *s)
{
	if (PQpipelineStatus(s->pg) == PQ_PIPELINE_OFF && !PQenterPipelineMode(s->pg))
		return fail(s, "postgresql: pipeline mode: %s", PQerrorMessage(s->pg));
	s->nqueued = s->since_sync = 0;
	s->nput = 0;
	s->duplicates = 0;
	if (s->dup)
		memset(s->dup, 0, s->dup_cap);
	return pg_queue(s, 'b', NULL, "BEGIN", 0, NULL);
}

static int pg_put(struct store *s, const struct store_sample *m)
{
	char seq[24], t[24], rcv[24], stored[24], iv[24], g[STORE_NGAUGES][32];
	const char *p[NCOLS + 2];

	snprintf(seq, sizeof(seq), "%" PRId64, m->seq);
	snprintf(t, sizeof(t), "%" PRId64, m->time_ms);
	snprintf(rcv, sizeof(rcv), "%" PRId64, m->received_ms);
	snprintf(stored, sizeof(stored), "%" PRId64, m->stored_ms);
	snprintf(iv, sizeof(iv), "%" PRId64, m->interval_s);
	p[0] = m->vm_uuid;
	p[1] = m->boot_id;
	p[2] = seq;
	p[3] = t;
	p[4] = m->received_ms >= 0 ? rcv : NULL;
	p[5] = stored;
	p[6] = m->interval_s > 0 ? iv : NULL;
	for (int i = 0; i < STORE_NGAUGES; i++) {
		snprintf(g[i], sizeof(g[i]), "%.17g", m->gauges[i]);
		p[7 + i] = g[i];
	}
	p[15] = m->routing_key;
	p[16] = m->doc_text;
	p[17] = m->vm_name;
	p[18] = m->proxy_host;
	if (s->nput >= s->dup_cap) {
		size_t cap = s->dup_cap ? s->dup_cap * 2 : 1024;
		uint8_t *d = realloc(s->dup, cap);
		if (!d)
			return fail(s, "out of memory");
		memset(d + s->dup_cap, 0, cap - s->dup_cap);
		s->dup = d;
		s->dup_cap = cap;
	}
	if (pg_queue(s, 'i', "ins", NULL, NCOLS + 2, p) < 0)
		return -EIO;
	s->nput++;
	/* A sync point now and then inside the transaction (it does not
	 * commit it): the results never pile up past the socket buffers. */
	if (++s->since_sync >= PG_SYNC_EVERY && pg_send_sync(s) < 0)
		return -EIO;
	return 1; /* whether it was a duplicate is known at the sync point */
}

static int pg_commit(struct store *s)
{
	if (pg_queue(s, 'c', NULL, "COMMIT", 0, NULL) < 0 || pg_send_sync(s) < 0)
		return -EIO;
	/* Out of pipeline mode between batches: retention and the start-up
	 * queries are plain synchronous calls. */
	if (!PQexitPipelineMode(s->pg))
		return fail(s, "postgresql: leaving pipeline mode: %s", PQerrorMessage(s->pg));
	return 0;
}

static void pg_abandon(struct store *s)
{
	/* Whatever was queued: send a ROLLBACK behind it and read it all, so
	 * the connection is usable again (or found broken). */
	if (s->broken || !s->pg)
		return;
	if (PQpipelineStatus(s->pg) != PQ_PIPELINE_OFF) {
		if (pg_queue(s, 'r', NULL, "ROLLBACK", 0, NULL) == 0)
			pg_send_sync(s);
		if (!s->broken)
			PQexitPipelineMode(s->pg);
	}
}

static int pg_select(struct store *s, const char *sql, int nparams, const char *const *params,
                     store_row_fn fn, void *ud)
{
	PGresult *r = PQexecParams(s->pg, sql, nparams, NULL, params, NULL, NULL, 0);
	const char *cols[32];
	int n;

	if (PQresultStatus(r) != PGRES_TUPLES_OK)
		return pg_fail(s, "select", r);
	n = PQnfields(r);
	if (n > 32)
		n = 32;
	for (int row = 0; row < PQntuples(r); row++) {
		for (int i = 0; i < n; i++)
			cols[i] = PQgetisnull(r, row, i) ? NULL : PQgetvalue(r, row, i);
		if (fn(ud, n, cols) < 0)
			break;
	}
	PQclear(r);
	return 0;
}

/* ---- JSON Lines ---------------------------------------------------------- */

/* Remember what was stored before a crash: those may be redelivered. */
static void seed_line(void *ud, const char *line, size_t len)
{
	struct store *s = ud;
	json_t *o = json_loadb(line, len, 0, NULL);
	json_t *doc = json_object_get(o, "doc");
	const char *uuid = json_string_value(json_object_get(json_object_get(o, "vm"), "uuid"));
	const char *boot =
	        json_string_value(json_object_get(json_object_get(doc, "host"), "boot_id"));

	if (uuid && boot)
		dedup_add(s->dedup,
		          dedup_key(uuid, boot, json_integer_value(json_object_get(doc, "seq"))));
	json_decref(o);
}

static int jl_open(struct store *s)
{
	int r = sink_open(s->o.dir, "metrics", s->o.max_file_bytes, NULL, &s->jsonl);

	if (r == 0)
		r = dedup_new(s->o.dedup_window, &s->dedup);
	if (r == 0)
		r = sink_replay_tail(s->o.dir, "metrics", s->o.dedup_window, seed_line, s);
	if (r < 0)
		return fail(s, "\"%s\": %s", s->o.dir, strerror(-r));
	return 0;
}

bool store_batch_was_duplicate(const struct store *s, size_t i)
{
	return s->o.kind == STORE_POSTGRESQL && i < s->dup_cap && s->dup[i];
}

uint64_t store_batch_duplicates(const struct store *s)
{
	return s->o.kind == STORE_POSTGRESQL ? s->duplicates : 0;
}

size_t store_remembered(const struct store *s)
{
	return s->dedup ? dedup_count(s->dedup) : 0;
}

/* ---- the interface -------------------------------------------------------- */

int store_open(const struct store_opts *o, struct store **out, char *err, size_t errlen)
{
	struct store *s = calloc(1, sizeof(*s));
	int r = 0;

	if (!s) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	s->o = *o;
	switch (o->kind) {
	case STORE_SQLITE:
		r = sq_open(s);
		break;
	case STORE_POSTGRESQL:
		r = pg_open(s);
		break;
	case STORE_JSONL:
		r = jl_open(s);
		break;
	}
	if (r < 0) {
		snprintf(err, errlen, "%s", s->err);
		store_close(s);
		return r;
	}
	*out = s;
	return 0;
}

void store_close(struct store *s)
{
	if (!s)
		return;
	sq_close(s);
	PQfinish(s->pg);
	free(s->dup);
	free(s->pending);
	sink_close(s->jsonl);
	dedup_free(s->dedup);
	free(s);
}

int store_reconnect(struct store *s)
{
	if (s->o.kind != STORE_POSTGRESQL)
		return 0;
	PQfinish(s->pg);
	s->pg = NULL;
	s->broken = true;
	return pg_open(s);
}

int store_begin(struct store *s)
{
	switch (s->o.kind) {
	case STORE_SQLITE:
		return sq_exec(s, "BEGIN IMMEDIATE");
	case STORE_POSTGRESQL:
		return pg_begin(s);
	case STORE_JSONL:
		s->npending = 0;
		return 0;
	}
	return -EINVAL;
}

int store_put(struct store *s, const struct store_sample *m)
{
	switch (s->o.kind) {
	case STORE_SQLITE:
		return sq_put(s, m);
	case STORE_POSTGRESQL:
		return pg_put(s, m);
	case STORE_JSONL: {
		uint64_t key = dedup_key(m->vm_uuid, m->boot_id, m->seq);
		json_t *line;
		char *text;
		int r;

		if (dedup_seen(s->dedup, key))
			return 0;
		for (size_t i = 0; i < s->npending; i++)
			if (s->pending[i] == key)
				return 0;
		line = json_pack("{s:O, s:s, s:O}", "vm", m->vm, "routing_key",
		                 m->routing_key ? m->routing_key : "", "doc", m->doc);
		/* 15 significant digits: a real the publisher wrote with up to
		 * 15 (the agent's two decimals) is stored as written, not as its
		 * binary approximation's 17-digit tail. */
		text = line ? json_dumps(line, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
		r = text ? sink_append(s->jsonl, text, strlen(text)) : -ENOMEM;
		free(text);
		json_decref(line);
		if (r < 0)
			return fail(s, "jsonl: %s", strerror(-r));
		if (s->npending == s->pending_cap) {
			size_t cap = s->pending_cap ? s->pending_cap * 2 : 1024;
			uint64_t *p = realloc(s->pending, cap * sizeof(*p));
			if (!p)
				return fail(s, "out of memory");
			s->pending = p;
			s->pending_cap = cap;
		}
		s->pending[s->npending++] = key;
		return 1;
	}
	}
	return -EINVAL;
}

int store_commit(struct store *s)
{
	int r;

	switch (s->o.kind) {
	case STORE_SQLITE:
		if (sq_exec(s, "COMMIT") < 0) {
			store_rollback(s);
			return -EIO;
		}
		return 0;
	case STORE_POSTGRESQL:
		if (pg_commit(s) < 0) {
			store_rollback(s);
			return -EIO;
		}
		return 0;
	case STORE_JSONL:
		r = sink_sync(s->jsonl);
		if (r < 0)
			return fail(s, "cannot write the JSON Lines files: %s", strerror(-r));
		for (size_t i = 0; i < s->npending; i++)
			dedup_add(s->dedup, s->pending[i]);
		s->npending = 0;
		return 0;
	}
	return -EINVAL;
}

void store_rollback(struct store *s)
{
	switch (s->o.kind) {
	case STORE_SQLITE:
		if (!sqlite3_get_autocommit(s->db))
			sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
		break;
	case STORE_POSTGRESQL:
		pg_abandon(s);
		break;
	case STORE_JSONL:
		/* Neither the lines nor their keys: the messages come back. */
		sink_discard(s->jsonl);
		s->npending = 0;
		break;
	}
}

int store_expire(struct store *s, int64_t cutoff_ms, int max_rows)
{
	char c[24], m[16];
	const char *p[2] = {c, m};
	PGresult *r;
	int n;

	switch (s->o.kind) {
	case STORE_SQLITE:
		sqlite3_reset(s->expire);
		sqlite3_bind_int64(s->expire, 1, cutoff_ms);
		sqlite3_bind_int(s->expire, 2, max_rows);
		if (sqlite3_step(s->expire) != SQLITE_DONE)
			return sq_fail(s, "expire");
		return sqlite3_changes(s->db);
	case STORE_POSTGRESQL:
		snprintf(c, sizeof(c), "%" PRId64, cutoff_ms);
		snprintf(m, sizeof(m), "%d", max_rows);
		r = PQexecParams(s->pg, expire_sql, 2, NULL, p, NULL, NULL, 0);
		if (PQresultStatus(r) != PGRES_COMMAND_OK)
			return pg_fail(s, "expire", r);
		n = atoi(PQcmdTuples(r));
		PQclear(r);
		return n;
	case STORE_JSONL:
		return 0;
	}
	return -EINVAL;
}

struct load_ctx {
	store_vm_fn fn;
	void *ud;
};

static int load_row(void *ud, int ncols, const char *const *cols)
{
	struct load_ctx *l = ud;
	json_t *doc;

	if (ncols < 4 || !cols[0] || !cols[2])
		return 0;
	doc = cols[3] ? json_loads(cols[3], 0, NULL) : NULL;
	l->fn(l->ud, cols[0], cols[1], strtoll(cols[2], NULL, 10), doc);
	json_decref(doc);
	return 0;
}

int store_load_vms(struct store *s, store_vm_fn fn, void *ud)
{
	struct load_ctx l = {fn, ud};

	if (s->o.kind == STORE_JSONL)
		return 0;
	return store_select(s, load_sql, 0, NULL, load_row, &l);
}

int store_select(struct store *s, const char *sql, int nparams, const char *const *params,
                 store_row_fn fn, void *ud)
{
	switch (s->o.kind) {
	case STORE_SQLITE:
		return sq_select(s, sql, nparams, params, fn, ud);
	case STORE_POSTGRESQL:
		return pg_select(s, sql, nparams, params, fn, ud);
	case STORE_JSONL:
		return fail(s, "the JSON Lines sink cannot be queried: use sqlite or postgresql");
	}
	return -EINVAL;
}
