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
import subprocess

import pytest

UNITS = ["vmproxyd.service", "vmproxy-agent.service", "vmproxy-consumer.service"]
MAN = ["man8/vmproxyd.8", "man8/vmproxyctl.8", "man8/vmproxy-agent.8",
       "man8/vmproxy-consumer.8", "man5/vmproxyd.conf.5"]
EXAMPLES = ["vmproxyd.example.json", "vmproxy-agent.example.json",
            "vmproxy-consumer.example.json", "rabbitmq/rabbitmq.conf.in",
            "rabbitmq/definitions.json", "rabbitmq/gen-definitions.py",
            "libvirt/vsock-device.xml"]


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
    """The EXAMPLE of vmproxyd.conf(5), with the test certificates in place
    of /etc/vmproxy/tls, passes vmproxyd --check-config."""
    dest, opt = installed
    page = _under(dest, opt["prefix"], f"{opt['mandir']}/man5/vmproxyd.conf.5").read_text()
    m = re.search(r"^\.SH EXAMPLE\n\.nf\n(.*?)^\.fi$", page, re.M | re.S)
    assert m, "vmproxyd.conf(5) has no EXAMPLE block"
    text = m.group(1).replace("\\-", "-")
    for name in ("ca.pem", "proxy.pem", "proxy-key.pem"):
        text = text.replace("/etc/vmproxy/tls/" + name, str(certs / name))
    conf = tmp_path / "vmproxyd.json"
    conf.write_text(text)
    exe = _under(dest, opt["prefix"], f"{opt['sbindir']}/vmproxyd")
    r = subprocess.run([str(exe), "--config", str(conf), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr + text
