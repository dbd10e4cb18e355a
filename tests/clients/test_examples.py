"""The HTTP middleware examples in examples/ answer a good key, a bad key and
no key as documented, against a real server, with a verify-only role."""

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


def get(port, headers):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/whoami", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("example", sorted(SERVERS))
def test_middleware_example(role, db, example):
    app = role("app")
    with connect(db) as conn:
        conn.execute(readme_recipe("verify-only", app=app))
        user = add_user(conn)
        key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
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
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=10)
    assert key not in stderr and wrong not in stderr
