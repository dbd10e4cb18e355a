"""CREATE EXTENSION on fresh databases, on databases where the makima
migration already ran, and against tables planted by another role."""

import hashlib

import psycopg
import pytest

from conftest import SEED, USERS_DDL, add_user, connect, sqlstate_of

# Everything of api_keys that the seed defines, read from the catalog.
SHAPE_QUERIES = {
    "columns": """
        SELECT attname, format_type(atttypid, atttypmod), attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
          FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE attrelid = 'public.api_keys'::regclass AND attnum > 0 AND NOT attisdropped
         ORDER BY attnum""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'public.api_keys'::regclass ORDER BY 1""",
    "constraints": """
        SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = 'public.api_keys'::regclass ORDER BY 1""",
    "comments": """
        SELECT objsubid, description FROM pg_description
         WHERE objoid = 'public.api_keys'::regclass ORDER BY 1""",
}


def shape(conn):
    return {k: conn.execute(q).fetchall() for k, q in SHAPE_QUERIES.items()}


def legacy_key_row(user_id, key, revoked=False):
    """A key inserted the way the makima application does it: SHA-256 hex."""
    return (
        user_id,
        hashlib.sha256(key.encode()).hexdigest(),
        key[:9],
        "legacy",
        "now()" if revoked else None,
    )


def run_seed(conn):
    conn.execute(USERS_DDL)
    conn.execute(SEED.read_text())


# What 0.2.0 adds to the seed's table, after its columns.
COLUMNS_0_2_0 = [
    ("expires_at", "timestamp with time zone", False, None),
    ("scopes", "text[]", False, None),
    ("metadata", "jsonb", False, None),
]
# And what 0.3.0 adds after those.
COLUMNS_0_3_0 = [
    ("credits", "integer", False, None),
    ("refill_amount", "integer", False, None),
    ("refill_every", "interval", False, None),
    ("refilled_at", "timestamp with time zone", False, None),
]
# And what 0.4.0 adds after those.
COLUMNS_0_4_0 = [
    ("rate_limit", "integer", False, None),
    ("rate_period", "interval", False, None),
]


def test_fresh_install_has_exactly_the_seed_schema_plus_two_indexes_and_nine_columns(new_db):
    seeded, installed = new_db(), new_db()
    with connect(seeded) as conn:
        run_seed(conn)
        expected = shape(conn)
    with connect(installed) as conn:
        conn.execute(USERS_DDL)
        conn.execute("CREATE EXTENSION makima_keys")
        actual = shape(conn)
    assert actual["columns"] == expected["columns"] + COLUMNS_0_2_0 + COLUMNS_0_3_0 + COLUMNS_0_4_0
    assert actual["constraints"] == expected["constraints"]
    seed_comments = len(expected["comments"])
    assert actual["comments"][:seed_comments] == expected["comments"]
    assert [c[0] for c in actual["comments"][seed_comments:]] == [9, 10, 11, 12, 13, 14, 15, 16, 17]
    ours = [("idx_api_keys_key_hash_unique",
             "CREATE UNIQUE INDEX idx_api_keys_key_hash_unique ON public.api_keys USING btree (key_hash)"),
            ("idx_api_keys_ends_at",
             "CREATE INDEX idx_api_keys_ends_at ON public.api_keys USING btree (LEAST(expires_at, revoked_at))"
             " WHERE ((expires_at IS NOT NULL) OR (revoked_at IS NOT NULL))")]
    assert actual["indexes"] == sorted(expected["indexes"] + ours)


def test_without_users_table_installs_with_a_notice_and_no_foreign_key(new_db):
    name = new_db()
    with connect(name) as conn:
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("CREATE EXTENSION makima_keys")
        assert any("no table public.users" in n and "no foreign key" in n for n in notices), notices
        fks = conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'api_keys'::regclass AND contype = 'f'"
        ).fetchone()[0]
        assert fks == 0
        # Any uuid may then hold a key.
        key = conn.execute("SELECT key FROM mk_issue_key(gen_random_uuid())").fetchone()[0]
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is not None


def test_with_users_table_unknown_users_get_23503_and_keys_cascade(db):
    with connect(db) as conn:
        assert sqlstate_of(conn, "SELECT mk_issue_key(gen_random_uuid())") == "23503"
        user = add_user(conn)
        key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        conn.execute("DELETE FROM users WHERE id = %s", (user,))
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 0
        assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] is None


