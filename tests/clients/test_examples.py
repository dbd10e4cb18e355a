"""The HTTP middleware examples in examples/ answer a good key, a bad key, no
key and a key out of credits as documented, against a real server, with a
verify-only role."""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import PORT, REPO, add_user, connect
from test_privileges_and_races import readme_recipe

SERVERS = {
    "python": [sys.executable, str(REPO / "examples/python/server.py")],
    "node": ["node", str(REPO / "examples/node/server.js")],
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port, headers):
    """(status, JSON body, response headers) of GET /whoami."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/whoami", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def get(port, headers):
    return fetch(port, headers)[:2]


@pytest.mark.parametrize("example", sorted(SERVERS))
def test_middleware_example(role, db, example):
    app = role("app")
    with connect(db) as conn:
        conn.execute(readme_recipe("verify-only", app=app))
        user = add_user(conn)
        key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
        # One active key per user: each credited key gets a user of its own.
        credit_user = add_user(conn, "one-credit@example.com")
        one_credit = conn.execute("SELECT key FROM mk_issue_key(%s, credits => 1)",
                                  (credit_user,)).fetchone()[0]
        refilling = conn.execute(
            "SELECT key FROM mk_issue_key(%s, credits => 0, refill_amount => 5, refill_every => '1 hour')",
            (add_user(conn, "refilling@example.com"),)).fetchone()[0]
        # The middleware calls mk_verify_detail(text, text[], integer); the README's
        # verify-only recipe must grant exactly that to the role.
        assert conn.execute("SELECT has_function_privilege(%s, 'mk_verify_detail(text, text[], integer)', "
                            "'EXECUTE')", (app,)).fetchone()[0]
    http_port = free_port()
    env = {**os.environ, "PGHOST": os.environ.get("PGHOST", "127.0.0.1"), "PGPORT": PORT,
           "PGUSER": app, "PGDATABASE": db, "HTTP_PORT": str(http_port)}
    server = subprocess.Popen(SERVERS[example], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == f"listening on {http_port}"
        assert get(http_port, {"Authorization": f"Bearer {key}"}) == (200, {"user_id": str(user)})
        wrong = key[:10] + ("b" if key[10] == "a" else "a") + key[11:]
        assert get(http_port, {"Authorization": f"Bearer {wrong}"}) == (401, {"error": "invalid_api_key"})
        assert get(http_port, {"Authorization": "Bearer mk_unknown"}) == (401, {"error": "invalid_api_key"})
        assert get(http_port, {}) == (401, {"error": "missing_api_key"})
        assert get(http_port, {"Authorization": f"Basic {key}"}) == (401, {"error": "missing_api_key"})
        # A key with one credit and no refill: one request passes, the next is
        # refused for good (no Retry-After: waiting will not help).
        assert get(http_port, {"Authorization": f"Bearer {one_credit}"}) == (200, {"user_id": str(credit_user)})
        status, body, headers = fetch(http_port, {"Authorization": f"Bearer {one_credit}"})
        assert (status, body) == (402, {"error": "usage_exceeded"})
        assert headers["Retry-After"] is None
        # No credits yet, 5 more every hour: refused until the refill, which
        # Retry-After announces in whole seconds.
        status, body, headers = fetch(http_port, {"Authorization": f"Bearer {refilling}"})
        assert (status, body) == (402, {"error": "usage_exceeded"})
        assert 1 <= int(headers["Retry-After"]) <= 3600
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=10)
    for secret in (key, wrong, one_credit, refilling):
        assert secret not in stderr
