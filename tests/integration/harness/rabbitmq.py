"""A private RabbitMQ node on loopback for integration scenarios.

RabbitMQ(workdir, certs).start() boots a node of its own (unique node name,
free ports, data, logs and Erlang cookie under WORKDIR) configured from
deploy/rabbitmq/rabbitmq.conf.in and definitions.json: a plain listener and a
TLS listener that requires a client certificate from the test CA, EXTERNAL
login by certificate CN, vhost "vmproxy" with the vm.metrics exchange and the
vm.metrics.all quorum queue. Faults are injected with signals (kill, freeze,
thaw); stop() always runs at exit.

Command line, for shell scripts (quickstart, benchmarks):
    cd tests/integration && python3 -m harness.rabbitmq --workdir DIR --certs DIR
starts a node, prints one JSON line with its ports, and stops it on SIGINT
or SIGTERM.
"""
import argparse
import atexit
import ipaddress
import itertools
import json
import os
import pathlib
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pika
import pika.credentials
import pika.exceptions

from harness.procs import free_port

TOP = pathlib.Path(__file__).resolve().parents[3]
DEPLOY = TOP / "deploy"
RABBITMQ_LIB = pathlib.Path("/usr/lib/rabbitmq/bin")

# The users of deploy/rabbitmq/definitions.json and their passwords.
PASSWORDS = {
    "admin": "admin-secret",
    "vmproxyd": "vmproxyd-secret",
    "vmproxy-consumer": "consumer-secret",
}
# Which client certificate of gen-certs.sh carries which user's CN.
CERT_OF_USER = {"vmproxyd": "proxy", "vmproxy-consumer": "consumer"}

_counter = itertools.count()
_live = set()
_live_lock = threading.Lock()


def _tail(path, lines=60):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return "(%s: %s)" % (path, e)
    return "\n".join(data.splitlines()[-lines:])


def ensure_certs(certs):
    """Run deploy/gen-certs.sh CERTS unless the directory is complete."""
    certs = pathlib.Path(certs)
    need = ["ca", "server", "proxy", "consumer"]
    if all((certs / (n + ".pem")).exists() and (certs / (n + "-key.pem")).exists()
           for n in need):
        return certs
    subprocess.run(["bash", str(DEPLOY / "gen-certs.sh"), str(certs)], check=True,
                   stdout=subprocess.DEVNULL)
    return certs


class BrokerError(RuntimeError):
    pass


class _Node:
    """One Erlang node: its name, ports, directories and process. The
    RabbitMQ object owns one; a cluster would own several."""

    def __init__(self, workdir, name, host, port=None, tls_port=None, dist_port=None):
        self.workdir = pathlib.Path(workdir)
        self.nodename = "%s@localhost" % name
        self.host = host
        self.port = port or free_port(host)
        self.tls_port = tls_port or free_port(host)
        self.dist_port = dist_port or free_port(host)
        self.home = self.workdir / "home"
        self.mnesia = self.workdir / "mnesia"
        self.logs = self.workdir / "log"
        self.etc = self.workdir / "etc"
        self.certs = self.workdir / "certs"
        self.stdout_path = self.logs / "stdout.log"
        self.proc = None
        self.frozen = False

    @property
    def log_path(self):
        return self.logs / (self.nodename + ".log")

    def log_tail(self, lines=60):
        return "--- %s\n%s\n--- %s\n%s" % (
            self.log_path, _tail(self.log_path, lines),
            self.stdout_path, _tail(self.stdout_path, 20))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


