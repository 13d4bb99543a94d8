"""Interoperability of the guest-facing AMQP engine with real clients.

tests/tools/guest-test-server runs the engine alone on loopback (no proxy,
no broker): it acks every confirmed publish at once, nacks routing key
"nack-me", allows only the exchange "metrics", and prints one JSON line per
event. These scenarios prove that pika (BlockingConnection with publisher
confirms) and rabbitmq-c's amqp-publish complete the handshake, get their
confirms, see RabbitMQ's errors as RabbitMQ's, and close cleanly.
"""
import json
import queue
import shutil
import socket
import subprocess
import threading
import time

import pika
import pika.exceptions
import pytest

from harness import stop_clean


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, exe):
        self.port = _free_port()
        self.proc = subprocess.Popen([str(exe), str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.events = []
        self._err = None
        self._q = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, "guest-test-server exited: %s" % self.proc.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "guest-test-server never listened"
                time.sleep(0.05)
        # That probe connection ends with an eof event: wait for it so that
        # it does not mix with the scenario's own connections.
        self.wait(lambda evs: any(e["event"] in ("eof", "closed") for e in evs))
        self.events.clear()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(json.loads(line))

    def _pull(self):
        while True:
            try:
                self.events.append(self._q.get_nowait())
            except queue.Empty:
                return

    def wait(self, pred, timeout=10):
        """Poll the event lines until PRED(events) holds, at most TIMEOUT s."""
        deadline = time.monotonic() + timeout
        while True:
            self._pull()
            if pred(self.events):
                return self.events
            assert time.monotonic() < deadline, "timed out; events: %r" % self.events[-20:]
            try:
                self.events.append(self._q.get(timeout=0.1))
            except queue.Empty:
                pass

    def of(self, kind):
        self._pull()
        return [e for e in self.events if e["event"] == kind]

    def stop(self):
        """SIGTERM: exit 0 within 30 s and no sanitizer report on stderr
        (else the test fails; a server still running is killed)."""
        stop_clean(self.proc, "guest-test-server", self._stderr, 30)

    def _stderr(self):
        """Its stderr, read once it has exited."""
        if self._err is None:
            self._err = self.proc.stderr.read()
        return self._err


@pytest.fixture
def server(build_dir):
    exe = build_dir / "tests" / "tools" / "guest-test-server"
    if not exe.exists():
        pytest.skip("%s not built" % exe)
    s = Server(exe)
    yield s
    s.stop()


def _connect(server):
    params = pika.ConnectionParameters(host="127.0.0.1", port=server.port,
                                       credentials=pika.PlainCredentials("guest", "guest"),
                                       connection_attempts=1, socket_timeout=5,
                                       blocked_connection_timeout=10)
    return pika.BlockingConnection(params)


def test_pika_confirmed_publishes_are_all_acked(server):
    """50 publishes on a confirm channel: every basic_publish returns (pika
    raises on a nack or a timeout), the engine saw tags 1..50 in order with
    the exchange, routing key and body length sent, and close is clean."""
    conn = _connect(server)
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(50):
        ch.basic_publish("metrics", "vm.cpu.%d" % i, b"x" * i,
                         properties=pika.BasicProperties(content_type="application/json",
                                                         delivery_mode=2))
    conn.close()
    evs = server.wait(lambda evs: any(e["event"] == "closed" for e in evs))
    pubs = server.of("publish")
    assert [p["delivery_tag"] for p in pubs] == list(range(1, 51))
    assert all(p["exchange"] == "metrics" and p["confirm"] for p in pubs)
    assert [p["routing_key"] for p in pubs] == ["vm.cpu.%d" % i for i in range(50)]
    assert [p["body_len"] for p in pubs] == list(range(50))
    assert len({p["conn"] for p in pubs}) == 1
    opened = server.of("opened")
    assert opened and opened[0]["user"] == "guest"
    closed = [e for e in evs if e["event"] == "closed"]
    assert closed[0]["reply_code"] == 200, closed
    assert not server.of("eof")


def test_pika_nack_raises(server):
    """A nack from the engine reaches pika as NackError; the channel and
    connection stay usable."""
    conn = _connect(server)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("metrics", "ok", b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("metrics", "nack-me", b"2")
    ch.basic_publish("metrics", "ok", b"3")
    assert ch.is_open
    conn.close()
    server.wait(lambda evs: any(e["event"] == "closed" for e in evs))
    assert [p["settle"] for p in server.of("publish")] == ["ack", "nack", "ack"]
    assert server.of("closed")[0]["reply_code"] == 200


def test_pika_forbidden_exchange_is_403(server):
    """A publish to an exchange outside the allowed list closes that channel
    with 403 ACCESS_REFUSED, like RabbitMQ without write permission; the
    connection survives and another channel still publishes."""
    conn = _connect(server)
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
        ch.basic_publish("amq.direct", "k", b"x")
    assert exc.value.reply_code == 403
    assert "ACCESS_REFUSED" in exc.value.reply_text
    ch2 = conn.channel()
    ch2.confirm_delivery()
    ch2.basic_publish("metrics", "after", b"y")
    conn.close()
    server.wait(lambda evs: any(e["event"] == "closed" for e in evs))
    assert [p["routing_key"] for p in server.of("publish")] == ["after"]
    assert server.of("closed")[0]["reply_code"] == 200


def test_pika_exchange_declare(server):
    """Declaring the allowed exchange answers declare-ok; another exchange
    gets 403 on the channel."""
    conn = _connect(server)
    ch = conn.channel()
    ch.exchange_declare("metrics", exchange_type="topic", durable=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
        ch.exchange_declare("elsewhere", exchange_type="topic")
    assert exc.value.reply_code == 403
    conn.close()


@pytest.mark.skipif(shutil.which("amqp-publish") is None, reason="amqp-tools not installed")
def test_amqp_publish(server):
    """rabbitmq-c's amqp-publish publishes one message and exits 0; the
    engine saw it and the connection closed with 200."""
    r = subprocess.run(["amqp-publish", "-u", "amqp://guest:guest@127.0.0.1:%d" % server.port,
                        "-e", "metrics", "-r", "key", "-b", "body"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    evs = server.wait(lambda evs: any(e["event"] == "closed" for e in evs))
    pubs = server.of("publish")
    assert len(pubs) == 1
    assert pubs[0]["exchange"] == "metrics"
    assert pubs[0]["routing_key"] == "key"
    assert pubs[0]["body_len"] == 4
    closed = [e for e in evs if e["event"] == "closed"]
    assert closed[0]["reply_code"] == 200, closed
