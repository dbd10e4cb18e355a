#!/usr/bin/env bash
# Builds an installable Debian package of makima_keys for PostgreSQL 15:
#   target/debian/postgresql-15-makima-keys_VERSION-1_ARCH.deb
# from `cargo pgrx package` output, with Debian's dpkg-deb. Install it with
#   apt-get install ./target/debian/postgresql-15-makima-keys_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

pg_major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
version=$(sed -nE 's/^version = "(.*)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
name=postgresql-$pg_major-makima-keys

cargo pgrx package --pg-config "$PG_CONFIG" >&2
staged=target/release/makima_keys-pg$pg_major
root=target/debian/$name
rm -rf "$root"
mkdir -p "$root/DEBIAN"
cp -a "$staged/." "$root/"
# Earlier versions' install scripts, which pgrx does not copy (see install-extension.sh).
install -m 644 sql/makima_keys--*.sql "$root$("$PG_CONFIG" --sharedir)/extension/"
doc=$root/usr/share/doc/$name
mkdir -p "$doc"
cp README.md "$doc/"
cat > "$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $version-1
Architecture: $arch
Maintainer: makima_keys developers <noreply@example.invalid>
Depends: postgresql-$pg_major, libc6
Section: database
Priority: optional
Description: API keys inside PostgreSQL $pg_major (issue, hash, verify, revoke)
 makima_keys is a PostgreSQL extension that issues, hashes, verifies and
 revokes API keys in SQL functions, so every client gets the same key format,
 hash and errors. After installing: CREATE EXTENSION makima_keys;
CONTROL
deb=target/debian/${name}_${version}-1_${arch}.deb
dpkg-deb --root-owner-group --build "$root" "$deb" >&2
echo "$deb"
