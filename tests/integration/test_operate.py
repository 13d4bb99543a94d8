"""Operating vmproxyd: a health verdict a probe can use, every known VM
listed, a reload (SIGHUP) that changes settings while guests publish
without disconnecting any of them, and the certificate expiry series.

Guests are simulated VMs on their own 127.x source addresses, mapped in the
static identity table; the broker is the harness's real RabbitMQ over TLS.
"""
import json
import os
import re
import signal
import subprocess
import urllib.request

import pika
import pytest

from harness import free_port, wait_for
from harness.vmproxyd import from_source, make_vms
from test_proxy import finish, guest_params, loadgen




def ctl(proxy, *args):
    return subprocess.run([proxy.ctl, "--socket", proxy.admin_path] + list(args),
                          capture_output=True, text=True, timeout=30)


def test_health_exit_codes_links_up_down_and_draining(broker, proxy_factory):
    """health exits 0 only when every link is up and the daemon is not
    draining; otherwise 1 with one line saying why."""
    vms = make_vms(1, base="127.10.40.1")
    proxy = proxy_factory(vms, threads=2, extra={"drain_timeout_ms": 120000}).start()

    r = ctl(proxy, "health")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("healthy: 2 upstream links up"), r.stdout
    assert len(r.stdout.splitlines()) == 1

    broker.stop()
    try:
        proxy.wait_links(False, 60)
        r = ctl(proxy, "health")
        assert r.returncode == 1, r.stdout
        assert r.stdout.startswith("unhealthy: 2 of 2 upstream links down"), r.stdout
        r = ctl(proxy, "--json", "health")
        assert r.returncode == 1 and json.loads(r.stdout)["ok"] is True
    finally:
        broker.start()
    proxy.wait_links(True, 60)
    assert ctl(proxy, "health").returncode == 0

    # Draining: a message the broker has not confirmed (broker frozen) keeps
    # the daemon in its drain until the broker answers.
    with from_source(vms[0]["address"]):
        conn = pika.BlockingConnection(guest_params(proxy))
    ch = conn.channel()
    broker.freeze()
    try:
        ch.basic_publish("metrics", "held", b'{"vm":0,"conn":0,"seq":1}')
        wait_for(lambda: proxy.admin("status")["daemon"]["held_messages"] == 1, 30,
                 "the message held for its confirm")
        assert ctl(proxy, "drain").returncode == 0
        r = ctl(proxy, "health")
        assert r.returncode == 1, r.stdout
        assert r.stdout.startswith("unhealthy: draining"), r.stdout
    finally:
        broker.thaw()
    assert proxy.proc.wait(timeout=120) == 0


