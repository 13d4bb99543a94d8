"""Per-VM inboxes through vmproxyd, with pika as the guest and a real
RabbitMQ: a guest declares and consumes the virtual queue "inbox", which is
its own VM's vm.<uuid>.inbox on the broker, bound to vm.control with
"<uuid>.#". Acks, nacks, rejects, cancel and prefetch reach the broker; a
VM never sees another VM's inbox; the daemon's bounds hold against a guest
that stops acking or reading.
"""
import json
import os
import socket
import subprocess
import struct
import sys
import threading
import time

import pika
import pytest

from harness import wait_for
from harness.vmproxyd import from_source, make_vms

CONTROL = "vm.control"
HERE = os.path.dirname(os.path.abspath(__file__))


def guest(proxy, vm, **kw):
    with from_source(vm["address"]):
        return pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=proxy.port, connection_attempts=1, socket_timeout=10,
            **kw))


def queue_name(vm):
    return "vm.%s.inbox" % vm["uuid"]


def send(broker, vm, bodies, key="cmd"):
    """Publish BODIES to VM's inbox as the management side does: confirmed
    and mandatory (an unroutable one raises)."""
    with broker.connection() as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for b in bodies:
            ch.basic_publish(CONTROL, "%s.%s" % (vm["uuid"], key), b, mandatory=True,
                             properties=pika.BasicProperties(delivery_mode=2))


def queue_stats(broker, vm):
    """(ready, unacked, consumers) of VM's inbox at the broker."""
    out = broker.ctl("list_queues", "-p", broker.vhost, "name", "messages_ready",
                     "messages_unacknowledged", "consumers", "--formatter", "json", "--quiet")
    for q in json.loads(out or "[]"):
        if q["name"] == queue_name(vm):
            return q["messages_ready"], q["messages_unacknowledged"], q["consumers"]
    return None


def wait_stats(broker, vm, want, timeout=20):
    wait_for(lambda: queue_stats(broker, vm) == want, timeout,
             "%s at %r (now %r)" % (queue_name(vm), want, queue_stats(broker, vm)))


def collect(conn, got, n, timeout=15):
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.2)
    return got


@pytest.fixture
def inbox_proxy(proxy_factory, broker, request):
    def make(n=2, base="127.10.9.1", threads=1, **kw):
        # VMs of their own: inboxes are durable and outlive a test.
        vms = make_vms(n, base=base, prefix=request.node.name)
        proxy = proxy_factory(vms, threads=threads, **kw).start()
        return proxy, vms
    yield make


def test_declare_consume_ack(broker, inbox_proxy):
    """declare-ok carries the real count (passive or not); deliveries come in
    order with the routing key the guest would use, re-tagged 1, 2, 3; a
    single ack and a multiple ack settle them at the broker."""
    proxy, (vm, _) = inbox_proxy()
    conn = guest(proxy, vm)
    ch = conn.channel()
    assert ch.queue_declare("inbox").method.message_count == 0
    send(broker, vm, [b"one", b"two", b"three"])
    ok = ch.queue_declare("inbox", passive=True).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == ("inbox", 3, 0)
    got = []
    ch.basic_qos(prefetch_count=10)
    ch.basic_consume("inbox", lambda c, m, p, b: got.append((m, p, b)))
    collect(conn, got, 3)
    assert [b for _, _, b in got] == [b"one", b"two", b"three"]
    assert [m.delivery_tag for m, _, _ in got] == [1, 2, 3]
    assert all(m.routing_key == "cmd" and m.exchange == CONTROL and not m.redelivered
               for m, _, _ in got)
    wait_stats(broker, vm, (0, 3, 1))
    ch.basic_ack(1)
    wait_stats(broker, vm, (0, 2, 1))
    ch.basic_ack(3, multiple=True)
    wait_stats(broker, vm, (0, 0, 1))
    conn.close()
    wait_stats(broker, vm, (0, 0, 0))


