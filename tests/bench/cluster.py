#!/usr/bin/python3
"""Broker-side figures for docs/scaling.md: one node against a three-node
cluster, both through vmproxyd.

For each cluster size (1, then 3) it starts a private cluster with the
integration harness (quorum queue vm.metrics.all on every node, bounded by a
max-length policy as in run.py), and measures:
- throughput: vmproxyd (--threads links, upstream.hosts = every node) with
  --vms guests publishing 256-byte persistent messages flat out (confirm
  window 64) for --duration seconds: confirmed msgs/s and latency;
- where the links went and each node's beam.smp RSS;
- the broker's cost of one idle connection: --idle-conns TLS + EXTERNAL
  connections straight to node 0 (what a link is to the broker), node 0's
  RSS before and with them, per connection.
Ratios are against the single node of the same run. Writes cluster.json
and prints a Markdown table. Everything runs on loopback and is stopped on
exit.

    /usr/bin/python3 tests/bench/cluster.py --build build-bench --out /tmp/cluster-bench
"""
import argparse
import collections
import json
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (puts tests/integration on the path)

from harness.cluster import RabbitMQCluster  # noqa: E402
from harness.rabbitmq import ensure_certs  # noqa: E402
from harness.vmproxyd import VmProxyd, make_vms  # noqa: E402

log = bench.log


def measure(size, args, build, certs, work):
    res = {"nodes": size}
    t0 = time.monotonic()
    c = RabbitMQCluster(work / ("cluster%d" % size), certs, size=size, nofile=20000)
    c.start()
    res["form_s"] = round(time.monotonic() - t0, 1)
    proxy = None
    try:
        beams = [bench.find_beam(n.node.proc.pid) for n in c.nodes]
        c.live().ctl("set_policy", "-p", c.vhost, "--apply-to", "queues", "bench-bound",
                     "^vm\\.metrics\\.all$",
                     json.dumps({"max-length": bench.QUEUE_MAX_LENGTH, "overflow": "drop-head"}))
        res["rss_idle_mib"] = [round(bench.proc_rss_kib(b) / 1024, 1) for b in beams]

        vms = make_vms(args.vms, base="127.10.0.1")
        proxy = VmProxyd(build, work / ("proxy%d" % size), c.nodes[0], certs, vms,
                         threads=args.threads, upstream={"hosts": c.upstream_hosts()})
        (work / ("proxy%d" % size)).mkdir(exist_ok=True)
        proxy.start(timeout=60)
        ports = collections.Counter(int(t["upstream"]["node"].rsplit(":", 1)[1])
                                    for t in proxy.admin("threads")["threads"])
        res["links_per_node"] = [ports.get(n.tls_port, 0) for n in c.nodes]

        side_rss = {}

        def mid():
            time.sleep(args.duration / 2)
            side_rss["rss_load_mib"] = [round(bench.proc_rss_kib(b) / 1024, 1) for b in beams]
            return {}
        argv = bench.loadgen_argv(build, {"kind": "vmproxyd", "port": proxy.port}, None, certs,
                                  args.vms, 1, 256, args.duration, source_base="127.10.0.1")
        rep, side = bench.run_loadgen(argv, work / ("load%d.json" % size), mid=mid,
                                      proxy_pid=proxy.proc.pid)
        res.update(side_rss)
        res["msgs_per_s"] = rep.get("msgs_per_s", 0)
        res["confirmed"] = rep.get("confirmed", 0)
        res["latency_us"] = {k: rep.get("latency_us", {}).get(k) for k in ("p50", "p99")}
        res["loadgen_status"] = side.get("loadgen_status")
        proxy.stop()
        proxy = None

        # Broker memory per idle TLS connection (a link, as the broker sees it).
        node0 = c.nodes[0]
        before = bench.proc_rss_kib(beams[0])
        argv = bench.loadgen_argv(build, {"kind": "direct", "port": node0.tls_port}, c, certs,
                                  args.idle_conns, 1, 256, None,
                                  extra=["--heartbeat", "30", "--idle", "12"])
        proc = subprocess.Popen(argv + ["--report", str(work / ("idle%d.json" % size))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        bench._procs.append(proc)
        t_open = time.monotonic()
        m = bench.wait_line(proc, r"loadgen: (\d+) of (\d+) connections open", 300)
        if m:
            # TLS handshakes + EXTERNAL logins the node took, one after another
            # per load generator thread: what reconnecting links cost it.
            res["idle_open_per_s"] = round(int(m.group(1)) / (time.monotonic() - t_open))
            time.sleep(5)
            with_conns = bench.proc_rss_kib(beams[0])
            res["idle_conns"] = int(m.group(1))
            res["broker_bytes_per_conn"] = round((with_conns - before) * 1024
                                                 / max(1, int(m.group(1))))
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    finally:
        if proxy:
            proxy.stop()
        c.close()
    log("%d node(s): %s" % (size, res))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default="build-bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--idle-conns", type=int, default=500)
    args = ap.parse_args()
    build = pathlib.Path(args.build).resolve()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="vmproxy-cluster-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-cluster-bench-work-"))
    work.chmod(0o755)
    summary = {"machine": bench.machine(), "vms": args.vms, "threads": args.threads,
               "duration_s": args.duration, "runs": []}
    try:
        certs = ensure_certs(work / "certs")
        for size in (1, 3):
            summary["runs"].append(measure(size, args, build, certs, work))
    finally:
        bench.cleanup()
        with open(out / "cluster.json", "w") as f:
            json.dump(summary, f, indent=1)
    base = summary["runs"][0]
    print("| nodes | formed in s | links per node | msgs/s | x 1 node | p50 us | p99 us "
          "| beam RSS MiB idle | beam RSS MiB under load | broker KiB per idle conn "
          "| TLS logins/s on one node |")
    print("|---:|---:|---|---:|---:|---:|---:|---|---|---:|---:|")
    for r in summary["runs"]:
        print("| %d | %s | %s | %d | %.2f | %s | %s | %s | %s | %.1f | %s |" % (
            r["nodes"], r["form_s"], r.get("links_per_node"), r.get("msgs_per_s", 0),
            r.get("msgs_per_s", 0) / max(1, base.get("msgs_per_s", 1)),
            r["latency_us"].get("p50"), r["latency_us"].get("p99"),
            r.get("rss_idle_mib"), r.get("rss_load_mib"),
            r.get("broker_bytes_per_conn", 0) / 1024, r.get("idle_open_per_s")))
    print("results in %s" % (out / "cluster.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
