#!/usr/bin/python3
"""Performance benchmark of vmproxyd against proxy-less topologies and HAProxy.

Run through tests/bench/run.sh (which installs haproxy, valgrind, strace and
matplotlib, builds the release tree and raises the open-files limit).
Everything is on loopback, against one private RabbitMQ started by the
integration harness; every wait is bounded and every process started here
is stopped on exit or Ctrl-C.

Writes into --out: one JSON file per measured point (the loadgen report
plus the side measurements), summary.json, results.md and the PNG plots
(bench-*.png; --docs copies them to docs/img/). --replot DIR redraws the
plots of an earlier run from its summary.json without measuring anything.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

TOP = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TOP / "tests" / "integration"))

from harness.procs import free_port, wait_for  # noqa: E402
from harness.rabbitmq import PASSWORDS, RabbitMQ, ensure_certs  # noqa: E402
from harness.vmproxyd import VmProxyd, make_vms  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
QUEUE_MAX_LENGTH = 10000
# The matrix's topologies, in the order they run; ratios are against the
# first two.
TOPOLOGIES = ("direct", "direct-plain", "vmproxyd", "haproxy")
# Per-thread link counters on vmproxyd's /metrics: one increment per
# SSL_write/write and per SSL_read/read on the upstream link.
UP_WRITES = "vmproxy_upstream_writes_total"
UP_READS = "vmproxy_upstream_reads_total"
UP_PUBLISHED = "vmproxy_upstream_published_total"
SYSCALLS = ("write", "sendto", "sendmsg", "read", "recvfrom")

# Everything started here, stopped by cleanup() whatever happens.
_procs = []
_proxies = []
_broker = None


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


# ---- /proc measurements -----------------------------------------------------

def proc_cpu_s(pid):
    """utime + stime of PID (all threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def find_beam(root_pid):
    """The beam.smp process under ROOT_PID (the broker's launcher)."""
    parent = {}
    comm = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        comm[int(d)] = st[st.index("(") + 1:st.rindex(")")]
        parent[int(d)] = int(st.rsplit(")", 1)[1].split()[1])
    for pid, name in comm.items():
        if name != "beam.smp":
            continue
        p = pid
        while p > 1:
            p = parent.get(p, 0)
            if p == root_pid:
                return pid
    raise RuntimeError("no beam.smp under pid %d" % root_pid)


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(mem_kib / 1048576, 1),
            "kernel": platform.release(), "date": datetime.datetime.now().isoformat(" ", "seconds")}


# ---- vmproxyd's Prometheus endpoint ------------------------------------------------

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url, timeout=10):
    """GET URL (a Prometheus text page) as {name: {labels tuple: value}};
    None if the endpoint cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out.setdefault(m.group(1), {})[labels] = v
    return out


def counter_delta(before, after, name):
    """(total, {thread: delta}) of counter NAME between two scrapes, or
    (None, {}) when either scrape lacks it."""
    if not before or not after or name not in before or name not in after:
        return None, {}
    per = {}
    total = 0.0
    for labels, v in after[name].items():
        d = v - before[name].get(labels, 0.0)
        total += d
        key = dict(labels).get("thread", ",".join("%s=%s" % kv for kv in labels))
        per[key] = per.get(key, 0.0) + d
    return total, per


def link_io(before, after):
    """Upstream writes and reads per published message between two
    scrapes; a counter the daemon does not have gives None."""
    pub, pub_per = counter_delta(before, after, UP_PUBLISHED)
    res = {"published": pub, "published_per_thread": pub_per}
    for key, name in (("writes", UP_WRITES), ("reads", UP_READS)):
        tot, per = counter_delta(before, after, name)
        res[key] = tot
        res[key + "_per_thread"] = per
        res[key + "_per_msg"] = round(tot / pub, 3) if tot is not None and pub else None
    return res


# ---- processes ------------------------------------------------------------------

def cleanup():
    for p in _procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for px in _proxies:
        try:
            px.stop(timeout=120)
        except Exception as e:  # keep cleaning up
            print("stopping proxy: %s" % e, file=sys.stderr)
    if _broker is not None:
        _broker.close()


def on_signal(sig, frame):
    raise KeyboardInterrupt()


class Haproxy:
    """HAProxy in TCP mode, passing TLS through to the broker's TLS port."""

    def __init__(self, workdir, target_port):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.cfg = self.workdir / "haproxy.cfg"
        self.cfg.write_text(
            "global\n    maxconn 4000\n\n"
            "defaults\n    mode tcp\n    timeout connect 5s\n"
            "    timeout client 600s\n    timeout server 600s\n\n"
            "frontend amqps\n    bind 127.0.0.1:%d\n    default_backend broker\n\n"
            "backend broker\n    server rabbit 127.0.0.1:%d\n" % (self.port, target_port))
        self.out = open(self.workdir / "haproxy.log", "ab")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.cfg)], stdout=self.out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _procs.append(self.proc)
        wait_for(self._listening, 15, "haproxy listening")

    def _listening(self):
        if self.proc.poll() is not None:
            raise RuntimeError("haproxy exited: %s" % (self.workdir / "haproxy.log"))
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def loadgen_argv(build, target, broker, certs, vms, conns_per_vm, size, duration, window=64,
                 rate=0, threads=2, source_base=None, extra=()):
    argv = [str(build / "tests" / "bench" / "loadgen"), "--vms", str(vms),
            "--conns-per-vm", str(conns_per_vm), "--size", str(size), "--window", str(window),
            "--rate", str(rate), "--threads", str(threads), "--drain-timeout", "30"]
    if duration is not None:
        argv += ["--duration", str(duration)]
    if target["kind"] == "vmproxyd":
        argv += ["--host", "127.0.0.1", "--port", str(target["port"]), "--exchange", "metrics"]
        if source_base:
            argv += ["--source-base", source_base]
    elif target["kind"] == "plain":  # straight to the broker's plain port, PLAIN login
        argv += ["--host", "127.0.0.1", "--port", str(target["port"]), "--user", "vmproxyd",
                 "--password", PASSWORDS["vmproxyd"], "--vhost", broker.vhost,
                 "--exchange", broker.exchange]
    else:  # TLS straight to the broker, or through haproxy
        # The server certificate names localhost; rabbitmq-c checks DNS names only.
        argv += ["--host", "localhost", "--port", str(target["port"]), "--tls",
                 "--ca", str(certs / "ca.pem"), "--cert", str(certs / "proxy.pem"),
                 "--key", str(certs / "proxy-key.pem"), "--external",
                 "--vhost", broker.vhost, "--exchange", broker.exchange]
    return argv + list(extra)


