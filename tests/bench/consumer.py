#!/usr/bin/python3
"""vmproxy-consumer throughput for docs/performance.md and docs/scaling.md:
samples per second stored by one instance with SQLite, one with PostgreSQL,
and two instances sharing PostgreSQL.

A private RabbitMQ node (the integration harness) gets the shard topology of
deploy/rabbitmq/gen-definitions.py (--shards queues behind the
consistent-hash exchange); a private PostgreSQL server (harness.postgres)
serves the PostgreSQL cases. For each case the shards are pre-filled with
--samples stamped samples of --vms VMs (about 600-byte documents, as the
agent sends), then the consumer instance(s) start and drain them; the rate
is rows stored divided by the time from the first to the last row (the
consumer's start-up excluded). Rows are counted in the database; every
case must store every sample exactly once.

    /usr/bin/python3 tests/bench/consumer.py --build build-bench [--samples 50000]
"""
import argparse
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
TOP = HERE.parents[1]
sys.path.insert(0, str(TOP / "tests" / "integration"))
sys.path.insert(0, str(TOP / "deploy" / "rabbitmq"))

import importlib  # noqa: E402

import pika  # noqa: E402

from harness.postgres import PostgreSQL  # noqa: E402
from harness.rabbitmq import RabbitMQ, ensure_certs  # noqa: E402

gen = importlib.import_module("gen-definitions")
PREFIX = "vm.metrics.shard."


def sample(i, seq):
    return {"schema": "vmproxy.metrics/1", "seq": seq, "time_ms": 1795000000000 + seq * 10000,
            "interval_s": 10, "host": {"hostname": "vm-%d" % i, "boot_id": "boot-%d" % i},
            "cpu": {"count": 4, "busy_pct": 12.5, "total": {"user": 1, "system": 2},
                    "per_core": [{"busy_pct": 10.0}, {"busy_pct": 15.0}]},
            "memory": {"total_bytes": 8 << 30, "available_bytes": 5 << 30, "used_pct": 37.5},
            "load": {"load1": 0.5, "load5": 0.4, "load15": 0.3},
            "disks": [{"name": "vda", "read_bytes_per_s": 1000.0, "write_bytes_per_s": 5000.0}],
            "network": [{"name": "eth0", "rx_bytes_per_s": 2000.0, "tx_bytes_per_s": 800.0}]}


def prefill(broker, vms, samples, run):
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    for n in range(samples):
        i, seq = n % vms, n // vms + 1
        ch.basic_publish("vm.metrics", "%s.metrics" % i, json.dumps(sample(i, seq)).encode(),
                         pika.BasicProperties(headers={"x-vm-uuid": "%s-vm-%d" % (run, i),
                                                       "x-vm-name": "vm-%d" % i},
                                              delivery_mode=2))
    ch.close()
    conn.close()


def depth(broker, shards):
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    n = sum(ch.queue_declare(PREFIX + str(k), passive=True).method.message_count
            for k in range(shards))
    conn.close()
    return n


def consumer_config(path, broker, shards, k, n, sink, datadir):
    path.write_text(json.dumps({
        "broker": {"host": "127.0.0.1", "port": broker.port, "vhost": broker.vhost,
                   "auth": {"mechanism": "PLAIN", "user": "vmproxy-consumer",
                            "password": broker.passwords["vmproxy-consumer"]}},
        "queue": {"shards": shards, "instance": k, "instances": n, "others_after_ms": 1000,
                  "prefetch": 256, "batch_ms": 200},
        "sink": dict({"dir": str(datadir)}, **sink),
        "log_level": "warn",
    }))


def run_case(args, broker, name, sink, instances, count_rows, work):
    run = "%s-%d" % (name, int(time.time()))
    prefill(broker, args.vms, args.samples, run)
    t_fill = time.monotonic()
    while True:
        have = depth(broker, args.shards)
        if have >= args.samples:
            break
        if time.monotonic() - t_fill > 300:
            raise RuntimeError("%s: only %d of %d pre-filled samples in the queues after 300 s"
                               % (name, have, args.samples))
        time.sleep(0.5)
    procs = []
    for k in range(1, instances + 1):
        cfg = work / ("%s-%d.json" % (name, k))
        consumer_config(cfg, broker, args.shards, k, instances, sink, work / name)
        procs.append(subprocess.Popen([str(pathlib.Path(args.build) / "mgmt-consumer" /
                                           "vmproxy-consumer"), "--config", str(cfg)],
                                      stderr=open(work / ("%s-%d.log" % (name, k)), "ab")))
    first = last = None
    t0 = time.monotonic()
    try:
        while True:
            n = count_rows()
            now = time.monotonic()
            if n and first is None:
                first = (now, n)
            if n >= args.samples:
                last = (now, n)
                break
            if now - t0 > 600:
                raise RuntimeError("%s: only %d of %d stored" % (name, n, args.samples))
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
    rate = (last[1] - first[1]) / (last[0] - first[0])
    res = {"case": name, "instances": instances, "samples": args.samples, "rows": last[1],
           "seconds": round(last[0] - first[0], 2), "samples_per_s": round(rate)}
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--samples", type=int, default=50000)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cases", default="sqlite,postgresql,postgresql-2",
                    help="comma-separated: sqlite, postgresql (one instance), postgresql-2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-consumer-bench-"))
    os.chmod(work, 0o755)
    certs = ensure_certs(work / "certs")
    broker = RabbitMQ(work / "broker", certs)
    pg = PostgreSQL(work / "pg")
    results = []
    try:
        broker.start()
        with open(TOP / "deploy" / "rabbitmq" / "definitions.json") as f:
            defs = gen.shard_definitions(json.load(f), args.shards, PREFIX)
        path = broker.node.etc / "shards.json"
        path.write_text(json.dumps(defs))
        os.chmod(path, 0o644)
        broker._chown(path)
        broker.ctl("import_definitions", path)
        pg.start()

        db = work / "sqlite" / "metrics.db"

        def sqlite_rows():
            try:
                con = sqlite3.connect(str(db), timeout=30)
                try:
                    return con.execute("SELECT count(*) FROM samples").fetchone()[0]
                finally:
                    con.close()
            except sqlite3.Error:
                return 0
        cases = args.cases.split(",")
        if "sqlite" in cases:
            results.append(run_case(args, broker, "sqlite", {"type": "sqlite", "path": str(db)},
                                    1, sqlite_rows, work))
        for name, n in (("postgresql", 1), ("postgresql-2", 2)):
            if name not in cases:
                continue
            dbname = name.replace("-", "_")
            conninfo = pg.new_database(dbname)

            con = pg.connect(dbname)
            con.autocommit = True

            def pg_rows(con=con):
                try:
                    cur = con.cursor()
                    cur.execute("SELECT count(*) FROM samples")
                    return cur.fetchone()[0]
                except Exception:  # the table is created by the consumer
                    return 0
            results.append(run_case(args, broker, name,
                                    {"type": "postgresql", "conninfo": conninfo}, n, pg_rows,
                                    work))
    finally:
        pg.close()
        broker.close()
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    print("| case | instances | samples | seconds | samples/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print("| %s | %d | %d | %.1f | %d |" % (r["case"], r["instances"], r["samples"],
                                                r["seconds"], r["samples_per_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
