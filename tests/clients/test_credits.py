"""makima_keys 0.3.0 as clients see it: usage credits that commit and roll
back with the caller, lazy refills, the one mk_verify and mk_verify_detail
with a cost, issuing over an expired active key, and the update from 0.2.1.
Each test fails without the behaviour it names. Nothing asserts how long
anything took; waits are for locks, with lock_timeout as the proof."""
import threading
import time

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import USERS_DDL, add_user, connect, sqlstate_of
from test_v020 import (CHANNEL, EVERY_ROW_BEFORE_0_3_0, INIT_PRIVS, assert_same_catalog, catalog, extversion,
                       notifications, payloads, wait_until_past)

USAGE = "makima_keys_usage"
CURRENT_VERSION = "0.5.0"
DETAIL_COLUMNS = ["status", "key_id", "user_id", "key_prefix", "name", "expires_at", "revoked_at",
                  "scopes", "metadata", "retry_after", "credits"]


def issue(conn, user, **options):
    """mk_issue_key with named options; returns (id, key)."""
    args = "".join(f", {name} => %({name})s" for name in options)
    row = conn.execute(f"SELECT id, key FROM mk_issue_key(%(user)s{args})", {"user": user, **options}).fetchone()
    return row[0], row[1]


def detail(conn, key, cost=1, required=None):
    cur = conn.cursor(row_factory=dict_row)
    if required is None:
        cur.execute("SELECT * FROM mk_verify_detail(%s, cost => %s)", (key, cost))
    else:
        cur.execute("SELECT * FROM mk_verify_detail(%s, %s::text[], %s)", (key, required, cost))
    return cur.fetchone()


def verify(conn, key, cost=1):
    return conn.execute("SELECT mk_verify(%s, cost => %s)", (key, cost)).fetchone()[0]


def credits_of(conn, key_id):
    return conn.execute("SELECT credits FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]


def usage_events(listener, count, quiet=0.4):
    got = []
    if count:
        got += list(listener.notifies(timeout=10, stop_after=count))
    got += list(listener.notifies(timeout=quiet))
    assert all(n.channel == USAGE for n in got), got
    return sorted(n.payload for n in got)


# ---------------------------------------------------------------- the call contract

def test_every_call_written_for_0_2_0_keeps_working_and_none_is_ambiguous(db):
    with connect(db) as su:
        user = add_user(su)
        _, key = issue(su, user, scopes=["read"])
        calls = {
            "SELECT mk_verify(%(k)s)": user,
            "SELECT mk_verify(%(k)s, '{read}')": user,
            "SELECT mk_verify(%(k)s, '{write}')": None,
            "SELECT mk_verify(%(k)s, NULL)": None,  # an unknown requirement fails closed
            "SELECT mk_verify(%(k)s, cost => 2)": user,
            "SELECT mk_verify(%(k)s, required_scopes => '{read}', cost => 2)": user,
            "SELECT mk_verify(%(k)s, '{read}', 0)": user,
            # An empty requirement, however it is written, asks for nothing.
            "SELECT mk_verify(%(k)s, '{}')": user,
            "SELECT mk_verify(%(k)s, ARRAY[]::text[], 1)": user,
            "SELECT mk_verify(%(k)s, '{read,write}')": None,
            "SELECT mk_verify(%(k)s, ARRAY['read', NULL])": None,
        }
        for sql, expected in calls.items():
            assert su.execute(sql, {"k": key}).fetchone()[0] == expected, sql
        details = {
            "SELECT status FROM mk_verify_detail(%(k)s)": "valid",
            "SELECT status FROM mk_verify_detail(%(k)s, '{read}')": "valid",
            "SELECT status FROM mk_verify_detail(%(k)s, '{write}')": "insufficient_scope",
            "SELECT status FROM mk_verify_detail(%(k)s, NULL)": "insufficient_scope",
            "SELECT status FROM mk_verify_detail(%(k)s, cost => 2)": "valid",
            "SELECT status FROM mk_verify_detail(%(k)s, required_scopes => '{read}', cost => 2)": "valid",
        }
        for sql, expected in details.items():
            assert su.execute(sql, {"k": key}).fetchone()[0] == expected, sql
        cur = su.execute("SELECT * FROM mk_verify_detail(%s)", (key,))
        assert [c.name for c in cur.description] == DETAIL_COLUMNS
        # One function of each name: nothing left to be ambiguous with.
        assert su.execute("SELECT count(*) FROM pg_proc WHERE proname IN ('mk_verify', 'mk_verify_detail')"
                          ).fetchone()[0] == 2


def test_a_null_or_negative_cost_is_refused_and_spends_nothing(db):
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user, credits=5)
        for function in ("SELECT mk_verify(%s, cost => %s)", "SELECT * FROM mk_verify_detail(%s, cost => %s)"):
            assert sqlstate_of(su, function, (key, None)) == "22004", function
            assert sqlstate_of(su, function, (key, -1)) == "22023", function
            # Refused before the key is looked at, for any text.
            assert sqlstate_of(su, function, ("not a key", -1)) == "22023", function
        assert credits_of(su, key_id) == 5
        # The message names the argument, never the key.
        with pytest.raises(psycopg.Error) as refused:
            su.execute("SELECT mk_verify(%s, cost => -1)", (key,))
        assert refused.value.diag.message_primary == "cost must not be negative"
        assert key not in str(refused.value)


