"""Helpers for integration scenarios: free ports, bounded waiting, and
programs run under test with their output captured to a file."""
import contextlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port(host="127.0.0.1"):
    """A TCP port on HOST that was free a moment ago (bound to port 0 and
    released; good enough on a loopback test host)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what, interval=0.05):
    """Call PREDICATE until it returns something true, at most TIMEOUT
    seconds; returns that value. On timeout raises AssertionError naming
    WHAT, with the last value or exception PREDICATE produced.

    An exception from PREDICATE counts as "not yet" (the condition may not
    be observable yet: a socket not there, a file half written), except an
    AssertionError: that is a check that failed, and it propagates at once,
    even if the condition would have held a moment later."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = "returned %r" % (value,)
        except AssertionError:
            raise
        except Exception as e:  # the condition may not be observable yet
            last = "raised %s: %s" % (type(e).__name__, e)
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s (last: %s)"
                                 % (timeout, what, last))
        time.sleep(interval)


# What AddressSanitizer, LeakSanitizer and UndefinedBehaviorSanitizer print
# when they find something (LeakSanitizer at exit).
_SANITIZER_RE = re.compile(r"ERROR: (?:Address|Leak|Memory|Thread)Sanitizer|"
                           r"SUMMARY: \w+Sanitizer|: runtime error: ")


def sanitizer_report(text):
    """The lines of TEXT that belong to a sanitizer report ([] if none)."""
    return [l for l in text.splitlines() if _SANITIZER_RE.search(l)]


def stop_clean(popen, name, output, timeout=30):
    """End a daemon the way its service manager does and check it went
    well: SIGTERM, at most TIMEOUT seconds for it to exit, exit status 0 and
    no sanitizer report in OUTPUT() (its captured output, read after the
    exit, when LeakSanitizer has run). A program still running after TIMEOUT
    is killed (SIGKILL) and the test fails; so does any other status.
    Returns the exit status (0)."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=30)
            raise AssertionError("%s (pid %d) still running %d s after SIGTERM; killed:\n%s"
                                 % (name, popen.pid, timeout, _tail_text(output())))
    text = output()
    report = sanitizer_report(text)
    assert not report, "%s: sanitizer report:\n%s\n%s" % (name, "\n".join(report),
                                                           _tail_text(text, 80))
    assert popen.returncode == 0, "%s exited with status %s:\n%s" % (
        name, popen.returncode, _tail_text(text))
    return popen.returncode


def stop_all(*stops):
    """Call every STOPS function (e.g. the .stop of each program a test
    started), even when one fails; then raise the first failure."""
    errors = []
    for stop in stops:
        try:
            stop()
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    if errors:
        raise errors[0]


def _tail_text(text, lines=40):
    return "\n".join(text.splitlines()[-lines:])


def tail(path, lines=40):
    """The last LINES lines of the file at PATH ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Proc:
    """A program started by run_proc: .popen, .pid, .output_path."""

    def __init__(self, argv, name, output_path, popen):
        self.argv = argv
        self.name = name
        self.output_path = pathlib.Path(output_path)
        self.popen = popen
        self.pid = popen.pid

    def output(self):
        """Everything the program wrote so far (stdout and stderr)."""
        return self.output_path.read_text(errors="replace")

    def tail(self, lines=40):
        return tail(self.output_path, lines)

    def alive(self):
        return self.popen.poll() is None

    def wait(self, timeout):
        """Wait at most TIMEOUT seconds for exit; returns the status."""
        return self.popen.wait(timeout=timeout)

    def signal(self, sig):
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL if still running after TIMEOUT seconds.
        Returns the exit status (negative: killed by that signal)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)
        return self.popen.returncode


@contextlib.contextmanager
def run_proc(argv, name=None, tmp_dir=None, env=None, cwd=None, stop_timeout=10,
             failed=None, tail_lines=40, stdin=subprocess.DEVNULL):
    """Start ARGV with stdout and stderr going to NAME.log in TMP_DIR (a new
    temporary directory if none), yield a Proc, and on leaving the block stop
    it (SIGTERM, SIGKILL after STOP_TIMEOUT s). The output tail is printed
    when the block raised, or when FAILED (a callable, e.g. the conftest's
    test_failed(request)) says the test failed."""
    argv = [str(a) for a in argv]
    name = name or os.path.basename(argv[0])
    tmp_dir = pathlib.Path(tmp_dir or tempfile.mkdtemp(prefix="vmproxy-proc-"))
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out_path = tmp_dir / ("%s.log" % name)
    n = 1
    while out_path.exists():
        n += 1
        out_path = tmp_dir / ("%s.%d.log" % (name, n))
    with open(out_path, "wb") as out:
        popen = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                                 env=env, cwd=cwd)
    proc = Proc(argv, name, out_path, popen)
    raised = False
    try:
        yield proc
    except BaseException:
        raised = True
        raise
    finally:
        status = proc.stop(stop_timeout)
        if raised or (failed is not None and failed()):
            sys.stderr.write("---- %s (pid %d, status %s), last %d lines of %s:\n%s\n----\n"
                             % (name, proc.pid, status, tail_lines, out_path,
                                proc.tail(tail_lines)))