def test_nack_requeue_reject_and_cancel(broker, inbox_proxy):
    """A nack with requeue comes back redelivered; a reject without requeue
    is gone; after basic.cancel nothing more is delivered and new messages
    wait in the queue."""
    proxy, (vm, _) = inbox_proxy()
    conn = guest(proxy, vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, vm, [b"a", b"b"])
    got = []
    ch.basic_qos(prefetch_count=1)
    tag = ch.basic_consume("inbox", lambda c, m, p, b: got.append((m, b)))
    collect(conn, got, 1)
    assert got[0][1] == b"a" and not got[0][0].redelivered
    ch.basic_nack(got[0][0].delivery_tag, requeue=True)
    collect(conn, got, 2)
    assert got[1][1] == b"a" and got[1][0].redelivered
    ch.basic_reject(got[1][0].delivery_tag, requeue=False)
    collect(conn, got, 3)
    assert got[2][1] == b"b"
    ch.basic_ack(got[2][0].delivery_tag)
    wait_stats(broker, vm, (0, 0, 1))
    ch.basic_cancel(tag)
    wait_stats(broker, vm, (0, 0, 0))
    send(broker, vm, [b"later"])
    conn.process_data_events(time_limit=1.0)
    assert len(got) == 3
    wait_stats(broker, vm, (1, 0, 0))
    conn.close()


def test_prefetch_bounds_what_the_broker_sends(broker, inbox_proxy):
    """Prefetch 1 and 100 are the broker's limits for those consumers: a
    guest that does not ack gets that many and no more; a huge prefetch
    (or none) is capped at inbox.max_prefetch (100 here)."""
    proxy, (vm, _) = inbox_proxy()
    conn = guest(proxy, vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, vm, [b"%d" % i for i in range(300)])
    one, hundred, huge = [], [], []
    ch.basic_qos(prefetch_count=1)
    ch.basic_consume("inbox", lambda c, m, p, b: one.append(m))
    collect(conn, one, 1)
    wait_stats(broker, vm, (299, 1, 1))
    ch2 = conn.channel()
    ch2.basic_qos(prefetch_count=100)
    ch2.basic_consume("inbox", lambda c, m, p, b: hundred.append(m))
    collect(conn, hundred, 100)
    wait_stats(broker, vm, (199, 101, 2))
    conn.process_data_events(time_limit=0.5)
    assert (len(one), len(hundred)) == (1, 100)
    ch3 = conn.channel()
    ch3.basic_qos(prefetch_count=65535)
    ch3.basic_consume("inbox", lambda c, m, p, b: huge.append(m))
    collect(conn, huge, 100)
    wait_stats(broker, vm, (99, 201, 3))
    assert len(huge) == 100
    # Acking frees the window: one more for the prefetch-1 consumer.
    ch.basic_ack(one[0].delivery_tag)
    collect(conn, one, 2)
    assert len(one) == 2
    conn.close()
    wait_stats(broker, vm, (300 - 1, 0, 0))


def test_other_vm_cannot_reach_the_inbox(broker, inbox_proxy):
    """VM b sees only its own inbox: the broker name of VM a's inbox, a
    binding, basic.get and another name are refused with 403, and b's own
    "inbox" is empty while a's holds messages."""
    proxy, (a, b) = inbox_proxy()
    conn_a = guest(proxy, a)
    conn_a.channel().queue_declare("inbox")
    send(broker, a, [b"for a only"] * 3)
    conn_b = guest(proxy, b)
    for attempt in (lambda ch: ch.queue_declare(queue_name(a), passive=True),
                    lambda ch: ch.queue_declare(queue_name(a)),
                    lambda ch: ch.queue_declare("other"),
                    lambda ch: ch.queue_bind("inbox", CONTROL, a["uuid"] + ".#"),
                    lambda ch: ch.basic_consume(queue_name(a), lambda *x: None),
                    lambda ch: ch.basic_get(queue_name(a))):
        ch = conn_b.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            attempt(ch)
        assert e.value.reply_code == 403, e.value
    ch = conn_b.channel()
    assert ch.queue_declare("inbox").method.message_count == 0
    got = []
    ch.basic_consume("inbox", lambda c, m, p, body: got.append(body))
    conn_b.process_data_events(time_limit=1.0)
    assert got == []
    assert queue_stats(broker, a) == (3, 0, 0)
    conn_a.close()
    conn_b.close()


