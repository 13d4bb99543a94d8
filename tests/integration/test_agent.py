"""vmproxy-agent through vmproxyd to the real broker: every sample arrives
across broker, agent and proxy restarts (the spool), samples match the
metrics schema, and `send` reports what happened in its exit status."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jsonschema
import pytest

from harness import stop_clean, wait_for
from harness.vmproxyd import VmProxyd, make_vms

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = json.load(open(os.path.join(TOP, "common", "metrics.schema.json")))


def agent_bin(build_dir):
    return os.path.join(str(build_dir), "guest-agent", "vmproxy-agent")


class Agent:
    def __init__(self, build_dir, proxy, vm, spool, interval=1):
        self.args = [agent_bin(build_dir), "--endpoint", "tcp://127.0.0.1:%d" % proxy.port,
                     "--source-address", vm["address"], "--interval", str(interval),
                     "--spool-dir", str(spool), "--timeout", "3", "--routing-key", "metrics.t"]
        self.log_path = str(spool) + ".log"
        self.log = open(self.log_path, "ab")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=self.log)
        return self

    def kill(self):
        """SIGKILL, for scenarios that crash the agent on purpose."""
        self.proc.kill()
        self.proc.wait()

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        """SIGTERM: exit 0 within 30 s, no sanitizer report (else the test
        fails; an agent still running is killed)."""
        if self.proc:
            return stop_clean(self.proc, "vmproxy-agent", self.output, 30)


def seqs_in(msgs, uuid):
    out = []
    for m, p, b in msgs:
        if (p.headers or {}).get("x-vm-uuid") == uuid:
            doc = json.loads(b)
            jsonschema.Draft202012Validator(SCHEMA).validate(doc)
            assert p.message_id == "%s.%d" % (doc["host"]["boot_id"], doc["seq"])
            assert p.content_type == "application/json" and p.delivery_mode == 2
            out.append(doc["seq"])
    return out


@pytest.fixture
def agent_proxy(build_dir, broker, certs, tmp_path):
    vms = make_vms(1, base="127.10.20.1")
    proxy = VmProxyd(build_dir, tmp_path, broker, certs, vms, threads=1,
                     upstream={"heartbeat": 5, "stuck_timeout_ms": 5000})
    proxy.start()
    yield proxy, vms[0]
    proxy.stop()


def test_every_seq_arrives_across_restarts(build_dir, broker, agent_proxy, tmp_path):
    """Agent at 1 s: broker stopped 20 s and restarted, agent SIGKILLed and
    restarted, proxy restarted: the queue gets every seq 1..N, no gap."""
    proxy, vm = agent_proxy
    broker.purge(broker.queue)
    spool = tmp_path / "spool"
    agent = Agent(build_dir, proxy, vm, spool).start()
    try:
        def queued():
            return broker.queue_depth(broker.queue)
        wait_for(lambda: queued() >= 3, 30, "first samples")
        agent.proc.send_signal(signal.SIGHUP)  # a stray HUP must not stop it

        broker.stop()
        time.sleep(20)  # the outage itself: samples pile up in the spool
        broker.start()
        proxy.wait_links(True, 60)
        wait_for(lambda: len(os.listdir(spool)) <= 2, 60, "the spool to drain")

        assert agent.proc.poll() is None, "the agent exited"
        agent.kill()
        time.sleep(3)  # samples not taken while it is dead: no seq is lost for that
        agent.start()

        proxy.stop()
        time.sleep(3)
        proxy.start()
        wait_for(lambda: len([f for f in os.listdir(spool) if f.endswith(".json")]) == 0, 60,
                 "the spool to drain after the proxy restart")
        agent.stop()
    finally:
        if agent.proc.poll() is None:
            agent.kill()
    msgs = broker.get_all(broker.queue, timeout=30)
    seqs = seqs_in(msgs, vm["uuid"])
    n = max(seqs)
    missing = sorted(set(range(1, n + 1)) - set(seqs))
    dups = len(seqs) - len(set(seqs))
    print("agent through outages: %d samples, seq 1..%d, %d duplicates" % (len(seqs), n, dups))
    assert n >= 20  # the broker outage alone spans 20 samples at 1 s
    assert missing == [], missing


def run_send(build_dir, endpoint, source, payload, *args, timeout=30):
    argv = [agent_bin(build_dir), "send", "--endpoint", endpoint, "--routing-key", "events.x",
            "--timeout", "2"]
    if source:
        argv += ["--source-address", source]
    return subprocess.run(argv + list(args), input=payload, capture_output=True, timeout=timeout)


def test_send_exit_codes(build_dir, broker, agent_proxy):
    proxy, vm = agent_proxy
    ep = "tcp://127.0.0.1:%d" % proxy.port
    broker.purge(broker.queue)
    r = run_send(build_dir, ep, vm["address"], b'{"event": "ok"}')
    assert r.returncode == 0, r.stderr
    msgs = broker.get_all(broker.queue, timeout=10)
    assert [b for _, _, b in msgs] == [b'{"event": "ok"}']

    # Refused: the proxy allows only "metrics" (403 on the guest channel).
    r = run_send(build_dir, ep, vm["address"], b"x", "--exchange", "vm.metrics")
    assert r.returncode == 3, r.stderr
    assert b"403" in r.stderr

    # Timeout: the broker does not confirm while frozen.
    broker.freeze()
    try:
        r = run_send(build_dir, ep, vm["address"], b"late")
    finally:
        broker.thaw()
    assert r.returncode == 4, r.stderr
    assert b"no confirm within 2000 ms" in r.stderr

    # Nothing listening.
    r = run_send(build_dir, "tcp://127.0.0.1:9", None, b"x")
    assert r.returncode == 5, r.stderr

    # Usage errors.
    r = subprocess.run([agent_bin(build_dir), "send", "--endpoint", ep], input=b"x",
                       capture_output=True)
    assert r.returncode == 1 and b"--routing-key is required" in r.stderr
    r = subprocess.run([agent_bin(build_dir), "send", "--routing-key", "k", "--endpoint",
                        "http://x"], input=b"x", capture_output=True)
    assert r.returncode == 1 and b"expected vsock://CID:PORT or tcp://HOST:PORT" in r.stderr


class StallingRelay:
    """Between the agent and vmproxyd: relays both ways until LIMIT bytes
    came from the agent (the handshake fits), then stops reading from it,
    like a peer that stopped reading. stalled is set at that point."""

    def __init__(self, target, source, limit=4096):
        self.target, self.source, self.limit = target, source, limit
        self.stalled = threading.Event()
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            up = socket.socket()
            up.bind((self.source, 0))
            up.connect(self.target)
            self.conns += [c, up]
            threading.Thread(target=self._up, args=(c, up), daemon=True).start()
            threading.Thread(target=self._down, args=(up, c), daemon=True).start()

    def _up(self, c, up):
        sent = 0
        while sent < self.limit:
            data = c.recv(min(4096, self.limit - sent))
            if not data:
                return
            up.sendall(data)
            sent += len(data)
        self.stalled.set()  # and never read from the agent again

    def _down(self, up, c):
        try:
            while True:
                data = up.recv(65536)
                if not data:
                    return
                c.sendall(data)
        except OSError:
            pass

    def close(self):
        for s in [self.srv] + self.conns:
            s.close()


def test_send_connect_timeout(build_dir):
    """A connect that never completes (the listener's accept queue is full,
    so the SYN is dropped) ends at --timeout with exit 4. The same bounded
    connect serves vsock endpoints, which cannot be run here."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fill = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(srv.getsockname())
        fill.append(c)
    try:
        t0 = time.monotonic()
        r = run_send(build_dir, "tcp://127.0.0.1:%d" % srv.getsockname()[1], "127.0.0.1",
                     b"x", timeout=60)
        took = time.monotonic() - t0
        print("connect timeout of 2 s: exit %d after %.1f s" % (r.returncode, took))
        assert r.returncode == 4, r.stderr
        assert b"no connection within 2000 ms" in r.stderr
    finally:
        for c in fill + [srv]:
            c.close()


