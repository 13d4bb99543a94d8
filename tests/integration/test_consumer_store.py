"""vmproxy-consumer's database sinks against the real broker: SQLite (a file
in the test's directory) and PostgreSQL (a private server, harness.postgres).

- every (VM, boot, seq) is a row exactly once across a SIGKILL and restart
  of the consumer, and each VM's rows are in seq order;
- a burst of 300 republished samples adds no row;
- the VM table is the consumer's memory: after a restart every VM known to
  the store is on /metrics, the silent ones stale;
- `query` prints the latest sample of each VM (--stale: the stale ones) and
  one VM's series, matching what was published;
- retention deletes samples older than sink.retention_days;
- PostgreSQL stopped for 20 s under load: nothing is acked that is not
  committed (the samples published meanwhile stay in the queue), the
  backlog drains once it is back, nothing is lost or stored twice.
"""
import json
import os
import sqlite3
import subprocess
import threading
import time

import pika
import pytest

from harness import wait_for
from test_consumer import BOOT, Consumer, doc, publish, stamped, vm_uuid


def rows_sqlite(path):
    con = sqlite3.connect(str(path), timeout=30)
    try:
        return con.execute("SELECT vm_uuid, boot_id, seq, cpu_busy_percent, doc FROM samples "
                           "ORDER BY id").fetchall()
    finally:
        con.close()


def rows_pg(pg, dbname):
    con = pg.connect(dbname)
    try:
        cur = con.cursor()
        cur.execute("SELECT vm_uuid, boot_id, seq, cpu_busy_percent, doc FROM samples "
                    "ORDER BY id")
        return cur.fetchall()
    finally:
        con.close()


def make_consumer(kind, build_dir, broker, certs, tmp_path, postgres, queue, **kw):
    if kind == "sqlite":
        db = tmp_path / "metrics.db"
        c = Consumer(build_dir, broker, certs, tmp_path, queue,
                     sink={"type": "sqlite", "path": str(db)}, **kw)
        c.rows = lambda: rows_sqlite(db)
    else:
        name = "t_" + queue.replace(".", "_").replace("-", "_")[-40:]
        c = Consumer(build_dir, broker, certs, tmp_path, queue,
                     sink={"type": "postgresql", "conninfo": postgres.new_database(name)}, **kw)
        c.rows = lambda: rows_pg(postgres, name)
    return c


def keys(rows):
    return [(r[0], r[1], r[2]) for r in rows]


def assert_in_seq_order(rows):
    last = {}
    for u, b, s, *_ in rows:
        assert s > last.get((u, b), 0), "seq %d of %s stored after %d" % (s, u, last[(u, b)])
        last[(u, b)] = s


def counter(text, result):
    key = 'vmproxy_consumer_messages_total{result="%s"} ' % result
    return int(float([l for l in text.splitlines() if l.startswith(key)][0][len(key):]))


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request):
    return request.param


