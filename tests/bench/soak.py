#!/usr/bin/python3
"""Soak run of vmproxyd: guests publishing with confirms through broker faults.

Run through tests/bench/soak.sh (which builds the tree). Not a test: it runs
for --duration (20 minutes by default) and is not part of CI.

N simulated VMs (--vms, default 200), each a pika BlockingConnection from
its own loopback address, publish with confirms through vmproxyd (--threads
poll threads) to one private RabbitMQ (the integration harness). Every body
carries the VM and a sequence number; each guest keeps the sequence numbers
whose publish was confirmed (acked) by vmproxyd. Meanwhile:

- the broker is, at random intervals, killed (SIGKILL, then started again),
  frozen (SIGSTOP for 5-20 s, then SIGCONT) or restarted cleanly;
- guests close their connection after a random lifetime (mostly cleanly,
  sometimes by shutting the socket without connection.close) and reconnect;
- VMs are moved between poll threads with `vmproxyctl migrate`;
- vmproxyd's RSS and open descriptors are sampled every 10 s.

At the end the broker is made healthy, the guests stop, vmproxyd drains and
stops, and the queue vm.metrics.all (a quorum queue without a length limit)
is read back: every acked (VM, sequence) must be there. The exit status is
0 when nothing acked is missing, no guest stayed stuck and vmproxyd did not
die; 1 otherwise. Everything is on loopback; every wait is bounded; Ctrl-C
or SIGTERM stops everything started here.
"""
import argparse
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

TOP = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TOP / "tests" / "integration"))

import pika  # noqa: E402
import pika.exceptions  # noqa: E402

from harness.rabbitmq import RabbitMQ, ensure_certs  # noqa: E402
from harness.vmproxyd import VmProxyd, make_vms  # noqa: E402

T0 = time.monotonic()


def log(msg):
    print("[%s +%6.1fs] %s" % (time.strftime("%H:%M:%S"), time.monotonic() - T0, msg),
          flush=True)


# ---- guests -------------------------------------------------------------------------

# Sockets created by a guest thread connect from that guest's VM address
# (pika has no source-address option). The thread also remembers its last
# socket, so it can drop the connection without a connection.close.
_tls = threading.local()
_real_socket = socket.socket


class _SourceSocket(_real_socket):
    def _bind_source(self):
        src = getattr(_tls, "source", None)
        if src and self.family == socket.AF_INET:
            self.bind((src, 0))
            _tls.sock = self

    def connect(self, address):
        self._bind_source()
        return super().connect(address)

    def connect_ex(self, address):
        self._bind_source()
        return super().connect_ex(address)


socket.socket = _SourceSocket


class Guest(threading.Thread):
    """One VM: connect, publish with confirms at RATE msgs/s for a random
    lifetime, disconnect (cleanly or abruptly), reconnect, until STOP."""

    def __init__(self, vm, port, args, stop):
        super().__init__(name="guest-%d" % vm["index"], daemon=True)
        self.vm = vm
        self.port = port
        self.args = args
        self.stop = stop
        self.rng = random.Random(args.seed * 100003 + vm["index"])
        self.seq = 0
        self.acked = []          # sequence numbers confirmed by vmproxyd
        self.nacked = 0
        self.unknown = 0         # publishes whose outcome never came (connection lost)
        self.connects = 0
        self.connect_failures = 0
        self.clean_closes = 0
        self.abrupt_closes = 0
        self.lost_connections = 0
        self.errors = {}
        self.connected = False
        self.publishing_since = None

    def _err(self, e):
        k = type(e).__name__
        self.errors[k] = self.errors.get(k, 0) + 1

    def params(self):
        return pika.ConnectionParameters(
            host="127.0.0.1", port=self.port, credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1, socket_timeout=10, stack_timeout=30,
            blocked_connection_timeout=300)

    def run(self):
        _tls.source = self.vm["address"]
        pad = "x" * max(0, self.args.size - 60)
        rate = self.args.rate
        while not self.stop.is_set():
            try:
                conn = pika.BlockingConnection(self.params())
                ch = conn.channel()
                ch.confirm_delivery()
            except Exception as e:  # the proxy refused or the link is down: retry
                self.connect_failures += 1
                self._err(e)
                self.stop.wait(self.rng.uniform(0.5, 3.0))
                continue
            self.connects += 1
            self.connected = True
            life_end = time.monotonic() + self.rng.uniform(self.args.life_min, self.args.life_max)
            alive = True
            while alive and not self.stop.is_set() and time.monotonic() < life_end:
                self.seq += 1
                body = json.dumps({"vm": self.vm["index"], "seq": self.seq,
                                   "conn": self.connects, "pad": pad}).encode()
                self.publishing_since = time.monotonic()
                try:
                    ch.basic_publish("metrics", "soak.v%d" % self.vm["index"], body,
                                     pika.BasicProperties(content_type="application/json",
                                                          delivery_mode=2))
                    self.acked.append(self.seq)
                except pika.exceptions.NackError:
                    self.nacked += 1
                except Exception as e:  # connection or channel lost: outcome unknown
                    self.unknown += 1
                    self.lost_connections += 1
                    self._err(e)
                    alive = False
                self.publishing_since = None
                if alive:
                    try:
                        conn.sleep(min(self.rng.expovariate(rate), 5.0 / rate))
                    except Exception as e:
                        self.lost_connections += 1
                        self._err(e)
                        alive = False
            self.connected = False
            if alive and self.rng.random() < self.args.abrupt:
                # Drop the connection without connection.close.
                try:
                    _tls.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.abrupt_closes += 1
            elif alive:
                self.clean_closes += 1
            try:
                conn.close()
            except Exception:  # already gone
                pass
            if not self.stop.is_set():
                self.stop.wait(self.rng.uniform(0.2, 2.0))


