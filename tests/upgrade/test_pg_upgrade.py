"""Moving a database that holds keys to another PostgreSQL major, as users do:
pg_upgrade from 16 to 18, and dump and restore from 15 to 18 (pg_upgrade
cannot read Debian's 15 build; see the README). Every key must verify exactly
as before, mk_verify_detail must give the same rows, the extension's catalog
must equal a fresh install on the new major, and issuing must work.

Run by scripts/test.sh after the version matrix, with the extension
installed in the 15, 16 and 18 trees."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import psycopg
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "clients"))
from test_v020 import assert_same_catalog, catalog  # noqa: E402

BASE_PORT = int(os.environ.get("PGPORT", "26329")) + 7
USERS_DDL = "CREATE TABLE users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
# The README's filter for dumps of Debian's PostgreSQL 15 (Operations).
PG_ATTVER = re.compile(r"^ALTER TABLE ONLY .* ALTER COLUMN .* SET \(pg_attver=[0-9]+\);\n", re.M)
GRANTS = "GRANT EXECUTE ON FUNCTION mk_verify(text, text[], integer) TO mk_upgrade_app"


def run(*args, env=None, cwd=None):
    done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def pg_bin(major):
    return pathlib.Path(run("bash", "-c", f". {REPO}/scripts/pg-versions.sh && pg_bin_for {major}").strip())


def as_postgres(*args, cwd=None):
    return run("sudo", "-u", "postgres", "--", *map(str, args), cwd=cwd)


class Cluster:
    def __init__(self, root, name, major, port):
        self.dir, self.major, self.port = root / name, major, str(port)
        self.bin = pg_bin(major)
        self.data = self.dir / "data"

    def initdb(self, *extra):
        self.dir.mkdir()
        os.chmod(self.dir, 0o777)
        as_postgres(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--locale=C.UTF-8", *extra)

    def start(self):
        run("bash", str(REPO / "scripts/cluster.sh"), "start", str(self.dir), self.port, env={"MK_PG_BIN": str(self.bin)})

    def stop(self):
        run("bash", str(REPO / "scripts/cluster.sh"), "stop", str(self.dir), env={"MK_PG_BIN": str(self.bin)})

    def connect(self, dbname="app"):
        info = psycopg.conninfo.make_conninfo(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)
        return psycopg.connect(info, autocommit=True)


def fill_with_keys(conn):
    """Keys in every state a database holds; returns them by name."""
    conn.execute(USERS_DDL)
    conn.execute("CREATE EXTENSION makima_keys")
    conn.execute("DO $$ BEGIN CREATE ROLE mk_upgrade_app; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    conn.execute(GRANTS)
    users = {name: conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", (name,)).fetchone()[0]
             for name in ("plain", "rotated", "revoked", "scoped", "expiring", "expired")}
    issue = lambda user, options="": conn.execute(  # noqa: E731
        f"SELECT key FROM mk_issue_key(%s{options})", (user,)).fetchone()[0]
    keys = {"plain": issue(users["plain"], ", 'laptop'")}
    keys["in_grace"] = issue(users["rotated"])
    keys["rotated"] = conn.execute("SELECT key FROM mk_rotate_key(%s, grace => '1 day')",
                                   (users["rotated"],)).fetchone()[0]
    keys["revoked"] = issue(users["revoked"])
    conn.execute("SELECT mk_revoke_user_keys(%s)", (users["revoked"],))
    keys["scoped"] = issue(users["scoped"], """, scopes => '{read,write}', metadata => '{"team": "ops", "n": 12345678901234567890.123}'""")
    keys["expiring"] = issue(users["expiring"], ", expires_in => '30 days'")
    keys["expired"] = issue(users["expired"], ", expires_in => '1 hour'")
    conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE user_id = %s", (users["expired"],))
    conn.execute("SELECT mk_verify(%s)", (keys["plain"],))  # sets last_used_at
    return keys


def answers(conn, keys):
    """What every key verifies to, and its detail rows (with and without a scope)."""
    out = {}
    for name, key in sorted(keys.items()):
        out[name] = (
            conn.execute("SELECT mk_verify(%s)", (key,)).fetchone(),
            conn.execute("SELECT mk_verify(%s, '{read}')", (key,)).fetchone(),
            conn.execute("SELECT * FROM mk_verify_detail(%s)", (key,)).fetchall(),
            conn.execute("SELECT * FROM mk_verify_detail(%s, '{write}')", (key,)).fetchall(),
        )
    out["junk"] = conn.execute("SELECT mk_verify('mk_nothing'), (mk_verify_detail(NULL)).status").fetchone()
    return out


def stored_rows(conn):
    return conn.execute("SELECT * FROM api_keys ORDER BY id").fetchall()


def check_new_major(conn, fresh_conn, keys, before, rows_before):
    assert answers(conn, keys) == before
    assert stored_rows(conn) == rows_before
    assert_same_catalog(catalog(conn), catalog(fresh_conn))
    user = conn.execute("INSERT INTO users (email) VALUES ('new') RETURNING id").fetchone()[0]
    key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
    assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user


def fresh_database(cluster):
    with cluster.connect("postgres") as admin:
        admin.execute("CREATE DATABASE fresh")
    conn = cluster.connect("fresh")
    conn.execute(USERS_DDL)
    conn.execute("CREATE EXTENSION makima_keys")
    conn.execute(GRANTS)
    return conn


@pytest.fixture
def root():
    """A directory the postgres user can reach (pytest's tmp_path is private
    to root), and the clusters started in it, stopped at the end."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mk-upgrade-"))
    os.chmod(tmp, 0o777)
    clusters = []
    yield tmp, clusters
    for cluster in clusters:
        subprocess.run(["bash", str(REPO / "scripts/cluster.sh"), "stop", str(cluster.dir)],
                       env={**os.environ, "MK_PG_BIN": str(cluster.bin)}, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def old_cluster_with_keys(cluster):
    """Starts `cluster` with a database `app` full of keys; returns the keys,
    their answers and the stored rows."""
    cluster.initdb()
    cluster.start()
    with cluster.connect("postgres") as admin:
        admin.execute("CREATE DATABASE app")
    with cluster.connect() as conn:
        keys = fill_with_keys(conn)
        return keys, answers(conn, keys), stored_rows(conn)


def test_pg_upgrade_from_16_to_18_keeps_every_key(root):
    tmp, clusters = root
    old, new = Cluster(tmp, "old16", 16, BASE_PORT), Cluster(tmp, "new18", 18, BASE_PORT + 1)
    clusters += [old, new]
    keys, before, rows_before = old_cluster_with_keys(old)
    old.stop()

    # 18's initdb turns data checksums on, 16's does not; pg_upgrade needs them equal.
    new.initdb("--no-data-checksums")
    as_postgres(new.bin / "pg_upgrade", "-b", old.bin, "-B", new.bin, "-d", old.data, "-D", new.data,
                "-p", old.port, "-P", new.port, "-U", "postgres", "-s", tmp, cwd=tmp)
    new.start()
    with new.connect() as conn, fresh_database(new) as fresh:
        assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("18")
        check_new_major(conn, fresh, keys, before, rows_before)


def test_dump_and_restore_from_15_to_18_keeps_every_key(root):
    tmp, clusters = root
    old, new = Cluster(tmp, "old15", 15, BASE_PORT + 2), Cluster(tmp, "new18", 18, BASE_PORT + 3)
    clusters += [old, new]
    keys, before, rows_before = old_cluster_with_keys(old)
    new.initdb()
    new.start()
    # The newer major's pg_dump reads the older server, as PostgreSQL recommends.
    run(new.bin / "pg_dumpall", "-h", "127.0.0.1", "-p", old.port, "-U", "postgres", "--roles-only",
        "-f", tmp / "roles.sql")
    run(new.bin / "psql", "-X", "-q", "-h", "127.0.0.1", "-p", new.port, "-U", "postgres", "-d", "postgres",
        "-f", tmp / "roles.sql")
    dump = run(new.bin / "pg_dump", "-h", "127.0.0.1", "-p", old.port, "-U", "postgres", "-d", "app")
    # Debian's 15 build sets an attribute option pg_attver on every column,
    # which 18 refuses: the README's filter drops exactly those statements.
    assert PG_ATTVER.search(dump), "the Debian 15 quirk is gone: simplify the README's recipe"
    (tmp / "app.sql").write_text(PG_ATTVER.sub("", dump))
    with new.connect("postgres") as admin:
        admin.execute("CREATE DATABASE app")
    run(new.bin / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", new.port,
        "-U", "postgres", "-d", "app", "-f", tmp / "app.sql")
    with new.connect() as conn, fresh_database(new) as fresh:
        # A logical restore creates the extension before `users`, so the
        # foreign key comes back with the README's one call (Schema).
        assert conn.execute("SELECT mk_restore_user_foreign_key()").fetchone()[0] is True
        check_new_major(conn, fresh, keys, before, rows_before)
