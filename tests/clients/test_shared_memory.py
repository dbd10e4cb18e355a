"""makima_keys 0.4.0, the shared tier, as clients see it: with makima_keys in
shared_preload_libraries a verification writes nothing and a background
worker writes last_used_at in batches, statistics per key (mk_key_stats),
exact per-user rate limits, expiries announced by the worker, clean restarts
and crashes, full hashes, DROP DATABASE / DROP EXTENSION, binary-upgrade
mode, a standby, and memory over many keys; and, on the suite's own cluster
(not preloaded), what fails closed there.

Preloaded tests run on clusters of their own (tests/clients/preloaded.py,
ports PGPORT+20 to +29); most share one module-scoped cluster whose worker
runs every second (makima_keys.flush_interval = 1). Each test fails without
the promise its docstring names. Waits for the worker poll with a deadline;
nothing asserts how long anything took. Rate-limit bounds are computed from
measured start and end times, as the algorithm's guarantee is stated."""

import math
import os
import random
import re
import signal
import threading
import time
import uuid
import zlib

import psycopg
import pytest
from psycopg.rows import dict_row

import preloaded
from conftest import PG_BIN, add_user, connect, sqlstate_of
from preloaded import Cluster, wait_for
from test_privileges_and_races import readme_recipe
from test_v020 import wait_until_past

CHANNEL = "makima_keys_revoked"
STATS_COLUMNS = ["key_id", "valid", "revoked", "expired", "insufficient_scope", "rate_limit_unavailable",
                 "rate_limited", "usage_exceeded", "usage_unavailable", "not_found", "malformed",
                 "last_verified_at", "last_called_at", "since"]
COUNT_COLUMNS = STATS_COLUMNS[1:11]
FLUSH_DEADLINE = 15  # seconds: many rounds of one second
SHARED_KEYS = int(os.environ.get("MK_SHARED_KEYS", "20000"))

# Rate-limit options that are refused (22023) before anything else is looked at.
BAD_RATE_OPTIONS = [
    {"rate_limit": 5},                                   # a limit without a period
    {"rate_period": "1 minute"},                         # a period without a limit
    {"rate_limit": 0, "rate_period": "1 minute"},
    {"rate_limit": -1, "rate_period": "1 minute"},
    {"rate_limit": 5, "rate_period": "0"},
    {"rate_limit": 5, "rate_period": "-1 second"},
    {"rate_limit": 5, "rate_period": "1 day -1 second"},  # positive in all, a negative component
    {"rate_limit": 5, "rate_period": "1 month -30 days"},
]
OPTION_CASTS = {"rate_limit": "integer", "rate_period": "interval", "credits": "integer",
                "expires_in": "interval", "grace": "interval", "scopes": "text[]",
                "refill_amount": "integer", "refill_every": "interval"}


# ---------------------------------------------------------------- helpers

def options_sql(options):
    return "".join(f", {name} => %({name})s::{OPTION_CASTS[name]}" for name in options)


def issue(conn, user=None, **options):
    """mk_issue_key for a new user (or `user`); returns (user, id, key)."""
    user = user or add_user(conn)
    key_id, key = conn.execute(f"SELECT id, key FROM mk_issue_key(%(user)s{options_sql(options)})",
                               {"user": user, **options}).fetchone()
    return user, key_id, key


def rotate(conn, user, **options):
    return conn.execute(f"SELECT id, key FROM mk_rotate_key(%(user)s{options_sql(options)})",
                        {"user": user, **options}).fetchone()


def verify(conn, key, cost=1):
    return conn.execute("SELECT mk_verify(%s, cost => %s)", (key, cost)).fetchone()[0]


def detail(conn, key, cost=1, required=None):
    cur = conn.cursor(row_factory=dict_row)
    if required is None:
        cur.execute("SELECT * FROM mk_verify_detail(%s, cost => %s)", (key, cost))
    else:
        cur.execute("SELECT * FROM mk_verify_detail(%s, %s::text[], %s)", (key, required, cost))
    return cur.fetchone()


def status(conn, key, cost=1, required=None):
    return detail(conn, key, cost, required)["status"]


def last_used(conn, key_id):
    return conn.execute("SELECT last_used_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]


def server_now(conn):
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def wait_flushed(conn, key_id, timeout=FLUSH_DEADLINE):
    """The last_used_at the worker writes, once it is there."""
    return wait_for(lambda: last_used(conn, key_id), timeout, f"the worker's write of last_used_at of {key_id}")


def stats_rows(conn):
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute("SELECT * FROM mk_key_stats").fetchall()


def key_stats(conn):
    """mk_key_stats by key id (the aggregate row left out)."""
    return {row["key_id"]: row for row in stats_rows(conn) if row["key_id"] is not None}


def aggregate(conn):
    rows = [row for row in stats_rows(conn) if row["key_id"] is None]
    assert len(rows) == 1, rows
    return rows[0]


def counts(row, **expected):
    """The ten counts of a row, compared with `expected` (the others 0)."""
    return {c: row[c] for c in COUNT_COLUMNS} == {c: expected.get(c, 0) for c in COUNT_COLUMNS}


def events(listener, count, within=FLUSH_DEADLINE, quiet=0.0):
    """Payloads a LISTENing connection receives: up to `count` within
    `within` seconds, then whatever else comes in `quiet` seconds."""
    got = []
    if count:
        got += [n.payload for n in listener.notifies(timeout=within, stop_after=count)]
    if quiet:
        got += [n.payload for n in listener.notifies(timeout=quiet)]
    return got


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def well_formed_unknown_key(rng):
    """A key of our format with a valid checksum that no table holds."""
    body = "".join(rng.choice(BASE62) for _ in range(43))
    crc, digits = zlib.crc32(body.encode()), ""
    for _ in range(6):
        crc, digit = divmod(crc, 62)
        digits = BASE62[digit] + digits
    return "mk_" + body + digits


def bad_checksum(key):
    return key[:-1] + ("a" if key[-1] != "a" else "b")


def backend_rss_anon(pid):
    status_text = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status_text.splitlines() if line.startswith("RssAnon:"))) * 1024


@pytest.fixture(scope="module")
def shared():
    """The module's preloaded cluster, its worker running every second."""
    with preloaded.running(20, "makima_keys.flush_interval=1") as cluster:
        yield cluster


@pytest.fixture
def sdb(shared):
    """A fresh database of the shared cluster, with the extension."""
    name = shared.new_database()
    yield name
    shared.drop_database(name)


@pytest.fixture
def cluster_role(shared):
    """A factory of LOGIN roles of the shared cluster, dropped afterwards."""
    made = []

    def make(prefix="r"):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with shared.connect() as admin:
            admin.execute(f'CREATE ROLE "{name}" LOGIN')
        made.append(name)
        return name

    yield make
    with shared.connect() as admin:
        for (dbname,) in admin.execute("SELECT datname FROM pg_database WHERE datallowconn").fetchall():
            with psycopg.connect(shared.conninfo(dbname), autocommit=True) as conn:
                for name in made:
                    conn.execute(f'DROP OWNED BY "{name}"')
        for name in made:
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')


# ---------------------------------------------------------------- verifications write nothing

TABLE_WRITES = """SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
                    FROM pg_stat_user_tables WHERE relid = 'api_keys'::regclass"""


