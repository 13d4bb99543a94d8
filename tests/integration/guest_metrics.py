"""One simulated VM publishing metric samples through vmproxyd with pika.

Run as: /usr/bin/python3 guest_metrics.py --source ADDR --port N --name NAME
            [--rate R] [--exchange E]
Binds its socket to ADDR (the VM's identity as the proxy sees it), opens one
BlockingConnection with publisher confirms, and publishes samples of the
vmproxy.metrics/1 form (a fresh host.boot_id, seq 1, 2, ...) at about R per
second, each waiting for its confirm, until a line arrives on stdin. Prints a
"ready" line once connected and, at the end, one JSON line:
{"name", "boot_id", "acked": [seq...], "nacked": [seq...], "errors": [...]}.
Any connection or channel failure ends publishing and is reported: a guest
that must stay connected throughout checks that errors is empty.
"""
import argparse
import json
import os
import select
import socket
import sys
import time
import uuid

from harness.vmproxyd import bound_socket_class


def sample(name, boot_id, seq):
    return {
        "schema": "vmproxy.metrics/1", "seq": seq, "time_ms": int(time.time() * 1000),
        "interval_s": 1,
        "host": {"hostname": name, "boot_id": boot_id},
        "cpu": {"count": 1, "busy_pct": 1.5, "total": {}, "per_core": []},
    }


def stdin_ready():
    return bool(select.select([sys.stdin], [], [], 0)[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--exchange", default="metrics")
    args = ap.parse_args()

    socket.socket = bound_socket_class(args.source)
    import pika  # noqa: E402 - after the socket patch

    boot_id = str(uuid.UUID(bytes=os.urandom(16), version=4))
    result = {"name": args.name, "boot_id": boot_id, "acked": [], "nacked": [], "errors": []}
    params = pika.ConnectionParameters(host=args.host, port=args.port,
                                       credentials=pika.PlainCredentials("guest", "guest"),
                                       connection_attempts=3, retry_delay=0.5,
                                       heartbeat=10, blocked_connection_timeout=300)
    conn = None
    try:
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.confirm_delivery()
        print("ready", flush=True)
        period = 1.0 / args.rate
        seq = 0
        next_at = time.monotonic()
        while not stdin_ready():
            seq += 1
            body = json.dumps(sample(args.name, boot_id, seq)).encode()
            try:
                ch.basic_publish(args.exchange, "metrics." + args.name, body,
                                 pika.BasicProperties(content_type="application/json",
                                                      delivery_mode=2))
                result["acked"].append(seq)
            except pika.exceptions.NackError:
                result["nacked"].append(seq)
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                conn.sleep(delay)  # heartbeats keep flowing
            else:
                next_at = time.monotonic()
    except Exception as e:  # noqa: BLE001 - reported to the test
        result["errors"].append("%s: %s" % (type(e).__name__, e))
    finally:
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception as e:  # noqa: BLE001
                result["errors"].append("close: %s" % e)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
