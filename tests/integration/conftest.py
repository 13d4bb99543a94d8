"""Shared fixtures of the integration scenarios.

build_dir (session)  the meson build directory under test ($VMPROXY_BUILD_DIR,
                     default <repo>/build)
certs (session)      a deploy/gen-certs.sh directory
broker (session)     a private RabbitMQ node (harness.rabbitmq.RabbitMQ),
                     brought back before each test that uses it
cluster (module)     a three-node RabbitMQ cluster (harness.cluster), likewise
                     brought back (thawed, restarted) before each test
postgres (session)   a private PostgreSQL server (harness.postgres) on a Unix
                     socket, started again before each test that uses it
procs                start programs with captured output: procs(argv, name=...)
                     returns a harness.Proc, stopped at teardown, its output
                     tail printed if the test failed
"""
import contextlib
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

HERE = pathlib.Path(__file__).resolve().parent
TOP = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import free_port, run_proc, wait_for  # noqa: E402,F401
from harness.rabbitmq import RabbitMQ  # noqa: E402
from harness.vmproxyd import VmProxyd  # noqa: E402
from harness.cluster import RabbitMQCluster  # noqa: E402
from harness.postgres import PostgreSQL  # noqa: E402


# The sanitizer build's programs read these; deploy/run-tests.sh exports
# the same, and a run by hand gets them too (the suppressions file names
# only libraries' process-lifetime globals).
os.environ.setdefault("LSAN_OPTIONS", "suppressions=%s:print_suppressions=0"
                      % (TOP / "tests" / "lsan.supp"))
os.environ.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
os.environ.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")


def _terminate(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def pytest_configure(config):
    # A SIGTERM (e.g. from timeout(1) in deploy/run-tests.sh) ends the run
    # like ^C: fixtures are finalized, the broker stopped, reports written.
    signal.signal(signal.SIGTERM, _terminate)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item so teardown can ask whether the
    test failed (test_failed below)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def test_failed(request):
    """True when the setup or call phase of REQUEST's test failed."""
    node = request.node
    return any(getattr(node, "rep_" + w, None) is not None and getattr(node, "rep_" + w).failed
               for w in ("setup", "call"))


test_failed.__test__ = False  # not a test despite its name


@pytest.fixture(scope="session")
def build_dir():
    return pathlib.Path(os.environ.get("VMPROXY_BUILD_DIR", TOP / "build")).resolve()


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(TOP / "deploy" / "gen-certs.sh"), str(d)], check=True,
                   stdout=subprocess.DEVNULL)
    return d


@pytest.fixture(scope="session")
def broker(certs):
    # The node runs as user rabbitmq, which cannot enter pytest's private
    # temporary tree, so its directory lives directly under /tmp.
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-broker-"))
    # Many guests mean many broker connections: raise the node's open-files
    # limit (by default as far as the hard limit allows, without a warning).
    nofile = os.environ.get("VMPROXY_BROKER_NOFILE")
    nofile = int(nofile) if nofile else min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    b = RabbitMQ(workdir, certs, nofile=nofile)
    try:
        b.start()
        yield b
    finally:
        b.close()
        if not os.environ.get("VMPROXY_KEEP_BROKER"):
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(certs):
    """A three-node RabbitMQ cluster (harness.cluster), TLS on every node,
    the topology's quorum queues on all three."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-cluster-"))
    c = RabbitMQCluster(workdir, certs)
    try:
        c.start()
        yield c
    finally:
        c.close()
        if not os.environ.get("VMPROXY_KEEP_BROKER"):
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server: .conninfo for the consumer, .psql(sql),
    .connect() (psycopg2), .stop()/.start() to take it away."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="vmproxy-pg-"))
    pg = PostgreSQL(workdir)
    try:
        pg.start()
        yield pg
    finally:
        pg.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _broker_alive(request):
    """A test may kill, stop or freeze the broker: the next test that uses
    it gets it running again."""
    if "broker" in request.fixturenames:
        request.getfixturevalue("broker").ensure_running()
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").ensure_running()
    if "postgres" in request.fixturenames:
        pg = request.getfixturevalue("postgres")
        if not pg.running():
            pg.start()
    yield


@pytest.fixture
def proxy_factory(build_dir, broker, certs, tmp_path):
    """make(vms, **kw): a VmProxyd in front of the session broker. Every
    daemon a test left running is stopped as its service manager would:
    SIGTERM, exit 0, nothing from the sanitizers (leaks included)."""
    started = []

    def make(vms, **kw):
        p = VmProxyd(build_dir, tmp_path, broker, certs, vms, **kw)
        started.append(p)
        return p
    yield make
    for p in started:
        p.stop()


@pytest.fixture
def procs(request, tmp_path):
    """procs(argv, name=None, env=None, cwd=None, stop_timeout=10) -> Proc:
    start a program with its output in tmp_path/NAME.log; it is stopped at
    teardown (SIGTERM, then SIGKILL) and its output tail printed if the test
    failed."""
    with contextlib.ExitStack() as stack:
        def start(argv, **kw):
            kw.setdefault("tmp_dir", tmp_path)
            kw.setdefault("failed", lambda: test_failed(request))
            return stack.enter_context(run_proc(argv, **kw))
        yield start