def test_a_valid_verification_writes_nothing_yet_last_used_at_arrives():
    """Promise: preloaded, a valid 0.4.0 verification never writes the table,
    outside and inside BEGIN ... COMMIT: the key's row version (xmin, ctid),
    the table's write counters and the WAL position are unchanged, and no
    transaction id is taken, even with last_used_interval = 0 (which, without
    preloading, writes on every autocommit verification). Yet the worker
    writes last_used_at, the time of the last call, within a few rounds of
    the first 0.4.0 verification of the database, which is all it takes to
    register it. A quiet cluster of its own (no autovacuum, no WAL for
    standbys) whose worker waits an hour until the test brings the interval
    down with ALTER SYSTEM and a reload."""
    with preloaded.running(21, "autovacuum=off", "wal_level=minimal", "max_wal_senders=0",
                           conf={"makima_keys.flush_interval": "3600"}) as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as su, cluster.connect(db) as app:
            user, key_id, key = issue(su)
            app.execute("SET makima_keys.last_used_interval = 0")

            def row_version():
                return su.execute("SELECT xmin::text, ctid::text FROM api_keys WHERE id = %s", (key_id,)).fetchone()

            def table_writes():
                app.execute("SELECT pg_stat_force_next_flush()")  # reported when app goes idle
                su.execute("SELECT pg_stat_clear_snapshot()")
                return su.execute(TABLE_WRITES).fetchone()

            def wal():
                return su.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]

            def snapshot():
                return row_version(), table_writes(), wal()

            # Every statement of the measurement once first, so that nothing
            # below sets hint bits for the first time (which data checksums,
            # the default of initdb from PostgreSQL 18, write to WAL).
            su.execute("SELECT count(*) FROM api_keys")
            assert verify(app, key) == user  # the database's first 0.4.0 verification
            snapshot()
            before = snapshot()
            assert before == snapshot(), "the cluster is not quiet: the measurement proves nothing"
            for _ in range(3):
                assert verify(app, key) == user
                assert status(app, key) == "valid"
            assert snapshot() == before, "an autocommit verification wrote"
            app.execute("BEGIN")
            for _ in range(3):
                assert verify(app, key) == user
                assert status(app, key) == "valid"
            assert app.execute("SELECT pg_current_xact_id_if_assigned()").fetchone()[0] is None
            app.execute("COMMIT")
            assert snapshot() == before, "a verification in a transaction block wrote"
            assert last_used(su, key_id) is None

            called_from = server_now(app)
            assert verify(app, key) == user
            called_until = server_now(app)
            su.execute("ALTER SYSTEM SET makima_keys.flush_interval = 1")
            su.execute("SELECT pg_reload_conf()")
            written = wait_flushed(su, key_id)
            assert called_from <= written <= called_until, "last_used_at is not the time of the last call"


def test_a_revoke_never_waits_for_a_transaction_that_verified_the_key(shared, sdb):
    """Promise: preloaded, a verification holds no row lock. A revoke from
    another session goes through at once (lock_timeout would raise 55P03
    otherwise) while a transaction block that verified the key is open, and
    while an autocommit statement that verified it is still running: a
    statement that, without preloading, holds the row it wrote until it
    ends."""
    with shared.connect(sdb) as su, shared.connect(sdb, autocommit=False) as open_tx, \
            shared.connect(sdb) as long_statement, shared.connect(sdb) as admin:
        user, key_id, key = issue(su)
        other_user, other_id, other = issue(su)
        admin.execute("SET lock_timeout = '1s'")

        assert verify(open_tx, key) == user  # its transaction stays open
        assert admin.execute("SELECT mk_revoke(%s)", (key_id,)).fetchone()[0] is True
        assert verify(open_tx, key) is None  # the revoke counts at once, inside it too
        open_tx.rollback()

        result = {}
        pid = long_statement.info.backend_pid

        def run():
            result["user"] = long_statement.execute("SELECT mk_verify(%s), pg_sleep(3)", (other,)).fetchone()[0]

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: su.execute("SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = %s",
                                    (pid,)).fetchone()[0], what="the statement reaching its pg_sleep")
        assert admin.execute("SELECT mk_revoke(%s)", (other_id,)).fetchone()[0] is True
        thread.join(30)
        assert result["user"] == other_user


def test_the_worker_writes_last_used_at_round_after_round(shared, sdb):
    """Promise: the launcher starts a flush every flush_interval for as long
    as the server runs, not only once: keys verified after earlier rounds are
    written too, each with the time of its call."""
    with shared.connect(sdb) as su, shared.connect(sdb) as app:
        for _ in range(4):
            user, key_id, key = issue(su)
            called_from = server_now(app)
            assert verify(app, key) == user
            called_until = server_now(app)
            assert called_from <= wait_flushed(su, key_id) <= called_until


