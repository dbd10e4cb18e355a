#!/usr/bin/env bash
# Builds makima_keys and installs it into PostgreSQL 15: `cargo pgrx install`
# (library, control file, the current version's install script and the
# upgrade scripts in sql/), plus the install scripts of earlier versions,
# which pgrx does not copy, so that CREATE EXTENSION ... VERSION '0.1.0'
# works (the upgrade tests start from it).
# Usage: scripts/install-extension.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

cargo pgrx install "$@" --pg-config "$PG_CONFIG" >/dev/null
install -m 644 sql/makima_keys--[0-9]*.[0-9]*.[0-9]*.sql "$("$PG_CONFIG" --sharedir)/extension/"
