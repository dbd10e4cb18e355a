#!/usr/bin/env bash
# The psql client: client.sh scenario | issue USER_ID | verify KEY [KEY ...]
# Keys go through psql variables, never pasted into the script text.
set -euo pipefail
here=$(dirname "$0")
mode=$1; shift
psql() { command psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }
case "$mode" in
scenario) psql -v nogrant="$MK_NOGRANT_ROLE" -f "$here/scenario.sql" ;;
issue)    psql -v user="$1" <<< "SELECT key FROM mk_issue_key(:'user')" ;;
verify)
    for key in "$@"; do
        psql -v key="$key" <<< "SELECT coalesce(mk_verify(:'key')::text, 'null')"
    done ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