def test_the_worker_keeps_the_meaning_of_last_used_interval(shared, sdb):
    """Promise: the worker writes last_used_at only when it is NULL or older
    than the recorded time minus makima_keys.last_used_interval (the server's
    value, 60 s here); a session's own SET changes nothing of what the worker
    does."""
    with shared.connect(sdb) as su, shared.connect(sdb) as app:
        app.execute("SET makima_keys.last_used_interval = 0")
        user, key_id, key = issue(su)
        sentinel_user, sentinel_id, sentinel = issue(su)
        assert verify(app, key) == user
        first = wait_flushed(su, key_id)
        # Verified again, 1 s or so later: within the interval, not written.
        assert verify(app, key) == user
        assert verify(app, sentinel) == sentinel_user
        xmax_before = su.execute("SELECT xmax::text FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]
        wait_flushed(su, sentinel_id)  # a round went by after both calls
        assert last_used(su, key_id) == first
        # Not due, not even locked: a row lock would be a WAL record and a
        # dirtied page per key per round.
        assert su.execute("SELECT xmax::text FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0] == xmax_before
        # Older than the interval: written again, with the time of the call.
        su.execute("UPDATE api_keys SET last_used_at = last_used_at - interval '2 minutes' WHERE id = %s",
                   (key_id,))
        called_from = server_now(app)
        assert verify(app, key) == user
        called_until = server_now(app)
        wait_for(lambda: last_used(su, key_id) > first, FLUSH_DEADLINE, "the second write")
        assert called_from <= last_used(su, key_id) <= called_until


def test_the_launcher_is_listed_as_the_readme_says(shared):
    """Promise (README, Shared memory): the launcher runs under the process
    title 'makima_keys launcher' and `SELECT backend_type FROM
    pg_stat_activity WHERE backend_type LIKE 'makima_keys%'` shows it."""
    wait_for(shared.launchers, what="a makima_keys launcher process")
    with shared.connect() as conn:
        types = wait_for(lambda: [t for (t,) in conn.execute(
            "SELECT backend_type FROM pg_stat_activity WHERE backend_type LIKE 'makima_keys%%'")],
            timeout=5, what="the launcher in pg_stat_activity")
    assert "makima_keys launcher" in types


# ---------------------------------------------------------------- the flush is batched

def test_the_worker_writes_thousands_of_keys_in_a_few_transactions(shared, sdb):
    """Promise: the flush is batched, one UPDATE of up to 10,000 keys per
    transaction, never one per key: 3,000 keys verified in one statement get
    their last_used_at from at most three transactions (the statement may
    straddle a round or two), as the distinct xmin of their rows shows."""
    keys = 3000
    with shared.connect(sdb) as su:
        su.execute("INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, %s)", (keys,))
        su.execute("CREATE TEMP TABLE probe AS SELECT k.id, k.key FROM users u, LATERAL mk_issue_key(u.id) k")
        assert su.execute("SELECT count(mk_verify(key)) FROM probe").fetchone()[0] == keys
        wait_for(lambda: su.execute("SELECT count(*) FROM api_keys WHERE last_used_at IS NOT NULL"
                                    ).fetchone()[0] == keys, 30, "every key's last_used_at")
        transactions = su.execute("SELECT count(DISTINCT xmin::text) FROM api_keys").fetchone()[0]
        assert transactions <= 3, f"{keys} keys written by {transactions} transactions"


# ---------------------------------------------------------------- statistics

def test_statistics_are_exact_under_eight_concurrent_sessions(shared, sdb):
    """Promise: each call adds exactly one to its key's count, whatever the
    number of sessions: 8 sessions verify a set of keys many times, and the
    valid counts equal the successful calls key by key, the revoked count
    equals the calls of the revoked key, and not_found the calls of unknown
    keys."""
    sessions, calls, revoked_calls, unknown_calls = 8, 150, 20, 10
    with shared.connect(sdb) as su:
        keys = [issue(su) for _ in range(10)]
        _, revoked_id, revoked = issue(su)
        su.execute("SELECT mk_revoke(%s)", (revoked_id,))
    passed = {key_id: 0 for _, key_id, _ in keys}
    lock, errors = threading.Lock(), []

    def session(seed):
        rng = random.Random(seed)
        mine = {key_id: 0 for _, key_id, _ in keys}
        try:
            with shared.connect(sdb) as conn:
                for i in range(calls):
                    user, key_id, key = rng.choice(keys)
                    ok = verify(conn, key) == user if i % 2 else status(conn, key) == "valid"
                    mine[key_id] += ok
                for i in range(revoked_calls):
                    if i % 2:
                        assert verify(conn, revoked) is None
                    else:
                        assert status(conn, revoked) == "revoked"
                for _ in range(unknown_calls):
                    assert verify(conn, well_formed_unknown_key(rng)) is None
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        with lock:
            for key_id, n in mine.items():
                passed[key_id] += n

    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(passed.values()) == sessions * calls  # every key is live: every call passes
    with shared.connect(sdb) as su:
        stats = key_stats(su)
        assert {key_id: stats[key_id]["valid"] for key_id in passed} == passed
        assert counts(stats[revoked_id], revoked=sessions * revoked_calls)
        assert counts(aggregate(su), not_found=sessions * unknown_calls)
        assert sum(row["valid"] for row in stats.values()) == sessions * calls


def test_each_status_is_counted_in_its_column_for_its_key(shared, sdb):
    """Promise: mk_key_stats counts, per key, the calls of mk_verify and
    mk_verify_detail that answered each status, with the last valid call
    (last_verified_at) and the last call of any status (last_called_at)."""
    with shared.connect(sdb) as su, shared.connect(sdb, autocommit=False) as read_only:
        live_user, live, live_key = issue(su)
        _, revoked, revoked_key = issue(su)
        _, expired, expired_key = issue(su, expires_in="1 second")
        scoped_user, scoped, scoped_key = issue(su, scopes=["read"])
        _, limited, limited_key = issue(su, rate_limit=1, rate_period="1 hour")
        _, spent, spent_key = issue(su, credits=1)
        _, unavailable, unavailable_key = issue(su, credits=5)
        su.execute("SELECT mk_revoke(%s)", (revoked,))

        assert verify(su, live_key) == live_user
        assert verify(su, live_key) == live_user
        assert status(su, live_key) == "valid"
        assert [status(su, revoked_key) for _ in range(2)] == ["revoked"] * 2
        wait_until_past(su, su.execute("SELECT expires_at FROM api_keys WHERE id = %s", (expired,)).fetchone()[0])
        assert [status(su, expired_key) for _ in range(2)] == ["expired"] * 2
        verified_from = server_now(su)
        assert status(su, scoped_key, 1, ["read"]) == "valid"
        verified_until = server_now(su)
        assert [status(su, scoped_key, 1, ["write"]) for _ in range(2)] == ["insufficient_scope"] * 2
        called_until = server_now(su)
        assert [status(su, limited_key) for _ in range(3)] == ["valid", "rate_limited", "rate_limited"]
        assert [status(su, spent_key) for _ in range(3)] == ["valid", "usage_exceeded", "usage_exceeded"]
        read_only.execute("SET TRANSACTION READ ONLY")
        assert [status(read_only, unavailable_key) for _ in range(2)] == ["usage_unavailable"] * 2
        read_only.rollback()

        stats = key_stats(su)
        assert set(stats) == {live, revoked, expired, scoped, limited, spent, unavailable}
        assert counts(stats[live], valid=3)
        assert counts(stats[revoked], revoked=2)
        assert counts(stats[expired], expired=2)
        assert counts(stats[scoped], valid=1, insufficient_scope=2)
        assert counts(stats[limited], valid=1, rate_limited=2)
        assert counts(stats[spent], valid=1, usage_exceeded=2)
        assert counts(stats[unavailable], usage_unavailable=2)
        row = stats[scoped]
        assert verified_from <= row["last_verified_at"] <= verified_until
        assert verified_until <= row["last_called_at"] <= called_until
        assert stats[revoked]["last_verified_at"] is None and stats[revoked]["last_called_at"] is not None
        assert all(r["since"] is not None for r in stats.values())
        assert counts(aggregate(su))


def test_calls_naming_no_key_are_counted_in_one_row_and_junk_adds_none(shared, sdb):
    """Promise: not_found and malformed go only into the one row whose key_id
    is NULL, so a flood of junk (5,000 texts here) adds no rows. Non-empty
    text that is not of our format is looked up (not_found), as is an unknown
    key of our format; NULL, '' , a wrong checksum and over 1024 bytes are
    malformed."""
    rng = random.Random(7)
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su)
        assert verify(su, key) == user
        unknown = [well_formed_unknown_key(rng) for _ in range(1000)]
        assert su.execute("SELECT bool_and(mk_key_is_well_formed(k)) FROM unnest(%s::text[]) k",
                          (unknown,)).fetchone()[0]
        single = {unknown[0]: "not_found", "legacy-0123456789": "not_found", "x": "not_found",
                  "": "malformed", None: "malformed", bad_checksum(key): "malformed", "y" * 1025: "malformed"}
        for text, expected in single.items():
            assert status(su, text) == expected, text
            assert verify(su, text) is None
        assert counts(aggregate(su), not_found=6, malformed=8)
        rows_before = len(stats_rows(su))
        assert rows_before == 2

        flood = (["junk-%d" % i for i in range(2000)] + unknown + [""] * 1000
                 + [bad_checksum(k) for k in unknown])
        assert len(flood) == 5000
        assert su.execute("SELECT count(mk_verify(t)) FROM unnest(%s::text[]) t", (flood,)).fetchone()[0] == 0
        assert len(stats_rows(su)) == rows_before
        assert counts(aggregate(su), not_found=6 + 3000, malformed=8 + 2000)
        assert counts(key_stats(su)[key_id], valid=1)


def test_the_statistics_show_ids_and_counts_only(shared, sdb):
    """Promise: mk_key_stats has exactly its documented columns and no key,
    hash or prefix anywhere in what it returns."""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su)
        assert verify(su, key) == user
        assert status(su, bad_checksum(key)) == "malformed"
        cur = su.execute("SELECT * FROM mk_key_stats")
        assert [c.name for c in cur.description] == STATS_COLUMNS
        text = " ".join(row[0] for row in su.execute("SELECT s::text FROM mk_key_stats s").fetchall())
        hash_ = su.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]
        assert str(key_id) in text
        for secret in (key, key[:9], key[3:], hash_, hash_[:16], bad_checksum(key)):
            assert secret not in text


