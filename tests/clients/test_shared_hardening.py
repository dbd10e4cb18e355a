"""makima_keys 0.5.0, the shared tier hardened (issue #22): what an outside
attack suite and a read of the code found against 0.4.0, each pinned by a
test that fails without its fix.

- the flush worker holds its statements to the extension's own table by OID
  (a schema renamed during a round, with and without a lock wait, never
  hands it a look-alike table);
- one database that cannot be entered, or whose flush fails, delays or
  starves no other: deadlines, per-database outcomes, backoff, one LOG line
  per change of state, and mk_shared_status();
- ended keys are announced even when the write of last_used_at fails;
- per-database shares of both hashes;
- retry_after is never negative;
- the state file: checked whole (format, versions, checksum), set aside and
  never half-loaded, owed entries restored first when max_tracked_keys was
  lowered, write errors logged;
- a database left invalid by an interrupted DROP DATABASE is forgotten;
- a restarted launcher never runs a second flush worker beside the first,
  and a launcher stopped by pg_terminate_backend comes back;
- reading mk_key_stats registers nothing.

Preloaded clusters of their own (tests/clients/preloaded.py): the module's
at PGPORT+20 (flush every second), single-test ones at PGPORT+29. Waits poll
with a deadline; nothing asserts how long anything took."""

import re
import signal
import time
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

import preloaded
from conftest import USERS_DDL, add_user
from preloaded import wait_for
from test_privileges_and_races import readme_recipe

FLUSH_DEADLINE = 20  # seconds: many rounds of one second
CHANNEL = "makima_keys_revoked"


OPTION_CASTS = {"rate_limit": "integer", "rate_period": "interval", "expires_in": "interval"}


def issue(conn, user=None, **options):
    user = user or add_user(conn)
    extra = "".join(f", {name} => %({name})s::{OPTION_CASTS[name]}" for name in options)
    key_id, key = conn.execute(f"SELECT id, key FROM mk_issue_key(%(user)s{extra})",
                               {"user": user, **options}).fetchone()
    return user, key_id, key


def verify(conn, key, cost=1):
    return conn.execute("SELECT mk_verify(%s, cost => %s)", (key, cost)).fetchone()[0]


def detail(conn, key, cost=1):
    return conn.cursor(row_factory=dict_row).execute(
        "SELECT * FROM mk_verify_detail(%s, cost => %s)", (key, cost)).fetchone()


def last_used(conn, key_id, table="api_keys"):
    return conn.execute(f"SELECT last_used_at FROM {table} WHERE id = %s", (key_id,)).fetchone()[0]


def issue_many(conn, table, count, options=""):
    """`count` keys of new users in temp table `table` (id, key)."""
    tag = uuid.uuid4().hex
    conn.execute("INSERT INTO users (email) SELECT %s FROM generate_series(1, %s)", (tag, count))
    conn.execute(f"CREATE TEMP TABLE {table} AS SELECT k.id, k.key FROM users u,"
                 f" LATERAL mk_issue_key(u.id{options}) k WHERE u.email = %s", (tag,))


def health(conn, dbname=None):
    """mk_shared_status(): the row of `dbname`, or the whole-tier row."""
    rows = conn.cursor(row_factory=dict_row).execute("SELECT * FROM mk_shared_status()").fetchall()
    if dbname is None:
        return next(r for r in rows if r["datid"] is None)
    found = [r for r in rows if r["datname"] == dbname]
    return found[0] if found else None


def flush_workers(conn):
    return conn.execute("SELECT pid, datname FROM pg_stat_activity WHERE backend_type = 'makima_keys flush'"
                        ).fetchall()


@pytest.fixture(scope="module")
def shared():
    with preloaded.running(20, "makima_keys.flush_interval=1") as cluster:
        yield cluster


@pytest.fixture
def sdb(shared):
    name = shared.new_database()
    yield name
    shared.drop_database(name)


