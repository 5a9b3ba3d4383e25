"""Building one board's firmware from its saved Klipper config, for `kflashctl update`.

What a person does after `git pull` in ~/klipper, for one board, without touching their
files: the saved config (`[boards.NAME] kconfig`) is copied into a private directory
under `state_dir` (Klipper's `olddefconfig` rewrites the file it is given), then

    make KCONFIG_CONFIG=<copy> OUT=<private>/out/ olddefconfig
    make -jN KCONFIG_CONFIG=<copy> OUT=<private>/out/

run in the Klipper tree as the tree's owner (never as root unless the tree is root's: a
Makefile is code from the user's tree). The user's own `out/`, `.config` and saved kconfig
are never written. Klipper keeps running meanwhile: a build touches no board.

Klipper facts this relies on (Klipper3d/klipper Makefile, scripts/buildcommands.py):
- `OUT` (default `out/`, with its trailing slash) prefixes every build product, and
  `KCONFIG_CONFIG` (default `$(CURDIR)/.config`) names the config that is included and
  that `olddefconfig` updates; both may be given on make's command line.
- The firmware's version is `git describe --always --tags --long --dirty` run in the tree
  when it has a `.git`, else the contents of `klippy/.version`; a dirty tree, a tree
  without git, or a toolchain whose versions cannot be read get the build time and host
  name appended, so such a build never equals a version already running.

Progress is the compiler's output counted in lines (a percentage once a previous build of
the same board said how many lines a whole build has). A failed build's message carries
the last lines of that output. This module never raises for a failed build: the result
says what happened. It never follows a symlink the tree's owner could have planted in the
private directory (that directory is the owner's to write).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import re
import shutil
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Optional

from . import proc
from .errors import BuildError as BuildRefused
from .firmware import ImageInfo, info_from_image

#: Lines of the compiler's output kept for the message of a failed build.
TAIL_LINES = 6
TIMEOUT_GIT = 10.0

BuildProgress = Callable[[int, Optional[int]], None]  # (lines so far, percent or None)

_log = logging.getLogger("kflashd.build")


@dataclass
class BuildResult:
    """What one build produced. `image` is None when it failed (`message` says why)."""

    image: Optional[bytes]
    info: ImageInfo
    message: str
    lines: int
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.image is not None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def build_user(klipper_dir: str) -> int:
    """The uid builds run as: the tree's owner. Raises BuildRefused when that cannot be."""
    try:
        owner = os.stat(klipper_dir).st_uid
    except OSError as e:
        raise BuildRefused(f"no Klipper tree at {klipper_dir} ({e.strerror}); set klipper.dir")
    me = os.geteuid()
    if me != 0 and owner != me:
        raise BuildRefused(
            f"the Klipper tree {klipper_dir} belongs to {_user_name(owner)} and kflashd runs as "
            f"{_user_name(me)}: builds run as the tree's owner; run kflashd as {_user_name(owner)} "
            f"(the installed unit does) or as root"
        )
    return owner


def tree_version(klipper_dir: str, owner: int, abort: Optional[threading.Event] = None) -> Optional[str]:
    """The version a build of this tree gets now, or None when it cannot be known in advance.

    None for a tree without `.git` (Klipper then appends the build time), a dirty tree (the
    same), or git failing; a None never counts as "already current".
    """
    if not os.path.exists(os.path.join(klipper_dir, ".git")):
        return None
    try:
        result = proc.run(
            ["git", "describe", "--always", "--tags", "--long", "--dirty"],
            TIMEOUT_GIT, cwd=klipper_dir, abort=abort, user=_as(owner),
        )
    except (OSError, KeyError):
        return None
    version = result.stdout.strip()
    if not result.ok or not version or "dirty" in version or "\n" in version:
        return None
    return version


def _as(owner: int) -> Optional[int]:
    """proc's `user`: None when we already are the owner (no switch needed or possible)."""
    return None if owner == os.geteuid() else owner


def private_dir(state_dir: str, board_name: str) -> str:
    """`state_dir/builds/<name>`: a config name made safe for a file name (and unique)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", board_name)[:40]
    if safe != board_name:
        safe += "-" + hashlib.sha256(board_name.encode()).hexdigest()[:8]
    return os.path.join(state_dir, "builds", safe)


def _prepare_dir(state_dir: str, directory: str, owner: int) -> None:
    """A fresh private directory owned by the builder, reachable by it and nobody else.

    When kflashd is root and the builder is not, state_dir and builds/ get search (x)
    permission for others: enough to reach the builder's own 0700 directory, while
    listing stays denied and jobs/, images/ stay 0700.
    """
    builds = os.path.dirname(directory)
    os.makedirs(builds, mode=0o700, exist_ok=True)
    if owner != os.geteuid():
        for path in (state_dir, builds):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o011 != 0o011:
                os.chmod(path, mode | 0o011)
    if os.path.lexists(directory):
        if os.path.islink(directory) or not os.path.isdir(directory):
            os.unlink(directory)
        else:
            shutil.rmtree(directory)  # a clean build: nothing left from an older tree state
    os.mkdir(directory, 0o700)
    os.makedirs(os.path.join(directory, "out"), mode=0o700)
    if owner != os.geteuid():
        for path in (directory, os.path.join(directory, "out")):
            os.chown(path, owner, -1)


def _copy_kconfig(kconfig: str, target: str, owner: int) -> None:
    try:
        with open(kconfig, "rb") as f:
            data = f.read(1024 * 1024)
    except OSError as e:
        raise BuildRefused(f"cannot read its kconfig {kconfig} ({e.strerror}): save the board's "
                           f"Klipper .config there (make menuconfig, then copy .config)")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if owner != os.geteuid():
            os.fchown(fd, owner, -1)
    finally:
        os.close(fd)


def _read_private(path: str, limit: int) -> Optional[bytes]:
    """A regular file in the builder's directory, never through a symlink; None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(limit + 1)


