"""vmproxyd's acceptor under descriptor exhaustion: with the descriptor
limit lowered (prlimit) while guests wait in the listen backlog, the
acceptor neither spins nor floods the log, and accepts them once
descriptors are available again.
"""
import os
import resource
import socket
import subprocess
import time

import pika

from harness import wait_for
from harness.vmproxyd import from_source, make_vms




def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_emfile_pauses_the_listener_and_recovers(broker, proxy_factory):
    vms = make_vms(1, base="127.10.20.1")
    proxy = proxy_factory(vms, threads=1).start()
    pid = proxy.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    fds = [int(n) for n in os.listdir("/proc/%d/fd" % pid)]
    # No descriptor left: the lowest free number is at or above the limit.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(fds) + 1, hard))
    waiting = []
    holes = max(fds) + 1 - len(fds)  # free numbers below the limit get used first
    try:
        for _ in range(holes + 3):
            s = socket.socket()
            s.bind((vms[0]["address"], 0))
            s.connect(("127.0.0.1", proxy.port))  # completes in the backlog
            waiting.append(s)
        wait_for(lambda: "Too many open files" in proxy.log_text(), 10,
                 "the acceptor to hit EMFILE")
        cpu0 = cpu_seconds(pid)
        time.sleep(5)  # the measurement window itself: nothing to wait for
        used = cpu_seconds(pid) - cpu0
        lines = [l for l in proxy.log_text().splitlines() if "accept: Too many open files" in l]
        print("CPU time over 5 s with the listener out of descriptors: %.2f s; "
              "%d log lines" % (used, len(lines)))
        assert used < 1.0, "the acceptor spins: %.2f s of CPU in 5 s" % used
        assert len(lines) <= 2, lines[:5]
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))

    # Descriptors free again: the waiting guests are accepted (and dropped
    # when they close), and a new guest publishes with confirms.
    wait_for(lambda: proxy.admin("status")["daemon"]["accepted"] >= len(waiting), 15,
             "the waiting connections to be accepted")
    for s in waiting:
        s.close()
    listeners = proxy.admin("status")["daemon"]["listeners"]
    assert listeners[0]["accept_errors"] >= 1, listeners
    with from_source(vms[0]["address"]):
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=proxy.port, connection_attempts=1, socket_timeout=10))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("metrics", "after-emfile", b'{"ok": true}')
    conn.close()
    assert proxy.proc.poll() is None


def test_unknown_peer_in_a_connect_loop(broker, proxy_factory):
    """200 connects from an address no VM has: each refused and counted,
    but the log gets at most a line a second, saying how many it left out;
    a known VM is served meanwhile."""
    vms = make_vms(1, base="127.10.21.1")
    proxy = proxy_factory(vms, threads=1).start()
    t0 = time.monotonic()
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.99.0.7", 0))
        s.connect(("127.0.0.1", proxy.port))
        s.recv(1)  # closed by the proxy
        s.close()
    elapsed = time.monotonic() - t0
    wait_for(lambda: proxy.admin("status")["daemon"]["refused_unknown_peer"] == 200, 10,
             "200 refusals counted")
    with from_source(vms[0]["address"]):
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=proxy.port, connection_attempts=1, socket_timeout=10))
    conn.close()
    lines = [l for l in proxy.log_text().splitlines()
             if "refused connection from 127.99.0.7" in l]
    print("200 refused connects in %.1f s: %d log lines" % (elapsed, len(lines)))
    assert 1 <= len(lines) <= elapsed + 2, lines