def test_send_to_a_peer_that_stops_reading(build_dir, agent_proxy):
    """A 1 MiB send to a peer that stops reading after the handshake: exit 4
    at --timeout; and with a long --timeout, SIGTERM ends it (exit 6)."""
    proxy, vm = agent_proxy
    payload = b"x" * (1 << 20)
    relay = StallingRelay(("127.0.0.1", proxy.port), vm["address"])
    try:
        ep = "tcp://127.0.0.1:%d" % relay.port
        r = run_send(build_dir, ep, None, payload, timeout=60)
        assert relay.stalled.is_set()
        assert r.returncode == 4, r.stderr

        relay.stalled.clear()
        p = subprocess.Popen([agent_bin(build_dir), "send", "--endpoint", ep, "--routing-key",
                              "events.x", "--timeout", "300"], stdin=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            p.stdin.write(payload)
            p.stdin.close()
            assert relay.stalled.wait(30), "the agent never got past the handshake"
            p.send_signal(signal.SIGTERM)
            rc = p.wait(15)
            err = p.stderr.read()
            assert rc == 6, err
            assert b"interrupted" in err
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    finally:
        relay.close()

def test_send_payload_bound(build_dir, broker, agent_proxy):
    """send takes at most 1 MiB on stdin (docs/agent.md): exactly 1 MiB is
    published whole through the proxy; one byte more is a usage error
    (exit 1) and nothing is published."""
    proxy, vm = agent_proxy
    ep = "tcp://127.0.0.1:%d" % proxy.port
    broker.purge(broker.queue)
    body = bytes(range(256)) * 4096
    assert len(body) == 1 << 20
    r = run_send(build_dir, ep, vm["address"], body)
    assert r.returncode == 0, r.stderr
    msgs = broker.get_all(broker.queue, timeout=10)
    assert [b for _, _, b in msgs] == [body]
    r = run_send(build_dir, ep, vm["address"], body + b"x")
    assert r.returncode == 1, r.stderr
    assert b"the payload is larger than 1048576 bytes" in r.stderr
    assert broker.queue_depth(broker.queue) == 0


def test_send_nacked_exits_2(build_dir, broker, agent_proxy):
    """A message the broker nacks (a policy makes the queue reject every
    publish) reaches the guest through the proxy as a nack: send exits 2
    and says so."""
    proxy, vm = agent_proxy
    ep = "tcp://127.0.0.1:%d" % proxy.port
    broker.purge(broker.queue)
    broker.ctl("set_policy", "-p", broker.vhost, "--apply-to", "queues", "test-reject",
               "^%s$" % broker.queue.replace(".", "\\."),
               '{"max-length": 0, "overflow": "reject-publish"}')
    try:
        r = wait_for(lambda: (lambda r: r.returncode != 0 and r)(
            run_send(build_dir, ep, vm["address"], b'{"event": "rejected"}')), 30,
            "the policy to apply")
    finally:
        broker.ctl("clear_policy", "-p", broker.vhost, "test-reject")
    assert r.returncode == 2, r.stderr
    assert b"the broker nacked the message" in r.stderr
    threads = proxy.admin("threads")["threads"]
    assert sum(t["upstream"]["nacked"] for t in threads) >= 1, threads


def test_send_over_tls(build_dir, broker, certs):
    """tcp:// with --tls-ca (and a client certificate, which this broker
    requires): the server is verified against the CA and the name in the
    endpoint; a wrong CA is a connection failure, not a send."""
    base = ["--vhost", broker.vhost, "--user", "vmproxyd", "--password",
            broker.passwords["vmproxyd"], "--exchange", broker.exchange,
            "--tls-cert", str(certs / "proxy.pem"), "--tls-key", str(certs / "proxy-key.pem")]
    ep = "tcp://localhost:%d" % broker.tls_port
    broker.purge(broker.queue)
    r = run_send(build_dir, ep, None, b'{"over": "tls"}', "--tls-ca", str(certs / "ca.pem"),
                 *base)
    assert r.returncode == 0, r.stderr
    msgs = broker.get_all(broker.queue, timeout=10)
    assert [b for _, _, b in msgs] == [b'{"over": "tls"}']

    # The server certificate is not signed by this CA: no connection.
    r = run_send(build_dir, ep, None, b"x", "--tls-ca", str(certs / "proxy.pem"), *base)
    assert r.returncode == 5, r.stderr
    # Plain AMQP spoken to the TLS port is not a send either.
    r = run_send(build_dir, ep, None, b"x", *base[:-4])
    assert r.returncode == 5, r.stderr
    assert broker.queue_depth(broker.queue) == 0


def test_once_matches_schema(build_dir):
    out = subprocess.run([agent_bin(build_dir), "--once"], capture_output=True, check=True)
    doc = json.loads(out.stdout)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["seq"] == 1 and doc["cpu"]["count"] == os.cpu_count()


def test_vsock_endpoint_nothing_listening(build_dir):
    """A vsock endpoint where nothing answers (CID 1, a port nobody listens
    on), within the --timeout (never a hang), naming the endpoint, with the
    exit code docs/agent.md gives for what the kernel did: 5 when it
    refuses the connection (vsock loopback loaded), 4 when the connect times
    out (no loopback transport, as on these machines)."""
    t0 = time.monotonic()
    r = run_send(build_dir, "vsock://1:5672", None, b"x")
    assert time.monotonic() - t0 < 30
    assert b"vsock cid 1 port 5672" in r.stderr, r.stderr
    if b"no connection within 2000 ms" in r.stderr:
        assert r.returncode == 4, r.stderr
    else:
        assert r.returncode == 5, r.stderr


# The ceiling docs/agent.md promises for the agent at a 1 s interval, in a
# normal build (the sanitizers' shadow memory and checks are not the agent's).
FOOTPRINT_CPU_PCT = 2.0
FOOTPRINT_RSS_KB = 16 * 1024


def test_agent_footprint(build_dir, agent_proxy, tmp_path):
    """The agent's own CPU time and resident memory over 20 s at a 1 s
    interval stay under the ceiling docs/agent.md gives (checked in the
    normal build; the figures are printed in both)."""
    proxy, vm = agent_proxy
    agent = Agent(build_dir, proxy, vm, tmp_path / "spool").start()
    try:
        time.sleep(20)  # the measurement window itself, not a wait for an event
        pid = agent.proc.pid
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        with open("/proc/%d/status" % pid) as f:
            rss = [l for l in f if l.startswith("VmRSS")][0].split()[1]
        cpu_s = ticks / os.sysconf("SC_CLK_TCK")
        print("agent footprint: %.2f s CPU over 20 s (%.2f%%), RSS %s kB" %
              (cpu_s, 100 * cpu_s / 20, rss))
        assert agent.proc.poll() is None
        with open(agent_bin(build_dir), "rb") as f:
            sanitized = b"__asan_init" in f.read()
        if not sanitized:
            assert 100 * cpu_s / 20 < FOOTPRINT_CPU_PCT, cpu_s
            assert int(rss) < FOOTPRINT_RSS_KB, rss
    finally:
        agent.stop()