def test_a_key_without_credits_is_unlimited_and_shows_no_credits(db):
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user)
        for cost in (0, 1, 1_000_000, 2_147_483_647):
            d = detail(su, key, cost)
            assert (d["status"], d["credits"], d["retry_after"]) == ("valid", None, None), cost
            assert verify(su, key, cost) == user
        assert credits_of(su, key_id) is None


# ---------------------------------------------------------------- spending

def test_credits_are_spent_by_cost_and_a_short_key_spends_nothing(db):
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user, credits=5)
        d = detail(su, key, 2)
        assert (d["status"], d["credits"], d["user_id"]) == ("valid", 3, user)
        assert credits_of(su, key_id) == 3
        assert verify(su, key, 4) is None
        d = detail(su, key, 4)
        assert (d["status"], d["credits"], d["retry_after"]) == ("usage_exceeded", 3, None)
        assert credits_of(su, key_id) == 3
        assert verify(su, key, 3) == user
        assert credits_of(su, key_id) == 0
        d = detail(su, key, 1)
        assert (d["status"], d["credits"], d["retry_after"]) == ("usage_exceeded", 0, None)
        # cost => 0 is a peek: it passes, spends nothing and writes nothing.
        xmin = su.execute("SELECT xmin::text FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]
        d = detail(su, key, 0)
        assert (d["status"], d["credits"]) == ("valid", 0)
        assert su.execute("SELECT xmin::text FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0] == xmin


def test_a_spend_also_stamps_last_used_at(db):
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user, credits=2)
        su.execute("UPDATE api_keys SET last_used_at = now() - interval '1 day' WHERE id = %s", (key_id,))
        assert verify(su, key) == user
        assert su.execute("SELECT last_used_at > now() - interval '1 minute' FROM api_keys WHERE id = %s",
                          (key_id,)).fetchone()[0]


def test_statuses_before_usage_win_and_spend_nothing(db):
    """Precedence: revoked, expired and insufficient_scope come before
    usage_exceeded, and a refused key spends nothing."""
    with connect(db) as su:
        scoped_user, revoked_user = add_user(su), add_user(su)
        scoped_id, scoped = issue(su, scoped_user, credits=1, scopes=["read"])
        d = detail(su, scoped, 5, ["write"])
        assert (d["status"], d["credits"]) == ("insufficient_scope", 1)
        revoked_id, revoked = issue(su, revoked_user, credits=0)
        su.execute("SELECT mk_revoke(%s)", (revoked_id,))
        assert detail(su, revoked, 1)["status"] == "revoked"
        assert (credits_of(su, scoped_id), credits_of(su, revoked_id)) == (1, 0)


def test_a_rollback_gives_the_credits_back(db):
    with connect(db) as su, connect(db, autocommit=False) as app:
        user = add_user(su)
        key_id, key = issue(su, user, credits=3)
        assert verify(app, key, 2) == user
        app.rollback()
        assert credits_of(su, key_id) == 3
        assert verify(app, key, 2) == user
        app.commit()
        assert credits_of(su, key_id) == 1


def test_concurrent_sessions_never_both_spend_the_last_credit(db):
    """8 sessions spend one key with 20 credits, 10 calls each: exactly 20
    calls pass, whatever the interleaving."""
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user, credits=20)
    passed, errors = [], []

    def session():
        try:
            with connect(db) as conn:
                for _ in range(10):
                    if conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user:
                        passed.append(1)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=session) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(passed) == 20
    with connect(db) as su:
        assert credits_of(su, key_id) == 0