def test_exactly_once_restart_memory_and_query(kind, build_dir, broker, certs, tmp_path,
                                               request):
    postgres = request.getfixturevalue("postgres") if kind == "postgresql" else None
    c = make_consumer(kind, build_dir, broker, certs, tmp_path, postgres,
                      "vm.metrics.store-" + kind)
    try:
        c.start()
        # 30 VMs x 10 samples, one second apart in sample time.
        first = [stamped(i, s) for s in range(1, 6) for i in range(30)]
        publish(broker, first)
        wait_for(lambda: len(c.rows()) >= 60, 60, "first samples stored")
        c.kill()  # mid-stream: some committed, maybe not acked
        # Only 17 VMs publish after the restart.
        publish(broker, [stamped(i, s) for s in range(6, 11) for i in range(17)])
        c.start()
        want = {(vm_uuid(i), BOOT, s) for i in range(30) for s in range(1, 6)} | \
               {(vm_uuid(i), BOOT, s) for i in range(17) for s in range(6, 11)}
        wait_for(lambda: set(keys(c.rows())) == want, 60, "every sample stored")
        rows = c.rows()
        assert len(rows) == len(want), "a sample stored twice"
        assert_in_seq_order(rows)
        for u, b, s, cpu, text in rows:
            assert cpu == 10.0 + s % 7 and json.loads(text)["seq"] == s

        # Every VM of the store is on /metrics after the restart, the 13
        # that did not publish since included.
        text = c.metrics()
        seen = {l.split('vm_uuid="')[1].split('"')[0] for l in text.splitlines()
                if l.startswith("vmproxy_vm_last_seen_seconds{")}
        assert seen == {vm_uuid(i) for i in range(30)}, len(seen)

        # A burst of 300 deliberate duplicates (a proxy republishing after a
        # link loss) adds no row.
        before = len(c.rows())
        pairs = [(i, s) for s in range(1, 11) for i in range(30 if s <= 5 else 17)]
        dup = [stamped(i, s) for i, s in (pairs * 2)[:300]]
        dups0 = counter(c.metrics(), "duplicate")
        publish(broker, dup)
        wait_for(lambda: counter(c.metrics(), "duplicate") == dups0 + 300, 60,
                 "the 300 duplicates counted")
        assert len(c.rows()) == before

        # interval_s 1, stale after 2: the 13 silent VMs are stale, and soon all.
        def stale_listed():
            r = c.query("--stale", "--json")
            assert r.returncode == 0, r.stderr
            return {v["vm_uuid"] for v in json.loads(r.stdout)}
        wait_for(lambda: stale_listed() >= {vm_uuid(i) for i in range(17, 30)}, 30,
                 "the silent VMs listed as stale")
        assert 'vmproxy_vm_stale{vm_uuid="%s",vm_name="vm-29"} 1' % vm_uuid(29) in c.metrics()

        latest = c.query("--json")
        assert latest.returncode == 0, latest.stderr
        latest = {v["vm_uuid"]: v for v in json.loads(latest.stdout)}
        assert set(latest) == {vm_uuid(i) for i in range(30)}
        for i in range(30):
            v = latest[vm_uuid(i)]
            top = 10 if i < 17 else 5
            assert (v["vm_name"], v["seq"], v["boot_id"]) == ("vm-%d" % i, top, BOOT), v
            assert v["cpu_busy_percent"] == 10.0 + top % 7
            assert v["time_ms"] == doc("vm-%d" % i, top)["time_ms"]
        table = c.query()
        assert table.returncode == 0 and "vm-29" in table.stdout, table.stdout + table.stderr

        # One VM's series, by name and by uuid; the samples' time is
        # 1795000000000 + seq ms, long ago from now.
        for who in ("vm-3", vm_uuid(3)):
            r = c.query("--vm", who, "--metric", "cpu_busy_percent", "--since", "36500d",
                        "--json")
            assert r.returncode == 0, r.stderr
            series = json.loads(r.stdout)
            assert [p["seq"] for p in series] == list(range(1, 11))
            assert [p["value"] for p in series] == [10.0 + s % 7 for s in range(1, 11)]
        r = c.query("--vm", "vm-3", "--metric", "cpu_busy_percent", "--since", "1h", "--json")
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout
        r = c.query("--vm", "nosuch", "--metric", "cpu_busy_percent")
        assert r.returncode == 1 and "no such VM" in r.stderr, r.stderr
        r = c.query("--vm", "vm-3", "--metric", "cpu; DROP TABLE samples")
        assert r.returncode == 2 and "unknown metric" in r.stderr, r.stderr
        c.stop()
    finally:
        if c.proc and c.proc.poll() is None:
            c.kill()


@pytest.mark.skipif(os.environ.get("VMPROXY_VARIANT") == "sanitize",
                    reason="long scenario (about a minute waiting for the retention sweep): "
                           "run once, in the normal variant")
def test_retention(kind, build_dir, broker, certs, tmp_path, request):
    """Samples older than sink.retention_days go; recent ones stay."""
    postgres = request.getfixturevalue("postgres") if kind == "postgresql" else None
    c = make_consumer(kind, build_dir, broker, certs, tmp_path, postgres,
                      "vm.metrics.retention-" + kind)
    c.sink["retention_days"] = 30
    cfg = json.loads(c.cfg.read_text())
    cfg["sink"] = c.sink
    c.cfg.write_text(json.dumps(cfg))
    now_ms = int(time.time() * 1000)
    old, new = [], []
    for s in range(1, 2501):
        d = doc("vm-1", s)
        d["time_ms"] = now_ms - (40 if s <= 2000 else 1) * 86400000
        (old if s <= 2000 else new).append(({"x-vm-uuid": vm_uuid(1), "x-vm-name": "vm-1"},
                                            json.dumps(d).encode()))
    try:
        c.start()
        publish(broker, old + new)
        # Deleted in batches of 1000 between message batches.
        wait_for(lambda: sorted(r[2] for r in c.rows()) == list(range(2001, 2501)), 120,
                 "the 2000 old samples expired")
        wait_for(lambda: "vmproxy_consumer_expired_samples_total 2000\n" in c.metrics(), 30,
                 "expired counted")
        c.stop()
    finally:
        if c.proc.poll() is None:
            c.kill()


