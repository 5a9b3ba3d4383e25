"""Builds for `kflashctl update`: the stand-in Klipper tree built by real GNU make, as its owner.

The tree (tests/standins/klipper) is a git checkout owned by `nobody`; its Makefile honours
KCONFIG_CONFIG, OUT and olddefconfig like Klipper's, and its "compiler" writes a klipper.bin
with the data dictionary embedded (MCU from the config, version from `git describe`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kflashd import build
from tests.farm.images import find_dict
from tests.support import public
from tests.standins.fixtures import (
    NOBODY,
    klipper_tree_update,
    klipper_tree_version,
    make_klipper_tree,
    write_kconfig,
)

MCU = "stm32f446xx"


@pytest.fixture
def work():
    """A world-traversable directory (the builder, `nobody`, must reach state_dir/builds)."""
    yield from public.open_dir("kflashd-build-")


def run_build(work: Path, kconfig: Path, name: str = "octopus", progress=None, timeout: float = 60):
    return build.build_board(name, str(kconfig), str(work / "klipper"), str(work / "state"),
                             timeout, 1 << 20, progress=progress)


@pytest.fixture
def tree(work, standins):
    (work / "state").mkdir(mode=0o700)
    return make_klipper_tree(work)


def test_build_as_the_trees_owner_into_a_private_dir(work, tree, standins):
    saved = write_kconfig(work / "octopus.config", MCU)
    before = saved.read_bytes()
    seen = []

    result = run_build(work, saved, progress=lambda lines, pct: seen.append((lines, pct)))

    assert result.ok, result.message
    assert result.info.mcu == MCU
    assert result.info.version == klipper_tree_version(tree)
    assert find_dict(result.image)["config"]["MCU"] == MCU
    # The user's files are untouched: saved kconfig, and no out/ or .config in the tree.
    assert saved.read_bytes() == before
    assert not (tree / "out").exists() and not (tree / ".config").exists()
    # Built as the tree's owner, from a copy that olddefconfig rewrote, into the private dir.
    builds = [c for c in standins.calls("make") if not c.get("query")]
    assert [c["targets"] for c in builds] == [["olddefconfig"], []]
    private = work / "state" / "builds" / "octopus"
    for call in builds:
        assert call["uid"] == NOBODY
        assert call["variables"]["KCONFIG_CONFIG"] == str(private / "config")
        assert call["variables"]["OUT"] == f"{private}/out/"
        assert call["cwd"] == str(tree)
    assert "CONFIG_KFLASHD_TEST_LINES=24" in (private / "config").read_text()
    assert (private / "out" / "klipper.bin").read_bytes() == result.image
    # Progress is the compiler's lines, counted; a percentage once a build said how many.
    assert seen and seen[-1][0] == result.lines and all(p is None for _, p in seen)
    seen.clear()
    assert run_build(work, saved, progress=lambda lines, pct: seen.append((lines, pct))).ok
    assert any(p is not None and 0 < p < 100 for _, p in seen), seen


def test_failed_build_says_the_compilers_last_lines(work, tree, standins):
    saved = write_kconfig(work / "bad.config", MCU, kflashd_test_fail="y")
    result = run_build(work, saved)
    assert not result.ok
    assert "error: 'CONFIG_CLOCK_FREQ' undeclared" in result.message, result.message
    assert result.message.startswith("build failed (exit status 2)"), result.message


def test_tree_version_is_git_describe_and_unknown_when_dirty(work, tree, standins):
    assert build.tree_version(str(tree), NOBODY) == klipper_tree_version(tree)
    new = klipper_tree_update(tree)
    assert build.tree_version(str(tree), NOBODY) == new
    (tree / "Makefile").write_text((tree / "Makefile").read_text() + "\n# local change\n")
    # A dirty tree's build gets a timestamp: its version can never be "already running".
    assert build.tree_version(str(tree), NOBODY) is None


def test_a_tree_owned_by_someone_else_is_not_built_by_a_non_root_daemon(work, tree, monkeypatch):
    monkeypatch.setattr(build.os, "geteuid", lambda: 1234)
    with pytest.raises(build.BuildRefused, match="builds run as the tree's owner"):
        build.build_user(str(tree))


def test_private_dir_names_cannot_escape(work):
    assert build.private_dir("/s", "../../etc").startswith("/s/builds/")
    assert "/" not in build.private_dir("/s", "a/b")[len("/s/builds/"):]
