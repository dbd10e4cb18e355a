"""makima_keys 0.2.0 as clients see it: keys that expire and carry scopes and
metadata, rotation with a grace period, revocation events, revoking a leaked
key by its plaintext, the mk_keys listing, and the update from 0.1.0.

Each test fails without the feature it names. Tests that need time to pass
wait on the server's own clock (wait_until_past); nothing asserts how long
anything took."""

import hashlib
import json
import os
import pprint
import subprocess
import time

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import PORT, SEED, SUPERUSER, USERS_DDL, add_user, connect, sqlstate_of

CHANNEL = "makima_keys_revoked"

ISSUE_COLUMNS = ["id", "key", "key_prefix", "created_at"]
DETAIL_COLUMNS = ["status", "key_id", "user_id", "key_prefix", "name",
                  "expires_at", "revoked_at", "scopes", "metadata", "retry_after", "credits"]
LEGACY_DETAIL_COLUMNS = DETAIL_COLUMNS[:5]
LISTING_COLUMNS = ["id", "user_id", "key_prefix", "name", "created_at", "last_used_at",
                   "expires_at", "revoked_at", "scopes", "metadata", "status",
                   "credits", "refill_amount", "refill_every", "refilled_at", "rate_limit", "rate_period"]
SEED_COLUMNS = ["id", "user_id", "key_hash", "key_prefix", "name", "last_used_at", "created_at", "revoked_at"]

# Keys that are live at the moment of the query, by the rules of 0.2.0.
LIVE_COUNT = """SELECT count(*) FROM api_keys
                 WHERE (revoked_at IS NULL OR revoked_at > clock_timestamp())
                   AND (expires_at IS NULL OR expires_at > clock_timestamp())"""

# The argument types of the named options of mk_issue_key and mk_rotate_key.
OPTION_TYPES = {"name": "text", "expires_in": "interval", "scopes": "text[]",
                "metadata": "jsonb", "grace": "interval"}


# ---------------------------------------------------------------- helpers

def keyed_call(function, options):
    args = ["%(user_id)s"] + [f"{o} => %({o})s::{OPTION_TYPES[o]}" for o in options]
    return f"SELECT * FROM {function}({', '.join(args)})"


def issue(conn, user, **options):
    """mk_issue_key with named options; returns (id, key)."""
    row = conn.execute(keyed_call("mk_issue_key", options), {"user_id": user, **options}).fetchone()
    return row[0], row[1]


def rotate(conn, user, **options):
    """mk_rotate_key with named options; returns (id, key) of the new key."""
    row = conn.execute(keyed_call("mk_rotate_key", options), {"user_id": user, **options}).fetchone()
    return row[0], row[1]


ANY = object()  # "no required_scopes argument": the one-argument forms


def verify(conn, key, required=ANY):
    if required is ANY:
        return conn.execute("SELECT mk_verify(%s::text)", (key,)).fetchone()[0]
    return conn.execute("SELECT mk_verify(%s::text, %s::text[])", (key, required)).fetchone()[0]


def detail(conn, key, required=ANY):
    cur = conn.cursor(row_factory=dict_row)
    if required is ANY:
        cur.execute("SELECT * FROM mk_verify_detail(%s::text)", (key,))
    else:
        cur.execute("SELECT * FROM mk_verify_detail(%s::text, %s::text[])", (key, required))
    return cur.fetchone()


def status(conn, key, required=ANY):
    return detail(conn, key, required)["status"]


def stored(conn, key_id):
    """The api_keys row, read as the superuser."""
    return conn.cursor(row_factory=dict_row).execute("SELECT * FROM api_keys WHERE id = %s", (key_id,)).fetchone()


def revoke(conn, key_id):
    return conn.execute("SELECT mk_revoke(%s)", (key_id,)).fetchone()[0]


def revoke_key(conn, key):
    return conn.execute("SELECT mk_revoke_key(%s::text)", (key,)).fetchone()[0]


def seconds_until(conn, ts):
    """How far ts lies ahead of the server's clock (negative once it passed)."""
    return float(conn.execute("SELECT extract(epoch FROM %s::timestamptz - clock_timestamp())", (ts,)).fetchone()[0])


def wait_until_past(conn, ts):
    """Sleeps until the server's clock is past ts."""
    for _ in range(50):
        left = seconds_until(conn, ts)
        if left < 0:
            return
        time.sleep(left + 0.05)
    raise AssertionError(f"the server's clock never passed {ts}")


def active_ids(conn, user):
    return [r[0] for r in conn.execute(
        "SELECT id FROM api_keys WHERE user_id = %s AND revoked_at IS NULL", (user,)).fetchall()]


def notifications(listener, count, quiet=0.4):
    """What a LISTENing connection receives: waits up to 10 s for `count`
    notifications, then `quiet` seconds for any more."""
    got = []
    if count:
        got += list(listener.notifies(timeout=10, stop_after=count))
    got += list(listener.notifies(timeout=quiet))
    return got


def payloads(got):
    assert all(n.channel == CHANNEL for n in got), got
    return sorted(n.payload for n in got)


def epoch_between(conn, later, earlier):
    """later - earlier in seconds, computed by the server."""
    return float(conn.execute("SELECT extract(epoch FROM %s::timestamptz - %s::timestamptz)",
                              (later, earlier)).fetchone()[0])


# ---------------------------------------------------------------- schema

COLUMNS = """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
      FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = 'api_keys'::regclass AND a.attnum > 0 AND NOT a.attisdropped
     ORDER BY a.attnum"""
INDEXES = """
    SELECT c.relname, pg_get_indexdef(i.indexrelid)
      FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
     WHERE i.indrelid = 'api_keys'::regclass ORDER BY 1"""


def test_fresh_install_adds_three_nullable_columns_after_the_seed_columns(db, new_db):
    seeded = new_db()
    with connect(seeded) as conn:
        conn.execute(USERS_DDL)
        conn.execute(SEED.read_text())
        seed_columns = conn.execute(COLUMNS).fetchall()
        seed_indexes = conn.execute(INDEXES).fetchall()
    with connect(db) as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0] == CURRENT_VERSION
        columns = conn.execute(COLUMNS).fetchall()
        assert columns[:8] == seed_columns
        assert columns[8:] == [
            ("expires_at", "timestamp with time zone", False, None),
            ("scopes", "text[]", False, None),
            ("metadata", "jsonb", False, None),
            # 0.3.0
            ("credits", "integer", False, None),
            ("refill_amount", "integer", False, None),
            ("refill_every", "interval", False, None),
            ("refilled_at", "timestamp with time zone", False, None),
            # 0.4.0
            ("rate_limit", "integer", False, None),
            ("rate_period", "interval", False, None),
        ]
        indexes = dict(conn.execute(INDEXES).fetchall())
        for name, definition in seed_indexes:
            assert indexes.get(name) == definition, name
        assert indexes["idx_api_keys_key_hash_unique"] == (
            "CREATE UNIQUE INDEX idx_api_keys_key_hash_unique ON public.api_keys USING btree (key_hash)")

        # Still one active key per user, whichever form of the call.
        user = add_user(conn)
        issue(conn, user)
        assert sqlstate_of(conn, "SELECT mk_issue_key(%s)", (user,)) == "23505"
        assert sqlstate_of(conn, "SELECT mk_issue_key(%s, scopes => '{read}', expires_in => '1 day')", (user,)) == "23505"
        assert conn.execute("SELECT count(*) FROM api_keys WHERE user_id = %s", (user,)).fetchone()[0] == 1


# ---------------------------------------------------------------- issuing with options

