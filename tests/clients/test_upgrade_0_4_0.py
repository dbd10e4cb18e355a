"""The update from 0.3.0 to 0.4.0 of a database holding keys, and the 0.4.0
library serving a database still at 0.3.0. The suite's cluster does not
preload makima_keys: what the update means with shared memory is in
test_shared_memory.py."""

from conftest import USERS_DDL, add_user, connect, sqlstate_of
from test_v020 import EVERY_ROW_BEFORE_0_4_0, INIT_PRIVS, assert_same_catalog, catalog, extversion

CURRENT_VERSION = "0.5.0"
ISSUE_0_3_0 = "mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval)"
ROTATE_0_3_0 = "mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval)"
ISSUE = "mk_issue_key(uuid, text, interval, text[], jsonb, integer, integer, interval, integer, interval)"
ROTATE = "mk_rotate_key(uuid, text, interval, text[], jsonb, interval, integer, integer, interval, integer, interval)"
VERIFY = "mk_verify(text, text[], integer)"
DETAIL = "mk_verify_detail(text, text[], integer)"
OLD_GRANTS = (f'GRANT EXECUTE ON FUNCTION {VERIFY} TO "{{verifier}}";'
              f' GRANT EXECUTE ON FUNCTION {VERIFY}, {DETAIL}, {ISSUE_0_3_0}, {ROTATE_0_3_0},'
              f' mk_revoke(uuid) TO "{{admin}}"; GRANT SELECT ON mk_keys TO "{{admin}}"')
NEW_GRANTS = (f'GRANT EXECUTE ON FUNCTION {VERIFY} TO "{{verifier}}";'
              f' GRANT EXECUTE ON FUNCTION {VERIFY}, {DETAIL}, {ISSUE}, {ROTATE},'
              f' mk_revoke(uuid) TO "{{admin}}"; GRANT SELECT ON mk_keys TO "{{admin}}"')


def keys_at_0_3_0(su):
    """One key of each kind 0.3.0 makes; returns {name: key}."""
    users = [add_user(su) for _ in range(6)]
    keys = {
        "plain": su.execute("SELECT key FROM mk_issue_key(%s)", (users[0],)).fetchone()[0],
        "scoped": su.execute("SELECT key FROM mk_issue_key(%s, expires_in => '30 days', scopes => '{read}',"
                             " metadata => '{\"t\": 1}')", (users[1],)).fetchone()[0],
        "credited": su.execute("SELECT key FROM mk_issue_key(%s, credits => 5, refill_amount => 5,"
                               " refill_every => '1 day')", (users[2],)).fetchone()[0],
        "in grace": su.execute("SELECT key FROM mk_issue_key(%s, credits => 3)", (users[3],)).fetchone()[0],
        "revoked": su.execute("SELECT key FROM mk_issue_key(%s)", (users[4],)).fetchone()[0],
    }
    keys["rotated"] = su.execute("SELECT key FROM mk_rotate_key(%s, grace => '1 day')", (users[3],)).fetchone()[0]
    su.execute("SELECT mk_revoke_user_keys(%s)", (users[4],))
    assert su.execute("SELECT mk_verify(%s, cost => 2)", (keys["credited"],)).fetchone()[0] == users[2]
    return keys, users[5]


def answers(su, keys):
    """What every key answers, with peeks (cost 0) so that asking spends nothing."""
    return {name: (su.execute("SELECT mk_verify(%s, cost => 0)", (key,)).fetchone()[0],
                   su.execute("SELECT mk_verify(%s, '{read}', 0)", (key,)).fetchone()[0],
                   su.execute("SELECT * FROM mk_verify_detail(%s, '{read}', 0)", (key,)).fetchone())
            for name, key in keys.items()}


