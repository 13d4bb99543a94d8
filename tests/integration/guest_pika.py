"""One simulated VM's pika clients, for scenarios that mix independent
clients with the C load generator.

Run as: /usr/bin/python3 guest_pika.py --source ADDR --port N --vm I
            --conns M --count K [--exchange E] [--hold]
Binds every socket to ADDR (the VM's identity as the proxy sees it), opens
M BlockingConnections, publishes K messages on each with confirms (body
{"vm":I,"conn":J,"seq":S}), prints one JSON line with per-connection ack
counts, then with --hold waits for a line on stdin before closing. A
connection that does not close cleanly is reported on stderr and makes the
exit status 1 (the JSON line is already out by then).
"""
import argparse
import json
import socket
import sys

from harness.vmproxyd import bound_socket_class

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--vm", type=int, required=True)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--exchange", default="metrics")
    ap.add_argument("--routing-key", default="pika")
    ap.add_argument("--hold", action="store_true")
    args = ap.parse_args()

    socket.socket = bound_socket_class(args.source)
    import pika  # noqa: E402 - after the socket patch

    params = pika.ConnectionParameters(host=args.host, port=args.port,
                                       credentials=pika.PlainCredentials("guest", "guest"),
                                       connection_attempts=3, retry_delay=0.5,
                                       blocked_connection_timeout=120)
    conns = []
    result = {"vm": args.vm, "acked": [], "nacked": [], "errors": []}
    for j in range(args.conns):
        c = pika.BlockingConnection(params)
        ch = c.channel()
        ch.confirm_delivery()
        conns.append((c, ch))
    for j, (c, ch) in enumerate(conns):
        acked = nacked = 0
        for seq in range(1, args.count + 1):
            body = json.dumps({"vm": args.vm, "conn": 100 + j, "seq": seq})
            try:
                ch.basic_publish(args.exchange, "%s.v%d.c%d" % (args.routing_key, args.vm, j),
                                 body.encode(),
                                 pika.BasicProperties(content_type="application/json",
                                                      delivery_mode=2))
                acked += 1
            except pika.exceptions.NackError:
                nacked += 1
            except Exception as e:  # noqa: BLE001 - reported to the test
                result["errors"].append("%s: %s" % (type(e).__name__, e))
                break
        result["acked"].append(acked)
        result["nacked"].append(nacked)
    print(json.dumps(result), flush=True)
    if args.hold:
        sys.stdin.readline()
    failed = 0
    for c, ch in conns:
        try:
            c.close()
        except Exception as e:  # noqa: BLE001 - reported to the test
            sys.stderr.write("close: %s: %s\n" % (type(e).__name__, e))
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
