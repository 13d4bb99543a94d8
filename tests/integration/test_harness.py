"""The harness itself: the private broker has the topology, users, TLS and
permissions the scenarios rely on, and survives the faults they inject."""
import socket
import ssl
import subprocess
import sys

import pika
import pika.exceptions
import pytest

from harness import run_proc, wait_for
from harness.rabbitmq import DEPLOY


def test_plain_login_as_admin_sees_topology(broker):
    """admin logs in over plain AMQP and finds the exchange and the queue."""
    with broker.connection("admin") as conn:
        ch = conn.channel()
        ch.exchange_declare(broker.exchange, exchange_type="topic", passive=True)
        ch.queue_declare(broker.queue, passive=True)


def test_wrong_password_is_refused(broker):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(broker.pika_params(user="admin", password="wrong"))


def test_tls_external_login_as_vmproxyd(broker):
    """EXTERNAL over TLS with the proxy certificate logs in as its CN."""
    with broker.connection("vmproxyd", external=True,
                           client_properties={"connection_name": "harness-external"}) as conn:
        assert conn.is_open
        conns = wait_for(lambda: [c for c in broker.connections()
                                  if c["client_properties"].get("connection_name")
                                  == "harness-external"], 15, "the connection listed")
        assert conns[0]["user"] == "vmproxyd"
        assert conns[0]["peer_host"] == "127.0.0.1"


def test_tls_without_client_certificate_is_refused(broker):
    """The TLS listener requires a client certificate from the CA."""
    params = broker.pika_params("admin", tls=True)
    ctx = ssl.create_default_context(cafile=str(broker.certs / "ca.pem"))
    params.ssl_options = pika.SSLOptions(ctx, server_hostname=broker.host)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params)


def test_tls_with_certificate_from_another_ca_is_refused(broker, tmp_path):
    """A client certificate signed by some other CA is refused."""
    other = tmp_path / "other"
    subprocess.run(["bash", str(DEPLOY / "gen-certs.sh"), str(other)], check=True,
                   stdout=subprocess.DEVNULL)
    params = broker.pika_params("vmproxyd", external=True, cert=other / "proxy.pem",
                                key=other / "proxy-key.pem")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params)


def test_vmproxyd_may_publish_only_to_vm_metrics(broker):
    """vmproxyd's write permission covers vm.metrics alone: publishing to
    another exchange closes the channel with 403, publishing to vm.metrics
    is confirmed and reaches vm.metrics.all."""
    broker.purge(broker.queue)
    with broker.connection("vmproxyd", external=True) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.basic_publish("amq.topic", "vm.x", b"denied")
        assert e.value.reply_code == 403
        assert "ACCESS_REFUSED" in e.value.reply_text

        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare("vmproxyd-may-not-declare")
        assert e.value.reply_code == 403

        ch = conn.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2, message_id="harness-1")
        ch.basic_publish(broker.exchange, "vm.test.cpu", b"hello", props, mandatory=True)
    msgs = broker.get_all(broker.queue, timeout=15)
    assert [(m.routing_key, p.message_id, b) for m, p, b in msgs] == \
        [("vm.test.cpu", "harness-1", b"hello")]
    assert broker.queue_depth(broker.queue) == 0


def test_consumer_can_bind_its_own_queue(broker):
    """vmproxy-consumer may declare vm.metrics.* queues and bind them."""
    with broker.connection("vmproxy-consumer", external=True) as conn:
        ch = conn.channel()
        ch.queue_declare("vm.metrics.harness", auto_delete=True)
        ch.queue_bind("vm.metrics.harness", broker.exchange, "vm.#")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            conn.channel().queue_declare("elsewhere")
        assert e.value.reply_code == 403


def _publish(broker, n, tag):
    with broker.connection("admin") as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(n):
            ch.basic_publish(broker.exchange, "vm.%s" % tag, b"%d" % i,
                             pika.BasicProperties(delivery_mode=2), mandatory=True)