@pytest.fixture
def cluster_role(shared):
    made = []

    def make(prefix="r", *attributes):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with shared.connect() as admin:
            admin.execute(f'CREATE ROLE "{name}" LOGIN {" ".join(attributes)}')
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


# ---------------------------------------------------------------- 1. the worker holds to our table

def keys_schema_database(cluster, owner):
    """A database owned by `owner` (only what a database owner has), the
    extension in schema `keys` (no users table, so no foreign key)."""
    name = "h_" + uuid.uuid4().hex[:10]
    with cluster.connect() as su:
        su.execute(f'CREATE DATABASE {name} OWNER "{owner}" TEMPLATE template0 ENCODING \'UTF8\'')
    with cluster.connect(name) as su:
        su.execute("CREATE SCHEMA keys")
        su.execute("CREATE EXTENSION makima_keys SCHEMA keys")
    return name


def plant_look_alike(conn, schema):
    """As the database owner: a schema, an api_keys of the same shape, and a
    statement trigger recording who ran it and whether it was a superuser."""
    conn.execute(f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.api_keys (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
            key_hash varchar(64) NOT NULL, key_prefix varchar(16) NOT NULL, name varchar(255),
            last_used_at timestamptz, created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz, expires_at timestamptz, scopes text[], metadata jsonb,
            credits integer, refill_amount integer, refill_every interval, refilled_at timestamptz,
            rate_limit integer, rate_period interval);
        CREATE TABLE {schema}.spied (who text, superuser text);
        GRANT INSERT ON {schema}.spied TO PUBLIC;
        GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
        GRANT ALL ON {schema}.api_keys TO PUBLIC;
        CREATE FUNCTION {schema}.spy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {schema}.spied VALUES (current_user, current_setting('is_superuser'));
            RETURN NULL;
        END $$;
        CREATE TRIGGER spy AFTER INSERT OR UPDATE OR DELETE ON {schema}.api_keys
            FOR EACH STATEMENT EXECUTE FUNCTION {schema}.spy()""")


def test_a_schema_renamed_while_the_worker_waits_for_the_table_never_hands_it_a_look_alike(shared, cluster_role):
    """Attack 1, with a lock wait: a trusted owner's migration holds
    api_keys while a key is owed, so the flush worker waits for the table;
    in that transaction the owner renames the extension's schema and the
    attacker's look-alike takes the old name. When the wait ends the worker
    follows the table by OID: the real key gets its last_used_at, and the
    look-alike's trigger never runs (before the fix PostgreSQL resolved the
    name again after the wait, and the trigger ran as the superuser)."""
    owner = cluster_role("dbowner")
    db = keys_schema_database(shared, owner)
    try:
        with shared.connect(db, user=owner) as attacker:
            plant_look_alike(attacker, "evil")
        with shared.connect(db) as su:
            user = str(uuid.uuid4())
            key_id, key = su.execute("SELECT id, key FROM keys.mk_issue_key(%s)", (user,)).fetchone()
        with shared.connect(db, autocommit=False) as migration, shared.connect(db) as watcher:
            migration.execute("LOCK TABLE keys.api_keys IN ACCESS EXCLUSIVE MODE")
            # Owed from here on; the next round waits for the lock.
            assert str(migration.execute("SELECT keys.mk_verify(%s)", (key,)).fetchone()[0]) == user
            waiting = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'makima_keys flush'" \
                      " AND wait_event_type = 'Lock'"
            (worker,) = wait_for(lambda: watcher.execute(waiting).fetchone(), FLUSH_DEADLINE,
                                 "the worker waiting", interval=0.01)
            # Within the worker's lock_timeout (1 s): the same worker must
            # still be waiting when the renames commit, or the test proves
            # nothing (a later round would find the new names anyway).
            migration.execute("ALTER SCHEMA keys RENAME TO keys_old")
            migration.execute("ALTER SCHEMA evil RENAME TO keys")
            assert watcher.execute(waiting + " AND pid = %s", (worker,)).fetchone() == (worker,)
            migration.commit()
        with shared.connect(db) as su:
            wait_for(lambda: last_used(su, key_id, "keys_old.api_keys"), FLUSH_DEADLINE,
                     "last_used_at in the real table")
            time.sleep(2)  # more rounds: none may touch the look-alike
            assert su.execute("SELECT * FROM keys.spied").fetchall() == []
            assert su.execute("SELECT count(*) FROM keys.api_keys").fetchone()[0] == 0
    finally:
        shared.drop_database(db)


def test_a_schema_renamed_between_two_batches_of_a_round_never_hands_the_next_batch_a_look_alike():
    """Attack 1, without a lock wait: one round writes 10,001 keys owed in
    two batches, each in its own transaction. The owner's own trigger makes
    the first batch slow; meanwhile the extension's schema is renamed and a
    look-alike takes the old name (ALTER SCHEMA locks no table: nothing is
    waited for). The second batch finds the table by OID: every real key
    gets its last_used_at, nothing reaches the look-alike (before the fix
    the round's second batch ran by the old name, in the look-alike)."""
    with preloaded.running(29, conf={"makima_keys.flush_interval": "3600"}) as cluster:
        owner = "dbowner_" + uuid.uuid4().hex[:8]
        with cluster.connect() as su:
            su.execute(f'CREATE ROLE "{owner}" LOGIN')
        db = keys_schema_database(cluster, owner)
        with cluster.connect(db, user=owner) as attacker:
            plant_look_alike(attacker, "evil")
        with cluster.connect(db) as su:
            su.execute("CREATE TEMP TABLE probe AS SELECT k.id, k.key FROM generate_series(1, 10001),"
                       " LATERAL keys.mk_issue_key(gen_random_uuid()) k")
            assert su.execute("SELECT count(keys.mk_verify(key)) FROM probe").fetchone()[0] == 10001
            su.execute("CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$"
                       " BEGIN PERFORM pg_catalog.pg_sleep(3); RETURN NULL; END $$")
            su.execute("CREATE TRIGGER slow AFTER UPDATE ON keys.api_keys FOR EACH STATEMENT"
                       " EXECUTE FUNCTION public.slow()")
            # Every key is owed before the first round: it has two batches.
            su.execute("ALTER SYSTEM SET makima_keys.flush_interval = 1")
            su.execute("SELECT pg_reload_conf()")
            wait_for(lambda: su.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type ="
                                        " 'makima_keys flush' AND wait_event = 'PgSleep'").fetchone()[0],
                     FLUSH_DEADLINE, "the first batch in the owner's slow trigger", interval=0.01)
            su.execute("ALTER SCHEMA keys RENAME TO keys_old")
            su.execute("ALTER SCHEMA evil RENAME TO keys")
            wait_for(lambda: su.execute("SELECT count(*) FROM keys_old.api_keys WHERE last_used_at IS NULL"
                                        ).fetchone()[0] == 0, 60, "every real key written")
            assert su.execute("SELECT * FROM keys.spied").fetchall() == []
            assert su.execute("SELECT count(*) FROM keys.api_keys").fetchone()[0] == 0


