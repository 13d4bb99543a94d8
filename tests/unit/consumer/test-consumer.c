/* test-consumer.c -- the consumer's pieces: the dedup window (bounded,
 * oldest forgotten first), validation reasons, JSON Lines rotation by size
 * and by UTC day with a replayable tail, the Prometheus text with its
 * staleness flag and the queues this instance is active on, the SQLite
 * store (exact deduplication, the VM table across reopening, retention, a
 * rolled-back batch keeps nothing), the jsonl store's window seeded from
 * its files, and the query command's durations. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dedup.h"
#include "query.h"
#include "sink.h"
#include "store.h"
#include "validate.h"
#include "vmstate.h"

static void test_dedup_window(void **state)
{
	struct dedup *d;
	uint64_t k[40];

	assert_int_equal(dedup_new(16, &d), 0);
	for (int i = 0; i < 40; i++)
		k[i] = dedup_key("11111111-2222-4333-8444-555555555501", "boot", i + 1);
	for (int i = 0; i < 16; i++)
		dedup_add(d, k[i]);
	for (int i = 0; i < 16; i++)
		assert_true(dedup_seen(d, k[i]));
	dedup_add(d, k[3]); /* present: nothing changes */
	assert_int_equal(dedup_count(d), 16);
	for (int i = 16; i < 40; i++)
		dedup_add(d, k[i]);
	assert_int_equal(dedup_count(d), 16);
	for (int i = 0; i < 24; i++)
		assert_false(dedup_seen(d, k[i])); /* the oldest went first */
	for (int i = 24; i < 40; i++)
		assert_true(dedup_seen(d, k[i]));
	/* Keys differ by VM, boot and seq. */
	assert_true(dedup_key("a", "b", 1) != dedup_key("a", "b", 2));
	assert_true(dedup_key("a", "b", 1) != dedup_key("b", "a", 1));
	assert_true(dedup_key("ab", "", 1) != dedup_key("a", "b", 1));
	dedup_free(d);
}

static void test_validate(void **state)
{
	static const struct {
		const char *doc, *why;
	} cases[] = {
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":1,\"time_ms\":5,\"host\":"
		  "{\"hostname\":\"h\",\"boot_id\":\"b\"}}",
		  NULL },
		{ "[]", "not a JSON object" },
		{ "{\"schema\":\"v2\",\"seq\":1}", "schema is not" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":0,\"time_ms\":5}", "seq is not" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":\"7\",\"time_ms\":5}", "seq is not" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":1}", "time_ms is not" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":1,\"time_ms\":5}", "host is not" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":1,\"time_ms\":5,\"host\":{\"boot_id\":"
		  "\"b\"}}",
		  "host.hostname" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":1,\"time_ms\":5,\"host\":{\"hostname\":"
		  "\"h\"}}",
		  "host.boot_id" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":1,\"time_ms\":5,\"host\":{\"hostname\":"
		  "\"h\",\"boot_id\":\"b\"},\"cpu\":[]}",
		  "must be objects" },
		{ "{\"schema\":\"vmproxy.metrics/1\",\"seq\":1,\"time_ms\":5,\"host\":{\"hostname\":"
		  "\"h\",\"boot_id\":\"b\"},\"disks\":{}}",
		  "must be arrays" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		json_t *d = json_loads(cases[i].doc, 0, NULL);
		const char *why = metrics_validate(d);

		if (!cases[i].why)
			assert_null(why);
		else if (!why || !strstr(why, cases[i].why))
			fail_msg("case %zu: got \"%s\", want \"%s\"", i, why ? why : "(valid)",
				 cases[i].why);
		json_decref(d);
	}
}

static time_t fake_now = 1795000000; /* 2026-11-18 */

static time_t fake_time(time_t *t)
{
	if (t)
		*t = fake_now;
	return fake_now;
}

static int count_files(const char *dir, const char *prefix)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	int n = 0;

	while (d && (de = readdir(d)))
		n += strncmp(de->d_name, prefix, strlen(prefix)) == 0;
	if (d)
		closedir(d);
	return n;
}

static void count_line(void *ud, const char *line, size_t len)
{
	(*(int *)ud)++;
	assert_int_equal(line[len], '\n');
}

