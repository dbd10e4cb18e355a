"""The client scenario through psycopg 3, the way a Python service calls makima_keys.

    python psycopg_client.py scenario | issue USER_ID | verify KEY [KEY ...]

Connection from PGHOST, PGPORT, PGUSER, PGDATABASE. Every value is a bind
parameter: keys never appear in SQL text.
"""

import hashlib
import sys
import uuid

import psycopg


def connect(user=None):
    return psycopg.connect(user=user, autocommit=True) if user else psycopg.connect(autocommit=True)


def check(step, condition, detail=""):
    if not condition:
        print(f"FAIL {step}: {detail}")
        sys.exit(1)
    print(f"ok {step}")


def sqlstate_of(conn, sql, params):
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def scenario(nogrant_role):
    with connect() as conn:
        user = conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", ("psycopg@example.com",)).fetchone()[0]
        check("user", isinstance(user, uuid.UUID))
        key_id, key, prefix = conn.execute(
            "SELECT id, key, key_prefix FROM mk_issue_key(%s, %s)", (user, "client-psycopg")).fetchone()
        check("issue", len(key) == 52 and key.startswith("mk_") and prefix == key[:9])
        stored = conn.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]
        check("hash", stored == hashlib.sha256(key.encode()).hexdigest())
        verify = lambda k: conn.execute("SELECT mk_verify(%s)", (k,)).fetchone()[0]  # noqa: E731
        status = lambda k: conn.execute("SELECT status FROM mk_verify_detail(%s)", (k,)).fetchone()[0]  # noqa: E731
        check("verify good", verify(key) == user)
        bad = key[:10] + ("b" if key[10] == "a" else "a") + key[11:]
        check("verify bad", verify(bad) is None and status(bad) == "malformed")
        check("verify unknown", verify("not-a-key") is None and status("not-a-key") == "not_found")
        check("duplicate issue", sqlstate_of(conn, "SELECT mk_issue_key(%s)", (user,)) == "23505")
        new_key = conn.execute("SELECT key FROM mk_rotate_key(%s)", (user,)).fetchone()[0]
        check("rotate", verify(key) is None and status(key) == "revoked" and verify(new_key) == user)
        new_id = conn.execute("SELECT id FROM api_keys WHERE key_hash = %s",
                              (hashlib.sha256(new_key.encode()).hexdigest(),)).fetchone()[0]
        first = conn.execute("SELECT mk_revoke(%s)", (new_id,)).fetchone()[0]
        second = conn.execute("SELECT mk_revoke(%s)", (new_id,)).fetchone()[0]
        check("revoke", first is True and second is False and verify(new_key) is None)
    with connect(nogrant_role) as conn:
        check("no grant", sqlstate_of(conn, "SELECT * FROM mk_issue_key(%s)", (uuid.uuid4(),)) == "42501")


def main(argv):
    mode, args = argv[1], argv[2:]
    if mode == "scenario":
        import os
        scenario(os.environ["MK_NOGRANT_ROLE"])
    elif mode == "issue":
        with connect() as conn:
            print(conn.execute("SELECT key FROM mk_issue_key(%s)", (args[0],)).fetchone()[0])
    elif mode == "verify":
        with connect() as conn:
            for key in args:
                user = conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0]
                print(user if user else "null")
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