def test_update_from_0_3_0_keeps_every_key_and_grant_and_equals_a_fresh_install(role, new_db):
    verifier, admin = role("verifier"), role("admin")
    updated, fresh = new_db(), new_db()
    with connect(updated) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.3.0'")
        assert extversion(su) == "0.3.0"
        su.execute(OLD_GRANTS.format(verifier=verifier, admin=admin))
        keys, spare = keys_at_0_3_0(su)
        before, rows = answers(su, keys), su.execute(EVERY_ROW_BEFORE_0_4_0).fetchall()
        su.execute("ALTER EXTENSION makima_keys UPDATE")
        assert extversion(su) == CURRENT_VERSION
        assert answers(su, keys) == before
        assert su.execute(EVERY_ROW_BEFORE_0_4_0).fetchall() == rows
        assert su.execute("SELECT count(*) FROM api_keys WHERE rate_limit IS NOT NULL OR rate_period IS NOT NULL"
                          ).fetchone()[0] == 0
        # A spending call after the update spends from where 0.3.0 left off.
        assert su.execute("SELECT credits FROM mk_verify_detail(%s)", (keys["credited"],)).fetchone()[0] == 2
        for who, signature, allowed in [
                (verifier, VERIFY, True), (verifier, DETAIL, False), (verifier, ISSUE, False),
                (admin, DETAIL, True), (admin, ISSUE, True), (admin, ROTATE, True),
                (admin, "mk_key_stats_rows()", False), (admin, "mk_key_stats_reset()", False)]:
            assert su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                              (who, signature)).fetchone()[0] is allowed, (who, signature)
        for signature in (ISSUE_0_3_0, ROTATE_0_3_0):
            assert su.execute("SELECT to_regprocedure(%s)", (signature,)).fetchone()[0] is None, signature
        assert su.execute("SELECT has_table_privilege('public', 'mk_key_stats', 'SELECT')").fetchone()[0] is False
    with connect(updated, user=admin) as conn:
        # The carried grant works; a rate limit needs shared memory, which
        # this cluster does not have.
        assert sqlstate_of(conn, "SELECT mk_issue_key(%s, rate_limit => 5, rate_period => '1 minute')",
                           (spare,)) == "55000"
        key = conn.execute("SELECT key FROM mk_issue_key(%s, credits => 1)", (spare,)).fetchone()[0]
        assert sqlstate_of(conn, "SELECT * FROM mk_key_stats") == "42501"
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


def test_the_0_4_0_library_serves_a_database_still_at_0_3_0_and_never_reads_its_rate_columns(new_db):
    """Before the update, columns named rate_limit and rate_period are the
    application's: the 0.3.0 entry points the library still exports never
    limit by them, and the update refuses them while they hold values
    (42P16); emptied, they are taken over."""
    name = new_db()
    with connect(name) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.3.0'")
        user = add_user(su)
        key = su.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
        su.execute("ALTER TABLE api_keys ADD COLUMN rate_limit integer, ADD COLUMN rate_period interval")
        su.execute("UPDATE api_keys SET rate_limit = 1, rate_period = '1 day'")
        for _ in range(3):
            assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        cur = su.execute("SELECT * FROM mk_verify_detail(%s)", (key,))
        assert cur.fetchone()[0] == "valid"
        assert sqlstate_of(su, "ALTER EXTENSION makima_keys UPDATE") == "42P16"
        assert extversion(su) == "0.3.0"
        su.execute("UPDATE api_keys SET rate_limit = NULL, rate_period = NULL")
        su.execute("ALTER EXTENSION makima_keys UPDATE")
        assert extversion(su) == CURRENT_VERSION
        assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user


def test_the_update_refuses_a_statistics_function_that_is_not_ours(new_db):
    """A function planted under one of the new names would be called by the
    admin recipe's grants and by the view: the update refuses it (42723)."""
    name = new_db()
    with connect(name) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.3.0'")
        su.execute("CREATE FUNCTION mk_key_stats_reset(integer) RETURNS void LANGUAGE sql AS ''")
        assert sqlstate_of(su, "ALTER EXTENSION makima_keys UPDATE") == "42723"
        assert extversion(su) == "0.3.0"


def test_default_privileges_of_the_installer_grant_nothing_of_ours(role, new_db):
    """The installing role's default privileges (ALTER DEFAULT PRIVILEGES
    ... GRANT EXECUTE ON FUNCTIONS, SELECT ON TABLES) give nobody our
    functions or views, on a fresh install or in an update: without that, a
    verify-only role could issue keys or read the statistics."""
    app = role("app")
    fresh, updated = new_db(), new_db()
    with connect(fresh) as su:
        su.execute(USERS_DDL)
        su.execute(f'ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO "{app}"')
        su.execute(f'ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO "{app}"')
        su.execute("CREATE EXTENSION makima_keys")
    with connect(updated) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.3.0'")
        su.execute(f'ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO "{app}"')
        su.execute(f'ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO "{app}"')
        su.execute("ALTER EXTENSION makima_keys UPDATE")
    for name, functions in ((fresh, [ISSUE, ROTATE, VERIFY, DETAIL, "mk_revoke(uuid)", "mk_key_stats_rows()",
                                     "mk_key_stats_reset()"]),
                            (updated, [ISSUE, ROTATE, "mk_key_stats_rows()", "mk_key_stats_reset()"])):
        with connect(name) as su:
            for signature in functions:
                assert su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                                  (app, signature)).fetchone()[0] is False, (name, signature)
            assert su.execute("SELECT has_table_privilege(%s, 'mk_key_stats', 'SELECT')",
                              (app,)).fetchone()[0] is False
        with connect(name, user=app) as conn:
            assert sqlstate_of(conn, "SELECT mk_issue_key(gen_random_uuid())") == "42501"
