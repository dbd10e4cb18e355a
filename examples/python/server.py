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

# The key and the scopes are bind parameters: they never become part of the SQL
# text, so they cannot reach pg_stat_statements or a statement log line.
# retry_after comes back in whole seconds, rounded up, ready for Retry-After.
VERIFY = """SELECT status, user_id, ceil(extract(epoch FROM retry_after))::int AS retry_after_s, credits
              FROM mk_verify_detail(%s, %s::text[], cost => %s)"""

# mk_verify_detail's status -> HTTP status of the refusal. Every other status
# (malformed, not_found, revoked, expired) is a 401 invalid_api_key.
REFUSALS = {
    "insufficient_scope": "403 Forbidden",
    "usage_exceeded": "402 Payment Required",  # out of credits
    "rate_limited": "429 Too Many Requests",
    "rate_limit_unavailable": "503 Service Unavailable",
    "usage_unavailable": "503 Service Unavailable",
}


class RequireApiKey:
    """WSGI middleware: `Authorization: Bearer <key>` must verify with
    mk_verify_detail, carry `scopes`, and pay `cost` credits (if it has credits).

    On success the user id is in environ["makima.user_id"] and the credits left
    in environ["makima.credits"] (None for a key without credits); otherwise the
    request ends here with 401, 402, 403, 429 or 503 (see README.md).
    """

    def __init__(self, app, conninfo="", scopes=(), cost=1):
        self.app = app
        self.conninfo = conninfo
        self.scopes = list(scopes)
        self.cost = cost
        self.conn = None

    def _verify(self, key):
        if self.conn is None or self.conn.closed:
            # autocommit: each check is its own transaction, so spent credits commit at once.
            self.conn = psycopg.connect(self.conninfo, autocommit=True)
        return self.conn.execute(VERIFY, (key, self.scopes, self.cost)).fetchone()

    def __call__(self, environ, start_response):
        scheme, _, key = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return _json(start_response, "401 Unauthorized", {"error": "missing_api_key"})
        try:
            status, user_id, retry_after_s, credits = self._verify(key.strip())
        except psycopg.Error:
            self.conn = None
            # Never log the key, not even on failure.
            return _json(start_response, "503 Service Unavailable", {"error": "unavailable"})
        if status == "valid":
            environ["makima.user_id"] = str(user_id)
            environ["makima.credits"] = credits
            return self.app(environ, start_response)
        if status not in REFUSALS:
            return _json(start_response, "401 Unauthorized", {"error": "invalid_api_key"})
        # Set for usage_exceeded (until the next refill) and rate_limited; NULL when
        # waiting will not help (a key that never refills).
        headers = [] if retry_after_s is None else [("Retry-After", str(retry_after_s))]
        return _json(start_response, REFUSALS[status], {"error": status}, headers)


def _json(start_response, status, body, headers=()):
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                            *headers])
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
