"""What `meson install` puts on a host, and whether it is usable there.

- The installed file set is exactly the expected one (binaries, units,
  sysusers.d, example configurations, man pages): nothing missing, nothing
  stray.
- The installed units pass `systemd-analyze verify` with ExecStart pointing
  at the installed binaries, and vmproxyd.service keeps its hardening
  (`systemd-analyze security --offline` exposure bounded).
- The sysusers.d file creates the vmproxy account in a scratch root.
- Every man page is free of groff warnings and renders.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

from harness.rabbitmq import BrokerError

UNITS = ["vmproxyd.service", "vmproxy-agent.service", "vmproxy-consumer.service"]
MAN = ["man8/vmproxyd.8", "man8/vmproxyctl.8", "man8/vmproxy-agent.8",
       "man8/vmproxy-consumer.8", "man5/vmproxyd.conf.5"]
EXAMPLES = ["vmproxyd.example.json", "vmproxy-agent.example.json",
            "vmproxy-consumer.example.json", "rabbitmq/rabbitmq.conf.in",
            "rabbitmq/definitions.json", "rabbitmq/gen-definitions.py",
            "rabbitmq/hash-password.py", "libvirt/vsock-device.xml",
            "systemd/vmproxyd-firecracker.conf"]


def _options(build_dir):
    out = subprocess.run(["meson", "introspect", str(build_dir), "--buildoptions"],
                         check=True, capture_output=True, text=True).stdout
    opts = {o["name"]: o["value"] for o in json.loads(out)}
    info = subprocess.run(["meson", "introspect", str(build_dir), "--projectinfo"],
                          check=True, capture_output=True, text=True).stdout
    opts["_version"] = json.loads(info)["version"]
    return opts


@pytest.fixture(scope="module")
def installed(build_dir, tmp_path_factory):
    """(destdir, options) after `meson install --destdir` of the build under test."""
    dest = tmp_path_factory.mktemp("destdir")
    r = subprocess.run(["meson", "install", "-C", str(build_dir), "--no-rebuild",
                        "--destdir", str(dest)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest, _options(build_dir)


def _under(dest, prefix, rel):
    return dest / prefix.lstrip("/") / rel


def test_install_file_set(installed):
    dest, opt = installed
    prefix = opt["prefix"]
    expected = {
        f"{opt['sbindir']}/vmproxyd",
        f"{opt['bindir']}/vmproxyctl",
        f"{opt['bindir']}/vmproxy-agent",
        f"{opt['bindir']}/vmproxy-consumer",
        "lib/sysusers.d/vmproxy.conf",
    }
    expected |= {f"lib/systemd/system/{u}" for u in UNITS}
    expected |= {f"{opt['mandir']}/{m}" for m in MAN}
    expected |= {f"{opt['datadir']}/doc/vmproxy/examples/{e}" for e in EXAMPLES}
    expected = {os.path.normpath(os.path.join(prefix, p)) for p in expected}

    got = {"/" + str(p.relative_to(dest)) for p in dest.rglob("*")
           if p.is_file() or p.is_symlink()}
    assert got == expected, (f"missing: {sorted(expected - got)}\n"
                             f"stray: {sorted(got - expected)}")

    version = opt["_version"]
    for b in [f"{opt['sbindir']}/vmproxyd", f"{opt['bindir']}/vmproxyctl",
              f"{opt['bindir']}/vmproxy-agent", f"{opt['bindir']}/vmproxy-consumer"]:
        exe = _under(dest, prefix, b)
        r = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                           timeout=30)
        want = "%s %s" % (os.path.basename(b), version)
        assert r.returncode == 0 and r.stdout.strip() == want, (b, r.stdout, r.stderr)

    for e in EXAMPLES:
        if e.endswith(".json"):
            json.loads(_under(dest, prefix, f"{opt['datadir']}/doc/vmproxy/examples/{e}")
                       .read_text())


def _units_for_verify(dest, opt, tmp_path):
    """Copies of the installed units whose ExecStart names the destdir binary."""
    prefix = opt["prefix"]
    out = tmp_path / "units"
    out.mkdir()
    for u in UNITS:
        text = _under(dest, prefix, f"lib/systemd/system/{u}").read_text()
        m = re.search(r"^ExecStart=(\S+)", text, re.M)
        assert m, f"{u}: no ExecStart"
        binary = m.group(1)
        assert binary.startswith(prefix.rstrip("/") + "/"), \
            f"{u}: ExecStart {binary} is not under the prefix {prefix}"
        assert not re.search(r"@[a-z_]+@", text), f"{u}: unsubstituted placeholder"
        text = text.replace(f"ExecStart={binary}", f"ExecStart={dest}{binary}")
        (out / u).write_text(text)
    return out


def test_units_verify(installed, tmp_path):
    dest, opt = installed
    units = _units_for_verify(dest, opt, tmp_path)
    env = dict(os.environ, MANPATH=str(_under(dest, opt["prefix"], opt["mandir"])),
               SYSTEMD_LOG_LEVEL="notice")
    r = subprocess.run(["systemd-analyze", "verify", "--man=yes"] +
                       [str(units / u) for u in UNITS],
                       capture_output=True, text=True, timeout=120, env=env)
    # verify prints nothing for a clean unit; anything said is a finding.
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        r.stdout + r.stderr


def test_firecracker_dropin_verifies(installed, tmp_path):
    """vmproxyd.service with the Firecracker drop-in in its .d directory
    passes verify, and the drop-in is read (a broken copy is reported)."""
    dest, opt = installed
    units = _units_for_verify(dest, opt, tmp_path)
    dropin = _under(dest, opt["prefix"],
                    f"{opt['datadir']}/doc/vmproxy/examples/systemd/vmproxyd-firecracker.conf")
    d = units / "vmproxyd.service.d"
    d.mkdir()
    env = dict(os.environ, MANPATH=str(_under(dest, opt["prefix"], opt["mandir"])),
               SYSTEMD_LOG_LEVEL="notice")

    def verify():
        return subprocess.run(["systemd-analyze", "verify", "--man=yes",
                               str(units / "vmproxyd.service")],
                              capture_output=True, text=True, timeout=120, env=env)
    (d / "firecracker.conf").write_text(dropin.read_text() + "ReadWritePathz=/x\n")
    r = verify()
    assert "ReadWritePathz" in r.stdout + r.stderr, "the drop-in was not read"
    (d / "firecracker.conf").write_text(dropin.read_text())
    r = verify()
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        r.stdout + r.stderr


# Exposure as systemd-analyze scores it (0 = fully locked down, 10 = none).
# The proxy faces hostile guests: its bound is the tightest.
EXPOSURE_BOUND = {"vmproxyd.service": 2.5, "vmproxy-agent.service": 3.5,
                  "vmproxy-consumer.service": 3.5}


@pytest.mark.parametrize("unit", UNITS)
def test_unit_security_exposure(installed, tmp_path, unit):
    dest, opt = installed
    units = _units_for_verify(dest, opt, tmp_path)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        str(units / unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    print(f"{unit}: exposure {score}")
    assert score <= EXPOSURE_BOUND[unit], r.stdout


def test_sysusers_creates_accounts(installed, tmp_path):
    dest, opt = installed
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    conf = _under(dest, opt["prefix"], "lib/sysusers.d/vmproxy.conf")
    r = subprocess.run(["systemd-sysusers", f"--root={root}", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    passwd = (root / "etc/passwd").read_text()
    group = (root / "etc/group").read_text()
    assert re.search(r"^vmproxy:x:\d+:\d+:", passwd, re.M), passwd
    assert re.search(r"^vmproxy:x:\d+:", group, re.M), group
    # vmproxy is in vmproxy-admin: it hands its admin socket to that group.
    assert re.search(r"^vmproxy-admin:x:\d+:vmproxy$", group, re.M), group


@pytest.mark.parametrize("page", MAN)
def test_man_page(installed, page):
    dest, opt = installed
    path = _under(dest, opt["prefix"], f"{opt['mandir']}/{page}")
    r = subprocess.run(["groff", "-man", "-ww", "-z", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = subprocess.run(["groff", "-man", "-Tutf8", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = re.sub(r".\x08", "", r.stdout)
    name = pathlib.Path(page).stem
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"):
        assert section in text, f"{page}: no {section} section"
    assert name.split(".")[0] in text


def test_conf_page_example_is_valid(installed, certs, tmp_path):
    """The EXAMPLE of vmproxyd.conf(5), with what a host provides put in
    place (the test certificates for /etc/vmproxy/tls, libvirt's test
    driver for qemu:///system, a writable directory for /run/vmproxyd and
    an existing group for vmproxy-admin), passes vmproxyd --check-config,
    which checks those too."""
    dest, opt = installed
    page = _under(dest, opt["prefix"], f"{opt['mandir']}/man5/vmproxyd.conf.5").read_text()
    m = re.search(r"^\.SH EXAMPLE\n\.nf\n(.*?)^\.fi$", page, re.M | re.S)
    assert m, "vmproxyd.conf(5) has no EXAMPLE block"
    text = m.group(1).replace("\\-", "-")
    for name in ("ca.pem", "proxy.pem", "proxy-key.pem"):
        text = text.replace("/etc/vmproxy/tls/" + name, str(certs / name))
    node = pathlib.Path(__file__).resolve().parents[2] / "tests/unit/proxy/data/node.xml"
    text = text.replace("qemu:///system", "test://%s" % node)
    text = text.replace("/run/vmproxyd/", str(tmp_path) + "/")
    text = text.replace('"vmproxy-admin"', '"root"')
    conf = tmp_path / "vmproxyd.json"
    conf.write_text(text)
    exe = _under(dest, opt["prefix"], f"{opt['sbindir']}/vmproxyd")
    r = subprocess.run([str(exe), "--config", str(conf), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr + text


def test_man_pages_follow_the_prefix(installed):
    """vmproxyd(8) names the example configuration under the configured
    prefix, not a fixed /usr."""
    dest, opt = installed
    page = _under(dest, opt["prefix"], f"{opt['mandir']}/man8/vmproxyd.8").read_text()
    want = os.path.join(opt["prefix"], opt["datadir"], "doc/vmproxy/examples",
                        "vmproxyd.example.json")
    assert want in page, want
    assert "@EXAMPLES@" not in page


def test_hash_password_writes_definitions_the_broker_accepts(broker):
    """hash-password.py --definitions gives each user a new random password
    and writes the hashes into a copy of the definitions; the broker, given
    that copy, accepts the printed password and refuses the old one."""
    top = pathlib.Path(__file__).resolve().parents[2]
    helper = top / "deploy" / "rabbitmq" / "hash-password.py"
    # rabbitmqctl runs as the broker's user: a directory it can read.
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-defs-"))
    os.chmod(tmp_path, 0o755)
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"users": [
        {"name": "hashcheck", "password_hash": "", "hashing_algorithm":
         "rabbit_password_hashing_sha256", "tags": [], "limits": {}}]}))
    out = tmp_path / "out.json"
    r = subprocess.run(["/usr/bin/python3", str(helper), "--definitions", str(src), str(out)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    (name, password), = [line.split(" ", 1) for line in r.stdout.splitlines()]
    # Letters and digits (190 bits): never a leading "-" that rabbitmqctl
    # below, or an operator's command line, would take for an option.
    assert name == "hashcheck" and len(password) == 32 and password.isalnum(), password
    assert oct(out.stat().st_mode & 0o777) == "0o640"
    os.chmod(out, 0o644)  # the broker's user reads it for the import
    broker.ctl("import_definitions", str(out))
    try:
        broker.ctl("authenticate_user", "hashcheck", password)  # raises when refused
        with pytest.raises(BrokerError):
            broker.ctl("authenticate_user", "hashcheck", password + "x")
    finally:
        broker.ctl("delete_user", "hashcheck")
    r = subprocess.run(["/usr/bin/python3", str(helper), "--definitions", str(src), str(out),
                        "nobody"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no user 'nobody'" in r.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def _meson_dependencies(top):
    """The pkg-config names of every dependency() the build asks for."""
    names = set()
    for f in top.rglob("meson.build"):
        if f.relative_to(top).parts[0].startswith(("build", ".")):
            continue
        names |= set(re.findall(r"\bdependency\(\s*'([^']+)'", f.read_text()))
    names.discard("threads")  # the C library's, no package
    return names


def _owning_package(pc_name):
    """The Debian package that ships NAME.pc on this machine."""
    r = subprocess.run(["pkg-config", "--path", pc_name], capture_output=True, text=True)
    assert r.returncode == 0, f"pkg-config finds no {pc_name}.pc: {r.stderr}"
    r = subprocess.run(["dpkg-query", "-S", r.stdout.strip()], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split(":", 1)[0]


def test_every_build_dependency_is_in_the_install_lists():
    """Every library the build needs (each dependency() of the meson files,
    through the package that ships its .pc file here) is in debian/control's
    Build-Depends, in the apt-get line of docs/deploy.md section 1.2 and in
    deploy/install-deps.sh: a clean package build, and a reader following the
    guide on a machine with nothing else installed, get past `meson setup`."""
    top = pathlib.Path(__file__).resolve().parents[2]
    needed = {name: _owning_package(name) for name in sorted(_meson_dependencies(top))}
    assert {"sqlite3", "libpq", "librabbitmq"} <= set(needed)

    control = (top / "debian" / "control").read_text()
    field = re.search(r"^Build-Depends:(.*?)^\S", control, re.S | re.M).group(1)
    build_depends = {d.split()[0] for d in field.split(",") if d.strip()}

    guide = (top / "docs" / "deploy.md").read_text()
    section = guide[guide.index("### 1.2 "):]
    line = re.search(r"apt-get install ((?:[^\n]*\\\n)*[^\n]*)", section).group(1)
    guide_packages = set(line.replace("\\\n", " ").split())

    deps_script = (top / "deploy" / "install-deps.sh").read_text()
    array = re.search(r"^packages=\((.*?)^\)", deps_script, re.S | re.M).group(1)
    script_packages = {w for ln in array.splitlines() for w in ln.split("#")[0].split()}

    for where, have in (("debian/control Build-Depends", build_depends),
                        ("docs/deploy.md 1.2 apt-get line", guide_packages),
                        ("deploy/install-deps.sh", script_packages)):
        missing = {f"{pkg} ({name}.pc)" for name, pkg in needed.items() if pkg not in have}
        assert not missing, f"{where} lacks {sorted(missing)}"
