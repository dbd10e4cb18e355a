"""Fixtures for tests that talk to a real PostgreSQL 15 server as clients do.

scripts/test.sh starts a throwaway cluster with the extension installed and
exports PGHOST/PGPORT; each test gets databases of its own.
"""

import contextlib
import os
import pathlib
import uuid

import psycopg
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SEED = REPO / "tests" / "fixtures" / "20250110000003_create_api_keys_table.sql"
SUPERUSER = os.environ.get("PGUSER", "postgres")

# A minimal stand-in for makima's users table, which the seed migration references.
USERS_DDL = "CREATE TABLE users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"


PORT = os.environ.get("PGPORT", "26329")
# The PostgreSQL under test: scripts/test.sh runs this suite once per major.
PG_BIN = pathlib.Path(os.environ.get("MK_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_MAJOR = int(os.environ.get("MK_PG_MAJOR", "15"))


def has_extension(name):
    """Whether the PostgreSQL under test ships the contrib extension `name`
    (every major we test does, for the ones the suite uses)."""
    import subprocess
    share = subprocess.run([str(PG_BIN / "pg_config"), "--sharedir"], check=True,
                           capture_output=True, text=True).stdout.strip()
    return (pathlib.Path(share) / "extension" / f"{name}.control").exists()


def conninfo(dbname, user=SUPERUSER, port=PORT):
    return psycopg.conninfo.make_conninfo(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=port,
        dbname=dbname,
        user=user,
    )


def connect(dbname, user=SUPERUSER, autocommit=True, **kwargs):
    return psycopg.connect(conninfo(dbname, user), autocommit=autocommit, **kwargs)


@contextlib.contextmanager
def fresh_database(owner=SUPERUSER):
    name = "t_" + uuid.uuid4().hex[:12]
    with connect("postgres") as admin:
        admin.execute(f'CREATE DATABASE {name} OWNER "{owner}" TEMPLATE template0 ENCODING \'UTF8\'')
    try:
        yield name
    finally:
        with connect("postgres") as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def new_db():
    """A factory of empty databases, dropped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda owner=SUPERUSER: stack.enter_context(fresh_database(owner))


@pytest.fixture
def db(new_db):
    """An empty database with a users table, then the extension installed."""
    name = new_db()
    with connect(name) as conn:
        conn.execute(USERS_DDL)
        conn.execute("CREATE EXTENSION makima_keys")
    return name


@pytest.fixture
def role():
    """A factory of LOGIN roles, dropped after the test."""
    created = []

    def make(prefix="r"):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with connect("postgres") as admin:
            admin.execute(f'CREATE ROLE "{name}" LOGIN')
        created.append(name)
        return name

    yield make
    with connect("postgres") as admin:
        for name in created:
            for (dbname,) in admin.execute(
                "SELECT datname FROM pg_database WHERE datallowconn"
            ).fetchall():
                with contextlib.suppress(psycopg.Error), connect(dbname) as c:
                    c.execute(f'DROP OWNED BY "{name}"')
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def planted(role, new_db):
    """A factory of databases in which a role that is only allowed to CREATE in
    public (an intruder, not the schema owner) ran `sql` before the install."""

    def make(sql):
        intruder = role("intruder")
        name = new_db()
        with connect(name) as su:
            su.execute(f'GRANT CREATE ON SCHEMA public TO "{intruder}"')
        with connect(name, user=intruder) as conn:
            conn.execute(sql)
        return name

    return make


def add_user(conn, email="someone@example.com"):
    return conn.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", (email,)).fetchone()[0]


def sqlstate_of(conn, sql, params=None):
    """Runs sql; returns its SQLSTATE, or None when it succeeds."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None
