"""Races between sessions with explicit interleavings, crashes, long runs and
error paths. Iteration counts come from the environment so that the same tests
serve as the stress command (README, section Operations)."""

import os
import pathlib
import random
import signal
import subprocess
import tempfile
import threading
import time

import psycopg
import pytest

from conftest import PORT, REPO, USERS_DDL, add_user, connect, conninfo, has_extension, sqlstate_of

RACE_ITERATIONS = int(os.environ.get("MK_RACE_ITERATIONS", "200"))
VERIFY_CALLS = int(os.environ.get("MK_VERIFY_CALLS", "1000000"))


class Session:
    """A connection of its own whose statements can run in a background thread."""

    def __init__(self, db):
        self.conn = connect(db)
        self.pid = self.conn.info.backend_pid
        self.thread = None
        self.outcome = None

    def run(self, sql, params=None):
        try:
            cur = self.conn.execute(sql, params)
            row = cur.fetchone() if cur.description else None
            return ("ok", row[0] if row else None)
        except psycopg.Error as e:
            return ("error", e.sqlstate)

    def start(self, sql, params=None):
        def work():
            self.outcome = self.run(sql, params)
        self.thread = threading.Thread(target=work)
        self.thread.start()

    def finish(self, timeout=20):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "session still blocked: deadlock or lost wakeup"
        return self.outcome

    def close(self):
        self.conn.close()


