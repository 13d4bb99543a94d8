#!/usr/bin/env python3
"""Writes the seed corpus of fuzz-guest_session: what a guest sends, as raw
bytes, for valid sessions and near-valid hostile ones. Standard library only.

    tests/fuzz/gen-corpus.py tests/fuzz/corpus/guest_session
"""
import os
import struct
import sys

FRAME_END = b"\xce"


def frame(ftype, ch, payload, end=FRAME_END):
    return struct.pack(">BHI", ftype, ch, len(payload)) + payload + end


def shortstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">B", len(b)) + b


def longstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(b)) + b


def table(entries):
    """entries: list of (key, kind, encoded value)."""
    body = b"".join(shortstr(k) + kind + v for k, kind, v in entries)
    return struct.pack(">I", len(body)) + body


def deep_table(depth):
    t = struct.pack(">I", 0)
    for _ in range(depth - 1):
        body = shortstr("k") + b"F" + t
        t = struct.pack(">I", len(body)) + body
    return t


def method(ch, cls, mid, args=b""):
    return frame(1, ch, struct.pack(">HH", cls, mid) + args)


HEADER = b"AMQP\x00\x00\x09\x01"


def client_props(caps=True, deep=0):
    entries = [("product", b"S", longstr("seed-client"))]
    if caps:
        entries.append(("capabilities", b"F", table([
            ("publisher_confirms", b"t", b"\x01"),
            ("connection.blocked", b"t", b"\x01"),
            ("authentication_failure_close", b"t", b"\x01"),
        ])))
    if deep:
        entries.append(("deep", b"F", deep_table(deep)))
    return table(entries)


def start_ok(mech="PLAIN", response=b"\x00guest\x00guest", props=None):
    return method(0, 10, 11, (props or client_props()) + shortstr(mech) +
                  longstr(response) + shortstr("en_US"))


def tune_ok(chmax=8, fmax=131072, hb=60):
    return method(0, 10, 31, struct.pack(">HIH", chmax, fmax, hb))


def open_(vhost="/"):
    return method(0, 10, 40, shortstr(vhost) + shortstr("") + b"\x00")


def handshake(**kw):
    return HEADER + start_ok(**kw) + tune_ok() + open_()


def channel_open(ch):
    return method(ch, 20, 10, shortstr(""))


def channel_close(ch):
    return method(ch, 20, 40, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0))


def channel_close_ok(ch):
    return method(ch, 20, 41)


def confirm_select(ch, nowait=False):
    return method(ch, 85, 10, b"\x01" if nowait else b"\x00")


def publish(ch, exchange="metrics", rk="vm.cpu", mandatory=False, immediate=False):
    bits = (1 if mandatory else 0) | (2 if immediate else 0)
    return method(ch, 60, 40, struct.pack(">H", 0) + shortstr(exchange) + shortstr(rk) +
                  bytes([bits]))


def content_header(ch, size, props=b"\x00\x00", cls=60):
    return frame(2, ch, struct.pack(">HHQ", cls, 0, size) + props)


def body(ch, data):
    return frame(3, ch, data)


def message(ch, data, exchange="metrics", rk="vm.cpu", props=b"\x00\x00"):
    # An empty body has no body frame at all.
    return (publish(ch, exchange, rk) + content_header(ch, len(data), props) +
            (body(ch, data) if data else b""))


def json_props():
    # content-type, delivery-mode, headers {"seq": I 7}
    flags = 0x8000 | 0x2000 | 0x1000
    return (struct.pack(">H", flags) + shortstr("application/json") +
            table([("seq", b"I", struct.pack(">i", 7))]) + b"\x02")


def conn_close():
    return method(0, 10, 50, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0))


def conn_close_ok():
    return method(0, 10, 51)


HEARTBEAT = frame(8, 0, b"")


