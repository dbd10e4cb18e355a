"""What only a client sees: privileges of other roles, and sessions racing."""

import re
import threading

import psycopg
import pytest

from conftest import REPO, add_user, connect, sqlstate_of


def readme_recipe(marker, **roles):
    """The SQL block that follows `<!-- recipe:MARKER -->` in the README, with
    its role names replaced: the test runs exactly what users are told to run."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- recipe:{marker} -->\s*```sql\n(.*?)```", text, re.S)
    assert match, f"README has no recipe {marker}"
    sql = match.group(1)
    for placeholder, actual in roles.items():
        sql = re.sub(rf"\b{placeholder}\b", f'"{actual}"', sql)
    return sql


CALLS = {
    "issue": "SELECT * FROM mk_issue_key(%(user_without_key)s)",
    "rotate": "SELECT * FROM mk_rotate_key(%(user)s)",
    "revoke": "SELECT mk_revoke(%(key_id)s)",
    "revoke_user_keys": "SELECT mk_revoke_user_keys(%(user)s)",
    "verify": "SELECT mk_verify(%(key)s)",
    "verify_detail": "SELECT * FROM mk_verify_detail(%(key)s)",
    "verify_scoped": "SELECT mk_verify(%(key)s, '{read}')",
    "verify_detail_scoped": "SELECT * FROM mk_verify_detail(%(key)s, '{read}')",
    "issue_with_options": "SELECT * FROM mk_issue_key(%(user_without_key)s, scopes => '{read}')",
    "rotate_with_grace": "SELECT * FROM mk_rotate_key(%(user)s, grace => '1 hour')",
    "revoke_key": "SELECT mk_revoke_key(%(key)s)",
    "list_keys": "SELECT id, key_prefix, status FROM mk_keys",
    "hash_key": "SELECT mk_hash_key(%(key)s)",
    "well_formed": "SELECT mk_key_is_well_formed(%(key)s)",
    "select_hash": "SELECT key_hash FROM api_keys",
    "select_listing": "SELECT id, key_prefix, name, last_used_at, revoked_at FROM api_keys",
    "update_table": "UPDATE api_keys SET revoked_at = NULL",
    "key_stats": "SELECT * FROM mk_key_stats",
    "key_stats_reset": "SELECT mk_key_stats_reset()",
}
# This suite's cluster does not preload makima_keys: a role allowed to read
# the statistics gets 55000 (no shared memory) instead of 42501. The
# preloaded answers are in test_shared_memory.py.
NOT_PRELOADED = {"key_stats": "55000", "key_stats_reset": "55000"}

ALLOWED = {
    # The extension's owner (the installing superuser) owns api_keys too.
    "table_owner": set(CALLS),
    "nobody": {"hash_key", "well_formed"},
    "verifier": {"hash_key", "well_formed", "verify", "verify_detail", "verify_scoped",
                 "verify_detail_scoped"},
    "scanner": {"hash_key", "well_formed", "revoke_key"},
    "admin": set(CALLS) - {"select_hash", "select_listing", "update_table"},
}


@pytest.mark.parametrize("who", sorted(ALLOWED))
def test_each_role_gets_exactly_its_documented_rights(role, db, who):
    verifier, admin, nobody = role("verifier"), role("admin"), role("nobody")
    scanner = role("scanner")
    with connect(db) as su:
        su.execute(readme_recipe("verify-only", app=verifier))
        su.execute(readme_recipe("admin", key_admin=admin))
        su.execute(readme_recipe("leak-scanner", secret_scanner=scanner))
        user, user_without_key = add_user(su), add_user(su)
        key_id, key = su.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
    params = {"user": user, "user_without_key": user_without_key, "key_id": key_id, "key": key}
    name = {"nobody": nobody, "verifier": verifier, "admin": admin, "scanner": scanner,
            "table_owner": "postgres"}[who]
    with connect(db, user=name) as conn:
        for call, sql in CALLS.items():
            # Each call in a transaction of its own, rolled back, so the
            # outcome of one does not change the next.
            conn.autocommit = False
            state = sqlstate_of(conn, sql, params)
            conn.rollback()
            conn.autocommit = True
            expected = NOT_PRELOADED.get(call) if call in ALLOWED[who] else "42501"
            assert state == expected, f"{who} {call}: {state}"


def test_verify_only_role_sees_the_user_and_nothing_else(role, db):
    app = role("app")
    with connect(db) as su:
        su.execute(readme_recipe("verify-only", app=app))
        user = add_user(su)
        key = su.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
    with connect(db, user=app) as conn:
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert conn.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "valid"


def issue_at_once(db, user, sessions):
    """`sessions` connections issue a key for one user at the same moment."""
    barrier = threading.Barrier(sessions)
    outcomes = [None] * sessions

    def worker(i):
        with connect(db) as conn:
            conn.execute("SET lock_timeout = '20s'")
            barrier.wait()
            try:
                outcomes[i] = ("key", conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0])
            except psycopg.Error as e:
                outcomes[i] = ("error", e.sqlstate, e.diag.message_primary)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_eight_sessions_issue_for_one_user_at_once(db):
    with connect(db) as su:
        for _ in range(10):
            user = add_user(su)
            outcomes = issue_at_once(db, user, 8)
            keys = [o[1] for o in outcomes if o[0] == "key"]
            errors = [o for o in outcomes if o[0] == "error"]
            assert len(keys) == 1, outcomes
            assert [e[1] for e in errors] == ["23505"] * 7, errors
            assert all(str(user) in e[2] for e in errors)
            assert su.execute("SELECT mk_verify(%s)", (keys[0],)).fetchone()[0] == user
            stored = su.execute("SELECT count(*) FROM api_keys WHERE user_id = %s", (user,)).fetchone()[0]
            assert stored == 1


def test_errors_leave_the_session_usable(db):
    with connect(db, autocommit=False) as conn:
        user = add_user(conn)
        conn.execute("SELECT mk_issue_key(%s)", (user,))
        conn.execute("SAVEPOINT before_duplicate")
        assert sqlstate_of(conn, "SELECT mk_issue_key(%s)", (user,)) == "23505"
        conn.execute("ROLLBACK TO SAVEPOINT before_duplicate")
        conn.commit()
        assert sqlstate_of(conn, "SELECT mk_revoke(gen_random_uuid())") == "P0002"
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM api_keys WHERE user_id = %s", (user,)).fetchone()[0] == 1
