#!/usr/bin/env bash
# Instruction counts per call under valgrind's callgrind (see bench/callgrind.py):
# installs what is needed, builds and installs the release build, prepares a
# database of KEYS keys (default 100,000) in a throwaway cluster, stops it, and
# runs each case in a single-user backend. About 5 minutes.
#   bash bench/callgrind.sh [--pg 15|16|17|18] [--keys N]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${MK_CALLGRIND_PORT:-26450}
KEYS=100000
SAMPLE=20000
MK_PG_MAJOR=15
while [ $# -gt 0 ]; do
    case "$1" in
        --pg) MK_PG_MAJOR=$2; shift 2 ;;
        --keys) KEYS=$2; shift 2 ;;
        *) echo "usage: bench/callgrind.sh [--pg 15|16|17|18] [--keys N]" >&2; exit 2 ;;
    esac
done

bash scripts/install-deps.sh
. scripts/pg-versions.sh
PG_BIN=$(pg_bin_for "$MK_PG_MAJOR")
export MK_PG_MAJOR MK_PG_BIN=$PG_BIN
echo "PostgreSQL $MK_PG_MAJOR: $("$PG_BIN/postgres" --version)" 
if ! command -v valgrind >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind
fi
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
bash scripts/install-extension.sh --release

WORK=$(mktemp -d /tmp/makima-keys-callgrind.XXXXXX)
chmod 777 "$WORK"
trap 'bash scripts/cluster.sh stop "$WORK"; rm -rf "$WORK"' EXIT
bash scripts/cluster.sh start "$WORK" "$PORT"
psql="$PG_BIN/psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PORT -U postgres"
$psql -d postgres -c "CREATE DATABASE cg"
$psql -d cg <<SQL
CREATE TABLE users (id uuid PRIMARY KEY DEFAULT gen_random_uuid());
CREATE EXTENSION makima_keys;
\i bench/diy.sql
INSERT INTO users SELECT gen_random_uuid() FROM generate_series(1, $KEYS - $SAMPLE);
SELECT count(*) FROM users u, LATERAL mk_issue_key(u.id) k;
-- Plaintext keys of the sample, for this measurement only, laid out as
-- bench.py lays them out, so that both run the same statements.
CREATE SCHEMA bench;
CREATE TABLE fresh AS SELECT gen_random_uuid() AS id FROM generate_series(1, $SAMPLE);
INSERT INTO users SELECT id FROM fresh;
CREATE TABLE bench.keys AS SELECT (row_number() OVER ())::int AS i, k.key, mk_hash_key(k.key) AS hash
                            FROM fresh u, LATERAL mk_issue_key(u.id) k;
ALTER TABLE bench.keys ADD PRIMARY KEY (i);
CREATE TABLE bench.sample AS SELECT key, hash FROM bench.keys;
SELECT count(mk_verify(key)) FROM bench.sample;
VACUUM ANALYZE;
SQL
bash scripts/cluster.sh stop "$WORK"
.venv/bin/python bench/callgrind.py --pgdata "$WORK/data" --work "$WORK" --sample "$SAMPLE"
