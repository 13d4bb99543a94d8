"""vmproxy-consumer on sharded queues (deploy/rabbitmq/gen-definitions.py:
8 quorum shard queues with single-active-consumer behind the consistent-hash
exchange) on the three-node cluster, samples published through vmproxyd by
simulated VMs (guest_fleet.py).

- Two instances (1 of 2 and 2 of 2) sharing PostgreSQL: each is active on
  its own four shards while both live; instance 2 is SIGKILLed mid-stream
  and instance 1 becomes active on all eight (the time is printed: FAILOVER
  lines); every confirmed sample is a row exactly once, each VM's seq in
  order, stamped with the publishing VM's uuid.
- One instance with SQLite, killed and restarted mid-stream: the same.
"""
import collections
import json
import os
import subprocess
import sys
import time

import pytest

from harness import wait_for
from harness.vmproxyd import VmProxyd, make_vms
from test_consumer import Consumer
from test_consumer_store import assert_in_seq_order, rows_pg, rows_sqlite

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(TOP, "deploy", "rabbitmq"))
import importlib  # noqa: E402

gen = importlib.import_module("gen-definitions")

SHARDS = 8
PREFIX = "vm.metrics.shard."


@pytest.fixture(scope="module")
def sharded(cluster):
    """The cluster with the shard topology imported (additively: the
    vm.metrics.all queue of the other tests stays)."""
    with open(os.path.join(TOP, "deploy", "rabbitmq", "definitions.json")) as f:
        defs = gen.shard_definitions(json.load(f), SHARDS, PREFIX, keep_all=True)
    seed = cluster.nodes[0]
    path = seed.node.etc / "shards.json"
    path.write_text(json.dumps(defs))
    os.chmod(path, 0o644)
    seed._chown(path)
    seed.ctl("import_definitions", path)
    for i in range(SHARDS):
        cluster.wait_members(PREFIX + str(i), len(cluster.nodes))
    return cluster


def active(consumer):
    out = set()
    for l in consumer.metrics().splitlines():
        if l.startswith('vmproxy_consumer_queue_active{queue="' + PREFIX) and l.endswith(" 1"):
            out.add(int(l.split(PREFIX)[1].split('"')[0]))
    return out


class Fleet:
    def __init__(self, proxy, base, count, prefix):
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "guest_fleet.py"),
                                   "--base", base, "--count", str(count), "--prefix", prefix,
                                   "--port", str(proxy.port), "--rate", "1"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=HERE)
        line = self.p.stdout.readline()
        assert line.strip() == "ready", line

    def stop(self):
        out, _ = self.p.communicate("stop\n", timeout=180)
        assert self.p.returncode == 0
        return json.loads(out.strip().splitlines()[-1])

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def check_rows(rows, results, vms):
    """Every acked sample of RESULTS a row exactly once, in seq order per VM,
    with the VM's uuid."""
    uuid_of = {v["name"]: v["uuid"] for v in vms}
    name_of = {r["boot_id"]: r["name"] for r in results}
    ours = [r for r in rows if r[1] in name_of]
    got = collections.Counter((r[1], r[2]) for r in ours)
    want = {(r["boot_id"], s) for r in results for s in r["acked"]}
    assert want <= set(got), "missing: %s" % sorted(want - set(got))[:5]
    dups = [k for k, n in got.items() if n > 1]
    assert not dups, "stored more than once: %s" % dups[:5]
    for u, b, s, *_ in ours:
        assert u == uuid_of[name_of[b]], (u, name_of[b])
    assert_in_seq_order(ours)
    return len(want), len(got) - len(want)


def start_proxy(build_dir, sharded, certs, tmp_path, vms):
    return VmProxyd(build_dir, tmp_path, sharded.nodes[0], certs, vms, threads=3,
                    guest={"max_connections_per_vm": 4},
                    upstream={"hosts": sharded.upstream_hosts(), "heartbeat": 5}).start(
                        timeout=60)


