"""vmproxyd --check-config predicts the start.

Each case below is a configuration (or a host condition) that an operator
may get wrong. For every one, the scenario runs `vmproxyd --check-config`
and then starts vmproxyd for real on the same file, and asserts that the
check fails exactly when the start fails: a check that says OK before a
restart that then cannot start would take every guest of the host down.
No broker is needed: a start succeeds once vmproxyd listens and its admin
socket is up (the upstream links connect in the background).
"""
import datetime
import json
import os
import pathlib
import re
import subprocess
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from harness import free_port, wait_for

TOP = pathlib.Path(__file__).resolve().parents[2]
NODE_XML = TOP / "tests" / "unit" / "proxy" / "data" / "node.xml"


def _expired_cert(certs, path):
    """A client certificate for proxy-key.pem, signed by the test CA, that
    expired yesterday."""
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None)
    key = serialization.load_pem_private_key((certs / "proxy-key.pem").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "vmproxyd")]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _base(tmp_path, certs):
    return {
        "listeners": [{"type": "tcp", "address": "127.0.0.1", "port": free_port()}],
        "identity": {"static": [{"address": "127.20.0.1", "vm": "vm-a",
                                 "uuid": "6f1c7d2e-8a51-4e0b-9c3f-2b7a1d9e4c60"}]},
        "threads": {"count": 1},
        "upstream": {
            "host": "localhost", "port": free_port(), "exchange": "vmproxy.metrics",
            "tls": {"ca": str(certs / "ca.pem"), "cert": str(certs / "proxy.pem"),
                    "key": str(certs / "proxy-key.pem")},
            "auth": {"mechanism": "EXTERNAL"},
        },
        "admin": {"socket": str(tmp_path / "admin.sock")},
        "drain_timeout_ms": 0,
    }


def _libvirt(c, tmp_path, certs, uri=None, vm="guest-a"):
    c["identity"] = {"libvirt_uri": uri or "test://" + str(NODE_XML),
                     "static": [{"address": "127.20.0.1", "vm": vm}]}


def _set(path, value):
    def edit(c, tmp_path, certs):
        obj = c
        keys = path.split(".")
        for k in keys[:-1]:
            obj = obj.setdefault(k, {})
        obj[keys[-1]] = value
    return edit


def _tls(key, name):
    def edit(c, tmp_path, certs):
        c["upstream"]["tls"][key] = str(certs / name)
    return edit


def _expired(c, tmp_path, certs):
    _expired_cert(certs, tmp_path / "expired.pem")
    c["upstream"]["tls"]["cert"] = str(tmp_path / "expired.pem")


def _ca_bundle_with_expired_ca(c, tmp_path, certs):
    """ca.pem after an old CA that expired yesterday: a bundle as kept
    during a CA change; the valid CA still verifies."""
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old vmproxy CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    old = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(days=800))
           .not_valid_after(now - datetime.timedelta(days=1))
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(old.public_bytes(serialization.Encoding.PEM)
                       + (certs / "ca.pem").read_bytes())
    c["upstream"]["tls"]["ca"] = str(bundle)


