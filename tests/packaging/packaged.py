"""What every package test checks once a package is installed: the files it
must put in place, and a throwaway cluster of that major in which CREATE
EXTENSION, a scoped key and the update of a database created at 0.1.0 work."""

import os
import pathlib
import subprocess
import tempfile

import psycopg

REPO = pathlib.Path(__file__).resolve().parents[2]
PORT = str(int(os.environ.get("PGPORT", "26329")) + 6)
VERSION = "0.5.0"
# The library, and the scripts that install and update every shipped version.
LIBRARY = "makima_keys.so"
# (0.2.1 has no install script of its own: CREATE EXTENSION ... VERSION '0.2.1'
# runs 0.2.0's and the update to 0.2.1.)
EXTENSION_FILES = ["makima_keys.control", f"makima_keys--{VERSION}.sql", "makima_keys--0.2.0.sql",
                   "makima_keys--0.1.0.sql", "makima_keys--0.1.0--0.2.0.sql", "makima_keys--0.2.0--0.2.1.sql",
                   "makima_keys--0.2.1--0.3.0.sql", "makima_keys--0.3.0.sql", "makima_keys--0.3.0--0.4.0.sql",
                   "makima_keys--0.4.0.sql", "makima_keys--0.4.0--0.5.0.sql"]


def run(*args, env=None):
    return subprocess.run(args, check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout


def expected_files(libdir, extdir):
    return [pathlib.Path(libdir) / LIBRARY, *(pathlib.Path(extdir) / name for name in EXTENSION_FILES)]


def check_in_a_cluster(pg_bin, major):
    root = pathlib.Path(tempfile.mkdtemp(prefix="mk-package-"))
    os.chmod(root, 0o777)
    cluster = str(REPO / "scripts/cluster.sh")
    env = {"MK_PG_BIN": str(pg_bin)}
    run("bash", cluster, "start", str(root), PORT, env=env)
    try:
        info = psycopg.conninfo.make_conninfo(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres")
        with psycopg.connect(info, autocommit=True) as conn:
            assert conn.execute("SHOW server_version_num").fetchone()[0].startswith(str(major))
            version = "SELECT extversion FROM pg_extension WHERE extname = 'makima_keys'"
            conn.execute("CREATE EXTENSION makima_keys")
            assert conn.execute(version).fetchone()[0] == VERSION
            user = conn.execute("SELECT gen_random_uuid()").fetchone()[0]
            key = conn.execute("SELECT key FROM mk_issue_key(%s, scopes => '{read}')", (user,)).fetchone()[0]
            assert conn.execute("SELECT mk_verify(%s, '{read}')", (key,)).fetchone()[0] == user
            conn.execute("DROP EXTENSION makima_keys")
            # The package also updates a database that is at 0.1.0.
            conn.execute("CREATE EXTENSION makima_keys VERSION '0.1.0'")
            key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
            conn.execute("ALTER EXTENSION makima_keys UPDATE")
            assert conn.execute(version).fetchone()[0] == VERSION
            assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
            conn.execute("DROP EXTENSION makima_keys")
    finally:
        run("bash", cluster, "stop", str(root), env=env)
        run("rm", "-rf", str(root))