def test_adopts_the_table_of_the_makima_migration_with_its_keys(role, new_db):
    app = role("makima_app")
    name = new_db(owner=app)
    legacy_active = "mk_legacyActiveKey1234"
    legacy_revoked = "some-other-format-key"
    with connect(name, user=app) as conn:
        run_seed(conn)
        alice, bob = add_user(conn, "alice@example.com"), add_user(conn, "bob@example.com")
        conn.cursor().executemany(
            "INSERT INTO api_keys (user_id, key_hash, key_prefix, name, revoked_at)"
            " VALUES (%s, %s, %s, %s, %s::timestamptz)",
            [legacy_key_row(alice, legacy_active), legacy_key_row(bob, legacy_revoked, revoked=True)],
        )
        before = conn.execute("SELECT * FROM api_keys ORDER BY id").fetchall()

    with connect(name) as su:
        notices = []
        su.add_notice_handler(lambda d: notices.append(d.message_primary))
        su.execute("CREATE EXTENSION makima_keys")
        assert any("adopted the existing table" in n for n in notices), notices
        assert su.execute("SELECT id, user_id, key_hash, key_prefix, name, last_used_at, created_at, revoked_at FROM api_keys ORDER BY id").fetchall() == before
        assert su.execute("SELECT mk_verify(%s)", (legacy_active,)).fetchone()[0] == alice
        assert su.execute("SELECT status FROM mk_verify_detail(%s)", (legacy_revoked,)).fetchone()[0] == "revoked"
        assert su.execute("SELECT mk_verify(%s)", (legacy_revoked,)).fetchone()[0] is None
        # The one-active-key rule covers the adopted rows too.
        assert sqlstate_of(su, "SELECT mk_issue_key(%s)", (alice,)) == "23505"
        new_key = su.execute("SELECT key FROM mk_issue_key(%s)", (bob,)).fetchone()[0]
        assert su.execute("SELECT mk_verify(%s)", (new_key,)).fetchone()[0] == bob
        # The extension owns the table now; the migration's foreign key stays.
        owner, member = su.execute(
            """SELECT pg_get_userbyid(c.relowner),
                      EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                               WHERE d.objid = c.oid AND d.deptype = 'e' AND e.extname = 'makima_keys')
                 FROM pg_class c WHERE c.oid = 'api_keys'::regclass"""
        ).fetchone()
        assert (owner, member) == ("postgres", True)
        su.execute("DELETE FROM users WHERE id = %s", (alice,))
        assert su.execute("SELECT mk_verify(%s)", (legacy_active,)).fetchone()[0] is None

    # The application that ran the migration keeps reading and writing its rows.
    with connect(name, user=app) as conn:
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 2
        conn.execute("UPDATE api_keys SET name = 'renamed' WHERE user_id = %s", (bob,))
        # but can no longer attach code that would run with the extension's rights.
        assert sqlstate_of(conn, "CREATE INDEX ON api_keys (name)") == "42501"


def test_refuses_an_api_keys_table_planted_by_another_role(planted):
    name = planted(SEED.read_text().replace("REFERENCES users(id) ON DELETE CASCADE", ""))
    with connect(name) as su:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            su.execute("CREATE EXTENSION makima_keys")
        assert "refusing to adopt" in err.value.diag.message_primary
        assert su.execute("SELECT count(*) FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0] == 0


def test_refuses_a_table_of_another_shape(new_db):
    name = new_db()
    with connect(name) as su:
        su.execute("CREATE TABLE api_keys (id uuid PRIMARY KEY, user_id uuid, key text)")
        assert sqlstate_of(su, "CREATE EXTENSION makima_keys") == "42P16"


def test_refuses_a_seed_table_with_a_trigger(new_db):
    name = new_db()
    with connect(name) as su:
        run_seed(su)
        su.execute(
            "CREATE FUNCTION spy() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;"
            "CREATE TRIGGER spy BEFORE INSERT ON api_keys FOR EACH ROW EXECUTE FUNCTION spy()"
        )
        assert sqlstate_of(su, "CREATE EXTENSION makima_keys") == "55000"


def test_refuses_a_non_utf8_database():
    name = "t_latin1_db"
    with connect("postgres") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        with connect(name) as conn:
            assert sqlstate_of(conn, "CREATE EXTENSION makima_keys") == "0A000"
    finally:
        with connect("postgres") as admin:
            admin.execute(f"DROP DATABASE {name}")


@pytest.mark.parametrize("schema", ["has space", "has$dollar"])
def test_installs_into_schemas_that_need_quoting(new_db, schema):
    name = new_db()
    with connect(name) as conn:
        quoted = '"' + schema + '"'
        conn.execute(f"CREATE SCHEMA {quoted}")
        conn.execute(f"CREATE TABLE {quoted}.users (id uuid PRIMARY KEY)")
        conn.execute(f"CREATE EXTENSION makima_keys SCHEMA {quoted}")
        user = conn.execute(f"INSERT INTO {quoted}.users VALUES (gen_random_uuid()) RETURNING id").fetchone()[0]
        key = conn.execute(f"SELECT key FROM {quoted}.mk_issue_key(%s)", (user,)).fetchone()[0]
        assert conn.execute(f"SELECT {quoted}.mk_verify(%s)", (key,)).fetchone()[0] == user
        assert sqlstate_of(conn, f"SELECT {quoted}.mk_issue_key(gen_random_uuid())") == "23503"