def test_a_spend_waits_for_another_transaction_spending_the_same_key_and_so_does_a_revoke(db):
    with connect(db) as su, connect(db, autocommit=False) as first, connect(db) as second:
        user = add_user(su)
        key_id, key = issue(su, user, credits=2)
        assert verify(first, key) == user  # holds the row until it ends
        second.execute("SET lock_timeout = '300ms'")
        assert sqlstate_of(second, "SELECT mk_verify(%s)", (key,)) == "55P03"
        assert sqlstate_of(second, "SELECT mk_revoke(%s)", (key_id,)) == "55P03"
        first.commit()
        assert verify(second, key) == user
        assert credits_of(su, key_id) == 0


def test_a_revoke_committed_while_a_spend_waits_fails_the_spend(db):
    with connect(db) as su, connect(db, autocommit=False) as admin:
        user = add_user(su)
        key_id, key = issue(su, user, credits=5)
        assert admin.execute("SELECT mk_revoke(%s)", (key_id,)).fetchone()[0] is True
        result = {}

        def spend():
            with connect(db) as conn:
                result["detail"] = detail(conn, key)

        waiting = threading.Thread(target=spend)
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive(), "the spend did not wait for the revoke's row lock"
        admin.commit()
        waiting.join(10)
        assert (result["detail"]["status"], result["detail"]["credits"]) == ("revoked", 5)
        assert credits_of(su, key_id) == 5


def test_a_spend_never_waits_for_a_table_lock_and_fails_closed(db):
    with connect(db) as su, connect(db, autocommit=False) as locker, connect(db) as app:
        user = add_user(su)
        key_id, key = issue(su, user, credits=5)
        locker.execute("LOCK TABLE api_keys IN SHARE MODE")
        app.execute("SET lock_timeout = '2s'")  # would raise 55P03 if it waited
        d = detail(app, key)
        assert (d["status"], d["credits"]) == ("usage_unavailable", 5)
        assert verify(app, key) is None
        assert detail(app, key, 0)["status"] == "valid"  # a peek needs no write
        locker.rollback()
        assert credits_of(su, key_id) == 5
        assert verify(app, key) == user


