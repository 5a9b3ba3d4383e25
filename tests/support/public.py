"""What other users run during the suite, copied to where they can reach it.

Some tests run programs as another user, as a real host does: `make flash` runs as the Klipper
tree's owner (nobody here), kflashctl and a control client run as nobody to prove the control
socket's permissions, and install.sh must refuse a caller who is not root. A checkout in a
home directory (Debian 12 creates homes with mode 0700) or under /root is closed to every
other user: they cannot even reach the venv's python. So nothing another user runs may come
from the checkout. On first use this module copies the kflashd package, the stand-ins and
install.sh into a fresh world-readable directory under the system's temp dir (removed when the
process exits) and names an interpreter that every user can run. The copy is made once per
process, so it is always what the checkout holds now.

The demo and the benchmark use it too (through tests/e2e/harness.py): it must not import
pytest.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List

REPO = Path(__file__).resolve().parents[2]

# checkout path -> path inside the public tree
_COPIED = {
    "kflashd": "kflashd",
    "tests/standins": "standins",  # bin/, katapult/, klipper/: all run by or as others
    "install.sh": "install.sh",
}


def unreachable_parts(path: Path) -> List[str]:
    """Directories on the way to `path` that other users may not enter (empty: reachable).

    A user who is neither owner nor in the group needs the "other" execute bit on every
    directory from / down; that is what a 0700 home takes away.
    """
    path = Path(os.path.abspath(path))
    blocked = []
    for directory in reversed(path.parents):
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            blocked.append(f"{directory} (mode {stat.S_IMODE(os.stat(directory).st_mode):04o})")
    return blocked


def _open_up(top: Path) -> None:
    """Readable by all; directories and executables enterable/runnable by all.

    The checkout's own modes may be closed too (a umask of 077 gives 0600 files).
    """
    for dirpath, dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.stat(path).st_mode
            os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)


PREFIX = "kflashd-public-"
OWNER_FILE = ".owner"  # "PIDNS PID START" of the process that made the tree


def _identity(pid: int) -> str:
    """"PIDNS PID START" of a live process, or "" if there is no such process.

    The start time (clock ticks since boot) tells a live owner from a later process given
    the same pid; the pid namespace tells whether the pid means anything here at all.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
        with open(f"/proc/{pid}/stat") as f:
            return f"{namespace} {pid} {f.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return ""


def _remove_orphans() -> None:
    """Remove trees whose process died without its atexit (SIGKILL, a timeout's SIGTERM)."""
    namespace = os.readlink("/proc/self/ns/pid")
    for tree in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            owner_ns, pid, start = (tree / OWNER_FILE).read_text().split()
            if owner_ns != namespace:
                continue  # another pid namespace's process: not ours to judge
            gone = _identity(int(pid)) != f"{owner_ns} {pid} {start}"
        except (OSError, ValueError):
            continue  # being made right now, or not a tree this module wrote
        if gone:
            shutil.rmtree(tree, ignore_errors=True)


def open_dir(prefix: str) -> Iterator[Path]:
    """For a fixture: a fresh temp dir every user may enter but not write (pytest's tmp_path
    is root-only, and the daemon's children run as other users); removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def root() -> Path:
    """The public tree: kflashd/, standins/ (bin/, katapult/, klipper/), install.sh."""
    _remove_orphans()
    top = Path(tempfile.mkdtemp(prefix=PREFIX))
    owner = os.getpid()
    (top / OWNER_FILE).write_text(_identity(owner) + "\n")
    # Forked children inherit atexit handlers; only the process that made the tree removes it.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(top, ignore_errors=True))
    for source, target in _COPIED.items():
        src, dst = REPO / source, top / target
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    _open_up(top)
    blocked = unreachable_parts(top)
    if blocked:
        raise RuntimeError(f"the suite's public tree {top} is closed to other users by: "
                           f"{', '.join(blocked)}; set TMPDIR to a directory all users can enter")
    return top


@functools.lru_cache(maxsize=None)
def python() -> str:
    """An interpreter every user can run: the one behind the venv, not the venv's own link.

    A venv's bin/python lives in the checkout; the interpreter it links to (Debian's
    /usr/bin/python3.x for scripts/setup's venv) does not. Run it with the public tree as the
    working directory (`-m`/`-c` put that first on sys.path) so it imports the copied kflashd.
    """
    interpreter = os.path.realpath(sys.executable)
    blocked = unreachable_parts(Path(interpreter))
    if blocked or not os.stat(interpreter).st_mode & stat.S_IXOTH:
        raise RuntimeError(f"{interpreter} (behind {sys.executable}) cannot be run by other users "
                           f"({', '.join(blocked) or 'not executable by others'}); "
                           "create the venv from /usr/bin/python3 (scripts/setup does)")
    return interpreter
