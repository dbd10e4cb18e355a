#!/usr/bin/env bash
# Builds an installable package of makima_keys for one PostgreSQL major
# (default 15) from `cargo pgrx package` output, and prints its path:
#   15: target/debian/postgresql-15-makima-keys_VERSION-1_ARCH.deb (Debian's dpkg-deb),
#       for Debian's postgresql-15:  apt-get install ./postgresql-15-makima-keys_*.deb
#   16, 17, 18: target/dist/makima_keys-VERSION-pgNN-ARCH.tar.gz, for any PostgreSQL
#       NN built for x86-64 Linux: unpack, then `sh install.sh /path/to/pg_config`
#       copies lib/ into `pg_config --pkglibdir` and extension/ into
#       `pg_config --sharedir`/extension.
# Usage: MK_PG_MAJOR=18 bash scripts/package.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg-versions.sh
MK_PG_MAJOR=${MK_PG_MAJOR:-15}
PG_CONFIG=${PG_CONFIG:-$(pg_config_for "$MK_PG_MAJOR")}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/pg$MK_PG_MAJOR}
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

pg_major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
[ "$pg_major" = "$MK_PG_MAJOR" ] || { echo "$PG_CONFIG is PostgreSQL $pg_major, not $MK_PG_MAJOR" >&2; exit 1; }
version=$(sed -nE 's/^version = "(.*)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)

staged=$CARGO_TARGET_DIR/release/makima_keys-pg$pg_major
# cargo pgrx package adds to what an earlier run staged: start empty, so that
# no install script of an earlier version's build is shipped by mistake.
rm -rf "$staged"
cargo pgrx package --pg-config "$PG_CONFIG" --no-default-features --features "pg$pg_major" >&2
pkglibdir=$("$PG_CONFIG" --pkglibdir)
sharedir=$("$PG_CONFIG" --sharedir)

if [ "$pg_major" = 15 ]; then
    name=postgresql-$pg_major-makima-keys
    root=target/debian/$name
    rm -rf "$root"
    mkdir -p "$root/DEBIAN"
    cp -a "$staged/." "$root/"
    # Earlier versions' install scripts, which pgrx does not copy (see install-extension.sh).
    install -m 644 sql/makima_keys--*.sql "$root$sharedir/extension/"
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
    exit 0
fi

# Other majors: a relocatable tarball, since their trees may live anywhere.
name=makima_keys-$version-pg$pg_major-$arch
root=target/dist/$name
rm -rf "$root"
mkdir -p "$root/lib" "$root/extension"
cp "$staged$pkglibdir/makima_keys.so" "$root/lib/"
cp "$staged$sharedir/extension/"makima_keys* "$root/extension/"
install -m 644 sql/makima_keys--*.sql "$root/extension/"
cp README.md "$root/"
cat > "$root/install.sh" <<INSTALL
#!/bin/sh
# Installs makima_keys $version into the PostgreSQL $pg_major whose pg_config is given.
set -eu
pg_config=\${1:?usage: sh install.sh /path/to/pg_config}
major=\$("\$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\\1/')
[ "\$major" = $pg_major ] || { echo "this package is for PostgreSQL $pg_major, \$pg_config is \$major" >&2; exit 1; }
here=\$(dirname "\$0")
libdir=\$("\$pg_config" --pkglibdir)
extdir=\$("\$pg_config" --sharedir)/extension
[ -d "\$libdir" ] && [ -d "\$extdir" ] || { echo "\$pg_config names no installation" >&2; exit 1; }
install -m 755 "\$here/lib/makima_keys.so" "\$libdir/"
install -m 644 "\$here"/extension/* "\$extdir/"
echo "makima_keys $version installed into PostgreSQL $pg_major; now: CREATE EXTENSION makima_keys;"
INSTALL
tarball=target/dist/$name.tar.gz
tar -C target/dist -czf "$tarball" "$name"
echo "$tarball"
