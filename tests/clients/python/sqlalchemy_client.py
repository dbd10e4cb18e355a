"""The client scenario through SQLAlchemy 2, calling the functions as an ORM
user would: func.mk_verify(...), func.mk_issue_key(...).

    python sqlalchemy_client.py scenario | issue USER_ID | verify KEY [KEY ...]
"""

import hashlib
import os
import sys
import uuid

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError


def engine(user=None):
    url = sa.engine.URL.create(
        "postgresql+psycopg",
        username=user or os.environ.get("PGUSER", "postgres"),
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=int(os.environ.get("PGPORT", "5432")),
        database=os.environ.get("PGDATABASE", "postgres"),
    )
    return sa.create_engine(url, isolation_level="AUTOCOMMIT")


metadata = sa.MetaData()
users = sa.Table("users", metadata, sa.Column("id", sa.Uuid, primary_key=True), sa.Column("email", sa.Text))
api_keys = sa.Table("api_keys", metadata, sa.Column("id", sa.Uuid, primary_key=True),
                    sa.Column("key_hash", sa.String(64)))


def issued(conn, user, name=None):
    """mk_issue_key returns a table; select its columns like any table function."""
    fn = func.mk_issue_key(user, name).table_valued("id", "key", "key_prefix", "created_at")
    return conn.execute(select(fn.c.id, fn.c.key, fn.c.key_prefix)).one()


def check(step, condition, detail=""):
    if not condition:
        print(f"FAIL {step}: {detail}")
        sys.exit(1)
    print(f"ok {step}")


def sqlstate_of(conn, statement):
    try:
        conn.execute(statement)
    except DBAPIError as e:
        return e.orig.sqlstate
    return None


def scenario(nogrant_role):
    with engine().connect() as conn:
        user = conn.execute(sa.insert(users).values(email="sqlalchemy@example.com").returning(users.c.id)).scalar_one()
        check("user", isinstance(user, uuid.UUID))
        key_id, key, prefix = issued(conn, user, "client-sqlalchemy")
        check("issue", len(key) == 52 and key.startswith("mk_") and prefix == key[:9])
        stored = conn.execute(select(api_keys.c.key_hash).where(api_keys.c.id == key_id)).scalar_one()
        check("hash", stored == hashlib.sha256(key.encode()).hexdigest())

        def verify(k):
            return conn.execute(select(func.mk_verify(k))).scalar_one()

        def status(k):
            detail = func.mk_verify_detail(k).table_valued("status", "key_id", "user_id", "key_prefix", "name")
            return conn.execute(select(detail.c.status)).scalar_one()

        check("verify good", verify(key) == user)
        bad = key[:10] + ("b" if key[10] == "a" else "a") + key[11:]
        check("verify bad", verify(bad) is None and status(bad) == "malformed")
        check("verify unknown", verify("not-a-key") is None and status("not-a-key") == "not_found")
        check("duplicate issue", sqlstate_of(conn, select(func.mk_issue_key(user))) == "23505")
        rotated = func.mk_rotate_key(user).table_valued("id", "key", "key_prefix", "created_at")
        new_id, new_key = conn.execute(select(rotated.c.id, rotated.c.key)).one()
        check("rotate", verify(key) is None and status(key) == "revoked" and verify(new_key) == user)
        first = conn.execute(select(func.mk_revoke(new_id))).scalar_one()
        second = conn.execute(select(func.mk_revoke(new_id))).scalar_one()
        check("revoke", first is True and second is False and verify(new_key) is None)
    with engine(nogrant_role).connect() as conn:
        check("no grant", sqlstate_of(conn, select(func.mk_verify("x"))) == "42501")


def main(argv):
    mode, args = argv[1], argv[2:]
    if mode == "scenario":
        scenario(os.environ["MK_NOGRANT_ROLE"])
    elif mode == "issue":
        with engine().connect() as conn:
            print(issued(conn, uuid.UUID(args[0])).key)
    elif mode == "verify":
        with engine().connect() as conn:
            for key in args:
                user = conn.execute(select(func.mk_verify(key))).scalar_one()
                print(user if user else "null")
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
