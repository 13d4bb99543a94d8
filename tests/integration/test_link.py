"""vmproxyd's upstream link as an event source of its poll thread, against
a real RabbitMQ over TLS: publishes are batched into few TLS writes, a
frozen broker blocks no poll thread (guests on every thread keep their
heartbeats and new guests connect meanwhile), and a broker that accepts
the login but refuses every publish sees reconnects back off instead of a
reconnect storm, with the refusals counted by reply code.
"""
import json
import re
import time
import urllib.request

import pika
import pytest

from harness import free_port, wait_for
from harness.rabbitmq import DEPLOY
from harness.vmproxyd import from_source, make_vms
from test_proxy import finish, loadgen





def vmproxyd_permissions():
    """The vmproxyd user's (configure, write, read) permissions as the
    deployment's definitions give them: what a test that changes them
    restores, so the scenarios after it (the inboxes') find them intact."""
    defs = json.load(open(DEPLOY / "rabbitmq" / "definitions.json"))
    (p,) = [p for p in defs["permissions"] if p["user"] == "vmproxyd"]
    return p["configure"], p["write"], p["read"]


def guest_params(proxy, **kw):
    return pika.ConnectionParameters(host="127.0.0.1", port=proxy.port, **kw)


def blocked_guest(proxy, address):
    """A pika guest from ADDRESS (it takes connection.blocked) recording
    what it is told: (connection, channel, events, until), where
    until(pred, timeout, what) runs its I/O until pred() or fails."""
    with from_source(address):
        guest = pika.BlockingConnection(guest_params(proxy))
    events = []
    guest.add_on_connection_blocked_callback(
        lambda _c, frame: events.append(("blocked", frame.method.reason)))
    guest.add_on_connection_unblocked_callback(lambda _c, _f: events.append(("unblocked",)))

    def until(pred, timeout, what):
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, "pika guest: no %s in %d s: %r" % (what, timeout,
                                                                              events)
            guest.process_data_events(time_limit=0.2)
    return guest, guest.channel(), events, until


def link_totals(proxy):
    threads = proxy.admin("threads")["threads"]
    tot = {}
    for t in threads:
        for k in ("published", "acked", "writes", "reads", "connects"):
            tot[k] = tot.get(k, 0) + t["upstream"][k]
        for k in ("guest_reads", "guest_writes"):
            tot[k] = tot.get(k, 0) + t[k]
    return tot, threads


def test_publishes_are_batched_into_few_tls_writes(build_dir, broker, proxy_factory):
    """20 guest connections pipelining 64 confirms each: the link writes
    many messages per SSL_write (one write per loop iteration, not three
    records per message), guest sockets are read and written less than once
    per message (acks coalesced), and every message arrives."""
    vms = make_vms(10, base="127.10.40.1")
    proxy = proxy_factory(vms, threads=1).start()
    broker.purge(broker.queue)
    before, _ = link_totals(proxy)
    lg = loadgen(build_dir, proxy, vms, conns=2, count=500, window=64)
    rc, out, err = finish(lg, 180)
    assert rc == 0, out + err
    rep = json.loads(out)
    assert rep["confirmed"] == 10 * 2 * 500 and rep["errors"] == 0, rep
    after, threads = link_totals(proxy)
    published = after["published"] - before["published"]
    writes = after["writes"] - before["writes"]
    assert published == 10 * 2 * 500, threads
    print("LINK %d messages in %d TLS writes (%.2f per write), %d reads"
          % (published, writes, published / max(writes, 1), after["reads"] - before["reads"]))
    # Three records per message was the old cost; a batch per iteration is
    # the new one. Half a write per message leaves room for a slow machine.
    assert writes * 2 < published, (writes, published)
    # The guest side too: a read takes many publishes, a write many acks.
    greads = after["guest_reads"] - before["guest_reads"]
    gwrites = after["guest_writes"] - before["guest_writes"]
    print("GUEST %d reads, %d writes for %d messages" % (greads, gwrites, published))
    assert greads < published and gwrites < published, (greads, gwrites, published)
    assert broker.queue_depth(broker.queue) >= published


