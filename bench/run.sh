#!/usr/bin/env bash
# One command for the benchmark: installs what is needed, builds and installs
# the release build, starts a throwaway cluster, runs bench/bench.py against it
# (arguments are passed on, e.g. --keys 100000 --seconds 5), stops the cluster.
# Default: 1,000,000 keys, 5 rounds of 10-second pgbench runs, about 20 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=/usr/lib/postgresql/15/bin
PORT=${MK_BENCH_PORT:-26440}

bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
bash scripts/install-extension.sh --release

WORK=$(mktemp -d /tmp/makima-keys-bench.XXXXXX)
chmod 755 "$WORK"
trap 'bash scripts/cluster.sh stop "$WORK"; rm -rf "$WORK"' EXIT
bash scripts/cluster.sh start "$WORK" "$PORT" shared_buffers=2GB max_connections=50
PATH="$PG_BIN:$PATH" .venv/bin/python bench/bench.py --port "$PORT" "$@"
