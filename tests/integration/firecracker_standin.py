"""The host side of Firecracker's hybrid vsock, standing in for a
Firecracker process in tests: it listens on UDS_PATH (Firecracker's own
socket, where host-initiated connections say "CONNECT <port>"), and for
every guest connection to host port PORT (here: a TCP connection to
--guest-listen, playing the guest's vsock) it connects to UDS_PATH_PORT,
as Firecracker does, and relays the plain byte stream both ways.

Prints "ready <tcp port>" once both sockets listen; exits on SIGTERM.
"""
import argparse
import os
import signal
import socket
import sys
import threading


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def guest_connection(guest, target):
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        host.connect(target)
    except OSError as e:
        print("connect %s: %s" % (target, e), file=sys.stderr, flush=True)
        guest.close()
        return
    threading.Thread(target=pump, args=(guest, host), daemon=True).start()
    threading.Thread(target=pump, args=(host, guest), daemon=True).start()


def host_side(listener):
    # Host-initiated connections: read the CONNECT line and drop them (no
    # guest listens in this stand-in).
    while True:
        c, _ = listener.accept()
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds-path", required=True)
    ap.add_argument("--port", type=int, default=5672)
    ap.add_argument("--guest-listen", default="127.0.0.1")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    os.makedirs(os.path.dirname(a.uds_path), exist_ok=True)
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uds.bind(a.uds_path)
    uds.listen(16)
    threading.Thread(target=host_side, args=(uds,), daemon=True).start()
    guests = socket.socket()
    guests.bind((a.guest_listen, 0))
    guests.listen(16)
    print("ready %d" % guests.getsockname()[1], flush=True)
    target = "%s_%d" % (a.uds_path, a.port)
    while True:
        g, _ = guests.accept()
        guest_connection(g, target)


if __name__ == "__main__":
    main()