def test_only_roles_granted_the_admin_recipe_read_or_reset_statistics(shared, sdb, cluster_role):
    """Promise: PUBLIC, an ungranted role and a verify-only role get 42501 for
    the view, the function under it and the reset; a role given the README's
    admin recipe reads this database's rows and resets them."""
    plain, verifier, admin = cluster_role("plain"), cluster_role("verifier"), cluster_role("key_admin")
    with shared.connect(sdb) as su:
        su.execute(readme_recipe("verify-only", app=verifier))
        su.execute(readme_recipe("admin", key_admin=admin))
        user, key_id, key = issue(su)
        assert verify(su, key) == user
        for who in ("public", plain, verifier):
            assert not su.execute("SELECT has_table_privilege(%s, 'mk_key_stats', 'SELECT')", (who,)).fetchone()[0]
            for function in ("mk_key_stats_rows()", "mk_key_stats_reset()"):
                assert not su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                                      (who, function)).fetchone()[0], (who, function)
    for who in (plain, verifier):
        with shared.connect(sdb, user=who) as conn:
            assert sqlstate_of(conn, "SELECT * FROM mk_key_stats") == "42501", who
            assert sqlstate_of(conn, "SELECT * FROM mk_key_stats_rows()") == "42501", who
            assert sqlstate_of(conn, "SELECT mk_key_stats_reset()") == "42501", who
    with shared.connect(sdb, user=verifier) as conn:
        assert verify(conn, key) == user  # the verify-only role verifies, and is counted
    with shared.connect(sdb, user=admin) as conn:
        assert counts(key_stats(conn)[key_id], valid=2)
        conn.execute("SELECT mk_key_stats_reset()")
        assert counts(key_stats(conn).get(key_id, {c: 0 for c in COUNT_COLUMNS}))


def test_a_reset_zeroes_this_databases_counts_only_and_keeps_what_is_owed(shared, sdb):
    """Promise: mk_key_stats_reset() zeroes the counts of the current
    database (its keys and its aggregate row, with since moved to the reset);
    another database's counts stay; what keys are owed to last_used_at and the
    rate-limit budgets are kept."""
    other = shared.new_database()
    try:
        with shared.connect(sdb) as su, shared.connect(other) as elsewhere, \
                shared.connect(sdb, autocommit=False) as locker:
            user, key_id, key = issue(su)
            limited_user, limited_id, limited = issue(su, rate_limit=1, rate_period="1 hour")
            owed_user, owed_id, owed = issue(su)
            other_user, other_id, other_key = issue(elsewhere)
            for conn, k, u in ((su, key, user), (elsewhere, other_key, other_user)):
                assert verify(conn, k) == u
                assert verify(conn, k) == u
                assert verify(conn, "junk") is None
            assert verify(su, limited) == limited_user
            # A key whose row is held: the worker skips it and it stays owed.
            locker.execute("SELECT 1 FROM api_keys WHERE id = %s FOR UPDATE", (owed_id,))
            assert verify(su, owed) == owed_user
            other_before = stats_rows(elsewhere)
            since_before = key_stats(su)[key_id]["since"]

            reset_from = server_now(su)
            su.execute("SELECT mk_key_stats_reset()")
            reset_until = server_now(su)
            for row in stats_rows(su):
                assert counts(row), row
                assert row["last_verified_at"] is None and row["last_called_at"] is None
                assert reset_from <= row["since"] <= reset_until and row["since"] > since_before
            assert stats_rows(elsewhere) == other_before
            # Counting starts again; the budget was kept (one call an hour).
            assert verify(su, key) == user
            assert counts(key_stats(su)[key_id], valid=1)
            assert status(su, limited) == "rate_limited"
            # What was owed is still written, once the row is free.
            assert last_used(su, owed_id) is None
            locker.rollback()
            wait_flushed(su, owed_id)
    finally:
        shared.drop_database(other)


# ---------------------------------------------------------------- rate limits

def test_rate_limit_options_are_checked_and_nothing_is_stored(shared, sdb):
    """Promise: both rate options or neither, a limit of at least 1 and a
    period with no zero total and no negative component; otherwise 22023 from
    mk_issue_key and mk_rotate_key, and nothing is stored or changed. A
    valid limit is stored on the key and shown by mk_keys."""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su)
        fresh_user = add_user(su)
        for options in BAD_RATE_OPTIONS:
            for function, who in (("mk_issue_key", fresh_user), ("mk_rotate_key", user)):
                sql = f"SELECT * FROM {function}(%(user)s{options_sql(options)})"
                assert sqlstate_of(su, sql, {"user": who, **options}) == "22023", (function, options)
        assert su.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1
        assert verify(su, key) == user
        _, limited_id, _ = issue(su, fresh_user, rate_limit=30, rate_period="1 month")
        assert su.execute("SELECT rate_limit, rate_period::text FROM mk_keys WHERE id = %s",
                          (limited_id,)).fetchone() == (30, "1 mon")


def test_eight_sessions_get_exactly_the_limit_of_one_key(shared, sdb):
    """Promise: exact limits under concurrency. 8 sessions call one key
    limited to 20 per hour, 15 calls each: the calls that pass are at least
    20 (the budget starts full) and at most 20 + floor(elapsed * 20 / 3600)
    for the measured elapsed time; every other call answers rate_limited."""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su, rate_limit=20, rate_period="1 hour")
    outcomes, errors = [], []

    def session(i):
        try:
            with shared.connect(sdb) as conn:
                for n in range(15):
                    outcomes.append(status(conn, key) if (i + n) % 2 else
                                    ("valid" if verify(conn, key) == user else "rate_limited"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert errors == []
    passed = outcomes.count("valid")
    assert outcomes.count("rate_limited") == len(outcomes) - passed == 120 - passed
    assert 20 <= passed <= 20 + math.floor(elapsed * 20 / 3600), (passed, elapsed)


def test_a_short_period_is_kept_both_ways_over_several_periods(shared, sdb):
    """Promise: the GCRA bound, 5 per 2 seconds hammered by two sessions for
    about 5 s: at most 5 + floor(t * 5 / 2) calls pass for the measured span t
    from before the first call to after the last, and at least
    5 + floor(t' * 5 / 2) - 1 for the server's span t' between the first and
    the last call (the budget refills exactly, one call every 0.4 s)."""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su, rate_limit=5, rate_period="2 seconds")
    calls, errors = [], []
    stop_at = time.monotonic() + 5

    def session():
        try:
            with shared.connect(sdb) as conn:
                while time.monotonic() < stop_at:
                    calls.append(conn.execute("SELECT status, clock_timestamp() FROM mk_verify_detail(%s)",
                                              (key,)).fetchone())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=session) for _ in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = time.monotonic() - started
    assert errors == []
    assert {s for s, _ in calls} <= {"valid", "rate_limited"}
    passed = sum(s == "valid" for s, _ in calls)
    server_span = (max(at for _, at in calls) - min(at for _, at in calls)).total_seconds()
    assert passed <= 5 + math.floor(span * 5 / 2), (passed, span)
    assert passed >= 5 + math.floor(server_span * 5 / 2) - 1, (passed, server_span)


def test_retry_after_says_when_the_call_passes(shared, sdb):
    """Promise: rate_limited sets retry_after, the time until a call of that
    cost would pass: waiting it, the call passes. Months count as 30 days."""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su, rate_limit=2, rate_period="2 seconds")
        assert [verify(su, key), verify(su, key)] == [user, user]
        refused = detail(su, key)
        assert refused["status"] == "rate_limited" and refused["user_id"] == user
        wait = refused["retry_after"].total_seconds()
        assert 0 < wait <= 1
        assert verify(su, key) is None  # refused: draws nothing
        time.sleep(wait)
        assert verify(su, key) == user
        monthly_user, _, monthly = issue(su, rate_limit=1, rate_period="1 month")
        assert verify(su, monthly) == monthly_user
        retry = detail(su, monthly)["retry_after"]
        assert su.execute("SELECT %s::interval BETWEEN interval '30 days' - interval '1 minute'"
                          " AND interval '30 days'", (retry,)).fetchone()[0], retry


