"""vmproxyd and vmproxy-consumer on a three-node RabbitMQ cluster losing a
node while 20 simulated VMs publish with confirms.

For each fault (SIGKILL and later restart; SIGSTOP and later SIGCONT, a node
cut off without its sockets closing) on the node holding most of the proxy's
links (which is also the consumer's first node):
- every link leaves the lost node and is up on a surviving one; the time
  from the fault to that point is printed (FAILOVER lines);
- every guest stays connected throughout (pika reports no error) and keeps
  getting confirms while the node is gone;
- once the node is back, a reload (SIGHUP) returns every link to its home
  node while the guests keep publishing;
- every sample confirmed to a guest is stored by the consumer exactly once
  (republished duplicates are removed by its deduplication), stamped with
  the publishing VM's identity.

And the other direction, per-VM inboxes as quorum queues on the cluster
(test_inbox_failover_redelivers): the node under the poll thread's link is
lost while deliveries are unacked in a guest; see its docstring.
"""
import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pika
import pytest

from harness import free_port, stop_all, wait_for
from harness.vmproxyd import VmProxyd, make_vms
from test_consumer import Consumer
from test_inbox import CONTROL, InboxGuest, queue_name, queue_stats

HERE = os.path.dirname(os.path.abspath(__file__))
VMS = 20
THREADS = 4  # on consecutive nodes: one of the three holds two links
RATE = 5     # samples per second per VM
HEARTBEAT = 2  # upstream.heartbeat, s


def node_port(link):
    return int(link["node"].rsplit(":", 1)[1])


def links(proxy):
    return [t["upstream"] for t in proxy.admin("threads")["threads"]]


def acked_total(proxy):
    return sum(l["acked"] for l in links(proxy))


def start_guests(proxy, vms):
    guests = []
    for v in vms:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "guest_metrics.py"),
                              "--source", v["address"], "--port", str(proxy.port),
                              "--name", v["name"], "--rate", str(RATE)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=HERE)
        guests.append(p)
    for v, p in zip(vms, guests):
        line = p.stdout.readline()
        assert line.strip() == "ready", (v["name"], line, p.stderr.read())
    return guests