def test_a_read_only_transaction_fails_closed_with_usage_unavailable(db):
    with connect(db) as su, connect(db, autocommit=False) as app:
        user = add_user(su)
        key_id, key = issue(su, user, credits=5)
        plain_user = add_user(su)
        _, plain = issue(su, plain_user)
        app.execute("SET TRANSACTION READ ONLY")
        d = detail(app, key)
        assert (d["status"], d["credits"]) == ("usage_unavailable", 5)
        assert verify(app, key) is None
        assert verify(app, key, 0) == user
        assert verify(app, plain) == plain_user  # a key without credits needs no write
        app.rollback()
        assert credits_of(su, key_id) == 5


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_spend_under_a_transaction_snapshot_meets_a_serialization_failure_not_an_internal_error(db, isolation):
    with connect(db) as su, connect(db, autocommit=False) as app:
        user = add_user(su)
        key_id, key = issue(su, user, credits=5)
        app.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        app.execute("SELECT 1")  # the transaction's snapshot is taken here
        assert verify(su, key) == user  # another session spends after it
        assert sqlstate_of(app, "SELECT mk_verify(%s)", (key,)) == "40001"
        app.rollback()
        assert credits_of(su, key_id) == 4
        # Alone, a transaction-snapshot caller spends normally.
        app.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        assert verify(app, key) == user
        app.commit()
        assert credits_of(su, key_id) == 3


# ---------------------------------------------------------------- refills

def test_a_refill_is_lazy_sets_the_amount_and_moves_on_by_whole_periods(db):
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user, credits=2, refill_amount=5, refill_every="1 hour")
        row = su.execute("SELECT refilled_at = created_at, refill_amount, refill_every FROM api_keys"
                         " WHERE id = %s", (key_id,)).fetchone()
        assert row[0] is True and row[1] == 5 and str(row[2]) == "1:00:00"
        assert verify(su, key, 2) == user
        d = detail(su, key, 1)
        assert (d["status"], d["credits"]) == ("usage_exceeded", 0)
        # retry_after: the time left to the next refill, an hour after refilled_at.
        assert su.execute("SELECT %s::interval BETWEEN interval '59 minutes' AND interval '1 hour'",
                          (d["retry_after"],)).fetchone()[0]
        # 3.5 periods later: 5 credits (set, not added to 0), minus this call's
        # cost, and refilled_at on by exactly three periods.
        anchor = su.execute("UPDATE api_keys SET refilled_at = refilled_at - interval '3 hours 30 minutes'"
                            " WHERE id = %s RETURNING refilled_at", (key_id,)).fetchone()[0]
        d = detail(su, key, 1)
        assert (d["status"], d["credits"]) == ("valid", 4)
        assert su.execute("SELECT refilled_at = %s::timestamptz + interval '3 hours' FROM api_keys WHERE id = %s",
                          (anchor, key_id)).fetchone()[0]
        # Unused credits do not pile up: another due refill sets 5 again.
        su.execute("UPDATE api_keys SET refilled_at = refilled_at - interval '1 hour' WHERE id = %s", (key_id,))
        assert detail(su, key, 0)["credits"] == 5
        assert credits_of(su, key_id) == 4  # a peek writes nothing, the refill included


def test_monthly_refills_use_calendar_arithmetic_in_utc_whatever_the_session_time_zone(db):
    """From 2024-01-31 12:00 UTC, one month at a time as PostgreSQL adds
    months in UTC (Feb 29, Mar 29, ...), to the last step not after now."""
    with connect(db) as su:
        su.execute("SET TimeZone = 'America/New_York'")
        user = add_user(su)
        key_id, key = issue(su, user, credits=0, refill_amount=7, refill_every="1 month")
        su.execute("UPDATE api_keys SET refilled_at = '2024-01-31 12:00+00' WHERE id = %s", (key_id,))
        assert verify(su, key) == user
        expected = su.execute("""
            WITH RECURSIVE steps(at) AS (
                SELECT timestamp '2024-01-31 12:00'
                UNION ALL
                SELECT at + interval '1 month' FROM steps
                 WHERE at + interval '1 month' <= (clock_timestamp() AT TIME ZONE 'UTC'))
            SELECT max(at) AT TIME ZONE 'UTC' FROM steps""").fetchone()[0]
        row = su.execute("SELECT refilled_at, credits FROM api_keys WHERE id = %s", (key_id,)).fetchone()
        assert row == (expected, 6)