def _ca_only_expired(c, tmp_path, certs):
    _ca_bundle_with_expired_ca(c, tmp_path, certs)
    text = (tmp_path / "ca-bundle.pem").read_text()
    first = text[:text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    (tmp_path / "ca-bundle.pem").write_text(first + "\n")


def _unix_on_file(c, tmp_path, certs):
    (tmp_path / "guest.sock").write_text("not a socket")
    c["listeners"].append({"type": "unix", "path": str(tmp_path / "guest.sock"), "vm": "vm-a"})


def _metrics_elsewhere(c, tmp_path, certs):
    c["metrics"] = {"listen": "192.0.2.1:%d" % free_port()}


# (case id, edit of the base configuration, whether the start succeeds)
CASES = [
    ("valid", lambda c, t, k: None, True),
    ("valid-libvirt", lambda c, t, k: _libvirt(c, t, k), True),
    ("valid-metrics", lambda c, t, k: c.update(metrics={"listen": "127.0.0.1:%d" % free_port(),
                                                        "per_vm": True}), True),
    ("balancer-typo", _set("balancer.intervall_ms", 1000), False),
    ("metrics-typo", lambda c, t, k: c.update(metrics={"listen": "127.0.0.1:9464",
                                                       "per_vms": True}), False),
    ("balancer-ratio", _set("balancer.ratio", 0.5), False),
    ("metrics-listen-not-numeric", _set("metrics.listen", "localhost:metrics"), False),
    ("metrics-address-not-here", _metrics_elsewhere, False),
    ("static-domain-missing", lambda c, t, k: _libvirt(c, t, k, vm="no-such-domain"), False),
    ("libvirt-node-file-missing",
     lambda c, t, k: _libvirt(c, t, k, uri="test://" + str(t / "missing-node.xml")), False),
    # Unreadable even to root (the tests may run as root, where a mode of 0 reads).
    ("libvirt-node-file-unreadable",
     lambda c, t, k: _libvirt(c, t, k, uri="test://" + str(t)), False),
    ("listener-address-not-here", _set("listeners", [{"type": "tcp", "address": "192.0.2.1",
                                                       "port": 5672}]), False),
    ("unix-listener-path-is-a-file", _unix_on_file, False),
    ("admin-socket-directory-missing",
     lambda c, t, k: c.update(admin={"socket": str(t / "no-such-dir" / "admin.sock")}), False),
    ("tls-key-of-another-certificate", _tls("key", "consumer-key.pem"), False),
    ("tls-certificate-expired", _expired, False),
    ("tls-ca-not-pem", _tls("ca", "proxy-key.pem"), False),
    ("tls-ca-bundle-with-an-expired-ca", _ca_bundle_with_expired_ca, True),
    ("tls-ca-expired", _ca_only_expired, False),
]


def _start(build_dir, conf, tmp_path, admin):
    """Start vmproxyd on CONF: True once its admin socket is up (it is the
    last thing a start does), False when it exits first."""
    log = open(tmp_path / "start.log", "wb")
    p = subprocess.Popen([str(build_dir / "proxy" / "vmproxyd"), "--config", str(conf)],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: p.poll() is not None or os.path.exists(admin), 60,
                 "vmproxyd to start or exit")
        started = p.poll() is None
    finally:
        if p.poll() is None:
            p.terminate()
        p.wait(timeout=30)
        log.close()
    return started, p.returncode


@pytest.mark.parametrize("name,edit,starts", CASES, ids=[c[0] for c in CASES])
def test_check_predicts_start(build_dir, certs, tmp_path, name, edit, starts):
    """--check-config exits 0 exactly when the start succeeds, and its
    message names the key at fault."""
    c = _base(tmp_path, certs)
    edit(c, tmp_path, certs)
    conf = tmp_path / "vmproxyd.json"
    conf.write_text(json.dumps(c, indent=2))
    check = subprocess.run([str(build_dir / "proxy" / "vmproxyd"), "--config", str(conf),
                            "--check-config"], capture_output=True, text=True, timeout=60)
    admin = c.get("admin", {}).get("socket", "")
    started, status = _start(build_dir, conf, tmp_path, admin)
    out = (tmp_path / "start.log").read_text(errors="replace")
    assert started == starts, "start: status %s\n%s" % (status, out)
    if starts:
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout == "%s: configuration OK\n" % conf, check.stdout
    else:
        assert check.returncode == 1, "check said OK but the start failed:\n" + out
        assert "configuration OK" not in check.stdout
        assert str(conf) in check.stderr, check.stderr


def test_check_reports_a_port_in_use_as_a_warning(build_dir, certs, tmp_path):
    """A check run while vmproxyd runs (before a restart) finds its port
    taken: that is said, but is no reason to fail, since a restart frees it."""
    c = _base(tmp_path, certs)
    conf = tmp_path / "vmproxyd.json"
    conf.write_text(json.dumps(c))
    log = open(tmp_path / "running.log", "wb")
    p = subprocess.Popen([str(build_dir / "proxy" / "vmproxyd"), "--config", str(conf)],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: p.poll() is None and os.path.exists(c["admin"]["socket"]), 60,
                 "vmproxyd admin socket")
        check = subprocess.run([str(build_dir / "proxy" / "vmproxyd"), "--config", str(conf),
                                "--check-config"], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        assert "warning:" in check.stderr and "is in use now" in check.stderr, check.stderr
        assert "listeners[0]" in check.stderr
    finally:
        p.terminate()
        p.wait(timeout=30)
        log.close()


def _agent_conf(tmp_path, certs, **kw):
    c = {"endpoint": "tcp://127.0.0.1:%d" % free_port(),
         "spool": {"dir": str(tmp_path / "spool")},
         "tls": {"ca": str(certs / "ca.pem"), "cert": str(certs / "proxy.pem"),
                 "key": str(certs / "proxy-key.pem")}}
    c.update(kw)
    return c


AGENT_CASES = [
    ("valid", {}, True),
    ("endpoint", {"endpoint": "udp://127.0.0.1:5672"}, False),
    ("spool-parent-missing", {"spool": {"dir": "/nonexistent-vmproxy/spool"}}, False),
    ("source-address-not-here", {"source_address": "192.0.2.7"}, False),
    ("tls-key-of-another-certificate", {"tls": "consumer-key"}, False),
]


@pytest.mark.parametrize("name,edit,ok", AGENT_CASES, ids=[c[0] for c in AGENT_CASES])
def test_agent_check_config(build_dir, certs, tmp_path, name, edit, ok):
    """vmproxy-agent --check-config: the endpoint, the spool directory, the
    source address and the TLS files; where the start itself fails (the
    endpoint, the spool directory), it fails too."""
    edit = dict(edit)
    c = _agent_conf(tmp_path, certs)
    if edit.get("tls") == "consumer-key":
        c["tls"]["key"] = str(certs / "consumer-key.pem")
        edit.pop("tls")
    c.update(edit)
    conf = tmp_path / "agent.json"
    conf.write_text(json.dumps(c))
    agent = str(build_dir / "guest-agent" / "vmproxy-agent")
    r = subprocess.run([agent, "--config", str(conf), "--check-config"], capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    assert (r.stdout == "%s: configuration OK\n" % conf) == ok, r.stdout
    if name in ("endpoint", "spool-parent-missing"):
        s = subprocess.run([agent, "--config", str(conf)], capture_output=True, text=True,
                           timeout=30)
        assert s.returncode == 1, s.stderr


def _consumer_conf(tmp_path, certs, **kw):
    c = {"broker": {"host": "localhost", "port": free_port(),
                    "tls": {"ca": str(certs / "ca.pem"), "cert": str(certs / "consumer.pem"),
                            "key": str(certs / "consumer-key.pem")},
                    "auth": {"mechanism": "EXTERNAL"}},
         "sink": {"dir": str(tmp_path / "jsonl")},
         "metrics": {"listen": "127.0.0.1:%d" % free_port()}}
    c.update(kw)
    return c


CONSUMER_CASES = [
    ("valid", lambda c, k: None, True),
    ("sink-parent-missing", lambda c, k: c.update(sink={"dir": "/nonexistent-vmproxy/x"}), False),
    ("metrics-address-not-here",
     lambda c, k: c.update(metrics={"listen": "192.0.2.1:%d" % free_port()}), False),
    ("tls-key-of-another-certificate",
     lambda c, k: c["broker"]["tls"].update(key=str(k / "proxy-key.pem")), False),
]


@pytest.mark.parametrize("name,edit,ok", CONSUMER_CASES, ids=[c[0] for c in CONSUMER_CASES])
def test_consumer_check_config(build_dir, certs, tmp_path, name, edit, ok):
    """vmproxy-consumer --check-config: the JSON Lines directory, the metrics
    address and the TLS files; where the start itself fails (directory,
    metrics address), it fails too."""
    c = _consumer_conf(tmp_path, certs)
    edit(c, certs)
    conf = tmp_path / "consumer.json"
    conf.write_text(json.dumps(c))
    consumer = str(build_dir / "mgmt-consumer" / "vmproxy-consumer")
    r = subprocess.run([consumer, "--config", str(conf), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    assert (r.stdout == "%s: configuration OK\n" % conf) == ok, r.stdout
    if name in ("sink-parent-missing", "metrics-address-not-here"):
        s = subprocess.run([consumer, "--config", str(conf)], capture_output=True, text=True,
                           timeout=30)
        assert s.returncode == 1, s.stderr


def test_consumer_certificate_expiry_series(build_dir, certs, tmp_path, procs):
    """The consumer's endpoint gives the seconds until its CA and client
    certificate expire, whether or not the broker is reachable."""
    c = _consumer_conf(tmp_path, certs)
    conf = tmp_path / "consumer.json"
    conf.write_text(json.dumps(c))
    procs([build_dir / "mgmt-consumer" / "vmproxy-consumer", "--config", conf],
          name="consumer")
    url = "http://%s/metrics" % c["metrics"]["listen"]
    text = wait_for(lambda: urllib.request.urlopen(url, timeout=5).read().decode(), 30,
                    "the consumer's metrics endpoint")
    series = dict(re.findall(r'^vmproxy_tls_certificate_expiry_seconds\{file="([^"]+)"\} (\S+)$',
                             text, re.M))
    assert set(series) == {str(certs / "ca.pem"), str(certs / "consumer.pem")}, text[-1500:]
    assert all(800 * 86400 < float(v) <= 826 * 86400 for v in series.values()), series