def test_restart_keeps_durable_queue_and_messages(broker):
    broker.purge(broker.queue)
    _publish(broker, 5, "restart")
    assert broker.queue_depth(broker.queue) == 5
    port, tls_port = broker.port, broker.tls_port
    broker.stop()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(broker.pika_params())
    broker.start()
    assert (broker.port, broker.tls_port) == (port, tls_port)
    msgs = broker.get_all(broker.queue, timeout=15)
    assert sorted(b for _, _, b in msgs) == [b"%d" % i for i in range(5)]


def test_kill_then_ensure_running_recovers(broker):
    """SIGKILL loses no confirmed message; ensure_running brings it back."""
    broker.purge(broker.queue)
    _publish(broker, 3, "kill")
    broker.kill()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(broker.pika_params())
    broker.ensure_running()
    msgs = broker.get_all(broker.queue, timeout=15)
    assert sorted(b for _, _, b in msgs) == [b"0", b"1", b"2"]


def _amqp_greeting(broker, timeout):
    """Send the AMQP 0-9-1 header; return the first bytes the node answers
    (connection.start) or None if it says nothing within TIMEOUT."""
    with socket.create_connection((broker.host, broker.port), timeout=5) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        s.settimeout(timeout)
        try:
            return s.recv(7)
        except socket.timeout:
            return None


def test_freeze_and_thaw(broker):
    """A frozen node accepts TCP but answers nothing; thaw resumes it."""
    assert _amqp_greeting(broker, 10)[:1] == b"\x01"
    broker.freeze()
    try:
        assert _amqp_greeting(broker, 1.5) is None
    finally:
        broker.thaw()
    assert _amqp_greeting(broker, 10)[:1] == b"\x01"
    with broker.connection() as conn:
        assert conn.is_open


_killed = {}


def test_killed_broker_does_not_poison_the_next_test_part1(broker):
    """Leaves the node dead (SIGKILL): nothing answers on its port."""
    _killed["pid"] = broker.node.proc.pid
    broker.kill()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(broker.pika_params(connection_attempts=1))


def test_killed_broker_does_not_poison_the_next_test_part2(broker):
    """Runs after part 1 killed the node: the autouse fixture started a new
    node process, which accepts connections and has the queue of the
    definitions."""
    assert "pid" in _killed, "part 1 did not run first"
    assert broker.node.alive() and broker.node.proc.pid != _killed["pid"]
    with broker.connection() as conn:
        conn.channel().queue_declare(broker.queue, passive=True)


def test_ctl_talks_to_the_node(broker):
    out = broker.ctl("list_vhosts", "--quiet")
    assert "vmproxy" in out.split()


def test_run_proc_stops_and_reports(tmp_path, capsys):
    """run_proc captures output, stops the program on exit and prints the
    tail when the block fails."""
    code = "import sys,time; print('started', flush=True); time.sleep(600)"
    with pytest.raises(RuntimeError):
        with run_proc([sys.executable, "-c", code], name="sleeper", tmp_dir=tmp_path,
                      stop_timeout=5) as p:
            wait_for(lambda: "started" in p.output(), 10, "the program's first line")
            raise RuntimeError("scenario failed")
    assert p.popen.returncode == -15
    assert "started" in capsys.readouterr().err


def test_wait_for_reports_what_timed_out():
    with pytest.raises(AssertionError, match="the impossible"):
        wait_for(lambda: False, 0.2, "the impossible")


def test_wait_for_retries_not_yet_but_lets_a_failed_check_through():
    """Another exception is "not yet" and retried; an AssertionError inside
    the predicate fails the wait at once, even though the condition would
    hold on the next call."""
    calls = []

    def not_observable_yet():
        calls.append(1)
        if len(calls) < 3:
            raise FileNotFoundError("not there yet")
        return "there"
    assert wait_for(not_observable_yet, 10, "a file", interval=0.01) == "there"
    assert len(calls) == 3

    checks = []

    def check_fails_once():
        checks.append(1)
        assert len(checks) > 1, "a VM split over threads"
        return True
    with pytest.raises(AssertionError, match="a VM split over threads"):
        wait_for(check_fails_once, 10, "a check", interval=0.01)
    assert len(checks) == 1
