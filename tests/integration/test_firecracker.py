"""Firecracker's hybrid vsock: a guest's connection to host port P arrives
on "<uds_path>_P" as a plain stream. A process standing in for
Firecracker's host side (firecracker_standin.py) owns uds_path and relays
a pika guest to "<uds_path>_5672", where vmproxyd's firecracker listener
serves it as the configured VM (its uuid taken as is). vmproxyd never
removes a socket something is listening on.
"""
import json
import os
import socket
import stat
import subprocess
import sys

import pika
import pytest

from harness import wait_for
from harness.vmproxyd import VmProxyd

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable if sys.executable.startswith("/usr/bin") else "/usr/bin/python3"
FC_UUID = "0b7c1f3e-5d2a-4c8e-9f61-3a4b5c6d7e8f"


@pytest.fixture
def standin(tmp_path):
    procs = []

    def start(uds_path):
        p = subprocess.Popen([PY, os.path.join(HERE, "firecracker_standin.py"), "--uds-path",
                              str(uds_path)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        assert line.startswith("ready "), line
        return int(line.split()[1])

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def live(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def proxy_with(build_dir, broker, certs, tmp_path, listeners):
    proxy = VmProxyd(build_dir, tmp_path, broker, certs, [], threads=1)
    cfg = proxy.config()
    cfg["listeners"] += listeners
    proxy.config = lambda: cfg
    return proxy


def test_firecracker_guest_publishes_stamped(build_dir, broker, certs, tmp_path, standin):
    jail = tmp_path / "jail" / "root"
    uds = jail / "v.sock"
    guest_port = standin(uds)
    proxy = proxy_with(build_dir, broker, certs, tmp_path, [
        {"type": "firecracker", "uds_path": str(uds), "port": 5672, "vm": "fc-guest-1",
         "uuid": FC_UUID, "mode": "0660"}])
    try:
        proxy.start()
        vsock_path = str(uds) + "_5672"
        st = os.stat(vsock_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert live(uds), "vmproxyd disturbed Firecracker's own uds_path"
        broker.purge(broker.queue)

        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=guest_port, connection_attempts=1, socket_timeout=10))
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(1, 6):
            ch.basic_publish("metrics", "fc", json.dumps({"seq": i}).encode(),
                             pika.BasicProperties(headers={"x-vm-uuid": "spoofed"}))
        conn.close()
        msgs = broker.get_all(broker.queue)
        assert [json.loads(b)["seq"] for _, _, b in msgs] == [1, 2, 3, 4, 5]
        for method, props, _ in msgs:
            assert props.headers["x-vm-uuid"] == FC_UUID, props.headers
            assert props.headers["x-vm-name"] == "fc-guest-1", props.headers
            assert "x-vm-cid" not in props.headers
            assert method.routing_key.startswith(FC_UUID + "."), method.routing_key
        assert proxy.stop() == 0
        assert not os.path.exists(vsock_path)
        assert live(uds), "vmproxyd removed Firecracker's uds_path"
    finally:
        proxy.kill()


def test_live_socket_is_never_replaced(build_dir, broker, certs, tmp_path, standin):
    """A unix listener configured on Firecracker's own uds_path (or on a
    socket another vmproxyd serves) is refused; a dead socket file from an
    earlier run is replaced."""
    uds = tmp_path / "jail2" / "root" / "v.sock"
    standin(uds)
    proxy = proxy_with(build_dir, broker, certs, tmp_path, [
        {"type": "unix", "path": str(uds), "vm": "fc-guest-2", "uuid": FC_UUID}])
    proxy.write_config()
    r = subprocess.run([proxy.binary, "--config", proxy.config_path], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    assert "a process is listening on this socket; not replacing it" in r.stderr + r.stdout
    assert live(uds), "vmproxyd replaced a live socket"

    dead = tmp_path / "dead" / "v.sock_5672"
    dead.parent.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()  # a socket file nobody listens on
    proxy = proxy_with(build_dir, broker, certs, tmp_path, [
        {"type": "firecracker", "uds_path": str(dead)[:-len("_5672")], "vm": "fc-guest-3",
         "uuid": FC_UUID}])
    try:
        proxy.start(wait_links=False)
        assert live(dead)
    finally:
        proxy.stop()


def test_missing_directory_is_created(build_dir, broker, certs, tmp_path):
    path = tmp_path / "run" / "vm" / "x.sock"
    proxy = proxy_with(build_dir, broker, certs, tmp_path, [
        {"type": "unix", "path": str(path), "vm": "x", "uuid": FC_UUID, "mode": "0600"}])
    try:
        proxy.start(wait_links=False)
        assert live(path)
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        proxy.stop()