def test_frozen_broker_blocks_no_poll_thread(build_dir, broker, proxy_factory):
    """SIGSTOP the broker for 15 s with guests on both poll threads: every
    guest keeps its 2 s heartbeats, a new guest of each VM connects and
    opens a channel meanwhile, and the admin queries are answered."""
    vms = make_vms(4, base="127.10.41.1")
    proxy = proxy_factory(vms, threads=2, guest={"heartbeat": 2}).start()
    conns = []
    for v in vms:
        with from_source(v["address"]):
            conns.append(pika.BlockingConnection(guest_params(proxy, heartbeat=2)))
    placed = {v["uuid"]: v["thread"] for v in proxy.admin("vms")["vms"]}
    assert sorted(set(placed.values())) == [0, 1], placed  # both threads serve guests
    broker.freeze()
    lg = None
    try:
        frozen_at = time.monotonic()
        # VM 0 publishes 4.8 MB meanwhile: the link's socket and its output
        # buffer fill up, and the poll thread must not wait on either.
        lg = loadgen(build_dir, proxy, vms[:1], conns=1, count=300, size=16384, window=300)
        for v in vms:
            t0 = time.monotonic()
            with from_source(v["address"]):
                c = pika.BlockingConnection(guest_params(proxy, heartbeat=2))
            c.channel()
            took = time.monotonic() - t0
            c.close()
            # A blocked poll thread would hold the handshake for the rest
            # of the freeze; 5 s leaves room for a loaded machine.
            assert took < 5, "guest of %s took %.1f s to connect" % (v["name"], took)
        while time.monotonic() - frozen_at < 15:
            for c in conns:
                c.process_data_events(time_limit=0.1)
        assert all(c.is_open for c in conns)
        # The poll threads still answer the admin thread's queries.
        assert len(proxy.admin("vms")["vms"]) == 4
        assert lg.poll() is None  # nothing confirmed while the broker is frozen
    finally:
        broker.thaw()
    rc, out, err = finish(lg, 120)
    assert rc == 0, out + err
    assert json.loads(out)["confirmed"] == 300
    for c in conns:
        c.close()


def test_refused_publishing_backs_off_and_recovers(build_dir, broker, proxy_factory):
    """The broker accepts the link's login but refuses every publish (write
    permission revoked: channel.close 403). The link does not reconnect in
    a storm: successful logins do not reset the backoff, so reconnects in
    25 s stay few; the refusals are counted by code and the reason shown.
    A pika guest (it takes connection.blocked) is blocked with a reason
    naming the refusal and no broker text, stays blocked through the
    reconnects, and is unblocked once the link's messages are confirmed
    again. Once permissions return, everything the guests published
    arrives, what pika sent while blocked included."""
    vms = make_vms(2, base="127.10.42.1")
    mport = free_port()
    proxy = proxy_factory(vms, threads=1,
                          extra={"metrics": {"listen": "127.0.0.1:%d" % mport}}).start()
    broker.purge(broker.queue)
    guest, gch, events, guest_until = blocked_guest(proxy, vms[0]["address"])

    grant = ("set_permissions", "-p", broker.vhost, "vmproxyd", *vmproxyd_permissions())
    broker.ctl("set_permissions", "-p", broker.vhost, "vmproxyd", "^$", "^$", "^$")
    try:
        guest.process_data_events(time_limit=0.2)
        assert events == []  # the link is up: nothing refused yet
        lg = loadgen(build_dir, proxy, vms, conns=1, count=50, rate=20, window=10)
        wait_for(lambda: link_totals(proxy)[1][0]["upstream"]["refusals"].get("403", 0) >= 1,
                 30, "a 403 refusal counted")
        guest_until(lambda: events, 30, "connection.blocked")
        assert events == [("blocked", "vmproxy: the management broker refuses publishing "
                                      "(403)")], events
        gch.basic_publish("metrics", "pika", json.dumps({"vm": "pika", "seq": 1}).encode())
        start, _ = link_totals(proxy)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 25:
            assert lg.poll() is None  # guests wait for confirms, none come
            guest.process_data_events(time_limit=0.5)
        assert len(events) == 1, events  # blocked through every reconnect
        end, threads = link_totals(proxy)
        reconnects = end["connects"] - start["connects"]
        print("REFUSED %d reconnects in 25 s, refusals %s, last error %r"
              % (reconnects, threads[0]["upstream"]["refusals"],
                 threads[0]["upstream"]["last_error"]))
        # Backoff from 200 ms doubling to 30 s: about 7 attempts in 25 s at
        # most (each waits between half and all of its ceiling); a login
        # resetting it would make well over a hundred.
        assert 1 <= reconnects <= 10, reconnects
        # And falling: each refusal waits longer than the one before (a wait
        # is drawn from [c/2, c] for a ceiling c that doubles, so this holds
        # below the 30 s cap), the last one many times the first.
        waits = [int(w) for w in re.findall(r'broker closed the channel: 403 [^\n]*'
                                            r'reconnecting in (\d+) ms', proxy.log_text())]
        print("REFUSED waits %s ms" % waits)
        assert len(waits) >= 4, waits
        assert all(b >= a for a, b in zip(waits, waits[1:]) if a < 12800), waits
        assert max(waits) >= 16 * waits[0], waits
        assert end["acked"] == start["acked"]
        last = threads[0]["upstream"]["last_error"]
        assert "403" in last and "ACCESS_REFUSED" in last, last
        # The broker's whole reply text, up to the user it names: the
        # part that says what to fix (docs/deploy.md quotes it).
        assert "refused for user 'vmproxyd'" in last, last
        assert threads[0]["upstream"]["refusals"]["403"] >= reconnects
        scrape = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport,
                                        timeout=10).read().decode()
        m = re.search(r'^vmproxy_upstream_refusals_total\{thread="0",code="403"\} (\d+)$',
                      scrape, re.M)
        assert m and int(m.group(1)) >= reconnects, scrape
    finally:
        broker.ctl(*grant)
    # The next reconnect (the backoff is at most 30 s) publishes and is
    # confirmed: the guest hears it.
    guest_until(lambda: len(events) > 1, 90, "connection.unblocked")
    assert events[1:] == [("unblocked",)], events
    rc, out, err = finish(lg, 120)
    assert rc == 0, out + err
    rep = json.loads(out)
    assert rep["confirmed"] == 2 * 50 and rep["errors"] == 0, rep
    guest.close()
    seqs = {(json.loads(b)["vm"], json.loads(b)["seq"])
            for _, _, b in broker.get_all(broker.queue, timeout=30)}
    assert seqs >= {(v, s) for v in range(2) for s in range(1, 51)} | {("pika", 1)}


