"""last_used_at is written at most once per interval, never by waiting for a
row lock, and never in a read-only transaction or on a hot standby."""

import os
import pathlib
import subprocess
import tempfile
import time

import psycopg

from conftest import PG_BIN, PORT, REPO, add_user, connect, conninfo


def issue(conn):
    user = add_user(conn)
    key_id, key = conn.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
    return user, key_id, key


def last_used(conn, key_id):
    return conn.execute("SELECT last_used_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]


def test_verify_does_not_wait_for_a_row_lock(db):
    with connect(db) as su, connect(db, autocommit=False) as holder, connect(db) as verifier:
        user, key_id, key = issue(su)
        holder.execute("SELECT 1 FROM api_keys WHERE id = %s FOR UPDATE", (key_id,))
        verifier.execute("SET makima_keys.last_used_interval = 0")
        verifier.execute("SET lock_timeout = '5s'")
        started = time.monotonic()
        for _ in range(20):
            assert verifier.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        # Twenty verifications behind a held lock: lock_timeout (5 s) would
        # have raised on the first one had any of them waited.
        assert time.monotonic() - started < 5
        holder.rollback()
        assert last_used(su, key_id) is None
        verifier.execute("SELECT mk_verify(%s)", (key,))
        assert last_used(su, key_id) is not None


def test_read_only_and_repeatable_read_transactions_verify_without_writing(db):
    with connect(db) as su, connect(db, autocommit=False) as conn:
        user, key_id, key = issue(su)
        conn.execute("SET makima_keys.last_used_interval = 0")
        conn.commit()
        for begin in ("BEGIN READ ONLY", "BEGIN ISOLATION LEVEL REPEATABLE READ",
                      "BEGIN ISOLATION LEVEL SERIALIZABLE"):
            conn.autocommit = True
            conn.execute(begin)
            assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
            assert conn.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "valid"
            conn.execute("COMMIT")
            assert last_used(su, key_id) is None, begin
        conn.execute("SELECT mk_verify(%s)", (key,))
        assert last_used(su, key_id) is not None


def test_verification_on_a_hot_standby(db):
    """A streaming replica verifies keys issued on the primary and stops
    verifying a key once its revocation has been replayed."""
    standby_port = str(int(PORT) + 1)
    with tempfile.TemporaryDirectory(prefix="mk-standby-") as tmp:
        root = pathlib.Path(tmp)
        os.chmod(root, 0o777)
        data = root / "data"
        subprocess.run(
            ["sudo", "-u", "postgres", str(PG_BIN / "pg_basebackup"),
             "-h", os.environ.get("PGHOST", "127.0.0.1"), "-p", PORT,
             "-U", "postgres", "-D", str(data), "-R", "-X", "stream", "-c", "fast"],
            check=True, capture_output=True)
        cluster = str(REPO / "scripts" / "cluster.sh")
        subprocess.run(["bash", cluster, "start", str(root), standby_port, "hot_standby=on"], check=True)
        try:
            with connect(db) as primary:
                primary.execute("SET makima_keys.last_used_interval = 0")
                user, key_id, key = issue(primary)
                credited_user = add_user(primary)
                credited = primary.execute("SELECT key FROM mk_issue_key(%s, credits => 5)",
                                           (credited_user,)).fetchone()[0]
                lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            with psycopg.connect(conninfo(db, port=standby_port), autocommit=True) as standby:
                wait_for_replay(standby, lsn)
                assert standby.execute("SELECT pg_is_in_recovery()").fetchone()[0]
                standby.execute("SET makima_keys.last_used_interval = 0")
                assert standby.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
                assert standby.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "valid"
                assert standby.execute("SELECT last_used_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0] is None
                # A key with credits cannot spend them on a standby: it fails
                # closed, and a peek (cost => 0) still answers.
                assert standby.execute("SELECT status, credits FROM mk_verify_detail(%s)",
                                       (credited,)).fetchone() == ("usage_unavailable", 5)
                assert standby.execute("SELECT mk_verify(%s)", (credited,)).fetchone()[0] is None
                assert standby.execute("SELECT mk_verify(%s, cost => 0)", (credited,)).fetchone()[0] == credited_user
                with connect(db) as primary:
                    primary.execute("SELECT mk_revoke(%s)", (key_id,))
                    lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                wait_for_replay(standby, lsn)
                assert standby.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
                assert standby.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "revoked"
        finally:
            subprocess.run(["bash", cluster, "stop", str(root)], check=True)


def wait_for_replay(standby, lsn, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        caught_up = standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]
        if caught_up:
            return
        time.sleep(0.05)
    raise AssertionError(f"standby did not replay {lsn} within {timeout}s")


def test_last_used_at_follows_the_interval_setting(db):
    """Each verification here is its own transaction (autocommit), the only
    kind that writes last_used_at."""
    with connect(db) as su, connect(db) as conn:
        user, key_id, key = issue(su)
        assert last_used(su, key_id) is None
        conn.execute("SELECT mk_verify(%s)", (key,))
        assert last_used(su, key_id) is not None
        # Within the default 60 s interval nothing is written again.
        su.execute("UPDATE api_keys SET last_used_at = now() - interval '30 seconds' WHERE id = %s", (key_id,))
        backdated = last_used(su, key_id)
        conn.execute("SELECT mk_verify(%s)", (key,))
        assert last_used(su, key_id) == backdated
        # Older than the interval: written.
        conn.execute("SET makima_keys.last_used_interval = 10")
        conn.execute("SELECT mk_verify(%s)", (key,))
        assert last_used(su, key_id) > backdated
        # 0 writes on every verification.
        conn.execute("SET makima_keys.last_used_interval = 0")
        su.execute("UPDATE api_keys SET last_used_at = now() - interval '1 second' WHERE id = %s", (key_id,))
        before = last_used(su, key_id)
        conn.execute("SELECT mk_verify(%s)", (key,))
        assert last_used(su, key_id) > before


def test_a_scoped_verification_that_fails_does_not_touch_last_used_at(db):
    with connect(db) as su, connect(db) as conn:
        user = add_user(su)
        key_id, key = su.execute("SELECT id, key FROM mk_issue_key(%s, scopes => '{read}')", (user,)).fetchone()
        assert conn.execute("SELECT mk_verify(%s, '{write}')", (key,)).fetchone()[0] is None
        assert last_used(su, key_id) is None
        assert conn.execute("SELECT mk_verify(%s, '{read}')", (key,)).fetchone()[0] == user
        assert last_used(su, key_id) is not None


def test_the_write_runs_as_the_owner_on_the_real_table_whatever_the_callers_path(db, role):
    """A role that can read nothing, with a temporary api_keys first on its
    path, verifies: the write goes to the extension's table with the owner's
    rights, and the caller is itself again afterwards."""
    from test_privileges_and_races import readme_recipe
    from conftest import sqlstate_of
    verifier = role("verifier")
    with connect(db) as su:
        su.execute(readme_recipe("verify-only", app=verifier))
        su.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{verifier}"')
        user, key_id, key = issue(su)
        with connect(db, user=verifier) as app:
            app.execute("""CREATE TABLE pg_temp.api_keys (id uuid, user_id uuid, key_hash text,
                           key_prefix text, name text, last_used_at timestamptz,
                           created_at timestamptz, revoked_at timestamptz)""")
            app.execute("SET search_path = pg_temp, public")
            assert sqlstate_of(app, "SELECT count(*) FROM public.api_keys") == "42501"
            assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
            assert app.execute("SELECT current_user, current_setting('search_path')").fetchone() == (
                verifier, "pg_temp, public")
            assert app.execute("SELECT count(*) FROM pg_temp.api_keys").fetchone()[0] == 0
        assert last_used(su, key_id) is not None
