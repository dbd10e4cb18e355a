#!/usr/bin/env bash
# One command for the benchmark: installs what is needed, builds and installs
# the release build, starts a throwaway cluster, runs bench/bench.py against it
# (other arguments are passed on, e.g. --keys 100000 --seconds 5), stops the cluster.
#   bash bench/run.sh [--pg 15|16|17|18] [bench.py arguments]
# Default: PostgreSQL 15, 1,000,000 keys, 5 rounds of 10-second pgbench runs,
# about 25 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${MK_BENCH_PORT:-26440}
MK_PG_MAJOR=15
if [ "${1:-}" = "--pg" ]; then MK_PG_MAJOR=$2; shift 2; fi

bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
. scripts/pg-versions.sh
PG_BIN=$(pg_bin_for "$MK_PG_MAJOR")
export MK_PG_MAJOR MK_PG_BIN=$PG_BIN
echo "PostgreSQL $MK_PG_MAJOR: $("$PG_BIN/postgres" --version)"
bash scripts/install-extension.sh --release

WORK=$(mktemp -d /tmp/makima-keys-bench.XXXXXX)
chmod 755 "$WORK"
trap 'bash scripts/cluster.sh stop "$WORK"; rm -rf "$WORK"' EXIT
bash scripts/cluster.sh start "$WORK" "$PORT" shared_buffers=2GB max_connections=50
PATH="$PG_BIN:$PATH" .venv/bin/python bench/bench.py --port "$PORT" "$@"
