"""Balancing and live migration of VMs between poll threads under load,
the admin CLI, and the Prometheus endpoint of vmproxyd.

During every move the guests publish continuously with confirms: each
message must arrive exactly once and in order per connection (checked by
sequence numbers), and the load generator fails on a duplicate or unknown
ack."""
import collections
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pika

from harness import free_port, wait_for
from harness.vmproxyd import from_source, make_vms
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_proxy import check_arrivals, finish, loadgen


def ctl(proxy, *args):
    r = subprocess.run([proxy.ctl, "--socket", proxy.admin_path] + list(args),
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def thread_of(proxy):
    return {v["name"]: v["thread"] for v in proxy.admin("vms")["vms"]}


def test_vmproxyctl_migrate_under_load(build_dir, broker, proxy_factory):
    vms = make_vms(4, base="127.10.7.1")
    proxy = proxy_factory(vms, threads=2, extra={"balancer": {"enabled": False,
                                                              "interval_ms": 1000}}).start()
    broker.purge(broker.queue)
    lg = loadgen(build_dir, proxy, vms, conns=2, count=1500, rate=100, window=32)
    wait_for(lambda: len(proxy.admin("vms")["vms"]) == 4, 30, "4 VMs connected")
    # The sampler turns counters into per-thread rates for the operator:
    # 8 connections at 100 msgs/s each.
    wait_for(lambda: 600 < sum(l["messages_in_per_s"] for l in
                               proxy.admin("status")["daemon"]["load"]) < 1000, 15,
             "sampled load near 800 msgs/s")
    rc, out, err = ctl(proxy, "status")
    assert rc == 0 and "MSGS_IN/S" in out, out + err
    moves = 0
    for round_ in range(3):
        placement = thread_of(proxy)
        for v in vms[:2]:
            to = 1 - placement[v["name"]]
            rc, out, err = ctl(proxy, "migrate", v["name"], str(to))
            assert rc == 0, out + err
            assert "moved from thread" in out, out
            moves += 1
        after = thread_of(proxy)
        assert all(after[v["name"]] != placement[v["name"]] for v in vms[:2]), (placement, after)
    rc, out, err = finish(lg, 180)
    assert rc == 0, out + err
    rep = json.loads(out)
    assert rep["confirmed"] == 4 * 2 * 1500 and rep["bad_acks"] == 0, rep
    threads = proxy.admin("threads")["threads"]
    assert sum(t["migrations_out"] for t in threads) == moves
    assert sum(t["migrations_in"] for t in threads) == moves
    msgs = broker.get_all(broker.queue, timeout=60)
    check_arrivals(msgs, {v["index"]: v for v in vms},
                   {(v["index"], c): 1500 for v in vms for c in range(2)})


def test_migrate_errors(broker, proxy_factory):
    vms = make_vms(1, base="127.10.8.1")
    proxy = proxy_factory(vms, threads=2, extra={"balancer": {"enabled": False}}).start()
    rc, out, err = ctl(proxy, "migrate", "no-such-vm", "1")
    assert rc == 1 and "no VM \"no-such-vm\"" in err
    rc, out, err = ctl(proxy, "migrate", "x", "one")
    assert rc == 2 and "thread must be a number" in err
    rc, out, err = ctl(proxy, "frobnicate")  # a usage error, as vmproxyctl(8) says
    assert rc == 2 and "unknown command" in err


def test_balancer_spreads_packed_load(build_dir, broker, proxy_factory):
    """The balancer is on by default (`vmproxyctl balancer` says so) and
    `balancer off` switches it off at run time: six busy VMs packed onto
    thread 0 stay there for three times balancer.hold_ms after the sampled
    load shows the imbalance. Once switched on again it moves whole VMs
    until the busiest thread is within the ratio of the idlest, while every
    message still arrives exactly once."""
    vms = make_vms(6, base="127.10.9.1")
    count = 4000
    proxy = proxy_factory(vms, threads=2, extra={"balancer": {
        "interval_ms": 1000, "hold_ms": 2000, "ratio": 1.5,
        "min_load": 20, "migrate_timeout_ms": 5000}}).start()
    rc, out, err = ctl(proxy, "balancer")
    assert (rc, out) == (0, "balancer on\n"), out + err
    rc, out, err = ctl(proxy, "balancer", "off")
    assert (rc, out) == (0, "balancer off\n"), out + err
    rc, out, err = ctl(proxy, "balancer")
    assert (rc, out) == (0, "balancer off\n"), out + err
    rc, out, err = ctl(proxy, "--json", "balancer")
    assert rc == 0 and json.loads(out)["daemon"]["balancer_enabled"] is False, out + err
    rc, out, err = ctl(proxy, "balancer", "maybe")
    assert rc == 2 and "balancer takes on or off" in err, out + err
    assert "balancer disabled by the operator" in proxy.log_text()
    broker.purge(broker.queue)
    lg = loadgen(build_dir, proxy, vms, conns=1, count=count, rate=100, window=32)
    wait_for(lambda: len(proxy.admin("vms")["vms"]) == 6, 30, "6 VMs connected")
    for name, t in thread_of(proxy).items():
        if t != 0:
            rc, out, err = ctl(proxy, "migrate", name, "0")
            assert rc == 0, out + err
    assert set(thread_of(proxy).values()) == {0}

    def imbalance():
        load = {l["thread"]: l["messages_in_per_s"]
                for l in proxy.admin("status")["daemon"]["load"]}
        return load.get(0, 0) > 400 and load.get(1, 1) < 20 and load
    wait_for(imbalance, 15, "the sampled load of the packed thread 0", interval=0.2)
    # What would make the balancer move for hold_ms holds for 3 x hold_ms.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert set(thread_of(proxy).values()) == {0}, "a VM moved with the balancer off"
        time.sleep(0.5)  # sampling a state that must not change, not waiting for one
    assert "balancer: thread" not in proxy.log_text()
    assert lg.poll() is None, "the load ended before the balancer was switched on"
    rc, out, err = ctl(proxy, "balancer", "on")
    assert (rc, out) == (0, "balancer on\n"), out + err

    def spread():
        per = collections.Counter(thread_of(proxy).values())
        # Equal rates per VM: within 1.5 means 3/3 (4/2 is 2.0).
        return per[0] == 3 and per[1] == 3
    wait_for(spread, 60, "the balancer to spread the VMs 3/3", interval=0.5)
    rc, out, err = finish(lg, 180)
    assert rc == 0, out + err
    rep = json.loads(out)
    assert rep["confirmed"] == 6 * count and rep["bad_acks"] == 0, rep
    assert "balancer: thread 0" in proxy.log_text()
    msgs = broker.get_all(broker.queue, timeout=60)
    check_arrivals(msgs, {v["index"]: v for v in vms},
                   {(v["index"], 0): count for v in vms})


def test_metrics_endpoint_passes_promtool(build_dir, broker, proxy_factory, tmp_path):
    """/metrics is valid exposition text (promtool), with per-thread,
    per-link and, with metrics.per_vm, per-VM series for connected VMs."""
    vms = make_vms(3, base="127.10.10.1")
    port = free_port()
    proxy = proxy_factory(vms, threads=2, extra={
        "metrics": {"listen": "127.0.0.1:%d" % port, "per_vm": True}}).start()
    conns = []
    for v in vms:
        with from_source(v["address"]):
            c = pika.BlockingConnection(pika.ConnectionParameters(
                host="127.0.0.1", port=proxy.port, connection_attempts=1))
        ch = c.channel()
        ch.confirm_delivery()
        for i in range(50):
            ch.basic_publish("metrics", "m", b'{"i":%d}' % i)
        conns.append(c)
    resp = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10)
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = resp.read().decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'vmproxy_upstream_up{thread="0",node="localhost:%d"} 1' % broker.tls_port in text
    total_in = sum(float(l.split()[-1]) for l in text.splitlines()
                   if l.startswith("vmproxy_thread_messages_in_total{"))
    assert total_in == 150
    per_vm = [l for l in text.splitlines() if l.startswith("vmproxy_vm_messages_in_total{")]
    assert len(per_vm) == 3 and all(l.endswith(" 50") for l in per_vm), per_vm
    assert all('vm_name="%s"' % v["name"] in text for v in vms)
    for c in conns:
        c.close()
    try:
        urllib.request.urlopen("http://127.0.0.1:%d/other" % port, timeout=10)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def documented_series(path):
    """{series: (type, {label names})} from the table of docs/admin.md:
    every `name` of the first column (a `_suffix` continues the previous
    name's prefix), its type, and the label names of the third column."""
    series = {}
    in_table = False
    for line in open(path):
        if line.startswith("| series | type | labels |"):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.startswith("|"):
            break
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cols[0]) <= set("-"):
            continue
        names = re.findall(r"`([a-z_]+)`", cols[0])
        # "`reason` = `unknown_peer`, `limit`": values follow the "=".
        labels = set(re.findall(r"`([a-z_]+)`", cols[2].split("=")[0]))
        full = None
        for n in names:
            if n.startswith("_"):
                n = full.rsplit("_", 2)[0] + n if full.endswith("_total") else full + n
            full = n
            series[n] = (cols[1], labels)
    return series


