#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script):
#   1. pure-Rust unit tests and #[pg_test] in-server tests (cargo pgrx test)
#   2. SQL regression files (pg_regress against a throwaway cluster)
#   3. client tests over real connections (pytest), same cluster
#   4. the Debian package, installed into a PostgreSQL 15 without makima_keys
# Installs what it needs first. Run as root on Debian 12.
# Arguments go to pytest; MK_CLIENT_TESTS_ONLY=1 skips steps 1 and 2
# (scripts/stress.sh uses both).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
PORT=${MK_TEST_PORT:-26329}

bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

WORK=$(mktemp -d /tmp/makima-keys-test.XXXXXX)
chmod 755 "$WORK"
cleanup() {
    bash scripts/cluster.sh stop "$WORK/cluster" || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${MK_CLIENT_TESTS_ONLY:-}" ]; then
    echo "== 1/4 unit and in-server tests (cargo pgrx test)"
    mkdir -p "$WORK/pgrx-data"
    chown postgres "$WORK/pgrx-data"
    cargo pgrx test pg15 --runas postgres --pgdata "$WORK/pgrx-data"
fi

echo "== install the extension into PostgreSQL 15"
# cargo pgrx test installed a build with the test schema; replace it.
bash scripts/install-extension.sh

echo "== start a throwaway cluster on 127.0.0.1:$PORT"
bash scripts/cluster.sh start "$WORK/cluster" "$PORT"
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres

if [ -z "${MK_CLIENT_TESTS_ONLY:-}" ]; then
echo "== 2/4 SQL regression tests (pg_regress)"
"$PG_BIN/psql" -X -q -d postgres -c "DROP DATABASE IF EXISTS makima_keys_regress" \
    -c "CREATE DATABASE makima_keys_regress TEMPLATE template0 ENCODING 'UTF8'"
# setup first (it creates the extension), then the rest in name order.
regress_tests="setup $(cd tests/pg_regress/sql && ls *.sql | grep -v '^setup.sql$' | sed 's/\.sql$//' | tr '\n' ' ')"
if ! "$(dirname "$("$PG_CONFIG" --pgxs)")/../test/regress/pg_regress" \
        --use-existing --host="$PGHOST" --port="$PGPORT" --user=postgres \
        --dbname=makima_keys_regress --inputdir=tests/pg_regress --outputdir="$WORK/regress" \
        $regress_tests; then
    cat "$WORK/regress/regression.diffs" 2>/dev/null || true
    exit 1
fi
fi

echo "== 3/4 client tests (pytest: psycopg, SQLAlchemy, node-postgres, tokio-postgres, psql)"
cargo build -q --locked --manifest-path tests/clients/rust/Cargo.toml
# Arguments select tests (pytest syntax); by default all of tests/clients.
[ $# -gt 0 ] || set -- tests/clients
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

if [ -z "${MK_CLIENT_TESTS_ONLY:-}" ]; then
    echo "== 4/4 packaging (.deb into a clean PostgreSQL 15)"
    bash scripts/cluster.sh stop "$WORK/cluster"
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/packaging
fi