# ---- vmproxyd and the broker ------------------------------------------------------------

def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class Sampler(threading.Thread):
    """vmproxyd's RSS and open descriptors every INTERVAL seconds, with the
    number of connected guests at that moment."""

    def __init__(self, px, guests, interval, stop):
        super().__init__(name="sampler", daemon=True)
        self.px, self.guests, self.interval, self.stop = px, guests, interval, stop
        self.t0 = time.monotonic()  # reset when the guests start
        self.samples = []
        self.died = None

    def sample(self):
        pid = self.px.proc.pid
        if self.px.proc.poll() is not None:
            self.died = self.px.proc.returncode
            return False
        try:
            s = {"t": round(time.monotonic() - self.t0, 1), "rss_kib": proc_rss_kib(pid),
                 "fds": proc_fds(pid),
                 "guests_connected": sum(1 for g in self.guests if g.connected)}
        except OSError:
            return True
        self.samples.append(s)
        return True

    def run(self):
        while not self.stop.wait(self.interval):
            if not self.sample():
                log("vmproxyd exited with status %s" % self.died)
                return


class Migrator(threading.Thread):
    """Every few seconds, move a random connected VM to another poll thread
    with vmproxyctl migrate; counts the outcomes."""

    def __init__(self, px, threads, args, stop):
        super().__init__(name="migrator", daemon=True)
        self.px, self.threads, self.args, self.stop = px, threads, args, stop
        self.rng = random.Random(args.seed + 7)
        self.outcomes = {}

    def count(self, k):
        self.outcomes[k] = self.outcomes.get(k, 0) + 1

    def run(self):
        while not self.stop.wait(self.rng.uniform(self.args.migrate_min, self.args.migrate_max)):
            try:
                vms = self.px.admin("vms")["vms"]
            except Exception:  # admin socket busy or daemon draining
                self.count("listing failed")
                continue
            if not vms:
                continue
            v = self.rng.choice(vms)
            to = self.rng.choice([t for t in range(self.threads) if t != v["thread"]])
            try:
                r = subprocess.run([self.px.ctl, "--socket", self.px.admin_path, "migrate",
                                    v["name"], str(to)], capture_output=True, text=True,
                                   timeout=60)
            except subprocess.TimeoutExpired:
                self.count("vmproxyctl timed out")
                continue
            if r.returncode == 0 and "moved from thread" in r.stdout:
                self.count("moved")
            else:
                # e.g. abandoned because the link was down and the VM's
                # messages could not be confirmed in migrate_timeout_ms.
                msg = (r.stderr or r.stdout).strip().splitlines()
                self.count("refused: %s" % (re.sub(r"\d+", "N", msg[-1][:80]) if msg
                                            else "status %d" % r.returncode))