class Publisher(threading.Thread):
    """Publishes stamped samples of 50 VMs with confirms, about RATE per
    second, until stopped; .confirmed is the list of (uuid, seq) confirmed."""

    def __init__(self, broker, rate=200):
        super().__init__(daemon=True)
        self.broker = broker
        self.rate = rate
        self.confirmed = []
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        try:
            conn = pika.BlockingConnection(self.broker.pika_params())
            ch = conn.channel()
            ch.confirm_delivery()
            seq = 0
            while not self.stopping.is_set():
                seq += 1
                t0 = time.monotonic()
                for i in range(50):
                    h, body = stamped(i, seq)
                    ch.basic_publish(self.broker.exchange, "x.metrics.t", body,
                                     pika.BasicProperties(headers=h, delivery_mode=2))
                    self.confirmed.append((vm_uuid(i), seq))
                time.sleep(max(0, 50.0 / self.rate - (time.monotonic() - t0)))
            conn.close()
        except Exception as e:  # reported by the test
            self.error = e


def queue_depth(broker, queue):
    conn = pika.BlockingConnection(broker.pika_params())
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


def test_postgres_down_20s_under_load(build_dir, broker, certs, tmp_path, postgres):
    queue = "vm.metrics.store-pgdown"
    c = make_consumer("postgresql", build_dir, broker, certs, tmp_path, postgres, queue)
    pub = Publisher(broker)
    try:
        c.start()
        pub.start()
        wait_for(lambda: len(c.rows()) >= 1000, 60, "samples stored before the outage")
        postgres.stop()
        down = len(pub.confirmed)
        t0 = time.monotonic()
        wait_for(lambda: "vmproxy_consumer_store_errors_total 1" in c.metrics(), 30,
                 "the consumer to notice")
        time.sleep(max(0, 20 - (time.monotonic() - t0)))  # the outage lasts 20 s
        during = len(pub.confirmed) - down
        # Nothing published during the outage can have been committed, so
        # none of it may have been acked: all of it is still in the queue.
        depth = queue_depth(broker, queue)
        assert depth >= during, "queue holds %d, %d published while down" % (depth, during)
        assert c.proc.poll() is None, "the consumer exited"
        print("PGDOWN: %d samples published during the 20 s outage, %d in the queue"
              % (during, depth))
        postgres.start()
        t1 = time.monotonic()
        time.sleep(2)
        pub.stopping.set()
        pub.join(30)
        assert pub.error is None, pub.error
        want = {(u, BOOT, s) for u, s in pub.confirmed}
        wait_for(lambda: want <= set(keys(c.rows())), 120, "the backlog drained")
        print("PGDOWN: backlog of %d drained %.1f s after the database returned"
              % (depth, time.monotonic() - t1))
        rows = c.rows()
        assert len(rows) == len(set(keys(rows))) == len(want), "lost or doubled"
        assert_in_seq_order(rows)
        c.stop()
    finally:
        pub.stopping.set()
        if c.proc and c.proc.poll() is None:
            c.kill()
        if not postgres.running():
            postgres.start()