# ---------------------------------------------------------------- 2. a database that cannot be entered

def test_a_database_that_cannot_be_entered_delays_the_others_by_seconds_only(shared):
    """Attack 2: a transaction keeps ALTER DATABASE ... RENAME open on a
    database the worker serves (so nobody can connect to it). Before the
    fix the flush worker waited to connect for as long as that transaction
    lasted, and no other database got last_used_at. Now the worker gives up
    within seconds, the others are flushed, mk_shared_status() says why the
    held one is behind, and once the lock goes its keys are written."""
    held, other = shared.new_database(), shared.new_database()
    renamed = held + "_x"
    try:
        with shared.connect(held) as app:
            held_user, held_id, held_key = issue(app)
            assert verify(app, held_key) == held_user
            wait_for(lambda: last_used(app, held_id), FLUSH_DEADLINE, "the first flush")
        with shared.connect(autocommit=False) as owner:
            def rename():
                # No session may be in a database being renamed: a flush
                # worker may be, for a moment.
                try:
                    owner.execute(f"ALTER DATABASE {held} RENAME TO {renamed}")
                    return True
                except psycopg.errors.ObjectInUse:
                    owner.rollback()
                    return False
            wait_for(rename, FLUSH_DEADLINE, "the rename", interval=0.01)
            with shared.connect(other) as app:
                for _ in range(2):
                    user, key_id, key = issue(app)
                    assert verify(app, key) == user
                    wait_for(lambda: last_used(app, key_id), FLUSH_DEADLINE, "a flush of the other database")
                row = wait_for(lambda: (h := health(app, held)) and h["consecutive_failures"] >= 1 and h,
                               FLUSH_DEADLINE, "the held database's failure in mk_shared_status()")
                assert row["last_outcome"] == "could not enter the database"
            owner.rollback()
        with shared.connect(held) as app:
            user, key_id, key = issue(app)
            assert verify(app, key) == user
            wait_for(lambda: last_used(app, key_id), 60, "the flush once the database can be entered")
            wait_for(lambda: health(app, held)["last_outcome"] == "ok", 60, "outcome ok again")
    finally:
        shared.drop_database(held)
        shared.drop_database(renamed)
        shared.drop_database(other)


