#!/usr/bin/env python3
"""Writes the seed corpus of fuzz-upstream_proto: what a broker sends to
the upstream link, after one control byte (bit 0: EXTERNAL instead of
PLAIN; bit 1: feed in small chunks; bit 2: leave output unread at times;
bit 3: let time run fast, past heartbeat deadlines). Valid sessions and
near-valid hostile ones. Standard library only.

    tests/fuzz/gen-corpus-upstream.py tests/fuzz/corpus/upstream_proto
"""
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module  # noqa: E402

g = import_module("gen-corpus")
frame, shortstr, longstr, table, deep_table, method = (
    g.frame, g.shortstr, g.longstr, g.table, g.deep_table, g.method)


def start(mechs="PLAIN AMQPLAIN EXTERNAL", props=None):
    if props is None:
        props = table([("product", b"S", longstr("RabbitMQ")),
                       ("capabilities", b"F",
                        table([("publisher_confirms", b"t", b"\x01"),
                               ("connection.blocked", b"t", b"\x01")]))])
    return method(0, 10, 10, b"\x00\x09" + props + longstr(mechs) + longstr("en_US"))


def tune(channel_max=2047, frame_max=131072, heartbeat=60):
    return method(0, 10, 30, struct.pack(">HIH", channel_max, frame_max, heartbeat))


OPEN_OK = method(0, 10, 41, shortstr(""))
CHANNEL_OPEN_OK = method(1, 20, 11, longstr(""))
SELECT_OK = method(1, 85, 11)
HANDSHAKE = start() + tune() + OPEN_OK + CHANNEL_OPEN_OK + SELECT_OK
HEARTBEAT = frame(8, 0, b"")


def ack(tag, multiple=False):
    return method(1, 60, 80, struct.pack(">QB", tag, 1 if multiple else 0))


def nack(tag, multiple=False, requeue=False):
    return method(1, 60, 120, struct.pack(">QB", tag, (1 if multiple else 0) | (2 if requeue else 0)))


def conn_close(code, text, cls=0, mid=0):
    return method(0, 10, 50, struct.pack(">H", code) + shortstr(text) + struct.pack(">HH", cls, mid))


def chan_close(code, text):
    return method(1, 20, 40, struct.pack(">H", code) + shortstr(text) + struct.pack(">HH", 60, 40))


def basic_return(code=312, text="NO_ROUTE", exchange="x", rk="rk"):
    return method(1, 60, 50, struct.pack(">H", code) + shortstr(text) + shortstr(exchange)
                  + shortstr(rk))


def content_header(size, props=b"\x00\x00"):
    return frame(2, 1, struct.pack(">HHQ", 60, 0, size) + props)


IB = 2


def ib_method(cls, mid, args=b""):
    return method(IB, cls, mid, args)


INBOX_ANSWERS = (ib_method(20, 11, longstr("")) + ib_method(50, 11, shortstr("q") + struct.pack(">II", 3, 0))
                 + ib_method(50, 21) + ib_method(60, 11) + ib_method(60, 21, shortstr("vmproxyd.0.1")))


def deliver(tag, body=b"ctl", redelivered=False):
    return (ib_method(60, 60, shortstr("vmproxyd.0.1") + struct.pack(">QB", tag, 1 if redelivered else 0)
                      + shortstr("vm.control") + shortstr("u.cmd"))
            + frame(2, IB, struct.pack(">HHQ", 60, 0, len(body)) + b"\x00\x00")
            + (frame(3, IB, body) if body else b""))