def test_unknown_and_foreign_tags_are_406(broker, inbox_proxy):
    """Acking a tag never delivered, or a tag delivered on another channel,
    closes that channel with 406; the channel that owns the tag still acks
    it."""
    proxy, (vm, _) = inbox_proxy()
    conn = guest(proxy, vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, vm, [b"x"])
    got = []
    ch.basic_consume("inbox", lambda c, m, p, b: got.append(m))
    collect(conn, got, 1)
    other = conn.channel()
    other.basic_ack(got[0].delivery_tag)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        other.basic_qos(prefetch_count=1)  # a round trip to see the close
    assert e.value.reply_code == 406 and "unknown delivery tag" in e.value.reply_text
    bad = conn.channel()
    bad.basic_ack(99)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bad.basic_qos(prefetch_count=1)
    assert e.value.reply_code == 406
    ch.basic_ack(got[0].delivery_tag)
    wait_stats(broker, vm, (0, 0, 1))
    conn.close()


def test_consumers_per_connection_bound(broker, inbox_proxy):
    """inbox.max_consumers (2 here) per connection: the next consume is 406."""
    proxy, (vm, _) = inbox_proxy(extra={"inbox": {"max_consumers": 2}})
    conn = guest(proxy, vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    ch.basic_consume("inbox", lambda *x: None)
    ch.basic_consume("inbox", lambda *x: None)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.basic_consume("inbox", lambda *x: None)
    assert e.value.reply_code == 406
    wait_stats(broker, vm, (0, 0, 0))  # the channel's close cancelled both
    conn.close()


def test_unacked_come_back_redelivered_when_the_guest_goes(broker, inbox_proxy):
    """Deliveries a guest had not acked when its connection ended are
    delivered again, redelivered=true, to its next connection."""
    proxy, (vm, _) = inbox_proxy()
    conn = guest(proxy, vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, vm, [b"m1", b"m2"])
    got = []
    ch.basic_consume("inbox", lambda c, m, p, b: got.append((m, b)))
    collect(conn, got, 2)
    ch.basic_ack(got[0][0].delivery_tag)
    conn.close()
    wait_stats(broker, vm, (1, 0, 0))
    conn = guest(proxy, vm)
    ch = conn.channel()
    again = []
    ch.basic_consume("inbox", lambda c, m, p, b: again.append((m, b)))
    collect(conn, again, 1)
    assert again[0][1] == b"m2" and again[0][0].redelivered
    ch.basic_ack(again[0][0].delivery_tag)
    wait_stats(broker, vm, (0, 0, 1))
    conn.close()


def test_get_and_recover(broker, inbox_proxy):
    """basic.get answers get-ok with the count left (or get-empty) and a
    tag of the channel's sequence; a no_ack get is settled at once;
    basic.recover puts the unacked ones back, delivered again redelivered."""
    proxy, (vm, _) = inbox_proxy()
    conn = guest(proxy, vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, vm, [b"g1", b"g2", b"g3"])
    m, p, b = ch.basic_get("inbox")
    assert (b, m.delivery_tag, m.message_count, m.redelivered) == (b"g1", 1, 2, False)
    assert m.routing_key == "cmd" and m.exchange == CONTROL
    m2, _, b2 = ch.basic_get("inbox", auto_ack=True)
    assert (b2, m2.delivery_tag) == (b"g2", 2)
    m3, _, b3 = ch.basic_get("inbox")
    assert b3 == b"g3"
    assert ch.basic_get("inbox") == (None, None, None)
    wait_stats(broker, vm, (0, 2, 0))
    ch.basic_recover(requeue=True)
    wait_stats(broker, vm, (2, 0, 0))
    got = []
    ch.basic_consume("inbox", lambda c, m_, p_, b_: got.append((m_, b_)))
    collect(conn, got, 2)
    assert [b_ for _, b_ in got] == [b"g1", b"g3"]
    assert all(m_.redelivered for m_, _ in got)
    ch.basic_ack(0, multiple=True)
    wait_stats(broker, vm, (0, 0, 1))
    # The tags recovered are not the guest's any more.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.basic_ack(1)
        ch.basic_qos(prefetch_count=1)
    assert e.value.reply_code == 406
    conn.close()


def test_broker_restart_redelivers(broker, inbox_proxy):
    """Deliveries in flight to a guest when the broker dies: the link comes
    back, the guest's consumer subscribes again by itself, every message is
    delivered again (redelivered=true) and acked exactly once; acks for the
    old tags are accepted and dropped."""
    proxy, (vm, _) = inbox_proxy()
    conn = guest(proxy, vm, heartbeat=0)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, vm, [b"r%d" % i for i in range(5)])
    got = []
    ch.basic_consume("inbox", lambda c, m, p, b: got.append((m, b)))
    collect(conn, got, 5)
    assert not any(m.redelivered for m, _ in got)
    broker.kill()
    broker.start()
    proxy.wait_links(True, 60)
    collect(conn, got, 10, timeout=60)
    again = got[5:]
    assert sorted(b for _, b in again) == sorted(b for _, b in got[:5])
    assert all(m.redelivered for m, _ in again)
    for m, _ in got[:5]:
        ch.basic_ack(m.delivery_tag)  # void: the broker requeued them
    for m, _ in again:
        ch.basic_ack(m.delivery_tag)
    wait_stats(broker, vm, (0, 0, 1))
    conn.process_data_events(time_limit=1.0)
    assert len(got) == 10
    # The old tags were never sent to the new link (they would ack other
    # messages there, or be unknown tags that close its inbox channel).
    assert "closed the inbox channel" not in proxy.log_text()
    conn.close()


