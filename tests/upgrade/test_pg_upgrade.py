"""Moving a database that holds keys to another PostgreSQL major, as users do.

pg_upgrade 15 -> 17 (from Debian's 15), 16 -> 17, 17 -> 18 and 16 -> 18, each
over a cluster that preloads makima_keys and holds keys of every kind (plain,
scoped with metadata, expiring, expired, revoked, in a grace period, rotated,
credited with a refill, rate-limited, and one whose rate limit is spent),
moved the way the README's Operations section says: traffic stopped, the
flush worker's round awaited until mk_shared_status() owes nothing, a clean
shutdown, pg_upgrade. After each:
  - every key's mk_verify and mk_verify_detail answers (peeks, so asking
    again changes nothing) are exactly the rows they were before;
  - every stored row is the same, last_used_at included;
  - the extension's catalog and privileges equal a fresh install on the new
    major; issuing (a rate-limited key too) works;
  - the launcher runs and its flush worker writes a new key's last_used_at;
  - what shared memory alone held starts afresh, as the README says (the
    state file records its major): mk_key_stats is empty and the spent
    budget is full again.
Also: pg_upgrade from Debian's 15 to 18 fails (the pg_attver attribute option
that build stores; see the README), and dump and restore from 15 to 18
through the README's filter keeps every key.

Run by scripts/test.sh after the version matrix, with the extension
installed in the 15, 16, 17 and 18 trees."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import psycopg
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "clients"))
from test_v020 import assert_same_catalog, catalog  # noqa: E402

BASE_PORT = int(os.environ.get("PGPORT", "26329")) + 7
USERS_DDL = "CREATE TABLE users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
# The README's filter for dumps of Debian's PostgreSQL 15 (Operations).
PG_ATTVER = re.compile(r"^ALTER TABLE ONLY .* ALTER COLUMN .* SET \(pg_attver=[0-9]+\);\n", re.M)
# The README's step before pg_upgrade from Debian's 15 (Operations): drop the
# pg_attver attribute option that build stores on every column, which 17 and
# 18 refuse when pg_upgrade restores the schema. Run in every database, then
# stop the server.
DROP_PG_ATTVER = """
    UPDATE pg_catalog.pg_attribute
       SET attoptions = NULLIF(ARRAY(SELECT o FROM unnest(attoptions) o WHERE o NOT LIKE 'pg_attver=%'), '{}')
     WHERE attoptions::text LIKE '%pg_attver=%'"""
GRANTS = ["GRANT EXECUTE ON FUNCTION mk_verify(text, text[], integer) TO mk_upgrade_app",
          "GRANT SELECT ON mk_keys TO mk_upgrade_admin",
          "GRANT SELECT ON mk_key_stats TO mk_upgrade_admin"]
# Both servers preload makima_keys in postgresql.conf, as a production
# server does, so pg_upgrade's own starts load it too.
CONF = {"shared_preload_libraries": "makima_keys", "makima_keys.flush_interval": "1"}
# The key whose user's budget (2 calls a day) is spent before the upgrade.
SPENT = "rate_limit_spent"


def run(*args, env=None, cwd=None):
    done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def pg_bin(major):
    return pathlib.Path(run("bash", "-c", f". {REPO}/scripts/pg-versions.sh && pg_bin_for {major}").strip())


def as_postgres(*args, cwd=None, check=True):
    command = ["sudo", "-u", "postgres", "--", *map(str, args)]
    if check:
        return run(*command, cwd=cwd)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


class Cluster:
    def __init__(self, root, name, major, port):
        self.dir, self.major, self.port = root / name, major, str(port)
        self.bin = pg_bin(major)
        self.data = self.dir / "data"

    def initdb(self, *extra, conf=None):
        self.dir.mkdir()
        os.chmod(self.dir, 0o777)
        as_postgres(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--locale=C.UTF-8", *extra)
        if conf:
            lines = "".join(f"{name} = '{value}'\n" for name, value in conf.items())
            as_postgres("sh", "-c", f"printf %s \"$0\" >> {self.data}/postgresql.conf", lines)

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
    for role in ("mk_upgrade_app", "mk_upgrade_admin"):
        conn.execute(f"DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    for grant in GRANTS:
        conn.execute(grant)
    names = ("plain", "rotated", "revoked", "scoped", "expiring", "expired", "credited", "rate_limited", SPENT)
    users = {name: conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", (name,)).fetchone()[0]
             for name in names}
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
    keys["credited"] = issue(users["credited"], ", credits => 10, refill_amount => 10, refill_every => '1 day'")
    assert conn.execute("SELECT mk_verify(%s, cost => 3)", (keys["credited"],)).fetchone()[0] == users["credited"]
    keys["rate_limited"] = issue(users["rate_limited"], ", rate_limit => 1000, rate_period => '1 hour'")
    keys[SPENT] = issue(users[SPENT], ", rate_limit => 2, rate_period => '1 day'")
    assert conn.execute("SELECT mk_verify(%s, cost => 2)", (keys[SPENT],)).fetchone()[0] == users[SPENT]
    assert conn.execute("SELECT mk_verify(%s)", (keys["plain"],)).fetchone()[0] == users["plain"]
    return keys


def answers(conn, keys):
    """What every key verifies to, and its detail rows, with and without a
    scope required. Peeks (cost 0) spend no credit and draw on no budget, so
    asking twice gives the same rows."""
    out = {}
    for name, key in sorted(keys.items()):
        out[name] = (
            conn.execute("SELECT mk_verify(%s, cost => 0)", (key,)).fetchone(),
            conn.execute("SELECT mk_verify(%s, '{read}', cost => 0)", (key,)).fetchone(),
            # (metadata also as text: psycopg reads jsonb numbers as floats)
            conn.execute("SELECT d.*, d.metadata::text FROM mk_verify_detail(%s, cost => 0) d", (key,)).fetchall(),
            conn.execute("SELECT d.*, d.metadata::text FROM mk_verify_detail(%s, '{write}', cost => 0) d",
                         (key,)).fetchall(),
        )
    out["junk"] = conn.execute("SELECT mk_verify('mk_nothing'), (mk_verify_detail(NULL)).status").fetchone()
    return out


def status(conn, key, cost=1):
    return conn.execute("SELECT status FROM mk_verify_detail(%s, cost => %s)", (key, cost)).fetchone()[0]


def stored_rows(conn):
    return conn.execute("SELECT k.*, k.metadata::text FROM api_keys k ORDER BY id").fetchall()


def stats(conn):
    return conn.execute("SELECT * FROM mk_key_stats ORDER BY key_id NULLS FIRST").fetchall()


def keys_owed(conn):
    """What the database's keys are owed in shared memory (README: wait for
    0 before stopping the old server)."""
    return conn.execute("SELECT keys_owed FROM mk_shared_status() WHERE datname = current_database()").fetchone()


def check_new_major(conn, fresh_conn, keys, before, new_major):
    assert conn.execute("SHOW server_version_num").fetchone()[0].startswith(str(new_major))
    # Shared memory starts afresh on the new server: no counts (before any
    # call here), and the spent budget is full again (2 calls pass, the third
    # is refused; peeks draw nothing).
    assert stats(conn) == []
    assert answers(conn, keys) == before
    assert_same_catalog(catalog(conn), catalog(fresh_conn))
    assert [status(conn, keys[SPENT]) for _ in range(3)] == ["valid", "valid", "rate_limited"]
    # Issuing works, a rate-limited key too, and the launcher's flush worker
    # writes the new key's last_used_at.
    assert conn.execute("SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'makima_keys launcher'").fetchone()[0] == 1
    user = conn.execute("INSERT INTO users (email) VALUES ('new') RETURNING id").fetchone()[0]
    key_id, key = conn.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
    assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
    wait_for(lambda: conn.execute("SELECT last_used_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0],
             "the flush worker's write of a new key's last_used_at")
    limited = conn.execute("INSERT INTO users (email) VALUES ('new limited') RETURNING id").fetchone()[0]
    key = conn.execute("SELECT key FROM mk_issue_key(%s, rate_limit => 1, rate_period => '1 hour')",
                       (limited,)).fetchone()[0]
    assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == limited
    assert status(conn, key) == "rate_limited"


def fresh_database(cluster):
    with cluster.connect("postgres") as admin:
        admin.execute("CREATE DATABASE fresh")
    conn = cluster.connect("fresh")
    conn.execute(USERS_DDL)
    conn.execute("CREATE EXTENSION makima_keys")
    for grant in GRANTS:
        conn.execute(grant)
    return conn


def wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)
    return value


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


def old_cluster_with_keys(cluster, drop_pg_attver=False):
    """Starts `cluster` (makima_keys preloaded) with a database `app` full of
    keys; once the flush worker has written every last_used_at owed, as the
    README says to wait for (and, with `drop_pg_attver`, the README's step
    for Debian's 15 run in every database), stops it cleanly. Returns the
    keys, their answers and the stored rows."""
    cluster.initdb(conf=CONF)
    cluster.start()
    with cluster.connect("postgres") as admin:
        admin.execute("CREATE DATABASE app")
    with cluster.connect() as conn:
        keys = fill_with_keys(conn)
        before = answers(conn, keys)
        assert status(conn, keys[SPENT]) == "rate_limited"
        assert stats(conn), "the old server counted nothing"
        wait_for(lambda: keys_owed(conn) == (0,), "the old server's last flush")
        rows = stored_rows(conn)
        assert conn.execute("SELECT count(*) FROM api_keys WHERE last_used_at IS NOT NULL").fetchone()[0] >= 6
    if drop_pg_attver:
        with cluster.connect("postgres") as admin:
            databases = [d for (d,) in admin.execute("SELECT datname FROM pg_database WHERE datallowconn")]
        for database in databases:
            with cluster.connect(database) as conn:
                conn.execute(DROP_PG_ATTVER)
    cluster.stop()
    return keys, before, rows


def pg_upgrade(old, new, tmp, check=True):
    done = as_postgres(new.bin / "pg_upgrade", "-b", old.bin, "-B", new.bin, "-d", old.data, "-D", new.data,
                       "-p", old.port, "-P", new.port, "-U", "postgres", "-s", tmp, cwd=tmp, check=False)
    if check:
        assert done.returncode == 0, f"pg_upgrade failed:\n{done.stdout[-1500:]}\n{upgrade_logs(new)}"
    return done


def upgrade_logs(new, tail=1200):
    """What pg_upgrade logged in the new cluster (it keeps the logs of a
    failure), the last `tail` characters of each log."""
    return "\n".join(f"== {p.name}: ...{p.read_text(errors='replace')[-(tail or 0):]}"
                     for p in sorted(new.data.glob("pg_upgrade_output.d/**/*.log")))


def new_initdb_options(old, new):
    # 18's initdb turns data checksums on, earlier ones do not; pg_upgrade needs them equal.
    return ["--no-data-checksums"] if new.major >= 18 > old.major else []


@pytest.mark.parametrize("old_major,new_major", [(15, 17), (16, 17), (17, 18), (16, 18), (15, 18)],
                         ids=["15-17", "16-17", "17-18", "16-18", "15-18"])
def test_pg_upgrade_keeps_every_key(root, old_major, new_major):
    tmp, clusters = root
    old = Cluster(tmp, f"old{old_major}", old_major, BASE_PORT)
    new = Cluster(tmp, f"new{new_major}", new_major, BASE_PORT + 1)
    clusters += [old, new]
    keys, before, rows_before = old_cluster_with_keys(old, drop_pg_attver=old_major == 15)

    new.initdb(*new_initdb_options(old, new), conf=CONF)
    pg_upgrade(old, new, tmp)
    new.start()
    with new.connect() as conn, fresh_database(new) as fresh:
        assert stored_rows(conn) == rows_before
        check_new_major(conn, fresh, keys, before, new_major)


@pytest.mark.parametrize("new_major", [17, 18])
def test_pg_upgrade_from_debian_15_fails_unless_pg_attver_is_dropped(root, new_major):
    """The path that does not work as is (README, Operations): Debian's 15
    build stores an attribute option pg_attver on every column, which 17 and
    18 reject while pg_upgrade restores the schema. When this starts to
    pass, the README's extra step is out of date."""
    tmp, clusters = root
    old, new = Cluster(tmp, "old15", 15, BASE_PORT), Cluster(tmp, f"new{new_major}", new_major, BASE_PORT + 1)
    clusters += [old, new]
    old_cluster_with_keys(old)
    new.initdb(*new_initdb_options(old, new), conf=CONF)
    done = pg_upgrade(old, new, tmp, check=False)
    assert done.returncode != 0, f"pg_upgrade from Debian's 15 to {new_major} works as is now: update the README"
    assert 'unrecognized parameter "pg_attver"' in upgrade_logs(new, tail=None), done.stdout[-2000:]


def test_dump_and_restore_from_15_to_18_keeps_every_key(root):
    """The way from Debian's 15 to 18: every key and row comes across;
    what shared memory alone held starts afresh, as with pg_upgrade."""
    tmp, clusters = root
    old, new = Cluster(tmp, "old15", 15, BASE_PORT), Cluster(tmp, "new18", 18, BASE_PORT + 1)
    clusters += [old, new]
    keys, before, rows_before = old_cluster_with_keys(old)
    old.start()
    new.initdb(conf=CONF)
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
        assert stored_rows(conn) == rows_before
        check_new_major(conn, fresh, keys, before, 18)
