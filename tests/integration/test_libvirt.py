"""vmproxyd in front of a libvirt that comes and goes: a private libvirtd
(harness.libvirtd) serving the test driver, killed and started again while
guests publish. Guests are identified by the DHCP lease the test driver
makes up for their domain's NIC (an address on loopback they bind to).
"""
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request

import pika
import pytest

from harness import free_port, wait_for
from harness import libvirtd as lvd
from harness.vmproxyd import from_source, make_vms

pytestmark = pytest.mark.skipif(lvd.available() is not None,
                                reason=str(lvd.available()))


def domain(i):
    return {"name": "lv-%d" % i, "uuid": "7e57a11e-0000-4000-8000-%012d" % i,
            "cid": 100 + i, "mac": "52:54:00:77:00:%02x" % i}


class Publisher(threading.Thread):
    """A guest publishing with confirms on one connection until stopped;
    any error ends it and is kept."""

    def __init__(self, source, port, tag):
        super().__init__(daemon=True)
        with from_source(source):
            self.conn = pika.BlockingConnection(pika.ConnectionParameters(
                host="127.0.0.1", port=port, connection_attempts=1, heartbeat=0))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.tag = tag
        self.confirmed = 0
        self.error = None
        self.halt = threading.Event()

    def run(self):
        try:
            while not self.halt.is_set():
                self.ch.basic_publish("metrics", "lv.%s" % self.tag, json.dumps(
                    {"tag": self.tag, "seq": self.confirmed + 1}).encode())
                self.confirmed += 1
                time.sleep(0.02)
        except Exception as e:  # kept for the assertion
            self.error = e

    def finish(self):
        self.halt.set()
        self.join(30)
        assert not self.is_alive()
        assert self.error is None, repr(self.error)
        self.conn.close()
        return self.confirmed


def publish_one(source, port, tag):
    """A new guest connection from SOURCE publishes one confirmed message."""
    with from_source(source):
        c = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=port, connection_attempts=1, socket_timeout=10))
    try:
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("metrics", "lv.%s" % tag, json.dumps({"tag": tag, "seq": 1}).encode())
    finally:
        c.close()


def refused(source, port):
    """A new guest connection from SOURCE is closed before the handshake."""
    try:
        publish_one(source, port, "refused")
    except pika.exceptions.AMQPConnectionError:
        return True
    return False


def metric(port, name):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read().decode()
    m = re.search(r"^%s(?:\{[^}]*\})? (\S+)$" % re.escape(name), text, re.M)
    return float(m.group(1)) if m else None


def test_libvirtd_killed_and_back(broker, proxy_factory, tmp_path):
    node = tmp_path / "node.xml"
    lvd.write_node(str(node), [domain(1), domain(2)])
    lv = lvd.Libvirtd(tmp_path / "lv", node).start()
    try:
        addr1, addr2 = lvd.lease_of(lv, "lv-1"), lvd.lease_of(lv, "lv-2")
        mport = free_port()
        proxy = proxy_factory([], threads=2, extra={
            "identity": {"libvirt_uri": lv.uri, "static": [], "unknown_peers": "reject"},
            "metrics": {"listen": "127.0.0.1:%d" % mport}})
        proxy.start()
        broker.purge(broker.queue)
        assert metric(mport, "vmproxy_libvirt_connected") == 1
        # lv-1 is known: its guest connected while libvirt was there.
        pub = Publisher(addr1, proxy.port, "steady")
        pub.start()
        wait_for(lambda: pub.confirmed >= 10 or pub.error, 30, "the guest publishing")

        lv.kill()
        killed = time.monotonic()
        wait_for(lambda: proxy.admin("status")["daemon"]["libvirt"]["state"] == "disconnected",
                 30, "vmproxyd to notice libvirtd gone")
        assert "libvirt: connection to %s lost" % lv.uri in proxy.log_text()
        assert metric(mport, "vmproxy_libvirt_connected") == 0
        # A new guest of the known VM connects; one of a VM never seen
        # (lv-2 runs, but vmproxyd never looked it up) is refused, said
        # and counted as such.
        publish_one(addr1, proxy.port, "known-while-down")
        assert refused(addr2, proxy.port)
        wait_for(lambda: "libvirt is unreachable and this peer was not known" in
                 proxy.log_text(), 10, "the refusal's log line")
        d = proxy.admin("status")["daemon"]
        assert d["refused_libvirt_unreachable"] == 1, d
        assert d["refused_unknown_peer"] == 0, d
        assert d["libvirt"]["served_from_cache"] >= 1, d
        text = subprocess.run([proxy.ctl, "--socket", proxy.admin_path, "status"],
                              capture_output=True, text=True, timeout=30)
        assert text.returncode == 0, text.stderr
        assert "libvirt disconnected, 1 disconnects, 0 reconnects" in text.stdout, text.stdout
        # A VM defined while libvirtd is away: the reconnecting client reads
        # the node anew.
        lvd.write_node(str(node), [domain(1), domain(2), domain(3)])
        # The outage lasts 10 s (the scenario, not a wait for something).
        time.sleep(max(0.0, 10 - (time.monotonic() - killed)))
        assert pub.is_alive() and pub.error is None, repr(pub.error)
        before = pub.confirmed

        lv.start()
        wait_for(lambda: proxy.admin("status")["daemon"]["libvirt"]["state"] == "connected",
                 30, "vmproxyd to reconnect to libvirt")
        addr3 = lvd.lease_of(lv, "lv-3")
        publish_one(addr2, proxy.port, "vm2-after")
        publish_one(addr3, proxy.port, "vm3-after")
        d = proxy.admin("status")["daemon"]
        assert d["libvirt"]["reconnects"] == 1 and d["libvirt"]["disconnects"] == 1, d
        assert d["refused_libvirt_unreachable"] == 1, d
        assert metric(mport, "vmproxy_libvirt_connected") == 1
        assert metric(mport, "vmproxy_libvirt_reconnects_total") == 1
        assert "libvirt: reconnected to %s" % lv.uri in proxy.log_text()
        wait_for(lambda: pub.confirmed > before + 10 or pub.error, 30,
                 "the guest still publishing after libvirtd came back")
        sent = pub.finish()
        msgs = broker.get_all(broker.queue, timeout=30)
        by_tag = {}
        for method, props, body in msgs:
            doc = json.loads(body)
            by_tag.setdefault(doc["tag"], []).append((doc["seq"], props.headers["x-vm-uuid"]))
        steady = by_tag["steady"]
        assert [s for s, _ in steady] == list(range(1, sent + 1))
        assert {u for _, u in steady} == {domain(1)["uuid"]}
        assert by_tag["known-while-down"] == [(1, domain(1)["uuid"])]
        assert by_tag["vm2-after"] == [(1, domain(2)["uuid"])]
        assert by_tag["vm3-after"] == [(1, domain(3)["uuid"])]
        assert "refused" not in by_tag
        proxy.stop()
    finally:
        lv.stop()


AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def raw_guest(source, port):
    """A socket from SOURCE that has sent the AMQP protocol header."""
    s = socket.socket()
    # Well below libvirt's keepalive timeout (15 s): a guest waiting that
    # long would be waiting for the frozen libvirtd.
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(AMQP_HEADER)
    return s


def got_start(s):
    """Block for the server's first frame: True for connection.start (a
    method frame on channel 0), False when the connection is closed."""
    try:
        head = s.recv(7)
    except ConnectionResetError:  # closed with our header unread
        return False
    return len(head) == 7 and head[0] == 1 and head[1:3] == b"\x00\x00"


def test_slow_libvirt_holds_up_only_the_peers_that_need_it(broker, proxy_factory, tmp_path):
    """With libvirtd frozen (SIGSTOP) while a lookup waits on it, peers
    known without libvirt (50 static VMs) are served meanwhile; lookups
    that need libvirt wait, bounded by limits.max_pending_lookups, past
    which they are refused and counted; all resume once it answers."""
    node = tmp_path / "node.xml"
    lvd.write_node(str(node), [domain(1)])
    lv = lvd.Libvirtd(tmp_path / "lv", node).start()
    guests = []
    try:
        addr1 = lvd.lease_of(lv, "lv-1")
        vms = make_vms(50, base="127.78.1.1")
        proxy = proxy_factory(vms, threads=2, limits={"max_pending_lookups": 3}, extra={
            "identity": {"libvirt_uri": lv.uri, "unknown_peers": "reject",
                         "static": [{"address": v["address"], "vm": v["name"],
                                     "uuid": v["uuid"]} for v in vms]}})
        proxy.start()
        lv.freeze()
        try:
            # lv-1's address needs a lease scan: its lookup waits on libvirt.
            slow = raw_guest(addr1, proxy.port)
            guests.append(slow)
            pending = lambda: proxy.admin("status")["daemon"]["lookups_pending"]
            wait_for(lambda: pending() == 1, 30, "the lease lookup to wait on libvirt")
            latencies = []
            for v in vms:
                t0 = time.monotonic()
                s = raw_guest(v["address"], proxy.port)
                guests.append(s)
                assert got_start(s), v
                latencies.append(time.monotonic() - t0)
            # All 50 served while the slow lookup still waits.
            assert pending() == 1
            print("static guests served with libvirt frozen: max %.1f ms, mean %.1f ms"
                  % (1000 * max(latencies), 1000 * sum(latencies) / len(latencies)))
            # Two more that need libvirt fill the bound; the next is refused.
            for a in ("127.78.200.1", "127.78.200.2"):
                guests.append(raw_guest(a, proxy.port))
            wait_for(lambda: pending() == 3, 30, "three lookups pending")
            over = raw_guest("127.78.200.3", proxy.port)
            guests.append(over)
            assert not got_start(over)
            d = proxy.admin("status")["daemon"]
            assert d["refused_lookups_pending"] == 1 and d["lookups_pending"] == 3, d
            wait_for(lambda: "limits.max_pending_lookups identity lookups are waiting"
                     in proxy.log_text(), 10, "the refusal's log line")
        finally:
            lv.thaw()
        # libvirt answers: lv-1's guest is admitted, the two unknown are refused.
        assert got_start(slow)
        assert not got_start(guests[-3]) and not got_start(guests[-2])
        wait_for(lambda: pending() == 0, 30, "no lookup pending")
        d = proxy.admin("status")["daemon"]
        assert d["refused_unknown_peer"] == 2 and d["refused_lookups_pending"] == 1, d
    finally:
        for s in guests:
            s.close()
        lv.stop()
