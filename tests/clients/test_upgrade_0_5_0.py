"""The update from 0.4.0 to 0.5.0 of a database holding keys of every kind
0.4.0 makes, with the grants of every README recipe: answers, rows and
grants unchanged, catalog and initial privileges equal to a fresh install,
and mk_shared_status() callable by nobody until granted. The suite's
cluster does not preload makima_keys; test_shared_hardening.py has 0.5.0
with shared memory."""

from conftest import USERS_DDL, add_user, connect, sqlstate_of
from test_upgrade_0_4_0 import DETAIL, ISSUE, NEW_GRANTS, ROTATE, VERIFY
from test_v020 import INIT_PRIVS, assert_same_catalog, catalog, extversion

CURRENT_VERSION = "0.5.0"
EVERY_ROW = "SELECT to_jsonb(k)::text FROM api_keys k ORDER BY id"
STATS_GRANTS = 'GRANT EXECUTE ON FUNCTION mk_key_stats_rows(), mk_key_stats_reset() TO "{admin}";' \
               ' GRANT SELECT ON mk_key_stats TO "{admin}"'


def keys_at_0_4_0(su):
    """One key of each kind 0.4.0 makes on a server without preloading (a
    rate limit is set by hand, as a preloaded server would have stored it);
    returns ({name: key}, a user without a key)."""
    users = [add_user(su) for _ in range(8)]
    issue = "SELECT key FROM mk_issue_key(%s{})"
    keys = {
        "plain": su.execute(issue.format(""), (users[0],)).fetchone()[0],
        "scoped with metadata": su.execute(issue.format(", scopes => '{read}', metadata => '{\"t\": 1}'"),
                                           (users[1],)).fetchone()[0],
        "expiring": su.execute(issue.format(", expires_in => '30 days'"), (users[2],)).fetchone()[0],
        "credited with a refill": su.execute(issue.format(", credits => 5, refill_amount => 5,"
                                                          " refill_every => '1 day'"), (users[3],)).fetchone()[0],
        "in grace": su.execute(issue.format(""), (users[4],)).fetchone()[0],
        "revoked": su.execute(issue.format(""), (users[5],)).fetchone()[0],
        "rate-limited": su.execute(issue.format(""), (users[6],)).fetchone()[0],
    }
    keys["rotated"] = su.execute("SELECT key FROM mk_rotate_key(%s, grace => '1 day')", (users[4],)).fetchone()[0]
    su.execute("SELECT mk_revoke_user_keys(%s)", (users[5],))
    su.execute("UPDATE api_keys SET rate_limit = 5, rate_period = '1 minute' WHERE user_id = %s", (users[6],))
    assert su.execute("SELECT mk_verify(%s, cost => 2)", (keys["credited with a refill"],)).fetchone()[0] == users[3]
    return keys, users[7]


def answers(su, keys):
    """What every key answers, as peeks (cost 0) that spend nothing."""
    return {name: su.execute("SELECT * FROM mk_verify_detail(%s, '{read}', 0)", (key,)).fetchone()
            for name, key in keys.items()}


def test_update_from_0_4_0_keeps_every_key_and_grant_and_equals_a_fresh_install(role, new_db):
    verifier, admin, monitor = role("verifier"), role("admin"), role("monitor")
    updated, fresh = new_db(), new_db()
    with connect(updated) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.4.0'")
        assert extversion(su) == "0.4.0"
        su.execute(NEW_GRANTS.format(verifier=verifier, admin=admin))
        su.execute(STATS_GRANTS.format(admin=admin))
        keys, spare = keys_at_0_4_0(su)
        before, rows = answers(su, keys), su.execute(EVERY_ROW).fetchall()
        statuses = {name: row[0] for name, row in before.items()}
        assert (statuses["revoked"], statuses["scoped with metadata"], statuses["rate-limited"]) == (
            "revoked", "valid", "rate_limit_unavailable")  # no budget without preloading
        su.execute("ALTER EXTENSION makima_keys UPDATE")
        assert extversion(su) == CURRENT_VERSION
        assert answers(su, keys) == before
        assert su.execute(EVERY_ROW).fetchall() == rows
        for who, signature, allowed in [
                (verifier, VERIFY, True), (verifier, DETAIL, False), (verifier, ISSUE, False),
                (admin, DETAIL, True), (admin, ISSUE, True), (admin, ROTATE, True),
                (admin, "mk_key_stats_rows()", True), (admin, "mk_shared_status()", False),
                (monitor, "mk_shared_status()", False), ("public", "mk_shared_status()", False)]:
            assert su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')",
                              (who, signature)).fetchone()[0] is allowed, (who, signature)
        # Without preloading the new function raises 55000, like the statistics.
        assert sqlstate_of(su, "SELECT * FROM mk_shared_status()") == "55000"
    with connect(updated, user=admin) as conn:
        key = conn.execute("SELECT key FROM mk_issue_key(%s, credits => 1)", (spare,)).fetchone()[0]
    with connect(updated, user=verifier) as conn:
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == spare
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
    with connect(fresh) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys")
        su.execute(NEW_GRANTS.format(verifier=verifier, admin=admin))
        su.execute(STATS_GRANTS.format(admin=admin))
    with connect(updated) as a, connect(fresh) as b:
        assert_same_catalog(catalog(a), catalog(b))
        assert a.execute(INIT_PRIVS).fetchall() == b.execute(INIT_PRIVS).fetchall()


def test_the_update_refuses_a_status_function_that_is_not_ours(new_db):
    """A function planted under the new name would be called by the monitor
    recipe's grant: the update refuses it (42723) and stays at 0.4.0."""
    name = new_db()
    with connect(name) as su:
        su.execute(USERS_DDL)
        su.execute("CREATE EXTENSION makima_keys VERSION '0.4.0'")
        su.execute("CREATE FUNCTION mk_shared_status(integer) RETURNS void LANGUAGE sql AS ''")
        assert sqlstate_of(su, "ALTER EXTENSION makima_keys UPDATE") == "42723"
        assert extversion(su) == "0.4.0"