# ---------------------------------------------------------------- 3. announcements do not wait for the write

def test_ended_keys_are_announced_even_when_every_write_fails_and_the_status_says_why(shared, sdb):
    """Attack 3: an owner's AFTER UPDATE trigger that raises makes every
    write of last_used_at fail. Keys that end are still announced by the
    worker (before the fix the worker stopped at the write, and nothing
    else announced them). mk_shared_status() shows the failure, its
    SQLSTATE and the failures in a row; the log says it once when the
    database starts failing and once when it recovers."""
    with shared.connect(sdb) as su, shared.connect(sdb) as listener:
        su.execute("CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
                   " BEGIN RAISE EXCEPTION 'app.tenant is not set'; END $$")
        su.execute("CREATE TRIGGER refuse AFTER UPDATE ON api_keys FOR EACH ROW EXECUTE FUNCTION public.refuse()")
        user, key_id, key = issue(su)
        log_from = len(shared.log())
        assert verify(su, key) == user  # registers the database; its write will fail
        listener.execute(f"LISTEN {CHANNEL}")
        _, ending_id, _ = issue(su, expires_in="2 seconds")
        got = [n.payload for n in listener.notifies(timeout=FLUSH_DEADLINE, stop_after=1)]
        assert got == [str(ending_id)]
        row = wait_for(lambda: (h := health(su, sdb)) and h["consecutive_failures"] >= 2 and h,
                       FLUSH_DEADLINE, "two failed rounds")
        assert row["last_outcome"] == "writing last_used_at failed"
        assert row["last_sqlstate"] == "P0001"
        assert row["keys_owed"] == 1
        assert last_used(su, key_id) is None
        assert shared.log()[log_from:].count(f'the flush of database "{sdb}" failed') == 1
        su.execute("DROP TRIGGER refuse ON api_keys")
        wait_for(lambda: last_used(su, key_id), 120, "the write once the trigger is gone")
        wait_for(lambda: f'the flush of database "{sdb}" succeeded again' in shared.log()[log_from:],
                 FLUSH_DEADLINE, "the LOG line of the recovery")
        row = health(su, sdb)
        assert (row["last_outcome"], row["consecutive_failures"], row["keys_owed"]) == ("ok", 0, 0)


# ---------------------------------------------------------------- 4, 5. shares

