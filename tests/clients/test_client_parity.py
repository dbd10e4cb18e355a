"""The same scenario through every client our users write: psycopg, SQLAlchemy,
node-postgres, tokio-postgres and psql. Each client program runs the scenario
itself (issue, verify good/bad/revoked/malformed keys, rotate, revoke, 23505
and 42501 read as SQLSTATEs, key_hash equal to the client's own SHA-256), and a
key issued through any client verifies through every other."""

import os
import subprocess
import sys

import pytest

from conftest import PORT, REPO, add_user, connect

CLIENTS = {
    "psycopg": [sys.executable, str(REPO / "tests/clients/python/psycopg_client.py")],
    "sqlalchemy": [sys.executable, str(REPO / "tests/clients/python/sqlalchemy_client.py")],
    "node": ["node", str(REPO / "tests/clients/node/scenario.js")],
    "rust": [str(REPO / "tests/clients/rust/target/debug/makima-client")],
    "psql": ["bash", str(REPO / "tests/clients/psql/client.sh")],
}


def run_client(name, db, *args, nogrant=None):
    env = {**os.environ, "PGHOST": os.environ.get("PGHOST", "127.0.0.1"), "PGPORT": PORT,
           "PGUSER": "postgres", "PGDATABASE": db, "MK_NOGRANT_ROLE": nogrant or ""}
    return subprocess.run([*CLIENTS[name], *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_scenario(role, db, client):
    nogrant = role("nogrant")
    result = run_client(client, db, "scenario", nogrant=nogrant)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAIL" not in output
    for step in ("issue", "hash", "verify good", "verify bad", "verify unknown",
                 "duplicate issue", "rotate", "revoke", "no grant"):
        assert f"ok {step}" in output, f"{client} did not report step {step}:\n{output}"


def test_a_key_issued_by_any_client_verifies_through_every_other(db):
    with connect(db) as conn:
        issued = {}
        for client in CLIENTS:
            user = add_user(conn, f"{client}@example.com")
            result = run_client(client, db, "issue", str(user))
            assert result.returncode == 0, result.stderr
            issued[client] = (user, result.stdout.strip())
    keys = [key for _, key in issued.values()]
    for client in CLIENTS:
        result = run_client(client, db, "verify", *keys, "mk_not_a_real_key")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.split()
        assert lines == [str(user) for user, _ in issued.values()] + ["null"], (client, lines)
