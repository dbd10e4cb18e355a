"""The package trees of PostgreSQL 16 and 18: `scripts/package.sh` builds a
tarball, its install.sh puts it into a tree without makima_keys, and CREATE
EXTENSION, an issue and a verification work from it (also the update from
0.1.0). Run by scripts/test.sh after the client tests; it leaves the packaged
build installed in each tree."""

import os
import pathlib
import subprocess
import tempfile

import psycopg
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PORT = str(int(os.environ.get("PGPORT", "26329")) + 6)


def run(*args, env=None):
    return subprocess.run(args, check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout


def pg_config_for(major):
    return run("bash", "-c", f". {REPO}/scripts/pg-versions.sh && pg_config_for {major}").strip()


@pytest.mark.parametrize("major", [16, 18])
def test_tarball_installs_into_a_clean_tree(major):
    pg_config = pg_config_for(major)
    tarball = REPO / run("bash", str(REPO / "scripts/package.sh"), env={"MK_PG_MAJOR": str(major)}).strip().splitlines()[-1]
    assert tarball.name.startswith(f"makima_keys-0.2.1-pg{major}-")

    libdir = pathlib.Path(run(pg_config, "--pkglibdir").strip())
    extdir = pathlib.Path(run(pg_config, "--sharedir").strip()) / "extension"
    for path in [*libdir.glob("makima_keys*"), *extdir.glob("makima_keys*")]:
        path.unlink()

    with tempfile.TemporaryDirectory(prefix="mk-tarball-") as unpack:
        run("tar", "-xzf", str(tarball), "-C", unpack)
        (script,) = pathlib.Path(unpack).glob("*/install.sh")
        run("sh", str(script), pg_config)
    for path in (libdir / "makima_keys.so", extdir / "makima_keys.control", extdir / "makima_keys--0.2.1.sql", extdir / "makima_keys--0.2.0.sql",
                 extdir / "makima_keys--0.1.0.sql", extdir / "makima_keys--0.1.0--0.2.0.sql",
                 extdir / "makima_keys--0.2.0--0.2.1.sql"):
        assert path.exists(), path

    root = pathlib.Path(tempfile.mkdtemp(prefix="mk-tarball-cluster-"))
    os.chmod(root, 0o777)
    cluster = str(REPO / "scripts/cluster.sh")
    env = {"MK_PG_BIN": str(pathlib.Path(pg_config).parent)}
    run("bash", cluster, "start", str(root), PORT, env=env)
    try:
        info = psycopg.conninfo.make_conninfo(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres")
        with psycopg.connect(info, autocommit=True) as conn:
            assert conn.execute("SHOW server_version_num").fetchone()[0].startswith(str(major))
            conn.execute("CREATE EXTENSION makima_keys")
            user = conn.execute("SELECT gen_random_uuid()").fetchone()[0]
            key = conn.execute("SELECT key FROM mk_issue_key(%s, scopes => '{read}')", (user,)).fetchone()[0]
            assert conn.execute("SELECT mk_verify(%s, '{read}')", (key,)).fetchone()[0] == user
            conn.execute("DROP EXTENSION makima_keys")
            conn.execute("CREATE EXTENSION makima_keys VERSION '0.1.0'")
            key = conn.execute("SELECT key FROM mk_issue_key(%s)", (user,)).fetchone()[0]
            conn.execute("ALTER EXTENSION makima_keys UPDATE")
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'makima_keys'").fetchone()[0] == "0.2.1"
            assert conn.execute("SELECT mk_verify(%s)", (key,)).fetchone()[0] == user
    finally:
        run("bash", cluster, "stop", str(root), env=env)
        run("rm", "-rf", str(root))
