"""The five attacks of the 0.2.0 adversarial review, each replayed as it was
reported: locks held by others, open transactions, snapshots of long
transactions, renamed schemas, and adopted tables that carry code.
Every test here failed on the code before the fix."""

import psycopg
import pytest

from conftest import add_user, connect, sqlstate_of
from test_last_used import issue, last_used
from test_privileges_and_races import readme_recipe



@pytest.fixture
def verifier(db, role):
    """A role with exactly the README's verify-only grants in `db`."""
    name = role("verifier")
    with connect(db) as su:
        su.execute(readme_recipe("verify-only", app=name))
    return name


def parallel_mode_setting(conn):
    """The setting that runs every parallel-safe query in a worker: renamed in 16."""
    for name in ("debug_parallel_query", "force_parallel_mode"):
        if conn.execute("SELECT count(*) FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]:
            return name
    raise AssertionError("no setting forces parallel mode")


def create_parallel_safe_wrapper(conn):
    """wrapped_verify(k): mk_verify behind a wrapper wrongly marked PARALLEL
    SAFE; plpgsql, so that it is not inlined."""
    conn.execute("""CREATE FUNCTION wrapped_verify(k text) RETURNS uuid LANGUAGE plpgsql
                    PARALLEL SAFE AS $$ BEGIN RETURN mk_verify(k); END $$""")


# ---- 1. a verification never waits for a lock, and never raises under lock_timeout


def test_verify_answers_at_once_while_the_table_is_share_locked(db, verifier):
    with connect(db) as su, connect(db, autocommit=False) as ddl, connect(db, user=verifier) as app:
        user, key_id, key = issue(su)
        # What a plain CREATE INDEX holds for its whole build.
        ddl.execute("LOCK TABLE api_keys IN SHARE MODE")
        app.execute("SET lock_timeout = '1s'")
        app.execute("SET makima_keys.last_used_interval = 0")
        # The write is due; before the fix this raised 55P03 after 1 s.
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert app.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "valid"
        ddl.rollback()
        assert last_used(su, key_id) is None, "the write is skipped, not queued"
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert last_used(su, key_id) is not None


def test_verify_answers_at_once_while_an_index_of_the_table_is_locked(db, verifier):
    with connect(db) as su, connect(db, autocommit=False) as ddl, connect(db, user=verifier) as app:
        user, key_id, key = issue(su)
        # An ACCESS EXCLUSIVE lock on one index only (not the one verification probes).
        ddl.execute("ALTER INDEX idx_api_keys_key_prefix SET TABLESPACE pg_default")
        assert ddl.execute(
            """SELECT mode FROM pg_locks WHERE relation = 'idx_api_keys_key_prefix'::regclass
                AND pid = pg_backend_pid()""").fetchone()[0] == "AccessExclusiveLock"
        app.execute("SET lock_timeout = '1s'")
        app.execute("SET makima_keys.last_used_interval = 0")
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        ddl.rollback()
        assert last_used(su, key_id) is None


def test_a_parallel_safe_wrapper_verifies_in_a_worker_without_writing(db):
    with connect(db) as su:
        user, key_id, key = issue(su)
        create_parallel_safe_wrapper(su)
        su.execute("SET makima_keys.last_used_interval = 0")
        su.execute(f"SET {parallel_mode_setting(su)} = on")
        plan = "\n".join(r[0] for r in su.execute("EXPLAIN (COSTS OFF) SELECT wrapped_verify(%s)", (key,)))
        assert "Gather" in plan, plan
        # Before the fix: XX000 "cannot assign XIDs during a parallel operation".
        assert su.execute("SELECT wrapped_verify(%s)", (key,)).fetchone()[0] == user
        assert su.execute("SELECT wrapped_verify(%s)", ("mk_" + "x" * 49,)).fetchone()[0] is None
        su.execute("RESET ALL")
        assert last_used(su, key_id) is None


# ---- 2. an open transaction that verified a key never delays its revocation


REVOCATIONS = {
    "mk_revoke": "SELECT mk_revoke(%(id)s)",
    "mk_revoke_key": "SELECT mk_revoke_key(%(key)s)",
    "mk_revoke_user_keys": "SELECT mk_revoke_user_keys(%(user)s)",
    "mk_rotate_key": "SELECT key FROM mk_rotate_key(%(user)s)",
}


@pytest.mark.parametrize("revocation", sorted(REVOCATIONS))
def test_a_verifier_holding_its_transaction_open_does_not_block_revocation(db, verifier, revocation):
    with connect(db) as su, connect(db, user=verifier, autocommit=False) as app:
        user, key_id, key = issue(su)
        app.execute("SET makima_keys.last_used_interval = 0")
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user  # stays open
        su.execute("SET lock_timeout = '2s'")
        # Before the fix: 55P03, and the key kept verifying meanwhile.
        su.execute(REVOCATIONS[revocation], {"id": key_id, "key": key, "user": user})
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
        app.commit()
        assert last_used(su, key_id) is None


def test_last_used_at_is_written_by_autocommit_verifications_only(db, verifier):
    with connect(db) as su, connect(db, user=verifier) as app:
        user, key_id, key = issue(su)
        app.execute("SET makima_keys.last_used_interval = 0")
        # Inside a transaction block: never written.
        app.execute("BEGIN")
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        app.execute("COMMIT")
        assert last_used(su, key_id) is None
        # Several statements in one query string form one transaction too.
        # (The key is spliced into the text here only because the simple
        # query protocol takes no parameters; applications must bind it.)
        app.execute(f"SELECT mk_verify('{key}'); SELECT 1".encode(), prepare=False)
        assert last_used(su, key_id) is None
        # Alone in its transaction: written.
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert last_used(su, key_id) is not None


# ---- 3. a revocation counts at once inside REPEATABLE READ and SERIALIZABLE


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_long_transaction_sees_a_revocation_committed_after_it_began(db, verifier, isolation):
    with connect(db) as su, connect(db, user=verifier) as app:
        user, key_id, key = issue(su)
        app.execute(f"BEGIN ISOLATION LEVEL {isolation}")
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert su.execute("SELECT mk_revoke(%s)", (key_id,)).fetchone()[0] is True
        # Before the fix: still the user, and 'valid' with revoked_at NULL.
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
        status, revoked_at = app.execute(
            "SELECT status, revoked_at FROM mk_verify_detail(%s)", (key,)).fetchone()
        assert status == "revoked" and revoked_at is not None
        app.execute("COMMIT")


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_long_transaction_sees_a_rotation_committed_after_it_began(db, verifier, isolation):
    with connect(db) as su, connect(db, user=verifier) as app:
        user, key_id, old_key = issue(su)
        app.execute(f"BEGIN ISOLATION LEVEL {isolation}")
        assert app.execute("SELECT mk_verify(%s)", (old_key,)).fetchone()[0] == user
        new_key = su.execute("SELECT key FROM mk_rotate_key(%s)", (user,)).fetchone()[0]
        assert app.execute("SELECT mk_verify(%s)", (old_key,)).fetchone()[0] is None
        assert app.execute("SELECT mk_verify(%s)", (new_key,)).fetchone()[0] == user
        app.execute("COMMIT")


@pytest.mark.parametrize("isolation", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_a_transaction_sees_its_own_uncommitted_issues_and_revokes(db, isolation):
    with connect(db) as su:
        user = add_user(su)
        su.execute(f"BEGIN ISOLATION LEVEL {isolation}")
        key_id, key = su.execute("SELECT id, key FROM mk_issue_key(%s)", (user,)).fetchone()
        assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        su.execute("SELECT mk_revoke(%s)", (key_id,))
        assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
        assert su.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "revoked"
        su.execute("ROLLBACK")
        with connect(db) as other:
            assert other.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
            assert other.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "not_found"


def test_the_sql_fallback_reads_with_the_same_fresh_snapshot(db, verifier):
    with connect(db) as su, connect(db, user=verifier) as app:
        user, key_id, key = issue(su)
        su.execute("DROP INDEX idx_api_keys_key_hash_unique")
        app.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        su.execute("SELECT mk_revoke(%s)", (key_id,))
        assert app.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None
        assert app.execute("SELECT status FROM mk_verify_detail(%s)", (key,)).fetchone()[0] == "revoked"
        app.execute("COMMIT")


def test_a_parallel_worker_verifies_inside_a_repeatable_read_transaction(db):
    with connect(db) as su:
        user, key_id, key = issue(su)
        create_parallel_safe_wrapper(su)
        su.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        su.execute(f"SET LOCAL {parallel_mode_setting(su)} = on")
        # GetLatestSnapshot() raises in parallel mode: the query's snapshot serves.
        assert su.execute("SELECT wrapped_verify(%s)", (key,)).fetchone()[0] == user
        su.execute("COMMIT")


# ---- 4. kept plans follow the schema, never its old name


@pytest.fixture
def keys_schema_db(role, new_db):
    """A database owned by a non-superuser, with the extension in schema
    `keys` (no users table, so no foreign key), and a verify-only role."""
    owner = role("dbowner")
    verifier = role("verifier")
    name = new_db(owner=owner)
    with connect(name) as su:
        su.execute("CREATE SCHEMA keys")
        su.execute("CREATE EXTENSION makima_keys SCHEMA keys")
        su.execute(f'GRANT USAGE ON SCHEMA keys TO "{verifier}"')
        su.execute(f'GRANT EXECUTE ON FUNCTION keys.mk_verify(text, text[], integer) TO "{verifier}"')
    return name, owner, verifier


def plant_look_alike(db, owner, schema):
    """As the database owner (not a superuser): a schema with our old name, an
    api_keys of the same shape, and a statement trigger recording who ran it."""
    with connect(db, user=owner) as attacker:
        attacker.execute(f"CREATE SCHEMA {schema}")
        attacker.execute(f"""
            CREATE TABLE {schema}.api_keys (
                id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
                key_hash varchar(64) NOT NULL, key_prefix varchar(16) NOT NULL, name varchar(255),
                last_used_at timestamptz, created_at timestamptz NOT NULL DEFAULT now(),
                revoked_at timestamptz, expires_at timestamptz, scopes text[], metadata jsonb,
                credits integer, refill_amount integer, refill_every interval, refilled_at timestamptz,
                rate_limit integer, rate_period interval);
            CREATE TABLE {schema}.spied (who text);
            GRANT INSERT ON {schema}.spied TO PUBLIC;
            GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
            GRANT ALL ON {schema}.api_keys TO PUBLIC;
            CREATE FUNCTION {schema}.spy() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO {schema}.spied VALUES (current_user); RETURN NULL; END $$;
            CREATE TRIGGER spy AFTER INSERT OR UPDATE ON {schema}.api_keys
                FOR EACH STATEMENT EXECUTE FUNCTION {schema}.spy()""")


def test_sessions_keep_working_after_the_schema_is_renamed(keys_schema_db):
    db, owner, verifier = keys_schema_db
    with connect(db) as admin, connect(db, user=verifier) as app:
        app.execute("SET makima_keys.last_used_interval = 0")
        user = "5b8e2c4e-0d9f-4f53-9a43-8d1b2f7c6a10"
        key_id, key = admin.execute("SELECT id, key FROM keys.mk_issue_key(%s)", (user,)).fetchone()
        assert str(app.execute("SELECT keys.mk_verify(%s)", (key,)).fetchone()[0]) == user
        # Both long-lived sessions now hold kept plans naming keys.api_keys.
        with connect(db) as trusted_owner:
            trusted_owner.execute("ALTER SCHEMA keys RENAME TO keys2")
            trusted_owner.execute("ANALYZE keys2.api_keys")
        plant_look_alike(db, owner, "keys")
        admin.execute("UPDATE keys2.api_keys SET last_used_at = NULL")
        # Before the fix: 42P01 here, or (with the planted schema) rows and
        # triggers in the attacker's table, run as the extension owner.
        assert str(app.execute("SELECT keys2.mk_verify(%s)", (key,)).fetchone()[0]) == user
        assert admin.execute("SELECT last_used_at IS NOT NULL FROM keys2.api_keys WHERE id = %s",
                             (key_id,)).fetchone()[0]
        other = "6c9f3d5f-1e0a-4a64-8b54-9e2c3f8d7b21"
        new_key = admin.execute("SELECT key FROM keys2.mk_issue_key(%s)", (other,)).fetchone()[0]
        assert str(app.execute("SELECT keys2.mk_verify(%s)", (new_key,)).fetchone()[0]) == other
        assert admin.execute("SELECT count(*) FROM keys2.api_keys").fetchone()[0] == 2
        assert admin.execute("SELECT count(*) FROM keys.api_keys").fetchone()[0] == 0
        assert admin.execute("SELECT count(*) FROM keys.spied").fetchone()[0] == 0


def test_a_kept_plan_never_runs_against_a_table_planted_under_the_old_name(keys_schema_db):
    """The race the per-schema re-preparation cannot close alone: a
    transaction that began before the rename replans our kept INSERT from
    its text. The analysis hook refuses it before anything runs."""
    db, owner, _ = keys_schema_db
    with connect(db, autocommit=False) as admin:
        user = "5b8e2c4e-0d9f-4f53-9a43-8d1b2f7c6a10"
        # The top-level statement holds our function by oid, so running it
        # later looks up no schema by name.
        admin.execute("PREPARE issue_for(uuid) AS SELECT key FROM keys.mk_issue_key($1)")
        admin.execute(f"EXECUTE issue_for('{user}')")
        admin.commit()
        admin.execute("SELECT 1")  # a transaction that began before the rename
        with connect(db) as trusted_owner:
            trusted_owner.execute("ALTER SCHEMA keys RENAME TO keys2")
        plant_look_alike(db, owner, "keys")
        with connect(db) as trusted_owner:
            trusted_owner.execute("ANALYZE keys2.api_keys")
        other = "6c9f3d5f-1e0a-4a64-8b54-9e2c3f8d7b21"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            admin.execute(f"EXECUTE issue_for('{other}')")
        assert "other than the extension's api_keys" in err.value.diag.message_primary
        admin.rollback()
        # The next transaction prepares our statement for the new name.
        assert admin.execute("SELECT key FROM keys2.mk_issue_key(%s)", (other,)).fetchone()[0].startswith("mk_")
        admin.commit()
    with connect(db) as su:
        assert su.execute("SELECT count(*) FROM keys2.api_keys").fetchone()[0] == 2
        assert su.execute("SELECT count(*) FROM keys.api_keys").fetchone()[0] == 0
        assert su.execute("SELECT count(*) FROM keys.spied").fetchone()[0] == 0


# ---- 5. adoption refuses a table that carries code, and owners the threat model does not trust


SPY_FUNCTIONS = """
    CREATE TABLE spied (who text);
    GRANT INSERT ON spied TO PUBLIC;
    CREATE FUNCTION spy() RETURNS int LANGUAGE plpgsql AS
        $$ BEGIN INSERT INTO spied VALUES (current_user); RETURN 0; END $$;
    CREATE FUNCTION spy_bool(text) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$ SELECT true $$;
    CREATE FUNCTION spy_int(int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT $1 $$;
"""

CODE_CARRIERS = {
    "default": "ALTER TABLE api_keys ADD COLUMN extra int DEFAULT spy()",
    "check": "ALTER TABLE api_keys ADD CONSTRAINT looks_fine CHECK (spy_bool(name))",
    "expression index": "CREATE INDEX ON api_keys ((spy_bool(name)))",
    "partial index": "CREATE INDEX ON api_keys (name) WHERE spy_bool(name)",
    "generated column": "ALTER TABLE api_keys ADD COLUMN g int GENERATED ALWAYS AS (spy_int(1)) STORED",
    "domain column": "CREATE DOMAIN checked_int AS int CHECK (spy_bool(VALUE::text));"
                     " ALTER TABLE api_keys ADD COLUMN d checked_int",
    "collation": "ALTER TABLE api_keys ADD COLUMN label text COLLATE \"C\"",
    "operator class": "CREATE INDEX ON api_keys (name text_pattern_ops)",
    "expression statistics": "CREATE STATISTICS exprs ON (spy_bool(name)), key_prefix FROM api_keys",
    "policy": "CREATE POLICY watch ON api_keys USING (spy_bool(name))",
    "foreign key": "CREATE TABLE teams (id uuid PRIMARY KEY);"
                   " ALTER TABLE api_keys ADD COLUMN team uuid REFERENCES teams(id)",
    "seed index redefined": "DROP INDEX idx_api_keys_key_prefix;"
                            " CREATE INDEX idx_api_keys_key_prefix ON api_keys (key_prefix) WHERE spy_bool(name)",
}


def seed_as(db, user, extra_sql):
    from test_install import run_seed
    with connect(db, user=user) as conn:
        conn.execute(SPY_FUNCTIONS)
        run_seed(conn)
        conn.execute(extra_sql)


@pytest.mark.parametrize("carrier", sorted(CODE_CARRIERS))
def test_adoption_refuses_a_seed_table_that_carries_code(role, new_db, carrier):
    owner = role("dbowner")
    db = new_db(owner=owner)  # PostgreSQL 15's public: the database owner owns it
    seed_as(db, owner, CODE_CARRIERS[carrier])
    with connect(db) as su:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            su.execute("CREATE EXTENSION makima_keys")
        assert "code attached to it" in err.value.diag.message_primary
        assert su.execute("SELECT count(*) FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0] == 0
        assert su.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'api_keys'::regclass"
                          ).fetchone()[0] == owner
        assert su.execute("SELECT count(*) FROM spied").fetchone()[0] == 0


def test_adoption_accepts_plain_extra_columns_and_indexes(role, new_db):
    owner = role("dbowner")
    db = new_db(owner=owner)
    seed_as(db, owner, "ALTER TABLE api_keys ADD COLUMN note text, ADD COLUMN hits bigint;"
                       " CREATE INDEX ON api_keys (note)")
    with connect(db) as su:
        su.execute("CREATE EXTENSION makima_keys")
        user, _, key = issue(su)
        assert su.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user


def test_adoption_refuses_a_database_owner_who_does_not_own_the_schema(role, new_db):
    owner = role("dbowner")
    db = new_db(owner=owner)
    with connect(db) as su:
        # PostgreSQL 14's public: owned by the bootstrap superuser, CREATE for all.
        su.execute("ALTER SCHEMA public OWNER TO postgres")
        su.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    seed_as(db, owner, "SELECT 1")
    with connect(db) as su:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            su.execute("CREATE EXTENSION makima_keys")
        assert "refusing to adopt" in err.value.diag.message_primary
        assert su.execute("SELECT count(*) FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0] == 0


def test_unknown_settings_under_our_prefix_are_errors(db):
    with connect(db) as conn:
        conn.execute("SELECT mk_hash_key('x')")  # loads the library
        assert sqlstate_of(conn, "SET makima_keys.last_used_intervall = 5") == "42602"
        conn.execute("SET makima_keys.last_used_interval = 5")


def test_no_role_but_the_owner_can_attach_triggers_after_a_fresh_install(role, new_db):
    app = role("app")
    db = new_db()
    with connect(db) as su:
        # The installer's default privileges would hand TRIGGER on every new table to app.
        su.execute(f'ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO "{app}"')
        su.execute("CREATE EXTENSION makima_keys")
        held = su.execute("""SELECT array_agg(a.privilege_type::text ORDER BY a.privilege_type)
                               FROM pg_class c, aclexplode(c.relacl) a
                              WHERE c.oid = 'api_keys'::regclass AND a.grantee = %s::regrole""", (app,)).fetchone()[0]
        assert held == ["DELETE", "INSERT", "SELECT", "UPDATE"]
        su.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{app}"')
    with connect(db, user=app) as conn:
        conn.execute("""CREATE FUNCTION spy() RETURNS trigger LANGUAGE plpgsql AS
                        $$ BEGIN RAISE NOTICE 'spy ran as %', current_user; RETURN NEW; END $$""")
        assert sqlstate_of(conn, "CREATE TRIGGER spy BEFORE UPDATE ON api_keys"
                                 " FOR EACH ROW EXECUTE FUNCTION spy()") == "42501"


def test_adoption_keeps_no_grant_that_could_attach_code(role, new_db):
    owner, reader = role("dbowner"), role("reader")
    db = new_db(owner=owner)
    seed_as(db, owner, f'GRANT ALL ON api_keys TO "{reader}" WITH GRANT OPTION')
    with connect(db) as su:
        su.execute("CREATE EXTENSION makima_keys")
        held = dict(su.execute(
            """SELECT r.rolname, array_agg(a.privilege_type::text ORDER BY a.privilege_type)
                 FROM pg_class c, aclexplode(c.relacl) a JOIN pg_roles r ON r.oid = a.grantee
                WHERE c.oid = 'api_keys'::regclass AND a.grantee <> c.relowner GROUP BY 1""").fetchall())
    assert held[owner] == ["DELETE", "INSERT", "SELECT", "UPDATE"]
    assert held[reader] == ["DELETE", "INSERT", "SELECT", "UPDATE"]