def stop_guests(guests):
    for p in guests:
        p.stdin.write("stop\n")
        p.stdin.flush()
    results = []
    for p in guests:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_node_loss_loses_no_acked_sample(build_dir, cluster, certs, tmp_path, fault):
    base = {"kill": "127.10.50.1", "freeze": "127.10.51.1"}[fault]
    vms = make_vms(VMS, base=base, prefix="cl-" + fault)
    by_name = {v["name"]: v for v in vms}
    seed = cluster.nodes[0]
    metrics_port = free_port()
    proxy = VmProxyd(build_dir, tmp_path, seed, certs, vms, threads=THREADS,
                     upstream={"hosts": cluster.upstream_hosts(), "heartbeat": HEARTBEAT,
                               "connect_timeout_ms": 3000, "stuck_timeout_ms": 15000},
                     extra={"metrics": {"listen": "127.0.0.1:%d" % metrics_port}})
    consumer = Consumer(build_dir, seed, certs, tmp_path, "vm.metrics.cluster-" + fault,
                        hosts=cluster.upstream_hosts())
    guests = []
    victim = None
    try:
        proxy.start(timeout=60)
        consumer.start()
        cluster.wait_members("vm.metrics.cluster-" + fault, len(cluster.nodes))
        home = [node_port(l) for l in links(proxy)]
        per_port = collections.Counter(home)
        assert len(per_port) == len(cluster.nodes), "links not spread: %s" % per_port
        guests = start_guests(proxy, vms)
        wait_for(lambda: acked_total(proxy) >= VMS * RATE * 2, 60, "confirmed traffic")

        port, lost = per_port.most_common(1)[0]
        victim = cluster.node_by_tls_port(port)
        print("fault %s on %s, holding %d of %d links" % (fault, victim.nodename, lost, THREADS))
        log_at_fault = len(proxy.log_text())
        t0 = time.monotonic()
        if fault == "kill":
            victim.kill()
        else:
            victim.freeze()

        def moved():
            ls = links(proxy)
            return all(l["up"] and node_port(l) != port for l in ls)
        wait_for(moved, 60, "every link up on a surviving node", 0.05)
        failover = time.monotonic() - t0
        print("FAILOVER %s: links on surviving nodes %.2f s after the fault" % (fault, failover))
        # docs/scaling.md: a killed node's sockets are reset, so the links
        # notice at once (sooner than a heartbeat could tell); a frozen one
        # is noticed after two heartbeat intervals of silence. Generous
        # bounds: the figures measured are 0.10 s and 4.28 s.
        bound = 2 * HEARTBEAT if fault == "kill" else 2.5 * 2 * HEARTBEAT
        assert failover < bound, (fault, failover, bound)
        # The log says so: a "link up" for each moved link, none on the lost node.
        ups = [l for l in proxy.log_text()[log_at_fault:].splitlines() if ": link up as " in l]
        assert len(ups) >= lost, ups
        assert not [l for l in ups if "localhost:%d:" % port in l], ups
        # What an operator sees: each link's node, and the moved links' reconnects.
        status = subprocess.run([proxy.ctl, "--socket", proxy.admin_path, "status"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert ":%d" % port not in status.stdout, status.stdout
        assert all(("%s:%d" % ("localhost", node_port(l))) in status.stdout
                   for l in links(proxy)), status.stdout
        assert sum(l["connects"] for l in links(proxy)) >= THREADS + lost, links(proxy)
        prom = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port,
                                      timeout=10).read().decode()
        for l in links(proxy):
            assert 'node="%s"' % l["node"] in prom, prom

        # Guests keep getting confirms while the node is gone.
        before = acked_total(proxy)
        wait_for(lambda: acked_total(proxy) >= before + VMS * RATE * 2, 60,
                 "confirms with the node gone")

        if fault == "kill":
            victim.start()
        else:
            victim.thaw()
        cluster.ensure_running()
        # Links stay where they failed over to until a reload sends each one
        # home once its published messages are confirmed: watched for 10 s
        # with the node back (longer than any reconnect backoff in play).
        stay_until = time.monotonic() + 10
        while time.monotonic() < stay_until:
            ls = links(proxy)
            assert all(l["up"] and node_port(l) != port for l in ls), ls
            time.sleep(0.2)
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: [node_port(l) for l in links(proxy)] == home and
                 all(l["up"] for l in links(proxy)), 60, "every link back on its home node")
        before = acked_total(proxy)
        wait_for(lambda: acked_total(proxy) >= before + VMS * RATE * 2, 60,
                 "confirms with the node back")
        results = stop_guests(guests)
        guests = []

        for r in results:
            assert not r["errors"], "%s lost its connection: %s" % (r["name"], r["errors"])
            assert len(r["acked"]) >= RATE * 4, (r["name"], len(r["acked"]))
        # In-flight messages of a lost link are republished, never nacked by
        # the proxy: every nack a guest got is one the broker gave (a quorum
        # queue electing a new leader may nack for a moment), counted by
        # the links as nacked.
        guest_nacks = sum(len(r["nacked"]) for r in results)
        broker_nacks = sum(l["nacked"] for l in links(proxy))
        print("%s: %d samples nacked to guests, %d nacks from the broker"
              % (fault, guest_nacks, broker_nacks))
        assert guest_nacks <= broker_nacks, (guest_nacks, broker_nacks)
        assert "message dropped" not in proxy.log_text()
        want = {(r["name"], r["boot_id"], s) for r in results for s in r["acked"]}
        ours = {r["boot_id"] for r in results}

        def stored():
            got = collections.Counter()
            for l in consumer.lines():
                d = l["doc"]
                if d["host"]["boot_id"] in ours:
                    got[(d["host"]["hostname"], d["host"]["boot_id"], d["seq"])] += 1
            return got
        wait_for(lambda: want <= set(stored()), 120, "every acked sample at the consumer", 0.5)
        got = stored()
        dups = {k: c for k, c in got.items() if c > 1}
        assert not dups, "stored more than once: %s" % sorted(dups)[:5]
        for l in consumer.lines():
            d = l["doc"]
            if d["host"]["boot_id"] in ours:
                v = by_name[d["host"]["hostname"]]
                assert l["vm"]["uuid"] == v["uuid"] and l["vm"]["name"] == v["name"], l["vm"]
        extra = len(got) - len(want)
        print("%s: %d samples acked, all stored once; %d more stored whose confirm the "
              "guest never saw" % (fault, len(want), extra))
        # Both exit 0 on SIGTERM (the consumer after its last batch), the
        # sanitizers silent, leaks included.
        stop_all(consumer.stop, proxy.stop)
    finally:
        # Only after a failure is anything still running: killed, so that
        # the failure shows and not a second one from a troubled shutdown.
        for p in guests:
            p.kill()
            p.wait()
        if consumer.proc and consumer.proc.poll() is None:
            consumer.kill()
        proxy.kill()


def inbox_stats(cluster, vm):
    """(ready, unacked, consumers) of VM's inbox, asked at a live node."""
    return queue_stats(cluster.live(), vm)


def wait_inbox(cluster, vm, want, timeout=60):
    wait_for(lambda: inbox_stats(cluster, vm) == want, timeout,
             "%s at %r (now %r)" % (queue_name(vm), want, inbox_stats(cluster, vm)), 0.2)


