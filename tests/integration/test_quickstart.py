"""The README's first command, unattended: deploy/quickstart.sh builds,
starts the broker, vmproxyd, simulated VMs and the consumer, and exits 0
only when every VM's metrics reached the consumer; it stops everything it
started."""
import glob
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_unattended():
    # Under /tmp itself: the broker's user must be able to reach it.
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-quickstart-test-"))
    r = subprocess.run(["bash", os.path.join(TOP, "deploy", "quickstart.sh"), "--vms", "5",
                        "--duration", "30", "--dir", str(d)],
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK: all 5 VMs' metrics reached the consumer" in r.stdout
    names = set()
    for f in glob.glob(str(d / "jsonl" / "metrics-*.jsonl")):
        for line in open(f):
            names.add(json.loads(line)["vm"]["name"])
    assert names == {"guest-%02d" % i for i in range(1, 6)}
    # Nothing it started is left running.
    left = subprocess.run(["pgrep", "-f", str(d)], capture_output=True, text=True).stdout
    assert left.strip() == "", left
    shutil.rmtree(d, ignore_errors=True)