def test_a_cost_above_the_limit_never_passes_and_cost_zero_always_does(shared, sdb):
    """Promise: a call of cost > rate_limit answers rate_limited with
    retry_after NULL, even on a full budget; cost 0 always passes and draws
    nothing; a cost equal to the limit takes the whole budget."""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su, rate_limit=3, rate_period="1 hour")
        for _ in range(3):
            d = detail(su, key, 4)
            assert (d["status"], d["retry_after"]) == ("rate_limited", None)
            assert verify(su, key, 4) is None
        assert verify(su, key, 0) == user
        assert verify(su, key, 3) == user  # the budget was untouched
        d = detail(su, key, 1)
        assert d["status"] == "rate_limited"
        assert 1190 <= d["retry_after"].total_seconds() <= 1200  # one call every 20 minutes
        assert detail(su, key, 0)["status"] == "valid"
        assert verify(su, key, 0) == user


def test_a_rotation_inherits_the_limit_and_both_keys_share_one_budget(shared, sdb):
    """Promise: the budget is per user: after mk_rotate_key with a grace
    period (which inherits rate_limit and rate_period), the old key in its
    grace period and the new key draw on one budget of 4 an hour."""
    with shared.connect(sdb) as su:
        user, old_id, old = issue(su, rate_limit=4, rate_period="1 hour")
        assert [verify(su, old), verify(su, old)] == [user, user]
        new_id, new = rotate(su, user, grace="1 hour")
        assert su.execute("SELECT rate_limit, rate_period::text FROM api_keys WHERE id = %s",
                          (new_id,)).fetchone() == (4, "01:00:00")
        assert status(su, old) == "valid"
        assert status(su, new) == "valid"
        assert status(su, old) == "rate_limited"
        assert status(su, new) == "rate_limited"
        assert verify(su, new) is None


def test_rate_limits_and_credits_together(shared, sdb):
    """Promise: a key with credits and a rate limit passes only if both let
    it; when both refuse, rate_limited wins; a credit refusal draws no
    tokens (usage_exceeded leaves the whole budget), and tokens drawn for a
    spend that then fails (usage_unavailable in a read-only transaction) are
    given back."""
    with shared.connect(sdb) as su, shared.connect(sdb, autocommit=False) as read_only:
        both_user, both_id, both = issue(su, credits=1, rate_limit=1, rate_period="1 hour")
        assert verify(su, both) == both_user
        d = detail(su, both)
        assert (d["status"], d["credits"]) == ("rate_limited", 0)
        assert d["retry_after"] is not None

        credit_user, credit_id, credit = issue(su, credits=2, rate_limit=3, rate_period="1 hour")
        d = detail(su, credit, 3)
        assert (d["status"], d["credits"]) == ("usage_exceeded", 2)
        su.execute("UPDATE api_keys SET credits = 10 WHERE id = %s", (credit_id,))
        assert verify(su, credit, 3) == credit_user  # all three tokens were still there
        d = detail(su, credit, 1)
        assert (d["status"], d["credits"]) == ("rate_limited", 7)

        given_back_user, given_back_id, given_back = issue(su, credits=10, rate_limit=2, rate_period="1 hour")
        read_only.execute("SET TRANSACTION READ ONLY")
        for _ in range(3):
            assert status(read_only, given_back) == "usage_unavailable"
        read_only.rollback()
        assert [status(su, given_back) for _ in range(3)] == ["valid", "valid", "rate_limited"]
        assert su.execute("SELECT credits FROM api_keys WHERE id = %s", (given_back_id,)).fetchone()[0] == 8