def publish(cluster, vm, bodies):
    """To VM's inbox through the control exchange, at a live node, confirmed
    and mandatory (a nack or a return raises; retried once, after a quorum
    queue's leader election, by a caller that waits for the count)."""
    with cluster.connection() as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for b in bodies:
            ch.basic_publish(CONTROL, "%s.x" % vm["uuid"], b.encode(), mandatory=True,
                             properties=pika.BasicProperties(delivery_mode=2))


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_inbox_failover_redelivers(build_dir, cluster, certs, tmp_path, fault):
    """Two VMs on one poll thread consume their inboxes (quorum queues, a
    member on every node) through vmproxyd, each a pika guest process with
    prefetch 5 that holds its deliveries unacked. The node under the
    thread's link is killed (or frozen: its sockets stay open, silent) and
    more messages are published to both inboxes at a surviving node. Once
    the link is up on a surviving node, the guests ack everything they get,
    slowly. Shown: the guests' connections stay up; every message
    published reaches its own VM's guest at least once, the five it held
    coming again with redelivered=true (what was delivered before the
    fault and never acked goes back to the queue, not dropped); nothing
    reaches the other VM; each message is acked exactly once at the broker
    (both inboxes end with nothing ready or unacked, and the broker never
    closed the inbox channel for an unknown delivery tag, as acking an old
    link's tag on the new link, or acking twice, would make it)."""
    base = {"kill": "127.10.52.1", "freeze": "127.10.53.1"}[fault]
    # Inboxes are durable: VMs of their own, per run of the module.
    vms = make_vms(2, base=base, prefix="ib-%s-%s" % (fault, os.urandom(3).hex()))
    proxy = VmProxyd(build_dir, tmp_path, cluster.nodes[0], certs, vms, threads=1,
                     upstream={"hosts": cluster.upstream_hosts(), "heartbeat": HEARTBEAT,
                               "connect_timeout_ms": 3000, "stuck_timeout_ms": 15000},
                     extra={"inbox": {"queue_type": "quorum"}})
    guests = []
    try:
        proxy.start(timeout=60)
        guests = [InboxGuest(proxy, v, prefetch=5) for v in vms]
        for v in vms:
            cluster.wait_members(queue_name(v), len(cluster.nodes))
        sent = {v["name"]: ["%s-%02d" % (v["name"], i) for i in range(15)] for v in vms}
        for v in vms:
            publish(cluster, v, sent[v["name"]])
        for v, g in zip(vms, guests):
            g.wait_deliveries(5)
            wait_inbox(cluster, v, (10, 5, 1))
        held = {v["name"]: [d["body"] for d in g.deliveries] for v, g in zip(vms, guests)}
        for v in vms:
            assert held[v["name"]] == sent[v["name"]][:5], held

        port = node_port(links(proxy)[0])
        victim = cluster.node_by_tls_port(port)
        print("inbox fault %s on %s, under the link with %d deliveries unacked"
              % (fault, victim.nodename, sum(len(h) for h in held.values())))
        t0 = time.monotonic()
        if fault == "kill":
            victim.kill()
        else:
            victim.freeze()
        # Published while the link is moving, at a node that stays.
        later = {v["name"]: ["%s-late-%02d" % (v["name"], i) for i in range(5)] for v in vms}

        todo = [(v, b) for v in vms for b in later[v["name"]]]

        def publish_later():
            # One at a time: one whose confirm was lost to an election is
            # sent again (and may then be in the inbox twice).
            while todo:
                publish(cluster, todo[0][0], [todo[0][1]])
                todo.pop(0)
            return True
        wait_for(publish_later, 60, "messages published with a node gone", 0.5)
        wait_for(lambda: all(l["up"] and node_port(l) != port for l in links(proxy)), 60,
                 "the link up on a surviving node", 0.05)
        print("inbox %s: link on %s %.2f s after the fault"
              % (fault, links(proxy)[0]["node"], time.monotonic() - t0))
        for g in guests:
            g.ack()
        for v, g in zip(vms, guests):
            want = set(sent[v["name"]]) | set(later[v["name"]])
            wait_for(lambda: want <= {d["body"] for d in g.deliveries}, 90,
                     "every message at %s" % v["name"], 0.1)
        for v in vms:
            wait_inbox(cluster, v, (0, 0, 1), timeout=90)
        results = [g.stop() for g in guests]
        for v, g, r in zip(vms, guests, results):
            got = g.deliveries
            bodies = [d["body"] for d in got]
            assert not r["errors"], r
            # Only its own VM's messages, each at least once.
            assert set(bodies) == set(sent[v["name"]]) | set(later[v["name"]]), bodies
            # What it held came again, marked; any message of those
            # published before the fault seen twice is marked the second
            # time.
            again = [d for d in got[5:] if d["body"] in held[v["name"]]]
            assert sorted(d["body"] for d in again) == sorted(held[v["name"]]), got
            assert all(d["redelivered"] for d in again), got
            seen = set()
            for d in got:
                if d["body"] in sent[v["name"]]:
                    assert d["body"] not in seen or d["redelivered"], got
                seen.add(d["body"])
            # The guest acked every tag it got, once.
            assert sorted(r["acked"]) == [d["tag"] for d in got], r
            print("inbox %s: %s got %d deliveries for %d messages, %d redelivered"
                  % (fault, v["name"], len(got), len(set(bodies)),
                     sum(d["redelivered"] for d in got)))
        guests = []
        for v in vms:
            wait_inbox(cluster, v, (0, 0, 0))
        assert "closed the inbox channel" not in proxy.log_text()
        proxy.stop()
    finally:
        for g in guests:
            g.kill()
        proxy.kill()
