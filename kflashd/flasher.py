"""Writing an image to a board: Katapult's flashtool.py first, `make flash` as the fallback.

`flash_device()` returns a FlashResult on every path and never raises for a failed flash:
a failed flash is an outcome the daemon records, not a bug. It raises only what it must
not swallow: KeyboardInterrupt and the SIGTERM exception of the service context manager
(the child's process group is killed on the way out, see `proc`).

Safety rules this module owns (docs/design.md, "The flash cycle", steps 5 and 6):
- flashtool.py compares the image's MCU with the board's only when the file is named
  `klipper.bin`, so it always gets a private copy under that name (which also means the
  staged file cannot change under it).
- `make flash` rebuilds and writes the Klipper tree's own `out/klipper.bin`; it runs only
  when that file is byte-for-byte the image being flashed, and as the tree's owner (never
  root: a Makefile is code from the user's tree).
- Every child has a timeout and is killed with its whole process group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Callable, List, Optional, Tuple

from . import proc
from .errors import DiscoveryError
from .models import METHOD_KATAPULT, METHOD_MAKE_FLASH, FlashResult

TIMEOUT_FLASH = 60  # seconds for one flash method (flashtool.py, or make flash)

PHASE_WRITE = "write"
PHASE_VERIFY = "verify"
PHASE_MAKE_FLASH = "make_flash"

#: flashtool.py prints at most 50 `#` per phase, one per 2 % (docs/katapult-protocol.md).
MARKS_PER_PHASE = 50

ProgressCallback = Callable[[str, int], None]  # (phase, percent 0..100)

_log = logging.getLogger("kflashd.flasher")


def verify_device_path(path: str) -> None:
    """Raise DiscoveryError when the board's device node (or its by-id link) is gone."""
    if not path or not os.path.exists(path):  # exists() follows a by-id symlink
        raise DiscoveryError(
            f"Device no longer connected: {path} (was the board unplugged or reset?)"
        )


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ProgressParser:
    """Turns flashtool.py's stdout, fed in arbitrary chunks, into (phase, percent) calls.

    Format (docs/katapult-protocol.md, "stdout during a serial flash"): a line
    `Flashing '…'...` or `Verifying (block count = N)...`, an empty line, then `[`, one
    `#` per 2 % written without newlines, and `]`. A mark is printed at most once per
    block, so an image of fewer than 50 blocks prints one mark per block: then the
    percentage is marks / blocks (the block count comes from the image size and the
    `Block Size:` line for writing, from the `Verifying` line for verifying).
    """

    _BLOCK_SIZE = re.compile(r"Block Size: (\d+) bytes")
    _VERIFY = re.compile(r"Verifying \(block count = (\d+)\)")

    def __init__(
        self, callback: Optional[ProgressCallback], image_size: int, phase_names=None
    ) -> None:
        self.callback = callback
        self.image_size = image_size
        self.block_size = 64
        self.line = ""
        self.phase: Optional[str] = None  # phase announced by the last text line
        self.counting: Optional[str] = None  # phase whose marks we are counting
        self.blocks: Optional[int] = None
        self.marks = 0
        self.last: dict = {}
        self.names = phase_names or {PHASE_WRITE: PHASE_WRITE, PHASE_VERIFY: PHASE_VERIFY}

    def feed(self, text: str) -> None:
        for ch in text.replace("\x00", ""):
            if self.counting is not None:
                if ch == "#":
                    self.marks += 1
                    self._report(self._percent())
                    continue
                if ch == "]":
                    self._report(100)
                    self.counting = None
                    continue
            if ch == "\n":
                self._end_line(self.line)
                self.line = ""
            elif ch == "[" and self.line == "" and self.phase is not None:
                self.counting, self.phase, self.marks = self.phase, None, 0
                self._report(0)
            else:
                self.line += ch

    def _end_line(self, line: str) -> None:
        m = self._BLOCK_SIZE.search(line)
        if m:
            self.block_size = int(m.group(1)) or 64
        if line.startswith("Flashing '"):
            self.phase = PHASE_WRITE
            self.blocks = -(-self.image_size // self.block_size) if self.image_size else None
        m = self._VERIFY.search(line)
        if m:
            self.phase = PHASE_VERIFY
            self.blocks = int(m.group(1))

    def _percent(self) -> int:
        if self.blocks and self.blocks < MARKS_PER_PHASE:
            return min(99, self.marks * 100 // self.blocks)
        return min(99, self.marks * 100 // MARKS_PER_PHASE)

    def _report(self, percent: int) -> None:
        phase = self.counting
        if phase is None or self.callback is None:
            return
        if self.last.get(phase, -1) >= percent:
            return
        self.last[phase] = percent
        self.callback(self.names.get(phase, phase), percent)


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit))(?::\s?(.*))?$")
_CHAIN_LINES = (
    "Traceback (most recent call last):",
    "During handling of the above exception",
    "The above exception was the direct cause",
)


def root_cause(text: str) -> str:
    """The one-line root cause of flashtool.py's (or make's) failure output.

    flashtool.py logs `ERROR:root:Flash Tool Error` and a chained traceback; Python prints
    the innermost exception first, so the first exception line after that marker is the
    cause (a failed CONNECT, then the COMPLETE of the finally that failed too). Messages
    spanning lines (the MCU mismatch) are joined; NUL bytes are dropped.
    """
    text = text.replace("\x00", "")
    lines = text.splitlines()
    start = 0
    for i, line in enumerate(lines):
        if "Flash Tool Error" in line:
            start = i + 1  # the last marker: earlier ones are non-fatal read errors
    for i in range(start, len(lines)):
        m = _EXC_LINE.match(lines[i])
        if not m or lines[i].startswith(" "):
            continue
        message = (m.group(2) or "").strip()
        for extra in lines[i + 1:]:
            if not extra.strip() or extra.startswith(" ") or extra.startswith(_CHAIN_LINES):
                break
            message = f"{message} {extra.strip()}".strip()
        return message or m.group(1)
    meaningful = [
        line.strip()
        for line in lines
        if line.strip() and not line.startswith(" ") and not line.startswith(_CHAIN_LINES)
    ]
    return meaningful[-1] if meaningful else ""


def _make_error(result: proc.ProcResult) -> str:
    """make's failure in one line: flashtool's root cause if it ran, else make's own line."""
    if "Flash Tool Error" in result.output:
        return root_cause(result.output)
    lines = [l.strip() for l in result.stderr.replace("\x00", "").splitlines() if l.strip()]
    for line in lines:
        if line.startswith("make: ***") or line.startswith("make[") and "***" in line:
            causes = [l for l in lines if not l.startswith("make")]
            return f"{causes[-1]} ({line})" if causes else line
    if lines:
        return lines[-1]
    return root_cause(result.output)


def _settled(tool: str, result: proc.ProcResult, log: logging.Logger) -> Optional[Tuple[bool, str, bool]]:
    """Log a tool's whole output; the verdict when it is plain (success, interrupted), else None.

    The verdict is (success, error message, interrupted), as the method runners return it.
    """
    level = logging.INFO if result.ok else logging.WARNING
    log.log(level, f"{tool} {result.describe_failure() if not result.ok else 'succeeded'}; "
                   f"output:\n{result.output.replace(chr(0), '')}")
    if result.ok:
        return True, "", False
    if result.aborted:
        return False, f"flash interrupted: {tool} was stopped (kflashd is stopping)", True
    return None


def _katapult(
    device_path: str,
    firmware_path: str,
    katapult_dir: str,
    timeout: float,
    baud: int,
    progress: Optional[ProgressCallback],
    abort: Optional[threading.Event],
    log: logging.Logger,
    target: Optional[List[str]] = None,
) -> "tuple[bool, str, bool]":
    """Run flashtool.py; returns (success, one-line error, aborted).

    `target` replaces `-d DEVICE` (a CAN node: `-i IFACE -u UUID`, see canbus.target_args).
    """
    tool = os.path.join(os.path.expanduser(katapult_dir), "scripts", "flashtool.py")
    if not os.path.isfile(tool):
        return False, f"flashtool.py not found at {tool} (check katapult.dir)", False
    python = shutil.which("python3")
    if python is None:
        return False, "python3 not found on PATH", False
    private = tempfile.mkdtemp(prefix="kflashd-flash-")
    try:
        image = os.path.join(private, "klipper.bin")
        shutil.copyfile(firmware_path, image)
        argv: List[str] = [python, tool, *(target or ["-d", device_path]), "-f", image]
        if baud and not target:
            argv += ["-b", str(baud)]
        parser = ProgressParser(progress, os.path.getsize(image))

        def on_output(stream: str, text: str) -> None:
            if stream == "stdout":
                parser.feed(text)

        log.info(f"running {' '.join(argv)}")
        result = proc.stream(
            argv, timeout, on_output, abort=abort, env=proc.child_env({"PYTHONUNBUFFERED": "1"})
        )
    except OSError as e:
        return False, f"flashtool.py could not be run: {e}", False
    finally:
        shutil.rmtree(private, ignore_errors=True)
    settled = _settled("flashtool.py", result, log)
    if settled is not None:
        return settled
    if not result.timed_out and "Flash Tool Error" not in result.output:
        # Not the tool's own error report: it crashed (killed, an uncaught exception, a dead
        # interpreter). Its stderr says why; stdout may end in a half-drawn "[####" bar.
        said = _last_output_line(result.stderr)
        return False, f"flashtool.py failed ({result.describe_failure()})" + (f": {said}" if said else ""), False
    cause = root_cause(result.output)
    if result.timed_out:
        tail = cause or _last_output_line(result.output)
        return False, f"flashtool.py timed out after {timeout:g} s" + (
            f" (last output: {tail})" if tail else ""), False
    return False, cause or f"flashtool.py failed ({result.describe_failure()})", False


def _last_output_line(text: str) -> str:
    lines = [l.strip() for l in text.replace("\x00", "").splitlines() if l.strip()]
    return lines[-1] if lines else ""


def _fallback_refusal(firmware_path: str, klipper_dir: Optional[str]) -> Tuple[Optional[str], int]:
    """Why `make flash` must not run (or None), and the uid to run it as."""
    if not klipper_dir:
        return "make flash fallback unavailable: no Klipper tree configured (klipper.dir)", -1
    tree = os.path.expanduser(klipper_dir)
    if not os.path.isdir(tree):
        return f"make flash fallback unavailable: no Klipper tree at {tree}", -1
    built = os.path.join(tree, "out", "klipper.bin")
    if not os.path.isfile(built):
        return (
            f"make flash not tried: {built} does not exist, so make flash would build and "
            f"write an image other than the one queued"
        ), -1
    if sha256_file(built) != sha256_file(firmware_path):
        return (
            f"make flash not tried: {built} differs from the image being flashed "
            f"(make flash would write a different image)"
        ), -1
    # make runs as the tree's owner: a tree that root owns (some images install it so) is
    # built as root anyway, so running make as root there is no escalation.
    return None, os.stat(tree).st_uid


def _make_flash(
    device_path: str,
    klipper_dir: str,
    owner: int,
    timeout: float,
    progress: Optional[ProgressCallback],
    abort: Optional[threading.Event],
    log: logging.Logger,
) -> "tuple[bool, str, bool]":
    make = shutil.which("make")
    if make is None:
        return False, "make not found on PATH", False
    tree = os.path.expanduser(klipper_dir)
    # NOSUDO=1: Klipper's flash_usb.py calls sudo only for the DFU, hid-flash and picoboot
    # paths of a board that is not in Katapult; kflashd runs make flash only for a board
    # that waits in Katapult (then flash_usb.py runs the tree's copy of flashtool.py), and
    # a sudo from the unit (NoNewPrivileges=yes) could only fail or wait for a password.
    argv = [make, "NOSUDO=1", f"FLASH_DEVICE={device_path}", "flash"]
    if progress is not None:
        progress(PHASE_MAKE_FLASH, 0)
    # flash_usb.py runs flashtool.py, whose marks come through make: show them as one phase.
    parser = ProgressParser(
        progress, os.path.getsize(os.path.join(tree, "out", "klipper.bin")),
        {PHASE_WRITE: PHASE_MAKE_FLASH, PHASE_VERIFY: PHASE_MAKE_FLASH},
    )

    def on_output(stream: str, text: str) -> None:
        if stream == "stdout":
            parser.feed(text)

    # `make flash` rebuilds first when .config or a source is newer than out/klipper.bin
    # (Klipper's Makefile: flash depends on the image): the image checked above would then
    # not be the one written. `make -q` answers "up to date?" without building anything.
    try:
        fresh = proc.run([make, "-q", "out/klipper.bin"], min(timeout, 30.0), cwd=tree, abort=abort, user=owner)
    except (OSError, KeyError) as e:
        return False, f"make could not be run as uid {owner}: {e}", False
    if fresh.returncode != 0:
        why = "is older than the tree's .config or sources" if fresh.returncode == 1 else "cannot be checked"
        return False, (
            f"make flash not tried: {tree}/out/klipper.bin {why}, so make flash would rebuild "
            f"and write an image other than the one queued"
        ), False

    log.info(f"running {' '.join(argv)} in {tree} as uid {owner}")
    try:
        result = proc.stream(argv, timeout, on_output, cwd=tree, abort=abort, user=owner)
    except (OSError, KeyError) as e:  # KeyError: the owner uid has no passwd entry
        return False, f"make could not be run as uid {owner}: {e}", False
    settled = _settled("make flash", result, log)
    if settled is not None:
        return settled
    if result.timed_out:
        return False, f"make flash timed out after {timeout:g} s", False
    error = _make_error(result) or f"make flash failed ({result.describe_failure()})"
    if "Read-only file system" in result.output:
        # Before flashing, Klipper's `flash` target builds a helper in the tree (STM32:
        # lib/hidflash, RP2040: lib/rp2040_flash); the unit keeps the home read-only except
        # the paths install.sh lists for the configured tree.
        error += (
            f" (the service may write only {tree}/out and the flash helpers' lib/ "
            f"directories of the Klipper tree it was installed for: set [klipper] dir and run "
            f"`sudo ./install.sh` again)"
        )
    return False, error, False


def flash_device(
    device_path: str,
    firmware_path: str,
    katapult_dir: str,
    klipper_dir: Optional[str],
    timeout: float = TIMEOUT_FLASH,
    baud: int = 0,
    progress: Optional[ProgressCallback] = None,
    abort: Optional[threading.Event] = None,
    log: Optional[logging.Logger] = None,
    device_present: Optional[Callable[[], bool]] = None,
    target: Optional[List[str]] = None,
) -> FlashResult:
    """Flash `firmware_path` onto `device_path`: Katapult first, then `make flash`.

    `baud` is passed as `-b` only when non-zero (UART boards); USB boards ignore it.
    `progress(phase, percent)` sees "write" and "verify" percentages from flashtool.py,
    and "make_flash" during the fallback. `abort` (set by the daemon on SIGTERM or a
    cancel) kills the running tool's process group and returns a failed result at once,
    without the fallback. Each method gets `timeout` seconds. `device_present()`, when
    given, is asked before the fallback: a board unplugged mid-flash must not get `make
    flash` aimed at its old device node, which another board may have taken by then.
    """
    log = log or _log
    started = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - started

    if device_present is not None and not device_present():
        # Checked right before the tool starts: the path must still lead to the board.
        return FlashResult(False, METHOD_KATAPULT, elapsed(), (
            f"Device no longer connected: {device_path} no longer leads to the board "
            f"(unplugged or reset?); nothing was written"))

    ok, katapult_error, aborted = _katapult(
        device_path, firmware_path, katapult_dir, timeout, baud, progress, abort, log, target
    )
    if ok:
        log.info(f"flashed {device_path} via katapult in {elapsed():.1f} s")
        return FlashResult(True, METHOD_KATAPULT, elapsed())
    if aborted:
        return FlashResult(False, METHOD_KATAPULT, elapsed(), katapult_error)

    log.warning(f"Katapult failed: {katapult_error}")
    if target is not None:
        # `make flash` reaches a board by its serial device only; a CAN node has none.
        return FlashResult(False, METHOD_KATAPULT, elapsed(),
                           f"Katapult: {katapult_error}; make flash cannot reach a CAN node")
    if device_present is not None and not device_present():
        refusal: Optional[str] = (
            f"make flash not tried: the board is no longer connected at {device_path} "
            f"(unplugged or reset mid-flash?)"
        )
        owner = -1
    else:
        refusal, owner = _fallback_refusal(firmware_path, klipper_dir)
    if refusal is None:
        log.warning("Katapult failed, trying make flash...")
    else:
        log.warning(refusal)
        return FlashResult(
            False, METHOD_KATAPULT, elapsed(), f"Katapult: {katapult_error}; {refusal}"
        )
    assert klipper_dir is not None
    ok, make_error, aborted = _make_flash(
        device_path, klipper_dir, owner, timeout, progress, abort, log
    )
    if ok:
        log.info(f"flashed {device_path} via make flash in {elapsed():.1f} s")
        return FlashResult(True, METHOD_MAKE_FLASH, elapsed())
    message = make_error if aborted else f"Katapult: {katapult_error}; make flash: {make_error}"
    return FlashResult(False, METHOD_MAKE_FLASH, elapsed(), message)