def test_one_database_cannot_take_the_room_another_is_guaranteed():
    """Attacks 4 and 5 (max_tracked_keys = 100): two databases registered,
    each guaranteed 50 entries of each hash. Database A's key administrator
    issues 100 rate-limited keys of 1 call per 100 years and uses each once,
    and A verifies 100 more keys: A gets its share and no more (its further
    users fail closed, its further keys write last_used_at themselves);
    database B's rate-limited users still pass and its keys are still
    counted (before the fix A took both hashes, and B answered
    rate_limit_unavailable round after round)."""
    with preloaded.running(29, "makima_keys.max_tracked_keys=100", "makima_keys.flush_interval=1") as cluster:
        a, b = cluster.new_database(), cluster.new_database()
        with cluster.connect(a) as app_a, cluster.connect(b) as app_b:
            for app in (app_a, app_b):
                user, _, key = issue(app)
                assert verify(app, key) == user  # both databases registered
            issue_many(app_a, "limited", 100, ", rate_limit => 1, rate_period => '100 years'")
            statuses = [s for (s,) in app_a.execute(
                "SELECT d.status FROM limited, mk_verify_detail(key) d").fetchall()]
            assert statuses.count("valid") <= 50 and statuses.count("valid") >= 45, statuses.count("valid")
            assert statuses.count("rate_limit_unavailable") == 100 - statuses.count("valid")
            issue_many(app_a, "plain", 100)
            assert app_a.execute("SELECT count(mk_verify(key)) FROM plain").fetchone()[0] == 100
            time.sleep(2)  # rounds go by; nothing A holds is given back
            # 30: the hashes stay under the 90% at which a round makes room.
            for _ in range(30):
                user, key_id, key = issue(app_b, rate_limit=1, rate_period="100 years")
                assert detail(app_b, key)["status"] == "valid"
            tracked = {r["key_id"] for r in app_b.cursor(row_factory=dict_row).execute(
                "SELECT key_id FROM mk_key_stats WHERE key_id IS NOT NULL").fetchall()}
            assert len(tracked) == 31
            shares = {r["datname"]: r for r in app_b.cursor(row_factory=dict_row).execute(
                "SELECT * FROM mk_shared_status() WHERE datid IS NOT NULL").fetchall()}
            assert shares[a]["budgets_tracked"] <= 50 and shares[b]["budgets_tracked"] == 30
            assert shares[a]["keys_tracked"] <= 60


def test_a_database_at_its_share_gets_room_back_as_its_budgets_refill():
    """Review finding: a database at its share of the bucket hash is
    refused new budgets long before the hash is 90% full, the point at
    which rounds used to make room; so the rounds now also drop the full
    budgets of a database at its share. Here A's 60 users of 1 call per
    second get 50 budgets, the other 10 fail closed, and once those
    budgets are full again a round makes room and every user passes."""
    with preloaded.running(29, "makima_keys.max_tracked_keys=100", "makima_keys.flush_interval=1") as cluster:
        a, b = cluster.new_database(), cluster.new_database()
        with cluster.connect(a) as app_a, cluster.connect(b) as app_b:
            for app in (app_a, app_b):
                user, _, key = issue(app)
                assert verify(app, key) == user
            issue_many(app_a, "limited", 60, ", rate_limit => 1, rate_period => '1 second'")
            answers = app_a.execute("SELECT l.key, d.status FROM limited l, mk_verify_detail(l.key) d").fetchall()
            late = [key for key, status in answers if status == "rate_limit_unavailable"]
            assert len(late) == 10 and len(answers) == 60
            assert health(app_a)["budgets_tracked"] == 50  # far below 90% of the hash
            # Once the 50 budgets are full again, a round drops them, and
            # every late user gets one (before the fix: never, at 51%).
            for key in late:
                wait_for(lambda: detail(app_a, key)["status"] == "valid", FLUSH_DEADLINE, "room for a late user")


