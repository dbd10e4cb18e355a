'use strict';
// The client scenario through node-postgres (pg), the way a Node service calls makima_keys.
//
//     node scenario.js scenario | issue USER_ID | verify KEY [KEY ...]
//
// Connection from PGHOST, PGPORT, PGUSER, PGDATABASE (pg reads them itself);
// `scenario` also needs MK_NOGRANT_ROLE. Every value is a bind parameter:
// keys never appear in SQL text.

const crypto = require('node:crypto');
const { Client } = require('pg');

class StepFailed extends Error {}

function sha256Hex(text) {
  return crypto.createHash('sha256').update(text, 'utf8').digest('hex');
}

// Error text may quote a value; keep at most a key's 9-character prefix of anything key-like.
function redact(text) {
  return String(text).replace(/mk_[0-9A-Za-z]{6,}/g, (k) => `${k.slice(0, 9)}...`);
}

// Runs one step: body returns [condition, detail]. Prints `ok STEP`, or
// `FAIL STEP: DETAIL` and stops the scenario, also when body throws.
async function step(name, body) {
  let condition;
  let detail;
  try {
    [condition, detail] = await body();
  } catch (err) {
    condition = false;
    detail = `unexpected error ${err.code || ''} ${err.message}`;
  }
  if (!condition) {
    throw new StepFailed(`FAIL ${name}: ${redact(detail)}`);
  }
  console.log(`ok ${name}`);
}

async function connect(user) {
  const client = new Client(user ? { user } : {});
  await client.connect();
  return client;
}

async function scalar(client, sql, params) {
  const { rows } = await client.query({ text: sql, values: params, rowMode: 'array' });
  return rows[0][0];
}

// The SQLSTATE a statement fails with, or null if it succeeds.
async function sqlstateOf(client, sql, params) {
  try {
    await client.query(sql, params);
  } catch (err) {
    return err.code || `no SQLSTATE (${err.message})`;
  }
  return null;
}

async function scenario(nograntRole) {
  let conn;
  let user;
  let issued;
  let key2;
  try {
    const verify = (key) => scalar(conn, 'SELECT mk_verify($1)', [key]);
    const status = (key) => scalar(conn, 'SELECT status FROM mk_verify_detail($1)', [key]);

    await step('user', async () => {
      conn = await connect();
      user = await scalar(conn, 'INSERT INTO users (email) VALUES ($1) RETURNING id', ['node@example.com']);
      return [typeof user === 'string' && user.length === 36, `id ${user}`];
    });

    await step('issue', async () => {
      const { rows } = await conn.query('SELECT id, key, key_prefix FROM mk_issue_key($1, $2)', [user, 'client-node']);
      issued = rows[0];
      const { key } = issued;
      return [typeof key === 'string' && key.length === 52 && key.startsWith('mk_') && issued.key_prefix === key.slice(0, 9),
        `length ${key && key.length}, key_prefix ${issued.key_prefix}`];
    });
    const { key } = issued;

    await step('hash', async () => {
      const stored = await scalar(conn, 'SELECT key_hash FROM api_keys WHERE id = $1', [issued.id]);
      return [stored === sha256Hex(key), 'key_hash differs from the SHA-256 hex of the key'];
    });

    await step('verify good', async () => {
      const got = await verify(key);
      return [got === user, `mk_verify returned ${got}`];
    });

    await step('verify bad', async () => {
      // One character of the body changed: the checksum no longer matches.
      const bad = key.slice(0, 10) + (key[10] === 'a' ? 'b' : 'a') + key.slice(11);
      const got = await verify(bad);
      const why = await status(bad);
      return [got === null && why === 'malformed', `mk_verify ${got}, status ${why}`];
    });

    await step('verify unknown', async () => {
      const got = await verify('not-a-key');
      const why = await status('not-a-key');
      return [got === null && why === 'not_found', `mk_verify ${got}, status ${why}`];
    });

    await step('duplicate issue', async () => {
      const code = await sqlstateOf(conn, 'SELECT * FROM mk_issue_key($1)', [user]);
      return [code === '23505', `SQLSTATE ${code}`];
    });

    await step('rotate', async () => {
      key2 = await scalar(conn, 'SELECT key FROM mk_rotate_key($1)', [user]);
      const oldUser = await verify(key);
      const oldStatus = await status(key);
      const newUser = await verify(key2);
      return [oldUser === null && oldStatus === 'revoked' && newUser === user,
        `old key: mk_verify ${oldUser}, status ${oldStatus}; new key: mk_verify ${newUser}`];
    });

    await step('revoke', async () => {
      const id = await scalar(conn, 'SELECT id FROM api_keys WHERE key_hash = $1', [sha256Hex(key2)]);
      const first = await scalar(conn, 'SELECT mk_revoke($1)', [id]);
      const second = await scalar(conn, 'SELECT mk_revoke($1)', [id]);
      const got = await verify(key2);
      return [first === true && second === false && got === null,
        `mk_revoke ${first} then ${second}, mk_verify ${got}`];
    });
  } finally {
    if (conn) await conn.end().catch(() => {});
  }

  await step('no grant', async () => {
    if (!nograntRole) return [false, 'MK_NOGRANT_ROLE is not set'];
    const nogrant = await connect(nograntRole);
    try {
      const code = await sqlstateOf(nogrant, 'SELECT * FROM mk_issue_key($1)', [crypto.randomUUID()]);
      return [code === '42501', `SQLSTATE ${code}`];
    } finally {
      await nogrant.end().catch(() => {});
    }
  });
}

async function main(argv) {
  const [mode, ...args] = argv;
  if (mode === 'scenario') {
    await scenario(process.env.MK_NOGRANT_ROLE);
  } else if (mode === 'issue' && args.length === 1) {
    const conn = await connect();
    try {
      console.log(await scalar(conn, 'SELECT key FROM mk_issue_key($1)', [args[0]]));
    } finally {
      await conn.end();
    }
  } else if (mode === 'verify') {
    const conn = await connect();
    try {
      for (const key of args) {
        const user = await scalar(conn, 'SELECT mk_verify($1)', [key]);
        console.log(user === null ? 'null' : user);
      }
    } finally {
      await conn.end();
    }
  } else {
    console.error('usage: node scenario.js scenario | issue USER_ID | verify KEY [KEY ...]');
    process.exitCode = 2;
  }
}

main(process.argv.slice(2)).catch((err) => {
  if (err instanceof StepFailed) {
    console.log(err.message);
  } else {
    // Connection errors outside a step, or the issue/verify modes failing.
    console.error(`error: ${redact(`${err.code || ''} ${err.message}`.trim())}`);
  }
  process.exitCode = 1;
});
