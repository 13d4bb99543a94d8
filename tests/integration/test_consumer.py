"""vmproxy-consumer against the real broker over TLS with its client
certificate (EXTERNAL): every (VM, boot, seq) ends up in the JSON Lines
exactly once across a SIGKILL of the consumer, a broker restart and
republished duplicates; bad messages go to quarantine with reasons; the
Prometheus endpoint is valid and flags stale VMs."""
import glob
import json
import os
import re
import signal
import subprocess
import urllib.request
import uuid as uuidlib

import pika
import pytest

from harness import free_port, stop_clean, wait_for

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT = "6b1f0c3e-0d1a-4c2b-9e8f-7a6b5c4d3e2f"


def doc(vm, seq, interval=1):
    return {"schema": "vmproxy.metrics/1", "seq": seq, "time_ms": 1795000000000 + seq,
            "interval_s": interval, "host": {"hostname": vm, "boot_id": BOOT},
            "cpu": {"count": 1, "busy_pct": 10.0 + seq % 7, "total": {}, "per_core": []},
            "memory": {"available_bytes": 1000, "used_pct": 30.0},
            "load": {"load1": 0.5}, "disks": [], "network": []}


def vm_uuid(i):
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, "vm-%d.test" % i))


class Consumer:
    def __init__(self, build_dir, broker, certs, tmp, queue, hosts=None, metrics=None,
                 sink=None, shards=None, name="consumer"):
        """HOSTS: broker.hosts ([{host, port}]) instead of BROKER's own node.
        METRICS: more keys of the "metrics" object. SINK: the "sink" object
        (default: JSON Lines in TMP/NAME-jsonl); its "dir" defaults to that
        directory too (quarantine files). SHARDS: more keys of the "queue"
        object for sharded consuming (shards, instance, instances, ...)."""
        self.queue = queue
        self.dir = tmp / (name + "-jsonl" if name != "consumer" else "jsonl")
        self.port = free_port()
        self.cfg = tmp / (name + ".json")
        self.sink = dict({"dir": str(self.dir)}, **(sink or {"type": "jsonl"}))
        where = {"hosts": hosts} if hosts else {"host": "localhost", "port": broker.tls_port}
        q = {"name": queue, "type": "quorum", "exchange": broker.exchange,
             "binding_key": "#", "prefetch": 50, "batch_ms": 100}
        q.update(shards or {})
        self.cfg.write_text(json.dumps({
            "broker": dict(where, vhost=broker.vhost,
                           tls={"ca": str(certs / "ca.pem"), "cert": str(certs / "consumer.pem"),
                                "key": str(certs / "consumer-key.pem")},
                           auth={"mechanism": "EXTERNAL"}, heartbeat=5),
            "queue": q,
            "sink": self.sink,
            "metrics": dict({"listen": "127.0.0.1:%d" % self.port, "stale_after_intervals": 2},
                            **(metrics or {})),
        }))
        self.bin = os.path.join(str(build_dir), "mgmt-consumer", "vmproxy-consumer")
        self.log_path = tmp / (name + ".log")
        self.log = open(self.log_path, "ab")
        self.proc = None
        self.started = 0

    def start(self):
        self.proc = subprocess.Popen([self.bin, "--config", str(self.cfg)], stdout=self.log,
                                     stderr=self.log)
        # Messages published before the queue is declared and bound go nowhere.
        wait_for(lambda: self.consuming() > self.started, 30, "the consumer to consume")
        self.started += 1
        return self

    def consuming(self):
        with open(self.log.name, "rb") as f:
            return f.read().count(b"info: connected to ")

    def kill(self):
        """SIGKILL, for scenarios that crash the consumer on purpose."""
        self.proc.kill()
        self.proc.wait()

    def output(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM: exit 0 (after its last batch) within 30 s, no sanitizer
        report (else the test fails; a consumer still running is killed)."""
        if self.proc:
            return stop_clean(self.proc, "vmproxy-consumer", self.output, 30)

    def lines(self, prefix="metrics"):
        out = []
        for f in sorted(glob.glob(str(self.dir / (prefix + "-*.jsonl")))):
            with open(f) as fh:
                out += [json.loads(l) for l in fh if l.endswith("\n")]
        return out

    def query(self, *args):
        """vmproxy-consumer query --config CFG ARGS...: the CompletedProcess."""
        return subprocess.run([self.bin, "query", "--config", str(self.cfg)] + list(args),
                              capture_output=True, text=True, timeout=60)

    def metrics(self):
        return urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.port,
                                      timeout=5).read().decode()


def publish(broker, items):
    """ITEMS: (headers, body bytes). Published as admin with confirms."""
    conn = pika.BlockingConnection(broker.pika_params())
    ch = conn.channel()
    ch.confirm_delivery()
    for headers, body in items:
        ch.basic_publish(broker.exchange, "x.metrics.t", body,
                         pika.BasicProperties(headers=headers, delivery_mode=2,
                                              content_type="application/json"))
    conn.close()


def stamped(i, seq, interval=1):
    return ({"x-vm-uuid": vm_uuid(i), "x-vm-name": "vm-%d" % i, "x-vmproxy-host": "hv-test",
             "x-vmproxy-received-ms": 1795000000000},
            json.dumps(doc("vm-%d" % i, seq, interval)).encode())


@pytest.fixture
def consumer(build_dir, broker, certs, tmp_path, request):
    c = Consumer(build_dir, broker, certs, tmp_path, "vm.metrics.test-%s" % request.node.name[-20:])
    yield c
    c.stop()


def test_exactly_once_across_kill_and_broker_restart(broker, consumer):
    consumer.start()
    batches = [[stamped(i, s) for i in range(100) for s in range(k * 5 + 1, k * 5 + 6)]
               for k in range(4)]  # 100 VMs x 20 seqs in four rounds
    publish(broker, batches[0])
    wait_for(lambda: len(consumer.lines()) >= 200, 60, "first samples stored")
    consumer.kill()  # mid-stream: some written, maybe not acked
    publish(broker, batches[1])
    consumer.start()
    wait_for(lambda: len(consumer.lines()) >= 700, 60, "more samples stored")
    broker.stop()
    broker.start()
    consumer.proc.send_signal(signal.SIGHUP)  # a stray HUP changes nothing
    publish(broker, batches[2])
    # A proxy republishing after a link loss sends some again.
    publish(broker, batches[0][:150] + batches[2][:150])
    publish(broker, batches[3])
    want = {(vm_uuid(i), BOOT, s) for i in range(100) for s in range(1, 21)}

    def all_there():
        got = [(l["vm"]["uuid"], l["doc"]["host"]["boot_id"], l["doc"]["seq"])
               for l in consumer.lines()]
        return set(got) == want and got
    got = wait_for(all_there, 120, "all 2000 samples in the JSONL")
    assert len(got) == len(set(got)) == 2000, "duplicates in the JSONL"
    assert consumer.proc.poll() is None, "the consumer exited"
    line = consumer.lines()[0]
    assert line["vm"]["name"].startswith("vm-") and line["vm"]["proxy_host"] == "hv-test"
    assert line["routing_key"] == "x.metrics.t"
    text = consumer.metrics()
    assert 'vmproxy_consumer_messages_total{result="duplicate"}' in text
    consumer.stop()


def test_quarantine_and_metrics(broker, consumer, tmp_path):
    consumer.start()
    bad = [
        ({"x-vm-uuid": vm_uuid(1)}, b"{not json"),
        ({"x-vm-uuid": vm_uuid(1)}, json.dumps({"schema": "vmproxy.metrics/1", "seq": 0}).encode()),
        ({}, json.dumps(doc("vm-1", 1)).encode()),
    ]
    publish(broker, bad + [stamped(7, 1, interval=1)])
    wait_for(lambda: len(consumer.lines("quarantine")) == 3 and len(consumer.lines()) == 1, 30,
             "three quarantined and one stored")
    reasons = sorted(q["reason"] for q in consumer.lines("quarantine"))
    assert any(r.startswith("not JSON") for r in reasons), reasons
    assert any("seq is not an integer" in r for r in reasons), reasons
    assert any("no x-vm-uuid header" in r for r in reasons), reasons
    assert consumer.proc.poll() is None

    text = consumer.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    sel = 'vmproxy_vm_stale{vm_uuid="%s",vm_name="vm-7"}' % vm_uuid(7)
    assert sel + " 0" in text
    # interval_s 1 and stale after 2 missed intervals: it flips after ~2 s.
    wait_for(lambda: sel + " 1" in consumer.metrics(), 10, "the VM to turn stale")
    publish(broker, [stamped(7, 2, interval=1)])
    wait_for(lambda: sel + " 0" in consumer.metrics(), 10, "fresh again")
    consumer.stop()


def test_vm_table_bound(build_dir, broker, certs, tmp_path):
    """metrics.max_vms bounds the VMs tracked for Prometheus; samples of the
    VMs beyond it are still stored, and counted."""
    c = Consumer(build_dir, broker, certs, tmp_path, "vm.metrics.test-max-vms",
                 metrics={"max_vms": 10})
    c.start()
    try:
        publish(broker, [stamped(i, 1) for i in range(20)])
        wait_for(lambda: len(c.lines()) == 20, 30, "all 20 samples stored")
        text = c.metrics()
        tracked = {l.split('vm_name="')[1].split('"')[0] for l in text.splitlines()
                   if l.startswith("vmproxy_vm_last_seen_seconds{")}
        assert len(tracked) == 10, sorted(tracked)
        assert "vmproxy_consumer_untracked_vms_total 10\n" in text, text
    finally:
        c.stop()


def padded(i, seq, size):
    """A stamped sample of VM I whose body is exactly SIZE bytes (an extra
    field the schema ignores carries the padding)."""
    headers, body = stamped(i, seq)
    d = json.loads(body)
    d["pad"] = ""
    base = len(json.dumps(d).encode())
    d["pad"] = "x" * (size - base)
    body = json.dumps(d).encode()
    assert len(body) == size
    return headers, body


def fsync_series(text):
    """(sum, count) of vmproxy_consumer_batch_fsync_seconds in TEXT."""
    vals = {}
    for l in text.splitlines():
        if l.startswith("vmproxy_consumer_batch_fsync_seconds_"):
            k, v = l.split()
            vals[k] = float(v)
    return (vals["vmproxy_consumer_batch_fsync_seconds_sum"],
            vals["vmproxy_consumer_batch_fsync_seconds_count"])


def counter(text, series):
    for l in text.splitlines():
        if l.startswith(series + " "):
            return float(l.split()[1])
    raise AssertionError("no %s in\n%s" % (series, text))


def test_oversize_message_is_quarantined_and_acked(broker, consumer):
    """A body of max_message_bytes (default 4 MiB, docs/consumer.md) is
    stored; one byte more is quarantined with its reason and acked, like
    every quarantined message: after a clean stop nothing is left in the
    queue, and the consumer stored the rest."""
    consumer.start()
    limit = 4 << 20
    publish(broker, [padded(1, 1, limit), padded(2, 1, limit + 1), stamped(3, 1)])
    wait_for(lambda: len(consumer.lines("quarantine")) == 1 and len(consumer.lines()) == 2, 60,
             "one quarantined and two stored")
    q = consumer.lines("quarantine")[0]
    assert q["reason"] == "message larger than max_message_bytes", q["reason"]
    assert q["x-vm-uuid"] == vm_uuid(2) and q["routing_key"] == "x.metrics.t", q.keys()
    assert len(q["body"].encode()) == limit + 1
    assert sorted(l["vm"]["uuid"] for l in consumer.lines()) == sorted([vm_uuid(1), vm_uuid(3)])
    text = consumer.metrics()
    assert counter(text, 'vmproxy_consumer_messages_total{result="quarantined"}') == 1
    assert counter(text, 'vmproxy_consumer_messages_total{result="stored"}') == 2
    assert consumer.stop() == 0
    assert broker.queue_depth(consumer.queue) == 0


def test_reconnect_and_fsync_series(broker, consumer):
    """vmproxy_consumer_reconnects_total counts a broker connection lost
    under the consumer (closed by the broker here), after which it consumes
    again; vmproxy_consumer_batch_fsync_seconds is a summary whose count
    grows with each committed batch and whose sum is the time spent; the
    series docs/consumer.md names are exactly the ones exposed."""
    consumer.start()
    text = consumer.metrics()
    assert "# TYPE vmproxy_consumer_batch_fsync_seconds summary" in text
    assert "# TYPE vmproxy_consumer_reconnects_total counter" in text
    assert fsync_series(text) == (0, 0)
    assert counter(text, "vmproxy_consumer_reconnects_total") == 0
    publish(broker, [stamped(1, 1)])
    wait_for(lambda: len(consumer.lines()) == 1, 30, "the first sample stored")
    s1, n1 = wait_for(lambda: fsync_series(consumer.metrics())[1] >= 1 and
                      fsync_series(consumer.metrics()), 10, "the first batch's commit observed")
    assert s1 > 0
    # Every series docs/consumer.md names is exposed (a VM tracked, TLS on),
    # and nothing it does not name.
    section = open(os.path.join(TOP, "docs", "consumer.md")).read().split(
        "## Metrics")[1].split("\n## ")[0]
    documented = set(re.findall(r"`(vmproxy_[a-z0-9_]+)", section))
    exposed = set(re.findall(r"^# TYPE (\S+) ", consumer.metrics(), re.M))
    assert len(documented) >= 15, documented
    assert documented == exposed, (sorted(documented - exposed), sorted(exposed - documented))

    def consumer_connections():
        # The tab-separated form: its pid is the one close_connection takes.
        out = broker.ctl("list_connections", "pid", "user", "--quiet", "--no-table-headers")
        return [l.split("\t")[0] for l in out.splitlines()
                if l.split("\t")[-1] == "vmproxy-consumer"]
    pids = wait_for(consumer_connections, 30, "the consumer's broker connection")
    assert len(pids) == 1, pids
    broker.ctl("close_connection", pids[0], "closed by the test")
    wait_for(lambda: consumer.consuming() == 2, 60, "the consumer to connect again")
    assert counter(consumer.metrics(), "vmproxy_consumer_reconnects_total") == 1
    publish(broker, [stamped(1, 2)])
    wait_for(lambda: len(consumer.lines()) == 2, 30, "a sample stored after the reconnect")
    s2, n2 = wait_for(lambda: fsync_series(consumer.metrics())[1] > n1 and
                      fsync_series(consumer.metrics()), 10, "the second batch's commit observed")
    assert s2 > s1, (s1, s2)
    assert consumer.proc.poll() is None
    assert consumer.stop() == 0