# Series whose label values are only known once an event happened (a
# broker refusal's reply code): no sample before it. Where their labels are
# checked on a real event.
EVENT_LABELLED = {
    "vmproxy_upstream_refusals_total": "test_link.py::test_refused_publishing_backs_off_and_recovers",
}


def test_metrics_series_are_the_documented_ones(build_dir, broker, proxy_factory):
    """Every series docs/admin.md lists is exposed with the type and the
    label names it gives (per-VM ones with metrics.per_vm and a VM
    connected), and nothing undocumented is."""
    docs = documented_series(os.path.join(TOP, "docs", "admin.md"))
    assert len(docs) >= 30, docs
    vms = make_vms(1, base="127.10.10.9")
    port = free_port()
    proxy = proxy_factory(vms, threads=2, extra={
        "metrics": {"listen": "127.0.0.1:%d" % port, "per_vm": True}}).start()
    with from_source(vms[0]["address"]):
        c = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=proxy.port, connection_attempts=1))
    c.channel().basic_publish("metrics", "m", b"{}")
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    labels = collections.defaultdict(set)
    for name, lab in re.findall(r"^([a-z_]+)(?:\{([^}]*)\})? \S+$", text, re.M):
        labels[name] |= set(re.findall(r"([a-z_]+)=", lab))
    missing = sorted(set(docs) - set(types))
    assert not missing, "documented, not exposed: %s" % missing
    undocumented = sorted(set(types) - set(docs))
    assert not undocumented, "exposed, not documented: %s" % undocumented
    for name, (typ, labs) in docs.items():
        assert types[name] == typ, (name, types[name], typ)
        if name in EVENT_LABELLED and name not in labels:
            continue  # no sample until its event; its labels: EVENT_LABELLED[name]
        assert labels[name] == labs, (name, sorted(labels[name]), sorted(labs))
    c.close()


