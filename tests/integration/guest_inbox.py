"""One simulated VM's pika guest consuming its inbox through vmproxyd, as a
process of its own (so that a test can SIGKILL it).

Run as: /usr/bin/python3 guest_inbox.py --source ADDR --port N [--prefetch P]
Binds its socket to ADDR (the VM's identity as the proxy sees it),
declares the virtual queue "inbox", consumes it with basic.qos P and
prints "ready", then one JSON line per delivery:
    {"tag": T, "body": "...", "redelivered": bool, "routing_key": "..."}
It acks nothing until told. Commands, one a line on stdin:
    ack      ack every delivery held so far (one basic.ack each), and from
             then on ack each new delivery DELAY seconds after it came
    hold     stop acking new deliveries
    stop     close the connection; prints {"acked": [tags], "errors": [...]}
             and exits 0 if the connection stayed up throughout
"""
import argparse
import json
import queue
import socket
import sys
import threading
import time

from harness.vmproxyd import bound_socket_class


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefetch", type=int, default=5)
    ap.add_argument("--delay", type=float, default=0.02, help="seconds before each ack")
    args = ap.parse_args()

    socket.socket = bound_socket_class(args.source)
    import pika  # noqa: E402 - after the socket patch

    params = pika.ConnectionParameters(host=args.host, port=args.port, heartbeat=0,
                                       connection_attempts=1, socket_timeout=10)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare("inbox")
    ch.basic_qos(prefetch_count=args.prefetch)
    held = []      # tags not acked yet, in order
    due = []       # (monotonic time, tag) to ack when acking
    acked = []
    acking = False

    def on_message(c, m, p, body):
        print(json.dumps({"tag": m.delivery_tag, "body": body.decode(),
                          "redelivered": bool(m.redelivered),
                          "routing_key": m.routing_key}), flush=True)
        if acking:
            due.append((time.monotonic() + args.delay, m.delivery_tag))
        else:
            held.append(m.delivery_tag)

    ch.basic_consume("inbox", on_message)
    print("ready", flush=True)

    commands = queue.Queue()

    def read_stdin():
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("stop")
    threading.Thread(target=read_stdin, daemon=True).start()

    errors = []
    try:
        while True:
            conn.process_data_events(time_limit=0.05)
            now = time.monotonic()
            while due and due[0][0] <= now:
                tag = due.pop(0)[1]
                ch.basic_ack(tag)
                acked.append(tag)
            try:
                cmd = commands.get_nowait()
            except queue.Empty:
                continue
            if cmd == "ack":
                for tag in held:
                    ch.basic_ack(tag)
                    acked.append(tag)
                held = []
                acking = True
            elif cmd == "hold":
                acking = False
                held.extend(t for _, t in due)
                due = []
            elif cmd == "stop":
                break
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.append("%s: %s" % (type(e).__name__, e))
    try:
        conn.close()
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.append("close: %s: %s" % (type(e).__name__, e))
    print(json.dumps({"acked": acked, "errors": errors}), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
