"""Pytest fixture and helper for the stand-in systemctl, sudo, make and Katapult tree.

`standins` puts tests/standins/bin first on PATH and points KFLASHD_STANDIN_DIR at a fresh
directory that every stand-in records its calls into (calls.jsonl) and reads its
behaviour from (<prog>.json, re-read at every call). The directory is world-writable so a
stand-in running as another user (make runs as the Klipper tree's owner) can record too, and
the stand-ins themselves run from the suite's public copy (tests/support/public.py), which
that user can reach even when the checkout is in a 0700 home.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.support import public
from tests.support.wait import wait_until  # noqa: F401  (re-exported for the tests)

STANDINS_DIR = public.root() / "standins"
BIN_DIR = STANDINS_DIR / "bin"
KATAPULT_DIR = STANDINS_DIR / "katapult"
FLASHTOOL = KATAPULT_DIR / "scripts" / "flashtool.py"


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


class Standins:
    """Reads what the stand-ins recorded and tells them how to behave."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.calls_path = self.dir / "calls.jsonl"
        (self.dir / "units").mkdir(exist_ok=True)
        os.chmod(self.dir / "units", 0o777)
        self.calls_path.touch()
        os.chmod(self.calls_path, 0o666)

    # -- behaviour
    def set(self, prog: str, behaviour: Dict[str, Any]) -> None:
        """Replace <prog>.json (prog: systemctl, sudo, make, flashtool) atomically."""
        tmp = self.dir / f".{prog}.json.tmp"
        tmp.write_text(json.dumps(behaviour))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.dir / f"{prog}.json")
        for stale in self.dir.glob(f"{prog}.*.count"):
            stale.unlink()

    # -- calls
    def calls(self, prog: Optional[str] = None, **match: Any) -> List[Dict[str, Any]]:
        """Recorded calls in order, optionally only `prog`'s and those whose fields match."""
        out = []
        for line in self.calls_path.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if prog is not None and entry.get("prog") != prog:
                continue
            if all(entry.get(k) == v for k, v in match.items()):
                out.append(entry)
        return out

    def systemctl_verbs(self) -> List[str]:
        """e.g. ["stop", "start"]: the order in which systemctl was asked to do things.

        `show` (the print guard reading units' sockets and states) changes nothing and is
        left out; `standins.calls("systemctl", verb="show")` counts those.
        """
        return [c["verb"] for c in self.calls("systemctl") if "verb" in c and c["verb"] != "show"]

    def child_pids(self, prog: str) -> List[int]:
        """Pids of the children that hang modes forked (to prove they were killed)."""
        return [c["child_pid"] for c in self.calls(prog) if c.get("event") == "child"]

    # -- units
    def unit_state(self, unit: str = "klipper") -> str:
        try:
            return (self.dir / "units" / unit).read_text().strip() or "inactive"
        except FileNotFoundError:
            return "inactive"

    def set_unit_state(self, unit: str, state: str) -> None:
        (self.dir / "units" / unit).write_text(state + "\n")

    def set_unit_exec(self, unit: str, argv: List[str]) -> None:
        """Make `systemctl start UNIT` launch `argv` detached (and stop terminate it)."""
        (self.dir / "units" / f"{unit}.exec").write_text(json.dumps(argv))

    def set_unit_file(self, unit: str, text: str) -> None:
        """The unit file `systemctl show UNIT` renders ExecStart=, EnvironmentFile= and
        Environment= from (e.g. KIAUH's: EnvironmentFile=... and ExecStart=... $KLIPPER_ARGS)."""
        (self.dir / "units" / f"{unit}.service").write_text(text)

    def unit_pid(self, unit: str = "klipper") -> Optional[int]:
        try:
            return int((self.dir / "units" / f"{unit}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """An environment for a child process that should use the stand-ins."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
        env["KFLASHD_STANDIN_DIR"] = str(self.dir)
        return env

    def cleanup(self) -> None:
        """Kill what the stand-ins left running (unit processes, hung children)."""
        pids = [p for p in (self.unit_pid(u.stem) for u in (self.dir / "units").glob("*.pid")) if p]
        for prog in ("make", "flashtool", "systemctl"):
            pids += self.child_pids(prog)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Standins]:
    directory = tempfile.mkdtemp(prefix="kflashd-standins-")
    os.chmod(directory, 0o777)
    helper = Standins(directory)
    monkeypatch.setenv("PATH", f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("KFLASHD_STANDIN_DIR", directory)
    try:
        yield helper
    finally:
        helper.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


KLIPPER_TREE = STANDINS_DIR / "klipper"
NOBODY = 65534


def git(tree: Path, *args: str, owner: int = NOBODY) -> str:
    """Run git in the stand-in tree as its owner (as kflashd does: no dubious-ownership refusal)."""
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tree), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    result = subprocess.run(["git", *args], cwd=str(tree), env=env, capture_output=True, text=True,
                            timeout=30, user=owner, group=owner, extra_groups=[])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def make_klipper_tree(parent: Path, owner: int = NOBODY, tag: str = "v0.13.0") -> Path:
    """A git checkout of the stand-in Klipper tree at `parent/klipper`, owned by `owner`.

    Its version (what a build embeds) is `git describe --always --tags --long --dirty`;
    `klipper_tree_update()` adds a commit, as `git pull` would.
    """
    tree = parent / "klipper"
    shutil.copytree(KLIPPER_TREE, tree)
    for path in [tree, *tree.rglob("*")]:
        os.chown(path, owner, owner)
    git(tree, "init", "-q", owner=owner)
    git(tree, "add", "-A", owner=owner)
    git(tree, "commit", "-q", "-m", "stand-in Klipper", owner=owner)
    git(tree, "tag", tag, owner=owner)
    return tree


def klipper_tree_version(tree: Path, owner: int = NOBODY) -> str:
    return git(tree, "describe", "--always", "--tags", "--long", "--dirty", owner=owner)


def klipper_tree_update(tree: Path, owner: int = NOBODY) -> str:
    """A new commit in the tree (the user pulled Klipper); returns the new version."""
    git(tree, "commit", "-q", "--allow-empty", "-m", "an update", owner=owner)
    return klipper_tree_version(tree, owner)


def write_kconfig(path: Path, mcu: str, **options: str) -> Path:
    """A saved Klipper .config for one board (CONFIG_MCU plus `KFLASHD_TEST_*` knobs)."""
    lines = ["# saved by the user", f'CONFIG_MCU="{mcu}"']
    lines += [f"CONFIG_{key.upper()}={value}" for key, value in options.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