static void test_rotation(void **state)
{
	char dir[] = "/tmp/vmproxy-sink-XXXXXX", cmd[80];
	struct sink *s;
	char line[100];
	int replayed = 0;

	assert_non_null(mkdtemp(dir));
	assert_int_equal(sink_open(dir, "metrics", 4096, fake_time, &s), 0);
	memset(line, 'x', sizeof(line));
	for (int i = 0; i < 100; i++) { /* 10 KiB in batches of 10 lines */
		assert_int_equal(sink_append(s, line, sizeof(line)), 0);
		if (i % 10 == 9)
			assert_int_equal(sink_sync(s), 0);
	}
	/* A file is closed once a batch takes it past 4 KiB: 10 KiB in 1010-byte
	 * batches makes two files of five batches each. */
	assert_int_equal(count_files(dir, "metrics-2026-11-18."), 2);
	assert_non_null(strstr(sink_current(s), "metrics-2026-11-18."));
	fake_now += 86400; /* next UTC day */
	assert_int_equal(sink_append(s, line, sizeof(line)), 0);
	assert_int_equal(sink_sync(s), 0);
	assert_non_null(strstr(sink_current(s), "metrics-2026-11-19.0000.jsonl"));
	sink_close(s);
	/* The tail covers at least the lines asked for, oldest first. */
	assert_true(sink_replay_tail(dir, "metrics", 30, count_line, &replayed) >= 30);
	assert_true(replayed >= 30);
	replayed = 0;
	assert_int_equal(sink_replay_tail(dir, "metrics", 1000, count_line, &replayed), 101);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	assert_int_equal(system(cmd), 0);
}

static void test_prometheus_and_staleness(void **state)
{
	struct vmstate *st;
	json_t *doc = json_loads("{\"interval_s\":2,\"cpu\":{\"busy_pct\":12.5},\"memory\":"
				 "{\"used_pct\":40,\"available_bytes\":1000},\"load\":{\"load1\":0.5},"
				 "\"disks\":[{\"read_bytes_per_s\":10,\"write_bytes_per_s\":1},"
				 "{\"read_bytes_per_s\":5,\"write_bytes_per_s\":2}],\"network\":"
				 "[{\"rx_bytes_per_s\":7,\"tx_bytes_per_s\":3}]}",
				 0, NULL);
	char *t;

	assert_int_equal(vmstate_new(2, 3, &st), 0);
	vmstate_update(st, "u1", "web \"1\"", doc, 1000.0);
	vmstate_count(st, "stored");
	vmstate_count(st, "duplicate");
	t = vmstate_render(st, 1005.0);
	assert_non_null(strstr(t, "vmproxy_vm_cpu_busy_percent{vm_uuid=\"u1\",vm_name=\"web "
				  "\\\"1\\\"\"} 12.5\n"));
	assert_non_null(strstr(t, "vmproxy_vm_disk_read_bytes_per_second{vm_uuid=\"u1\","
				  "vm_name=\"web \\\"1\\\"\"} 15\n"));
	assert_non_null(strstr(t, "vmproxy_vm_last_seen_seconds{vm_uuid=\"u1\",vm_name=\"web "
				  "\\\"1\\\"\"} 1000\n"));
	/* 5 s since the last sample, 3 intervals of 2 s allowed: fresh. */
	assert_non_null(strstr(t, "vmproxy_vm_stale{vm_uuid=\"u1\",vm_name=\"web \\\"1\\\"\"} 0\n"));
	assert_non_null(strstr(t, "vmproxy_consumer_messages_total{result=\"duplicate\"} 1\n"));
	free(t);
	t = vmstate_render(st, 1007.0);
	assert_non_null(strstr(t, "vmproxy_vm_stale{vm_uuid=\"u1\",vm_name=\"web \\\"1\\\"\"} 1\n"));
	free(t);
	/* Bounded: a third VM is counted, not tracked. */
	vmstate_update(st, "u2", "b", doc, 1000.0);
	vmstate_update(st, "u3", "c", doc, 1000.0);
	t = vmstate_render(st, 1000.0);
	assert_null(strstr(t, "vm_uuid=\"u3\""));
	assert_non_null(strstr(t, "vmproxy_consumer_untracked_vms_total 1\n"));
	free(t);
	vmstate_free(st);
	json_decref(doc);
}

static struct store_sample mk(const char *uuid, int64_t seq, int64_t time_ms, json_t *doc,
			      const char *text)
{
	struct store_sample m;

	memset(&m, 0, sizeof(m));
	m.vm_uuid = uuid;
	m.vm_name = "web-1";
	m.boot_id = "b1";
	m.proxy_host = "hv-1";
	m.routing_key = "x.metrics";
	m.seq = seq;
	m.time_ms = time_ms;
	m.received_ms = -1;
	m.stored_ms = 1000 * seq;
	m.interval_s = 10;
	m.doc = doc;
	m.vm = json_pack("{s:s}", "uuid", uuid);
	m.doc_text = text;
	m.doc_len = strlen(text);
	store_sample_gauges(&m, doc);
	return m;
}

