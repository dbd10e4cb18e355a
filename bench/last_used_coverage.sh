#!/usr/bin/env bash
# How many keys get a last_used_at when every verification runs inside a
# transaction block (as ORMs that wrap each request in a transaction do),
# against verifications that are their own transaction. Real pgbench, one
# verification of each key, makima_keys not preloaded. Prints both counts.
#   bash bench/last_used_coverage.sh [KEYS]      (default 2000)
# Expects the extension to be installed (scripts/install-extension.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=/usr/lib/postgresql/15/bin
PORT=${MK_BENCH_PORT:-26441}
KEYS=${1:-2000}

WORK=$(mktemp -d /tmp/makima-keys-coverage.XXXXXX)
chmod 755 "$WORK"
trap 'bash scripts/cluster.sh stop "$WORK"; rm -rf "$WORK"' EXIT
bash scripts/cluster.sh start "$WORK" "$PORT"
psql() { PGOPTIONS="-c client_min_messages=warning" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

cat >"$WORK/in_transaction.sql" <<'SQL'
SELECT nextval('coverage.next_key') AS n \gset
BEGIN;
SELECT mk_verify(key) FROM coverage.keys WHERE n = :n;
COMMIT;
SQL
cat >"$WORK/autocommit.sql" <<'SQL'
SELECT nextval('coverage.next_key') AS n \gset
SELECT mk_verify(key) FROM coverage.keys WHERE n = :n;
SQL

for mode in in_transaction autocommit; do
    psql -d postgres -c "DROP DATABASE IF EXISTS coverage" -c "CREATE DATABASE coverage"
    psql -d coverage <<SQL
CREATE EXTENSION makima_keys;
CREATE SCHEMA coverage;
CREATE TABLE coverage.keys (n bigint PRIMARY KEY, key text NOT NULL);
CREATE SEQUENCE coverage.next_key;
INSERT INTO coverage.keys
SELECT g, issued.key
  FROM generate_series(1, $KEYS) g, LATERAL mk_issue_key(gen_random_uuid(), 'coverage ' || g) issued;
SQL
    "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 1 -t "$KEYS" \
        -f "$WORK/$mode.sql" coverage >/dev/null
    written=$(psql -d coverage -At -c "SELECT count(*) FROM api_keys WHERE last_used_at IS NOT NULL")
    awk -v m="$mode" -v w="$written" -v k="$KEYS" \
        'BEGIN { printf "%-15s %6d of %d keys verified once got a last_used_at (%.0f%%)\n", m, w, k, 100 * w / k }'
done