def test_a_refill_race_gives_each_period_once(db):
    """Sessions spending a key whose refill is due at the same moment: the
    refill happens once, so at most amount credits are spent in the period."""
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user, credits=0, refill_amount=10, refill_every="1 day")
        su.execute("UPDATE api_keys SET refilled_at = refilled_at - interval '1 day 1 minute' WHERE id = %s",
                   (key_id,))
    passed = []

    def session():
        with connect(db) as conn:
            for _ in range(5):
                if conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user:
                    passed.append(1)

    threads = [threading.Thread(target=session) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) == 10
    with connect(db) as su:
        assert credits_of(su, key_id) == 0


@pytest.mark.parametrize("options,expected", [
    ({"refill_amount": 5}, "22023"),
    ({"refill_every": "1 day"}, "22023"),
    ({"refill_amount": 5, "refill_every": "1 day"}, "22023"),  # without credits
    ({"credits": -1}, "22023"),
    ({"credits": 1, "refill_amount": 0, "refill_every": "1 day"}, "22023"),
    ({"credits": 1, "refill_amount": 1, "refill_every": "0"}, "22023"),
    ({"credits": 1, "refill_amount": 1, "refill_every": "-1 day"}, "22023"),
    ({"credits": 1, "refill_amount": 1, "refill_every": "1 month -30 days"}, "22023"),
])
def test_credit_options_are_checked_and_nothing_is_stored(db, options, expected):
    with connect(db) as su:
        user = add_user(su)
        args = "".join(f", {name} => %({name})s" for name in options)
        for function in ("mk_issue_key", "mk_rotate_key"):
            sql = f"SELECT * FROM {function}(%(user)s{args})"
            assert sqlstate_of(su, sql, {"user": user, **options}) == expected, (function, options)
        assert su.execute("SELECT count(*) FROM api_keys WHERE user_id = %s", (user,)).fetchone()[0] == 0


# ---------------------------------------------------------------- events

def test_the_usage_event_is_sent_at_commit_once_per_crossing_and_never_after_a_rollback(db):
    with connect(db) as su, connect(db) as listener, connect(db, autocommit=False) as app:
        listener.execute(f"LISTEN {USAGE}")
        user = add_user(su)
        key_id, key = issue(su, user, credits=2)
        assert verify(app, key) == user
        app.commit()
        assert usage_events(listener, 0) == []  # one left: no event
        assert verify(app, key) == user
        assert usage_events(listener, 0) == []  # not before the commit
        app.rollback()
        assert usage_events(listener, 0) == []  # nor after a rollback
        assert credits_of(su, key_id) == 1
        assert verify(app, key) == user
        app.commit()
        assert usage_events(listener, 1) == [str(key_id)]
        assert verify(app, key) is None  # usage_exceeded: no second event
        app.commit()
        assert usage_events(listener, 0) == []


# ---------------------------------------------------------------- rotation

def test_a_rotation_moves_the_remaining_credits_and_the_old_key_keeps_none(db):
    """A rotation is never a way to get fresh credits: the new key gets what
    was left and the same refill schedule; the old key, in its grace
    period, still authenticates a peek but can spend nothing, and never
    refills."""
    with connect(db) as su:
        user = add_user(su)
        old_id, old = issue(su, user, credits=10, refill_amount=10, refill_every="1 day")
        assert verify(su, old, 3) == user
        schedule = su.execute("SELECT refilled_at FROM api_keys WHERE id = %s", (old_id,)).fetchone()[0]
        new_id, new = su.execute("SELECT id, key FROM mk_rotate_key(%s, grace => '1 hour')", (user,)).fetchone()
        rows = {r[0]: r[1:] for r in su.execute(
            "SELECT id, credits, refill_amount, refill_every, refilled_at FROM api_keys WHERE user_id = %s",
            (user,)).fetchall()}
        assert rows[new_id][:2] == (7, 10) and rows[new_id][3] == schedule
        assert rows[old_id] == (0, None, None, None)
        d = detail(su, old, 1)
        assert (d["status"], d["credits"]) == ("usage_exceeded", 0)
        assert detail(su, old, 0)["status"] == "valid"
        assert verify(su, new, 7) == user
        # Credits given to the rotation replace what would move.
        fresh_id, _ = su.execute("SELECT id, key FROM mk_rotate_key(%s, credits => 3)", (user,)).fetchone()
        assert su.execute("SELECT credits, refill_amount FROM api_keys WHERE id = %s", (fresh_id,)
                          ).fetchone() == (3, None)