def fault(broker, action, rng, stop):
    """Inject one broker fault; returns how long the broker was unusable."""
    t = time.monotonic()
    if action == "kill":
        broker.kill()
        broker.start()
    elif action == "freeze":
        broker.freeze()
        stop.wait(rng.uniform(5, 20))
        broker.thaw()
    elif action == "restart":
        broker.stop(timeout=60)
        broker.start()
    return round(time.monotonic() - t, 1)


def read_back(broker, timeout):
    """Consume everything in the queue; returns ({vm: {seq: count}}, foreign
    bodies, total)."""
    found = {}
    foreign = 0
    total = 0
    deadline = time.monotonic() + timeout
    with broker.connection(socket_timeout=30) as conn:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=2000)
        last = None
        for method, props, body in ch.consume(broker.queue, auto_ack=False,
                                              inactivity_timeout=2):
            if method is None:
                if last is not None:
                    ch.basic_ack(last, multiple=True)
                    last = None
                if ch.queue_declare(broker.queue, passive=True).method.message_count == 0:
                    break
            else:
                total += 1
                last = method.delivery_tag
                try:
                    d = json.loads(body)
                    per = found.setdefault(int(d["vm"]), {})
                    per[int(d["seq"])] = per.get(int(d["seq"]), 0) + 1
                except (ValueError, KeyError, TypeError):
                    foreign += 1
                if total % 1000 == 0:
                    ch.basic_ack(last, multiple=True)
                    last = None
            if time.monotonic() >= deadline:
                log("read-back: time is up with %d messages read" % total)
                break
        if last is not None:
            ch.basic_ack(last, multiple=True)
        ch.cancel()
    return found, foreign, total


def flatness(samples, warmup_s, key):
    after = [s for s in samples if s["t"] >= warmup_s]
    if len(after) < 2:
        return None
    first, last = after[0], after[-1]
    n = len(after)
    mt = sum(s["t"] for s in after) / n
    mv = sum(s[key] for s in after) / n
    var = sum((s["t"] - mt) ** 2 for s in after)
    slope = sum((s["t"] - mt) * (s[key] - mv) for s in after) / var if var else 0.0
    return {"warmup_t": first["t"], "warmup": first[key], "end_t": last["t"], "end": last[key],
            "samples": n,
            "min": min(s[key] for s in after), "max": max(s[key] for s in after),
            "end_over_warmup": round(last[key] / first[key], 3) if first[key] else None,
            "slope_per_10min": round(slope * 600, 1)}


# ---- main -----------------------------------------------------------------------------------

_stop_all = threading.Event()