def test_bad_text_never_blocks_the_store(kind, build_dir, broker, certs, tmp_path, request):
    """Header strings a database cannot take (invalid UTF-8, NUL, past 256
    bytes) are stored as NULL; a sample with a NUL in its boot id is
    quarantined (not JSON: jansson refuses \\u0000); none of them stops the
    batches behind them."""
    postgres = request.getfixturevalue("postgres") if kind == "postgresql" else None
    c = make_consumer(kind, build_dir, broker, certs, tmp_path, postgres,
                      "vm.metrics.badtext-" + kind)
    nul = doc("vm-4", 1)
    nul["host"]["boot_id"] = "a\u0000b"
    items = [
        ({"x-vm-uuid": vm_uuid(1), "x-vm-name": b"\xff\xfe bad"}, json.dumps(doc("vm-1", 1))),
        ({"x-vm-uuid": vm_uuid(2), "x-vm-name": "x" * 257}, json.dumps(doc("vm-2", 1))),
        ({"x-vm-uuid": vm_uuid(3), "x-vm-name": "a\u0000b"}, json.dumps(doc("vm-3", 1))),
        ({"x-vm-uuid": vm_uuid(4), "x-vm-name": "vm-4"}, json.dumps(nul)),
        ({"x-vm-uuid": b"\xff" * 36}, json.dumps(doc("vm-6", 1))),
    ] + [stamped(5, s) for s in range(1, 4)]
    try:
        c.start()
        publish(broker, [(h, b if isinstance(b, bytes) else b.encode()) for h, b in items])
        wait_for(lambda: len(c.rows()) == 6 and len(c.lines("quarantine")) == 2, 60,
                 "6 stored, 2 quarantined")
        reasons = sorted(q["reason"] for q in c.lines("quarantine"))
        assert reasons[0] == "no x-vm-uuid header: not stamped by vmproxyd", reasons
        assert reasons[1].startswith("not JSON: \\u0000 is not allowed"), reasons
        latest = json.loads(c.query("--json").stdout)
        names = {v["vm_uuid"]: v["vm_name"] for v in latest}
        assert names[vm_uuid(1)] is None and names[vm_uuid(2)] is None
        assert names[vm_uuid(3)] is None and names[vm_uuid(5)] == "vm-5"
        c.stop()
    finally:
        if c.proc and c.proc.poll() is None:
            c.kill()


@pytest.mark.parametrize("sink,queue,key", [
    ({"type": "mysql"}, {}, "sink.type"),
    ({"type": "postgresql"}, {}, "sink.conninfo"),
    ({"type": "jsonl", "retention_days": 3}, {}, "sink.retention_days"),
    ({"retention_days": 100001}, {}, "sink.retention_days"),
    ({}, {"shards": 1025}, "queue.shards"),
    ({}, {"shards": 8, "declare": True}, "queue.declare"),
    ({}, {"shards": 8, "instances": 2, "instance": 3}, "queue.instance"),
])
def test_config_errors_name_the_key(build_dir, tmp_path, sink, queue, key):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"broker": {"host": "localhost"}, "sink": sink, "queue": queue}))
    binary = str(build_dir / "mgmt-consumer" / "vmproxy-consumer")
    for argv in ([binary, "--config", str(cfg)], [binary, "query", "--config", str(cfg)]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert "%s: %s:" % (cfg, key) in r.stderr, r.stderr


def test_query_of_a_missing_database(build_dir, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"broker": {"host": "localhost"},
                               "sink": {"path": str(tmp_path / "none.db")}}))
    r = subprocess.run([str(build_dir / "mgmt-consumer" / "vmproxy-consumer"), "query",
                        "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "none.db" in r.stderr, r.stderr
    assert not (tmp_path / "none.db").exists()


def test_waits_for_postgresql_at_start(build_dir, broker, certs, tmp_path, postgres):
    """A database server that is not up yet is waited for (with backoff),
    not a reason to exit; once it is up the consumer consumes."""
    c = make_consumer("postgresql", build_dir, broker, certs, tmp_path, postgres,
                      "vm.metrics.store-pgstart")
    postgres.stop()
    try:
        c.proc = subprocess.Popen([c.bin, "--config", str(c.cfg)], stdout=c.log, stderr=c.log)
        wait_for(lambda: open(c.log.name, "rb").read().count(b"error: store: postgresql") >= 2,
                 30, "connection attempts while the server is down")
        assert c.proc.poll() is None, "the consumer exited"
        postgres.start()
        wait_for(lambda: c.consuming() >= 1, 60, "consuming once the server is up")
        c.started = 1
        publish(broker, [stamped(i, 1) for i in range(5)])
        wait_for(lambda: len(c.rows()) == 5, 60, "samples stored")
        c.stop()
    finally:
        if c.proc and c.proc.poll() is None:
            c.kill()
        if not postgres.running():
            postgres.start()
