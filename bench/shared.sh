#!/usr/bin/env bash
# The benchmark of the shared tier (0.4.0, makima_keys in shared_preload_libraries),
# one command like bench/run.sh: installs what is needed, builds and installs the
# release build, starts a throwaway cluster that preloads makima_keys and one that
# does not, runs bench/shared.py against both (other arguments are passed on, e.g.
# --keys 1000000 --seconds 5), stops them.
#   bash bench/shared.sh [--pg 15|16|18] [shared.py arguments]
# Default: PostgreSQL 15, 200,000 keys, 3 rounds of 10-second pgbench runs
# (each preloaded run is 8 s of warm-up + 10 s timed), about 15 minutes;
# --keys 1000000 for the full run (about 25 minutes, estimated from smaller runs).
# A quick look: --keys 20000 --limited-keys 10000 --rounds 1, about 4 minutes.
# Ports 26470 (preloaded), 26471 (not preloaded), 26472 (the short-lived clusters
# of the shared memory measurement); MK_SHARED_PORT moves all three.
# Installing makima_keys over a library that running servers have loaded crashes
# those servers: do not run this while another build is being tested on the same
# PostgreSQL installation. MK_BENCH_SKIP_INSTALL=1 measures the build that is
# already installed, without installing; MK_PG_BIN=DIR takes the PostgreSQL
# binaries (and the extension install) from DIR instead of --pg's, e.g. a private
# copy of the PostgreSQL tree that holds the build to measure.
# The preloaded cluster is stopped last with a fast shutdown (after a complete run
# it rests at flush_interval = 3600); the time it took is printed as PASS, or FAIL
# if pg_ctl gave up, and a cluster that did not stop is left running in its directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${MK_SHARED_PORT:-26470}
MK_PG_MAJOR=15
if [ "${1:-}" = "--pg" ]; then MK_PG_MAJOR=$2; shift 2; fi

bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
. scripts/pg-versions.sh
PG_BIN=${MK_PG_BIN:-$(pg_bin_for "$MK_PG_MAJOR")}
export MK_PG_MAJOR MK_PG_BIN=$PG_BIN
echo "PostgreSQL $MK_PG_MAJOR: $("$PG_BIN/postgres" --version)"
if [ -z "${MK_BENCH_SKIP_INSTALL:-}" ]; then
    PG_CONFIG="$PG_BIN/pg_config" bash scripts/install-extension.sh --release
else
    echo "MK_BENCH_SKIP_INSTALL: measuring the build installed in $("$PG_BIN/pg_config" --pkglibdir)"
fi
# Every key of the run tracked in shared memory, with room to spare.
MAX_TRACKED=$(.venv/bin/python bench/shared.py --print-max-tracked-keys "$@")

WORK=$(mktemp -d /tmp/makima-keys-shared.XXXXXX)
chmod 755 "$WORK"
stop() {
    bash scripts/cluster.sh stop "$1"
    ! [ -f "$1/data/postmaster.pid" ]
}
cleanup() {
    local status=$? left=0 t0
    stop "$WORK/plain" || left=1
    if [ -f "$WORK/preloaded/data/postmaster.pid" ]; then
        t0=$(date +%s%N)
        if stop "$WORK/preloaded"; then
            echo "PASS  fast shutdown of the preloaded cluster: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
        else
            echo "FAIL  fast shutdown of the preloaded cluster: pg_ctl gave up" >&2
            left=1
        fi
    fi
    if [ "$left" = 1 ]; then
        echo "a cluster is still running; left in $WORK" >&2
        exit 1
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
bash scripts/cluster.sh start "$WORK/preloaded" "$PORT" shared_preload_libraries=makima_keys \
    makima_keys.max_tracked_keys="$MAX_TRACKED" shared_buffers=2GB max_connections=50
bash scripts/cluster.sh start "$WORK/plain" "$((PORT + 1))" shared_buffers=2GB max_connections=50
PATH="$PG_BIN:$PATH" .venv/bin/python bench/shared.py --port "$PORT" --plain-port "$((PORT + 1))" \
    --probe-port "$((PORT + 2))" --log "$WORK/preloaded/server.log" "$@"
