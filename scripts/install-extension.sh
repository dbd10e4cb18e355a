#!/usr/bin/env bash
# Builds makima_keys and installs it into one PostgreSQL major (default 15):
# `cargo pgrx install` (library, control file, the current version's install
# script and the upgrade scripts in sql/), plus the install scripts of earlier
# versions, which pgrx does not copy, so that CREATE EXTENSION ... VERSION
# '0.1.0' works (the upgrade tests start from it). Each major builds in its
# own target/pgNN, so switching majors rebuilds nothing.
# Usage: MK_PG_MAJOR=18 scripts/install-extension.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg-versions.sh
MK_PG_MAJOR=${MK_PG_MAJOR:-15}
PG_CONFIG=${PG_CONFIG:-$(pg_config_for "$MK_PG_MAJOR")}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/pg$MK_PG_MAJOR}
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

cargo pgrx install "$@" --pg-config "$PG_CONFIG" --no-default-features --features "pg$MK_PG_MAJOR" >/dev/null
install -m 644 sql/makima_keys--[0-9]*.[0-9]*.[0-9]*.sql "$("$PG_CONFIG" --sharedir)/extension/"
