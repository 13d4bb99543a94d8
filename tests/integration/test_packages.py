"""The Debian packages, built and installed on this machine as an operator
would, then removed and purged.

- deploy/build-debs.sh builds vmproxyd, vmproxy-agent and vmproxy-consumer
  from a clean copy of the committed tree (HEAD), and lintian finds no
  error or warning in them.
- `dpkg -i` installs them: the file list is exactly the documented one, no
  configuration is active, the vmproxy account and vmproxy-admin group
  exist, the installed units pass `systemd-analyze verify`, their start
  condition fails until the configuration exists and holds once it does,
  and the installed example configuration passes `vmproxyd --check-config`.
- The installed binaries work end to end: one agent publishes through the
  installed vmproxyd to the harness broker and the installed consumer
  stores its samples.
- Configuring again (dpkg-reconfigure) and installing again (the upgrade
  path: prerm upgrade, postinst configure with the old version) succeed and
  keep the account; `dpkg -r` keeps the operator's
  configuration and the agent's and consumer's state, `dpkg --purge`
  removes them and leaves only what docs/deploy.md says stays (the vmproxy
  account and group).

Needs root (dpkg -i on this machine); skipped in the sanitizer variant (the
packages are built with Debian's flags, not the variant's). Anything it
adds to the machine it takes away again, the accounts included, so the
machine ends as it started. Other scenarios run build-tree binaries, never
the installed ones.
"""
import json
import os
import pathlib
import pwd
import grp
import re
import shutil
import subprocess
import time

import pytest

from harness import wait_for
from harness.vmproxyd import VmProxyd, make_vms
from test_agent import Agent
from test_consumer import Consumer

TOP = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ["vmproxyd", "vmproxy-agent", "vmproxy-consumer"]
UNITS = {"vmproxyd": "vmproxyd.service", "vmproxy-agent": "vmproxy-agent.service",
         "vmproxy-consumer": "vmproxy-consumer.service"}
CONFIGS = {"vmproxyd": "/etc/vmproxy/vmproxyd.json",
           "vmproxy-agent": "/etc/vmproxy/agent.json",
           "vmproxy-consumer": "/etc/vmproxy/consumer.json"}
STATE = {"vmproxy-agent": "vmproxy-agent", "vmproxy-consumer": "vmproxy-consumer"}

# The installed file list, as docs/deploy.md gives it (directories left out).
FILES = {
    "vmproxyd": {
        "/usr/sbin/vmproxyd", "/usr/bin/vmproxyctl",
        "/lib/systemd/system/vmproxyd.service", "/usr/lib/sysusers.d/vmproxy.conf",
        "/usr/share/man/man8/vmproxyd.8.gz", "/usr/share/man/man8/vmproxyctl.8.gz",
        "/usr/share/man/man5/vmproxyd.conf.5.gz",
        "/usr/share/doc/vmproxyd/examples/vmproxyd.example.json",
        "/usr/share/doc/vmproxyd/examples/libvirt/vsock-device.xml",
        "/usr/share/doc/vmproxyd/examples/systemd/vmproxyd-firecracker.conf",
        "/usr/share/doc/vmproxyd/copyright", "/usr/share/doc/vmproxyd/changelog.gz",
    },
    "vmproxy-agent": {
        "/usr/bin/vmproxy-agent", "/lib/systemd/system/vmproxy-agent.service",
        "/usr/share/man/man8/vmproxy-agent.8.gz",
        "/usr/share/doc/vmproxy-agent/examples/vmproxy-agent.example.json",
        "/usr/share/doc/vmproxy-agent/copyright", "/usr/share/doc/vmproxy-agent/changelog.gz",
    },
    "vmproxy-consumer": {
        "/usr/bin/vmproxy-consumer", "/lib/systemd/system/vmproxy-consumer.service",
        "/usr/share/man/man8/vmproxy-consumer.8.gz",
        "/usr/share/doc/vmproxy-consumer/examples/vmproxy-consumer.example.json",
        "/usr/share/doc/vmproxy-consumer/examples/rabbitmq/rabbitmq.conf.in",
        "/usr/share/doc/vmproxy-consumer/examples/rabbitmq/definitions.json",
        "/usr/share/doc/vmproxy-consumer/examples/rabbitmq/gen-definitions.py",
        "/usr/share/doc/vmproxy-consumer/examples/rabbitmq/hash-password.py",
        "/usr/share/doc/vmproxy-consumer/copyright",
        "/usr/share/doc/vmproxy-consumer/changelog.gz",
    },
}