# ---------------------------------------------------------------- 6. retry_after

@pytest.mark.parametrize("limit, period, cost", [
    (1, "1000000 years", 1),
    (1, "2147483647 days", 1),
    (2147483647, "2147483647 days", 2147483647),
])
def test_retry_after_is_never_negative_for_extreme_limits(shared, sdb, limit, period, cost):
    """Attack 6: for extreme valid limits retry_after was
    -2562047788:00:54.775808 (the period capped at the largest microsecond
    count, converted through a float). It is now the exact wait, positive.
    (Compared in SQL: Python's timedelta cannot hold 2147483647 days.)"""
    with shared.connect(sdb) as su:
        user, key_id, key = issue(su, rate_limit=limit, rate_period=period)
        ask = "SELECT status, retry_after > interval '0', retry_after::text FROM mk_verify_detail(%s, cost => %s)"
        assert su.execute(ask, (key, cost)).fetchone()[0] == "valid"
        refused, positive, shown = su.execute(ask, (key, cost)).fetchone()
        assert refused == "rate_limited"
        assert positive is True, shown
        assert not shown.startswith("-"), shown


# ---------------------------------------------------------------- the state file

def state_path(cluster):
    return cluster.data / "pg_stat" / "makima_keys.state"


def test_a_damaged_state_file_is_set_aside_whole_and_never_half_loaded():
    """Read finding 1 and 2: a state file that is truncated, corrupt, or of
    the 0.4.0 format is not loaded at all (before the fix a truncated file
    was loaded slots first, and a same-size change of layout loaded wrong
    values silently): the server logs why, keeps the file as
    makima_keys.state.rejected, and starts afresh. An intact file loads."""
    with preloaded.running(29, "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as app:
            user, key_id, key = issue(app)
            assert verify(app, key) == user
            wait_for(lambda: last_used(app, key_id), FLUSH_DEADLINE, "the flush")
            assert verify(app, "junk") is None
        damages = {
            "truncated": lambda data: data[: len(data) // 2],
            "corrupt": lambda data: data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],
            "state file of this format": lambda data: b"MKSTATE1" + data[8:],
        }
        for why, damage in damages.items():
            cluster.stop()
            path = state_path(cluster)
            data = path.read_bytes()
            assert data.startswith(b"MKSTATE\0")
            path.write_bytes(damage(data))
            log_from = len(cluster.log())
            cluster.start()
            log = cluster.log()[log_from:]
            assert re.search(r'WARNING:  makima_keys: "pg_stat/makima_keys.state" was not loaded because .*'
                             + why, log), (why, log)
            assert (cluster.data / "pg_stat" / "makima_keys.state.rejected").exists()
            assert not path.exists()
            with cluster.connect(db) as app:
                rows = app.execute("SELECT count(*) FROM mk_key_stats").fetchone()[0]
                assert rows == 0, why  # nothing of the file: not even the database's slot
                assert verify(app, key) == user
                assert verify(app, "junk") is None
        cluster.stop()
        cluster.start()
        with cluster.connect(db) as app:
            stats = app.cursor(row_factory=dict_row).execute(
                "SELECT * FROM mk_key_stats WHERE key_id IS NULL").fetchone()
            assert stats["not_found"] + stats["malformed"] == 1  # the intact file of the last clean stop loaded


def test_a_state_file_that_cannot_be_written_is_logged_with_the_reason():
    """Read finding 1: a write that fails is logged with the operating
    system's reason (before the fix it was ignored, and so was a failed
    rename), and nothing half-written is left under the real name."""
    with preloaded.running(29, "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as app:
            user, _, key = issue(app)
            assert verify(app, key) == user
        pg_stat = cluster.data / "pg_stat"
        preloaded.as_postgres("chmod", "500", pg_stat)
        try:
            cluster.stop()
            assert re.search(r'LOG:  makima_keys: could not write "pg_stat/makima_keys.state.tmp": '
                             r'Permission denied', cluster.log()), cluster.log()[-2000:]
        finally:
            preloaded.as_postgres("chmod", "700", pg_stat)
        assert not state_path(cluster).exists()


def test_lowering_max_tracked_keys_restores_owed_keys_first_and_logs_what_it_drops():
    """Read finding 3: 60 keys owed a last_used_at and 90 keys counted but
    owed nothing are saved at a clean stop; the server starts again with
    max_tracked_keys = 100. Every owed key is restored (and written by the
    next rounds), statistics are what is dropped, and the log says how many
    of each (before the fix entries were dropped silently, owed or not)."""
    with preloaded.running(29, "makima_keys.max_tracked_keys=1000", conf={"makima_keys.flush_interval": "3600"}
                           ) as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as app:
            # Owed nothing: written a moment ago, within last_used_interval.
            issue_many(app, "idle", 90)
            app.execute("UPDATE api_keys SET last_used_at = now() WHERE id IN (SELECT id FROM idle)")
            assert app.execute("SELECT count(mk_verify(key)) FROM idle").fetchone()[0] == 90
            issue_many(app, "owed", 60)
            assert app.execute("SELECT count(mk_verify(key)) FROM owed").fetchone()[0] == 60
            owed_ids = [r[0] for r in app.execute("SELECT id FROM owed").fetchall()]
            assert health(app)["keys_owed"] == 60
        cluster.stop()
        cluster.settings = [s for s in cluster.settings if "max_tracked_keys" not in s] + [
            "makima_keys.max_tracked_keys=100"]
        log_from = len(cluster.log())
        cluster.start()
        assert re.search(r"WARNING:  makima_keys: makima_keys.max_tracked_keys \(100\) is too small for the state"
                         r" saved at shutdown: 0 keys owed a last_used_at \(which will not be written\), 50 keys'"
                         r" statistics and 0 rate-limit budgets were not restored", cluster.log()[log_from:])
        with cluster.connect() as su:
            su.execute("ALTER SYSTEM SET makima_keys.flush_interval = 1")
            su.execute("SELECT pg_reload_conf()")
        with cluster.connect(db) as app:
            wait_for(lambda: app.execute("SELECT count(*) FROM api_keys WHERE id = ANY(%s)"
                                         " AND last_used_at IS NOT NULL", (owed_ids,)).fetchone()[0] == 60,
                     FLUSH_DEADLINE, "every owed key written after the restart")


# ---------------------------------------------------------------- invalid databases, launchers, reads

def test_a_database_left_invalid_by_an_interrupted_drop_is_forgotten(shared, sdb):
    """Read finding 5: PostgreSQL 15.4 and later mark a database whose DROP
    was interrupted invalid (datconnlimit -2); it refuses connections for
    ever. The launcher forgets it (its slot is freed) instead of trying it
    every round."""
    name = shared.new_database()
    with shared.connect(name) as app:
        user, _, key = issue(app)
        assert verify(app, key) == user
    with shared.connect(sdb) as watcher, shared.connect() as su:
        assert health(watcher, name) is not None
        su.execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (name,))
        try:
            wait_for(lambda: health(watcher, name) is None, FLUSH_DEADLINE, "the invalid database forgotten")
        finally:
            su.execute(f"DROP DATABASE {name}")


def test_a_terminated_launcher_comes_back_and_never_runs_a_second_worker_beside_the_first(shared, sdb):
    """Read finding 6: the launcher is stopped (pg_terminate_backend) while
    its flush worker is in the middle of a slow round; the launcher comes
    back (before the fix a launcher that exited cleanly was never
    restarted), and while the first worker runs no second one is started
    on the same database."""
    with shared.connect(sdb) as su:
        su.execute("CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$"
                   " BEGIN PERFORM pg_catalog.pg_sleep(8); RETURN NULL; END $$")
        su.execute("CREATE TRIGGER slow AFTER UPDATE ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION public.slow()")
        user, key_id, key = issue(su)
        assert verify(su, key) == user
        wait_for(lambda: su.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type ="
                                    " 'makima_keys flush' AND wait_event = 'PgSleep'").fetchone()[0],
                 FLUSH_DEADLINE, "the worker in its slow round", interval=0.01)
        launcher = shared.launchers()
        su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE backend_type = 'makima_keys launcher'")
        most = 0
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            most = max(most, sum(1 for _, d in flush_workers(su) if d == sdb))
            time.sleep(0.05)
        assert most == 1
        relaunched = wait_for(lambda: (found := shared.launchers()) and found != launcher and found, 30,
                              "a new launcher")
        assert len(relaunched) == 1
        su.execute("DROP TRIGGER slow ON api_keys")
        wait_for(lambda: last_used(su, key_id), FLUSH_DEADLINE, "the flush")