class RabbitMQ:
    """A private single-node RabbitMQ. Attributes: host, port (plain AMQP),
    tls_port (AMQPS, client certificate required), vhost, exchange, queue,
    nodename, workdir, certs (the gen-certs.sh directory). Ports stay the same
    across stop()/start() so clients can reconnect to a restarted node."""

    vhost = "vmproxy"
    exchange = "vm.metrics"
    queue = "vm.metrics.all"
    passwords = PASSWORDS

    def __init__(self, workdir, certs, nofile=None, host="127.0.0.1", port=None,
                 tls_port=None, boot_timeout=60, conf_template=None, definitions=None,
                 name=None, cookie=None, load_definitions=True, extra_conf=""):
        """WORKDIR is created if needed and must be reachable by the rabbitmq
        user (the node runs as rabbitmq when we are root). CERTS is a
        gen-certs.sh directory. NOFILE raises the node's open-files limit
        (clamped to what the system allows). For a cluster member
        (harness.cluster): NAME of the node, the shared Erlang COOKIE,
        LOAD_DEFINITIONS false (the cluster imports them once joined, so the
        quorum queue gets every node as a member) and EXTRA_CONF lines."""
        self.workdir = pathlib.Path(workdir).resolve()
        self.certs = pathlib.Path(certs).resolve()
        self.host = host
        self.nofile = nofile
        self.boot_timeout = boot_timeout
        self.conf_template = pathlib.Path(conf_template or DEPLOY / "rabbitmq" / "rabbitmq.conf.in")
        self.definitions = pathlib.Path(definitions or DEPLOY / "rabbitmq" / "definitions.json")
        name = name or "vmproxy-test-%d-%d" % (os.getpid(), next(_counter))
        self.node = _Node(self.workdir, name, host, port, tls_port)
        self.cookie = cookie
        self.load_definitions = load_definitions
        # wait_ready checks the topology once it exists (at boot, or after a
        # cluster imported the definitions).
        self.topology = load_definitions
        self.extra_conf = extra_conf
        self._as_rabbitmq = os.geteuid() == 0
        self._prepared = False
        with _live_lock:
            _live.add(self)

    # Attributes of the (single) node.
    port = property(lambda self: self.node.port)
    tls_port = property(lambda self: self.node.tls_port)
    nodename = property(lambda self: self.node.nodename)

    def info(self):
        """The facts a client needs, as a JSON-able dict."""
        return {
            "host": self.host, "port": self.port, "tls_port": self.tls_port,
            "vhost": self.vhost, "exchange": self.exchange, "queue": self.queue,
            "nodename": self.nodename, "workdir": str(self.workdir),
            "certs": str(self.certs), "log": str(self.node.log_path),
            "users": dict(PASSWORDS),
        }

    # ---- process control ------------------------------------------------

    def _user_cmd(self, argv, pdeathsig=False):
        """ARGV run as the rabbitmq user when we are root. PDEATHSIG: the
        program gets SIGTERM when we die, so a killed test run leaves no
        node behind (the start script turns SIGTERM into a clean stop)."""
        pre = ["--pdeathsig=TERM"] if pdeathsig else []
        if self._as_rabbitmq:
            pre += ["--reuid=rabbitmq", "--regid=rabbitmq", "--init-groups"]
        if not pre:
            return list(argv)
        return ["setpriv"] + pre + ["--"] + list(argv)

    def _base_env(self):
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.node.home),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.node.etc / "rabbitmq-env.conf"),
        }
        return env

    def _nofile_prefix(self):
        if not self.nofile:
            return []
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = int(self.nofile)
        if subprocess.run(["prlimit", "--nofile=%d:%d" % (want, max(want, hard)), "true"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            print("rabbitmq: node %s: cannot raise open files to %d, using the hard limit %d"
                  % (self.nodename, want, hard), file=sys.stderr)
            want = hard
        return ["prlimit", "--nofile=%d:%d" % (want, max(want, hard)), "--"]

    def _chown(self, path):
        if self._as_rabbitmq:
            pw = pwd.getpwnam("rabbitmq")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _prepare(self):
        """Write the node's files: cookie, config, definitions, certificate
        copies readable by the rabbitmq user."""
        n = self.node
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        for d in (n.home, n.mnesia, n.logs, n.etc, n.certs):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700 if d in (n.home, n.certs) else 0o755)
            self._chown(d)
        self._chown(self.workdir)
        if self._as_rabbitmq:
            probe = subprocess.run(self._user_cmd(["test", "-w", str(n.mnesia)]))
            if probe.returncode != 0:
                raise BrokerError("rabbitmq: %s is not reachable by user rabbitmq "
                                  "(a parent directory is not searchable?)" % n.mnesia)
        cookie = n.home / ".erlang.cookie"
        if self.cookie:
            if cookie.exists():
                os.chmod(cookie, 0o600)
            cookie.write_text(self.cookie)
        elif not cookie.exists():
            cookie.write_text(os.urandom(20).hex().upper())
        os.chmod(cookie, 0o400)
        self._chown(cookie)
        for f in ("ca.pem", "server.pem", "server-key.pem"):
            dst = n.certs / f
            shutil.copyfile(self.certs / f, dst)
            os.chmod(dst, 0o600 if f.endswith("-key.pem") else 0o644)
            self._chown(dst)
        defs = n.etc / "definitions.json"
        shutil.copyfile(self.definitions, defs)
        conf = self.conf_template.read_text()
        for key, val in (("@PORT@", n.port), ("@TLS_PORT@", n.tls_port),
                         ("@CERT_DIR@", n.certs), ("@DEFINITIONS@", defs)):
            conf = conf.replace(key, str(val))
        if not self.load_definitions:
            conf = "\n".join(l for l in conf.splitlines()
                             if not l.startswith("load_definitions"))
        conf += "\n" + self.extra_conf + "\n"
        if "@" in "".join(l.split("#")[0] for l in conf.splitlines()):
            raise BrokerError("rabbitmq: unfilled placeholder in %s" % self.conf_template)
        (n.etc / "rabbitmq.conf").write_text(conf)
        (n.etc / "enabled_plugins").write_text(
            "[rabbitmq_auth_mechanism_ssl,rabbitmq_consistent_hash_exchange].\n")
        (n.etc / "rabbitmq-env.conf").write_text("# empty: the harness sets the environment\n")
        for f in n.etc.iterdir():
            os.chmod(f, 0o644)
            self._chown(f)
        self._prepared = True

    def start(self):
        """Start the node (data kept from an earlier run) and wait until it
        serves AMQP with the definitions loaded. Returns self."""
        n = self.node
        if n.alive():
            if n.frozen:
                self.thaw()
            self.wait_ready()
            return self
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def launch(self):
        """Start the node's process without waiting for it. Call from the
        main thread: the node is tied to the lifetime of the calling thread
        (parent-death signal)."""
        n = self.node
        self._reap()
        if not self._prepared:
            self._prepare()
        env = self._base_env()
        env.update({
            "RABBITMQ_NODENAME": n.nodename,
            "RABBITMQ_DIST_PORT": str(n.dist_port),
            "RABBITMQ_MNESIA_BASE": str(n.mnesia),
            "RABBITMQ_LOG_BASE": str(n.logs),
            "RABBITMQ_CONFIG_FILE": str(n.etc / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(n.etc / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(n.etc / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(n.mnesia / "node.pid"),
        })
        argv = self._nofile_prefix() + self._user_cmd([str(RABBITMQ_LIB / "rabbitmq-server")],
                                                     pdeathsig=True)
        out = open(n.stdout_path, "ab")
        try:
            n.proc = subprocess.Popen(argv, env=env, cwd=str(n.home), stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        finally:
            out.close()
        n.frozen = False

    def wait_ready(self, timeout=None):
        """Wait (bounded) until the plain and TLS ports accept and an admin
        connection sees the queue from definitions.json."""
        n = self.node
        timeout = self.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = "nothing tried"
        while True:
            if not n.alive():
                rc = None if n.proc is None else n.proc.returncode
                raise BrokerError("rabbitmq: node %s exited (status %s) before it was ready\n%s"
                                  % (n.nodename, rc, n.log_tail()))
            try:
                for p in (n.port, n.tls_port):
                    socket.create_connection((self.host, p), timeout=1).close()
                if not self.topology:
                    self.ctl("await_startup", timeout=max(5, deadline - time.monotonic()))
                    return
                with self.connection() as conn:
                    conn.channel().queue_declare(self.queue, passive=True)
                return
            except (OSError, pika.exceptions.AMQPError, BrokerError,
                    subprocess.TimeoutExpired) as e:
                last = "%s: %s" % (type(e).__name__, e)
            if time.monotonic() >= deadline:
                raise BrokerError("rabbitmq: node %s not ready after %ds (last: %s)\n%s"
                                  % (n.nodename, timeout, last, n.log_tail()))
            time.sleep(0.2)

    def _signal(self, sig, group=True):
        n = self.node
        if n.proc is None or n.proc.poll() is not None:
            return False
        try:
            if group:
                os.killpg(n.proc.pid, sig)
            else:
                os.kill(n.proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _reap(self):
        n = self.node
        if n.proc is not None:
            try:
                n.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                n.proc.wait(timeout=30)
            # Children (beam, erl_child_setup) share the process group.
            try:
                os.killpg(n.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        n.proc = None
        n.frozen = False

    def stop(self, timeout=60):
        """Stop the node cleanly (SIGTERM, then SIGKILL after TIMEOUT); data
        is kept for start(). Safe to call when not running."""
        n = self.node
        if n.proc is None:
            return
        if n.frozen:
            self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM, group=False)
        try:
            n.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self._reap()

    def kill(self):
        """SIGKILL the node (no clean shutdown); start() recovers it."""
        n = self.node
        if n.proc is None:
            return
        self._signal(signal.SIGKILL)
        self._reap()

    def freeze(self):
        """SIGSTOP the node: sockets stay open, nothing is answered."""
        if self._signal(signal.SIGSTOP):
            self.node.frozen = True

    def thaw(self):
        """SIGCONT a frozen node."""
        self._signal(signal.SIGCONT)
        self.node.frozen = False

    def ensure_running(self):
        """Make the node usable again whatever a test did to it: thaw it if
        frozen, start it if stopped or killed."""
        n = self.node
        if n.alive():
            if n.frozen:
                self.thaw()
            self.wait_ready()
        else:
            self.start()

    def close(self):
        """Stop the node and forget it (the atexit hook calls this)."""
        self.stop()
        with _live_lock:
            _live.discard(self)

    # ---- administration ---------------------------------------------------

    def ctl(self, *args, timeout=60, tool="rabbitmqctl"):
        """Run rabbitmqctl (or TOOL, e.g. rabbitmq-queues) against this node;
        returns its stdout, raises BrokerError on a non-zero status."""
        env = self._base_env()
        argv = self._user_cmd([str(RABBITMQ_LIB / tool), "-n", self.nodename]
                              + [str(a) for a in args])
        r = subprocess.run(argv, env=env, cwd=str(self.node.home), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise BrokerError("%s %s: status %d\n%s%s"
                              % (tool, " ".join(map(str, args)), r.returncode, r.stdout,
                                 r.stderr))
        return r.stdout

    def connections(self):
        """The node's client connections (rabbitmqctl list_connections): dicts
        with name, user, peer_host, peer_port, client_properties."""
        out = self.ctl("list_connections", "name", "user", "peer_host", "peer_port",
                       "client_properties", "--formatter", "json", "--quiet")
        out = out.strip()
        rows = json.loads(out) if out else []
        for r in rows:
            r["client_properties"] = _props_to_dict(r.get("client_properties"))
            r["peer_host"] = _address(r.get("peer_host"))
        return rows

    def connection(self, user="admin", **kw):
        """A pika BlockingConnection (use as a context manager)."""
        return pika.BlockingConnection(self.pika_params(user=user, **kw))

    def purge(self, queue):
        """Drop every ready message of QUEUE; returns how many."""
        with self.connection() as conn:
            return conn.channel().queue_purge(queue).method.message_count

    def queue_depth(self, queue):
        """Messages ready in QUEUE (passive declare)."""
        with self.connection() as conn:
            return conn.channel().queue_declare(queue, passive=True).method.message_count

    def get_all(self, queue, timeout=30, settle=0.5):
        """Consume and acknowledge everything in QUEUE as admin: returns
        [(method, properties, body)] once the queue is empty and nothing new
        arrived for SETTLE seconds, or when TIMEOUT runs out."""
        msgs = []
        deadline = time.monotonic() + timeout
        with self.connection() as conn:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=500)
            last_tag = None
            for method, props, body in ch.consume(queue, auto_ack=False,
                                                  inactivity_timeout=settle):
                if method is not None:
                    msgs.append((method, props, body))
                    last_tag = method.delivery_tag
                    if len(msgs) % 200 == 0:
                        ch.basic_ack(last_tag, multiple=True)
                        last_tag = None
                else:
                    if last_tag is not None:
                        ch.basic_ack(last_tag, multiple=True)
                        last_tag = None
                    if ch.queue_declare(queue, passive=True).method.message_count == 0:
                        break
                if time.monotonic() >= deadline:
                    break
            if last_tag is not None:
                ch.basic_ack(last_tag, multiple=True)
            ch.cancel()
        return msgs

    def pika_params(self, user="admin", password=None, tls=False, external=False,
                    cert=None, key=None, **kw):
        """pika.ConnectionParameters for this node. TLS (implied by EXTERNAL)
        verifies the server against the test CA and presents CERT/KEY (by
        default the gen-certs.sh certificate whose CN is USER, if any).
        Other keyword arguments go to ConnectionParameters."""
        tls = tls or external
        if external:
            creds = pika.credentials.ExternalCredentials()
        else:
            if password is None:
                password = PASSWORDS.get(user, "")
            creds = pika.PlainCredentials(user, password)
        ssl_options = None
        if tls:
            ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
            if cert is None and user in CERT_OF_USER:
                cert = self.certs / (CERT_OF_USER[user] + ".pem")
                key = self.certs / (CERT_OF_USER[user] + "-key.pem")
            if cert:
                ctx.load_cert_chain(str(cert), str(key) if key else None)
            ssl_options = pika.SSLOptions(ctx, server_hostname=self.host)
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("blocked_connection_timeout", 30)
        return pika.ConnectionParameters(
            host=self.host, port=self.tls_port if tls else self.port,
            virtual_host=kw.pop("virtual_host", self.vhost), credentials=creds,
            ssl_options=ssl_options, **kw)


def _address(addr):
    """rabbitmqctl's JSON gives addresses as lists of integers."""
    if isinstance(addr, list) and len(addr) == 4:
        return str(ipaddress.IPv4Address(bytes(addr)))
    if isinstance(addr, list) and len(addr) == 8:
        return str(ipaddress.IPv6Address(b"".join(x.to_bytes(2, "big") for x in addr)))
    return addr


def _props_to_dict(props):
    """rabbitmqctl's JSON gives client_properties as [[key, type, value], ...]
    (or already as a dict); make it a dict of key -> value."""
    if isinstance(props, dict):
        return props
    out = {}
    for item in props or []:
        if isinstance(item, list) and len(item) == 3:
            k, t, v = item
            out[k] = _props_to_dict(v) if t == "table" else v
        elif isinstance(item, list) and len(item) == 2:
            out[item[0]] = item[1]
    return out


@atexit.register
def _stop_all():
    with _live_lock:
        live = list(_live)
    for b in live:
        try:
            b.close()
        except Exception as e:  # at exit: report, keep stopping the others
            print("rabbitmq: stopping %s: %s" % (b.nodename, e), file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m harness.rabbitmq",
                                 description="Run a private RabbitMQ node for vmproxy until "
                                 "SIGINT/SIGTERM; prints its ports as one JSON line.")
    ap.add_argument("--workdir", required=True, help="node data, logs and config (kept)")
    ap.add_argument("--certs", required=True,
                    help="gen-certs.sh directory (generated if incomplete)")
    ap.add_argument("--nofile", type=int, default=None, help="open-files limit of the node")
    ap.add_argument("--port", type=int, default=None, help="plain AMQP port (default: free)")
    ap.add_argument("--tls-port", type=int, default=None, help="AMQPS port (default: free)")
    args = ap.parse_args(argv)

    ensure_certs(args.certs)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    b = RabbitMQ(args.workdir, args.certs, nofile=args.nofile, port=args.port,
                 tls_port=args.tls_port)
    try:
        b.start()
        print(json.dumps(b.info()), flush=True)
        while not stop.wait(1):
            if not b.node.alive():
                print("rabbitmq: node exited\n%s" % b.node.log_tail(), file=sys.stderr)
                return 1
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
