"""The suite's public tree: what other users run must be reachable from a closed checkout.

A checkout in a Debian 12 home (0700) or under /root is closed to nobody, who runs `make`
(as the Klipper tree's owner), kflashctl and control clients in the suite. These tests pin
down that the copies those users get are theirs to run; .ci/run runs the whole suite from a
0700 directory so that a test handing them a checkout path fails in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.standins.fixtures import BIN_DIR, FLASHTOOL, Standins
from tests.support import public


def test_a_closed_home_is_named(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="kflashd-home-"))
    try:
        os.chmod(home, 0o700)
        checkout = home / "kflashd"
        checkout.mkdir(mode=0o755)
        blocked = public.unreachable_parts(checkout)
        assert blocked == [f"{home} (mode 0700)"]
    finally:
        os.rmdir(checkout)
        os.rmdir(home)


def test_everything_other_users_run_is_outside_the_checkout() -> None:
    top = public.root()
    assert public.unreachable_parts(top / "kflashd" / "ctl.py") == []
    assert public.unreachable_parts(Path(public.python())) == []
    for path in (top / "kflashd", BIN_DIR, FLASHTOOL, top / "install.sh", Path(public.python())):
        assert public.REPO not in Path(path).resolve().parents, path


def test_nobody_runs_kflashctl_and_the_make_standin(standins: Standins) -> None:
    env = {"PATH": f"{BIN_DIR}:/usr/bin:/bin", "HOME": "/nonexistent",
           "KFLASHD_STANDIN_DIR": str(standins.dir), "PYTHONDONTWRITEBYTECODE": "1"}
    as_nobody = dict(user="nobody", group="nogroup", extra_groups=[], env=env, cwd=str(public.root()),
                     capture_output=True, text=True, timeout=30)

    ctl = subprocess.run([public.python(), "-c", "import kflashd.ctl; print(kflashd.ctl.__file__)"],
                         **as_nobody)
    assert ctl.returncode == 0, ctl.stderr
    assert ctl.stdout.strip() == str(public.root() / "kflashd" / "ctl.py")

    make = subprocess.run(["make", "-q", "out/klipper.bin"], **as_nobody)
    assert make.returncode == 0, make.stderr
    call = standins.calls("make")[-1]
    assert call["uid"] == 65534 and call["query"] is True

    tool = subprocess.run([public.python(), str(FLASHTOOL), "--help"], **as_nobody)
    assert tool.returncode == 0 and "-d" in tool.stdout, tool.stderr


def test_trees_of_dead_processes_are_removed_others_kept() -> None:
    # A run killed outright (SIGKILL, a timeout's SIGTERM) never ran its atexit.
    child = subprocess.Popen(["sleep", "30"])
    dead_owner = public._identity(child.pid)
    child.kill()
    child.wait()
    trees = {}
    for name, owner in (("dead", dead_owner), ("live", public._identity(os.getpid())), ("unowned", None)):
        trees[name] = Path(tempfile.mkdtemp(prefix=public.PREFIX))
        if owner is not None:
            (trees[name] / public.OWNER_FILE).write_text(owner + "\n")
    try:
        assert dead_owner and public._identity(child.pid) != dead_owner
        public._remove_orphans()
        assert not trees["dead"].exists()
        assert trees["live"].exists() and trees["unowned"].exists()
        assert public.root().exists()  # this run's own tree is live
    finally:
        for tree in trees.values():
            shutil.rmtree(tree, ignore_errors=True)