def _lines_file(directory: str) -> str:
    # Beside the builder's directory, in builds/ (the daemon's): the builder cannot forge it.
    return directory + ".lines"


def build_board(
    board_name: str,
    kconfig: str,
    klipper_dir: str,
    state_dir: str,
    timeout: float,
    max_image_size: int,
    progress: Optional[BuildProgress] = None,
    abort: Optional[threading.Event] = None,
    log: Optional[logging.Logger] = None,
) -> BuildResult:
    """Build `board_name`'s firmware from `kconfig`; see the module docstring."""
    log = log or _log
    started = time.monotonic()

    def failed(message: str, lines: int = 0) -> BuildResult:
        return BuildResult(None, ImageInfo(), message, lines, time.monotonic() - started)

    make = shutil.which("make")
    if make is None:
        return failed("make not found on PATH (install build-essential)")
    try:
        owner = build_user(klipper_dir)
        directory = private_dir(state_dir, board_name)
        _prepare_dir(state_dir, directory, owner)
        config_copy = os.path.join(directory, "config")
        _copy_kconfig(kconfig, config_copy, owner)
    except BuildRefused as e:
        return failed(str(e))
    except OSError as e:
        return failed(f"cannot prepare the build directory under {state_dir}: {e.strerror or e}")
    out = os.path.join(directory, "out") + "/"
    variables = [f"KCONFIG_CONFIG={config_copy}", f"OUT={out}"]
    user = _as(owner)
    who = _user_name(owner)

    log.info(f"building {board_name} from {kconfig} in {klipper_dir} as {who} into {out}")
    try:
        olddef = proc.run([make, *variables, "olddefconfig"], min(timeout, 120.0),
                          cwd=klipper_dir, abort=abort, user=user)
    except (OSError, KeyError) as e:
        return failed(f"make could not be run as {who}: {e}")
    if not olddef.ok:
        return failed(f"make olddefconfig {olddef.describe_failure()}: {_tail(olddef.output)}")

    expected = _previous_lines(directory)
    counter = _LineCounter(progress, expected)
    jobs = max(1, os.cpu_count() or 1)
    try:
        result = proc.stream([make, f"-j{jobs}", *variables], timeout, counter.feed,
                             cwd=klipper_dir, abort=abort, user=user)
    except (OSError, KeyError) as e:
        return failed(f"make could not be run as {who}: {e}")
    if result.aborted:
        return failed("build interrupted: kflashd is stopping", counter.lines)
    if not result.ok:
        log.warning(f"build of {board_name} failed ({result.describe_failure()}); output:\n{result.output}")
        return failed(f"build failed ({result.describe_failure()}): {_tail(counter.tail)}", counter.lines)

    image = _read_private(os.path.join(out, "klipper.bin"), max_image_size)
    if not image:
        return failed(f"the build succeeded but left no {out}klipper.bin", counter.lines)
    if len(image) > max_image_size:
        return failed(f"{out}klipper.bin is larger than max_image_size ({max_image_size})", counter.lines)
    info = info_from_image(image)
    _remember_lines(directory, counter.lines)
    elapsed = time.monotonic() - started
    log.info(f"built {board_name}: {len(image)} bytes, {info.mcu or 'MCU unknown'}, "
             f"{info.version or 'version unknown'}, {counter.lines} lines in {elapsed:.1f} s")
    return BuildResult(image, info, f"built in {elapsed:.1f} s", counter.lines, elapsed)


class _LineCounter:
    """Counts the compiler's lines as they arrive and keeps the last few for a failure."""

    def __init__(self, progress: Optional[BuildProgress], expected: Optional[int]) -> None:
        self.progress = progress
        self.expected = expected
        self.lines = 0
        self.partial = ""
        self.tail: Deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, stream: str, text: str) -> None:
        text = self.partial + text.replace("\x00", "")
        *complete, self.partial = text.split("\n")
        for line in complete:
            if not line.strip():
                continue
            self.tail.append(line.strip())
            self.lines += 1
        if complete and self.progress is not None:
            percent = min(99, self.lines * 100 // self.expected) if self.expected else None
            self.progress(self.lines, percent)


def _tail(lines) -> str:
    if isinstance(lines, str):
        lines = [l.strip() for l in lines.replace("\x00", "").splitlines() if l.strip()][-TAIL_LINES:]
    return " | ".join(lines) or "no output"


def _previous_lines(directory: str) -> Optional[int]:
    try:
        with open(_lines_file(directory)) as f:
            value = int(f.read().strip())
        return value if value > 0 else None
    except (OSError, ValueError):
        return None


def _remember_lines(directory: str, lines: int) -> None:
    try:
        with open(_lines_file(directory), "w") as f:
            f.write(str(lines))
    except OSError:
        pass  # only a nicer progress next time