def test_health_without_a_daemon_and_usage_errors(build_dir, tmp_path):
    """No daemon: health is unhealthy (1). An unknown command or a stray
    --all is a usage error (2), as vmproxyctl(8) says."""
    ctlbin = str(build_dir / "proxy" / "vmproxyctl")
    sock = str(tmp_path / "none.sock")
    r = subprocess.run([ctlbin, "--socket", sock, "health"], capture_output=True, text=True)
    assert r.returncode == 1 and "cannot connect" in r.stderr
    r = subprocess.run([ctlbin, "--socket", sock, "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and 'unknown command "frobnicate"' in r.stderr
    r = subprocess.run([ctlbin, "--socket", sock, "--all", "status"], capture_output=True,
                       text=True)
    assert r.returncode == 2


def test_vms_all_lists_known_vms_without_connections(broker, proxy_factory):
    """vms lists VMs with connections; vms --all adds every VM of the static
    table that has none, so a guest whose agent never connects is seen."""
    vms = make_vms(3, base="127.10.41.1")
    proxy = proxy_factory(vms, threads=1).start()
    with from_source(vms[0]["address"]):
        conn = pika.BlockingConnection(guest_params(proxy))
    try:
        wait_for(lambda: len(proxy.admin("vms")["vms"]) == 1, 30, "one VM connected")
        plain = ctl(proxy, "vms")
        assert plain.returncode == 0
        assert vms[0]["name"] in plain.stdout and vms[1]["name"] not in plain.stdout
        every = ctl(proxy, "--json", "vms", "--all")
        assert every.returncode == 0, every.stderr
        rows = {v["name"]: v for v in json.loads(every.stdout)["vms"]}
        assert set(rows) == {v["name"] for v in vms}
        assert rows[vms[0]["name"]]["connections"] == 1
        assert rows[vms[1]["name"]]["connections"] == 0
        assert rows[vms[2]["name"]]["uuid"] == vms[2]["uuid"]
        table = ctl(proxy, "vms", "--all")
        lines = {l.split()[1]: l for l in table.stdout.splitlines()[1:]}
        assert set(lines) == {v["name"] for v in vms}
        assert lines[vms[1]["name"]].split()[3] == "-"
        assert lines[vms[1]["name"]].endswith("no connection")
        assert not lines[vms[0]["name"]].endswith("no connection")
    finally:
        conn.close()


def test_reload_changes_log_level_and_exchanges_without_dropping_guests(
        build_dir, broker, proxy_factory):
    """While guests publish, SIGHUP applies a new log level and a new
    allowed exchange; a change that needs a restart (a listener) is refused
    by name and the running configuration stays. No guest is disconnected:
    the load generator finishes with every message confirmed and no
    error, and a guest connected before the reloads still publishes."""
    vms = make_vms(3, base="127.10.42.1")
    proxy = proxy_factory(vms, threads=2).start()
    broker.purge(broker.queue)
    lg = loadgen(build_dir, proxy, vms[:2], conns=2, count=300, rate=30)
    with from_source(vms[2]["address"]):
        conn = pika.BlockingConnection(guest_params(proxy))
    ch = conn.channel()
    ch.confirm_delivery()
    # "audit" is not allowed yet: the channel is closed with 403.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.basic_publish("audit", "a", b'{"vm":2,"conn":0,"seq":1}')
    assert e.value.reply_code == 403
    wait_for(lambda: sum(t["upstream"]["acked"] for t in proxy.admin("threads")["threads"]) > 50,
             60, "confirmed traffic before the reload")

    proxy.guest["allowed_exchanges"] = ["metrics", "audit"]
    proxy.extra["log_level"] = "debug"
    proxy.write_config()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded (log_level debug" in proxy.log_text(), 30,
             "the reload")
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("audit", "a", b'{"vm":2,"conn":0,"seq":2}')  # confirmed now
    # Debug lines appear: a new connection's acceptance is logged at debug.
    with from_source(vms[2]["address"]):
        pika.BlockingConnection(guest_params(proxy)).close()
    accepted = wait_for(lambda: re.search(r"debug: vm=%s conn=(\d+): accepted"
                                          % vms[2]["name"], proxy.log_text()),
                        30, "a debug line")
    # Every line of that connection names it by the id it was accepted with.
    conn_id = accepted.group(1)
    wait_for(lambda: "vm=%s conn=%s: closed" % (vms[2]["name"], conn_id) in proxy.log_text(),
             30, "its close logged")
    log = proxy.log_text()
    assert "vm=%s conn=%s: AMQP connection open" % (vms[2]["name"], conn_id) in log, log

    # A new listener port needs a restart: refused, named, nothing changes.
    old_port = proxy.port
    proxy.port = free_port()
    proxy.write_config()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "listeners changed, which takes a restart" in proxy.log_text(), 30,
             "the refused reload")
    proxy.port = old_port
    with from_source(vms[2]["address"]):
        pika.BlockingConnection(guest_params(proxy)).close()  # the old port still serves

    rc, out, err = finish(lg, 180)
    assert rc == 0, out + err
    rep = json.loads(out)
    assert rep["errors"] == 0 and rep["confirmed"] == 2 * 2 * 300, rep
    ch.basic_publish("metrics", "after", b'{"vm":2,"conn":0,"seq":3}')
    assert conn.is_open
    conn.close()
    assert proxy.admin("status")["daemon"]["accepted"] >= 2 * 2 + 3


def test_certificate_expiry_series(broker, certs, proxy_factory):
    """The metrics endpoint gives the seconds until the client certificate
    and the CA expire (gen-certs.sh issues them for 825 days)."""
    port = free_port()
    proxy = proxy_factory(make_vms(1, base="127.10.43.1"), threads=1,
                          extra={"metrics": {"listen": "127.0.0.1:%d" % port}}).start()
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read().decode()
    series = dict(re.findall(r'^vmproxy_tls_certificate_expiry_seconds\{file="([^"]+)"\} (\S+)$',
                             text, re.M))
    assert set(series) == {str(certs / "ca.pem"), str(certs / "proxy.pem")}, text[-2000:]
    for f, v in series.items():
        assert 800 * 86400 < float(v) <= 826 * 86400, (f, v)


def test_reload_adds_static_identities_and_refuses_other_identity_changes(broker,
                                                                          proxy_factory):
    """A VM appended to identity.static is accepted after SIGHUP without a
    restart (a guest connected before stays); changing an existing entry,
    or guest.max_message_bytes, is refused by name and nothing changes."""
    vms = make_vms(3, base="127.10.44.1")
    proxy = proxy_factory(vms[:2], threads=1).start()
    with from_source(vms[0]["address"]):
        first = pika.BlockingConnection(guest_params(proxy))
    with from_source(vms[2]["address"]):
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(guest_params(proxy))

    proxy.vms = vms
    proxy.write_config()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "1 identity.static entries added" in proxy.log_text(), 30, "the addition")
    with from_source(vms[2]["address"]):
        third = pika.BlockingConnection(guest_params(proxy))
    wait_for(lambda: vms[2]["name"] in {v["name"] for v in proxy.admin("vms")["vms"]}, 30,
             "the added VM's connection")

    renamed = [dict(v) for v in vms]
    renamed[1]["name"] = "renamed"
    proxy.vms = renamed
    proxy.write_config()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "identity.static[1] changed, which takes a restart" in proxy.log_text(),
             30, "the refused change")
    proxy.vms = vms
    proxy.guest["max_message_bytes"] = 65536
    proxy.write_config()
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "guest.max_message_bytes changed, which takes a restart"
             in proxy.log_text(), 30, "the refused bound")
    # A file that does not load: the error is logged, nothing changes.
    with open(proxy.config_path, "w") as f:
        f.write('{"listeners": [')
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: re.search(r"SIGHUP: .*vmproxyd.json: .*line \d+ column \d+: .*; the running "
                               r"configuration stays", proxy.log_text()), 30, "the refused file")
    known = {v["name"] for v in json.loads(ctl(proxy, "--json", "vms", "--all").stdout)["vms"]}
    assert known == {v["name"] for v in vms}
    first.process_data_events(time_limit=0.5)
    third.process_data_events(time_limit=0.5)
    assert first.is_open and third.is_open
    first.close()
    third.close()


def test_threads_count_zero_is_one_per_cpu_of_the_affinity_mask(broker, proxy_factory):
    """threads.count 0 (the default, docs/configuration.md) starts one poll
    thread per CPU of the process's affinity mask, each pinned to its CPU in
    order: the whole mask, then a daemon started with one CPU in its mask."""
    mask = sorted(os.sched_getaffinity(0))
    for allowed in (mask, mask[-1:]):
        vms = make_vms(1, base="127.10.44.1")
        proxy = proxy_factory(vms, threads=0)
        os.sched_setaffinity(0, allowed)  # inherited by the daemon
        try:
            proxy.start(wait_links=False)
        finally:
            os.sched_setaffinity(0, mask)
        proxy.threads = len(allowed)
        proxy.wait_links()
        assert [t["cpu"] for t in proxy.admin("threads")["threads"]] == allowed
        assert proxy.stop() == 0
