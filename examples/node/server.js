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

// Middleware: `Authorization: Bearer <key>` must verify with mk_verify.
// On success it sets req.userId and calls next(); otherwise the request ends
// here with 401 (no or invalid key) or 503 (database unavailable).
function requireApiKey(pool) {
  return async function (req, res, next) {
    const match = /^Bearer +(\S+) *$/i.exec(req.headers.authorization || '');
    if (!match) {
      return sendJson(res, 401, { error: 'missing_api_key' });
    }
    let userId;
    try {
      // The key is a bind parameter ($1), never pasted into the SQL text: no SQL
      // injection, and the key cannot end up in pg_stat_statements or in a log
      // line that prints statements.
      const { rows } = await pool.query('SELECT mk_verify($1) AS user_id', [match[1]]);
      userId = rows[0].user_id; // a uuid string, or null for any key that is not valid
    } catch (err) {
      // Never log the key, not even on failure: the error code is enough to diagnose.
      console.error(`api key check failed: database error ${err.code || err.name}`);
      return sendJson(res, 503, { error: 'unavailable' });
    }
    if (userId === null) {
      return sendJson(res, 401, { error: 'invalid_api_key' });
    }
    req.userId = userId;
    return next();
  };
}

function sendJson(res, status, body) {
  const payload = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) });
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
// EXECUTE on mk_verify(text) (see the project README, section Privileges).
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
