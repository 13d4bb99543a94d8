"""Many simulated VMs publishing metric samples through vmproxyd with pika,
one thread and one connection per VM, in one process.

Run as: /usr/bin/python3 guest_fleet.py --base ADDR --count N --prefix P
            --port PORT [--rate R]
VM i is named "P-%03d" % i and connects from the address BASE + i (the VM's
identity as the proxy sees it, as harness.vmproxyd.make_vms numbers them).
Each publishes samples of the vmproxy.metrics/1 form (its own fresh
host.boot_id, seq 1, 2, ...) at about R per second, each waiting for its
confirm, until a line arrives on stdin. Prints "ready" once every VM is
connected and, at the end, one JSON line: a list of
{"name", "boot_id", "acked": [seq...], "nacked": [seq...], "errors": [...]}.
"""
import argparse
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import uuid

_real_socket = socket.socket
_where = threading.local()


class _BoundSocket(_real_socket):
    """Binds IPv4 sockets to the calling thread's source address."""
    def connect(self, address):
        if self.family == socket.AF_INET and getattr(_where, "source", None):
            self.bind((_where.source, 0))
        return super().connect(address)

    def connect_ex(self, address):
        if self.family == socket.AF_INET and getattr(_where, "source", None):
            self.bind((_where.source, 0))
        return super().connect_ex(address)


socket.socket = _BoundSocket
import pika  # noqa: E402 - after the socket patch


def sample(name, boot_id, seq):
    return {"schema": "vmproxy.metrics/1", "seq": seq, "time_ms": int(time.time() * 1000),
            "interval_s": 1, "host": {"hostname": name, "boot_id": boot_id},
            "cpu": {"count": 1, "busy_pct": float(seq % 100), "total": {}, "per_core": []}}


def vm(args, i, ready, stop, result):
    _where.source = str(ipaddress.IPv4Address(args.base) + i)
    name = result["name"]
    conn = None
    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=args.port, credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=5, retry_delay=0.5, heartbeat=30,
            blocked_connection_timeout=300))
        ch = conn.channel()
        ch.confirm_delivery()
        ready.release()
        period = 1.0 / args.rate
        next_at = time.monotonic() + period * (i % 10) / 10.0
        seq = 0
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                conn.sleep(min(delay, 0.2))
                continue
            seq += 1
            body = json.dumps(sample(name, result["boot_id"], seq)).encode()
            try:
                ch.basic_publish("metrics", "metrics." + name, body,
                                 pika.BasicProperties(content_type="application/json",
                                                      delivery_mode=2))
                result["acked"].append(seq)
            except pika.exceptions.NackError:
                result["nacked"].append(seq)
            next_at += period
    except Exception as e:  # noqa: BLE001 - reported to the test
        result["errors"].append("%s: %s" % (type(e).__name__, e))
        ready.release()
    finally:
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception as e:  # noqa: BLE001
                result["errors"].append("close: %s" % e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1.0)
    args = ap.parse_args()
    ready = threading.Semaphore(0)
    stop = threading.Event()
    results = [{"name": "%s-%03d" % (args.prefix, i),
                "boot_id": str(uuid.UUID(bytes=os.urandom(16), version=4)),
                "acked": [], "nacked": [], "errors": []} for i in range(args.count)]
    threads = [threading.Thread(target=vm, args=(args, i, ready, stop, results[i]), daemon=True)
               for i in range(args.count)]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire()
    print("ready", flush=True)
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(60)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