def test_migration_moves_the_consumer(broker, inbox_proxy):
    """A VM moved to the other poll thread keeps its consumer: it is
    cancelled on the old thread's link (what was unacked goes back to the
    queue) and subscribed on the new one, where the unacked messages come
    again, redelivered, with the channel's next tags; new messages follow;
    everything is acked exactly once at the broker."""
    proxy, (vm, _) = inbox_proxy(threads=2, extra={"balancer": {"enabled": False}})
    conn = guest(proxy, vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, vm, [b"m%d" % i for i in range(5)])
    got = []
    ch.basic_qos(prefetch_count=10)
    ch.basic_consume("inbox", lambda c, m, p, b: got.append((m, b)))
    collect(conn, got, 5)
    ch.basic_ack(2, multiple=True)
    wait_stats(broker, vm, (0, 3, 1))
    before = {v["name"]: v["thread"] for v in proxy.admin("vms")["vms"]}[vm["name"]]
    r = subprocess.run([proxy.ctl, "--socket", proxy.admin_path, "migrate", vm["name"],
                        str(1 - before)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "moved from thread" in r.stdout, r.stdout + r.stderr
    collect(conn, got, 8)
    again = got[5:8]
    assert [b for _, b in again] == [b"m2", b"m3", b"m4"]
    assert all(m.redelivered for m, _ in again)
    assert [m.delivery_tag for m, _ in again] == [6, 7, 8]
    ch.basic_ack(3)  # a tag of the old thread's link: accepted, dropped
    send(broker, vm, [b"after"])
    collect(conn, got, 9)
    assert got[8][1] == b"after" and not got[8][0].redelivered
    ch.basic_ack(0, multiple=True)
    wait_stats(broker, vm, (0, 0, 1))
    assert {v["name"]: v["thread"] for v in proxy.admin("vms")["vms"]}[vm["name"]] != before
    assert "closed the inbox channel" not in proxy.log_text()
    conn.close()


def raw_consumer(proxy, vm, prefetch):
    """A guest on a plain socket that consumes its inbox with PREFETCH and
    then never reads again (its receive buffer kept small)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((vm["address"], 0))
    s.connect(("127.0.0.1", proxy.port))
    s.settimeout(10)
    rx = b""

    def frame(ch, cls, meth, args):
        payload = struct.pack(">HH", cls, meth) + args
        return struct.pack(">BHI", 1, ch, len(payload)) + payload + b"\xce"

    def until(cls, meth):
        nonlocal rx
        want = struct.pack(">HH", cls, meth)
        while True:
            while len(rx) >= 7:
                size = struct.unpack(">I", rx[3:7])[0]
                if len(rx) < size + 8:
                    break
                f, rx = rx[:size + 8], rx[size + 8:]
                if f[0] == 1 and f[7:11] == want:
                    return f
            chunk = s.recv(65536)
            assert chunk, "closed while waiting for %d.%d" % (cls, meth)
            rx += chunk

    def sstr(b):
        return bytes([len(b)]) + b

    s.sendall(b"AMQP\x00\x00\x09\x01")
    until(10, 10)
    resp = b"\x00guest\x00guest"
    s.sendall(frame(0, 10, 11, struct.pack(">I", 0) + sstr(b"PLAIN")
                    + struct.pack(">I", len(resp)) + resp + sstr(b"en_US")))
    until(10, 30)
    s.sendall(frame(0, 10, 31, struct.pack(">HIH", 8, 131072, 0)))
    s.sendall(frame(0, 10, 40, sstr(b"/") + sstr(b"") + b"\x00"))
    until(10, 41)
    s.sendall(frame(1, 20, 10, sstr(b"")))
    until(20, 11)
    s.sendall(frame(1, 60, 10, struct.pack(">IHB", 0, prefetch, 0)))
    until(60, 11)
    s.sendall(frame(1, 60, 20, struct.pack(">H", 0) + sstr(b"inbox") + sstr(b"stuck")
                    + b"\x00" + struct.pack(">I", 0)))
    until(60, 21)
    return s


def test_guest_that_never_reads(broker, inbox_proxy):
    """A guest that consumes with prefetch 100 and then stops reading its
    socket: the broker has exactly 100 deliveries out to it (the link pulls
    no more for that consumer), the rest stay ready, and another VM's
    inbox traffic and the daemon go on."""
    proxy, (stuck_vm, ok_vm) = inbox_proxy()
    c = guest(proxy, stuck_vm)
    c.channel().queue_declare("inbox")
    c.close()
    s = raw_consumer(proxy, stuck_vm, 100)
    body = b"x" * 4096
    send(broker, stuck_vm, [body] * 400)
    wait_stats(broker, stuck_vm, (300, 100, 1))
    conn = guest(proxy, ok_vm)
    ch = conn.channel()
    ch.queue_declare("inbox")
    send(broker, ok_vm, [b"fine"] * 5)
    got = []
    ch.basic_consume("inbox", lambda c_, m, p, b: (got.append(b), c_.basic_ack(m.delivery_tag)))
    collect(conn, got, 5)
    assert got == [b"fine"] * 5
    assert queue_stats(broker, stuck_vm) == (300, 100, 1)
    conn.close()
    s.close()
    wait_stats(broker, stuck_vm, (400, 0, 0))


class InboxGuest:
    """guest_inbox.py in a process of its own, consuming VM's inbox through
    PROXY with PREFETCH: .deliveries (dicts, as they come), .ack() /
    .hold() / .stop(), .kill() (SIGKILL)."""

    def __init__(self, proxy, vm, prefetch=5, delay=0.02):
        self.vm = vm
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "guest_inbox.py"), "--source", vm["address"],
             "--port", str(proxy.port), "--prefetch", str(prefetch), "--delay", str(delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=HERE)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_for(lambda: self._exited() or "ready" in self.lines, 60,
                 "guest of %s ready" % vm["name"])

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def _exited(self):
        if self.proc.poll() is not None:
            self.reader.join(5)
            raise AssertionError("guest of %s exited %s: %s\n%s" % (
                self.vm["name"], self.proc.returncode, self.lines, self.proc.stderr.read()))
        return False

    @property
    def deliveries(self):
        return [json.loads(l) for l in list(self.lines) if l.startswith('{"tag"')]

    def wait_deliveries(self, n, timeout=60):
        return wait_for(lambda: self._exited() or len(self.deliveries) >= n, timeout,
                        "%d deliveries to %s (have %d)" % (n, self.vm["name"],
                                                           len(self.deliveries)))

    def command(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def ack(self):
        self.command("ack")

    def hold(self):
        self.command("hold")

    def stop(self):
        """Close the connection; returns the summary line (acked tags)."""
        self.command("stop")
        self.proc.stdin.close()
        assert self.proc.wait(60) == 0, self.proc.stderr.read()
        self.reader.join(10)
        return json.loads(self.lines[-1])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(10)


@pytest.fixture
def inbox_guest():
    """inbox_guest(proxy, vm, **kw) -> InboxGuest, killed at teardown if the
    test left it running (after a failure)."""
    started = []

    def make(proxy, vm, **kw):
        g = InboxGuest(proxy, vm, **kw)
        started.append(g)
        return g
    yield make
    for g in started:
        g.kill()


def test_killed_guest_gets_its_unacked_again(broker, inbox_proxy, inbox_guest):
    """A guest process SIGKILLed with deliveries unacked: vmproxyd sees its
    connection end, nacks them back to the queue (none dropped, none acked
    for it), and the VM's next guest connection gets them first, with
    redelivered=true, then the rest; everything is acked exactly once at
    the broker (the inbox ends empty with nothing unacked, no inbox channel
    closed by the broker for an unknown or twice-acked tag) and the other
    VM's guest sees none of it."""
    proxy, (vm, other) = inbox_proxy()
    first = inbox_guest(proxy, vm, prefetch=5)
    bystander = inbox_guest(proxy, other, prefetch=5)
    bystander.ack()
    sent = ["%s-%02d" % (vm["name"], i) for i in range(12)]
    send(broker, vm, [b.encode() for b in sent], key="x")
    send(broker, other, [b"for the other VM"] * 3, key="x")
    first.wait_deliveries(5)
    wait_stats(broker, vm, (7, 5, 1))
    held = [d["body"] for d in first.deliveries]
    assert held == sent[:5] and not any(d["redelivered"] for d in first.deliveries)
    first.kill()
    # Back at the broker, not lost: all 12 ready again, none unacked.
    wait_stats(broker, vm, (12, 0, 0), timeout=60)
    second = inbox_guest(proxy, vm, prefetch=5)
    second.ack()
    second.wait_deliveries(12)
    wait_stats(broker, vm, (0, 0, 1), timeout=60)
    got = second.deliveries
    print("killed guest held %d; the next one got %d (%d redelivered)"
          % (len(held), len(got), sum(d["redelivered"] for d in got)))
    assert [d["body"] for d in got[:5]] == held, got
    assert all(d["redelivered"] for d in got[:5]), got
    assert [d["body"] for d in got[5:]] == sent[5:], got
    assert not any(d["redelivered"] for d in got[5:]), got
    assert all(d["routing_key"] == "x" for d in got), got
    summary = second.stop()
    assert sorted(summary["acked"]) == [d["tag"] for d in got], summary
    wait_stats(broker, vm, (0, 0, 0))
    bystander.wait_deliveries(3)
    assert [d["body"] for d in bystander.deliveries] == ["for the other VM"] * 3
    bystander.stop()
    wait_stats(broker, other, (0, 0, 0))
    assert "closed the inbox channel" not in proxy.log_text()
