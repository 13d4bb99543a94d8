"""The README's first command, unattended, from a clean checkout:
deploy/quickstart.sh --duration 60 builds its own tree, starts the broker,
vmproxyd, 20 simulated VMs and the consumer, and exits 0 only when every
VM's metrics reached the consumer; it stops everything it started. Piped,
its live table is printed one after another, without terminal controls.

The same in a real terminal (tmux): the table is redrawn in place, so the
screen holds one table with the current figures and nothing scrolls into
the history; q, and likewise Ctrl-C, stop everything and leave the terminal
as it was.

The script builds its own release tree whatever build is under test, so
the scenario runs once per test run: in the sanitizer variant of
deploy/run-tests.sh ($VMPROXY_VARIANT=sanitize) it is skipped."""
import json
import os
import pathlib
import re
import shutil
import sqlite3
import subprocess
import tempfile

import pytest

from harness import wait_for

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMS = 20


def clean_checkout(dest):
    """The committed tree at DEST (a clone), or, outside a git checkout, the
    tracked files only; never the build directories of TOP."""
    if os.path.isdir(os.path.join(TOP, ".git")):
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", TOP, str(dest)],
                       check=True, timeout=300)
        return
    files = subprocess.run(["git", "-C", TOP, "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(TOP, f), dest / f)


@pytest.mark.skipif(os.environ.get("VMPROXY_VARIANT") == "sanitize",
                    reason="quickstart builds its own release tree: run once, in the normal "
                           "variant")
def test_quickstart_unattended():
    # Under /tmp itself: the broker's user must be able to reach it.
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-quickstart-test-"))
    os.chmod(d, 0o755)
    src = d / "checkout"
    run = d / "run"
    try:
        clean_checkout(src)
        r = subprocess.run(["bash", str(src / "deploy" / "quickstart.sh"),
                            "--duration", "60", "--dir", str(run)],
                           capture_output=True, text=True, timeout=1500,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "OK: all %d VMs' metrics reached the consumer" % VMS in r.stdout, r.stdout[-3000:]
        assert "\033" not in r.stdout and r.stdout.count("VMs reporting") >= 2, r.stdout[-3000:]
        per_vm = {}
        db = sqlite3.connect(str(run / "consumer" / "metrics.db"))
        for name, seq, text in db.execute("SELECT v.name, s.seq, s.doc FROM samples s "
                                          "JOIN vms v ON v.uuid = s.vm_uuid"):
            assert json.loads(text)["seq"] == seq
            per_vm.setdefault(name, []).append(seq)
        db.close()
        # It shows the store's latest samples with the query command.
        assert "guest-0" in r.stdout.split("OK: all")[1], r.stdout[-3000:]
        assert set(per_vm) == {"guest-%02d" % i for i in range(1, VMS + 1)}, sorted(per_vm)
        for name, seqs in per_vm.items():
            # Every stored sample once, stamped by the proxy with its VM.
            assert len(seqs) == len(set(seqs)), (name, sorted(seqs))
        # Nothing it started is left running.
        left = subprocess.run(["pgrep", "-f", str(d)], capture_output=True, text=True).stdout
        assert left.strip() == "", left
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _stored(run):
    """Samples in the quickstart consumer's SQLite store (0 before it exists)."""
    path = run / "consumer" / "metrics.db"
    if not path.exists():
        return 0
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM samples").fetchone()[0]
    finally:
        db.close()


@pytest.mark.skipif(os.environ.get("VMPROXY_VARIANT") == "sanitize",
                    reason="quickstart builds its own release tree: run once, in the normal "
                           "variant")
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_quickstart_table_in_a_terminal():
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-quickstart-tty-"))
    os.chmod(d, 0o755)
    src, run = d / "checkout", d / "run"
    sock = "vmproxy-qs-%d" % os.getpid()

    def tmux(*args):
        return subprocess.run(["tmux", "-L", sock, *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def screen():
        return tmux("capture-pane", "-p", "-t", "qs")

    def start():
        for f in ("rc", "stty"):
            if (d / f).exists():
                os.unlink(d / f)
        # A reset pane without history: the table waited for is this run's,
        # and whatever scrolls away from now on is the run's doing.
        tmux("send-keys", "-R", "-t", "qs")
        tmux("clear-history", "-t", "qs")
        wait_for(lambda: "VMs reporting" not in screen(), 10, "a clear screen")
        tmux("send-keys", "-t", "qs", "bash %s --vms 3 --dir %s; echo rc=$? >%s/rc; "
             "stty -a >%s/stty" % (src / "deploy" / "quickstart.sh", run, d, d), "Enter")
        # The first table, then a later one: same place, newer figures.
        wait_for(lambda: "VMs reporting 3/3" in screen(), 900, "the quickstart's table")

    def stored_on_screen():
        text = screen()
        m = re.findall(r"stored samples (\d+)", text)
        assert len(m) <= 1, text  # one table on the screen, never two
        if not m:  # captured while a frame was being drawn over the last
            raise LookupError("no whole table on the screen yet")
        return int(m[0])

    def ended(rc):
        wait_for(lambda: (d / "stty").exists() and (d / "stty").stat().st_size, 60,
                 "the quickstart to stop")
        assert (d / "rc").read_text().strip() == "rc=%d" % rc
        stty = (d / "stty").read_text()
        assert re.search(r"(?<!-)icanon", stty) and re.search(r"(?<!-)\becho\b", stty), stty
        left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True,
                              text=True).stdout
        assert left.strip() == "", left

    try:
        clean_checkout(src)
        tmux("new-session", "-d", "-x", "120", "-y", "45", "-s", "qs",
             "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=screen HOME=%s "
             "bash --norc --noprofile" % d)
        start()
        first = wait_for(lambda: [stored_on_screen()], 10, "a whole table")[0]
        later = wait_for(lambda: stored_on_screen() > first and stored_on_screen(), 60,
                         "a newer table in the same place")
        # The figures are the current ones: what the consumer has stored.
        assert first < later <= _stored(run)
        assert tmux("display-message", "-p", "-t", "qs", "#{history_size}").strip() == "0"
        tmux("send-keys", "-t", "qs", "q")
        ended(0)
        assert "quickstart: stopped" in screen()

        start()
        tmux("send-keys", "-t", "qs", "C-c")
        ended(130)
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
