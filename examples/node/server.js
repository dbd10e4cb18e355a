'use strict';
// A minimal HTTP server that lets a request in only with a valid makima_keys API key.
//
//     PGHOST=127.0.0.1 PGUSER=app PGDATABASE=app HTTP_PORT=8080 node server.js
//     curl -H "Authorization: Bearer mk_..." http://127.0.0.1:8080/whoami
//
// Copy requireApiKey into your application; everything else here is scaffolding.
// Needs: npm install pg. The database connection comes from the usual PG* variables.

const http = require('node:http');
const { Pool } = require('pg');

// The key and the scopes are bind parameters ($1, $2), never pasted into the SQL text:
// no SQL injection, and the key cannot end up in pg_stat_statements or in a log line
// that prints statements. retry_after comes back in whole seconds, rounded up.
const VERIFY = `SELECT status, user_id, ceil(extract(epoch FROM retry_after))::int AS retry_after_s, credits
                  FROM mk_verify_detail($1, $2, cost => $3)`;

// mk_verify_detail's status -> HTTP status of the refusal. Every other status
// (malformed, not_found, revoked, expired) is a 401 invalid_api_key.
const REFUSALS = {
  insufficient_scope: 403,
  usage_exceeded: 402, // out of credits
  rate_limited: 429,
  rate_limit_unavailable: 503,
  usage_unavailable: 503,
};

// Middleware: `Authorization: Bearer <key>` must verify with mk_verify_detail,
// carry `scopes`, and pay `cost` credits (if the key has credits). On success it
// sets req.userId and req.credits (null for a key without credits) and calls
// next(); otherwise the request ends here with 401, 402, 403, 429 or 503 (README.md).
function requireApiKey(pool, { scopes = [], cost = 1 } = {}) {
  return async function (req, res, next) {
    const match = /^Bearer +(\S+) *$/i.exec(req.headers.authorization || '');
    if (!match) {
      return sendJson(res, 401, { error: 'missing_api_key' });
    }
    let row;
    try {
      // A pool query is its own transaction: spent credits commit at once.
      row = (await pool.query(VERIFY, [match[1], scopes, cost])).rows[0];
    } catch (err) {
      // Never log the key, not even on failure: the error code is enough to diagnose.
      console.error(`api key check failed: database error ${err.code || err.name}`);
      return sendJson(res, 503, { error: 'unavailable' });
    }
    if (row.status === 'valid') {
      req.userId = row.user_id;
      req.credits = row.credits;
      return next();
    }
    const httpStatus = REFUSALS[row.status];
    if (httpStatus === undefined) {
      return sendJson(res, 401, { error: 'invalid_api_key' });
    }
    // Set for usage_exceeded (until the next refill) and rate_limited; null when
    // waiting will not help (a key that never refills).
    const headers = row.retry_after_s === null ? {} : { 'Retry-After': String(row.retry_after_s) };
    return sendJson(res, httpStatus, { error: row.status }, headers);
  };
}

function sendJson(res, status, body, headers = {}) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

// The protected application: it only runs for verified requests.
function whoami(req, res) {
  if (req.method === 'GET' && req.url === '/whoami') {
    return sendJson(res, 200, { user_id: req.userId });
  }
  return sendJson(res, 404, { error: 'not_found' });
}

// A Pool reuses connections between requests. The role it connects as needs only
// EXECUTE on mk_verify_detail(text, text[], integer) (see the project README,
// section Privileges).
const pool = new Pool({ connectionTimeoutMillis: 5000 });
// An idle connection that breaks (say, the database restarts) is reported here;
// without a listener it would crash the process.
pool.on('error', (err) => console.error(`idle database connection lost: ${err.code || err.name}`));

const checkKey = requireApiKey(pool);
const server = http.createServer((req, res) => {
  checkKey(req, res, () => whoami(req, res)).catch((err) => {
    console.error(`request failed: ${err.name}`);
    if (!res.headersSent) sendJson(res, 500, { error: 'internal' });
  });
});

const port = Number(process.env.HTTP_PORT || 8080);
server.listen(port, '127.0.0.1', () => {
  console.log(`listening on ${server.address().port}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close();
    pool.end();
  });
}
