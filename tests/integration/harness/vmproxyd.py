"""Start and drive a real vmproxyd for integration scenarios.

A VmProxyd writes a JSON configuration (TLS + EXTERNAL upstream to the
harness broker, a TCP listener on loopback, a static identity table that
maps simulated VMs' loopback source addresses to VMs), runs the daemon,
talks to its admin socket, and always stops it.
"""
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
import uuid as uuidlib

from harness.procs import free_port, stop_clean, wait_for

NAMESPACE = uuidlib.UUID("6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60")


def make_vms(n, base="127.10.0.1", prefix="vm"):
    """N simulated VMs with consecutive loopback source addresses from BASE
    (the load generator's --source-base numbering)."""
    first = ipaddress.IPv4Address(base)
    vms = []
    for i in range(n):
        name = "%s-%03d" % (prefix, i)
        vms.append({
            "index": i,
            "name": name,
            "uuid": str(uuidlib.uuid5(NAMESPACE, name)),
            "address": str(first + i),
        })
    return vms


_real_socket = socket.socket


def bound_socket_class(source):
    """A socket.socket subclass that binds IPv4 sockets to SOURCE before
    connecting: how a test poses as a VM's address with clients (pika)
    that have no source-address option."""
    class BoundSocket(_real_socket):
        def connect(self, address):
            if self.family == socket.AF_INET:
                self.bind((source, 0))
            return super().connect(address)

        def connect_ex(self, address):
            if self.family == socket.AF_INET:
                self.bind((source, 0))
            return super().connect_ex(address)
    return BoundSocket


@contextlib.contextmanager
def from_source(source):
    """Within the block, new sockets connect from SOURCE."""
    socket.socket = bound_socket_class(source)
    try:
        yield
    finally:
        socket.socket = _real_socket


class VmProxyd:
    def __init__(self, build_dir, workdir, broker, certs, vms, threads=2, guest=None,
                 limits=None, upstream=None, extra=None, tls=True):
        self.build_dir = build_dir
        self.workdir = str(workdir)
        self.broker = broker
        self.certs = certs
        self.vms = vms
        self.threads = threads
        self.port = free_port()
        self.admin_path = os.path.join(self.workdir, "admin.sock")
        self.config_path = os.path.join(self.workdir, "vmproxyd.json")
        self.log_path = os.path.join(self.workdir, "vmproxyd.log")
        self.proc = None
        self.guest = guest or {}
        self.limits = limits or {}
        self.upstream_extra = upstream or {}
        self.extra = extra or {}
        self.tls = tls

    @property
    def binary(self):
        return os.path.join(str(self.build_dir), "proxy", "vmproxyd")

    @property
    def ctl(self):
        return os.path.join(str(self.build_dir), "proxy", "vmproxyctl")

    def config(self):
        up = {
            "host": "localhost" if self.tls else "127.0.0.1",
            "port": self.broker.tls_port if self.tls else self.broker.port,
            "vhost": self.broker.vhost,
            "exchange": self.broker.exchange,
            "heartbeat": 30,
        }
        if self.tls:
            up["tls"] = {
                "ca": str(self.certs / "ca.pem"),
                "cert": str(self.certs / "proxy.pem"),
                "key": str(self.certs / "proxy-key.pem"),
                "verify_hostname": True,
            }
            up["auth"] = {"mechanism": "EXTERNAL"}
        else:
            up["auth"] = {"mechanism": "PLAIN", "user": "vmproxyd",
                          "password": "vmproxyd-secret"}
        up.update(self.upstream_extra)
        if "hosts" in self.upstream_extra:  # a cluster: no single host/port
            up.pop("host")
            up.pop("port")
        guest = {"allowed_exchanges": ["metrics"], "max_connections_per_vm": 16}
        guest.update(self.guest)
        cfg = {
            "listeners": [{"type": "tcp", "address": "127.0.0.1", "port": self.port}],
            "identity": {
                "static": [{"address": v["address"], "vm": v["name"], "uuid": v["uuid"]}
                           for v in self.vms],
                "unknown_peers": "reject",
            },
            "threads": {"count": self.threads},
            "upstream": up,
            "guest": guest,
            "admin": {"socket": self.admin_path},
            "hostname": "hv-test",
            "drain_timeout_ms": 5000,
            "log_level": "info",
        }
        if self.limits:
            cfg["limits"] = self.limits
        cfg.update(self.extra)
        return cfg

    def write_config(self):
        with open(self.config_path, "w") as f:
            json.dump(self.config(), f, indent=2)

    def start(self, wait_links=True, timeout=30):
        self.write_config()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "--config", self.config_path],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        wait_for(lambda: self._alive() and os.path.exists(self.admin_path), timeout,
                 "vmproxyd admin socket")
        if wait_links:
            self.wait_links(True, timeout)
        return self

    def _alive(self):
        if self.proc.poll() is not None:
            raise AssertionError("vmproxyd exited with %s:\n%s" % (self.proc.returncode,
                                                                   self.log_tail()))
        return True

    def wait_links(self, up=True, timeout=30):
        def check():
            st = self.admin("threads")
            links = [t["upstream"]["up"] for t in st["threads"]]
            return len(links) == self.threads and all(l == up for l in links)
        wait_for(check, timeout, "all upstream links %s" % ("up" if up else "down"), 0.1)

    def admin(self, command, **kw):
        req = dict(command=command, **kw)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.admin_path)
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise RuntimeError("admin %s: %s" % (command, reply.get("error")))
        return reply

    def log_tail(self, n=60):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, timeout=30):
        """SIGTERM: the daemon drains and must exit 0 within TIMEOUT seconds
        with no sanitizer report in its log (else AssertionError; one that
        does not exit is killed). Returns the exit status; a no-op (returning
        the status) when it is not running."""
        if not self.proc:
            return None
        if self.proc.returncode is not None and self.log.closed:
            return self.proc.returncode
        try:
            return stop_clean(self.proc, "vmproxyd", self.log_text, timeout)
        finally:
            self.log.close()

    def kill(self):
        """SIGKILL, for scenarios that crash the daemon on purpose: no drain,
        no exit status or leak check."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