# ---------------------------------------------------------------- issuing over an expired key

def test_issuing_over_an_expired_active_key_ends_it_and_announces_it(db):
    with connect(db) as su, connect(db) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        user, live_user = add_user(su), add_user(su)
        old_id, _ = issue(su, user, expires_in="1 second")
        expires_at = su.execute("SELECT expires_at FROM api_keys WHERE id = %s", (old_id,)).fetchone()[0]
        wait_until_past(su, expires_at)
        new_id, new = issue(su, user)
        assert su.execute("SELECT revoked_at FROM api_keys WHERE id = %s", (old_id,)).fetchone()[0] == expires_at
        assert payloads(notifications(listener, 1)) == [str(old_id)]
        assert su.execute("SELECT mk_verify(%s)", (new,)).fetchone()[0] == user
        # A live active key still answers 23505, and nothing changes.
        issue(su, live_user, expires_in="1 hour")
        assert sqlstate_of(su, "SELECT mk_issue_key(%s)", (live_user,)) == "23505"
        assert sqlstate_of(su, "SELECT mk_issue_key(%s)", (user,)) == "23505"
        assert payloads(notifications(listener, 0)) == []


def test_two_issues_over_one_expired_key_race_to_one_new_key(db):
    with connect(db) as su, connect(db) as listener, connect(db, autocommit=False) as first:
        listener.execute(f"LISTEN {CHANNEL}")
        user = add_user(su)
        old_id, _ = issue(su, user, expires_in="1 second")
        wait_until_past(su, su.execute("SELECT expires_at FROM api_keys WHERE id = %s", (old_id,)).fetchone()[0])
        issue(first, user)  # ends the old key, holds its row and the new key's index entry
        result = {}

        def second():
            with connect(db) as conn:
                result["state"] = sqlstate_of(conn, "SELECT mk_issue_key(%s)", (user,))

        racing = threading.Thread(target=second)
        racing.start()
        time.sleep(0.3)
        assert racing.is_alive(), "the second issue did not wait for the first"
        first.commit()
        racing.join(10)
        assert result["state"] == "23505"
        assert su.execute("SELECT count(*) FROM api_keys WHERE user_id = %s AND revoked_at IS NULL",
                          (user,)).fetchone()[0] == 1
        assert payloads(notifications(listener, 1)) == [str(old_id)]


# ---------------------------------------------------------------- update from 0.2.1

OLD_GRANTS = ("GRANT EXECUTE ON FUNCTION mk_verify(text), mk_verify(text, text[]) TO \"{verifier}\";"
              " GRANT EXECUTE ON FUNCTION mk_verify_detail(text), mk_verify_detail(text, text[]),"
              " mk_issue_key(uuid, text, interval, text[], jsonb),"
              " mk_rotate_key(uuid, text, interval, text[], jsonb, interval), mk_revoke(uuid) TO \"{admin}\"")
NEW_GRANTS = ("GRANT EXECUTE ON FUNCTION mk_verify(text, text[], integer) TO \"{verifier}\";"
              " GRANT EXECUTE ON FUNCTION mk_verify(text, text[], integer),"
              " mk_verify_detail(text, text[], integer),"
              " mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval),"
              " mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval),"
              " mk_revoke(uuid) TO \"{admin}\"")