static int count_rows(void *ud, int ncols, const char *const *cols)
{
	(void)ncols;
	(void)cols;
	(*(int *)ud)++;
	return 0;
}

static int rows(struct store *s, const char *sql)
{
	int n = 0;

	assert_int_equal(store_select(s, sql, 0, NULL, count_rows, &n), 0);
	return n;
}

struct seen_vm {
	char uuid[40], name[40];
	int64_t last_seen_ms;
	double cpu;
	int n;
};

static void on_vm(void *ud, const char *uuid, const char *name, int64_t last_seen_ms, json_t *doc)
{
	struct seen_vm *v = ud;

	snprintf(v->uuid, sizeof(v->uuid), "%s", uuid);
	snprintf(v->name, sizeof(v->name), "%s", name ? name : "");
	v->last_seen_ms = last_seen_ms;
	v->cpu = json_number_value(json_object_get(json_object_get(doc, "cpu"), "busy_pct"));
	v->n++;
}

static void test_sqlite_store(void **state)
{
	char dir[] = "/tmp/vmproxy-store-XXXXXX", path[80], cmd[80];
	const char *text = "{\"seq\":1,\"cpu\":{\"busy_pct\":12.5},\"disks\":"
			   "[{\"read_bytes_per_s\":10},{\"read_bytes_per_s\":5}]}";
	json_t *doc = json_loads(text, 0, NULL);
	struct store_opts o = { .kind = STORE_SQLITE };
	struct store *s;
	struct store_sample m;
	struct seen_vm v = { .n = 0 };
	char err[200];

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/metrics.db", dir);
	o.path = path;
	/* The query command does not create a database. */
	o.existing = true;
	assert_true(store_open(&o, &s, err, sizeof(err)) < 0);
	assert_non_null(strstr(err, path));
	o.existing = false;
	assert_int_equal(store_open(&o, &s, err, sizeof(err)), 0);
	assert_int_equal(store_begin(s), 0);
	for (int64_t q = 1; q <= 5; q++) {
		m = mk("u1", q, 100 * q, doc, text);
		assert_int_equal(store_put(s, &m), 1);
		json_decref(m.vm);
	}
	m = mk("u1", 3, 300, doc, text); /* in the same batch: a duplicate */
	assert_int_equal(store_put(s, &m), 0);
	json_decref(m.vm);
	assert_int_equal(store_commit(s), 0);
	/* A rolled-back batch leaves nothing. */
	assert_int_equal(store_begin(s), 0);
	m = mk("u2", 1, 100, doc, text);
	assert_int_equal(store_put(s, &m), 1);
	json_decref(m.vm);
	store_rollback(s);
	assert_int_equal(rows(s, "SELECT 1 FROM samples"), 5);
	assert_int_equal(rows(s, "SELECT 1 FROM samples WHERE vm_uuid = 'u2'"), 0);
	assert_int_equal(rows(s, "SELECT 1 FROM samples WHERE cpu_busy_percent = 12.5 AND "
				 "disk_read_bytes_per_second = 15"), 5);
	store_close(s);

	/* Reopened (a restart): the same key is still a duplicate, exactly. */
	assert_int_equal(store_open(&o, &s, err, sizeof(err)), 0);
	assert_int_equal(store_begin(s), 0);
	m = mk("u1", 5, 500, doc, text);
	assert_int_equal(store_put(s, &m), 0);
	json_decref(m.vm);
	m = mk("u1", 6, 600, doc, text);
	assert_int_equal(store_put(s, &m), 1);
	json_decref(m.vm);
	assert_int_equal(store_commit(s), 0);
	/* The VM table remembers the VM, its name and the latest document. */
	assert_int_equal(store_load_vms(s, on_vm, &v), 0);
	assert_int_equal(v.n, 1);
	assert_string_equal(v.uuid, "u1");
	assert_string_equal(v.name, "web-1");
	assert_int_equal(v.last_seen_ms, 6000);
	assert_true(v.cpu == 12.5);
	/* Retention: in batches of at most the number asked for. */
	assert_int_equal(store_expire(s, 350, 2), 2);
	assert_int_equal(store_expire(s, 350, 2), 1);
	assert_int_equal(store_expire(s, 350, 2), 0);
	assert_int_equal(rows(s, "SELECT 1 FROM samples"), 3);
	store_close(s);
	json_decref(doc);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	assert_int_equal(system(cmd), 0);
}