def on_signal(sig, frame):
    raise KeyboardInterrupt()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=str(TOP / "build-soak"))
    ap.add_argument("--out", default=None, help="results directory")
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--duration", type=float, default=1200, help="seconds of chaos")
    ap.add_argument("--threads", type=int, default=4, help="vmproxyd poll threads")
    ap.add_argument("--rate", type=float, default=2.0, help="messages/s per VM")
    ap.add_argument("--size", type=int, default=200, help="body bytes (about)")
    ap.add_argument("--fault-gap", default="15,45",
                    help="MIN,MAX seconds between the end of a broker fault and the next")
    ap.add_argument("--migrate-min", type=float, default=2.0)
    ap.add_argument("--migrate-max", type=float, default=6.0)
    ap.add_argument("--life-min", type=float, default=10.0,
                    help="shortest guest connection lifetime, s")
    ap.add_argument("--life-max", type=float, default=90.0)
    ap.add_argument("--abrupt", type=float, default=0.2,
                    help="share of guest disconnects without connection.close")
    ap.add_argument("--sample", type=float, default=10.0, help="RSS/fd sampling interval, s")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds after which RSS and fds should stay flat "
                    "(default: a quarter of the run, at most 120)")
    ap.add_argument("--vm-base", default="127.20.0.1")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    if args.vms < 1 or args.vms > 5000 or args.threads < 2 or args.duration <= 0 or \
            args.rate <= 0 or not 0 <= args.abrupt <= 1:
        ap.error("need 1 <= --vms <= 5000, --threads >= 2, --duration > 0, --rate > 0, "
                 "0 <= --abrupt <= 1")
    gap_min, gap_max = (float(x) for x in args.fault_gap.split(","))
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    warmup = args.warmup if args.warmup is not None else min(120.0, args.duration / 4)
    build = pathlib.Path(args.build).resolve()
    out = pathlib.Path(args.out or build / ("soak-%s" % time.strftime("%Y%m%d-%H%M%S")))
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-soak-"))
    os.chmod(work, 0o755)
    # SIGINT too: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rng = random.Random(args.seed)
    res = {"args": vars(args), "warmup_s": warmup, "faults": []}
    broker = px = None
    guests = []
    stop_guests = threading.Event()
    stop_side = threading.Event()
    sampler = migrator = None
    status = 1
    try:
        certs = ensure_certs(work / "certs")
        log("starting RabbitMQ; %d VMs, %d poll threads, %.0f s, seed %d; results in %s"
            % (args.vms, args.threads, args.duration, args.seed, out))
        broker = RabbitMQ(work / "rabbitmq", certs, nofile=max(4096, 4 * args.vms),
                          boot_timeout=180)
        broker.start()
        vms = make_vms(args.vms, args.vm_base)
        (work / "vmproxyd").mkdir()
        px = VmProxyd(build, work / "vmproxyd", broker, certs, vms, threads=args.threads,
                      guest={"max_connections_per_vm": 4},
                      extra={"log_level": "warn", "balancer": {"enabled": False}})
        px.start(timeout=120)
        sampler = Sampler(px, guests, args.sample, stop_side)
        guests.extend(Guest(v, px.port, args, stop_guests) for v in vms)
        sampler.t0 = time.monotonic()
        sampler.sample()
        for g in guests:
            g.start()
        sampler.start()
        migrator = Migrator(px, args.threads, args, stop_side)
        migrator.start()
        t_end = time.monotonic() + args.duration
        cycle = []
        while time.monotonic() < t_end and sampler.died is None:
            gap = rng.uniform(gap_min, gap_max)
            if time.monotonic() + gap >= t_end:
                time.sleep(max(0.0, t_end - time.monotonic()))
                break
            time.sleep(gap)
            if sampler.died is not None:
                break
            if not cycle:  # every kind of fault once per cycle, in random order
                cycle = ["kill", "freeze", "restart"]
                rng.shuffle(cycle)
            action = cycle.pop()
            log("broker: %s" % action)
            took = fault(broker, action, rng, _stop_all)
            res["faults"].append({"t": round(time.monotonic() - T0, 1), "action": action,
                                  "outage_s": took})
            log("broker: %s done (%.1f s)" % (action, took))
            acked = sum(len(g.acked) for g in guests)
            log("so far: %d acked, %d guests connected, migrations %s"
                % (acked, sum(1 for g in guests if g.connected), migrator.outcomes))
        # ---- wind down ----
        log("chaos over; making sure the broker and the links are up")
        broker.ensure_running()
        try:
            px.wait_links(True, 180)
        except AssertionError as e:
            res["links_not_up"] = str(e)[:300]
            log("links: %s" % e)
        sampler.sample()
        stop_side.set()
        stop_guests.set()
        deadline = time.monotonic() + 180
        for g in guests:
            g.join(max(0.1, deadline - time.monotonic()))
        stuck = [g for g in guests if g.is_alive()]
        res["stuck_guests"] = [{"vm": g.vm["name"], "publishing_for_s":
                                round(time.monotonic() - g.publishing_since, 1)
                                if g.publishing_since else None} for g in stuck]
        migrator.join(60)
        sampler.join(30)
        res["samples"] = sampler.samples
        res["vmproxyd_died"] = sampler.died
        res["migrations"] = migrator.outcomes
        log("stopping vmproxyd (drain)")
        res["vmproxyd_exit"] = px.stop(timeout=60)
        depth = broker.queue_depth(broker.queue)
        log("reading back %d messages" % depth)
        found, foreign, total = read_back(broker, timeout=max(300, depth / 500))
        acked = {g.vm["index"]: set(g.acked) for g in guests}
        lost = {}
        dups = 0
        extra = 0
        for vm, seqs in acked.items():
            have = found.get(vm, {})
            miss = sorted(s for s in seqs if s not in have)
            if miss:
                lost[vm] = miss
            dups += sum(c - 1 for c in have.values() if c > 1)
            extra += sum(1 for s in have if s not in seqs)
        n_acked = sum(len(s) for s in acked.values())
        n_lost = sum(len(v) for v in lost.values())
        res.update({
            "acked": n_acked, "in_queue": total, "foreign_bodies": foreign,
            "lost_acked": n_lost, "lost_sample": {str(k): v[:10] for k, v in
                                                  list(lost.items())[:10]},
            "duplicates": dups, "unacked_but_delivered": extra,
            "nacked": sum(g.nacked for g in guests),
            "unknown_outcome": sum(g.unknown for g in guests),
            "guest_connects": sum(g.connects for g in guests),
            "guest_connect_failures": sum(g.connect_failures for g in guests),
            "guest_clean_closes": sum(g.clean_closes for g in guests),
            "guest_abrupt_closes": sum(g.abrupt_closes for g in guests),
            "guest_connections_lost": sum(g.lost_connections for g in guests),
            "guest_errors": {},
            "rss_kib": flatness(sampler.samples, warmup, "rss_kib"),
            "fds": flatness(sampler.samples, warmup, "fds"),
        })
        for g in guests:
            for k, v in g.errors.items():
                res["guest_errors"][k] = res["guest_errors"].get(k, 0) + v
        ok = n_lost == 0 and not stuck and sampler.died is None and n_acked > 0
        res["verdict"] = "pass" if ok else "FAIL"
        status = 0 if ok else 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        res["verdict"] = "interrupted"
        status = 130
    except Exception as e:  # report what happened, then clean up
        import traceback
        traceback.print_exc()
        res["verdict"] = "error: %s: %s" % (type(e).__name__, str(e)[:300])
        status = 1
    finally:
        _stop_all.set()
        stop_side.set()
        stop_guests.set()
        if px is not None:
            try:
                if res.get("verdict") == "interrupted":
                    px.kill()
                else:
                    px.stop(timeout=30)
            except Exception as e:  # keep cleaning up
                log("stopping vmproxyd: %s" % e)
            try:
                shutil.copyfile(px.log_path, out / "vmproxyd.log")
            except OSError:
                pass
        if broker is not None:
            try:
                broker.close()
            except Exception as e:
                log("stopping the broker: %s" % e)
        with open(out / "soak.json", "w") as f:
            json.dump(res, f, indent=1, default=str)
        shutil.rmtree(work, ignore_errors=True)
    report(res, out)
    return status