def test_update_from_0_2_1_keeps_every_key_and_grant_and_equals_a_fresh_install(role, new_db):
    verifier, admin = role("verifier"), role("admin")
    updated, fresh = new_db(), new_db()
    with connect(updated) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.2.1'")
        assert extversion(su) == "0.2.1"
        su.execute(OLD_GRANTS.format(verifier=verifier, admin=admin))
        # The admin of 0.2.x could also verify: the verify grant goes to
        # both, as it would on a fresh install with the README's recipes.
        su.execute(f'GRANT EXECUTE ON FUNCTION mk_verify(text) TO "{admin}"')
        plain_user, scoped_user, rotated_user, revoked_user, spare = (add_user(su) for _ in range(5))
        keys = {"plain": su.execute("SELECT key FROM mk_issue_key(%s)", (plain_user,)).fetchone()[0],
                "scoped": su.execute("SELECT key FROM mk_issue_key(%s, expires_in => '30 days',"
                                     " scopes => '{read}')", (scoped_user,)).fetchone()[0],
                "in grace": su.execute("SELECT key FROM mk_issue_key(%s)", (rotated_user,)).fetchone()[0]}
        keys["rotated"] = su.execute("SELECT key FROM mk_rotate_key(%s, grace => '1 day')",
                                     (rotated_user,)).fetchone()[0]
        keys["revoked"] = su.execute("SELECT key FROM mk_issue_key(%s)", (revoked_user,)).fetchone()[0]
        su.execute("SELECT mk_revoke_user_keys(%s)", (revoked_user,))

        def answers():
            return {name: (su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0],
                           su.execute("SELECT mk_verify(%s, '{read}')", (key,)).fetchone()[0],
                           su.execute("SELECT * FROM mk_verify_detail(%s, '{read}')", (key,)).fetchone()[:9])
                    for name, key in keys.items()}

        before, rows = answers(), su.execute(EVERY_ROW_BEFORE_0_3_0).fetchall()
        su.execute("ALTER EXTENSION makima_keys UPDATE")
        assert extversion(su) == CURRENT_VERSION
        assert answers() == before
        assert su.execute(EVERY_ROW_BEFORE_0_3_0).fetchall() == rows
        assert su.execute("SELECT count(*) FROM api_keys WHERE credits IS NOT NULL").fetchone()[0] == 0
        for who, signature, allowed in [
                (verifier, "mk_verify(text, text[], integer)", True),
                (verifier, "mk_verify_detail(text, text[], integer)", False),
                (verifier, "mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval)", False),
                (admin, "mk_verify_detail(text, text[], integer)", True),
                (admin, "mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval)", True),
                (admin, "mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval)",
                 True)]:
            assert su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                              (who, signature)).fetchone()[0] is allowed, (who, signature)
    with connect(updated, user=admin) as conn:
        key = conn.execute("SELECT key FROM mk_issue_key(%s, credits => 1)", (spare,)).fetchone()[0]
    with connect(updated, user=verifier) as conn:
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == spare
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
    with connect(fresh) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys")
        su.execute(NEW_GRANTS.format(verifier=verifier, admin=admin))
    with connect(updated) as a, connect(fresh) as b:
        assert_same_catalog(catalog(a), catalog(b))
        assert a.execute(INIT_PRIVS).fetchall() == b.execute(INIT_PRIVS).fetchall()