def test_two_instances_postgresql_failover(build_dir, sharded, certs, tmp_path, postgres):
    vms = make_vms(200, base="127.10.70.1", prefix="sh")
    conninfo = postgres.new_database("t_shards")
    seed = sharded.nodes[0]
    consumers = [Consumer(build_dir, seed, certs, tmp_path, "unused", name="c%d" % k,
                          hosts=sharded.upstream_hosts(),
                          sink={"type": "postgresql", "conninfo": conninfo},
                          shards={"shards": SHARDS, "instance": k, "instances": 2,
                                  "others_after_ms": 5000})
                 for k in (1, 2)]
    proxy = fleet = None
    try:
        proxy = start_proxy(build_dir, sharded, certs, tmp_path, vms)
        for c in consumers:
            c.start()
        fleet = Fleet(proxy, "127.10.70.1", len(vms), "sh")
        # Each instance is active on its own shards: 1 of 2 on the even ones.
        wait_for(lambda: active(consumers[0]) == {0, 2, 4, 6} and
                 active(consumers[1]) == {1, 3, 5, 7}, 90, "each instance on its own shards")
        wait_for(lambda: len(rows_pg(postgres, "t_shards")) >= 1000, 90, "samples stored")
        t0 = time.monotonic()
        consumers[1].kill()
        wait_for(lambda: active(consumers[0]) == set(range(SHARDS)), 60,
                 "instance 1 active on every shard", 0.05)
        failover = time.monotonic() - t0
        print("FAILOVER consumer: instance 1 active on all %d shards %.2f s after instance 2 "
              "was killed" % (SHARDS, failover))
        before = len(rows_pg(postgres, "t_shards"))
        wait_for(lambda: len(rows_pg(postgres, "t_shards")) >= before + 600, 90,
                 "samples stored by the survivor")
        results = fleet.stop()
        fleet = None
        for r in results:
            assert not r["errors"], (r["name"], r["errors"])
            assert len(r["acked"]) >= 5, (r["name"], len(r["acked"]))
        want = sum(len(r["acked"]) for r in results)
        wait_for(lambda: {(r[1], r[2]) for r in rows_pg(postgres, "t_shards")} >=
                 {(r["boot_id"], s) for r in results for s in r["acked"]}, 120,
                 "every confirmed sample stored")
        n, extra = check_rows(rows_pg(postgres, "t_shards"), results, vms)
        assert n == want
        print("SHARDS postgresql: %d confirmed samples of %d VMs, each stored once, seq in "
              "order; %d more stored whose confirm the guest never saw" % (n, len(vms), extra))
        consumers[0].stop()
    finally:
        if fleet:
            fleet.kill()
        for c in consumers:
            if c.proc and c.proc.poll() is None:
                c.kill()
        if proxy:
            proxy.stop()


def test_one_instance_sqlite_killed_and_restarted(build_dir, sharded, certs, tmp_path):
    vms = make_vms(50, base="127.10.71.1", prefix="sq")
    db = tmp_path / "metrics.db"
    c = Consumer(build_dir, sharded.nodes[0], certs, tmp_path, "unused",
                 hosts=sharded.upstream_hosts(), sink={"type": "sqlite", "path": str(db)},
                 shards={"shards": SHARDS})
    proxy = fleet = None
    try:
        proxy = start_proxy(build_dir, sharded, certs, tmp_path, vms)
        c.start()
        fleet = Fleet(proxy, "127.10.71.1", len(vms), "sq")
        wait_for(lambda: active(c) == set(range(SHARDS)), 60, "active on every shard")
        wait_for(lambda: len(rows_sqlite(db)) >= 200, 60, "samples stored")
        c.kill()
        time.sleep(3)  # samples accumulate in the shards while it is down
        c.start()
        before = len(rows_sqlite(db))
        wait_for(lambda: len(rows_sqlite(db)) >= before + 300, 60, "stored after the restart")
        results = fleet.stop()
        fleet = None
        want = {(r["boot_id"], s) for r in results for s in r["acked"]}
        wait_for(lambda: {(r[1], r[2]) for r in rows_sqlite(db)} >= want, 120,
                 "every confirmed sample stored")
        n, extra = check_rows(rows_sqlite(db), results, vms)
        print("SHARDS sqlite: %d confirmed samples of %d VMs across a kill and restart, each "
              "stored once, seq in order" % (n, len(vms)))
        c.stop()
    finally:
        if fleet:
            fleet.kill()
        if c.proc and c.proc.poll() is None:
            c.kill()
        if proxy:
            proxy.stop()
