"""What a guest sends never forges a line of vmproxyd's log: its close
reason, user name and refused exchange name are logged with control bytes
replaced, so a newline in them cannot start a line of its own."""
import pika
import pytest

from harness import wait_for
from harness.vmproxyd import VmProxyd, from_source, make_vms


@pytest.fixture
def proxy(build_dir, broker, certs, tmp_path):
    vms = make_vms(1, base="127.10.44.1")
    p = VmProxyd(build_dir, tmp_path, broker, certs, vms, threads=1).start()
    yield p, vms[0]
    p.kill()


def test_guest_texts_cannot_forge_log_lines(proxy):
    p, vm = proxy
    forged = "FORGED vmproxyd[1] error: forged line"
    creds = pika.PlainCredentials("guest\n" + forged, "x")
    with from_source(vm["address"]):
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=p.port, credentials=creds))
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
        ch.basic_publish("bad\n" + forged, "k", b"x")
        ch.basic_publish("bad\n" + forged, "k", b"x")  # the close arrives with the next call
    assert exc.value.reply_code == 403
    conn.close(reply_code=200, reply_text="bye\n" + forged)
    wait_for(lambda: "closed by the client" in p.log_text(), 10, "the close logged")
    log = p.log_text()
    assert "bye?" + forged in log  # the reason is there, made harmless
    assert not any(line.startswith("FORGED") for line in log.splitlines()), log