ADMIN_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b'{"command": "status"}\n')
data = b""
while not data.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
"""


def test_admin_socket_checks_peer_credentials(build_dir, broker, proxy_factory, tmp_path):
    """docs/admin.md: peers are checked with SO_PEERCRED, whatever the
    socket file's mode lets through. With the socket opened to everyone,
    user nobody is refused; once admin.group is nobody's group, it is
    answered."""
    import grp
    import pwd
    import tempfile
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    sockdir = tempfile.mkdtemp(prefix="vmproxy-admin-")
    os.chmod(sockdir, 0o755)

    def ask_as_nobody(path):
        os.chmod(path, 0o666)  # only the credentials check stands in the way
        r = subprocess.run(["setpriv", "--reuid=%d" % nobody.pw_uid,
                            "--regid=%d" % nobody.pw_gid, "--clear-groups",
                            "/usr/bin/python3", "-c", ADMIN_CLIENT, path],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    vms = make_vms(1, base="127.10.10.20")
    try:
        proxy = proxy_factory(vms, threads=1)
        proxy.admin_path = os.path.join(sockdir, "refuse.sock")
        proxy.start()
        reply = ask_as_nobody(proxy.admin_path)
        assert reply == {"ok": False, "error": "permission denied: root, the daemon's user "
                         "or the admin group only"}, reply
        assert proxy.admin("status")["ok"]  # root still is
        proxy.stop()

        proxy = proxy_factory(vms, threads=1)
        proxy.admin_path = os.path.join(sockdir, "group.sock")
        proxy.extra = {"admin": {"socket": proxy.admin_path, "group": group}}
        proxy.start()
        reply = ask_as_nobody(proxy.admin_path)
        assert reply["ok"] is True and reply["daemon"]["threads"] == 1, reply
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