def wait_until_waiting_on_lock(observer, pid, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = observer.execute(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if waiting and waiting[0]:
            return
        time.sleep(0.001)
    raise AssertionError(f"backend {pid} never waited on a lock")


@pytest.fixture
def sessions(db):
    opened = [Session(db) for _ in range(3)]
    yield opened
    for s in opened:
        s.close()


def no_bad_states(*outcomes):
    for outcome in outcomes:
        assert outcome[0] == "ok" or outcome[1] not in ("40P01", "XX000"), outcome


def active_keys(conn, user):
    return conn.execute("SELECT count(*) FROM api_keys WHERE user_id = %s AND revoked_at IS NULL",
                        (user,)).fetchone()[0]


def test_race_issue_against_issue(sessions):
    a, b, observer = sessions
    for i in range(RACE_ITERATIONS):
        user = add_user(observer.conn)
        a.run("BEGIN")
        assert a.run("SELECT key FROM mk_issue_key(%s)", (user,))[0] == "ok"
        b.start("SELECT key FROM mk_issue_key(%s)", (user,))
        wait_until_waiting_on_lock(observer.conn, b.pid)
        a_commits = i % 2 == 0
        a.run("COMMIT" if a_commits else "ROLLBACK")
        outcome = b.finish()
        no_bad_states(outcome)
        assert outcome == ("error", "23505") if a_commits else outcome[0] == "ok", outcome
        assert active_keys(observer.conn, user) == 1


def test_race_rotate_against_rotate(sessions):
    a, b, observer = sessions
    for _ in range(RACE_ITERATIONS):
        user = add_user(observer.conn)
        observer.run("SELECT mk_issue_key(%s)", (user,))
        a.run("BEGIN")
        state, a_key = a.run("SELECT key FROM mk_rotate_key(%s)", (user,))
        assert state == "ok"
        b.start("SELECT key FROM mk_rotate_key(%s)", (user,))
        wait_until_waiting_on_lock(observer.conn, b.pid)
        a.run("COMMIT")
        outcome = b.finish()
        no_bad_states(outcome)
        assert outcome == ("error", "23505"), outcome
        assert active_keys(observer.conn, user) == 1
        assert observer.run("SELECT mk_verify(%s)", (a_key,)) == ("ok", user)


def test_race_revoke_against_verify(sessions):
    a, b, observer = sessions
    b.run("SET makima_keys.last_used_interval = 0")
    b.run("SET lock_timeout = '10s'")
    for _ in range(RACE_ITERATIONS):
        user = add_user(observer.conn)
        key_id, key = observer.conn.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
        a.run("BEGIN")
        assert a.run("SELECT mk_revoke(%s)", (key_id,)) == ("ok", True)
        # Uncommitted revoke: verification neither blocks nor sees it.
        assert b.run("SELECT mk_verify(%s)", (key,)) == ("ok", user)
        a.run("COMMIT")
        assert b.run("SELECT mk_verify(%s)", (key,)) == ("ok", None)
        assert b.run("SELECT status FROM mk_verify_detail(%s)", (key,)) == ("ok", "revoked")


def locks_on_key_table(conn):
    """The read locks this session holds on api_keys and on the index mk_verify probes."""
    return sorted(conn.execute(
        """SELECT c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
            WHERE l.pid = pg_backend_pid() AND l.granted AND l.mode = 'AccessShareLock'
              AND c.relname IN ('api_keys', 'idx_api_keys_key_hash_unique')""").fetchall())


def test_verification_keeps_its_locks_after_a_rolled_back_savepoint(sessions):
    """mk_verify skips taking its locks again while this backend holds them.
    A savepoint rolled back, or a failed cursor, releases them, so the next
    call must take them again, or a concurrent DROP INDEX could run during its
    probe."""
    a, b, observer = sessions
    user = add_user(observer.conn)
    key = observer.conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
    # Used once already, so that the calls below only read.
    assert observer.run("SELECT mk_verify(%s)", (key,)) == ("ok", user)
    expected = [("api_keys", "AccessShareLock"), ("idx_api_keys_key_hash_unique", "AccessShareLock")]
    conn = a.conn

    def verify():
        return conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0]

    conn.execute("BEGIN")
    conn.execute("SAVEPOINT first")
    assert verify() == user
    assert verify() == user
    assert locks_on_key_table(conn) == expected
    conn.execute("ROLLBACK TO SAVEPOINT first")
    assert locks_on_key_table(conn) == []
    # The same subtransaction nesting level, a new subtransaction.
    assert verify() == user
    assert locks_on_key_table(conn) == expected
    # And a DDL that needs the index to itself waits for this transaction.
    b.run("SET lock_timeout = '300ms'")
    assert b.run("DROP INDEX idx_api_keys_key_hash_unique") == ("error", "55P03")
    conn.execute("ROLLBACK")
    # One level down: locks taken in a savepoint that is released belong to
    # its parent, and go when the parent is rolled back.
    conn.execute("BEGIN")
    conn.execute("SAVEPOINT outer_sp")
    conn.execute("SAVEPOINT inner_sp")
    assert verify() == user
    conn.execute("RELEASE SAVEPOINT inner_sp")
    assert locks_on_key_table(conn) == expected
    conn.execute("ROLLBACK TO SAVEPOINT outer_sp")
    assert locks_on_key_table(conn) == []
    assert verify() == user
    assert locks_on_key_table(conn) == expected
    conn.execute("ROLLBACK")
    # Locks taken inside a cursor belong to it. When a fetch fails inside a
    # savepoint, rolling the savepoint back releases them, and after RELEASE
    # the session is back in the subtransaction that ran the first fetch.
    conn.execute("BEGIN")
    conn.execute("DECLARE c CURSOR FOR SELECT mk_verify(%s) FROM generate_series(1, 2) i"
                 " WHERE 1 / (2 - i) IS NOT NULL", (key,))
    assert conn.execute("FETCH 1 FROM c").fetchone()[0] == user
    assert locks_on_key_table(conn) == expected
    conn.execute("SAVEPOINT s")
    assert sqlstate_of(conn, "FETCH 1 FROM c") == "22012"
    conn.execute("ROLLBACK TO SAVEPOINT s")
    conn.execute("RELEASE SAVEPOINT s")
    assert locks_on_key_table(conn) == []
    assert verify() == user
    assert locks_on_key_table(conn) == expected
    assert b.run("DROP INDEX idx_api_keys_key_hash_unique") == ("error", "55P03")
    conn.execute("ROLLBACK")


def test_race_delete_user_against_issue(sessions):
    a, b, observer = sessions
    for i in range(RACE_ITERATIONS):
        user = add_user(observer.conn)
        if i % 2 == 0:
            # The delete first: the issue waits for it, then finds no user.
            a.run("BEGIN")
            a.run("DELETE FROM users WHERE id = %s", (user,))
            b.start("SELECT key FROM mk_issue_key(%s)", (user,))
            wait_until_waiting_on_lock(observer.conn, b.pid)
            a.run("COMMIT")
            outcome = b.finish()
            assert outcome == ("error", "23503"), outcome
        else:
            # The issue first: the delete waits for it, then cascades.
            a.run("BEGIN")
            assert a.run("SELECT key FROM mk_issue_key(%s)", (user,))[0] == "ok"
            b.start("DELETE FROM users WHERE id = %s", (user,))
            wait_until_waiting_on_lock(observer.conn, b.pid)
            a.run("COMMIT")
            outcome = b.finish()
            no_bad_states(outcome)
            assert outcome[0] == "ok", outcome
        orphans = observer.conn.execute(
            "SELECT count(*) FROM api_keys k WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = k.user_id)"
        ).fetchone()[0]
        assert orphans == 0


def test_race_verify_against_verify_with_interval_zero(sessions):
    a, b, observer = sessions
    for s in (a, b):
        s.run("SET makima_keys.last_used_interval = 0")
        s.run("SET lock_timeout = '10s'")
    user = add_user(observer.conn)
    key = observer.conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
    for _ in range(RACE_ITERATIONS):
        a.run("BEGIN")
        # Inside a transaction block: verifies without writing, so it holds no row lock.
        assert a.run("SELECT mk_verify(%s)", (key,)) == ("ok", user)
        assert observer.run("SELECT 1 FROM api_keys WHERE key_hash = mk_hash_key(%s) FOR UPDATE NOWAIT",
                            (key,)) == ("ok", 1)
        # Its own transaction: writes (interval 0), never waiting.
        assert b.run("SELECT mk_verify(%s)", (key,)) == ("ok", user)
        a.run("COMMIT")


# ---------------------------------------------------------------- crashes

def test_committed_work_survives_a_postmaster_kill(tmp_path):
    port = str(int(PORT) + 3)
    root = pathlib.Path(tempfile.mkdtemp(prefix="mk-crash-"))
    os.chmod(root, 0o777)
    cluster = str(REPO / "scripts" / "cluster.sh")
    subprocess.run(["bash", cluster, "start", str(root), port], check=True)
    try:
        admin = conninfo("postgres", port=port)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(USERS_DDL)
            conn.execute("CREATE EXTENSION makima_keys")
            conn.execute("INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, 5000)")
            users = [u for (u,) in conn.execute("SELECT id FROM users")]
        committed_keys, revoke_attempted, committed_revokes = {}, set(), set()
        lock = threading.Lock()
        stop = threading.Event()

        def worker(seed):
            rng = random.Random(seed)
            mine = users[seed::4]
            try:
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute("SET makima_keys.last_used_interval = 0")
                    for user in mine:
                        if stop.is_set():
                            return
                        key_id, key = conn.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
                        with lock:
                            committed_keys[key_id] = (user, key)
                        conn.execute("SELECT mk_verify(%s)", (key,))
                        if rng.random() < 0.3:
                            with lock:
                                revoke_attempted.add(key_id)
                            conn.execute("SELECT mk_revoke(%s)", (key_id,))
                            with lock:
                                committed_revokes.add(key_id)
            except psycopg.Error:
                return  # the server died under us

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(committed_keys) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        killed = [postmaster, *map(int, children)]
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(30)
        assert len(committed_keys) >= 300
        wait_until_gone(killed)
        restarted = subprocess.run(["bash", cluster, "start", str(root), port], capture_output=True, text=True)
        log = (root / "server.log").read_text(errors="replace")[-3000:]
        assert restarted.returncode == 0, f"restart failed: {restarted.stderr}\n{log}"

        with psycopg.connect(admin, autocommit=True) as conn:
            for key_id, (user, key) in committed_keys.items():
                got = conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0]
                if key_id in committed_revokes:
                    assert got is None, "a committed revoke was lost"
                elif key_id not in revoke_attempted:
                    assert got == user, "a committed key was lost"
            # Every index whole: amcheck ships with every major we test.
            assert has_extension("amcheck"), "amcheck is missing, and the README says it runs on every major"
            conn.execute("CREATE EXTENSION amcheck")
            checked = conn.execute(
                "SELECT count(bt_index_check(i.indexrelid, true)) FROM pg_index i"
                " WHERE i.indrelid = 'api_keys'::regclass").fetchone()[0]
            assert checked == 7
            # and the server is fully usable again
            user = add_user(conn)
            key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
            assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
    finally:
        subprocess.run(["bash", cluster, "stop", str(root)], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def wait_until_gone(pids, timeout=30):
    """Killed backends must be gone before a new postmaster may start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {alive} survived SIGKILL")


# ---------------------------------------------------------------- long runs

def backend_memory(conn, pid):
    contexts = conn.execute("SELECT sum(total_bytes) FROM pg_backend_memory_contexts").fetchone()[0]
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    rss_anon_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")))
    return int(contexts), rss_anon_kb * 1024


def test_memory_is_flat_over_a_million_verifications(db):
    batch = 100_000
    with connect(db) as conn:
        conn.execute("INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, 1000)")
        conn.execute("CREATE TEMP TABLE probe_keys AS"
                     " SELECT k.key FROM users u, LATERAL mk_issue_key(u.id) k")
        conn.execute("SELECT mk_revoke(id) FROM api_keys WHERE random() < 0.1")
        # Good, revoked, wrong-checksum, unknown and foreign keys, 100,000 in all.
        conn.execute("""
            CREATE TEMP TABLE batch AS
            SELECT CASE g %% 4
                     WHEN 0 THEN k.key
                     WHEN 1 THEN left(k.key, 51) || CASE right(k.key, 1) WHEN 'a' THEN 'b' ELSE 'a' END
                     WHEN 2 THEN 'legacy-' || g
                     ELSE repeat('x', g %% 2000) END AS key
              FROM generate_series(1, %s) g
              JOIN (SELECT key, row_number() OVER () - 1 AS n FROM probe_keys) k ON k.n = g %% 1000""",
                     (batch,))
        pid = conn.info.backend_pid
        calls = 0
        samples = {}
        while calls < VERIFY_CALLS:
            found = conn.execute("SELECT count(mk_verify(key)) FROM batch").fetchone()[0]
            assert found > 0
            calls += batch
            if calls in (batch, VERIFY_CALLS):
                samples[calls] = backend_memory(conn, pid)
        (ctx_start, rss_start), (ctx_end, rss_end) = samples[batch], samples[VERIFY_CALLS]
        print(f"after {batch}: contexts {ctx_start} B, RssAnon {rss_start} B; "
              f"after {VERIFY_CALLS}: contexts {ctx_end} B, RssAnon {rss_end} B")
        # Tolerance: 256 kB of memory contexts, 2 MB of anonymous RSS.
        assert ctx_end - ctx_start <= 256 * 1024
        assert rss_end - rss_start <= 2 * 1024 * 1024


# ---------------------------------------------------------------- errors

ERROR_PATHS = {
    "22004": "SELECT mk_issue_key(NULL)",
    "22001": "SELECT mk_issue_key(gen_random_uuid(), repeat('n', 300))",
    "23505": "SELECT mk_issue_key(%(user)s)",
    "23503": "SELECT mk_issue_key(gen_random_uuid())",
    "P0002": "SELECT mk_revoke(gen_random_uuid())",
    "22023": "SET LOCAL makima_keys.last_used_interval = -1",
}


def test_every_error_path_leaves_the_session_usable(db):
    with connect(db, autocommit=False) as conn:
        pid = conn.info.backend_pid
        user = add_user(conn)
        conn.execute("SELECT mk_issue_key(%s)", (user,))
        for expected, sql in ERROR_PATHS.items():
            conn.execute("SAVEPOINT attempt")
            extra = add_user(conn, f"{expected}@example.com")
            assert sqlstate_of(conn, sql, {"user": user}) == expected
            conn.execute("ROLLBACK TO SAVEPOINT attempt")
            # The rollback undid the work since the savepoint, kept the rest.
            assert conn.execute("SELECT count(*) FROM users WHERE id = %s", (extra,)).fetchone()[0] == 0
            assert conn.execute("SELECT mk_verify_detail('x')").fetchone()[0] is not None
            assert conn.info.backend_pid == pid
        conn.commit()
        assert active_keys(conn, user) == 1
        # And outside a savepoint: the transaction aborts, the session does not.
        assert sqlstate_of(conn, "SELECT mk_revoke(NULL)") == "22004"
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert conn.info.backend_pid == pid
