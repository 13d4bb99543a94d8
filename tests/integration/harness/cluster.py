"""A three-node RabbitMQ cluster on loopback for integration scenarios.

RabbitMQCluster(workdir, certs).start() boots SIZE private nodes (each a
harness.rabbitmq.RabbitMQ: its own node name, ports, data and logs, TLS with
client-certificate verification on every node) sharing one Erlang cookie,
joins them to the first with `rabbitmqctl join_cluster`, and only then
imports deploy/rabbitmq/definitions.json, so the vm.metrics.all quorum queue
(and any quorum queue declared later) has every node as a member.

Faults are injected per node: cluster.nodes[i].kill() / .start() /
.freeze() / .thaw(). The cluster is always stopped at exit.

Command line, for shell scripts:
    cd tests/integration && python3 -m harness.cluster --workdir DIR --certs DIR
starts a cluster, prints one JSON line describing its nodes, and stops it on
SIGINT or SIGTERM.
"""
import argparse
import json
import os
import pathlib
import shutil
import signal
import sys
import threading

from harness.rabbitmq import DEPLOY, PASSWORDS, BrokerError, RabbitMQ, ensure_certs

# The shipped rabbitmq.conf.in sets cluster_partition_handling =
# pause_minority: a minority that loses sight of the majority stops serving
# until it sees it again; with quorum queues and three nodes, the two that
# still see each other carry on. The network tick is shortened so that a
# node frozen by a test is declared down in seconds.
CLUSTER_CONF = """
net_ticktime = 10
"""


