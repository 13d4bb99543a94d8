"""A poll thread that stops answering (held with ptrace, as a thread stuck
in a call would be) does not hold up the rest of vmproxyd: admin queries
give up at their timeout with an error, the acceptor keeps accepting while
the balancer samples (its query gives up too), and once the thread runs
again its answers that came too late are dropped safely and everything
works as before."""
import ctypes
import os
import time

import pika
import pytest

from harness import wait_for
from harness.vmproxyd import VmProxyd, from_source, make_vms

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for a thread of another process

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long


def thread_id(pid, name):
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
            if f.read().strip() == name:
                return int(tid)
    raise AssertionError("no thread %s in %d" % (name, pid))


class Held:
    """Stop one thread of another process (only that thread) until exit."""

    def __init__(self, tid):
        self.tid = tid

    def __enter__(self):
        for req in (PTRACE_SEIZE, PTRACE_INTERRUPT):
            if libc.ptrace(req, self.tid, None, None) != 0:
                pytest.skip("ptrace of a thread refused here: %s"
                            % os.strerror(ctypes.get_errno()))
        os.waitpid(self.tid, WALL)
        with open("/proc/%d/status" % self.tid) as f:
            assert any(l.startswith("State:\tt") for l in f), "thread not stopped"
        return self

    def __exit__(self, *exc):
        assert libc.ptrace(PTRACE_DETACH, self.tid, None, None) == 0


@pytest.fixture
def proxy(build_dir, broker, certs, tmp_path):
    vms = make_vms(4, base="127.10.45.1")
    p = VmProxyd(build_dir, tmp_path, broker, certs, vms, threads=2,
                 extra={"balancer": {"enabled": True, "interval_ms": 500}}).start()
    yield p, vms
    p.kill()


def test_held_poll_thread_holds_up_nothing_else(proxy):
    p, vms = proxy
    conns = {}
    for v in vms:
        with from_source(v["address"]):
            conns[v["uuid"]] = pika.BlockingConnection(
                pika.ConnectionParameters(host="127.0.0.1", port=p.port))
    placed = {v["uuid"]: v["thread"] for v in p.admin("vms")["vms"]}
    assert sorted(set(placed.values())) == [0, 1], placed
    free_vm = next(v for v in vms if placed[v["uuid"]] == 0)
    held_vm = next(v for v in vms if placed[v["uuid"]] == 1)

    with Held(thread_id(p.proc.pid, "vmproxy-poll1")):
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="did not answer"):
            p.admin("threads")
        assert time.monotonic() - t0 < 8  # the admin's own timeout, not the hold
        # The balancer samples every 500 ms on the acceptor: its query gives
        # up too, and the acceptor still accepts and delegates to the thread
        # that runs.
        wait_for(lambda: "did not answer within 1000 ms" in p.log_text(), 10,
                 "the balancer's query giving up")
        with from_source(free_vm["address"]):
            c = pika.BlockingConnection(pika.ConnectionParameters(
                host="127.0.0.1", port=p.port, socket_timeout=5,
                blocked_connection_timeout=5))
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("metrics", "while-held", b'{"seq":1}')
        c.close()
    # Back: the late answers were dropped, queries are whole again.
    wait_for(lambda: len(p.admin("threads")["threads"]) == 2, 15, "both threads answer")
    ch = conns[held_vm["uuid"]].channel()
    ch.confirm_delivery()
    ch.basic_publish("metrics", "after", b'{"seq":2}')
    for c in conns.values():
        c.close()
    assert "did not answer within" in p.log_text()
