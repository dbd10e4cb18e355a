#!/usr/bin/env bash
# Installs what is needed, builds makima_keys in release mode, installs it into
# PostgreSQL 15, starts a throwaway cluster and shows keys being issued,
# verified, rotated and revoked. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=/usr/lib/postgresql/15/bin
PORT=${MK_DEMO_PORT:-26400}

bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

echo "== build and install makima_keys (release)"
bash scripts/install-extension.sh --release

WORK=$(mktemp -d /tmp/makima-keys-demo.XXXXXX)
chmod 755 "$WORK"
trap 'bash scripts/cluster.sh stop "$WORK"; rm -rf "$WORK"' EXIT
echo "== start a throwaway cluster on 127.0.0.1:$PORT, with makima_keys preloaded (shared memory)"
bash scripts/cluster.sh start "$WORK" "$PORT" shared_preload_libraries=makima_keys makima_keys.flush_interval=1

echo "== issue, verify, rotate, revoke"
"$PG_BIN/psql" -X -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -e <<'SQL'
CREATE TABLE users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text);
CREATE EXTENSION makima_keys;
INSERT INTO users (email) VALUES ('ada@example.com') RETURNING id AS ada \gset

-- Issue: the key is shown once and stored only as a hash.
SELECT id AS key_id, key, key_prefix FROM mk_issue_key(:'ada', 'laptop') \gset
\echo issued :key
SELECT key_prefix, key_hash, name, created_at FROM api_keys;

-- Verify: the user id for a good key, NULL for anything else.
SELECT mk_verify(:'key') AS user_id;
SELECT * FROM mk_verify_detail(:'key');
SELECT * FROM mk_verify_detail('mk_not-a-real-key');
SELECT * FROM mk_verify_detail(left(:'key', 51) || 'x');

-- One active key per user: a second issue is refused with SQLSTATE 23505.
\set ON_ERROR_STOP 0
SELECT mk_issue_key(:'ada');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\set ON_ERROR_STOP 1

-- Rotate: the old key stops, the new one works.
SELECT id AS new_key_id, key AS new_key FROM mk_rotate_key(:'ada', 'laptop, rotated') \gset
SELECT mk_verify(:'key') AS old_key, mk_verify(:'new_key') AS new_key;

-- Revoke.
SELECT mk_revoke(:'new_key_id') AS revoked;
SELECT status FROM mk_verify_detail(:'new_key');
SELECT key_prefix, name, last_used_at IS NOT NULL AS used, revoked_at IS NOT NULL AS revoked
  FROM api_keys ORDER BY created_at;

-- 0.2.0: a scoped, expiring key with metadata.
INSERT INTO users (email) VALUES ('grace@example.com') RETURNING id AS grace \gset
SELECT key AS ci_key FROM mk_issue_key(:'grace', name => 'ci', expires_in => '30 days',
                                       scopes => '{read,deploy}', metadata => '{"team": "platform"}') \gset
SELECT mk_verify(:'ci_key', '{deploy}') AS may_deploy, mk_verify(:'ci_key', '{admin}') AS may_admin;
SELECT status, scopes, metadata, expires_at FROM mk_verify_detail(:'ci_key', '{admin}');

-- Rotation with a grace period: the old key keeps working for an hour.
LISTEN makima_keys_revoked;
SELECT key AS ci_key_2 FROM mk_rotate_key(:'grace', 'ci, rotated', grace => '1 hour') \gset
SELECT mk_verify(:'ci_key') IS NOT NULL AS old_still_works, mk_verify(:'ci_key_2') IS NOT NULL AS new_works;

-- A leaked key is revoked from its plaintext (for secret-scanning webhooks).
SELECT mk_revoke_key(:'ci_key') AS revoked_leaked_key;
SELECT key_prefix, name, scopes, status, revoked_at IS NOT NULL AS has_end
  FROM mk_keys WHERE user_id = :'grace' ORDER BY created_at;

-- 0.3.0: a key good for 3 calls, refilled every day; a call can cost more than one.
INSERT INTO users (email) VALUES ('linus@example.com') RETURNING id AS linus \gset
SELECT key AS metered FROM mk_issue_key(:'linus', credits => 3, refill_amount => 3,
                                        refill_every => '1 day') \gset
SELECT status, credits FROM mk_verify_detail(:'metered', cost => 2);
SELECT status, credits, retry_after FROM mk_verify_detail(:'metered', cost => 2);
SELECT status, credits FROM mk_verify_detail(:'metered', cost => 0);   -- a peek spends nothing

-- 0.4.0 (shared memory): at most 3 calls a minute for all of a user's keys.
INSERT INTO users (email) VALUES ('hedy@example.com') RETURNING id AS hedy \gset
SELECT key AS limited FROM mk_issue_key(:'hedy', rate_limit => 3, rate_period => '1 minute') \gset
SELECT mk_verify(:'limited') IS NOT NULL AS call_1, mk_verify(:'limited') IS NOT NULL AS call_2,
       mk_verify(:'limited') IS NOT NULL AS call_3, mk_verify(:'limited') IS NOT NULL AS call_4;
SELECT status, retry_after FROM mk_verify_detail(:'limited');
-- Verifications wrote nothing; the worker writes last_used_at within a second here.
SELECT pg_sleep(2.5);
SELECT key_prefix, last_used_at IS NOT NULL AS used FROM api_keys ORDER BY created_at;
-- What the verifications came to, per key (no key material in it).
SELECT s.key_id IS NULL AS no_key, k.key_prefix, s.valid, s.revoked, s.rate_limited,
       s.usage_exceeded, s.not_found, s.malformed
  FROM mk_key_stats s LEFT JOIN mk_keys k ON k.id = s.key_id ORDER BY k.created_at NULLS LAST;
SQL
echo "== done; the cluster is stopped and removed"