def test_reading_the_statistics_registers_no_database(shared, sdb):
    """Read finding 7: before the fix, reading mk_key_stats took one of the
    256 database slots. A database no verification registered shows no
    rows, and the tier does not list it."""
    with shared.connect(sdb) as su:
        assert su.execute("SELECT count(*) FROM mk_key_stats").fetchone()[0] == 0
        assert health(su, sdb) is None
        user, _, key = issue(su)
        assert verify(su, key) == user
        assert health(su, sdb) is not None
        assert su.execute("SELECT count(*) FROM mk_key_stats WHERE key_id IS NULL").fetchone()[0] == 1


# ---------------------------------------------------------------- health for the operator

def test_the_status_is_granted_by_the_monitor_recipe_only(shared, sdb, cluster_role):
    """Promise: mk_shared_status() is not callable by PUBLIC; the README's
    monitor recipe grants it; its whole-tier row shows the hashes' size."""
    watcher, stranger = cluster_role("watcher"), cluster_role("stranger")
    with shared.connect(sdb) as su:
        su.execute(readme_recipe("monitor", key_monitor=watcher))
        user, _, key = issue(su)
        assert verify(su, key) == user
    with shared.connect(sdb, user=stranger) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM mk_shared_status()")
    with shared.connect(sdb, user=watcher) as conn:
        tier = health(conn)
        assert tier["capacity"] == 100000 and tier["keys_tracked"] >= 1
        assert health(conn, sdb)["datid"] is not None


