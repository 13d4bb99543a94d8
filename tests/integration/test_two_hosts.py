"""Two hypervisor hosts on one machine: two vmproxyd (host names hv-a and
hv-b, each with its own listener and its own private libvirtd and node) in
front of one broker and one consumer. A VM "migrates" between them: its
domain starts on the destination's node and stops on the source's (each
libvirtd restarted with its node rewritten: the test driver cannot migrate,
and its state is private to each client connection). Its agent publishes
throughout; its network path follows the VM (a relay standing for the
guest's vsock channel to "the host", CID 2, which reaches whichever host
runs it). The consumer must hold every sample of the agent's boot once, in
sequence, the host switching once per move.
"""
import os
import select
import socket
import subprocess
import threading

import pytest

from harness import stop_all, wait_for
from harness import libvirtd as lvd
from harness.vmproxyd import VmProxyd
from test_agent import agent_bin
from test_consumer import Consumer

pytestmark = pytest.mark.skipif(lvd.available() is not None,
                                reason=str(lvd.available()))

VM = {"name": "mover", "uuid": "7e57a11e-0000-4000-8000-000000000003",
      "cid": 103, "mac": "52:54:00:77:00:03"}
MOVES = 5


class Relay(threading.Thread):
    """The guest's way to its host: accepts the agent's connections and
    carries each to the vmproxyd of the host the VM runs on now, from the
    VM's leased address (how that host identifies it). Switching hosts
    leaves open connections alone: the old host closes them."""

    def __init__(self, source):
        super().__init__(daemon=True)
        self.source = source
        self.target = None
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.halt = threading.Event()
        self.connections = 0

    def run(self):
        while not self.halt.is_set():
            r, _, _ = select.select([self.lsock], [], [], 0.2)
            if not r:
                continue
            c, _ = self.lsock.accept()
            threading.Thread(target=self.pump, args=(c, self.target), daemon=True).start()

    def pump(self, c, port):
        up = socket.socket()
        try:
            up.bind((self.source, 0))
            up.connect(("127.0.0.1", port))
        except OSError:
            c.close()
            up.close()
            return
        self.connections += 1
        socks = [c, up]
        try:
            while not self.halt.is_set():
                r, _, _ = select.select(socks, [], [], 0.2)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (up if s is c else c).sendall(data)
        except OSError:
            return
        finally:
            c.close()
            up.close()

    def stop(self):
        self.halt.set()
        self.join(10)
        self.lsock.close()


class Host:
    def __init__(self, name, build_dir, tmp, broker, certs):
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir()
        self.node = self.dir / "node.xml"
        lvd.write_node(str(self.node), [])
        self.lv = lvd.Libvirtd(self.dir / "lv", self.node).start()
        self.proxy = VmProxyd(build_dir, self.dir, broker, certs, [], threads=2, extra={
            "hostname": name,
            "identity": {"libvirt_uri": self.lv.uri, "static": [], "unknown_peers": "reject"}})

    def libvirt(self):
        return self.proxy.admin("status")["daemon"]["libvirt"]

    def set_running(self, running):
        """The VM's domain runs here from now on, or no longer: libvirtd
        restarted with the node rewritten; vmproxyd reconnects by itself."""
        before = self.libvirt()["reconnects"]
        lvd.write_node(str(self.node), [VM] if running else [])
        self.lv.stop()
        self.lv.start()
        wait_for(lambda: self.libvirt()["reconnects"] > before, 30,
                 "%s's vmproxyd to reconnect to libvirt" % self.name)


def test_vm_moves_between_hosts_five_times(build_dir, broker, certs, tmp_path):
    a = Host("hv-a", build_dir, tmp_path, broker, certs)
    b = Host("hv-b", build_dir, tmp_path, broker, certs)
    consumer = relay = agent = None
    try:
        a.proxy.start()
        b.proxy.start()
        a.set_running(True)
        lease = lvd.lease_of(a.lv, VM["name"])
        consumer = Consumer(build_dir, broker, certs, tmp_path, "vm.metrics.two-hosts").start()
        relay = Relay(lease)
        relay.target = a.proxy.port
        relay.start()
        spool = tmp_path / "spool"
        log = open(str(tmp_path / "agent.log"), "ab")
        agent = subprocess.Popen(
            [agent_bin(build_dir), "--endpoint", "tcp://127.0.0.1:%d" % relay.port,
             "--interval", "1", "--spool-dir", str(spool), "--timeout", "3",
             "--routing-key", "metrics.t"], stdout=log, stderr=log)

        def mine():
            return [l for l in consumer.lines() if l["vm"]["uuid"] == VM["uuid"]]

        def through(host, n):
            """N more samples stored via HOST than so far."""
            have = sum(1 for l in mine() if l["vm"]["proxy_host"] == host.name)
            wait_for(lambda: sum(1 for l in mine() if l["vm"]["proxy_host"] == host.name)
                     >= have + n, 60, "%d samples through %s" % (n, host.name))

        through(a, 3)
        src, dst = a, b
        for _ in range(MOVES):
            # The destination runs the VM first, then its path moves, then
            # the source stops it (which closes its guests there with 320).
            dst.set_running(True)
            assert lvd.lease_of(dst.lv, VM["name"]) == lease
            relay.target = dst.proxy.port
            src.set_running(False)
            through(dst, 3)
            src, dst = dst, src

        agent.terminate()
        agent.wait(30)
        assert agent.returncode == 0, agent.returncode
        agent = None
        lines = mine()
        boots = {l["doc"]["host"]["boot_id"] for l in lines}
        assert len(boots) == 1, boots
        seqs = [l["doc"]["seq"] for l in lines]
        # Every sample once, in sequence (in storage order).
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert seqs[0] == 1
        hosts = [l["vm"]["proxy_host"] for l in sorted(lines, key=lambda l: l["doc"]["seq"])]
        runs = [h for i, h in enumerate(hosts) if i == 0 or hosts[i - 1] != h]
        assert runs == ["hv-a", "hv-b"] * ((MOVES + 1) // 2) + ["hv-a"] * ((MOVES + 1) % 2), runs
        assert {l["vm"]["name"] for l in lines} == {VM["name"]}
    finally:
        if agent:
            agent.kill()
            agent.wait()
        if relay:
            relay.stop()
        stops = [h.proxy.stop for h in (a, b)] + ([consumer.stop] if consumer else [])
        try:
            stop_all(*stops)
        finally:
            a.lv.stop()
            b.lv.stop()
