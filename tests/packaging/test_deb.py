"""The Debian package installs into a PostgreSQL 15 that has no makima_keys,
CREATE EXTENSION works from it, and removing the package removes every file.

Run by scripts/test.sh after the client tests: it replaces the extension
installed in the system's PostgreSQL 15 by the packaged build."""

import glob
import os
import pathlib
import subprocess

from packaged import REPO, check_in_a_cluster, expected_files, run

LIB = pathlib.Path("/usr/lib/postgresql/15/lib")
SHARE = pathlib.Path("/usr/share/postgresql/15/extension")
PACKAGE = "postgresql-15-makima-keys"


def installed_files():
    return sorted(str(p) for p in [*LIB.glob("makima_keys*"), *SHARE.glob("makima_keys*")])


def test_deb_installs_into_a_clean_postgresql_15_and_uninstalls_cleanly():
    deb = run("bash", str(REPO / "scripts/package.sh"), env={"MK_PG_MAJOR": "15"}).strip().splitlines()[-1]
    deb = str(REPO / deb)
    assert run("dpkg-deb", "-f", deb, "Package").strip() == PACKAGE

    # A PostgreSQL 15 without makima_keys: remove what development installs left.
    subprocess.run(["dpkg", "-r", PACKAGE], capture_output=True)
    for path in installed_files():
        os.remove(path)
    assert installed_files() == []

    run("dpkg", "-i", deb)
    owned = run("dpkg", "-L", PACKAGE).split()
    for path in expected_files(LIB, SHARE):
        assert str(path) in owned and path.exists()
    # Exactly these: no script left over from an earlier build is shipped.
    assert installed_files() == sorted(str(p) for p in expected_files(LIB, SHARE))
    check_in_a_cluster(pathlib.Path("/usr/lib/postgresql/15/bin"), 15)

    run("dpkg", "-r", PACKAGE)
    assert installed_files() == []
    assert not glob.glob(f"/usr/share/doc/{PACKAGE}")
