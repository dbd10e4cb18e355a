"""Keys survive pg_dump and a restore into a fresh database."""

import os
import subprocess

import pytest

from conftest import add_user, connect, sqlstate_of


def pg_env():
    return {**os.environ, "PGHOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PGPORT": os.environ.get("PGPORT", "26329"), "PGUSER": os.environ.get("PGUSER", "postgres")}


def run(*args):
    subprocess.run(args, check=True, env=pg_env(), capture_output=True, text=True)


@pytest.mark.parametrize("fmt", ["plain", "custom"])
def test_every_key_verifies_after_dump_and_restore(db, new_db, tmp_path, fmt):
    with connect(db) as conn:
        users = [add_user(conn, f"u{i}@example.com") for i in range(20)]
        keys = {u: conn.execute("SELECT key FROM mk_issue_key(%s, 'k')", (u,)).fetchone()[0] for u in users}
        rotated_away = keys[users[0]]
        keys[users[0]] = conn.execute("SELECT key FROM mk_rotate_key(%s)", (users[0],)).fetchone()[0]
        conn.execute("SELECT mk_verify(%s)", (keys[users[1]],))  # sets last_used_at
        # 0.2.0 columns: scopes, metadata (numbers beyond double precision), expiry,
        # and a key in its grace period after a rotation.
        conn.execute("SELECT mk_revoke_user_keys(%s)", (users[3],))
        keys[users[3]] = conn.execute(
            "SELECT key FROM mk_issue_key(%s, expires_in => '1 day', scopes => '{read,write}',"
            " metadata => '{\"n\": 12345678901234567890.12345678901234567890}')", (users[3],)).fetchone()[0]
        in_grace = keys[users[4]]
        keys[users[4]] = conn.execute("SELECT key FROM mk_rotate_key(%s, grace => '1 day')",
                                      (users[4],)).fetchone()[0]
        before = conn.execute("SELECT * FROM api_keys ORDER BY id").fetchall()

    target = new_db()
    dump = tmp_path / "dump"
    if fmt == "plain":
        run("pg_dump", "-d", db, "-f", str(dump))
        run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target, "-f", str(dump))
    else:
        run("pg_dump", "-Fc", "-d", db, "-f", str(dump))
        run("pg_restore", "--exit-on-error", "-d", target, str(dump))

    with connect(target) as conn:
        assert conn.execute("SELECT * FROM api_keys ORDER BY id").fetchall() == before
        for user, key in keys.items():
            assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
        assert conn.execute("SELECT status FROM mk_verify_detail(%s)", (rotated_away,)).fetchone()[0] == "revoked"
        assert conn.execute("SELECT mk_verify(%s)", (in_grace,)).fetchone()[0] == users[4]
        assert conn.execute("SELECT mk_verify(%s, '{write}')", (keys[users[3]],)).fetchone()[0] == users[3]
        assert conn.execute("SELECT mk_verify(%s, '{admin}')", (keys[users[3]],)).fetchone()[0] is None
        # The rules come with the extension, not with the dump.
        assert conn.execute("SELECT count(*) FROM mk_revoke_user_keys(%s)", (users[2],)).fetchone()[0] == 1
        new_key = conn.execute("SELECT key FROM mk_issue_key(%s)", (users[2],)).fetchone()[0]
        assert conn.execute("SELECT mk_verify(%s)", (new_key,)).fetchone()[0] == users[2]
        # CREATE EXTENSION runs before the dump creates users, so the foreign
        # key comes back with the one call the README gives, once.
        fks = "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'api_keys'::regclass AND contype = 'f'"
        assert conn.execute(fks).fetchall() == []
        assert conn.execute("SELECT mk_restore_user_foreign_key()").fetchone()[0] is True
        assert conn.execute(fks).fetchall() == [("FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE",)]
        assert conn.execute("SELECT mk_restore_user_foreign_key()").fetchone()[0] is False
        conn.execute("DELETE FROM users WHERE id = %s", (users[5],))
        assert conn.execute("SELECT mk_verify(%s)", (keys[users[5]],)).fetchone()[0] is None


def test_restoring_the_foreign_key_fails_cleanly_without_users_or_with_orphan_keys(new_db):
    name = new_db()
    with connect(name) as conn:
        conn.execute("CREATE EXTENSION makima_keys")  # no users table: no foreign key
        assert sqlstate_of(conn, "SELECT mk_restore_user_foreign_key()") == "42P01"
        conn.execute("CREATE TABLE users (id uuid PRIMARY KEY)")
        orphan = conn.execute("SELECT gen_random_uuid()").fetchone()[0]
        conn.execute("SELECT mk_issue_key(%s)", (orphan,))
        assert sqlstate_of(conn, "SELECT mk_restore_user_foreign_key()") == "23503"
        conn.execute("INSERT INTO users VALUES (%s)", (orphan,))
        assert conn.execute("SELECT mk_restore_user_foreign_key()").fetchone()[0] is True


def test_drop_extension_drops_the_keys(db):
    with connect(db) as conn:
        user = add_user(conn)
        conn.execute("SELECT mk_issue_key(%s)", (user,))
        conn.execute("DROP EXTENSION makima_keys")
        assert conn.execute("SELECT to_regclass('api_keys')").fetchone()[0] is None