def test_issue_stores_expiry_scopes_and_metadata(db):
    with connect(db) as conn:
        user = add_user(conn)
        cur = conn.execute(
            """SELECT * FROM mk_issue_key(%s, name => 'ci', expires_in => '30 days',
                                          scopes => '{read}', metadata => '{"team":"x"}')""", (user,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        key_id, key, prefix, created_at = cur.fetchone()
        row = stored(conn, key_id)
        assert (row["name"], row["scopes"], row["metadata"], row["revoked_at"]) == ("ci", ["read"], {"team": "x"}, None)
        assert row["key_prefix"] == prefix == key[:9]
        assert row["created_at"] == created_at
        # expires_at = now() + 30 days
        off = conn.execute(
            "SELECT extract(epoch FROM expires_at - (created_at + interval '30 days')) FROM api_keys WHERE id = %s",
            (key_id,)).fetchone()[0]
        assert abs(float(off)) < 5
        assert seconds_until(conn, row["expires_at"]) > 29 * 86400

        assert verify(conn, key) == user
        assert verify(conn, key, ["read"]) == user
        d = detail(conn, key)
        assert d["status"] == "valid"
        assert (d["key_id"], d["user_id"], d["name"]) == (key_id, user, "ci")
        assert (d["expires_at"], d["revoked_at"], d["scopes"], d["metadata"]) == (
            row["expires_at"], None, ["read"], {"team": "x"})


BAD_OPTIONS = [
    ({"expires_in": "0"}, "22023"),
    ({"expires_in": "-1 day"}, "22023"),
    ({"expires_in": "-1 microsecond"}, "22023"),
    ({"scopes": ["read", None]}, "22004"),
    ({"scopes": [None]}, "22004"),
    ({"scopes": [""]}, "22023"),
    ({"scopes": ["read", ""]}, "22023"),
    ({"scopes": ["a b"]}, "22023"),
    ({"scopes": [" read"]}, "22023"),
    ({"scopes": ["read "]}, "22023"),
    ({"scopes": ["tab\there"]}, "22023"),
    ({"scopes": ["line\nbreak"]}, "22023"),
    ({"scopes": ["bell\x07"]}, "22023"),
    ({"scopes": ["x" * 65]}, "22023"),
    ({"scopes": ["é" * 65]}, "22023"),
    ({"scopes": [f"s{i}" for i in range(65)]}, "22023"),
    ({"metadata": "[1]"}, "22023"),
    ({"metadata": '"x"'}, "22023"),
    ({"metadata": "1"}, "22023"),
    ({"metadata": "true"}, "22023"),
    ({"metadata": "null"}, "22023"),
    ({"metadata": json.dumps({"pad": "x" * 20000})}, "54000"),
    ({"metadata": json.dumps({f"key{i}": i for i in range(2000)})}, "54000"),
]

# Options that must be accepted, with the scopes they store.
GOOD_OPTIONS = [
    ({"expires_in": "1 second"}, None),
    ({"expires_in": "1 microsecond"}, None),
    ({"scopes": []}, []),
    ({"scopes": ["x" * 64]}, ["x" * 64]),
    ({"scopes": ["é" * 64]}, ["é" * 64]),
    ({"scopes": [f"s{i}" for i in range(64)]}, [f"s{i}" for i in range(64)]),
    ({"scopes": ["read:orders", "ümlaut", "a/b.c-d_e"]}, ["read:orders", "ümlaut", "a/b.c-d_e"]),
    ({"scopes": ["write", "read", "write", "admin", "read"]}, ["write", "read", "admin"]),
    ({"metadata": "{}"}, None),
    ({"metadata": json.dumps({"pad": "x" * 4000})}, None),
]


def test_issue_refuses_bad_options_and_stores_nothing(db):
    with connect(db) as conn:
        outcomes, expected = {}, {}
        for options, sqlstate in BAD_OPTIONS:
            user = add_user(conn)
            label = repr(options)[:70]
            state = sqlstate_of(conn, keyed_call("mk_issue_key", options), {"user_id": user, **options})
            stored_rows = conn.execute("SELECT count(*) FROM api_keys WHERE user_id = %s", (user,)).fetchone()[0]
            outcomes[label], expected[label] = (state, stored_rows), (sqlstate, 0)
        assert outcomes == expected


def test_issue_accepts_options_at_their_limits_and_drops_duplicate_scopes(db):
    with connect(db) as conn:
        outcomes, expected = {}, {}
        for options, scopes in GOOD_OPTIONS:
            user = add_user(conn)
            label = repr(options)[:70]
            try:
                key_id, _ = issue(conn, user, **options)
                outcomes[label] = stored(conn, key_id)["scopes"]
            except psycopg.Error as e:
                outcomes[label] = e.sqlstate
            expected[label] = scopes
        assert outcomes == expected
        # '{}' is stored as an empty array, not as NULL (which would be unrestricted).
        assert conn.execute("SELECT count(*) FROM api_keys WHERE scopes = '{}'").fetchone()[0] == 1


# Numbers beyond double precision, unicode keys (composed and decomposed é are
# two keys), escapes and nesting: what comes back must be what went in.
METADATA = r"""{
  "amount": 12345678901234567890.12345678901234567890,
  "tiny": 0.000000000000000000000000000001,
  "huge": 1e400,
  "trailing_zero": 1.50,
  "negative": -98765432109876543210,
  "ключ": "значение",
  "鍵": ["🔑", null, true, false, 0],
  "\u00e9": "composed",
  "e\u0301": "decomposed",
  "escapes": "tab\t quote\" backslash\\ newline\n slash\/",
  "nested": {"deep": {"list": [1, 2.0, "3", {"x": []}]}},
  "": "empty key"
}"""


def test_metadata_round_trips_exactly(db):
    with connect(db) as conn:
        expected = conn.execute("SELECT %s::jsonb::text", (METADATA,)).fetchone()[0]
        assert "12345678901234567890.12345678901234567890" in expected  # the server keeps it exact
        user = add_user(conn)
        key_id, key = issue(conn, user, metadata=METADATA)
        seen = {
            "api_keys": conn.execute("SELECT metadata::text FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0],
            "mk_verify_detail": conn.execute("SELECT metadata::text FROM mk_verify_detail(%s::text)", (key,)).fetchone()[0],
            "mk_verify_detail scoped": conn.execute(
                "SELECT metadata::text FROM mk_verify_detail(%s::text, '{}'::text[])", (key,)).fetchone()[0],
            "mk_keys": conn.execute("SELECT metadata::text FROM mk_keys WHERE id = %s", (key_id,)).fetchone()[0],
        }
        # A rotation that is given no metadata copies it.
        new_id, new_key = rotate(conn, user)
        seen["rotated"] = conn.execute("SELECT metadata::text FROM api_keys WHERE id = %s", (new_id,)).fetchone()[0]
        assert seen == {where: expected for where in seen}
        assert conn.execute("SELECT metadata = %s::jsonb FROM api_keys WHERE id = %s", (METADATA, new_id)).fetchone()[0]


def test_issue_and_rotate_without_options_answer_as_in_0_1_0(db):
    with connect(db) as conn:
        plain, labelled = add_user(conn), add_user(conn)
        cur = conn.execute("SELECT * FROM mk_issue_key(%s)", (plain,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        plain_id, plain_key = cur.fetchone()[:2]
        cur = conn.execute("SELECT * FROM mk_issue_key(%s, 'laptop')", (labelled,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        labelled_id, labelled_key = cur.fetchone()[:2]
        for key_id, name in ((plain_id, None), (labelled_id, "laptop")):
            row = stored(conn, key_id)
            assert (row["name"], row["expires_at"], row["scopes"], row["metadata"], row["revoked_at"]) == (
                name, None, None, None, None)
        assert verify(conn, plain_key) == plain
        # A key issued without scopes is unrestricted.
        assert verify(conn, plain_key, ["anything", "admin"]) == plain

        cur = conn.execute("SELECT * FROM mk_rotate_key(%s)", (plain,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        rotated_key = cur.fetchone()[1]
        cur = conn.execute("SELECT * FROM mk_rotate_key(%s, 'desktop')", (labelled,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        relabelled_id, relabelled_key = cur.fetchone()[:2]
        assert stored(conn, relabelled_id)["name"] == "desktop"
        for old in (plain_key, labelled_key):
            assert verify(conn, old) is None
            assert status(conn, old) == "revoked"
        assert verify(conn, rotated_key) == plain
        assert verify(conn, relabelled_key) == labelled


# ---------------------------------------------------------------- rotation with grace

def test_rotation_with_grace_keeps_the_old_key_working_until_the_grace_ends(db):
    with connect(db) as conn:
        user = add_user(conn)
        old_id, old = issue(conn, user)
        cur = conn.execute("SELECT * FROM mk_rotate_key(%s, grace => '2 seconds')", (user,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        new_id, new = cur.fetchone()[:2]

        assert verify(conn, old) == user
        assert verify(conn, new) == user
        d = detail(conn, old)
        assert (d["status"], d["key_id"], d["user_id"]) == ("valid", old_id, user)
        ends = d["revoked_at"]
        assert ends is not None and seconds_until(conn, ends) > 0
        assert ends == stored(conn, old_id)["revoked_at"]
        # revoked_at = now() + grace, now() being the rotation's.
        assert abs(epoch_between(conn, ends, stored(conn, new_id)["created_at"]) - 2) < 0.5
        assert active_ids(conn, user) == [new_id]
        assert sqlstate_of(conn, "SELECT mk_issue_key(%s)", (user,)) == "23505"

        wait_until_past(conn, ends)
        assert verify(conn, old) is None
        d = detail(conn, old)
        assert (d["status"], d["revoked_at"]) == ("revoked", ends)
        assert verify(conn, new) == user
        assert status(conn, new) == "valid"


@pytest.mark.parametrize("grace", ["omitted", None, "0", "0 seconds"])
def test_rotation_without_grace_ends_the_old_key_at_once(db, grace):
    with connect(db) as conn:
        user = add_user(conn)
        old_id, old = issue(conn, user)
        if grace == "omitted":
            new_id, new = rotate(conn, user)
        else:
            new_id, new = rotate(conn, user, grace=grace)
        assert verify(conn, old) is None
        d = detail(conn, old)
        assert d["status"] == "revoked"
        assert seconds_until(conn, d["revoked_at"]) <= 0
        assert verify(conn, new) == user
        assert active_ids(conn, user) == [new_id]


def test_negative_grace_is_refused_and_changes_nothing(db):
    with connect(db) as conn:
        user = add_user(conn)
        old_id, old = issue(conn, user)
        for grace in ("-1 second", "-1 day", "-1 microsecond"):
            assert sqlstate_of(conn, "SELECT mk_rotate_key(%s, grace => %s::interval)", (user, grace)) == "22023", grace
        assert conn.execute("SELECT count(*) FROM api_keys WHERE user_id = %s", (user,)).fetchone()[0] == 1
        assert stored(conn, old_id)["revoked_at"] is None
        assert verify(conn, old) == user


def test_rotating_during_a_grace_period_never_extends_it(db):
    with connect(db) as conn:
        user = add_user(conn)
        k1_id, k1 = issue(conn, user)
        k2_id, k2 = rotate(conn, user, grace="1 hour")
        k3_id, k3 = rotate(conn, user, grace="10 minutes")
        # k1 keeps the earlier of its own end (+1 h) and the new one (+10 min).
        end1, end2 = stored(conn, k1_id)["revoked_at"], stored(conn, k2_id)["revoked_at"]
        assert 0 < seconds_until(conn, end1) <= 600
        assert abs(epoch_between(conn, end1, end2)) < 1
        assert 0 < seconds_until(conn, end2) <= 600
        k4_id, k4 = rotate(conn, user, grace="1 hour")
        # A longer grace later does not bring k1 or k2 back for longer.
        assert stored(conn, k1_id)["revoked_at"] == end1
        assert stored(conn, k2_id)["revoked_at"] == end2
        assert 3000 < seconds_until(conn, stored(conn, k3_id)["revoked_at"]) <= 3600
        assert [verify(conn, k) for k in (k1, k2, k3, k4)] == [user] * 4
        assert active_ids(conn, user) == [k4_id]

        # Without grace, every live key of the user ends now, those in grace too.
        k5_id, k5 = rotate(conn, user)
        assert [verify(conn, k) for k in (k1, k2, k3, k4, k5)] == [None] * 4 + [user]
        assert [status(conn, k) for k in (k1, k2, k3, k4)] == ["revoked"] * 4
        assert conn.execute(LIVE_COUNT).fetchone()[0] == 1


def test_keys_in_grace_can_be_ended_early(db):
    with connect(db) as conn:
        user = add_user(conn)
        k1_id, k1 = issue(conn, user)
        k2_id, k2 = rotate(conn, user, grace="1 hour")
        assert revoke(conn, k1_id) is True
        assert verify(conn, k1) is None
        assert status(conn, k1) == "revoked"
        assert revoke(conn, k1_id) is False
        assert verify(conn, k2) == user

        k3_id, k3 = rotate(conn, user, grace="1 hour")
        assert verify(conn, k2) == user
        # k2 (in grace) and k3 (active) end together.
        assert conn.execute("SELECT mk_revoke_user_keys(%s)", (user,)).fetchone()[0] == 2
        assert [verify(conn, k) for k in (k1, k2, k3)] == [None] * 3
        assert conn.execute("SELECT mk_revoke_user_keys(%s)", (user,)).fetchone()[0] == 0


def lifetime_matches(conn, key_id, interval):
    """expires_at - created_at of the key equals interval (to the second)."""
    return conn.execute(
        "SELECT abs(extract(epoch FROM expires_at - (created_at + %s::interval))) < 5 FROM api_keys WHERE id = %s",
        (interval, key_id)).fetchone()[0]


def test_rotation_keeps_the_limits_of_the_old_key_unless_new_ones_are_given(db):
    with connect(db) as conn:
        user = add_user(conn)
        k1_id, _ = issue(conn, user, name="ci", expires_in="1 day", scopes=["read"], metadata='{"team": "x"}')

        k2_id, k2 = rotate(conn, user)
        row = stored(conn, k2_id)
        assert (row["scopes"], row["metadata"], row["name"]) == (["read"], {"team": "x"}, None)
        assert lifetime_matches(conn, k2_id, "1 day")
        assert verify(conn, k2, ["read"]) == user
        assert verify(conn, k2, ["write"]) is None
        assert status(conn, k2, ["write"]) == "insufficient_scope"

        # Grace alone changes nothing about the new key's limits.
        k3_id, _ = rotate(conn, user, grace="1 hour")
        row = stored(conn, k3_id)
        assert (row["scopes"], row["metadata"]) == (["read"], {"team": "x"})
        assert lifetime_matches(conn, k3_id, "1 day")

        k4_id, k4 = rotate(conn, user, name="new", expires_in="2 hours", scopes=["write"], metadata='{"team": "y"}')
        row = stored(conn, k4_id)
        assert (row["scopes"], row["metadata"], row["name"]) == (["write"], {"team": "y"}, "new")
        assert lifetime_matches(conn, k4_id, "2 hours")
        assert verify(conn, k4, ["write"]) == user
        assert verify(conn, k4, ["read"]) is None

        # An unrestricted key without expiry stays so; a key holding no scope
        # does not become unrestricted.
        open_user, empty_user = add_user(conn), add_user(conn)
        issue(conn, open_user)
        issue(conn, empty_user, scopes=[])
        open_id, _ = rotate(conn, open_user)
        empty_id, empty_key = rotate(conn, empty_user)
        row = stored(conn, open_id)
        assert (row["scopes"], row["metadata"], row["expires_at"]) == (None, None, None)
        assert stored(conn, empty_id)["scopes"] == []
        assert verify(conn, empty_key, ["read"]) is None


# ---------------------------------------------------------------- expiry

def test_a_key_stops_verifying_when_it_expires(db):
    with connect(db) as conn:
        plain, revoked, scoped, forever = (add_user(conn) for _ in range(4))
        plain_id, plain_key = issue(conn, plain, expires_in="2 seconds")
        revoked_id, revoked_key = issue(conn, revoked, expires_in="2 seconds")
        scoped_id, scoped_key = issue(conn, scoped, expires_in="2 seconds", scopes=["read"])
        forever_id, forever_key = issue(conn, forever)

        assert verify(conn, plain_key) == plain
        d = detail(conn, plain_key)
        assert d["status"] == "valid" and seconds_until(conn, d["expires_at"]) > 0
        assert verify(conn, scoped_key, ["read"]) == scoped
        assert revoke(conn, revoked_id) is True

        wait_until_past(conn, max(stored(conn, i)["expires_at"] for i in (plain_id, revoked_id, scoped_id)))
        assert verify(conn, plain_key) is None
        d = detail(conn, plain_key)
        assert (d["status"], d["key_id"], d["expires_at"]) == ("expired", plain_id, stored(conn, plain_id)["expires_at"])
        # Revoked beats expired, expired beats insufficient_scope.
        assert status(conn, revoked_key) == "revoked"
        assert status(conn, scoped_key, ["admin"]) == "expired"
        assert verify(conn, scoped_key, ["read"]) is None
        assert verify(conn, forever_key) == forever
        listed = dict(conn.execute("SELECT id, status FROM mk_keys").fetchall())
        assert listed == {plain_id: "expired", revoked_id: "revoked", scoped_id: "expired", forever_id: "valid"}


def test_liveness_is_judged_by_the_clock_not_the_transaction_start(db):
    with connect(db) as su, connect(db, autocommit=False) as tx:
        tx.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        expiring_user, rotating_user = add_user(su), add_user(su)
        expiring_id, expiring = issue(su, expiring_user, expires_in="2 seconds")
        old_id, old = issue(su, rotating_user)
        rotate(su, rotating_user, grace="2 seconds")
        ends = max(stored(su, expiring_id)["expires_at"], stored(su, old_id)["revoked_at"])

        # One transaction, started while both keys were live.
        assert verify(tx, expiring) == expiring_user
        assert verify(tx, old) == rotating_user
        wait_until_past(su, ends)
        assert verify(tx, expiring) is None
        assert verify(tx, old) is None
        assert status(tx, expiring) == "expired"
        assert status(tx, old) == "revoked"
        statuses = dict(tx.execute("SELECT id, status FROM mk_keys WHERE id IN (%s, %s)", (expiring_id, old_id)).fetchall())
        assert statuses == {expiring_id: "expired", old_id: "revoked"}
        tx.rollback()


# ---------------------------------------------------------------- scopes

def test_scoped_verification(db):
    with connect(db) as conn:
        rw_user, open_user, empty_user = add_user(conn), add_user(conn), add_user(conn)
        _, rw = issue(conn, rw_user, scopes=["read", "write"], metadata='{"a": 1}', expires_in="1 day")
        _, unrestricted = issue(conn, open_user)
        _, holds_nothing = issue(conn, empty_user, scopes=[])

        cases = {
            (rw, ("read",)): rw_user,
            (rw, ("write", "read")): rw_user,
            (rw, ("read", "read")): rw_user,
            (rw, ()): rw_user,
            (rw, ("admin",)): None,
            (rw, ("read", "admin")): None,
            (rw, ("READ",)): None,
            (rw, ("read ",)): None,
            (rw, ("read", None)): None,
            (rw, (None,)): None,
            (rw, None): None,
            (unrestricted, ("anything", "admin")): open_user,
            (unrestricted, ()): open_user,
            (unrestricted, (None,)): None,
            (unrestricted, None): None,
            (holds_nothing, ("read",)): None,
            (holds_nothing, ()): empty_user,
            (holds_nothing, None): None,
        }
        got = {(k[:12], req): verify(conn, k, None if req is None else list(req)) for k, req in cases}
        assert got == {(k[:12], req): want for (k, req), want in cases.items()}
        # The one-argument forms do not look at scopes.
        assert [verify(conn, k) for k in (rw, unrestricted, holds_nothing)] == [rw_user, open_user, empty_user]
        assert [status(conn, k) for k in (rw, unrestricted, holds_nothing)] == ["valid"] * 3

        detail_cases = {
            (rw, ("read",)): "valid",
            (rw, ("admin",)): "insufficient_scope",
            (rw, None): "insufficient_scope",
            (holds_nothing, ("read",)): "insufficient_scope",
            (holds_nothing, ()): "valid",
            (unrestricted, ("admin",)): "valid",
        }
        got = {(k[:12], req): status(conn, k, None if req is None else list(req)) for k, req in detail_cases}
        assert got == {(k[:12], req): want for (k, req), want in detail_cases.items()}

        # Both forms of mk_verify_detail describe the key fully.
        for cur in (conn.cursor(row_factory=dict_row).execute("SELECT * FROM mk_verify_detail(%s::text)", (rw,)),
                    conn.cursor(row_factory=dict_row).execute(
                        "SELECT * FROM mk_verify_detail(%s::text, '{admin}'::text[])", (rw,))):
            assert [c.name for c in cur.description] == DETAIL_COLUMNS
            d = cur.fetchone()
            assert (d["user_id"], d["scopes"], d["metadata"], d["revoked_at"]) == (rw_user, ["read", "write"], {"a": 1}, None)
            assert seconds_until(conn, d["expires_at"]) > 86000

        # Keys that are not there fail the same way with or without scopes, and never raise.
        stranger = add_user(conn)
        gone_id, gone = issue(conn, stranger)
        conn.execute("DELETE FROM api_keys WHERE id = %s", (gone_id,))
        for key, want in ((gone, "not_found"), (rw[:-1] + ("x" if rw[-1] != "x" else "y"), "malformed"),
                          ("", "malformed"), ("x" * 5000, "malformed")):
            assert verify(conn, key, ["read"]) is None
            assert status(conn, key, ["read"]) == want, key[:20]
            assert status(conn, key, None) == want, key[:20]


# ---------------------------------------------------------------- revocation events

def test_revocation_is_announced_once_the_transaction_commits(db):
    with connect(db) as listener, connect(db) as su, connect(db, autocommit=False) as tx:
        listener.execute(f"LISTEN {CHANNEL}")
        users = [add_user(su) for _ in range(3)]
        (id1, k1), (id2, k2), (id3, k3) = (issue(su, u) for u in users)
        assert notifications(listener, 0) == []  # issuing ends nothing

        assert revoke(su, id1) is True
        got = notifications(listener, 1)
        assert [(n.channel, n.payload, n.pid) for n in got] == [(CHANNEL, str(id1), su.info.backend_pid)]
        assert revoke(su, id1) is False
        assert notifications(listener, 0) == []

        # Rolled back: nothing, and the key still works.
        assert revoke(tx, id2) is True
        assert notifications(listener, 0) == []
        tx.rollback()
        assert notifications(listener, 0) == []
        assert verify(su, k2) == users[1]

        # Committed: nothing before COMMIT, the key id after it.
        assert revoke(tx, id2) is True
        assert notifications(listener, 0) == []
        tx.commit()
        got = notifications(listener, 1)
        assert [(n.channel, n.payload, n.pid) for n in got] == [(CHANNEL, str(id2), tx.info.backend_pid)]

        # Undone by ROLLBACK TO SAVEPOINT inside a committed transaction: nothing.
        tx.execute("SAVEPOINT undo")
        assert revoke(tx, id3) is True
        tx.execute("ROLLBACK TO SAVEPOINT undo")
        tx.commit()
        assert notifications(listener, 0) == []
        assert verify(su, k3) == users[2]


def test_every_function_that_ends_keys_announces_each_key(db):
    with connect(db) as listener, connect(db) as su:
        listener.execute(f"LISTEN {CHANNEL}")
        user, other = add_user(su), add_user(su)

        first_id, _ = issue(su, user)
        second_id, _ = rotate(su, user)
        assert payloads(notifications(listener, 1)) == [str(first_id)]

        third_id, _ = rotate(su, user, grace="1 hour")
        assert payloads(notifications(listener, 1)) == [str(second_id)]

        # second (in grace) and third (active) end together: one notification each.
        assert su.execute("SELECT mk_revoke_user_keys(%s)", (user,)).fetchone()[0] == 2
        assert payloads(notifications(listener, 2)) == sorted([str(second_id), str(third_id)])

        leaked_id, leaked = issue(su, other)
        assert revoke_key(su, leaked) is True
        assert payloads(notifications(listener, 1)) == [str(leaked_id)]

        # Calls that end nothing announce nothing.
        assert revoke_key(su, leaked) is False
        assert su.execute("SELECT mk_revoke_user_keys(%s)", (user,)).fetchone()[0] == 0
        assert revoke_key(su, "not-a-key") is False
        assert notifications(listener, 0) == []


# ---------------------------------------------------------------- leaked keys

def one_character_changed(key, position):
    return key[:position] + ("A" if key[position] != "A" else "B") + key[position + 1:]


def test_a_leaked_key_is_revoked_by_its_plaintext_and_nothing_else(db):
    with connect(db) as conn:
        users = [add_user(conn) for _ in range(4)]
        keys = {u: issue(conn, u) for u in users}
        grace_user = add_user(conn)
        _, in_grace = issue(conn, grace_user)
        _, successor = rotate(conn, grace_user, grace="1 hour")
        stranger = add_user(conn)
        gone_id, unknown = issue(conn, stranger)
        conn.execute("DELETE FROM api_keys WHERE id = %s", (gone_id,))
        live_before = conn.execute(LIVE_COUNT).fetchone()[0]

        leaked_user = users[0]
        leaked_id, leaked = keys[leaked_user]
        assert revoke_key(conn, leaked) is True
        assert verify(conn, leaked) is None
        d = detail(conn, leaked)
        assert (d["status"], d["key_id"]) == ("revoked", leaked_id)
        assert revoke_key(conn, leaked) is False
        assert conn.execute(LIVE_COUNT).fetchone()[0] == live_before - 1

        other_id, other = keys[users[1]]
        junk = {
            "one body character changed": one_character_changed(other, 20),
            "one checksum character changed": one_character_changed(other, len(other) - 1),
            "prefix changed": "MK_" + other[3:],
            "truncated": other[:-1],
            "trailing space": other + " ",
            "leading space": " " + other,
            "upper-cased": other.upper(),
            "its hash": stored(conn, other_id)["key_hash"],
            "its display prefix": other[:9],
            "its id": str(other_id),
            "unknown well-formed key": unknown,
            "empty": "",
            "NULL": None,
            "5000 characters": "x" * 5000,
            "5000 characters after mk_": ("mk_" + other[3:] * 110)[:5000],
            "not ours": "not-a-key",
            "sql": "' OR 1=1; --",
            "wildcard": "%",
            "unicode": "ключ🔑",
        }
        outcomes = {}
        for name, candidate in junk.items():
            try:
                outcomes[name] = revoke_key(conn, candidate)
            except psycopg.Error as e:
                outcomes[name] = f"raised {e.sqlstate}"
        assert outcomes == {name: False for name in junk}
        assert conn.execute(LIVE_COUNT).fetchone()[0] == live_before - 1
        for user in users[1:]:
            assert verify(conn, keys[user][1]) == user
        assert verify(conn, in_grace) == grace_user

        # A key in its grace period is ended early; its successor stays.
        assert revoke_key(conn, in_grace) is True
        assert verify(conn, in_grace) is None
        assert verify(conn, successor) == grace_user


# ---------------------------------------------------------------- listing

def test_mk_keys_lists_every_key_with_its_status_and_no_hash(db):
    with connect(db) as conn:
        rotating, expiring, plain = add_user(conn), add_user(conn), add_user(conn)
        revoked_id, _ = issue(conn, rotating, name="first")
        grace_id, _ = rotate(conn, rotating)
        current_id, _ = rotate(conn, rotating, grace="1 hour", name="third")
        expired_id, _ = issue(conn, expiring, expires_in="1 second", scopes=["read"], metadata='{"team": "x"}')
        plain_id, plain_key = issue(conn, plain)
        verify(conn, plain_key)  # sets last_used_at
        wait_until_past(conn, stored(conn, expired_id)["expires_at"])

        cur = conn.execute("SELECT * FROM mk_keys")
        assert [c.name for c in cur.description] == LISTING_COLUMNS
        listed = {r[0]: r for r in cur.fetchall()}
        status_at = LISTING_COLUMNS.index("status")
        assert {i: r[status_at] for i, r in listed.items()} == {
            revoked_id: "revoked", grace_id: "valid", current_id: "valid", expired_id: "expired", plain_id: "valid"}
        # Each row shows the stored values.
        table = conn.execute(
            "SELECT id, user_id, key_prefix, name, created_at, last_used_at, expires_at, revoked_at, scopes, metadata,"
            " credits, refill_amount, refill_every, refilled_at, rate_limit, rate_period FROM api_keys").fetchall()
        assert {i: tuple(r[:status_at] + r[status_at + 1:]) for i, r in listed.items()} == {
            r[0]: tuple(r) for r in table}
        assert listed[plain_id][5] is not None
        assert listed[expired_id][8:10] == (["read"], {"team": "x"})
        # No hash, under any name.
        hashes = [h for (h,) in conn.execute("SELECT key_hash FROM api_keys").fetchall()]
        assert not any(h in repr(listed) for h in hashes)

        by_user = conn.execute("SELECT id, status FROM mk_keys WHERE user_id = %s ORDER BY created_at, id", (rotating,))
        assert sorted(by_user.fetchall()) == sorted([(revoked_id, "revoked"), (grace_id, "valid"), (current_id, "valid")])


def test_mk_keys_and_api_keys_are_private_until_select_is_granted(role, db):
    reader = role("reader")
    with connect(db) as su:
        user = add_user(su)
        key_id, _ = issue(su, user)
        public_grants = su.execute(
            """SELECT count(*) FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                WHERE c.oid IN ('mk_keys'::regclass, 'api_keys'::regclass) AND a.grantee = 0""").fetchone()[0]
        assert public_grants == 0
    with connect(db, user=reader) as conn:
        assert sqlstate_of(conn, "SELECT * FROM mk_keys") == "42501"
        assert sqlstate_of(conn, "SELECT id FROM mk_keys WHERE user_id = %s", (user,)) == "42501"
        assert sqlstate_of(conn, "SELECT * FROM api_keys") == "42501"
    with connect(db) as su:
        su.execute(f'GRANT SELECT ON mk_keys TO "{reader}"')
    with connect(db, user=reader) as conn:
        cur = conn.execute("SELECT * FROM mk_keys WHERE user_id = %s", (user,))
        assert [c.name for c in cur.description] == LISTING_COLUMNS
        rows = cur.fetchall()
        assert [(r[0], r[LISTING_COLUMNS.index("status")]) for r in rows] == [(key_id, "valid")]
        # SELECT on the listing gives nothing else.
        assert sqlstate_of(conn, "SELECT key_hash FROM api_keys") == "42501"
        # 42501, or 55000 if the view is not updatable at all.
        assert sqlstate_of(conn, "UPDATE mk_keys SET name = 'x'") in ("42501", "55000")
        assert sqlstate_of(conn, "DELETE FROM mk_keys") in ("42501", "55000")


# ---------------------------------------------------------------- privileges

NEW_CALLS = {
    "verify with scopes": "SELECT mk_verify(%(key)s::text, '{read}'::text[])",
    "verify_detail with scopes": "SELECT * FROM mk_verify_detail(%(key)s::text, '{read}'::text[])",
    "revoke_key": "SELECT mk_revoke_key(%(key)s::text)",
    "issue with options": "SELECT * FROM mk_issue_key(%(spare)s, expires_in => '1 day', scopes => '{read}')",
    "issue": "SELECT * FROM mk_issue_key(%(spare)s)",
    "rotate with grace": "SELECT * FROM mk_rotate_key(%(user)s, grace => '1 hour')",
    "rotate": "SELECT * FROM mk_rotate_key(%(user)s)",
    "verify": "SELECT mk_verify(%(key)s::text)",
    "verify_detail": "SELECT * FROM mk_verify_detail(%(key)s::text)",
    "revoke": "SELECT mk_revoke(%(key_id)s)",
    "revoke_user_keys": "SELECT mk_revoke_user_keys(%(user)s)",
    "listing": "SELECT * FROM mk_keys",
    "table": "SELECT * FROM api_keys",
    "hash_key": "SELECT mk_hash_key(%(key)s)",
    "restore_user_foreign_key (0.2.1)": "SELECT mk_restore_user_foreign_key()",
    "well_formed": "SELECT mk_key_is_well_formed(%(key)s)",
}
OPEN_TO_PUBLIC = {"hash_key", "well_formed"}


def test_a_fresh_role_may_call_nothing_but_the_two_pure_functions(role, db):
    nobody = role("nobody")
    with connect(db) as su:
        user, spare = add_user(su), add_user(su)
        key_id, key = issue(su, user)
        public_execute = {r[0] for r in su.execute(
            """SELECT p.oid::regprocedure::text
                 FROM pg_proc p
                 JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
                 JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'makima_keys'
                 CROSS JOIN aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'""").fetchall()}
        assert public_execute == {"mk_hash_key(text)", "mk_key_is_well_formed(text)"}
        signatures = ["mk_verify(text,text[],integer)", "mk_verify_detail(text,text[],integer)",
                      "mk_revoke_key(text)",
                      "mk_issue_key(uuid,text,interval,text[],jsonb,integer,integer,interval,integer,interval)",
                      "mk_rotate_key(uuid,text,interval,text[],jsonb,interval,integer,integer,interval,integer,interval)",
                      "mk_key_stats_rows()", "mk_key_stats_reset()"]
        for signature in signatures:
            assert su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                              (nobody, signature)).fetchone()[0] is False, signature
    params = {"user": user, "spare": spare, "key_id": key_id, "key": key}
    with connect(db, user=nobody) as conn:
        outcomes = {}
        for call, sql in NEW_CALLS.items():
            conn.autocommit = False
            outcomes[call] = sqlstate_of(conn, sql, params)
            conn.rollback()
            conn.autocommit = True
        assert outcomes == {call: None if call in OPEN_TO_PUBLIC else "42501" for call in NEW_CALLS}
    with connect(db) as su:
        assert verify(su, key) == user  # nothing the role tried took effect
        assert su.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1


# ---------------------------------------------------------------- update from 0.1.0

LEGACY_GRANTS = ('GRANT EXECUTE ON FUNCTION mk_verify(text), mk_verify_detail(text), mk_issue_key(uuid, text),'
                 ' mk_rotate_key(uuid, text) TO "{role}"')
# The same grants on the 0.2.0 signatures of those functions.
V020_GRANTS = ('GRANT EXECUTE ON FUNCTION mk_verify(text), mk_verify_detail(text),'
               ' mk_issue_key(uuid, text, interval, text[], jsonb),'
               ' mk_rotate_key(uuid, text, interval, text[], jsonb, interval) TO "{role}"')
# And on their current signatures (0.3.0 replaced every form of 0.2.0; 0.4.0
# the issuing ones, carrying their grants).
CURRENT_GRANTS = ('GRANT EXECUTE ON FUNCTION mk_verify(text, text[], integer), mk_verify_detail(text, text[], integer),'
                  ' mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval),'
                  ' mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval)'
                  ' TO "{role}"')
# The version this build installs; updates go to it through every script.
CURRENT_VERSION = "0.5.0"
UPDATE = "ALTER EXTENSION makima_keys UPDATE"
SEED_ROWS = f"SELECT {', '.join(SEED_COLUMNS)} FROM api_keys ORDER BY id"


def extversion(conn):
    return conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0]


def install_0_1_0_with_keys(name, app):
    """A database installed at 0.1.0 and used through the 0.1.0 functions, with
    `app` granted EXECUTE on the functions 0.2.0 replaces. Returns
    ({live key: user}, {revoked key: user}, a user without a key)."""
    live, dead = {}, {}
    with connect(name) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.1.0'")
        su.execute(LEGACY_GRANTS.format(role=app))

        def legacy_issue(user, label=None):
            return su.execute("SELECT id, key FROM mk_issue_key(%s, %s)", (user, label)).fetchone()

        plain = add_user(su)
        live[legacy_issue(plain, "plain")[1]] = plain
        used = add_user(su)
        key = legacy_issue(used)[1]
        su.execute("SELECT mk_verify(%s)", (key,))  # sets last_used_at
        live[key] = used
        revoked = add_user(su)
        key_id, key = legacy_issue(revoked)
        assert revoke(su, key_id) is True
        dead[key] = revoked
        rotated = add_user(su)
        dead[legacy_issue(rotated, "before")[1]] = rotated
        live[su.execute("SELECT key FROM mk_rotate_key(%s, 'after')", (rotated,)).fetchone()[0]] = rotated
        gone = add_user(su)
        dead[legacy_issue(gone)[1]] = gone
        assert su.execute("SELECT mk_revoke_user_keys(%s)", (gone,)).fetchone()[0] == 1
        by_app, spare = add_user(su), add_user(su)
    with connect(name, user=app) as conn:
        live[conn.execute("SELECT key FROM mk_issue_key(%s)", (by_app,)).fetchone()[0]] = by_app
    return live, dead, spare


def test_the_0_2_0_library_serves_a_database_still_at_0_1_0(role, new_db):
    app = role("app")
    name = new_db()
    live, dead, spare = install_0_1_0_with_keys(name, app)
    with connect(name) as su:
        assert extversion(su) == "0.1.0"
        assert [r[0] for r in su.execute(COLUMNS).fetchall()] == SEED_COLUMNS
        assert su.execute("SELECT to_regclass('mk_keys')").fetchone()[0] is None
        for signature in ("mk_verify(text,text[])", "mk_verify_detail(text,text[])", "mk_revoke_key(text)"):
            assert su.execute("SELECT to_regprocedure(%s)", (signature,)).fetchone()[0] is None, signature
        for key, user in live.items():
            cur = su.execute("SELECT * FROM mk_verify_detail(%s)", (key,))
            assert [c.name for c in cur.description] == LEGACY_DETAIL_COLUMNS
            row = cur.fetchone()
            assert (row[0], row[2]) == ("valid", user)
            assert verify(su, key) == user
        for key, user in dead.items():
            assert su.execute("SELECT status, user_id FROM mk_verify_detail(%s)", (key,)).fetchone() == ("revoked", user)
            assert verify(su, key) is None
        assert su.execute("SELECT * FROM mk_verify_detail('')").fetchone() == ("malformed", None, None, None, None)
        cur = su.execute("SELECT * FROM mk_issue_key(%s, 'x')", (spare,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        old = cur.fetchone()[1]
        cur = su.execute("SELECT * FROM mk_rotate_key(%s)", (spare,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        new = cur.fetchone()[1]
        assert (verify(su, old), verify(su, new)) == (None, spare)
    with connect(name, user=app) as conn:
        for key, user in live.items():
            assert verify(conn, key) == user
        assert conn.execute("SELECT * FROM mk_verify_detail(%s)", (new,)).fetchone()[:3:2] == ("valid", spare)


def test_update_from_0_1_0_keeps_every_key_and_grant_and_adds_the_new_surface(role, new_db):
    app = role("app")
    name = new_db()
    live, dead, spare = install_0_1_0_with_keys(name, app)
    with connect(name) as su:
        before = su.execute(SEED_ROWS).fetchall()
        su.execute(UPDATE)
        assert extversion(su) == CURRENT_VERSION
        assert su.execute(SEED_ROWS).fetchall() == before
        assert su.execute("SELECT count(*) FROM api_keys WHERE expires_at IS NOT NULL OR scopes IS NOT NULL"
                          " OR metadata IS NOT NULL").fetchone()[0] == 0
        assert [r[0] for r in su.execute(COLUMNS).fetchall()] == SEED_COLUMNS + [
            "expires_at", "scopes", "metadata", "credits", "refill_amount", "refill_every", "refilled_at",
            "rate_limit", "rate_period"]
        for key, user in live.items():
            assert verify(su, key) == user
            # Keys of 0.1.0 have no scopes: they are unrestricted.
            assert verify(su, key, ["read", "write"]) == user
            assert status(su, key) == "valid"
        for key, user in dead.items():
            assert verify(su, key) is None
            d = detail(su, key)
            assert (d["status"], d["user_id"]) == ("revoked", user)

    # The role keeps what it was granted, on the replaced functions too, and nothing more.
    with connect(name, user=app) as conn:
        for key, user in live.items():
            assert verify(conn, key) == user
        cur = conn.execute("SELECT * FROM mk_verify_detail(%s::text)", (next(iter(live)),))
        assert [c.name for c in cur.description] == DETAIL_COLUMNS
        assert cur.fetchone()[0] == "valid"
        cur = conn.execute("SELECT * FROM mk_issue_key(%s)", (spare,))
        assert [c.name for c in cur.description] == ISSUE_COLUMNS
        first = cur.fetchone()[1]
        second = conn.execute("SELECT key FROM mk_rotate_key(%s, scopes => '{read}')", (spare,)).fetchone()[0]
        assert (verify(conn, first), verify(conn, second)) == (None, spare)
        # 0.3.0 has one mk_verify and one mk_verify_detail: the grant of the
        # one-argument forms carries to it, scopes included (a requirement
        # only refuses more).
        assert conn.execute("SELECT mk_verify(%s::text, '{read}'::text[])", (second,)).fetchone()[0] == spare
        assert conn.execute("SELECT status FROM mk_verify_detail(%s::text, '{write}'::text[])",
                            (second,)).fetchone()[0] == "insufficient_scope"
        outcomes = {}
        for sql in ("SELECT mk_revoke_key(%(k)s::text)", "SELECT * FROM mk_keys", "SELECT * FROM api_keys",
                    "SELECT mk_revoke_user_keys(%(u)s)"):
            outcomes[sql] = sqlstate_of(conn, sql, {"k": second, "u": spare})
        assert outcomes == {sql: "42501" for sql in outcomes}

    # Everything new works on the old rows.
    with connect(name) as su, connect(name) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        plain_key = next(k for k in live if detail(su, k)["name"] == "plain")
        plain = live[plain_key]
        plain_id = detail(su, plain_key)["key_id"]
        assert sqlstate_of(su, "SELECT mk_issue_key(%s)", (plain,)) == "23505"
        new_id, new_key = rotate(su, plain, grace="1 hour", scopes=["read"])
        assert payloads(notifications(listener, 1)) == [str(plain_id)]
        assert verify(su, plain_key) == plain
        d = detail(su, plain_key)
        assert d["status"] == "valid" and seconds_until(su, d["revoked_at"]) > 3000
        assert verify(su, new_key, ["read"]) == plain
        assert status(su, new_key, ["write"]) == "insufficient_scope"

        newcomer = add_user(su)
        _, scoped = issue(su, newcomer, expires_in="30 days", scopes=["read"], metadata='{"team": "x"}')
        assert (verify(su, scoped, ["read"]), verify(su, scoped, ["admin"])) == (newcomer, None)

        leaked_key = next(k for k, u in live.items() if u not in (plain, spare))
        assert revoke_key(su, leaked_key) is True
        assert verify(su, leaked_key) is None

        listed = dict(su.execute("SELECT id, status FROM mk_keys").fetchall())
        assert len(listed) == su.execute("SELECT count(*) FROM api_keys").fetchone()[0]
        for key in dead:
            assert listed[detail(su, key)["key_id"]] == "revoked"
        assert listed[plain_id] == "valid" and listed[new_id] == "valid"
        assert listed[detail(su, leaked_key)["key_id"]] == "revoked"


# Everything of the extension that a catalog shows, as comparable values.
MEMBERS = """
    SELECT d.classid, d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
     WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'makima_keys'"""


def acl(column, kind, owner):
    return f"ARRAY(SELECT a::text FROM unnest(coalesce({column}, acldefault('{kind}', {owner}))) a ORDER BY 1)"


CATALOG = {
    "extension": """
        SELECT extversion, extrelocatable, extnamespace::regnamespace::text, pg_get_userbyid(extowner),
               ARRAY(SELECT c::regclass::text FROM unnest(extconfig) WITH ORDINALITY AS u(c, n) ORDER BY n),
               extcondition
          FROM pg_extension WHERE extname = 'makima_keys'""",
    "members": f"SELECT pg_describe_object(m.classid, m.objid, 0) FROM ({MEMBERS}) m ORDER BY 1",
    "columns": """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
               a.attidentity, a.attgenerated, a.attcollation::regcollation::text, a.attacl::text
          FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = 'api_keys'::regclass AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum""",
    "table": f"""
        SELECT c.relkind, c.relpersistence, c.reloptions, c.relrowsecurity, c.relforcerowsecurity,
               pg_get_userbyid(c.relowner), {acl('c.relacl', 'r', 'c.relowner')}
          FROM pg_class c WHERE c.oid = 'api_keys'::regclass""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique, i.indisprimary, i.indisvalid, i.indimmediate
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'api_keys'::regclass ORDER BY 1""",
    "constraints": """
        SELECT conname, contype, pg_get_constraintdef(oid), condeferrable, condeferred, convalidated
          FROM pg_constraint WHERE conrelid = 'api_keys'::regclass ORDER BY 1""",
    "triggers, rules, policies": """
        SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger
         WHERE tgrelid = 'api_keys'::regclass AND NOT tgisinternal
        UNION ALL SELECT 'rule ' || pg_get_ruledef(oid) FROM pg_rewrite WHERE ev_class = 'api_keys'::regclass
        UNION ALL SELECT 'policy ' || polname FROM pg_policy WHERE polrelid = 'api_keys'::regclass
        ORDER BY 1""",
    "functions": f"""
        SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prokind, p.prosecdef,
               p.provolatile, p.proparallel, p.proisstrict, p.proretset, p.proleakproof, p.procost, p.prorows,
               p.proconfig, p.prosrc, p.probin, pg_get_userbyid(p.proowner), {acl('p.proacl', 'f', 'p.proowner')},
               obj_description(p.oid, 'pg_proc')
          FROM pg_proc p JOIN ({MEMBERS}) m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
         ORDER BY 1""",
    "every mk_ function": "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname LIKE 'mk\\_%' ORDER BY 1",
    "view": f"""
        SELECT pg_get_viewdef(c.oid), c.relkind, c.reloptions, pg_get_userbyid(c.relowner),
               {acl('c.relacl', 'r', 'c.relowner')}
          FROM pg_class c WHERE c.oid = to_regclass('mk_keys')""",
    "view columns": """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attcollation::regcollation::text, a.attacl::text
          FROM pg_attribute a
         WHERE a.attrelid = to_regclass('mk_keys') AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
    "comments": f"""
        SELECT pg_describe_object(ds.classoid, ds.objoid, ds.objsubid), ds.description
          FROM pg_description ds JOIN ({MEMBERS}) m ON m.classid = ds.classoid AND m.objid = ds.objoid
         ORDER BY 1""",
    "relations and types in public": """
        SELECT 'relation ' || relname || ' ' || relkind::text FROM pg_class WHERE relnamespace = 'public'::regnamespace
        UNION ALL SELECT 'type ' || typname FROM pg_type WHERE typnamespace = 'public'::regnamespace
        ORDER BY 1""",
}

# What pg_dump takes as the privileges CREATE EXTENSION gave; it dumps only what differs.
INIT_PRIVS = f"""
    SELECT pg_describe_object(ip.classoid, ip.objoid, ip.objsubid), ip.privtype,
           ARRAY(SELECT a::text FROM unnest(ip.initprivs) a ORDER BY 1)
      FROM pg_init_privs ip JOIN ({MEMBERS}) m ON m.classid = ip.classoid AND m.objid = ip.objoid
     ORDER BY 1"""


def catalog(conn):
    return {part: conn.execute(sql).fetchall() for part, sql in CATALOG.items()}


def assert_same_catalog(actual, expected):
    diffs = {}
    for part in expected:
        if actual[part] != expected[part]:
            diffs[part] = {
                "only here": [r for r in actual[part] if r not in expected[part]],
                "only in the reference": [r for r in expected[part] if r not in actual[part]],
                "order differs": sorted(map(repr, actual[part])) == sorted(map(repr, expected[part])),
            }
    assert not diffs, pprint.pformat(diffs, width=140)


def updated_and_fresh(new_db, app):
    """A database updated from 0.1.0 and a fresh one, with the same grants to app."""
    updated, fresh = new_db(), new_db()
    install_0_1_0_with_keys(updated, app)
    with connect(updated) as su:
        su.execute(UPDATE)
    with connect(fresh) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys")
        su.execute(CURRENT_GRANTS.format(role=app))
    return updated, fresh


def test_updated_catalog_equals_a_fresh_install(role, new_db):
    updated, fresh = updated_and_fresh(new_db, role("app"))
    with connect(updated) as a, connect(fresh) as b:
        got, want = catalog(a), catalog(b)
    assert want["extension"][0][0] == CURRENT_VERSION
    assert want["view"], "a fresh install has no mk_keys view"
    assert_same_catalog(got, want)


def test_updated_initial_privileges_equal_a_fresh_install(role, new_db):
    """The grants the update carries over are the user's own, not the
    extension's: pg_dump must still dump them."""
    updated, fresh = updated_and_fresh(new_db, role("app"))
    with connect(updated) as a, connect(fresh) as b:
        got, want = a.execute(INIT_PRIVS).fetchall(), b.execute(INIT_PRIVS).fetchall()
    assert got == want, pprint.pformat({"updated only": [r for r in got if r not in want],
                                        "fresh only": [r for r in want if r not in got]}, width=140)


def run(*args):
    env = {**os.environ, "PGHOST": os.environ.get("PGHOST", "127.0.0.1"), "PGPORT": PORT, "PGUSER": SUPERUSER}
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


EVERY_ROW = "SELECT to_jsonb(k)::text FROM api_keys k ORDER BY id"
# The same without the 0.3.0 columns, to compare rows across the update to 0.3.0.
EVERY_ROW_BEFORE_0_3_0 = """SELECT (to_jsonb(k) - ARRAY['credits', 'refill_amount', 'refill_every', 'refilled_at',
                                                           'rate_limit', 'rate_period'])::text
                              FROM api_keys k ORDER BY id"""
# Every row without the columns 0.4.0 adds.
EVERY_ROW_BEFORE_0_4_0 = """SELECT (to_jsonb(k) - ARRAY['rate_limit', 'rate_period'])::text
                              FROM api_keys k ORDER BY id"""


def test_an_updated_database_dumps_and_restores_with_its_keys_and_grants(role, new_db, tmp_path):
    app = role("app")
    updated, restored = new_db(), new_db()
    live, dead, spare = install_0_1_0_with_keys(updated, app)
    with connect(updated) as su:
        su.execute(UPDATE)
        newcomer = add_user(su)
        _, new_key = issue(su, newcomer, expires_in="30 days", scopes=["read"],
                           metadata='{"n": 12345678901234567890.12345678901234567890}')
        live[new_key] = newcomer
        rows = su.execute(EVERY_ROW).fetchall()
        want = catalog(su)
    dump = tmp_path / "dump"
    run("pg_dump", "-Fc", "-d", updated, "-f", str(dump))
    run("pg_restore", "--exit-on-error", "-d", restored, str(dump))
    with connect(restored) as su:
        # As after any restore (README, section "Schema"): the foreign key comes back by hand.
        su.execute("ALTER TABLE api_keys ADD CONSTRAINT api_keys_user_id_fkey"
                   " FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE")
        assert su.execute(EVERY_ROW).fetchall() == rows
        assert_same_catalog(catalog(su), want)
        for key in dead:
            assert verify(su, key) is None
    with connect(restored, user=app) as conn:
        for key, user in live.items():
            assert verify(conn, key) == user
        # Exactly the grants of the source: none on the new functions (the
        # one 0.3.0 mk_verify carries the grant of mk_verify(text), scopes
        # included).
        assert sqlstate_of(conn, "SELECT mk_revoke_key(%s::text)", (new_key,)) == "42501"
        assert verify(conn, new_key, ["read"]) == newcomer
        assert conn.execute("SELECT key FROM mk_rotate_key(%s)", (newcomer,)).fetchone()[0]


def legacy_row(user_id, key, revoked=False):
    """A key as the makima application inserts it: SHA-256 hex of the key."""
    return (user_id, hashlib.sha256(key.encode()).hexdigest(), key[:9], "legacy", "now()" if revoked else None)


def seed_with_legacy_keys(name, app):
    with connect(name, user=app) as conn:
        conn.execute(USERS_DDL)
        conn.execute(SEED.read_text())
        alice, bob = add_user(conn, "alice@example.com"), add_user(conn, "bob@example.com")
        conn.cursor().executemany(
            "INSERT INTO api_keys (user_id, key_hash, key_prefix, name, revoked_at)"
            " VALUES (%s, %s, %s, %s, %s::timestamptz)",
            [legacy_row(alice, "mk_legacyActiveKey1234"), legacy_row(bob, "some-other-format-key", revoked=True)])
    return alice, bob


def test_update_of_a_database_that_adopted_the_seed_table(role, new_db):
    app = role("makima_app")
    updated, fresh = new_db(owner=app), new_db(owner=app)
    alice, bob = seed_with_legacy_keys(updated, app)
    seed_with_legacy_keys(fresh, app)
    with connect(updated) as su:
        su.execute("CREATE EXTENSION makima_keys VERSION '0.1.0'")
        assert extversion(su) == "0.1.0"
        bob_key = su.execute("SELECT key FROM mk_issue_key(%s, 'k')", (bob,)).fetchone()[0]
        before = su.execute(SEED_ROWS).fetchall()
        su.execute(UPDATE)
        assert extversion(su) == CURRENT_VERSION
        assert su.execute(SEED_ROWS).fetchall() == before
        assert verify(su, "mk_legacyActiveKey1234") == alice
        assert verify(su, "mk_legacyActiveKey1234", ["read"]) == alice
        assert status(su, "some-other-format-key") == "revoked"
        assert verify(su, bob_key) == bob
        carol = add_user(su, "carol@example.com")
        _, carol_key = issue(su, carol, scopes=["read"], expires_in="1 day", metadata='{"a": 1}')
        assert verify(su, carol_key, ["read"]) == carol
        got = catalog(su)
    with connect(fresh) as su:
        su.execute("CREATE EXTENSION makima_keys")
        want = catalog(su)
    assert_same_catalog(got, want)

    # The application that ran the migration still reads and writes its rows, new columns included.
    with connect(updated, user=app) as conn:
        assert conn.execute("SELECT count(*) FROM api_keys WHERE scopes = '{read}'").fetchone()[0] == 1
        conn.execute("UPDATE api_keys SET metadata = '{\"by\": \"app\"}' WHERE user_id = %s", (alice,))
    with connect(updated) as su:
        assert detail(su, "mk_legacyActiveKey1234")["metadata"] == {"by": "app"}
        # A leaked key of the old format is revoked by its plaintext too.
        assert revoke_key(su, "mk_legacyActiveKey1234") is True
        assert verify(su, "mk_legacyActiveKey1234") is None
        assert revoke_key(su, "some-other-format-key") is False


@pytest.mark.parametrize("schema", ["has space", "has$dollar"])
def test_update_in_a_schema_that_needs_quoting(new_db, schema):
    name = new_db()
    quoted = '"' + schema + '"'
    with connect(name) as conn:
        conn.execute(f"CREATE SCHEMA {quoted}")
        conn.execute(f"CREATE TABLE {quoted}.users (id uuid PRIMARY KEY)")
        conn.execute(f"CREATE EXTENSION makima_keys SCHEMA {quoted} VERSION '0.1.0'")
        user, other = (conn.execute(f"INSERT INTO {quoted}.users VALUES (gen_random_uuid()) RETURNING id").fetchone()[0]
                       for _ in range(2))
        old = conn.execute(f"SELECT key FROM {quoted}.mk_issue_key(%s)", (user,)).fetchone()[0]
        conn.execute(UPDATE)
        assert extversion(conn) == CURRENT_VERSION
        assert conn.execute(f"SELECT {quoted}.mk_verify(%s::text, '{{read}}'::text[])", (old,)).fetchone()[0] == user
        new = conn.execute(f"SELECT key FROM {quoted}.mk_rotate_key(%s, grace => '1 hour', scopes => '{{read}}')",
                           (user,)).fetchone()[0]
        assert conn.execute(f"SELECT {quoted}.mk_verify(%s::text)", (old,)).fetchone()[0] == user
        assert conn.execute(f"SELECT {quoted}.mk_verify(%s::text, '{{write}}'::text[])", (new,)).fetchone()[0] is None
        assert conn.execute(f"SELECT {quoted}.mk_revoke_key(%s::text)", (old,)).fetchone()[0] is True
        conn.execute(f"SELECT {quoted}.mk_issue_key(%s, expires_in => '1 day')", (other,))
        assert sorted(r[0] for r in conn.execute(f"SELECT status FROM {quoted}.mk_keys").fetchall()) == [
            "revoked", "valid", "valid"]
        assert sqlstate_of(conn, f"SELECT {quoted}.mk_issue_key(gen_random_uuid())") == "23503"


# ---------------------------------------------------------------- 0.2.0 -> 0.2.1

def test_update_from_0_2_0_keeps_every_key_and_grant_and_adds_the_restore_call(role, new_db):
    """0.2.1 adds mk_restore_user_foreign_key(); a database at 0.2.0 holding
    keys of every kind updates to exactly a fresh install's catalog and
    initial privileges, and every key answers as before."""
    app = role("app")
    updated, fresh = new_db(), new_db()
    with connect(updated) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.2.0'")
        assert extversion(su) == "0.2.0"
        su.execute(V020_GRANTS.format(role=app))
        plain_user, scoped_user, rotated_user, revoked_user = (add_user(su) for _ in range(4))
        keys = {"plain": issue(su, plain_user)[1],
                "scoped": issue(su, scoped_user, expires_in="30 days", scopes=["read"],
                                metadata='{"team": "ops"}')[1]}
        keys["in grace"] = issue(su, rotated_user)[1]
        keys["rotated"] = rotate(su, rotated_user, grace="1 day")[1]
        keys["revoked"] = issue(su, revoked_user)[1]
        su.execute("SELECT mk_revoke_user_keys(%s)", (revoked_user,))
        # The nine columns of 0.2.0; 0.3.0 adds retry_after and credits, both
        # NULL for these keys (checked after the update).
        answers = lambda: {name: (verify(su, key), [row[:9] for row in su.execute(  # noqa: E731
            "SELECT * FROM mk_verify_detail(%s, '{read}')", (key,)).fetchall()]) for name, key in keys.items()}
        before, rows = answers(), su.execute(EVERY_ROW_BEFORE_0_3_0).fetchall()
        su.execute(UPDATE)
        assert extversion(su) == CURRENT_VERSION
        assert answers() == before
        assert su.execute(EVERY_ROW_BEFORE_0_3_0).fetchall() == rows
        assert su.execute("SELECT count(*) FROM api_keys WHERE num_nonnulls(credits, refill_amount,"
                          " refill_every, refilled_at) > 0").fetchone()[0] == 0
        for key in keys.values():
            assert su.execute("SELECT retry_after, credits FROM mk_verify_detail(%s)", (key,)).fetchone() == (
                None, None)
        assert not su.execute("SELECT has_function_privilege(%s, 'mk_restore_user_foreign_key()', 'EXECUTE')",
                              (app,)).fetchone()[0]
        assert su.execute("SELECT mk_restore_user_foreign_key()").fetchone()[0] is False  # the key is there
    with connect(fresh) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys")
        su.execute(CURRENT_GRANTS.format(role=app))
    with connect(updated) as a, connect(fresh) as b:
        assert_same_catalog(catalog(a), catalog(b))
        assert a.execute(INIT_PRIVS).fetchall() == b.execute(INIT_PRIVS).fetchall()