static int count_lines_in(const char *dir)
{
	int n = 0;

	assert_true(sink_replay_tail(dir, "metrics", 1000, count_line, &n) >= 0);
	return n;
}

static void test_jsonl_store(void **state)
{
	char dir[] = "/tmp/vmproxy-jstore-XXXXXX", cmd[80];
	const char *text = "{\"seq\":1,\"host\":{\"boot_id\":\"b1\"}}";
	json_t *doc = json_loads(text, 0, NULL);
	struct store_opts o = { .kind = STORE_JSONL, .max_file_bytes = 1 << 20,
				.dedup_window = 100 };
	struct store *s;
	struct store_sample m;
	char err[200];

	assert_non_null(mkdtemp(dir));
	o.dir = dir;
	assert_int_equal(store_open(&o, &s, err, sizeof(err)), 0);
	assert_int_equal(store_begin(s), 0);
	for (int64_t q = 1; q <= 3; q++) {
		json_object_set_new(doc, "seq", json_integer(q));
		m = mk("u1", q, q, doc, text);
		assert_int_equal(store_put(s, &m), 1);
		json_decref(m.vm);
	}
	m = mk("u1", 2, 2, doc, text);
	assert_int_equal(store_put(s, &m), 0);
	json_decref(m.vm);
	assert_int_equal(store_commit(s), 0);
	/* An abandoned batch (the connection lost mid-batch) leaves neither
	 * its lines nor its keys: the redelivered sample is stored once. */
	assert_int_equal(store_begin(s), 0);
	json_object_set_new(doc, "seq", json_integer(4));
	m = mk("u1", 4, 4, doc, text);
	assert_int_equal(store_put(s, &m), 1);
	store_rollback(s);
	assert_int_equal(store_begin(s), 0);
	assert_int_equal(store_put(s, &m), 1);
	json_decref(m.vm);
	assert_int_equal(store_commit(s), 0);
	assert_int_equal(count_lines_in(dir), 4);
	store_close(s);
	/* Reopened: the window is seeded from the files. */
	assert_int_equal(store_open(&o, &s, err, sizeof(err)), 0);
	assert_int_equal(store_remembered(s), 4);
	assert_int_equal(store_begin(s), 0);
	json_object_set_new(doc, "seq", json_integer(4));
	m = mk("u1", 4, 4, doc, text);
	assert_int_equal(store_put(s, &m), 0);
	json_decref(m.vm);
	store_rollback(s);
	assert_true(store_select(s, "SELECT 1", 0, NULL, count_rows, NULL) < 0);
	store_close(s);
	json_decref(doc);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	assert_int_equal(system(cmd), 0);
}

static void test_shards_on_metrics(void **state)
{
	const char *queues[] = { "vm.metrics.shard.0", "vm.metrics.shard.1" };
	struct vmstate *st;
	char *t;

	assert_int_equal(vmstate_new(10, 3, &st), 0);
	assert_int_equal(vmstate_set_shards(st, queues, 2), 0);
	vmstate_shard_active(st, 1, true);
	vmstate_shard_active(st, 7, true); /* out of range: ignored */
	t = vmstate_render(st, 0);
	assert_non_null(strstr(t, "vmproxy_consumer_queue_active{queue=\"vm.metrics.shard.0\"} 0\n"));
	assert_non_null(strstr(t, "vmproxy_consumer_queue_active{queue=\"vm.metrics.shard.1\"} 1\n"));
	free(t);
	vmstate_free(st);
}

static void test_durations(void **state)
{
	assert_int_equal(query_parse_duration("90s"), 90000);
	assert_int_equal(query_parse_duration("15m"), 900000);
	assert_int_equal(query_parse_duration("1h"), 3600000);
	assert_int_equal(query_parse_duration("7d"), 7 * 86400000LL);
	assert_int_equal(query_parse_duration("30"), 30000);
	assert_true(query_parse_duration("") < 0);
	assert_true(query_parse_duration("1w") < 0);
	assert_true(query_parse_duration("1hh") < 0);
	assert_true(query_parse_duration("-1h") < 0);
	assert_true(query_parse_duration("999999999999d") < 0);
	assert_true(query_parse_duration(NULL) < 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_dedup_window),
		cmocka_unit_test(test_validate),
		cmocka_unit_test(test_rotation),
		cmocka_unit_test(test_prometheus_and_staleness),
		cmocka_unit_test(test_sqlite_store),
		cmocka_unit_test(test_jsonl_store),
		cmocka_unit_test(test_shards_on_metrics),
		cmocka_unit_test(test_durations),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
