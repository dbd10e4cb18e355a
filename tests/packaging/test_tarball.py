"""The package trees of PostgreSQL 16, 17 and 18: `scripts/package.sh` builds a
tarball, its install.sh puts it into a tree without makima_keys, and CREATE
EXTENSION, an issue and a verification work from it (also the update from
0.1.0). Run by scripts/test.sh after the client tests; it leaves the packaged
build installed in each tree."""

import pathlib
import tempfile

import pytest

from packaged import EXTENSION_FILES, REPO, VERSION, check_in_a_cluster, expected_files, run


def pg_config_for(major):
    return run("bash", "-c", f". {REPO}/scripts/pg-versions.sh && pg_config_for {major}").strip()


@pytest.mark.parametrize("major", [16, 17, 18])
def test_tarball_installs_into_a_clean_tree(major):
    pg_config = pg_config_for(major)
    tarball = REPO / run("bash", str(REPO / "scripts/package.sh"), env={"MK_PG_MAJOR": str(major)}).strip().splitlines()[-1]
    assert tarball.name.startswith(f"makima_keys-{VERSION}-pg{major}-")

    libdir = pathlib.Path(run(pg_config, "--pkglibdir").strip())
    extdir = pathlib.Path(run(pg_config, "--sharedir").strip()) / "extension"
    for path in [*libdir.glob("makima_keys*"), *extdir.glob("makima_keys*")]:
        path.unlink()

    with tempfile.TemporaryDirectory(prefix="mk-tarball-") as unpack:
        run("tar", "-xzf", str(tarball), "-C", unpack)
        (script,) = pathlib.Path(unpack).glob("*/install.sh")
        run("sh", str(script), pg_config)
    for path in expected_files(libdir, extdir):
        assert path.exists(), path
    # Exactly these: no script left over from an earlier build is shipped.
    assert sorted(p.name for p in extdir.glob("makima_keys*")) == sorted(EXTENSION_FILES)
    check_in_a_cluster(pathlib.Path(pg_config).parent, major)