class RabbitMQCluster:
    """SIZE clustered nodes. Attributes: nodes (RabbitMQ objects, each with
    host, port, tls_port, nodename), vhost, exchange, queue, certs."""

    vhost = RabbitMQ.vhost
    exchange = RabbitMQ.exchange
    queue = RabbitMQ.queue
    passwords = PASSWORDS

    def __init__(self, workdir, certs, size=3, host="127.0.0.1", boot_timeout=90,
                 nofile=None):
        self.workdir = pathlib.Path(workdir).resolve()
        self.certs = pathlib.Path(certs).resolve()
        self.host = host
        cookie = os.urandom(20).hex().upper()
        tag = "vmproxy-cluster-%d-%s" % (os.getpid(), os.urandom(3).hex())
        self.nodes = [RabbitMQ(self.workdir / ("node%d" % i), self.certs, host=host,
                               boot_timeout=boot_timeout, nofile=nofile,
                               name="%s-n%d" % (tag, i), cookie=cookie,
                               load_definitions=False, extra_conf=CLUSTER_CONF)
                      for i in range(size)]
        self.formed = False

    # ---- life cycle -------------------------------------------------------

    def _boot_all(self, nodes):
        """Start NODES together: processes launched here (the main thread:
        a node dies with the thread that started it), boots awaited in
        parallel."""
        for n in nodes:
            n.launch()
        errors = []

        def wait(n):
            try:
                n.wait_ready()
            except BaseException as e:  # reported below, with every node's error
                errors.append("%s: %s" % (n.nodename, e))
        threads = [threading.Thread(target=wait, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for n in nodes:
                n.kill()
            raise BrokerError("cluster: nodes failed to boot:\n" + "\n".join(errors))

    def start(self):
        """Boot every node, form the cluster, load the topology; returns self
        once every node serves it and the quorum queue has every member."""
        if self.formed:
            for n in self.nodes:
                n.ensure_running()
            return self
        # The nodes run as user rabbitmq, which must be able to enter here.
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        try:
            self._boot_all(self.nodes)
            seed = self.nodes[0]
            for n in self.nodes[1:]:
                n.ctl("stop_app")
                n.ctl("reset")
                n.ctl("join_cluster", seed.nodename)
                n.ctl("start_app")
            running = self.running_nodes()
            if sorted(running) != sorted(n.nodename for n in self.nodes):
                raise BrokerError("cluster: running nodes %s after joining" % running)
            defs = seed.node.etc / "definitions.json"
            shutil.copyfile(seed.definitions, defs)
            os.chmod(defs, 0o644)
            seed._chown(defs)
            seed.ctl("import_definitions", defs)
            # The default guest account exists because no definitions were
            # loaded at boot; the topology does not use it.
            try:
                seed.ctl("delete_user", "guest")
            except BrokerError:
                pass
            for n in self.nodes:
                n.topology = True
                n.wait_ready()
            members = self.queue_members(self.queue)
            if len(members) != len(self.nodes):
                raise BrokerError("cluster: quorum queue %s has members %s" % (self.queue,
                                                                              members))
        except BaseException:
            self.close()
            raise
        self.formed = True
        return self

    def ensure_running(self):
        """Thaw and start whatever a test froze or killed, and wait until the
        whole cluster serves again."""
        dead = [n for n in self.nodes if not n.node.alive()]
        for n in self.nodes:
            if n.node.alive() and n.node.frozen:
                n.thaw()
        if dead:
            self._boot_all(dead)
        for n in self.nodes:
            n.wait_ready()
        self.wait_members(self.queue, len(self.nodes))

    def close(self):
        for n in self.nodes:
            try:
                n.close()
            except Exception as e:  # keep stopping the others
                print("cluster: stopping %s: %s" % (n.nodename, e), file=sys.stderr)

    # ---- questions --------------------------------------------------------

    def live(self):
        """A node that is running and not frozen (for administration)."""
        for n in self.nodes:
            if n.node.alive() and not n.node.frozen:
                return n
        raise BrokerError("cluster: no live node")

    def running_nodes(self):
        out = self.live().ctl("cluster_status", "--formatter", "json", "--quiet")
        return json.loads(out).get("running_nodes", [])

    def queue_members(self, queue):
        """Node names holding a member of quorum queue QUEUE."""
        out = self.live().ctl("quorum_status", queue, "--vhost", self.vhost,
                              "--formatter", "json", "--quiet", tool="rabbitmq-queues")
        rows = json.loads(out) if out.strip() else []
        return sorted({r.get("Node Name") for r in rows if r.get("Node Name")})

    def wait_members(self, queue, count, timeout=60):
        from harness.procs import wait_for
        wait_for(lambda: len(self.queue_members(queue)) >= count, timeout,
                 "%d members of %s" % (count, queue), 0.5)

    def node_by_tls_port(self, port):
        for n in self.nodes:
            if n.tls_port == port:
                return n
        raise KeyError(port)

    def upstream_hosts(self):
        """vmproxyd's upstream.hosts / the consumer's broker.hosts for TLS."""
        return [{"host": "localhost", "port": n.tls_port} for n in self.nodes]

    def info(self):
        return {"nodes": [n.info() for n in self.nodes], "vhost": self.vhost,
                "exchange": self.exchange, "queue": self.queue, "certs": str(self.certs),
                "users": dict(PASSWORDS)}

    # Client helpers of a single node, on a live one.
    def connection(self, **kw):
        return self.live().connection(**kw)

    def get_all(self, queue, **kw):
        return self.live().get_all(queue, **kw)

    def queue_depth(self, queue):
        return self.live().queue_depth(queue)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m harness.cluster",
                                 description="Run a private RabbitMQ cluster for vmproxy "
                                 "until SIGINT/SIGTERM; prints its nodes as one JSON line.")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--certs", required=True, help="gen-certs.sh directory")
    ap.add_argument("--size", type=int, default=3)
    args = ap.parse_args(argv)
    ensure_certs(args.certs)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    c = RabbitMQCluster(args.workdir, args.certs, size=args.size)
    try:
        c.start()
        print(json.dumps(c.info()), flush=True)
        while not stop.wait(1):
            for n in c.nodes:
                if not n.node.alive():
                    print("cluster: node %s exited\n%s" % (n.nodename, n.node.log_tail()),
                          file=sys.stderr)
                    return 1
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
