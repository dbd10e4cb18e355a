"""Throwaway PostgreSQL clusters with makima_keys in shared_preload_libraries,
for the tests of the shared tier (test_shared_memory.py).

scripts/test.sh starts the suite's cluster without preloading; these start
their own, on ports PGPORT+20 to PGPORT+29, in directories under /tmp that
are removed afterwards. PostgreSQL runs as `postgres`, as in cluster.sh."""

import contextlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid

import psycopg

from conftest import PG_BIN, PORT, REPO, SUPERUSER, USERS_DDL, conninfo

CLUSTER_SH = str(REPO / "scripts" / "cluster.sh")
PRELOAD = "shared_preload_libraries=makima_keys"


def port(offset):
    """This module's ports: PGPORT + 20 to 29."""
    assert 20 <= offset <= 29, offset
    return str(int(PORT) + offset)


def as_postgres(*args, check=True):
    return subprocess.run(["sudo", "-u", "postgres", "--", *map(str, args)], check=check,
                          capture_output=True, text=True)


def wait_for(predicate, timeout=15.0, what="the condition", interval=0.05):
    """Polls `predicate` until it returns a true value (returned), or fails
    after `timeout` seconds. A deadline, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


class Cluster:
    """One throwaway cluster. `settings` go to `postgres -c` through
    cluster.sh (makima_keys is always preloaded unless `preload=False`);
    `conf` goes to postgresql.conf, where ALTER SYSTEM and a reload can
    change it later (a -c setting would win over both)."""

    def __init__(self, offset, *settings, conf=None, preload=True, prefix="mk-shared-"):
        self.port = port(offset)
        self.root = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
        os.chmod(self.root, 0o777)
        self.settings = ([PRELOAD] if preload else []) + list(settings)
        self.conf = dict(conf or {})

    @property
    def data(self):
        return self.root / "data"

    def init(self):
        """initdb as cluster.sh runs it, then the `conf` settings."""
        as_postgres(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--locale=C.UTF-8")
        if self.conf:
            lines = "".join(f"{name} = '{value}'\n" for name, value in self.conf.items())
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(lines)
        return self

    def start(self):
        if not (self.data / "PG_VERSION").exists():
            self.init()
        subprocess.run(["bash", CLUSTER_SH, "start", str(self.root), self.port, *self.settings], check=True)
        return self

    def stop(self):
        subprocess.run(["bash", CLUSTER_SH, "stop", str(self.root)], check=False)

    def destroy(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def conninfo(self, dbname="postgres", user=SUPERUSER):
        return conninfo(dbname, user=user, port=self.port)

    def connect(self, dbname="postgres", user=SUPERUSER, autocommit=True, **kwargs):
        return psycopg.connect(self.conninfo(dbname, user), autocommit=autocommit, **kwargs)

    def log(self):
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def postmaster_pid(self):
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def processes(self, title):
        """Pids of the postmaster's children whose process title contains `title`."""
        found = []
        children = subprocess.run(["pgrep", "-P", str(self.postmaster_pid())], capture_output=True,
                                  text=True).stdout.split()
        for pid in children:
            with contextlib.suppress(OSError):
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if title in cmdline:
                    found.append(int(pid))
        return found

    def launchers(self):
        return self.processes("makima_keys launcher")

    def accepts_connections(self):
        try:
            with self.connect() as conn:
                return conn.execute("SELECT true").fetchone()[0]
        except psycopg.OperationalError:
            return False

    def new_database(self):
        """A database with a users table and the extension (at 0.4.0)."""
        name = "s_" + uuid.uuid4().hex[:12]
        with self.connect() as admin:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        with self.connect(name) as conn:
            conn.execute(USERS_DDL)
            conn.execute("CREATE EXTENSION makima_keys")
        return name

    def drop_database(self, name):
        with self.connect() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def running(offset, *settings, **options):
    """A started cluster, stopped and removed afterwards whatever happens."""
    cluster = Cluster(offset, *settings, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