def report(res, out):
    a = res["args"]
    lines = ["soak: %s VMs, %s poll threads, %s s, %s msgs/s per VM, seed %s"
             % (a["vms"], a["threads"], a["duration"], a["rate"], a["seed"])]
    faults = {}
    for f in res.get("faults", []):
        faults.setdefault(f["action"], []).append(f["outage_s"])
    lines.append("broker faults: %s" % (", ".join(
        "%s x%d (%s s)" % (k, len(v), "/".join("%.0f" % x for x in v))
        for k, v in sorted(faults.items())) or "none"))
    if "acked" in res:
        lines += [
            "guests: %d connections opened, %d connect attempts refused or failed, %d clean "
            "closes, %d abrupt closes, %d connections lost mid-publish"
            % (res["guest_connects"], res["guest_connect_failures"],
               res["guest_clean_closes"], res["guest_abrupt_closes"],
               res["guest_connections_lost"]),
            "migrations: %s" % (res.get("migrations") or {}),
            "messages: %d acked, %d nacked, %d without an outcome; %d in the queue "
            "(%d duplicates, %d delivered but not acked to the guest, %d foreign)"
            % (res["acked"], res["nacked"], res["unknown_outcome"], res["in_queue"],
               res["duplicates"], res["unacked_but_delivered"], res["foreign_bodies"]),
            "ACKED LOST: %d" % res["lost_acked"],
            "stuck guests: %d" % len(res.get("stuck_guests", []))]
        for key, unit in (("rss_kib", " KiB"), ("fds", "")):
            fl = res.get(key)
            if fl:
                lines.append("vmproxyd %s: %s%s at warm-up (t=%ss), %s%s at the end (t=%ss), "
                             "min %s max %s over %d samples after warm-up, end/warm-up %s, "
                             "linear trend %s%s per 10 min (fit over %.0f s)"
                             % (key, fl["warmup"], unit, fl["warmup_t"], fl["end"], unit,
                                fl["end_t"], fl["min"], fl["max"], fl["samples"],
                                fl["end_over_warmup"], fl["slope_per_10min"], unit,
                                fl["end_t"] - fl["warmup_t"]))
        lines.append("vmproxyd exit status after drain: %s" % res.get("vmproxyd_exit"))
    lines.append("verdict: %s" % res.get("verdict"))
    text = "\n".join(lines)
    (out / "soak.txt").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