# Where installing, configuring, removing and purging may leave traces.
WATCHED = ["/etc/vmproxy", "/etc/systemd/system", "/var/lib/systemd/deb-systemd-helper-enabled",
           "/var/lib/systemd/deb-systemd-helper-masked", "/var/lib/private",
           "/var/lib/vmproxy-agent", "/var/lib/vmproxy-consumer", "/usr/share/doc/vmproxyd",
           "/usr/share/doc/vmproxy-agent", "/usr/share/doc/vmproxy-consumer",
           "/lib/systemd/system/vmproxyd.service", "/usr/sbin/vmproxyd"]

pytestmark = [
    pytest.mark.skipif(os.environ.get("VMPROXY_VARIANT", "normal") != "normal",
                       reason="packages are tested in the normal variant only"),
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg -i needs root"),
]


def _installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() not in ("", "not-installed")


def dpkg(*args, timeout=600):
    """Run dpkg, waiting while another process (apt) holds its lock."""
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        locked = r.returncode != 0 and "lock" in r.stderr and "locked" in r.stderr
        if not locked or time.monotonic() >= deadline:
            assert r.returncode == 0, "dpkg %s:\n%s%s" % (" ".join(args), r.stdout, r.stderr)
            return r
        time.sleep(2)


def snapshot():
    """Every path under the WATCHED places (symlinks with their targets)."""
    out = set()
    for top in WATCHED:
        p = pathlib.Path(top)
        if not (p.exists() or p.is_symlink()):
            continue
        for q in [p] + (sorted(p.rglob("*")) if p.is_dir() and not p.is_symlink() else []):
            out.add(str(q) + (" -> " + os.readlink(q) if q.is_symlink() else ""))
    return out