def seeds():
    hs = handshake()
    yield "valid-confirm-publish", (hs + channel_open(1) + confirm_select(1) +
                                    message(1, b'{"cpu": 3}', props=json_props()) +
                                    message(1, b"second") + HEARTBEAT + channel_close(1) +
                                    conn_close())
    yield "valid-no-confirm", hs + channel_open(2) + message(2, b"x" * 300) + conn_close()
    yield "valid-multi-channel", (hs + channel_open(1) + channel_open(8) + confirm_select(1) +
                                  confirm_select(8, nowait=True) + message(1, b"a") +
                                  message(8, b"b") + message(1, b"") + conn_close())
    yield "valid-split-body", (hs + channel_open(1) + confirm_select(1) + publish(1) +
                               content_header(1, 12) + body(1, b"hello ") + body(1, b"world!") +
                               conn_close())
    amqplain = table([("LOGIN", b"S", longstr("agent")), ("PASSWORD", b"S", longstr("pw"))])[4:]
    yield "valid-amqplain", (HEADER + start_ok("AMQPLAIN", amqplain) + tune_ok() + open_() +
                             channel_open(1) + message(1, b"m") + conn_close())
    yield "valid-external-vhost", (HEADER + start_ok("EXTERNAL", b"") + tune_ok() +
                                   open_("vmproxy") + channel_open(1) + conn_close())
    yield "valid-exchange-declare", (hs + channel_open(1) + method(1, 40, 10, struct.pack(
        ">H", 0) + shortstr("metrics") + shortstr("topic") + b"\x02" + table([])) + conn_close())
    yield "valid-reopen-channel", (hs + channel_open(1) + confirm_select(1) + message(1, b"a") +
                                   channel_close(1) + channel_open(1) + confirm_select(1) +
                                   message(1, b"b") + conn_close())
    yield "hostile-bad-header", b"AMQP\x00\x00\x09\x02" + start_ok()
    yield "hostile-http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    yield "hostile-frame-end", hs + frame(8, 0, b"", end=b"\x00")
    yield "hostile-oversize", hs + struct.pack(">BHI", 3, 1, 0x7fffffff)
    yield "hostile-heartbeat-ch1", hs + channel_open(1) + frame(8, 1, b"")
    yield "hostile-before-open", hs + message(3, b"x")
    yield "hostile-second-open", hs + channel_open(1) + channel_open(1) + conn_close_ok()
    yield "hostile-channel-max", hs + channel_open(9)
    yield "hostile-tune-ok", HEADER + start_ok() + tune_ok(chmax=100, fmax=100)
    yield "hostile-header-no-publish", hs + channel_open(1) + content_header(1, 4)
    yield "hostile-body-too-long", (hs + channel_open(1) + publish(1) + content_header(1, 2) +
                                    body(1, b"abc"))
    yield "hostile-too-big-declared", (hs + channel_open(1) + publish(1) +
                                       content_header(1, 1 << 40) + body(1, b"x" * 50) +
                                       channel_close_ok(1) + channel_open(1) + message(1, b"y"))
    yield "hostile-forbidden-exchange", (hs + channel_open(1) + message(1, b"x", exchange="amq.direct")
                                         + channel_close_ok(1) + channel_open(1) + message(1, b"y"))
    yield "hostile-queue-declare", hs + channel_open(1) + method(1, 50, 10, struct.pack(
        ">H", 0) + shortstr("q") + b"\x00" + table([])) + channel_close_ok(1)
    yield "hostile-tx-select", hs + channel_open(1) + method(1, 90, 10)
    yield "hostile-immediate", hs + channel_open(1) + publish(1, immediate=True)
    yield "hostile-truncated", hs + channel_open(1) + method(1, 60, 40, b"\x00\x00\x14me")
    yield "hostile-deep-headers", (hs + channel_open(1) + publish(1) + content_header(
        1, 1, struct.pack(">H", 0x2000) + deep_table(3000)) + body(1, b"x"))
    yield "hostile-deep-client-props", HEADER + start_ok(props=client_props(deep=400))
    yield "hostile-amqplain-garbage", HEADER + start_ok("AMQPLAIN", b"\x05LOGINS\xff\xff\xff\xf0x")
    yield "hostile-refused-user", HEADER + start_ok(response=b"\x00refused\x00pw")
    yield "hostile-unknown-method", hs + channel_open(1) + method(1, 0x1234, 1)
    yield "hostile-header-class", hs + channel_open(1) + publish(1) + content_header(1, 1, cls=50)
    yield "hostile-method-mid-content", (hs + channel_open(1) + publish(1) + content_header(1, 4) +
                                         body(1, b"ab") + method(1, 60, 10, b"\x00" * 7))
    # Found by fuzzing: an empty body frame before any body byte (memcpy to
    # a NULL buffer), and an input too short to produce any output
    # (guest_session_output on a never-allocated buffer).
    yield "hostile-empty-body-frame", (hs + channel_open(1) + publish(1) + content_header(1, 3) +
                                       body(1, b"") + body(1, b"abc") + conn_close())
    yield "hostile-short-input", b"AMQ"
    yield "hostile-unconfirmed-flood", (hs + channel_open(1) + confirm_select(1) +
                                        b"".join(message(1, b"%d" % i) for i in range(200)))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus", "guest_session")
    os.makedirs(out, exist_ok=True)
    n = 0
    for name, data in seeds():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        n += 1
    print("wrote %d seeds to %s" % (n, out))


if __name__ == "__main__":
    main()
