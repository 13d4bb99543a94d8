"""The README's first command, unattended, from a clean checkout:
deploy/quickstart.sh --duration 60 builds its own tree, starts the broker,
vmproxyd, 20 simulated VMs and the consumer, and exits 0 only when every
VM's metrics reached the consumer; it stops everything it started.

The script builds its own release tree whatever build is under test, so
the scenario runs once per test run: in the sanitizer variant of
deploy/run-tests.sh ($VMPROXY_VARIANT=sanitize) it is skipped."""
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import tempfile

import pytest

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