def account(name, db):
    try:
        return db.getpwnam(name) if db is pwd else db.getgrnam(name)
    except KeyError:
        return None


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    """The three .deb files built by deploy/build-debs.sh."""
    out = tmp_path_factory.mktemp("debs")
    env = dict(os.environ, DEB_BUILD_OPTIONS="nocheck parallel=2")
    r = subprocess.run(["bash", str(TOP / "deploy" / "build-debs.sh"), str(out)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    got = {}
    for pkg in PACKAGES:
        found = sorted(out.glob("%s_*.deb" % pkg))
        assert len(found) == 1, (pkg, sorted(out.iterdir()))
        got[pkg] = found[0]
    return got


@pytest.fixture(scope="module")
def installed(debs):
    """The packages installed with dpkg -i; purged, and the accounts they
    created deleted, at teardown whatever happened."""
    for pkg in PACKAGES:
        if _installed(pkg):
            pytest.skip("%s is installed on this machine: not touching it" % pkg)
    if os.path.exists("/etc/vmproxy"):
        pytest.skip("/etc/vmproxy exists on this machine: not touching it")
    before = snapshot()
    had_user = account("vmproxy", pwd) is not None
    had_groups = {g: account(g, grp) is not None for g in ("vmproxy", "vmproxy-admin")}
    try:
        dpkg("-i", *[str(debs[p]) for p in PACKAGES])
        yield {"before": before}
    finally:
        if any(_installed(p) for p in PACKAGES):
            dpkg("--purge", *PACKAGES)
        # A test that failed half-way may have left operator files behind.
        for path in CONFIGS.values():
            if os.path.exists(path):
                os.unlink(path)
        if os.path.isdir("/etc/vmproxy") and not os.listdir("/etc/vmproxy"):
            os.rmdir("/etc/vmproxy")
        if not had_user and account("vmproxy", pwd):
            subprocess.run(["userdel", "vmproxy"], check=True)
        for g, had in had_groups.items():
            if not had and account(g, grp):
                subprocess.run(["groupdel", g], check=True)


def test_lintian_clean(debs):
    """No lintian error or warning (info tags are listed, not failed on)."""
    r = subprocess.run(["lintian", "--fail-on", "error,warning", "--tag-display-limit", "0",
                        *[str(debs[p]) for p in PACKAGES]],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout)
    bad = [l for l in r.stdout.splitlines() if re.match(r"^[EW]: ", l)]
    assert r.returncode == 0 and not bad, r.stdout + r.stderr


def test_installed_files(installed):
    for pkg in PACKAGES:
        listed = dpkg("-L", pkg).stdout.split()
        files = {p for p in listed if not os.path.isdir(p)}
        assert files == FILES[pkg], (pkg, sorted(files ^ FILES[pkg]))
        for f in files:
            assert os.path.exists(f), f
    # Libraries come from shlibs; the daemon does not pull in a broker.
    depends = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", "vmproxyd"],
                             capture_output=True, text=True).stdout
    assert "librabbitmq4" in depends and "rabbitmq-server" not in depends, depends
    # No configuration is installed active.
    for path in CONFIGS.values():
        assert not os.path.exists(path), path
    for exe, name in [("/usr/sbin/vmproxyd", "vmproxyd"), ("/usr/bin/vmproxyctl", "vmproxyctl"),
                      ("/usr/bin/vmproxy-agent", "vmproxy-agent"),
                      ("/usr/bin/vmproxy-consumer", "vmproxy-consumer")]:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith(name + " "), (exe, r.stdout, r.stderr)


def test_accounts(installed):
    user = account("vmproxy", pwd)
    assert user is not None, "postinst did not create the vmproxy user"
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_uid < 1000, user
    admin = account("vmproxy-admin", grp)
    assert admin is not None and "vmproxy" in admin.gr_mem, admin
    assert account("vmproxy", grp).gr_gid == user.pw_gid


def test_installed_units_verify(installed):
    units = ["/lib/systemd/system/" + UNITS[p] for p in PACKAGES]
    r = subprocess.run(["systemd-analyze", "verify", "--man=yes", *units],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        r.stdout + r.stderr


def _conditions(unit):
    text = pathlib.Path("/lib/systemd/system/" + unit).read_text()
    return re.findall(r"^(Condition\w+=.*)$", text, re.M)


def test_units_wait_for_their_configuration(installed, tmp_path):
    """Each unit's start conditions fail without its configuration file
    (the unit is skipped, never started half-configured) and hold with it."""
    for pkg in PACKAGES:
        conds = _conditions(UNITS[pkg])
        assert "ConditionPathExists=" + CONFIGS[pkg] in conds, (pkg, conds)
        r = subprocess.run(["systemd-analyze", "condition", *conds],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and CONFIGS[pkg] in r.stdout + r.stderr, r.stdout + r.stderr
    os.makedirs("/etc/vmproxy", exist_ok=True)
    try:
        for pkg in PACKAGES:
            pathlib.Path(CONFIGS[pkg]).write_text("{}\n")
            r = subprocess.run(["systemd-analyze", "condition", *_conditions(UNITS[pkg])],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for path in CONFIGS.values():
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir("/etc/vmproxy")


def test_installed_example_checks(installed, certs, tmp_path):
    """The example under /usr/share/doc, with the test certificates in
    place of /etc/vmproxy/tls and what --check-config checks on the host
    pointed at this machine (libvirt's test driver, a listener address it
    has, the admin socket in a directory that exists), passes the installed
    vmproxyd --check-config; the same file with a mistake is refused naming
    the key."""
    text = pathlib.Path("/usr/share/doc/vmproxyd/examples/vmproxyd.example.json").read_text()
    for name in ("ca.pem", "proxy.pem", "proxy-key.pem"):
        text = text.replace("/etc/vmproxy/tls/" + name, str(certs / name))
    doc = json.loads(text)
    doc["identity"]["libvirt_uri"] = "test://" + os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "unit", "proxy", "data",
        "node.xml")
    for listener in doc["listeners"]:
        if listener["type"] == "tcp":
            listener["address"] = "127.0.0.1"
    doc["admin"]["socket"] = str(tmp_path / "admin.sock")
    text = json.dumps(doc)
    conf = tmp_path / "vmproxyd.json"
    conf.write_text(text)
    r = subprocess.run(["/usr/sbin/vmproxyd", "--config", str(conf), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stdout + r.stderr
    doc = json.loads(text)
    doc["threads"]["count"] = "two"
    conf.write_text(json.dumps(doc))
    r = subprocess.run(["/usr/sbin/vmproxyd", "--config", str(conf), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "threads" in r.stderr, r.stdout + r.stderr


class InstalledVmProxyd(VmProxyd):
    binary = "/usr/sbin/vmproxyd"
    ctl = "/usr/bin/vmproxyctl"


def test_installed_binaries_end_to_end(installed, build_dir, broker, certs, tmp_path):
    """One agent through the installed vmproxyd; the installed consumer
    stores its samples under the VM identity the proxy observed; the
    installed vmproxyctl reads the daemon's state."""
    vms = make_vms(1, base="127.10.40.1")
    # Generous bounds: the machine may be busy.
    proxy = InstalledVmProxyd(build_dir, tmp_path, broker, certs, vms, threads=1)
    proxy.start(timeout=120)
    consumer = Consumer(build_dir, broker, certs, tmp_path, "vm.metrics.packages")
    consumer.bin = "/usr/bin/vmproxy-consumer"
    consumer.start()
    agent = Agent(build_dir, proxy, vms[0], tmp_path / "spool")
    agent.args[0] = "/usr/bin/vmproxy-agent"
    agent.start()
    try:
        def stored():
            seqs = {l["doc"]["seq"] for l in consumer.lines()
                    if l["vm"]["uuid"] == vms[0]["uuid"]}
            return len(seqs) >= 2 and seqs
        seqs = wait_for(stored, 120, "two samples from the agent at the installed consumer")
        assert seqs == set(range(1, max(seqs) + 1)), sorted(seqs)
        assert all(l["vm"]["name"] == vms[0]["name"] for l in consumer.lines())
        r = subprocess.run([proxy.ctl, "--socket", proxy.admin_path, "vms"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and vms[0]["name"] in r.stdout, r.stdout + r.stderr
    finally:
        agent.stop()
        consumer.stop()
        proxy.stop()


def test_reinstall_remove_purge(installed, debs):
    """Configuring again and installing the same packages again (the
    upgrade path of the scripts: prerm upgrade, postinst configure
    OLD-VERSION) must succeed;
    remove keeps the operator's configuration and the services' state,
    purge takes them away and leaves only the accounts."""
    uid = account("vmproxy", pwd).pw_uid
    # The maintainer scripts run again on an installed system: configure
    # once more, then the whole upgrade path.
    r = subprocess.run(["dpkg-reconfigure", "-fnoninteractive", *PACKAGES],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    dpkg("-i", *[str(debs[p]) for p in PACKAGES])
    for pkg in PACKAGES:
        assert _installed(pkg)
    assert account("vmproxy", pwd).pw_uid == uid

    # What an operator and the services leave: configurations, TLS
    # material, the DynamicUser state directories systemd creates.
    os.makedirs("/etc/vmproxy/tls", exist_ok=True)
    for path in CONFIGS.values():
        pathlib.Path(path).write_text("{}\n")
    pathlib.Path("/etc/vmproxy/tls/ca.pem").write_text("not a certificate\n")
    had_private = os.path.isdir("/var/lib/private")
    for name in STATE.values():
        d = pathlib.Path("/var/lib/private") / name
        (d / "spool").mkdir(parents=True, exist_ok=True)
        (d / "spool" / "sample").write_text("{}\n")
        os.symlink("private/" + name, "/var/lib/" + name)

    try:
        dpkg("-r", *PACKAGES)
        for pkg in PACKAGES:
            assert not _installed(pkg) or \
                subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
                               capture_output=True, text=True).stdout == "config-files"
            assert not os.path.exists("/lib/systemd/system/" + UNITS[pkg])
        for path in CONFIGS.values():
            assert os.path.exists(path), "remove took the configuration %s" % path
        for name in STATE.values():
            assert os.path.exists("/var/lib/private/%s/spool/sample" % name), name

        dpkg("--purge", *PACKAGES)
        for pkg in PACKAGES:
            assert not _installed(pkg), pkg
        for path in CONFIGS.values():
            assert not os.path.exists(path), "purge left %s" % path
        for name in STATE.values():
            assert not os.path.lexists("/var/lib/" + name)
            assert not os.path.exists("/var/lib/private/" + name)
        # The operator's TLS material is not the packages' to take.
        assert os.path.exists("/etc/vmproxy/tls/ca.pem")
    finally:
        shutil.rmtree("/etc/vmproxy", ignore_errors=True)
        for name in STATE.values():
            shutil.rmtree("/var/lib/private/" + name, ignore_errors=True)
            if os.path.lexists("/var/lib/" + name):
                os.unlink("/var/lib/" + name)
        if not had_private and os.path.isdir("/var/lib/private"):
            os.rmdir("/var/lib/private")

    # Nothing else is left: no unit symlink, no state file of
    # deb-systemd-helper, no documentation directory.
    after = snapshot()
    assert after == installed["before"], (sorted(after - installed["before"]),
                                         sorted(installed["before"] - after))
    # The accounts stay after purge (docs/deploy.md says why).
    assert account("vmproxy", pwd) is not None
    assert account("vmproxy-admin", grp) is not None