def wait_line(proc, pattern, timeout):
    """Read PROC's stderr until a line matches PATTERN (bounded). Returns the
    match, or None if the process ended or the time ran out."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if not r:
            if proc.poll() is not None:
                return None
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
        m = re.search(pattern.encode(), buf)
        if m:
            return m
    return None


def run_loadgen(argv, report, mid=None, proxy_pid=None, timeout=600):
    """Run the load generator; once its connections are open, note the
    proxy's CPU, call MID() halfway through the publishing, and note the
    proxy's CPU again when it ends. Returns (report dict, side dict)."""
    side = {}
    proc = subprocess.Popen(argv + ["--report", str(report)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _procs.append(proc)
    t_conn = time.monotonic()
    m = wait_line(proc, r"loadgen: (\d+) of (\d+) connections open", timeout)
    side["connect_s"] = round(time.monotonic() - t_conn, 2)
    if m:
        side["open_connections"] = int(m.group(1))
        if proxy_pid:
            side["_cpu0"] = proc_cpu_s(proxy_pid)
        if mid:
            side.update(mid())
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proxy_pid:
        cpu1 = proc_cpu_s(proxy_pid)
        if "_cpu0" in side:
            side["proxy_cpu_s"] = round(cpu1 - side.pop("_cpu0"), 3)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    side["loadgen_status"] = proc.returncode
    if proc.returncode != 0:
        side["loadgen_stderr"] = err[-2000:]
    try:
        with open(report) as f:
            rep = json.load(f)
    except (OSError, ValueError):
        rep = {"msgs_per_s": 0, "confirmed": 0, "latency_us": {}, "errors": -1}
    return rep, side


# ---- scenarios --------------------------------------------------------------------

def matrix_point(ctx, scenario, target, proxy_pid, conns, size):
    broker = ctx["broker"]
    broker.purge(broker.queue)
    beam = ctx["beam"]
    rss_before = proc_rss_kib(beam)
    duration = ctx["duration"]
    vms = conns
    argv = loadgen_argv(ctx["build"], target, broker, ctx["certs"], vms, 1, size, duration,
                        source_base=ctx["vm_base"])

    def mid():
        # rabbitmqctl needs ~5 s on a loaded 2-CPU machine and counts the
        # connections near its end: start it early, then sample memory at
        # the middle of the publishing.
        t_mid = time.monotonic() + duration / 2
        time.sleep(min(2.0, duration / 4))
        out = {}
        try:
            t0 = time.monotonic()
            rows = broker.ctl("list_connections", "pid", "--quiet", "--no-table-headers")
            out["broker_connections"] = sum(1 for x in rows.splitlines() if x.strip())
            out["broker_connections_query_s"] = round(time.monotonic() - t0, 2)
        except Exception as e:
            out["broker_connections"] = None
            out["broker_connections_error"] = str(e)[:200]
        time.sleep(max(0.0, t_mid - time.monotonic()))
        out["broker_rss_kib"] = proc_rss_kib(beam)
        if proxy_pid:
            out["proxy_rss_kib"] = proc_rss_kib(proxy_pid)
        return out

    name = "%s-c%d-s%d" % (scenario, conns, size)
    report = ctx["out"] / ("%s.loadgen.json" % name)
    metrics_url = target.get("metrics_url")
    m0 = scrape(metrics_url) if metrics_url else None
    rep, side = run_loadgen(argv, report, mid, proxy_pid, timeout=duration + 300)
    m1 = scrape(metrics_url) if metrics_url else None
    res = {"scenario": scenario, "connections": conns, "size": size,
           "msgs_per_s": rep.get("msgs_per_s", 0), "confirmed": rep.get("confirmed", 0),
           "errors": rep.get("errors"), "nacked": rep.get("nacked"),
           "latency_us": rep.get("latency_us", {}), "duration_s": rep.get("duration_s")}
    res.update(side)
    res["broker_rss_before_kib"] = rss_before
    if metrics_url:
        res["upstream_io"] = link_io(m0, m1)
    if proxy_pid and res.get("proxy_cpu_s") is not None and res["confirmed"]:
        res["proxy_cpu_us_per_msg"] = round(res["proxy_cpu_s"] * 1e6 / res["confirmed"], 2)
    with open(ctx["out"] / ("%s.json" % name), "w") as f:
        json.dump(res, f, indent=1)
    io = res.get("upstream_io") or {}
    log("%-12s conns=%-4d size=%-4d %8.0f msg/s p99=%s us broker_conns=%s broker_rss=%s "
        "proxy_rss=%s proxy_cpu=%s errors=%s%s" % (
            scenario, conns, size, res["msgs_per_s"], res["latency_us"].get("p99"),
            res.get("broker_connections"), res.get("broker_rss_kib"), res.get("proxy_rss_kib"),
            res.get("proxy_cpu_s"), res.get("errors"),
            " up_writes/msg=%s up_reads/msg=%s" % (fmt(io.get("writes_per_msg"), 3),
                                                 fmt(io.get("reads_per_msg"), 3))
            if metrics_url else ""))
    return res


def start_proxy(ctx, name, vms, guest=None, wrapper=None, metrics=False):
    """vmproxyd with its default thread count (no threads.count in the
    configuration); WRAPPER, when given, is run instead of the binary.
    METRICS: with a /metrics endpoint on loopback (px.metrics_url)."""
    workdir = ctx["work"] / name
    workdir.mkdir(parents=True, exist_ok=True)
    build = ctx["build"]

    class Proxy(VmProxyd):
        @property
        def binary(self):
            return wrapper or super().binary

    extra = {"threads": {}, "log_level": "warn"}
    metrics_url = None
    if metrics:
        mport = free_port()
        extra["metrics"] = {"listen": "127.0.0.1:%d" % mport}
        metrics_url = "http://127.0.0.1:%d/metrics" % mport
    upstream = {}
    if ctx.get("max_in_flight"):
        upstream["max_in_flight"] = ctx["max_in_flight"]
    px = Proxy(build, workdir, ctx["broker"], ctx["certs"], vms, threads=os.cpu_count(),
               guest=guest, extra=extra, upstream=upstream)
    px.metrics_url = metrics_url
    _proxies.append(px)
    px.start(timeout=120)
    return px


def stop_proxy(px, timeout=20):
    px.stop(timeout=timeout)
    _proxies.remove(px)


def run_matrix(ctx):
    results = []
    broker = ctx["broker"]
    sizes = ctx["sizes"]
    counts = ctx["conn_counts"]
    vms = make_vms(max(counts), ctx["vm_base"])

    def points(scenario, target, pid):
        for c in counts:
            for s in sizes:
                results.append(matrix_point(ctx, scenario, target, pid, c, s))

    for topo in ctx["topologies"]:
        log("scenario %s" % topo)
        if topo == "direct":
            points(topo, {"kind": "tls", "port": broker.tls_port}, None)
        elif topo == "direct-plain":
            points(topo, {"kind": "plain", "port": broker.port}, None)
        elif topo == "vmproxyd":
            px = start_proxy(ctx, "proxy-matrix", vms, metrics=True)
            try:
                points(topo, {"kind": "vmproxyd", "port": px.port,
                              "metrics_url": px.metrics_url}, px.proc.pid)
            finally:
                stop_proxy(px)
        elif topo == "haproxy":
            hp = Haproxy(ctx["work"] / "haproxy", broker.tls_port)
            try:
                points(topo, {"kind": "tls", "port": hp.port}, hp.proc.pid)
            finally:
                hp.stop()
    return results


def run_idle(ctx):
    n_vms, per_vm = ctx["idle_vms"], ctx["idle_per_vm"]
    total = n_vms * per_vm
    log("idle scale: %d VMs x %d connections" % (n_vms, per_vm))
    vms = make_vms(n_vms, ctx["vm_base"])
    px = start_proxy(ctx, "proxy-idle", vms, guest={"max_connections_per_vm": max(16, per_vm),
                                                     "heartbeat": 20})
    res = {"vms": n_vms, "conns_per_vm": per_vm, "connections": total,
           "idle_window_s": ctx["idle_s"]}
    try:
        pid = px.proc.pid
        time.sleep(1)
        res["rss_before_kib"] = proc_rss_kib(pid)
        argv = loadgen_argv(ctx["build"], {"kind": "vmproxyd", "port": px.port}, None,
                            ctx["certs"], n_vms, per_vm, 256, None, source_base=ctx["vm_base"],
                            extra=["--heartbeat", "20", "--idle", str(ctx["idle_s"] + 5)])
        proc = subprocess.Popen(argv + ["--report", str(ctx["out"] / "idle.loadgen.json")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        _procs.append(proc)
        t0 = time.monotonic()
        m = wait_line(proc, r"loadgen: (\d+) of (\d+) connections open", 300)
        res["connect_s"] = round(time.monotonic() - t0, 1)
        if not m:
            raise RuntimeError("idle: loadgen did not open its connections: %s"
                               % proc.stderr.read().decode(errors="replace")[-1000:])
        res["open_connections"] = int(m.group(1))
        time.sleep(2)
        res["rss_with_conns_kib"] = proc_rss_kib(pid)
        cpu0, t0 = proc_cpu_s(pid), time.monotonic()
        time.sleep(ctx["idle_s"])
        cpu1, t1 = proc_cpu_s(pid), time.monotonic()
        res["rss_end_kib"] = proc_rss_kib(pid)
        res["idle_cpu_s"] = round(cpu1 - cpu0, 3)
        res["idle_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 2)
        res["rss_per_conn_bytes"] = round((res["rss_with_conns_kib"] - res["rss_before_kib"])
                                          * 1024 / max(1, res["open_connections"]), 1)
        try:
            res["broker_connections"] = len(ctx["broker"].connections())
        except Exception as e:
            res["broker_connections_error"] = str(e)[:200]
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        res["loadgen_status"] = proc.returncode
        proc.stderr.close()
    finally:
        stop_proxy(px)
    with open(ctx["out"] / "idle.json", "w") as f:
        json.dump(res, f, indent=1)
    log("idle: %s" % res)
    return res


def annotate(cg_file, save, inclusive=False):
    """callgrind_annotate CG_FILE as {function: Ir} (every function)."""
    r = subprocess.run(["callgrind_annotate", "--threshold=100",
                        "--inclusive=%s" % ("yes" if inclusive else "no"), str(cg_file)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    if save:
        pathlib.Path(save).write_text(r.stdout)
    fns = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$", line)
        if m and "PROGRAM TOTALS" not in m.group(2):
            fn = m.group(2).strip()
            fns[fn] = fns.get(fn, 0) + int(m.group(1).replace(",", ""))
    return fns


def callgrind_once(ctx, n, tag):
    out_file = ctx["out"] / ("callgrind.%s.out" % tag)
    wrapper = ctx["work"] / ("vmproxyd-callgrind-%s.sh" % tag)
    binary = ctx["build"] / "proxy" / "vmproxyd"
    wrapper.write_text("#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s "
                       "%s \"$@\"\n" % (out_file, binary))
    wrapper.chmod(0o755)
    vms = make_vms(1, ctx["vm_base"])
    px = start_proxy(ctx, "proxy-callgrind-%s" % tag, vms, wrapper=str(wrapper))
    try:
        argv = loadgen_argv(ctx["build"], {"kind": "vmproxyd", "port": px.port}, None,
                            ctx["certs"], 1, 1, 256, None, threads=1,
                            source_base=ctx["vm_base"], extra=["--count", str(n)])
        rep, side = run_loadgen(argv, ctx["out"] / ("callgrind.%s.loadgen.json" % tag),
                                timeout=900)
    finally:
        stop_proxy(px, timeout=300)
    total = None
    with open(out_file) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                total = int(line.split()[1])
    return total, rep, side, out_file


def run_callgrind(ctx):
    n = ctx["cg_n"]
    log("callgrind: %d and %d messages through one connection" % (n, 2 * n))
    ctx["broker"].purge(ctx["broker"].queue)
    ir1, rep1, side1, f1 = callgrind_once(ctx, n, "n")
    ctx["broker"].purge(ctx["broker"].queue)
    ir2, rep2, side2, f2 = callgrind_once(ctx, 2 * n, "2n")
    res = {"n": n, "ir_n": ir1, "ir_2n": ir2, "confirmed_n": rep1.get("confirmed"),
           "confirmed_2n": rep2.get("confirmed")}
    if ir1 and ir2:
        res["ir_per_msg"] = round((ir2 - ir1) / n, 1)
    # Per-function cost per message: the same difference, function by
    # function, so start-up (dynamic linking, TLS handshake) drops out.
    self1, self2 = annotate(f1, ctx["out"] / "callgrind_annotate.n.txt"), \
        annotate(f2, ctx["out"] / "callgrind_annotate.2n.txt")
    incl2 = annotate(f2, ctx["out"] / "callgrind_annotate_inclusive.2n.txt", inclusive=True)
    incl1 = annotate(f1, None, inclusive=True)
    top = []
    for fn, ir in self2.items():
        d = (ir - self1.get(fn, 0)) / n
        if d > 0:
            top.append({"fn": fn, "ir_per_msg": round(d, 1)})
    by_obj = {}
    for t in top:
        m = re.search(r"\[([^\]]+)\]$", t["fn"])
        obj = os.path.basename(m.group(1)) if m else "?"
        by_obj[obj] = by_obj.get(obj, 0) + t["ir_per_msg"]
    res["by_object"] = {k: round(v, 1) for k, v in sorted(by_obj.items(), key=lambda x: -x[1])}
    top.sort(key=lambda t: -t["ir_per_msg"])
    top = top[:25]
    top_incl = []
    for fn, ir in incl2.items():
        d = (ir - incl1.get(fn, 0)) / n
        if d > 0 and fn.endswith("/proxy/vmproxyd]"):
            top_incl.append({"fn": fn, "ir_per_msg": round(d, 1)})
    top_incl.sort(key=lambda t: -t["ir_per_msg"])
    res["top_inclusive_own"] = top_incl[:25]
    res["top"] = top
    with open(ctx["out"] / "callgrind.json", "w") as f:
        json.dump(res, f, indent=1)
    log("callgrind: %s instructions per message" % res.get("ir_per_msg"))
    return res


def run_fairness(ctx):
    log("fairness: 1 noisy VM flat out + 99 quiet VMs at 10 msg/s")
    vms = make_vms(100, ctx["vm_base"])
    px = start_proxy(ctx, "proxy-fair", vms)
    quiet_base = vms[1]["address"]
    res = {}
    try:
        target = {"kind": "vmproxyd", "port": px.port}
        for phase in ("baseline", "noisy"):
            ctx["broker"].purge(ctx["broker"].queue)
            noisy = None
            if phase == "noisy":
                nargv = loadgen_argv(ctx["build"], target, None, ctx["certs"], 1, 1, 256,
                                     ctx["fair_s"] + 4, threads=1, source_base=vms[0]["address"])
                noisy = subprocess.Popen(nargv + ["--report", str(ctx["out"] / "fair-noisy.json")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL)
                _procs.append(noisy)
                wait_line(noisy, r"connections open", 60)
                time.sleep(2)  # the noisy VM at full speed before the quiet ones start
            qargv = loadgen_argv(ctx["build"], target, None, ctx["certs"], 99, 1, 256,
                                 ctx["fair_s"], rate=10, threads=1, source_base=quiet_base)
            rep, side = run_loadgen(qargv, ctx["out"] / ("fair-%s-quiet.json" % phase),
                                    proxy_pid=px.proc.pid, timeout=ctx["fair_s"] + 120)
            res[phase] = {"quiet_msgs_per_s": rep.get("msgs_per_s"),
                          "quiet_latency_us": rep.get("latency_us"),
                          "quiet_errors": rep.get("errors"), "status": side.get("loadgen_status")}
            if noisy:
                try:
                    noisy.wait(ctx["fair_s"] + 120)
                except subprocess.TimeoutExpired:
                    noisy.kill()
                    noisy.wait()
                noisy.stderr.close()
                with open(ctx["out"] / "fair-noisy.json") as f:
                    nrep = json.load(f)
                res[phase]["noisy_msgs_per_s"] = nrep.get("msgs_per_s")
                res[phase]["noisy_latency_us"] = nrep.get("latency_us")
    finally:
        stop_proxy(px)
    b = res["baseline"]["quiet_latency_us"].get("p99")
    n = res["noisy"]["quiet_latency_us"].get("p99")
    if b and n:
        res["p99_ratio"] = round(n / b, 2)
    with open(ctx["out"] / "fairness.json", "w") as f:
        json.dump(res, f, indent=1)
    log("fairness: quiet p99 %s us alone, %s us with the noisy VM" % (b, n))
    return res


# ---- system calls per message (strace) ------------------------------------------------

# "PID call(FD<description>, ..."; a TCP description contains "->".
_ST_CALL = re.compile(r'^(\d+)\s+(\w+)\((\d+)<(.*?)>[,)]')
_ST_ADDR = re.compile(r'(?:TCP|TCPv6):\[(.+):(\d+)->(.+):(\d+)\]')


def classify_fd(desc, listen_port, broker_ports):
    """'upstream', 'guest' or 'other' for an strace -yy descriptor text."""
    m = _ST_ADDR.search(desc)
    if m:
        if int(m.group(4)) in broker_ports:
            return "upstream"
        if int(m.group(2)) == listen_port:
            return "guest"
    return "other"


def parse_strace(path, listen_port, broker_ports):
    """Count the calls of an strace -f -C -yy output file by side (upstream
    link, guest sockets, other descriptors) and by system call; also the
    -c summary's total and the calls that failed (EAGAIN)."""
    by_side = {}
    failed = {}
    summary_total = None
    in_summary = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("% time"):
                in_summary = True
                continue
            if in_summary:
                cols = line.split()
                if cols and cols[-1] == "total":
                    summary_total = int(cols[3])
                continue
            m = _ST_CALL.match(line)
            if not m or m.group(2) not in SYSCALLS:
                continue
            side = classify_fd(m.group(4), listen_port, broker_ports)
            by_side.setdefault(side, {}).setdefault(m.group(2), 0)
            by_side[side][m.group(2)] += 1
            if "EAGAIN" in line:
                failed[side] = failed.get(side, 0) + 1
    return by_side, failed, summary_total


def run_syscalls(ctx):
    """vmproxyd under strace -f -c for a fixed number of 256-byte messages
    through one guest connection (window 64): system calls per message on
    the upstream link, on the guest socket and in total."""
    n = ctx["sc_n"]
    log("syscalls: strace over %d messages through one connection" % n)
    if not shutil.which("strace"):
        log("syscalls: strace not installed; skipped")
        return {"error": "strace not installed"}
    broker = ctx["broker"]
    broker.purge(broker.queue)
    vms = make_vms(1, ctx["vm_base"])
    px = start_proxy(ctx, "proxy-syscalls", vms, metrics=True)
    st_file = ctx["out"] / "strace.txt"
    res = {"n": n, "syscalls": list(SYSCALLS)}
    strace = None
    try:
        strace = subprocess.Popen(["strace", "-f", "-C", "-yy", "-s", "0", "-e",
                                   "trace=" + ",".join(SYSCALLS), "-o", str(st_file),
                                   "-p", str(px.proc.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        _procs.append(strace)
        # "strace: Process N attached with T threads" once every thread is traced.
        if not wait_line(strace, r"attached", 30):
            raise RuntimeError("strace did not attach to vmproxyd (pid %d)" % px.proc.pid)
        m0 = scrape(px.metrics_url)
        argv = loadgen_argv(ctx["build"], {"kind": "vmproxyd", "port": px.port}, None,
                            ctx["certs"], 1, 1, 256, None, threads=1,
                            source_base=ctx["vm_base"], extra=["--count", str(n)])
        rep, side = run_loadgen(argv, ctx["out"] / "syscalls.loadgen.json", timeout=600)
        m1 = scrape(px.metrics_url)
        strace.send_signal(signal.SIGINT)
        try:
            strace.wait(60)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait()
        strace.stderr.close()
    finally:
        if strace is not None and strace.poll() is None:
            strace.kill()
            strace.wait()
        stop_proxy(px)
    res["confirmed"] = rep.get("confirmed")
    res["loadgen_status"] = side.get("loadgen_status")
    res["upstream_io"] = link_io(m0, m1)
    by_side, failed, total = parse_strace(st_file, px.port,
                                          {broker.port, broker.tls_port})
    res["calls"] = by_side
    res["eagain"] = failed
    res["summary_total"] = total
    msgs = res["confirmed"] or 0
    if msgs:
        per = {}
        for side_name, calls in by_side.items():
            per[side_name] = {k: round(v / msgs, 3) for k, v in sorted(calls.items())}
            per[side_name]["all"] = round(sum(calls.values()) / msgs, 3)
        res["per_msg"] = per
        if total is not None:
            res["total_per_msg"] = round(total / msgs, 3)
    with open(ctx["out"] / "syscalls.json", "w") as f:
        json.dump(res, f, indent=1)
    per = res.get("per_msg", {})
    log("syscalls: %s per message in total, upstream %s, guest %s (%s messages confirmed)"
        % (res.get("total_per_msg"), (per.get("upstream") or {}).get("all"),
           (per.get("guest") or {}).get("all"), msgs))
    return res


# ---- plots ---------------------------------------------------------------------------------

def make_plots(summary, outdir):
    """PNG plots of the matrix into OUTDIR; returns their file names. Each
    plot's title says which run it comes from (mode and date)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log("plots: matplotlib not available (%s); none drawn" % e)
        return []
    matrix = summary.get("matrix") or []
    if not matrix:
        return []
    m = summary.get("machine", {})
    label = "%s run %s, %s CPUs" % (summary.get("mode", "?"), m.get("date", "?"), m.get("nproc"))
    topos = [t for t in TOPOLOGIES if any(r["scenario"] == t for r in matrix)]
    counts = sorted({r["connections"] for r in matrix})
    sizes = sorted({r["size"] for r in matrix})
    colour = {"direct": "tab:blue", "direct-plain": "tab:cyan", "vmproxyd": "tab:red",
              "haproxy": "tab:green"}
    point = {(r["scenario"], r["connections"], r["size"]): r for r in matrix}
    files = []

    def bars(ax, groups, series, value, ylabel):
        """One group of bars per entry of GROUPS, one bar per SERIES entry;
        VALUE(group, series) gives a bar's height or None."""
        width = 0.8 / max(1, len(series))
        for i, (name, col) in enumerate(series):
            xs, ys = [], []
            for g, grp in enumerate(groups):
                v = value(grp, name)
                if v is not None:
                    xs.append(g - 0.4 + width * (i + 0.5))
                    ys.append(v)
            b = ax.bar(xs, ys, width, label=name, color=col,
                       hatch="//" if name.endswith(" 4096 B") else None)
            ax.bar_label(b, labels=[human(y) for y in ys], fontsize=7, padding=1)
        ax.set_xticks(range(len(groups)))
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)

    def human(v):
        if v >= 10000:
            return "%.0fk" % (v / 1000)
        if v >= 1000:
            return "%.1fk" % (v / 1000)
        return "%.3g" % v

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(outdir / name, dpi=100)
        plt.close(fig)
        files.append(name)

    for size in sizes:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        bars(ax, counts, [(t, colour.get(t)) for t in topos],
             lambda c, t: (point.get((t, c, size)) or {}).get("msgs_per_s"),
             "confirmed msgs/s")
        ax.set_xticklabels([str(c) for c in counts])
        ax.set_xlabel("guest connections")
        ax.set_title("Throughput, %d-byte messages, confirm window 64\n%s" % (size, label),
                     fontsize=10)
        save(fig, "bench-throughput-%d.png" % size)

    proxied = [t for t in topos if any(r.get("proxy_cpu_us_per_msg") is not None
                                       for r in matrix if r["scenario"] == t)]
    if proxied:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        series = [("%s %d B" % (t, sz), colour.get(t)) for t in proxied for sz in sizes]
        bars(ax, counts, series,
             lambda c, name: (point.get((name.split()[0], c, int(name.split()[1]))) or {}
                              ).get("proxy_cpu_us_per_msg"),
             "proxy CPU us per message (utime + stime)")
        ax.set_xticklabels([str(c) for c in counts])
        ax.set_xlabel("guest connections")
        ax.set_title("Proxy CPU per confirmed message\n%s" % label, fontsize=10)
        save(fig, "bench-cpu-per-msg.png")

    top = max(counts)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes) + 1, 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        bars(ax, topos, [("p50", "tab:gray"), ("p99", "tab:orange")],
             lambda t, q: (((point.get((t, top, size)) or {}).get("latency_us") or {}).get(q)
                           or 0) / 1000 or None,
             "publish-to-confirm latency, ms")
        ax.set_xticklabels(topos, fontsize=8)
        ax.set_title("%d connections, %d-byte messages" % (top, size), fontsize=10)
    fig.suptitle("Confirm latency percentiles\n%s" % label, fontsize=10)
    save(fig, "bench-latency.png")
    log("plots: %s" % ", ".join(files))
    return files


def copy_plots(files, src, mode):
    """Copy the plots to docs/img/, for full runs only: docs/performance.md
    embeds all four, and a quick run draws only some of them."""
    if mode != "full":
        log("plots not copied to docs/img: a %s run; docs show full runs" % mode)
        return
    dst = TOP / "docs" / "img"
    dst.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(src / name, dst / name)
    log("plots copied to %s" % dst)


# ---- report ---------------------------------------------------------------------------

def fmt(v, nd=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.*f" % (nd, v)
    return str(v)


def write_markdown(ctx, summary):
    m = summary["machine"]
    lines = ["# vmproxyd benchmark results", "",
             "Run %s on %s, %d CPUs, %.1f GiB RAM, kernel %s; mode %s, %s s per point, "
             "confirm window 64." % (m["date"], m["cpu"], m["nproc"], m["mem_gib"], m["kernel"],
                                     summary["mode"], ctx["duration"]), ""]
    direct = {(r["connections"], r["size"]): r for r in summary.get("matrix", [])
              if r["scenario"] == "direct"}
    plain = {(r["connections"], r["size"]): r for r in summary.get("matrix", [])
             if r["scenario"] == "direct-plain"}
    lines += ["## Throughput, latency and memory", "",
              "`x direct` is against direct TLS, `x plain` against direct plain AMQP, at the "
              "same connection count and size. `up w/msg` and `up r/msg`: vmproxyd's upstream "
              "writes and reads (`%s`, `%s`) per published message, \"-\" where the daemon "
              "has no such counter." % (UP_WRITES, UP_READS), "",
              "| scenario | conns | size | msgs/s | x direct | x plain | p50 us | p99 us | "
              "p999 us | broker conns | broker RSS MiB (before) | x direct | proxy RSS MiB | "
              "proxy CPU s | proxy us/msg | up w/msg | up r/msg | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              "---:|---:|"]
    for r in summary.get("matrix", []):
        d = direct.get((r["connections"], r["size"]))
        pl = plain.get((r["connections"], r["size"]))
        lat = r.get("latency_us") or {}
        xt = xp = xr = None
        if d and d.get("msgs_per_s"):
            xt = r["msgs_per_s"] / d["msgs_per_s"]
        if pl and pl.get("msgs_per_s"):
            xp = r["msgs_per_s"] / pl["msgs_per_s"]
        if d and d.get("broker_rss_kib") and r.get("broker_rss_kib"):
            xr = r["broker_rss_kib"] / d["broker_rss_kib"]
        io = r.get("upstream_io") or {}
        lines.append("| %s | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s "
                     "| %s | %s | %s |"
                     % (r["scenario"], r["connections"], r["size"], fmt(r["msgs_per_s"]),
                        fmt(xt, 2), fmt(xp, 2), fmt(lat.get("p50")), fmt(lat.get("p99")),
                        fmt(lat.get("p999")), fmt(r.get("broker_connections")),
                        "%s (%s)" % (
                            fmt(r["broker_rss_kib"] / 1024 if r.get("broker_rss_kib") else None, 1),
                            fmt(r["broker_rss_before_kib"] / 1024
                                if r.get("broker_rss_before_kib") else None, 1)),
                        fmt(xr, 2),
                        fmt(r["proxy_rss_kib"] / 1024 if r.get("proxy_rss_kib") else None, 1),
                        fmt(r.get("proxy_cpu_s"), 2), fmt(r.get("proxy_cpu_us_per_msg"), 2),
                        fmt(io.get("writes_per_msg"), 3), fmt(io.get("reads_per_msg"), 3),
                        fmt(r.get("errors"))))
    lines.append("")
    sc = summary.get("syscalls")
    if sc:
        lines += ["## System calls per message (strace)", ""]
        if sc.get("error"):
            lines += ["Not measured: %s." % sc["error"], ""]
        else:
            io = sc.get("upstream_io") or {}
            lines += ["`strace -f -c -e trace=%s` on vmproxyd over %s 256-byte messages through "
                      "one guest connection (window 64); %s confirmed. Calls per confirmed "
                      "message, by descriptor (`-yy`: the link's socket to the broker, the "
                      "guest's socket, anything else such as mailbox eventfds):"
                      % (",".join(SYSCALLS), sc["n"], fmt(sc.get("confirmed"))), "",
                      "| descriptor | %s | all |" % " | ".join(SYSCALLS),
                      "|---|%s---:|" % ("---:|" * len(SYSCALLS))]
            for side_name in ("upstream", "guest", "other"):
                per = (sc.get("per_msg") or {}).get(side_name)
                if per is None:
                    continue
                lines.append("| %s | %s | %s |" % (side_name, " | ".join(
                    fmt(per.get(c, 0.0), 3) for c in SYSCALLS), fmt(per.get("all"), 3)))
            lines += ["", "Total (the -c summary): %s calls per message. Upstream writes per "
                      "message from /metrics over the same messages: %s, reads: %s."
                      % (fmt(sc.get("total_per_msg"), 3), fmt(io.get("writes_per_msg"), 3),
                         fmt(io.get("reads_per_msg"), 3)), ""]
    plots = summary.get("plots")
    if plots:
        lines += ["## Plots", ""] + ["![%s](%s)" % (pl, pl) for pl in plots] + [""]
    idle = summary.get("idle")
    if idle:
        lines += ["## Idle scale", "",
                  "%d idle guest connections (%d VMs x %d) with 20 s heartbeats through "
                  "vmproxyd: %s open after %s s; RSS %d KiB before, %d KiB with them "
                  "(%s bytes per connection), %d KiB at the end; CPU %s s over %s s idle "
                  "(%s%% of one CPU); broker connections %s." % (
                      idle["connections"], idle["vms"], idle["conns_per_vm"],
                      idle.get("open_connections"), idle.get("connect_s"),
                      idle.get("rss_before_kib", 0), idle.get("rss_with_conns_kib", 0),
                      idle.get("rss_per_conn_bytes"), idle.get("rss_end_kib", 0),
                      idle.get("idle_cpu_s"), idle["idle_window_s"], idle.get("idle_cpu_pct"),
                      idle.get("broker_connections")), ""]
    cg = summary.get("callgrind")
    if cg:
        lines += ["## Cost per message (callgrind)", "",
                  "Ir(%d msgs) = %s, Ir(%d msgs) = %s: **%s instructions per 256-byte "
                  "message** inside vmproxyd." % (cg["n"], cg.get("ir_n"), 2 * cg["n"],
                                                   cg.get("ir_2n"), cg.get("ir_per_msg")), "",
                  "By object: " + ", ".join("%s %.0f" % kv for kv in
                                            cg.get("by_object", {}).items() if kv[1] >= 50),
                  "",
                  "Where they go: instructions per message by function (self cost, "
                  "Ir(2N) - Ir(N) per function, divided by N):", "", "```"]
        for t in cg.get("top", [])[:20]:
            lines.append("%10.1f  %s" % (t["ir_per_msg"], t["fn"][:150]))
        lines += ["```", "", "vmproxyd's own functions, inclusive cost per message:", "", "```"]
        for t in cg.get("top_inclusive_own", [])[:15]:
            lines.append("%10.1f  %s" % (t["ir_per_msg"], t["fn"][:150]))
        lines += ["```", ""]
    fair = summary.get("fairness")
    if fair:
        b, n = fair["baseline"], fair["noisy"]
        lines += ["## Fairness", "",
                  "| run | quiet msgs/s | quiet p50 us | quiet p99 us | quiet max us | "
                  "noisy msgs/s |", "|---|---:|---:|---:|---:|---:|"]
        for name, p in (("99 quiet VMs alone", b), ("with 1 noisy VM", n)):
            lat = p.get("quiet_latency_us") or {}
            lines.append("| %s | %s | %s | %s | %s | %s |" % (
                name, fmt(p.get("quiet_msgs_per_s"), 1), fmt(lat.get("p50")),
                fmt(lat.get("p99")), fmt(lat.get("max")), fmt(p.get("noisy_msgs_per_s"))))
        lines += ["", "Quiet-VM p99 ratio (noisy / alone): %s" % fmt(fair.get("p99_ratio"), 2),
                  ""]
    (ctx["out"] / "results.md").write_text("\n".join(lines))


def main():
    global _broker
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small matrix, short points")
    ap.add_argument("--build", default=str(TOP / "build-bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds per matrix point")
    ap.add_argument("--only", default="matrix,idle,callgrind,fairness,syscalls",
                    help="comma-separated parts to run (matrix, idle, callgrind, fairness, "
                    "syscalls)")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES),
                    help="comma-separated matrix topologies (%s)" % ", ".join(TOPOLOGIES))
    ap.add_argument("--conns", default=None,
                    help="comma-separated guest connection counts of the matrix (default: "
                         "10,100,1000; --quick: 10,100)")
    ap.add_argument("--max-in-flight", type=int, default=None,
                    help="vmproxyd's upstream.max_in_flight (default: its own default)")
    ap.add_argument("--docs", action="store_true",
                    help="copy the plots to docs/img/ (embedded by docs/performance.md)")
    ap.add_argument("--replot", metavar="DIR", default=None,
                    help="only redraw the plots (and results.md) of the run in DIR")
    args = ap.parse_args()
    topologies = [t for t in TOPOLOGIES if t in args.topologies.split(",")]
    unknown = set(args.topologies.split(",")) - set(TOPOLOGIES)
    parts = set(args.only.split(","))
    bad_parts = parts - {"matrix", "idle", "callgrind", "fairness", "syscalls"}
    if unknown or bad_parts:
        ap.error("unknown %s" % ", ".join(sorted(unknown | bad_parts)))
    if args.replot:
        rdir = pathlib.Path(args.replot).resolve()
        with open(rdir / "summary.json") as f:
            summary = json.load(f)
        summary["plots"] = make_plots(summary, rdir)
        with open(rdir / "summary.json", "w") as f:
            json.dump(summary, f, indent=1, default=str)
        try:
            write_markdown({"out": rdir, "duration": summary.get("duration_s", "?")}, summary)
        except (KeyError, TypeError) as e:  # an incomplete summary: the plots are drawn
            log("results.md not rewritten: missing %s" % e)
        if args.docs:
            copy_plots(summary["plots"], rdir, summary.get("mode"))
        return 0
    build = pathlib.Path(args.build).resolve()
    out = pathlib.Path(args.out or build / ("results-%s" % time.strftime("%Y%m%d-%H%M%S")))
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-bench-"))
    os.chmod(work, 0o755)
    if args.quick:
        ctx = dict(duration=args.duration or 4, conn_counts=[10, 100], sizes=[256],
                   idle_vms=100, idle_per_vm=10, idle_s=5, cg_n=1000, fair_s=5, sc_n=2000)
    else:
        ctx = dict(duration=args.duration or 15, conn_counts=[10, 100, 1000], sizes=[256, 4096],
                   idle_vms=1000, idle_per_vm=10, idle_s=30, cg_n=5000, fair_s=15, sc_n=20000)
    if args.conns:
        ctx["conn_counts"] = [int(c) for c in args.conns.split(",")]
    ctx["max_in_flight"] = args.max_in_flight
    ctx.update(build=build, out=out, work=work, vm_base="127.10.0.1", topologies=topologies)
    # SIGINT too: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    summary = {"mode": "quick" if args.quick else "full", "machine": machine(),
               "duration_s": ctx["duration"]}
    try:
        certs = ensure_certs(work / "certs")
        ctx["certs"] = certs
        log("starting RabbitMQ (results in %s)" % out)
        _broker = RabbitMQ(work / "rabbitmq", certs, nofile=20000)
        _broker.start()
        ctx["broker"] = _broker
        ctx["beam"] = find_beam(_broker.node.proc.pid)
        # Bound the queue: the oldest messages are dropped past the limit, and
        # every point also starts with a purge.
        _broker.ctl("set_policy", "-p", _broker.vhost, "--apply-to", "queues", "bench-bound",
                    "^vm\\.metrics\\.all$",
                    json.dumps({"max-length": QUEUE_MAX_LENGTH, "overflow": "drop-head"}))
        summary["queue_bound"] = {"policy": "max-length %d, overflow drop-head" % QUEUE_MAX_LENGTH}
        if "matrix" in parts:
            summary["matrix"] = run_matrix(ctx)
        else:
            summary["matrix"] = []
        if "idle" in parts:
            summary["idle"] = run_idle(ctx)
        if "fairness" in parts:
            summary["fairness"] = run_fairness(ctx)
        if "callgrind" in parts:
            summary["callgrind"] = run_callgrind(ctx)
        if "syscalls" in parts:
            summary["syscalls"] = run_syscalls(ctx)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        cleanup()
        return 130
    finally:
        try:
            summary["plots"] = make_plots(summary, out)
            if args.docs and summary["plots"]:
                copy_plots(summary["plots"], out, summary["mode"])
        except Exception as e:  # the numbers matter more than the pictures
            log("plots: %s" % e)
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=1, default=str)
        try:
            write_markdown(ctx, summary)
        except Exception as e:  # a partial run still leaves its JSON
            log("results.md: %s" % e)
        cleanup()
        shutil.rmtree(work, ignore_errors=True)
    log("done: %s" % (out / "results.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
