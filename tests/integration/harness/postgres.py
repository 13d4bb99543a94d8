"""A private PostgreSQL server for integration scenarios.

PostgreSQL(workdir).start() runs Debian's initdb and pg_ctl (from
/usr/lib/postgresql/<version>/bin) on WORKDIR/data, listening only on a Unix
socket in WORKDIR/run (no TCP), with a database "vmproxy" owned by the
superuser "vmproxy" (trust authentication: only the socket's owner and root
can reach it). As root the server runs as the postgres user (initdb refuses
root). stop() is a fast shutdown (clients are disconnected); start() brings
the same cluster back on the same socket; close() stops it for good.

Command line, for shell scripts (benchmarks):
    cd tests/integration && python3 -m harness.postgres --workdir DIR
starts a server, prints one JSON line with its conninfo, and stops it on
SIGINT or SIGTERM.
"""
import argparse
import atexit
import glob
import json
import os
import pathlib
import pwd
import signal
import subprocess
import sys

from harness.procs import free_port, tail

_live = set()


def pg_bindir():
    """The newest /usr/lib/postgresql/*/bin with pg_ctl."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                  key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not dirs:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/pg_ctl: install postgresql")
    return pathlib.Path(dirs[-1]).parent


class PostgreSQL:
    user = "vmproxy"
    dbname = "vmproxy"

    def __init__(self, workdir, port=None):
        self.workdir = pathlib.Path(workdir).resolve()
        self.data = self.workdir / "data"
        self.run = self.workdir / "run"
        self.log = self.workdir / "postgresql.log"
        self.port = port or free_port()  # names the socket file .s.PGSQL.<port>
        self.bin = pg_bindir()
        self._as_postgres = os.geteuid() == 0
        self._initialized = False
        _live.add(self)

    @property
    def conninfo(self):
        return "host=%s port=%d user=%s dbname=%s connect_timeout=5" % (
            self.run, self.port, self.user, self.dbname)

    def _cmd(self, argv):
        if self._as_postgres:
            return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                    "--"] + argv
        return argv

    def _run(self, argv, **kw):
        env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
        r = subprocess.run(self._cmd(argv), capture_output=True, text=True, env=env,
                           cwd="/", **kw)
        if r.returncode != 0:
            raise RuntimeError("%s failed (%d): %s%s\n--- %s\n%s" % (
                argv[0], r.returncode, r.stdout, r.stderr, self.log, tail(self.log)))
        return r

    def _init(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(exist_ok=True)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            for p in (self.workdir, self.run):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(self.workdir, 0o755)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                   "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"])
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("listen_addresses = ''\n"
                    "unix_socket_directories = '%s'\n"
                    "port = %d\n"
                    "max_connections = 50\n"
                    "shared_buffers = 32MB\n" % (self.run, self.port))
        self._initialized = True

    def start(self):
        if not self._initialized:
            self._init()
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-w", "-t", "120", "start"])
        if not getattr(self, "_db_created", False):
            self.psql("CREATE DATABASE %s OWNER %s" % (self.dbname, self.user),
                      dbname="postgres")
            self._db_created = True
        return self

    def running(self):
        r = subprocess.run(self._cmd([str(self.bin / "pg_ctl"), "-D", str(self.data),
                                      "status"]), capture_output=True, cwd="/")
        return r.returncode == 0

    def stop(self):
        """A fast shutdown: open transactions are rolled back, clients
        disconnected."""
        if self._initialized and self.running():
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                       "-t", "120", "stop"])

    def close(self):
        try:
            self.stop()
        finally:
            _live.discard(self)

    def psql(self, sql, dbname=None):
        """Run SQL with psql; returns its output rows as lists of strings."""
        psql = self.bin / "psql"
        r = self._run([str(psql) if psql.exists() else "psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                       "-h", str(self.run), "-p", str(self.port), "-U", self.user,
                       "-d", dbname or self.dbname, "-c", sql])
        return [l.split("\t") for l in r.stdout.splitlines() if l]

    def new_database(self, name):
        """A fresh, empty database NAME (dropped first if it exists); returns
        its conninfo."""
        self.psql("DROP DATABASE IF EXISTS %s" % name, dbname="postgres")
        self.psql("CREATE DATABASE %s OWNER %s" % (name, self.user), dbname="postgres")
        return self.conninfo.replace("dbname=%s" % self.dbname, "dbname=%s" % name)

    def connect(self, dbname=None):
        import psycopg2
        return psycopg2.connect(host=str(self.run), port=self.port, user=self.user,
                                dbname=dbname or self.dbname)


@atexit.register
def _stop_all():
    for p in list(_live):
        try:
            p.close()
        except Exception:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    pg = PostgreSQL(args.workdir).start()
    print(json.dumps({"conninfo": pg.conninfo, "port": pg.port, "socket_dir": str(pg.run)}),
          flush=True)
    done = []
    signal.signal(signal.SIGTERM, lambda *a: done.append(1))
    signal.signal(signal.SIGINT, lambda *a: done.append(1))
    try:
        while not done:
            signal.pause()
    finally:
        pg.close()


if __name__ == "__main__":
    sys.exit(main())