def seeds():
    hs = HANDSHAKE
    yield "valid-handshake", b"\x00" + hs
    yield "valid-handshake-external-chunked", b"\x03" + hs
    yield "valid-acks", b"\x00" + hs + ack(1) + ack(3) + ack(2) + HEARTBEAT + ack(6, True)
    yield "valid-acks-chunked", b"\x02" + hs + ack(2, True) + nack(3) + ack(6, True)
    yield "valid-nack-multiple", b"\x00" + hs + nack(3, True) + ack(4)
    yield "valid-blocked", (b"\x00" + hs + method(0, 10, 60, shortstr("low on memory")) +
                            method(0, 10, 61) + ack(1))
    yield "valid-heartbeats", b"\x08" + hs + HEARTBEAT * 4 + ack(1)
    yield "valid-close-ok", b"\x00" + hs + method(0, 10, 51)
    yield "valid-output-piles-up", b"\x06" + hs + HEARTBEAT * 20
    yield "valid-flow", b"\x00" + hs + method(1, 20, 20, b"\x00") + method(1, 20, 20, b"\x01")
    yield "valid-return", (b"\x00" + hs + basic_return() + content_header(4) + frame(3, 1, b"body")
                           + ack(1))
    yield "valid-return-chunked", (b"\x02" + hs + basic_return() + content_header(4)
                                   + HEARTBEAT + frame(3, 1, b"bo") + frame(3, 1, b"dy") + ack(1))
    yield "valid-return-empty-body", b"\x00" + hs + basic_return() + content_header(0) + ack(1)
    yield "hostile-return-oversize", b"\x00" + hs + basic_return() + content_header(1 << 40)
    yield "hostile-return-then-method", b"\x00" + hs + basic_return() + ack(1)
    yield "hostile-return-long-body", (b"\x00" + hs + basic_return() + content_header(2)
                                       + frame(3, 1, b"abc"))
    yield "broker-close-mid-handshake", b"\x00" + start() + conn_close(403, "ACCESS_REFUSED - Login was refused")
    yield "broker-close-after-tune", b"\x00" + start() + tune() + conn_close(530, "NOT_ALLOWED - vhost")
    yield "broker-channel-close", b"\x00" + hs + ack(1) + chan_close(403, "ACCESS_REFUSED - write")
    yield "broker-conn-close-forced", b"\x00" + hs + conn_close(320, "CONNECTION_FORCED - shutdown")
    yield "hostile-ack-unknown-tag", b"\x00" + hs + ack(1000)
    yield "hostile-ack-tag-zero", b"\x00" + hs + ack(0)
    yield "hostile-frame-max-small", b"\x00" + start() + tune(frame_max=512)
    yield "hostile-frame-max-zero", b"\x00" + start() + tune(frame_max=0, heartbeat=0) + OPEN_OK
    yield "hostile-oversize-frame", b"\x00" + hs + struct.pack(">BHI", 1, 1, 1 << 20) + b"x" * 64
    yield "hostile-bad-frame-end", b"\x00" + hs + frame(1, 1, struct.pack(">HH", 60, 80) + b"\0" * 9, b"\x00")
    yield "hostile-deep-server-props", b"\x00" + start(props=deep_table(200))
    yield "hostile-bad-table", b"\x00" + start(props=struct.pack(">I", 10) + b"\x03key\x7fxxxxxx")
    yield "hostile-no-mechanism", b"\x01" + start(mechs="PLAIN")
    yield "hostile-wrong-version", b"\x00" + method(0, 10, 10, b"\x08\x00" + table([]) + longstr("PLAIN") + longstr("en_US"))
    yield "hostile-content-frames", b"\x00" + hs + frame(2, 1, b"\0" * 14) + frame(3, 1, b"abc")
    yield "hostile-unknown-channel", b"\x00" + hs + method(7, 60, 80, struct.pack(">QB", 1, 0))
    yield "hostile-unknown-frame-type", b"\x00" + hs + frame(9, 0, b"")
    yield "hostile-short-method", b"\x00" + hs + frame(1, 1, b"\x00")
    yield "hostile-truncated-ack", b"\x00" + hs + frame(1, 1, struct.pack(">HH", 60, 80) + b"\0\0")
    yield "hostile-methods-out-of-order", b"\x00" + tune() + start() + SELECT_OK + OPEN_OK
    yield "hostile-heartbeat-payload", b"\x00" + hs + frame(8, 0, b"xx")
    yield "hostile-short-input", b"\x00AM"
    yield "hostile-garbage", b"\x02" + bytes(range(256)) * 4
    # bit 4: the engine declares, binds, consumes and gets on the inbox channel
    # once ready; small chunks (bit 1) and heartbeats as padding let the
    # requests go out before the answers are read.
    hs = HANDSHAKE + HEARTBEAT * 10
    yield "inbox-valid", (b"\x12" + hs + INBOX_ANSWERS + deliver(1) + deliver(2, b"")
                          + ib_method(60, 72, shortstr("")) + ack(1))
    yield "inbox-valid-chunked", b"\x12" + hs + INBOX_ANSWERS + deliver(1, b"x" * 300) + HEARTBEAT
    yield "inbox-get-ok", (b"\x12" + hs + INBOX_ANSWERS[:-len(ib_method(60, 21, shortstr("vmproxyd.0.1")))]
                           + ib_method(60, 21, shortstr("vmproxyd.0.1"))
                           + ib_method(60, 71, struct.pack(">QB", 9, 1) + shortstr("vm.control")
                                       + shortstr("u.x") + struct.pack(">I", 2))
                           + frame(2, IB, struct.pack(">HHQ", 60, 0, 1) + b"\x00\x00") + frame(3, IB, b"g"))
    yield "inbox-channel-close", (b"\x12" + hs + ib_method(20, 11, longstr(""))
                                  + ib_method(20, 40, struct.pack(">H", 403) + shortstr("ACCESS_REFUSED")
                                              + struct.pack(">HH", 50, 10)))
    yield "inbox-oversize-delivery", b"\x12" + hs + INBOX_ANSWERS + ib_method(60, 60, shortstr("t") + struct.pack(">QB", 1, 0) + shortstr("") + shortstr("")) + frame(2, IB, struct.pack(">HHQ", 60, 0, 1 << 30) + b"\x00\x00")
    yield "hostile-inbox-unasked-reply", b"\x12" + hs + ib_method(60, 21, shortstr("t"))
    yield "hostile-inbox-method-in-content", b"\x12" + hs + INBOX_ANSWERS + ib_method(60, 60, shortstr("t") + struct.pack(">QB", 1, 0) + shortstr("") + shortstr("")) + ib_method(60, 11)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus", "upstream_proto")
    os.makedirs(out, exist_ok=True)
    n = 0
    for name, data in seeds():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        n += 1
    print("wrote %d seeds to %s" % (n, out))


if __name__ == "__main__":
    main()
