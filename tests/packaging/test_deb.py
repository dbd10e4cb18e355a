"""The Debian package installs into a PostgreSQL 15 that has no makima_keys,
CREATE EXTENSION works from it, and removing the package removes every file.

Run by scripts/test.sh after the client tests: it replaces the extension
installed in the system's PostgreSQL 15 by the packaged build."""

import glob
import os
import pathlib
import subprocess
import tempfile

import psycopg

REPO = pathlib.Path(__file__).resolve().parents[2]
PORT = str(int(os.environ.get("PGPORT", "26329")) + 6)
LIB = pathlib.Path("/usr/lib/postgresql/15/lib")
SHARE = pathlib.Path("/usr/share/postgresql/15/extension")
PACKAGE = "postgresql-15-makima-keys"


def run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def installed_files():
    return sorted(str(p) for p in [*LIB.glob("makima_keys*"), *SHARE.glob("makima_keys*")])


def test_deb_installs_into_a_clean_postgresql_15_and_uninstalls_cleanly():
    deb = subprocess.run(["bash", str(REPO / "scripts/package.sh")], check=True, capture_output=True, text=True,
                         env={**os.environ, "MK_PG_MAJOR": "15"}).stdout.strip().splitlines()[-1]
    deb = str(REPO / deb)
    assert run("dpkg-deb", "-f", deb, "Package").strip() == PACKAGE

    # A PostgreSQL 15 without makima_keys: remove what development installs left.
    subprocess.run(["dpkg", "-r", PACKAGE], capture_output=True)
    for path in installed_files():
        os.remove(path)
    assert installed_files() == []

    run("dpkg", "-i", deb)
    owned = run("dpkg", "-L", PACKAGE).split()
    for path in (LIB / "makima_keys.so", SHARE / "makima_keys.control", SHARE / "makima_keys--0.2.1.sql", SHARE / "makima_keys--0.2.0.sql",
                 SHARE / "makima_keys--0.1.0.sql", SHARE / "makima_keys--0.1.0--0.2.0.sql",
                 SHARE / "makima_keys--0.2.0--0.2.1.sql"):
        assert str(path) in owned and path.exists()

    root = pathlib.Path(tempfile.mkdtemp(prefix="mk-deb-"))
    os.chmod(root, 0o777)
    cluster = str(REPO / "scripts/cluster.sh")
    run("bash", cluster, "start", str(root), PORT)
    try:
        info = psycopg.conninfo.make_conninfo(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres")
        with psycopg.connect(info, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION makima_keys")
            version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0]
            assert version == "0.2.1"
            user = conn.execute("SELECT gen_random_uuid()").fetchone()[0]
            key = conn.execute("SELECT key FROM mk_issue_key(%s, scopes => '{read}')", (user,)).fetchone()[0]
            assert conn.execute("SELECT mk_verify(%s, '{read}')", (key,)).fetchone()[0] == user
            conn.execute("DROP EXTENSION makima_keys")
            # The package also upgrades a database that is at 0.1.0.
            conn.execute("CREATE EXTENSION makima_keys VERSION '0.1.0'")
            key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
            conn.execute("ALTER EXTENSION makima_keys UPDATE")
            version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0]
            assert version == "0.2.1"
            assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
            conn.execute("DROP EXTENSION makima_keys")
    finally:
        run("bash", cluster, "stop", str(root))
        run("rm", "-rf", str(root))

    run("dpkg", "-r", PACKAGE)
    assert installed_files() == []
    assert not glob.glob(f"/usr/share/doc/{PACKAGE}")
