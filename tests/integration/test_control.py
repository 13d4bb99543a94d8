"""The management side's control messages, end to end: vmproxy-consumer
control publishes {"interval_s": N} to a VM's inbox (confirmed, mandatory);
vmproxy-agent in that VM, consuming its inbox through vmproxyd, changes its
sampling interval at once and acks; anything else it rejects without
requeue. The exit status tells a VM without an inbox apart.
"""
import json
import os
import subprocess
import uuid as uuidlib

import pytest

from harness import wait_for
from harness.vmproxyd import VmProxyd, make_vms

from test_agent import Agent
from test_inbox import guest, queue_stats, wait_stats


def consumer_bin(build_dir):
    return os.path.join(str(build_dir), "mgmt-consumer", "vmproxy-consumer")


def control_config(tmp_path, broker, certs, sink=None):
    cfg = tmp_path / "control.json"
    cfg.write_text(json.dumps({
        "broker": {"host": "localhost", "port": broker.tls_port, "vhost": broker.vhost,
                   "tls": {"ca": str(certs / "ca.pem"), "cert": str(certs / "consumer.pem"),
                           "key": str(certs / "consumer-key.pem")},
                   "auth": {"mechanism": "EXTERNAL"}},
        "sink": sink or {"type": "jsonl", "dir": str(tmp_path / "jsonl")},
    }))
    return cfg


def control(build_dir, cfg, vm, doc):
    r = subprocess.run([consumer_bin(build_dir), "control", "--config", str(cfg), "--timeout",
                        "10", vm, doc], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def samples_of(broker, uuid, into):
    """Take the samples now in vm.metrics.all; keep VM UUID's in INTO."""
    for m, p, b in broker.get_all(broker.queue, timeout=5, settle=0.2):
        if (p.headers or {}).get("x-vm-uuid") == uuid:
            into.append(json.loads(b))
    return into


@pytest.fixture
def control_proxy(build_dir, broker, certs, tmp_path):
    vms = make_vms(2, base="127.10.21.1", prefix="ctl-%s" % uuidlib.uuid4().hex[:8])
    proxy = VmProxyd(build_dir, tmp_path, broker, certs, vms, threads=1).start()
    yield proxy, vms
    proxy.stop()


def test_control_changes_the_agent_rate(build_dir, broker, certs, tmp_path, control_proxy):
    """Agent at 5 s; `control VM {"interval_s": 1}` exits 0 once routed and
    confirmed; the agent applies it and acks (the inbox is empty, nothing
    unacked), and its samples then come 1 s apart and say interval_s 1. A
    malformed control message is confirmed at the broker, rejected by the
    agent without requeue, and logged; the rate stays."""
    proxy, (vm, _) = control_proxy
    cfg = control_config(tmp_path, broker, certs)
    agent = Agent(build_dir, proxy, vm, tmp_path / "spool", interval=5).start()
    try:
        wait_for(lambda: "consuming control messages" in agent.output(), 30,
                 "the agent to consume its inbox")
        wait_stats(broker, vm, (0, 0, 1))
        rc, out = control(build_dir, cfg, vm["uuid"], '{"interval_s": 1}')
        assert rc == 0, out
        assert "confirmed" in out
        wait_for(lambda: "sampling interval set to 1 s" in agent.output(), 20,
                 "the agent to apply the control message")
        wait_stats(broker, vm, (0, 0, 1))  # acked after it applied
        got = []
        wait_for(lambda: len([s for s in samples_of(broker, vm["uuid"], got)
                              if s["interval_s"] == 1]) >= 5, 40,
                 "five samples at the new interval")
        fast = [s for s in got if s["interval_s"] == 1]
        gaps = [b["time_ms"] - a["time_ms"] for a, b in zip(fast, fast[1:])]
        assert all(500 <= g <= 2500 for g in gaps), gaps
        assert any(s["interval_s"] == 5 for s in got), "no sample before the change"

        rc, out = control(build_dir, cfg, vm["uuid"], '{"interval": 9}')
        assert rc == 0, out
        wait_for(lambda: "control message rejected" in agent.output(), 20,
                 "the agent to reject the malformed message")
        wait_stats(broker, vm, (0, 0, 1))  # rejected, not requeued
        assert "sampling interval set to 9" not in agent.output()
    finally:
        agent.stop()


def test_control_exit_codes(build_dir, broker, certs, tmp_path, control_proxy):
    """3: no inbox exists for that VM (mandatory: returned unroutable); 2:
    JSON that is not an object; 5: a VM name that cannot be resolved (a
    JSON Lines sink keeps no VM table); 0 for a VM whose inbox exists
    although nobody consumes it: the message waits there."""
    proxy, (vm, other) = control_proxy
    cfg = control_config(tmp_path, broker, certs)
    rc, out = control(build_dir, cfg, other["uuid"], '{"interval_s": 2}')
    assert rc == 3, out
    assert "no inbox" in out
    rc, out = control(build_dir, cfg, other["uuid"], "[1]")
    assert rc == 2, out
    rc, out = control(build_dir, cfg, other["name"], '{"interval_s": 2}')
    assert rc == 5, out
    conn = guest(proxy, other)
    conn.channel().queue_declare("inbox")
    conn.close()
    rc, out = control(build_dir, cfg, other["uuid"].upper(), '{"interval_s": 2}')
    assert rc == 0, out
    assert queue_stats(broker, other) == (1, 0, 0)