def test_the_0_3_0_library_serves_a_database_still_at_0_2_1(role, new_db):
    """Between installing the package and ALTER EXTENSION UPDATE, the 0.2.1
    functions answer as 0.2.1 did: one-argument and scoped forms, nine
    detail columns, 23505 over an expired active key."""
    name = new_db()
    with connect(name) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.2.1'")
        user, other = add_user(su), add_user(su)
        key = su.execute("SELECT key FROM mk_issue_key(%s, scopes => '{read}')", (user,)).fetchone()[0]
        assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert su.execute("SELECT mk_verify(%s, '{write}')", (key,)).fetchone()[0] is None
        cur = su.execute("SELECT * FROM mk_verify_detail(%s, '{read}')", (key,))
        assert [c.name for c in cur.description] == DETAIL_COLUMNS[:9]
        assert cur.fetchone()[0] == "valid"
        expiring = su.execute("SELECT id FROM mk_issue_key(%s, expires_in => '1 second')", (other,)).fetchone()[0]
        wait_until_past(su, su.execute("SELECT expires_at FROM api_keys WHERE id = %s",
                                       (expiring,)).fetchone()[0])
        assert sqlstate_of(su, "SELECT mk_issue_key(%s)", (other,)) == "23505"
        rotated = su.execute("SELECT key FROM mk_rotate_key(%s)", (user,)).fetchone()[0]
        assert su.execute("SELECT mk_verify(%s, '{read}')", (rotated,)).fetchone()[0] == user


def test_the_update_refuses_a_function_of_our_names_that_is_not_ours(new_db):
    """With one defaulted mk_verify, a planted mk_verify(text) would win every
    one-argument call; the update refuses it (42723) and changes nothing."""
    name = new_db()
    with connect(name) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.2.1'")
        su.execute("CREATE FUNCTION mk_verify(text, integer) RETURNS uuid LANGUAGE sql AS $$SELECT NULL::uuid$$")
        assert sqlstate_of(su, "ALTER EXTENSION makima_keys UPDATE") == "42723"
        assert extversion(su) == "0.2.1"


def test_a_rotation_with_no_active_key_inherits_from_the_latest_key(db):
    """Revoked (by a leak scanner, say) and then rotated, a key with credits
    and scopes does not come back unlimited: the rotation takes what the
    user's latest key held."""
    with connect(db) as su:
        user = add_user(su)
        key_id, key = issue(su, user, credits=10, refill_amount=10, refill_every="1 day", scopes=["read"])
        assert verify(su, key, 4) == user
        assert su.execute("SELECT mk_revoke_key(%s)", (key,)).fetchone()[0] is True
        new_id, new = su.execute("SELECT id, key FROM mk_rotate_key(%s)", (user,)).fetchone()
        assert su.execute("SELECT credits, refill_amount, scopes FROM api_keys WHERE id = %s",
                          (new_id,)).fetchone() == (6, 10, ["read"])
        # Rotated with a grace period, then the new key revoked: rotating again
        # finds no active key, and the latest key's remaining credits move on.
        grace_id, _ = su.execute("SELECT id, key FROM mk_rotate_key(%s, grace => '1 hour')", (user,)).fetchone()
        su.execute("SELECT mk_revoke(%s)", (grace_id,))
        last_id, last = su.execute("SELECT id, key FROM mk_rotate_key(%s)", (user,)).fetchone()
        assert credits_of(su, last_id) == 6
        assert detail(su, last, 7)["status"] == "usage_exceeded"


def test_the_update_refuses_credit_columns_of_the_applications_own(new_db):
    """A nullable `credits integer` that already holds values is the
    application's (a balance, say): the update refuses it (42P16) instead of
    spending it, and the 0.3.0 library's 0.2.x functions never spend it."""
    name = new_db()
    with connect(name) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.2.1'")
        user = add_user(su)
        key_id, key = su.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
        su.execute("ALTER TABLE api_keys ADD COLUMN credits integer")
        su.execute("UPDATE api_keys SET credits = 1")
        for _ in range(3):
            assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert credits_of(su, key_id) == 1
        assert sqlstate_of(su, "ALTER EXTENSION makima_keys UPDATE") == "42P16"
        assert extversion(su) == "0.2.1"
        # Empty, the same column is taken over.
        su.execute("UPDATE api_keys SET credits = NULL")
        su.execute("ALTER EXTENSION makima_keys UPDATE")
        assert extversion(su) == CURRENT_VERSION
        assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
