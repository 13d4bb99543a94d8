"""`vmproxyctl top` in a real terminal (tmux) and through a pipe.

- On a terminal it draws on the alternate screen and redraws in place: the
  screen holds one frame with the current figures (a publishing VM shows a
  message rate; once it disconnects it is gone and its thread shows no
  connection), and nothing scrolls into the terminal's history.
- `q` and Ctrl-C both end it with the terminal as it was: the normal screen
  back, canonical mode and echo restored, exit status 0.
- Through a pipe it prints COUNT plain frames, rates from the second on.
"""
import os
import re
import shutil
import subprocess
import threading
import time
import uuid

import pika
import pytest

from harness import wait_for
from harness.vmproxyd import VmProxyd, make_vms, from_source

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Tmux:
    """A private tmux server with one 120x30 pane running a plain shell."""

    def __init__(self, workdir):
        self.sock = "vmproxy-top-%s" % uuid.uuid4().hex[:8]
        self.workdir = workdir
        self.run("new-session", "-d", "-x", "120", "-y", "30", "-s", "t",
                 "env -i PATH=/usr/bin:/bin TERM=screen HOME=%s bash --norc --noprofile" %
                 workdir)

    def run(self, *args):
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def keys(self, *keys):
        self.run("send-keys", "-t", "t", *keys)

    def screen(self):
        return self.run("capture-pane", "-p", "-t", "t")

    def fmt(self, f):
        return self.run("display-message", "-p", "-t", "t", f).strip()

    def close(self):
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.close()


class Publisher(threading.Thread):
    """A guest publishing from VM's address until stopped."""

    def __init__(self, proxy, vm):
        super().__init__(daemon=True)
        with from_source(vm["address"]):
            self.conn = pika.BlockingConnection(
                pika.ConnectionParameters("127.0.0.1", proxy.port))
        self.ch = self.conn.channel()
        self.stopping = threading.Event()
        self.sent = 0

    def run(self):
        while not self.stopping.is_set():
            self.ch.basic_publish("metrics", "m", b"{}")
            self.sent += 1
            self.conn.sleep(0.01)  # about 100 messages per second, a visible rate
        self.conn.close()

    def stop(self):
        self.stopping.set()
        self.join(30)


def rows(screen, first):
    """Lines of SCREEN whose first field is FIRST, split into fields."""
    return [l.split() for l in screen.splitlines() if l.split()[:1] == [first]]


def test_top_redraws_in_place_and_quits_clean(build_dir, broker, certs, tmp_path, tmux):
    vms = make_vms(2, base="127.10.60.1")
    proxy = VmProxyd(build_dir, tmp_path, broker, certs, vms, threads=2).start(timeout=120)
    pub = Publisher(proxy, vms[0])
    pub.start()
    try:
        tmux.keys("%s --socket %s top 0.3; echo rc=$? >%s/rc; stty -a >%s/stty" %
                  (proxy.ctl, proxy.admin_path, tmp_path, tmp_path), "Enter")

        def busy_vm_shown():
            s = tmux.screen()
            r = rows(s, vms[0]["name"])
            return r and r[0][3] != "-" and float(r[0][3]) > 0 and s
        screen = wait_for(busy_vm_shown, 30, "the publishing VM with a rate in top")
        assert tmux.fmt("#{alternate_on}") == "1"
        vm_row = rows(screen, vms[0]["name"])[0]
        thread = int(vm_row[1])
        assert vm_row[2] == "1" and vm_row[-1] == vms[0]["uuid"], vm_row
        threads = {int(r[0]): r for r in rows(screen, "0") + rows(screen, "1")}
        assert sorted(threads) == [0, 1], screen
        assert threads[thread][3] == "1" and threads[thread][4] == "1", screen  # CONNS VMS
        assert float(threads[thread][6]) > 0 and threads[thread][7] == "up", screen
        assert screen.count("MSGS_OUT/S") == 1 and screen.count("BUSIEST VMS") == 1, screen

        pub.stop()
        wait_for(lambda: proxy.admin("status")["daemon"]["connections"] == 0, 30,
                 "the guest's connection closed")

        def vm_gone():
            s = tmux.screen()
            t = rows(s, str(thread))
            return not rows(s, vms[0]["name"]) and "BUSIEST VMS (0 of 0)" in s and t and \
                t[0][3] == "0" and s
        screen = wait_for(vm_gone, 30, "top to show the VM gone")
        # Redrawn in place: one frame on screen, nothing scrolled away.
        assert screen.count("MSGS_OUT/S") == 1, screen
        assert tmux.fmt("#{history_size}") == "0"

        tmux.keys("q")
        wait_for(lambda: (tmp_path / "stty").exists() and (tmp_path / "stty").stat().st_size,
                 30, "top to exit on q")
        assert (tmp_path / "rc").read_text().strip() == "rc=0"
        assert tmux.fmt("#{alternate_on}") == "0"
        assert "BUSIEST VMS" not in tmux.screen()
        stty = (tmp_path / "stty").read_text()
        assert re.search(r"(?<!-)icanon", stty) and re.search(r"(?<!-)\becho\b", stty), stty

        # Ctrl-C ends it the same way.
        os.unlink(tmp_path / "stty")
        tmux.keys("%s --socket %s top 0.3; echo rc=$? >%s/rc; stty -a >%s/stty" %
                  (proxy.ctl, proxy.admin_path, tmp_path, tmp_path), "Enter")
        wait_for(lambda: "BUSIEST VMS" in tmux.screen(), 30, "top to draw again")
        tmux.keys("C-c")
        wait_for(lambda: (tmp_path / "stty").exists() and (tmp_path / "stty").stat().st_size,
                 30, "top to exit on Ctrl-C")
        assert (tmp_path / "rc").read_text().strip() == "rc=0"
        assert tmux.fmt("#{alternate_on}") == "0"
        assert "BUSIEST VMS" not in tmux.screen()
        stty = (tmp_path / "stty").read_text()
        assert re.search(r"(?<!-)icanon", stty) and re.search(r"(?<!-)\becho\b", stty), stty
    finally:
        if pub.is_alive():
            pub.stop()
        proxy.stop()


def test_top_through_a_pipe(build_dir, broker, certs, tmp_path):
    vms = make_vms(1, base="127.10.61.1")
    proxy = VmProxyd(build_dir, tmp_path, broker, certs, vms, threads=2).start(timeout=120)
    pub = Publisher(proxy, vms[0])
    pub.start()
    try:
        wait_for(lambda: pub.sent > 10, 30, "the guest publishing")
        r = subprocess.run([proxy.ctl, "--socket", proxy.admin_path, "top", "0.3", "3"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "\033" not in r.stdout
        frames = r.stdout.split("vmproxyd: ")[1:]
        assert len(frames) == 3, r.stdout
        first, last = rows(frames[0], vms[0]["name"]), rows(frames[2], vms[0]["name"])
        assert first[0][3] == "-", frames[0]  # no rate before a second poll
        assert float(last[0][3]) > 0, frames[2]
    finally:
        pub.stop()
        proxy.stop()
    # Usage errors, and a daemon that is not there.
    for args in (["top", "0"], ["top", "1", "x"], ["top", "1", "2", "3"]):
        r = subprocess.run([proxy.ctl, "--socket", proxy.admin_path, *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "top" in r.stderr, (args, r.stderr)
    r = subprocess.run([proxy.ctl, "--socket", str(tmp_path / "nothing"), "top"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot connect" in r.stderr, r.stderr
