"""``BoardFarm``: drive the farm controller from pytest or the demo (no umockdev preload here).

The controller runs as ``umockdev-wrapper PYTHON -m tests.farm.controller`` and keeps the
testbed alive as long as it runs; this process talks to it over pipes and hands ``.env``
(``LD_PRELOAD`` + ``UMOCKDEV_DIR``) to every process that must see the boards (the daemon
under test and its children). Every call fails loudly: a ``FarmError`` carrying the
controller's own error text and the tail of its stderr log.

    with BoardFarm.start(tmp_path) as farm:
        farm.add_board("3A0029000851313433383932", mode="klipper")
        env = {**os.environ, **farm.env}
"""
from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TypeVar, Union

from tests.support.wait import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
REQUEST_TIMEOUT = 10.0

T = TypeVar("T")


class FarmError(RuntimeError):
    """The controller refused a request, died, or did not answer in time."""


class BoardFarm:
    """A running farm controller (one umockdev testbed) and its boards."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, ready: Dict[str, Any]) -> None:
        self._proc = proc
        self.log_path = log_path
        self.root_dir: str = ready["root_dir"]
        self.ld_preload: str = ready["ld_preload"]
        self.umockdev_version: str = ready.get("umockdev_version", "")
        self.canbus: str = ready.get("canbus", "")
        self._lock = threading.Lock()
        self._next_id = 1
        self._buf = b""

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def start(cls, workdir: Union[str, Path], python: Optional[str] = None) -> "BoardFarm":
        """Spawn the controller (stderr to ``workdir/farm-controller.log``) and wait for ready."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "farm-controller.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.pop("UMOCKDEV_DIR", None)
        env["PYTHONUNBUFFERED"] = "1"
        argv = ["umockdev-wrapper", python or sys.executable, "-m", "tests.farm.controller"]
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                    cwd=str(REPO_ROOT), env=env, start_new_session=True)
        return cls.attach(proc, log_path)

    @classmethod
    def attach(cls, proc: subprocess.Popen, log_path: Path) -> "BoardFarm":
        """Wait for the ready line of a controller started elsewhere (e.g. inside a container)."""
        farm = cls.__new__(cls)
        farm._proc, farm.log_path, farm._buf = proc, log_path, b""
        try:
            ready = farm._read_line(START_TIMEOUT, "the controller's ready line")
        except FarmError:
            farm._kill()
            raise
        if ready.get("event") != "ready":
            farm._kill()
            raise FarmError(f"farm controller did not start: {ready}{farm._log_tail()}")
        cls.__init__(farm, proc, log_path, ready)
        return farm

    def stop(self) -> None:
        """End the controller (the testbed and all boards vanish); idempotent."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # EOF: the controller stops its boards and exits
            except OSError:
                pass
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

    def _kill(self) -> None:
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "BoardFarm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- environment for processes that must see the boards --------------------------------
    @property
    def env(self) -> Dict[str, str]:
        """Merge into a child's environment so it sees the emulated boards."""
        return {"LD_PRELOAD": self.ld_preload, "UMOCKDEV_DIR": self.root_dir, "KFLASHD_FARM_CANBUS": self.canbus}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return ("\n--- farm controller log (" + str(self.log_path) + ") ---\n" + "\n".join(tail)) if tail else ""

    # -- transport ------------------------------------------------------------------------
    def _read_line(self, timeout: float, what: str) -> Dict[str, Any]:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FarmError(f"farm controller: no answer within {timeout} s for {what}{self._log_tail()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._proc.poll()
                    raise FarmError(f"farm controller exited (status {self._proc.returncode}) "
                                    f"while waiting for {what}{self._log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError as exc:
            raise FarmError(f"farm controller wrote a non-JSON line {line[:200]!r}{self._log_tail()}") from exc

    def request(self, op: str, **args: Any) -> Any:
        """One request; returns its result or raises FarmError with the controller's words."""
        with self._lock:
            if self._proc.poll() is not None:
                raise FarmError(f"farm controller is not running (status {self._proc.returncode}){self._log_tail()}")
            req_id = self._next_id
            self._next_id += 1
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps({"id": req_id, "op": op, "args": args}).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError as exc:
                raise FarmError(f"farm controller: cannot send {op}: {exc}{self._log_tail()}") from exc
            reply = self._read_line(REQUEST_TIMEOUT, op)
        if reply.get("id") != req_id:
            raise FarmError(f"farm controller answered {reply!r} to request {req_id} ({op})")
        if not reply.get("ok"):
            raise FarmError(f"farm {op}: {reply.get('error')}")
        return reply.get("result")

    # -- boards ---------------------------------------------------------------------------
    def add_board(self, serial: str, mcu: str = "stm32f446xx", mode: str = "katapult",
                  page_size: int = 16 * 1024, app_start: Optional[int] = None, version: str = "v0.12.0-farm",
                  bootloader_version: str = "v0.0.1-110-gb0bf421", old_image: Optional[bytes] = None,
                  reconnect_delay: float = 0.0, plugged: bool = True, **extra: Any) -> Dict[str, Any]:
        """Create a board and (unless ``plugged=False``) plug it in.

        ``version`` is what a Klipper-mode board reports when its flash holds no Klipper
        image; ``old_image`` is firmware already in flash at ``app_start`` (default: Katapult's
        default for the MCU family, 0x8008000 on stm32, 0x10004000 on rp2040).
        ``rom_bootloader="stm32_dfu"`` (or ``"rp2040_bootsel"``): no Katapult on the board; a
        bootloader request leaves it in that ROM bootloader (a bare USB device, no tty).
        """
        args: Dict[str, Any] = dict(serial=serial, mcu=mcu, mode=mode, page_size=page_size,
                                    version=version, bootloader_version=bootloader_version,
                                    reconnect_delay=reconnect_delay, plugged=plugged, **extra)
        if app_start is not None:
            args["app_start"] = app_start
        if old_image is not None:
            args["old_image"] = base64.b64encode(old_image).decode()
        return self.request("add_board", **args)

    def unplug(self, serial: str) -> Dict[str, Any]:
        return self.request("unplug", serial=serial)

    def plug(self, serial: str, mode: Optional[str] = None) -> Dict[str, Any]:
        """Plug back in, in ``mode`` (default: the mode it was in when unplugged)."""
        return self.request("plug", serial=serial, mode=mode)

    def reset(self, serial: str, mode: Optional[str] = None) -> Dict[str, Any]:
        """Press reset: ``mode="katapult"`` is a double-tap; default boots the app if present."""
        return self.request("reset", serial=serial, mode=mode)

    def board(self, serial: str) -> Dict[str, Any]:
        return self.request("board", serial=serial)

    def boards(self) -> list:
        return self.request("boards")

    def flashed_image(self, serial: str, length: Optional[int] = None, offset: int = 0) -> bytes:
        """Flash content from ``app_start + offset`` (to the end of flash without ``length``)."""
        return base64.b64decode(self.request("flashed_image", serial=serial, length=length, offset=offset))

    def load_flash(self, serial: str, image: bytes, addr: Optional[int] = None) -> Dict[str, Any]:
        return self.request("load_flash", serial=serial, image=base64.b64encode(image).decode(), addr=addr)

    def set_fault(self, serial: str, fault: Optional[str], **params: Any) -> Dict[str, Any]:
        """Switch a fault on (``silent``, ``corrupt_crc``, ``drop``, ``slow``, ``refuse_boot``) or off (None)."""
        return self.request("set_fault", serial=serial, fault=fault, params=params)

    # -- CAN ------------------------------------------------------------------------------
    def add_bridge(self, serial: str, interface: str = "can0", **options: Any) -> Dict[str, Any]:
        """A mainboard whose Klipper is a USB-to-CAN bridge (606f with a net child ``interface``)."""
        options.setdefault("mode", "klipper")
        return self.add_board(serial, can_interface=interface, **options)

    def set_link(self, interface: str, up: bool) -> Dict[str, Any]:
        """``ip link set IFACE up|down`` (sysfs operstate/flags and a "change" uevent)."""
        return self.request("set_link", iface=interface, up=up)

    def add_can_node(self, uuid: str, mcu: str = "stm32g0b1xx", interface: str = "can0", mode: str = "klipper",
                     old_image: Optional[bytes] = None, **extra: Any) -> Dict[str, Any]:
        """A CAN toolhead board, reachable only over ``interface``."""
        args: Dict[str, Any] = dict(uuid=uuid, mcu=mcu, interface=interface, mode=mode, **extra)
        if old_image is not None:
            args["old_image"] = base64.b64encode(old_image).decode()
        return self.request("add_can_node", **args)

    def can_node(self, uuid: str) -> Dict[str, Any]:
        return self.request("can_node", uuid=uuid)

    def can_flashed_image(self, uuid: str, length: int) -> bytes:
        return base64.b64decode(self.request("can_flashed_image", uuid=uuid, length=length))

    def wait_until(self, predicate: Callable[[], T], timeout: float = 10.0, message: str = "condition") -> T:
        try:
            return wait_until(predicate, timeout=timeout, what=message)
        except AssertionError as exc:
            raise AssertionError(f"{exc}{self._log_tail()}") from None

    def wait_for_mode(self, serial: str, mode: str, timeout: float = 10.0) -> Dict[str, Any]:
        """Wait until the board is present in ``mode``; returns its info."""
        def check() -> Optional[Dict[str, Any]]:
            info = self.board(serial)
            return info if info["present"] and info["mode"] == mode else None
        return self.wait_until(check, timeout, message=f"board {serial} in {mode} mode")