def test_a_rate_limited_key_without_credits_writes_nothing(shared, sdb):
    """Promise: the budget lives in shared memory: verifying a rate-limited
    key without credits, passing or refused, takes no transaction id (a key
    with credits, for comparison, does: it updates its row)."""
    with shared.connect(sdb) as su, shared.connect(sdb, autocommit=False) as app:
        user, key_id, key = issue(su, rate_limit=2, rate_period="1 hour")
        credit_user, _, credit = issue(su, credits=5)
        xmin = su.execute("SELECT xmin::text FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]
        assert [status(app, key) for _ in range(3)] == ["valid", "valid", "rate_limited"]
        assert verify(app, key) is None
        assert app.execute("SELECT pg_current_xact_id_if_assigned()").fetchone()[0] is None
        assert verify(app, credit) == credit_user
        assert app.execute("SELECT pg_current_xact_id_if_assigned()").fetchone()[0] is not None
        app.rollback()
        # The worker may since have written last_used_at; nothing else did.
        row = su.execute("SELECT xmin::text, last_used_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()
        assert row[0] == xmin or row[1] is not None


def test_tokens_are_not_given_back_on_rollback(shared, sdb):
    """Promise: what a call draws from a budget is not transactional: a
    rollback gives credits back, never tokens."""
    with shared.connect(sdb) as su, shared.connect(sdb, autocommit=False) as app:
        user, key_id, key = issue(su, rate_limit=2, rate_period="1 hour")
        assert [verify(app, key), verify(app, key)] == [user, user]
        app.rollback()
        assert status(su, key) == "rate_limited"
        credit_user, credit_id, credit = issue(su, credits=5, rate_limit=2, rate_period="1 hour")
        assert [verify(app, credit), verify(app, credit)] == [credit_user, credit_user]
        app.rollback()
        assert su.execute("SELECT credits FROM api_keys WHERE id = %s", (credit_id,)).fetchone()[0] == 5
        d = detail(su, credit)
        assert (d["status"], d["credits"]) == ("rate_limited", 5)


# ---------------------------------------------------------------- without preloading

def test_without_preloading_a_rate_limited_key_fails_closed_and_none_can_be_issued(db):
    """Promise: on a server that did not preload makima_keys, a key with a
    rate limit (written by hand here) never verifies: mk_verify NULL,
    mk_verify_detail rate_limit_unavailable (after revoked, expired and
    insufficient_scope); issuing or rotating into a rate-limited key, given
    or inherited, raises 55000 and changes nothing, and bad options still
    raise 22023 first."""
    with connect(db) as su:
        user, key_id, key = issue(su, scopes=["read"])
        _, revoked_id, revoked = issue(su)
        su.execute("SELECT mk_revoke(%s)", (revoked_id,))
        su.execute("UPDATE api_keys SET rate_limit = 5, rate_period = '1 minute'")
        assert verify(su, key) is None
        d = detail(su, key)
        assert (d["status"], d["key_id"], d["user_id"]) == ("rate_limit_unavailable", key_id, user)
        assert status(su, key, 1, ["write"]) == "insufficient_scope"
        assert status(su, revoked) == "revoked"

        fresh = add_user(su)
        for options in BAD_RATE_OPTIONS:
            sql = f"SELECT * FROM mk_issue_key(%(user)s{options_sql(options)})"
            assert sqlstate_of(su, sql, {"user": fresh, **options}) == "22023", options
        good = {"rate_limit": 5, "rate_period": "1 minute"}
        assert sqlstate_of(su, f"SELECT * FROM mk_issue_key(%(user)s{options_sql(good)})",
                           {"user": fresh, **good}) == "55000"
        assert sqlstate_of(su, f"SELECT * FROM mk_rotate_key(%(user)s{options_sql(good)})",
                           {"user": fresh, **good}) == "55000"
        before = su.execute("SELECT * FROM api_keys ORDER BY id").fetchall()
        assert sqlstate_of(su, "SELECT * FROM mk_rotate_key(%s)", (user,)) == "55000"  # inherited
        assert sqlstate_of(su, "SELECT * FROM mk_rotate_key(%s, grace => '1 hour')", (user,)) == "55000"
        assert su.execute("SELECT * FROM api_keys ORDER BY id").fetchall() == before
        plain_user, _, plain = issue(su, fresh)
        assert verify(su, plain) == plain_user


def test_without_preloading_statistics_raise_55000_and_only_flush_interval_exists(db):
    """Promise: without preloading, mk_key_stats, mk_key_stats_rows() and
    mk_key_stats_reset() raise 55000 (an empty view would read as "no
    verifications"); makima_keys.flush_interval is always defined, and
    makima_keys.max_tracked_keys only when preloaded: SHOW gives 42704, and
    LOAD 'makima_keys' still works."""
    with connect(db) as su:
        user, key_id, key = issue(su)
        assert verify(su, key) == user
        for sql in ("SELECT * FROM mk_key_stats", "SELECT * FROM mk_key_stats_rows()",
                    "SELECT mk_key_stats_reset()"):
            assert sqlstate_of(su, sql) == "55000", sql
        su.execute("LOAD 'makima_keys'")
        assert su.execute("SHOW makima_keys.flush_interval").fetchone()[0] == "10s"
        assert sqlstate_of(su, "SHOW makima_keys.max_tracked_keys") == "42704"
        assert su.execute("SELECT current_setting('makima_keys.max_tracked_keys', true)").fetchone()[0] is None


def test_without_preloading_verification_writes_last_used_at_as_before(db):
    """Promise: unchanged behaviour without preloading: an autocommit
    verification writes last_used_at itself, at once; one inside a
    transaction block writes nothing."""
    with connect(db) as su, connect(db, autocommit=False) as app:
        user, key_id, key = issue(su)
        other_user, other_id, other = issue(su)
        assert verify(app, other) == other_user
        app.commit()  # a transaction block (autocommit off): nothing written
        assert last_used(su, other_id) is None
        assert verify(su, key) == user
        assert last_used(su, key_id) is not None


# ---------------------------------------------------------------- revocation events from the worker

def test_a_key_that_expires_is_announced_once_by_the_worker(shared, sdb):
    """Promise: preloaded, a key whose expires_at passes is announced on
    makima_keys_revoked by the worker, exactly once, for a database the first
    0.4.0 verification registered; mk_issue_key ending that expired key later
    does not announce it again."""
    with shared.connect(sdb) as su, shared.connect(sdb) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        user, key_id, key = issue(su, expires_in="2 seconds")
        assert verify(su, key) == user
        assert events(listener, 1) == [str(key_id)]
        assert su.execute("SELECT clock_timestamp() >= expires_at FROM api_keys WHERE id = %s",
                          (key_id,)).fetchone()[0]
        assert events(listener, 0, quiet=2.5) == []  # later rounds: not again
        new_id, _ = issue(su, user)[1:]
        assert su.execute("SELECT revoked_at = expires_at FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]
        assert events(listener, 0, quiet=2.5) == []


def test_a_grace_rotation_is_announced_at_rotation_and_again_when_the_grace_ends(shared, sdb):
    """Promise: mk_rotate_key with grace announces the old key at commit, as
    before, and the worker announces it again when its grace period ends;
    nothing more."""
    with shared.connect(sdb) as su, shared.connect(sdb) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        user, old_id, old = issue(su)
        assert verify(su, old) == user
        new_id, new = rotate(su, user, grace="2 seconds")
        assert events(listener, 1, within=5) == [str(old_id)]  # at the rotation's commit
        assert verify(su, old) == user  # still in its grace period
        assert events(listener, 1) == [str(old_id)]  # at the grace end, from the worker
        assert status(su, old) == "revoked"
        assert events(listener, 0, quiet=2.5) == []


# ---------------------------------------------------------------- restarts and crashes

def test_a_crash_starts_afresh_and_the_launcher_comes_back():
    """Promise: after a backend is killed (SIGKILL: crash and restart), the
    statistics start at zero and every budget is full again; the launcher
    comes back and verifications are flushed again; a key flushed before the
    crash keeps its last_used_at (at most one flush interval is lost)."""
    with preloaded.running(22, "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as su:
            flushed_user, flushed_id, flushed = issue(su)
            counted_user, counted_id, counted = issue(su)
            limited_user, limited_id, limited = issue(su, rate_limit=1, rate_period="1 hour")
            later_user, later_id, later = issue(su)
            assert verify(su, flushed) == flushed_user
            written = wait_flushed(su, flushed_id)
            assert [verify(su, counted) for _ in range(2)] == [counted_user] * 2
            assert [status(su, limited) for _ in range(2)] == ["valid", "rate_limited"]
            assert set(key_stats(su)) == {flushed_id, counted_id, limited_id}
        launcher = wait_for(cluster.launchers, what="the launcher")
        postmaster = cluster.postmaster_pid()
        victim = cluster.connect(db)
        os.kill(victim.info.backend_pid, signal.SIGKILL)
        wait_for(lambda: launcher[0] not in cluster.launchers() and cluster.accepts_connections(), 60,
                 "the crash restart")
        assert cluster.postmaster_pid() == postmaster
        relaunched = wait_for(cluster.launchers, 30, "the launcher after the crash")
        assert relaunched != launcher
        assert "terminating any other active server processes" in cluster.log()
        with cluster.connect(db) as su:
            assert verify(su, later) == later_user
            wait_flushed(su, later_id)
            assert last_used(su, flushed_id) == written
            stats = key_stats(su)
            assert set(stats) == {later_id}
            assert counts(stats[later_id], valid=1)
            assert counts(aggregate(su))
            assert status(su, limited) == "valid"  # the budget is full again


def test_a_clean_restart_keeps_the_statistics_and_writes_what_was_owed():
    """Promise: a clean shutdown saves statistics, budgets and owed
    last_used_at to pg_stat/makima_keys.state; the next start loads them
    (and removes the file), and the first rounds write what was owed, with
    the time of the call."""
    with preloaded.running(23, "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        su = cluster.connect(db)
        locker = cluster.connect(db, autocommit=False)
        owed_user, owed_id, owed = issue(su)
        sentinel_user, sentinel_id, sentinel = issue(su)
        limited_user, limited_id, limited = issue(su, rate_limit=1, rate_period="1 hour")
        # The row held, the worker skips it round after round: still owed at shutdown.
        locker.execute("SELECT 1 FROM api_keys WHERE id = %s FOR UPDATE", (owed_id,))
        called_from = server_now(su)
        assert verify(su, owed) == owed_user
        assert verify(su, owed) == owed_user
        called_until = server_now(su)
        assert verify(su, sentinel) == sentinel_user
        assert status(su, limited) == "valid"
        assert verify(su, "junk") is None
        wait_flushed(su, sentinel_id)
        assert last_used(su, owed_id) is None
        before = sorted(stats_rows(su), key=str)
        su.close()
        cluster.stop()  # pg_ctl stop -m fast: the locker's session ends with it
        locker.close()
        state = cluster.data / "pg_stat" / "makima_keys.state"
        assert state.exists()
        cluster.start()
        with cluster.connect(db) as su:
            written = wait_flushed(su, owed_id)
            assert called_from <= written <= called_until
            assert sorted(stats_rows(su), key=str) == before
            assert status(su, limited) == "rate_limited"  # the budget was kept
        assert not state.exists()


# ---------------------------------------------------------------- full hashes

def test_full_hashes_never_fail_a_verification_and_fail_new_budgets_closed():
    """Promise (max_tracked_keys = 100): verifying 400 distinct keys never
    errors and every one verifies; keys that found the statistics hash full
    wrote last_used_at themselves (autocommit), tracked keys get theirs from
    the worker (never lost); the view never holds more than its size; new
    rate-limited users beyond the budget hash's size answer
    rate_limit_unavailable (fail closed) until a round drops budgets that
    are full again, then pass; the launcher logs the full hashes at LOG."""
    with preloaded.running(24, "makima_keys.max_tracked_keys=100", "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as su:
            assert su.execute("SHOW makima_keys.max_tracked_keys").fetchone()[0] == "100"
            su.execute("INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, 400)")
            su.execute("CREATE TEMP TABLE probe AS SELECT k.id, k.key FROM users u, LATERAL mk_issue_key(u.id) k")
            assert su.execute("SELECT count(mk_verify(key)) FROM probe").fetchone()[0] == 400
            # At most 100 keys are tracked (and owed); the others wrote already.
            assert su.execute("SELECT count(*) FROM api_keys WHERE last_used_at IS NOT NULL").fetchone()[0] >= 300
            assert su.execute("SELECT count(*) FROM probe, mk_verify_detail(key) d WHERE d.status = 'valid'"
                              ).fetchone()[0] == 400
            assert len(stats_rows(su)) <= 101
            wait_for(lambda: su.execute("SELECT count(*) FROM api_keys WHERE last_used_at IS NULL").fetchone()[0] == 0,
                     FLUSH_DEADLINE, "last_used_at of every tracked key")

            # Budgets: 100 users fill the hash (each budget full again only
            # 3 s after its call); 50 more fail closed until a round drops them.
            su.execute("INSERT INTO users (email) SELECT 'limited' FROM generate_series(1, 150)")
            su.execute("CREATE TEMP TABLE limited AS SELECT u.id AS user_id, k.key FROM users u,"
                       " LATERAL mk_issue_key(u.id, rate_limit => 1, rate_period => '3 seconds') k"
                       " WHERE u.email = 'limited'")
            answers = su.execute("SELECT l.user_id, l.key, d.status FROM limited l, mk_verify_detail(l.key) d"
                                 ).fetchall()
            assert sorted(s for _, _, s in answers) == ["rate_limit_unavailable"] * 50 + ["valid"] * 100
            late = [(user, key) for user, key, s in answers if s == "rate_limit_unavailable"]
            assert verify(su, late[0][1]) is None
            # Each round drops the budgets that are full again by then, so
            # every late user gets one within a few rounds.
            for user, key in late:
                wait_for(lambda: verify(su, key) == user, FLUSH_DEADLINE, "room for a new budget")

        def full_reports():
            found = re.findall(r"LOG:  makima_keys: shared hashes full \(100 entries each\): (\d+) verifications"
                               r" were not tracked, (\d+) rate-limited calls answered rate_limit_unavailable",
                               cluster.log())
            untracked = sum(int(a) for a, _ in found)
            refused = sum(int(b) for _, b in found)
            return untracked >= 300 and refused >= 50

        wait_for(full_reports, FLUSH_DEADLINE, "the LOG line about full hashes")


# ---------------------------------------------------------------- DDL and locks meet the worker

def test_a_plain_drop_database_succeeds_while_the_worker_visits_it(shared):
    """Promise: the launcher is connected to no database and a flush worker
    stays in one for a round only, so a plain DROP DATABASE (without FORCE)
    of a database with keys owed succeeds while the worker runs every
    second; the worker goes on serving the other databases."""
    launcher = wait_for(shared.launchers, what="the launcher")
    for _ in range(3):
        name = shared.new_database()
        with shared.connect(name) as su:
            first_user, first_id, first = issue(su)
            assert verify(su, first) == first_user
            wait_flushed(su, first_id)  # the worker is visiting this database
            su.execute("INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, 50)")
            su.execute("CREATE TEMP TABLE probe AS SELECT k.key FROM users u, LATERAL mk_issue_key(u.id) k"
                       " WHERE u.id <> %s", (first_user,))
            assert su.execute("SELECT count(mk_verify(key)) FROM probe").fetchone()[0] == 50
        with shared.connect() as admin:
            admin.execute(f"DROP DATABASE {name}")
    assert shared.launchers() == launcher
    survivor = shared.new_database()
    try:
        with shared.connect(survivor) as su:
            user, key_id, key = issue(su)
            assert verify(su, key) == user
            wait_flushed(su, key_id)
    finally:
        shared.drop_database(survivor)


def test_drop_extension_with_keys_owed_breaks_nothing_and_create_extension_flushes_again(shared, sdb):
    """Promise: DROP EXTENSION while keys are owed last_used_at leaves the
    server and the launcher working (same launcher, no crash), and after
    CREATE EXTENSION the database's verifications are flushed again."""
    launcher = wait_for(shared.launchers, what="the launcher")
    with shared.connect(sdb) as su:
        su.execute("INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, 20)")
        su.execute("CREATE TEMP TABLE probe AS SELECT k.key FROM users u, LATERAL mk_issue_key(u.id) k")
        assert su.execute("SELECT count(mk_verify(key)) FROM probe").fetchone()[0] == 20
        su.execute("DROP EXTENSION makima_keys")
        # Rounds go by: another database is served meanwhile.
        other = shared.new_database()
        try:
            with shared.connect(other) as elsewhere:
                user, key_id, key = issue(elsewhere)
                assert verify(elsewhere, key) == user
                wait_flushed(elsewhere, key_id)
        finally:
            shared.drop_database(other)
        su.execute("CREATE EXTENSION makima_keys")
        user, key_id, key = issue(su)
        assert verify(su, key) == user
        wait_flushed(su, key_id)
    assert shared.launchers() == launcher
    assert "terminated by signal" not in shared.log()


def test_the_worker_skips_a_locked_row_without_waiting_and_writes_it_later(shared, sdb):
    """Promise: the flush takes rows with FOR UPDATE SKIP LOCKED: a key whose
    row another transaction holds is skipped (the keys beside it are written
    in the same round, so the worker did not wait) and written once the lock
    is released, with the time of its call."""
    with shared.connect(sdb) as su, shared.connect(sdb, autocommit=False) as holder:
        user, key_id, key = issue(su)
        beside_user, beside_id, beside = issue(su)
        holder.execute("SELECT 1 FROM api_keys WHERE id = %s FOR UPDATE", (key_id,))
        called_from = server_now(su)
        assert verify(su, key) == user
        called_until = server_now(su)
        assert verify(su, beside) == beside_user
        wait_flushed(su, beside_id)
        assert last_used(su, key_id) is None
        waiting = su.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'makima_keys flush'"
                             " AND wait_event_type = 'Lock'").fetchone()[0]
        assert waiting == 0
        holder.rollback()
        assert called_from <= wait_flushed(su, key_id) <= called_until


# ---------------------------------------------------------------- binary upgrade, standby

def test_no_launcher_in_binary_upgrade_mode():
    """Promise: a server started in binary-upgrade mode (postgres -b, as
    pg_upgrade starts it) with makima_keys preloaded runs no launcher; the
    same cluster started normally does."""
    cluster = Cluster(25, "makima_keys.flush_interval=1", "log_min_messages=debug1")
    try:
        cluster.init()
        options = f"-b -p {cluster.port} -k {cluster.root} -c listen_addresses=127.0.0.1 " + " ".join(
            f"-c {s}" for s in cluster.settings)
        preloaded.as_postgres(PG_BIN / "pg_ctl", "-D", cluster.data, "-l", cluster.root / "server.log", "-w",
                              "-o", options, "start")
        with cluster.connect() as conn:
            assert conn.execute("SHOW makima_keys.max_tracked_keys").fetchone()[0] == "100000"  # preloaded
        # A launcher starts before the server accepts connections; none
        # shows up over two flush intervals either.
        watch_until = time.monotonic() + 2
        while time.monotonic() < watch_until:
            assert cluster.launchers() == []
            time.sleep(0.1)
        assert 'starting background worker process "makima_keys launcher"' not in cluster.log()
        cluster.stop()
        cluster.start()
        wait_for(cluster.launchers, what="the launcher of a normal start")
        assert 'starting background worker process "makima_keys launcher"' in cluster.log()
    finally:
        cluster.destroy()


def test_a_standby_counts_its_own_verifications_and_nothing_reaches_the_primary(shared, sdb):
    """Promise: on a preloaded hot standby, verifications are counted in the
    standby's mk_key_stats, and nothing of them reaches the primary: its
    last_used_at stays NULL after the primary's worker has run, and the
    primary's statistics do not show the key."""
    standby = Cluster(26, "hot_standby=on", "makima_keys.flush_interval=1", prefix="mk-shared-standby-")
    try:
        with shared.connect(sdb) as primary:
            user, key_id, key = issue(primary)
            sentinel_user, sentinel_id, sentinel = issue(primary)
            preloaded.as_postgres(PG_BIN / "pg_basebackup", "-h", "127.0.0.1", "-p", shared.port, "-U", "postgres",
                                  "-D", standby.data, "-R", "-X", "stream", "-c", "fast")
            standby.start()
            lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            with standby.connect(sdb) as replica:
                wait_for(lambda: replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
                                                 ).fetchone()[0], 30, "replay on the standby")
                assert replica.execute("SELECT pg_is_in_recovery()").fetchone()[0]
                assert [verify(replica, key) for _ in range(3)] == [user] * 3
                assert [status(replica, key) for _ in range(2)] == ["valid"] * 2
                assert status(replica, "junk") == "not_found"
                assert counts(key_stats(replica)[key_id], valid=5)
                assert counts(aggregate(replica), not_found=1)
                # The primary's worker runs (it writes the sentinel), and the
                # standby's verifications are nowhere on the primary.
                assert verify(primary, sentinel) == sentinel_user
                wait_flushed(primary, sentinel_id)
                assert last_used(primary, key_id) is None
                assert key_id not in key_stats(primary)
                lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                wait_for(lambda: replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
                                                 ).fetchone()[0], 30, "replay on the standby")
                assert last_used(replica, key_id) is None
                assert counts(key_stats(replica)[key_id], valid=5)
    finally:
        standby.destroy()


# ---------------------------------------------------------------- memory

def test_memory_and_the_shared_hash_stay_flat_over_many_distinct_keys():
    """Promise: with max_tracked_keys = 1000, N distinct keys verified once
    each (N = MK_SHARED_KEYS, 20,000 by default; scripts/stress.sh sets
    1,000,000) never make the statistics hold more than 1,000 keys (plus the
    aggregate row), and the verifying backend's anonymous memory does not
    grow by more than 4 MB from the first quarter to the last."""
    n = SHARED_KEYS
    quarter = n // 4
    with preloaded.running(27, "makima_keys.max_tracked_keys=1000", "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as su:
            su.execute("INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, %s)", (n,))
            su.execute("CREATE TABLE probe AS SELECT row_number() OVER () AS n, k.key"
                       " FROM users u, LATERAL mk_issue_key(u.id) k")
            su.execute("CREATE INDEX ON probe (n)")
        with cluster.connect(db) as conn:
            pid = conn.info.backend_pid
            rss = []
            for q in range(4):
                verified = conn.execute("SELECT count(mk_verify(key)) FROM probe WHERE n > %s AND n <= %s",
                                        (q * quarter, (q + 1) * quarter)).fetchone()[0]
                assert verified == quarter
                assert conn.execute("SELECT count(*) FROM mk_key_stats").fetchone()[0] <= 1001
                rss.append(backend_rss_anon(pid))
            print(f"RssAnon after each quarter of {n} keys: {rss}")
            assert rss[3] - rss[0] <= 4 * 1024 * 1024, rss


# ---------------------------------------------------------------- found by the adversarial review

def test_a_database_owners_settings_never_run_code_in_the_worker(shared, cluster_role):
    """Promise: the flush worker, which connects as a superuser, runs with
    settings of its own whatever ALTER DATABASE ... SET says: a database
    owner who puts an operator of their own first on the database's
    search_path does not get it run by the worker (it would run as a
    superuser), and a database made read-only by default is flushed all the
    same."""
    owner = cluster_role("dbowner")
    name = "o_" + uuid.uuid4().hex[:10]
    with shared.connect() as su:
        su.execute(f'CREATE DATABASE {name} OWNER "{owner}" TEMPLATE template0 ENCODING \'UTF8\'')
    try:
        with shared.connect(name) as su:
            su.execute("CREATE TABLE users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)")
            su.execute("CREATE EXTENSION makima_keys")
            user, key_id, key = issue(su)
        with shared.connect(name, user=owner) as attacker:
            attacker.execute("CREATE SCHEMA evil")
            attacker.execute(f"""
                CREATE FUNCTION evil.eq(oid, oid) RETURNS boolean LANGUAGE plpgsql AS $$
                BEGIN
                    IF current_setting('is_superuser') = 'on' THEN
                        EXECUTE 'ALTER ROLE "{owner}" SUPERUSER';
                    END IF;
                    RETURN $1 OPERATOR(pg_catalog.=) $2;
                END $$""")
            attacker.execute("CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.eq)")
            attacker.execute(f"ALTER DATABASE {name} SET search_path = evil, pg_catalog")
            attacker.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        with shared.connect(name) as app:
            app.execute("SET search_path = public, pg_catalog")
            app.execute("SET default_transaction_read_only = off")
            assert verify(app, key) == user  # registers the database with the worker
            wait_flushed(app, key_id)
        with shared.connect() as su:
            assert su.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (owner,)).fetchone()[0] is False
    finally:
        shared.drop_database(name)


def test_a_database_that_refuses_connections_keeps_its_budgets(shared):
    """Promise: only a database that is gone is forgotten. One whose
    connections are refused for a while (ALLOW_CONNECTIONS false; its open
    sessions go on verifying) keeps its rate-limit budgets: the flush worker
    cannot connect, round after round, and a spent budget stays spent."""
    name = shared.new_database()
    try:
        with shared.connect(name) as app:
            user, key_id, key = issue(app, rate_limit=2, rate_period="1 hour")
            assert [verify(app, key) for _ in range(3)] == [user, user, None]
            with shared.connect() as su:
                su.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
                try:
                    log_size = len(shared.log())
                    wait_for(lambda: shared.log()[log_size:].count("is not currently accepting connections") >= 2,
                             what="two rounds whose flush worker could not connect")
                    assert verify(app, key) is None
                    assert status(app, key) == "rate_limited"
                finally:
                    su.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    finally:
        shared.drop_database(name)


def test_half_a_rate_limit_written_by_hand_passes_nothing(shared, sdb):
    """Promise: a row changed by hand so that only one of rate_limit and
    rate_period is set (or with a limit no issuing function accepts) is
    never read as unlimited: it passes nothing."""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su, rate_limit=5, rate_period="1 minute")
        assert verify(su, key) == user
        for change in ("rate_period = NULL", "rate_limit = NULL, rate_period = '1 minute'",
                       "rate_limit = 0, rate_period = '1 minute'", "rate_limit = 5, rate_period = '-1 minute'"):
            su.execute(f"UPDATE api_keys SET {change} WHERE id = %s", (key_id,))
            assert verify(su, key) is None, change
            assert status(su, key) == "rate_limited", change
        su.execute("UPDATE api_keys SET rate_limit = NULL, rate_period = NULL WHERE id = %s", (key_id,))
        assert verify(su, key) == user


def test_an_immediate_shutdown_saves_nothing():
    """Promise (README, Restarts and crashes): an immediate shutdown kills
    backends in the middle of their work, as a crash does, so nothing is
    saved and the next start begins afresh, like after a crash."""
    with preloaded.running(28, "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as app:
            user, key_id, key = issue(app)
            assert verify(app, key) == user
            assert key_stats(app)[key_id]["valid"] == 1
        as_postgres_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "-w", "stop"]
        preloaded.as_postgres(*as_postgres_ctl)
        assert not (cluster.data / "pg_stat" / "makima_keys.state").exists()
        cluster.start()
        with cluster.connect(db) as app:
            assert key_id not in key_stats(app)