def test_without_preloading_the_status_raises_55000(db):
    """Promise: without preloading, mk_shared_status() raises 55000, as the
    statistics do (an empty answer would read as a healthy tier)."""
    from conftest import connect, sqlstate_of
    with connect(db) as su:
        assert sqlstate_of(su, "SELECT * FROM mk_shared_status()") == "55000"


def test_no_free_worker_slot_is_shown_and_logged_once():
    """Read finding 4: when no background worker slot is free for a flush
    worker (max_worker_processes = 2: the launcher and PostgreSQL's logical
    replication launcher take both), the round stops; before the fix it
    stopped silently. mk_shared_status() shows why the database is behind,
    and the log says it once, with the setting to raise."""
    with preloaded.running(29, "max_worker_processes=2", "makima_keys.flush_interval=1") as cluster:
        db = cluster.new_database()
        with cluster.connect(db) as app:
            user, key_id, key = issue(app)
            assert verify(app, key) == user
            row = wait_for(lambda: (h := health(app, db)) and h["consecutive_failures"] >= 3 and h,
                           FLUSH_DEADLINE * 2, "three rounds without a worker slot")
            assert row["last_outcome"] == "no background worker slot"
            assert row["keys_owed"] == 1 and last_used(app, key_id) is None
        assert cluster.log().count(f'the flush of database "{db}" failed: no background worker slot') == 1
        assert "raise max_worker_processes" in cluster.log()
