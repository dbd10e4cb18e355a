"""A minimal WSGI middleware that lets a request in only with a valid API key.

    PGHOST=127.0.0.1 PGDATABASE=app HTTP_PORT=8080 python server.py
    curl -H "Authorization: Bearer mk_..." http://127.0.0.1:8080/whoami

Copy RequireApiKey into your application; everything else here is scaffolding.
Needs: pip install "psycopg[binary]".
"""

import json
import os
from wsgiref.simple_server import WSGIRequestHandler, make_server

import psycopg


class RequireApiKey:
    """WSGI middleware: `Authorization: Bearer <key>` must verify with mk_verify.

    On success the user id is in environ["makima.user_id"]; otherwise the
    request ends here with 401 (no or invalid key) or 503 (database down).
    """

    def __init__(self, app, conninfo=""):
        self.app = app
        self.conninfo = conninfo
        self.conn = None

    def _verify(self, key):
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.conninfo, autocommit=True)
        # The key is a bind parameter: it never becomes part of the SQL text,
        # so it cannot reach pg_stat_statements or a statement log line.
        return self.conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0]

    def __call__(self, environ, start_response):
        scheme, _, key = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return _json(start_response, "401 Unauthorized", {"error": "missing_api_key"})
        try:
            user_id = self._verify(key.strip())
        except psycopg.Error:
            self.conn = None
            # Never log the key, not even on failure.
            return _json(start_response, "503 Service Unavailable", {"error": "unavailable"})
        if user_id is None:
            return _json(start_response, "401 Unauthorized", {"error": "invalid_api_key"})
        environ["makima.user_id"] = str(user_id)
        return self.app(environ, start_response)


def _json(start_response, status, body):
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


def whoami(environ, start_response):
    """The protected application: it only runs for verified requests."""
    if environ["PATH_INFO"] != "/whoami":
        return _json(start_response, "404 Not Found", {"error": "not_found"})
    return _json(start_response, "200 OK", {"user_id": environ["makima.user_id"]})


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args):
        pass  # the access log would be harmless here, but keep the example's output clean


if __name__ == "__main__":
    port = int(os.environ.get("HTTP_PORT", "8080"))
    with make_server("127.0.0.1", port, RequireApiKey(whoami), handler_class=QuietHandler) as server:
        print(f"listening on {port}", flush=True)
        server.serve_forever()