def test_mandatory_unroutable_comes_back_before_the_ack(build_dir, broker, proxy_factory):
    """A guest's mandatory flag reaches the broker: a message no queue takes
    comes back to the guest as basic.return (code 312, the guest's own
    exchange and routing key, its body) before its confirm, as RabbitMQ
    does; a routable mandatory message is confirmed and delivered; a
    message without the flag is confirmed and dropped as before."""
    admin = broker.connection()
    ach = admin.channel()
    ach.exchange_declare("vm.sparse", "topic", durable=False, auto_delete=False)
    ach.queue_declare("vm.sparse.q", durable=False, auto_delete=False)
    ach.queue_bind("vm.sparse.q", "vm.sparse", "*.bound")
    broker.ctl("set_permissions", "-p", broker.vhost, "vmproxyd", "^$",
               "^vm\\.(metrics|sparse)$", "^$")
    try:
        vms = make_vms(1, base="127.10.43.1")
        proxy = proxy_factory(vms, threads=1, upstream={"exchange": "vm.sparse"}).start()
        with from_source(vms[0]["address"]):
            conn = pika.BlockingConnection(guest_params(proxy))
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError) as exc:
            ch.basic_publish("metrics", "nowhere", b"lost?", mandatory=True)
        (ret,) = exc.value.messages
        assert ret.method.reply_code == 312 and "NO_ROUTE" in ret.method.reply_text
        assert ret.method.exchange == "metrics" and ret.method.routing_key == "nowhere"
        assert ret.body == b"lost?"
        assert ret.properties.headers["x-vm-uuid"] == vms[0]["uuid"]
        ch.basic_publish("metrics", "bound", b"kept", mandatory=True)
        ch.basic_publish("metrics", "nowhere", b"dropped")  # no flag: confirmed, dropped
        conn.close()
        msgs = broker.get_all("vm.sparse.q", timeout=10)
        assert [b for _, _, b in msgs] == [b"kept"]
        threads = proxy.admin("threads")["threads"]
        assert threads[0]["upstream"]["returned"] == 1, threads
    finally:
        broker.ctl("set_permissions", "-p", broker.vhost, "vmproxyd", *vmproxyd_permissions())
        ach.queue_delete("vm.sparse.q")
        ach.exchange_delete("vm.sparse")
        admin.close()


def test_broker_alarm_blocks_the_guests(build_dir, broker, proxy_factory):
    """The broker raises its memory alarm (vm_memory_high_watermark 0): it
    blocks the link at its next publish. A pika guest (it takes
    connection.blocked) is told so in vmproxyd's words, not the broker's,
    once; the link shows broker_blocked; when the alarm clears the guest is
    unblocked, and everything it published, during the alarm included,
    arrives in order."""
    vms = make_vms(1, base="127.10.43.1")
    proxy = proxy_factory(vms, threads=1).start()
    broker.purge(broker.queue)
    guest, gch, events, guest_until = blocked_guest(proxy, vms[0]["address"])

    def publish(seq):
        gch.basic_publish("metrics", "pika", json.dumps({"vm": "pika", "seq": seq}).encode())

    def link_blocked():
        return proxy.admin("threads")["threads"][0]["upstream"]["broker_blocked"]

    publish(1)
    wait_for(lambda: link_totals(proxy)[0]["acked"] >= 1, 30, "the first message confirmed")
    broker.ctl("set_vm_memory_high_watermark", "0")
    try:
        seq = 1
        # The broker blocks a connection when it publishes during the alarm.
        end = time.monotonic() + 30
        while not link_blocked():
            assert time.monotonic() < end, "the link not blocked in 30 s: %r" % events
            seq += 1
            publish(seq)
            guest.process_data_events(time_limit=0.5)
        guest_until(lambda: events, 30, "connection.blocked")
        assert events == [("blocked", "vmproxy: the management broker blocks publishers "
                                      "(resource alarm)")], events
        for _ in range(3):
            seq += 1
            publish(seq)
        guest.process_data_events(time_limit=1)
        assert len(events) == 1, events
    finally:
        broker.ctl("set_vm_memory_high_watermark", "0.4")
    guest_until(lambda: len(events) > 1, 60, "connection.unblocked")
    assert events[1:] == [("unblocked",)], events
    wait_for(lambda: not link_blocked(), 10, "the link unblocked")
    guest.close()
    got = [json.loads(b)["seq"] for _, _, b in broker.get_all(broker.queue, timeout=30)
           if json.loads(b)["vm"] == "pika"]
    assert got == list(range(1, seq + 1)), got
