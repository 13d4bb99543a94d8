"""vmproxyctl's vm command and --json, as docs/admin.md and vmproxyctl(8)
give them: the table's columns, lookup by name or uuid, the error and exit
status for a VM without connections, and --json printing the daemon's reply
as is (the same bytes a client of the admin socket reads)."""
import json
import socket
import subprocess

import pika

from harness import wait_for
from harness.vmproxyd import from_source, make_vms
from test_proxy import guest_params

COLUMNS = ["UUID", "NAME", "CID", "THREAD", "CONNS", "MSGS_IN", "ACKED", "HELD_BYTES",
           "STATE"]


def ctl(proxy, *args):
    return subprocess.run([proxy.ctl, "--socket", proxy.admin_path] + list(args),
                          capture_output=True, text=True, timeout=30)


def raw(proxy, req):
    """The admin socket's reply to REQ, as text, exactly as read."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(proxy.admin_path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data.decode()
            data += chunk


def test_vm_by_name_or_uuid_and_json_as_is(broker, proxy_factory):
    """vm NAME|UUID prints the vms table's header and the VM's one row
    (connections, messages in, acked); the uuid finds the same row. A VM of
    the static table without connections, or an unknown one, is an error on
    stderr with exit 1; vm without a name is a usage error (2). --json
    (and -j, -s) prints the daemon's reply byte for byte."""
    vms = make_vms(3, base="127.10.43.1")
    v0, v1, v2 = vms
    proxy = proxy_factory(vms, threads=2).start()
    conns = []
    try:
        with from_source(v0["address"]):
            conns += [pika.BlockingConnection(guest_params(proxy)) for _ in range(2)]
        with from_source(v1["address"]):
            conns.append(pika.BlockingConnection(guest_params(proxy)))
        ch = conns[0].channel()
        ch.confirm_delivery()
        for seq in range(1, 4):
            ch.basic_publish("metrics", "ctl", b'{"vm":0,"conn":0,"seq":%d}' % seq)

        def settled():
            rows = {v["name"]: v for v in proxy.admin("vms")["vms"]}
            r = rows.get(v0["name"])
            return (len(rows) == 2 and r and r["connections"] == 2 and r["acked"] == 3
                    and rows[v1["name"]]["connections"] == 1 and rows)
        rows = wait_for(settled, 30, "two VMs connected, three messages acked")

        by_name = ctl(proxy, "vm", v0["name"])
        assert by_name.returncode == 0, by_name.stderr
        lines = by_name.stdout.splitlines()
        assert len(lines) == 2, by_name.stdout
        assert lines[0].split() == COLUMNS, lines[0]
        row = lines[1].split()
        assert row == [v0["uuid"], v0["name"], "0", str(rows[v0["name"]]["thread"]), "2", "3",
                       "3", "0"], lines[1]
        by_uuid = ctl(proxy, "vm", v0["uuid"])
        assert by_uuid.returncode == 0 and by_uuid.stdout == by_name.stdout, by_uuid

        # --json: the reply as the socket gives it (v1 is idle: nothing changes).
        want = raw(proxy, {"command": "vm", "vm": v1["name"]})
        assert json.loads(want)["vm"]["connections"] == 1, want
        for flags in (["--json"], ["-j"]):
            got = ctl(proxy, *flags, "vm", v1["name"])
            assert got.returncode == 0 and got.stdout == want, (flags, got, want)
        short = subprocess.run([proxy.ctl, "-s", proxy.admin_path, "-j", "vm", v1["uuid"]],
                               capture_output=True, text=True, timeout=30)
        assert short.returncode == 0 and short.stdout == want, short
        listed = ctl(proxy, "--json", "vms")
        assert listed.returncode == 0 and listed.stdout == raw(proxy, {"command": "vms"})
        assert {v["name"] for v in json.loads(listed.stdout)["vms"]} == {v0["name"], v1["name"]}
        status = ctl(proxy, "--json", "status")
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        assert st["ok"] is True and st["daemon"]["connections"] == 3, st
        assert len(st["threads"]) == 2, st
        threads = ctl(proxy, "--json", "threads")
        assert threads.returncode == 0, threads.stderr
        assert [t["thread"] for t in json.loads(threads.stdout)["threads"]] == [0, 1]

        # Errors: on stderr, nothing on stdout, with or without --json.
        for flags in ([], ["--json"]):
            idle = ctl(proxy, *flags, "vm", v2["name"])
            assert idle.returncode == 1 and idle.stdout == "", idle
            assert idle.stderr == 'vmproxyctl: no VM "%s" has connections here\n' % v2["name"]
            unknown = ctl(proxy, *flags, "vm", "no-such-vm")
            assert unknown.returncode == 1 and unknown.stdout == "", unknown
            assert 'no VM "no-such-vm"' in unknown.stderr, unknown
        bare = ctl(proxy, "vm")
        assert bare.returncode == 2 and "vm needs a NAME or UUID" in bare.stderr, bare
    finally:
        for c in conns:
            c.close()


def test_silent_admin_clients_do_not_hold_the_socket(broker, proxy_factory):
    """Requests are served one at a time, each bounded to 2 s of I/O
    (docs/admin.md): three clients that connect and send nothing, or half a
    request, are each answered "timed out reading the request" and closed
    by the daemon, and vmproxyctl queued behind
    them still gets its answer (it gives up after 10 s)."""
    vms = make_vms(1, base="127.10.43.9")
    proxy = proxy_factory(vms, threads=1).start()
    silent = []
    try:
        for part in (b"", b'{"command": "sta', b""):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(proxy.admin_path)
            s.sendall(part)
            silent.append(s)
        r = ctl(proxy, "status")
        assert r.returncode == 0 and r.stdout.startswith("connections 0,"), r
        for s in silent:
            s.settimeout(30)
            data = b""
            while True:  # until the daemon closes it
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            assert data == b'{"ok":false,"error":"timed out reading the request"}\n', data
    finally:
        for s in silent:
            s.close()
