"""Board farm controller: owns ONE umockdev testbed and the board emulators on its PTYs.

Run as ``umockdev-wrapper PYTHON -m tests.farm.controller`` (the testbed only emits uevents
when its own process runs under the preload). It prints one ``ready`` JSON line with the
testbed's root dir and its ``LD_PRELOAD``; any process started with ``UMOCKDEV_DIR=<root>``
and that ``LD_PRELOAD`` sees the boards (sysfs, udev database, netlink uevents, /dev nodes).
Then it serves line-delimited JSON requests on stdin (``{"id": 1, "op": "...", "args": {}}``)
and answers each on stdout (``{"id": 1, "ok": true, "result": ...}`` or ``"ok": false`` with
``"error"``); a bad request is an error reply, never a crash. EOF on stdin ends it.

Only the main thread touches the testbed (GObject is not thread-safe); board emulator
threads hand their events (boot, bootloader request) to it through a queue and a wake pipe.
Diagnostics go to stderr, which the client keeps in a log file.

Facts about umockdev 0.17 this relies on (docs/testing.md, "Emulated boards", checked here): a
removed node name cannot be reused (every enumeration takes the next ttyACM number);
``remove_device`` emits no ``remove`` uevent before 0.18.4 (so the controller sends it); each
board needs its own USB path; a testbed that is finalised deletes its directory.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import re
import select
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

from tests.farm.bridge import CanFarm  # noqa: E402
from tests.farm.common import (  # noqa: E402
    FAMILY_FLASH,
    MODES,
    PATH_PREFIX,
    ROM_BOOTLOADERS,
    USB_IDENTITY,
    RequestError,
    log,
)
from tests.farm.canbus import CanBusServer  # noqa: E402
from tests.farm.images import find_dict  # noqa: E402
from tests.farm.katapult import Fault, Flash, KatapultEmulator  # noqa: E402
from tests.farm.klipper_app import KlipperAppEmulator  # noqa: E402

TTY_ACM_MAJOR = 166


def umockdev_version() -> Tuple[int, ...]:
    """Installed umockdev version (from umockdev-run), (0,) when unknown."""
    try:
        out = subprocess.run(["umockdev-run", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else (0,)


class Board:
    """One emulated board: its flash survives unplugging and mode switches."""

    def __init__(self, serial: str, mcu: str, port: int, page_size: int, app_start: int, version: str,
                 bootloader_version: str, flash_base: int, flash_size: int, reconnect_delay: float,
                 name: Optional[str] = None) -> None:
        self.serial = serial
        # The farm's key for the board: its serial, unless two boards share one (boards
        # built without the chip id all report 12345) and were added with names.
        self.name = name or serial
        self.mcu = mcu
        self.port = port
        self.app_start = app_start
        self.fallback_version = version
        self.bootloader_version = bootloader_version
        self.reconnect_delay = reconnect_delay
        self.flash = Flash(base=flash_base, size=flash_size, page_size=page_size)
        self.mode = "katapult"
        self.present = False
        self.device: Any = None
        self.tty_name: Optional[str] = None
        self.busnum = 1
        self.devnum = 0
        self.fault = Fault()
        self.running_version: Optional[str] = None
        self.bootloader_requests = 0
        self.boots = 0
        self.enumerations = 0
        self.totals = {"connects": 0, "blocks_received": 0, "blocks_read": 0, "completes": 0,
                       "nacks": 0, "command_errors": 0}
        self.last_complete: Optional[float] = None
        self.last_eof_pages: Optional[int] = None
        self.history: List[str] = []
        self.can_interface: Optional[str] = None  # a USB-to-CAN bridge: its net interface
        self.no_katapult = False  # a bootloader request lands in the chip's ROM bootloader instead
        self.rom_bootloader: Optional[str] = None  # which one: a key of ROM_BOOTLOADERS
        self.in_dfu = False
        self.ifindex = 0

    @property
    def is_bridge_app(self) -> bool:
        """Klipper mode of a bridge: USB 606f with a net child, no tty."""
        return self.can_interface is not None and self.mode == "klipper"

    @property
    def net_syspath(self) -> str:
        return f"{self.iface_syspath}/net/{self.can_interface}"

    @property
    def usb_syspath(self) -> str:
        return f"/sys/devices/usb1/1-1.{self.port}"

    @property
    def iface_syspath(self) -> str:
        return f"{self.usb_syspath}/1-1.{self.port}:1.0"

    @property
    def tty_syspath(self) -> Optional[str]:
        return f"{self.iface_syspath}/tty/{self.tty_name}" if self.tty_name else None

    @property
    def id_serial(self) -> str:
        return f"{USB_IDENTITY[self.mode]['manufacturer']}_{self.mcu}_{self.serial}"

    @property
    def id_path(self) -> str:
        return f"{PATH_PREFIX}-usb-0:1.{self.port}:1.0"

    @property
    def by_id(self) -> str:
        return f"/dev/serial/by-id/usb-{self.id_serial}-if00"

    @property
    def by_path(self) -> str:
        return f"/dev/serial/by-path/{self.id_path}"

    def app_present(self) -> bool:
        """Katapult starts the application unless its first word is 0 or 0xFFFFFFFF."""
        word = self.flash.read(self.app_start, 4)
        return word not in (b"\x00" * 4, b"\xff" * 4)

    def image_version(self) -> Optional[str]:
        off = self.app_start - self.flash.base
        found = find_dict(bytes(self.flash.memory[off:]))
        return found.get("version") if found else None

    def info(self) -> Dict[str, Any]:
        session = self.device.stats() if isinstance(self.device, KatapultEmulator) else {}
        counters = {k: v + session.get(k, 0) for k, v in self.totals.items()}
        last_complete = session.get("last_complete") or self.last_complete
        return {
            "serial": self.serial, "name": self.name, "mcu": self.mcu, "mode": self.mode, "present": self.present,
            "device_node": f"/dev/{self.tty_name}" if self.present and self.tty_name else None,
            "sys_path": self.tty_syspath if self.present else None,
            "usb_sys_path": self.usb_syspath, "by_id": self.by_id if self.present else None,
            "by_path": self.by_path if self.present else None, "id_serial": self.id_serial,
            "port": self.port, "busnum": self.busnum, "devnum": self.devnum,
            "app_start": self.app_start, "page_size": self.flash.page_size,
            "bootloader_version": self.bootloader_version,
            "bootloader_requests": self.bootloader_requests, "boots": self.boots,
            "enumerations": self.enumerations, **counters,
            "last_complete": last_complete,
            "pages_written": session.get("eof_pages", self.last_eof_pages),
            "running_version": self.running_version if self.mode == "klipper" and self.present else None,
            "image_version": self.image_version(),
            "fault": self.fault.as_dict(), "session": session, "history": list(self.history),
            "device_error": repr(self.device.error) if self.device is not None and self.device.error else None,
            "can_interface": self.can_interface, "in_dfu": self.in_dfu,
        }


class Controller(CanFarm):
    def __init__(self) -> None:
        self.testbed = UMockdev.Testbed.new()
        self.root_dir = self.testbed.get_root_dir()
        self.version = umockdev_version()
        # umockdev >= 0.18.4 sends "remove" from remove_device itself.
        self.send_remove_uevents = self.version < (0, 18, 4)
        self.boards: Dict[str, Board] = {}
        self.next_tty = 0
        self.next_port = 1
        self.next_devnum = 2  # 1 is the root hub
        self.events: "queue.Queue[Tuple[str, str, Any]]" = queue.Queue()
        self.timers: List[Tuple[float, Callable[[], None]]] = []
        self.links: Dict[str, bool] = {}  # CAN interface -> administratively up
        self.canbus = CanBusServer(os.path.join(self.root_dir, "canbus.sock"), self.bus_state,
                                   self.bridge_jump, self.bridge_version, self.post)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    # -- plumbing -------------------------------------------------------------------------
    def post(self, kind: str, serial: str, device: Any) -> None:
        """From a device thread: hand an event to the main thread."""
        self.events.put((kind, serial, device))
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def board(self, serial: Any) -> Board:
        if not isinstance(serial, str) or serial not in self.boards:
            raise RequestError(f"no board with serial {serial!r} (boards: {sorted(self.boards)})")
        return self.boards[serial]

    # -- enumeration ----------------------------------------------------------------------
    def _device_text(self, b: Board) -> str:
        ident = USB_IDENTITY[b.mode]
        vid, pid, mfr = ident["vid"], ident["pid"], ident["manufacturer"]
        tty = b.tty_name
        n = int(tty[len("ttyACM"):])
        usb_path = f"{PATH_PREFIX}-usb-0:1.{b.port}"
        common = [
            f"E: ID_VENDOR={mfr}", f"E: ID_VENDOR_ENC={mfr}", f"E: ID_VENDOR_ID={vid}",
            f"E: ID_MODEL={b.mcu}", f"E: ID_MODEL_ENC={b.mcu}", f"E: ID_MODEL_ID={pid}",
            "E: ID_REVISION=0100", f"E: ID_SERIAL={b.id_serial}", f"E: ID_SERIAL_SHORT={b.serial}",
            "E: ID_BUS=usb", "E: ID_USB_INTERFACES=:020200:0a0000:", f"E: ID_PATH={b.id_path}",
            "E: ID_PATH_TAG=" + re.sub(r"[^A-Za-z0-9]", "_", b.id_path),
        ]
        usb = [
            f"P: {b.usb_syspath[len('/sys'):]}", "E: SUBSYSTEM=usb", "E: DEVTYPE=usb_device", "E: DRIVER=usb",
            f"E: PRODUCT={vid}/{pid}/100", "E: TYPE=2/0/0", f"E: BUSNUM={b.busnum:03d}",
            f"E: DEVNUM={b.devnum:03d}", *[c for c in common if not c.startswith("E: ID_PATH")],
            f"E: ID_PATH={usb_path}", "E: ID_PATH_TAG=" + re.sub(r"[^A-Za-z0-9]", "_", usb_path),
            f"A: idVendor={vid}", f"A: idProduct={pid}", f"A: manufacturer={mfr}", f"A: product={b.mcu}",
            f"A: serial={b.serial}", f"A: busnum={b.busnum}", f"A: devnum={b.devnum}",
            "A: bcdDevice=0100", "A: bDeviceClass=02", "A: bNumInterfaces= 2", "A: speed=12",
        ]
        iface = [
            f"P: {b.iface_syspath[len('/sys'):]}", "E: SUBSYSTEM=usb", "E: DEVTYPE=usb_interface",
            "E: DRIVER=cdc_acm", f"E: PRODUCT={vid}/{pid}/100", "E: TYPE=2/0/0", "E: INTERFACE=2/2/0",
            "A: bInterfaceNumber=00", "A: bInterfaceClass=02", "A: bInterfaceSubClass=02",
            "A: bInterfaceProtocol=00",
        ]
        tty_lines = [
            f"P: {b.tty_syspath[len('/sys'):]}", f"N: {tty}", "E: SUBSYSTEM=tty", f"E: DEVNAME=/dev/{tty}",
            f"E: MAJOR={TTY_ACM_MAJOR}", f"E: MINOR={n}", *common, "E: ID_TYPE=generic",
            "E: ID_USB_INTERFACE_NUM=00", "E: ID_USB_DRIVER=cdc_acm", "E: ID_MM_CANDIDATE=1",
            f"E: DEVLINKS={b.by_id} {b.by_path}", "E: TAGS=:systemd:", "E: CURRENT_TAGS=:systemd:",
            f"A: dev={TTY_ACM_MAJOR}:{n}",
        ]
        return "\n\n".join("\n".join(block) for block in (usb, iface, tty_lines)) + "\n"

    def _links(self, b: Board) -> List[str]:
        return [self.root_dir + b.by_id, self.root_dir + b.by_path]

    def enumerate(self, b: Board, mode: str) -> None:
        """The board appears on USB in ``mode``: udev links, devices (add uevents), emulator."""
        if b.present:
            raise RequestError(f"board {b.serial} is already plugged in")
        b.mode = mode
        if b.is_bridge_app:
            self._enumerate_bridge(b)
            return
        b.tty_name = f"ttyACM{self.next_tty}"
        self.next_tty += 1
        b.devnum = self.next_devnum
        self.next_devnum += 1
        # udev creates the links before it broadcasts the event; they dangle for a moment.
        for link in self._links(b):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(f"../../{b.tty_name}", link)
        self.testbed.add_from_string(self._device_text(b))
        fd = self.testbed.get_dev_fd(f"/dev/{b.tty_name}")
        if fd < 0:
            raise RequestError(f"umockdev gave no PTY for /dev/{b.tty_name}")
        name = f"{b.serial}@{b.tty_name}"
        if mode == "katapult":
            b.device = KatapultEmulator(
                fd, b.flash, mcu=b.mcu, app_start=b.app_start, version=b.bootloader_version, name=name,
                on_boot=lambda dev, k=b.name: self.post("boot", k, dev),
                on_vanish=lambda dev, k=b.name: self.post("vanish", k, dev), fault=b.fault)
            b.running_version = None
        else:
            b.running_version = b.image_version() or b.fallback_version
            b.device = KlipperAppEmulator(
                fd, mcu=b.mcu, serial=b.serial, version=b.running_version, name=name,
                on_bootloader_request=lambda dev, k=b.name: self.post("bootloader_request", k, dev))
        b.device.start()
        b.present = True
        b.enumerations += 1
        b.history.append(f"{mode}:{b.tty_name}")
        log(f"{b.serial}: plugged in as {mode} on /dev/{b.tty_name} ({b.by_id})")

    def disconnect(self, b: Board) -> None:
        """The board leaves USB: the line hangs up, remove uevents (tty first), links go."""
        if not b.present:
            raise RequestError(f"board {b.serial} is not plugged in")
        if b.is_bridge_app:
            self._disconnect_bridge(b)
            return
        if b.in_dfu:
            if self.send_remove_uevents:
                self.testbed.uevent(b.usb_syspath, "remove")
            self.testbed.remove_device(b.usb_syspath)
            b.present = b.in_dfu = False
            return
        device = b.device
        device.stop()
        if isinstance(device, KatapultEmulator):
            for key, value in device.stats().items():
                if key in b.totals:
                    b.totals[key] += value
            b.last_complete = device.last_complete or b.last_complete
            if device.eof_pages is not None:
                b.last_eof_pages = device.eof_pages
        node = os.path.join(self.root_dir, "dev", b.tty_name)
        pty_name = os.readlink(node) if os.path.islink(node) else None
        device.hang_up()
        # Child first, one device at a time: umockdev 0.17 removes only the given device's
        # class/bus links, and a stale bus link makes the next plug-in abort the process.
        for path in (b.tty_syspath, b.iface_syspath, b.usb_syspath):
            if self.send_remove_uevents:
                self.testbed.uevent(path, "remove")
            self.testbed.remove_device(path)
        if pty_name:
            # The hangup frees the pty, and the kernel hands its name to the next openpty():
            # umockdev's stale fd->device map entry for it would abort that plug-in.
            stale = os.path.join(self.root_dir, "dev", ".ptymap", pty_name.replace("/", "_"))
            if os.path.lexists(stale):
                os.unlink(stale)
        for link in self._links(b):
            if os.path.islink(link) and os.readlink(link) == f"../../{b.tty_name}":
                os.unlink(link)
        b.device = None
        b.present = False
        log(f"{b.serial}: unplugged ({b.mode} on /dev/{b.tty_name})")

    def reenumerate(self, b: Board, mode: str) -> None:
        self.disconnect(b)
        if b.reconnect_delay > 0:
            self.timers.append((time.monotonic() + b.reconnect_delay, lambda: self.enumerate(b, mode)))
        else:
            self.enumerate(b, mode)

    # -- device events ------------------------------------------------------------------
    def handle_event(self, kind: str, serial: str, device: Any) -> None:
        if kind == "can_boot":
            self.canbus.on_boot(serial, device)
            return
        b = self.boards.get(serial)
        if b is None or b.device is not device or not b.present:
            return  # stale: the board was unplugged or re-enumerated meanwhile
        if kind == "boot":
            # Katapult jumps to the application; with no application it stays in Katapult.
            if b.app_present():
                b.boots += 1
                log(f"{serial}: COMPLETE -> booting the application")
                self.reenumerate(b, "klipper")
            else:
                log(f"{serial}: COMPLETE but no application in flash -> Katapult again")
                self.reenumerate(b, "katapult")
        elif kind == "bootloader_request":
            b.bootloader_requests += 1
            if b.no_katapult:
                log(f"{serial}: 1200 baud, no Katapult -> the chip's ROM bootloader")
                self.disconnect(b)
                self._enumerate_dfu(b)
                return
            log(f"{serial}: 1200 baud -> rebooting into Katapult")
            self.reenumerate(b, "katapult")
        elif kind == "can_boot":
            self.canbus.on_boot(serial, device)
        elif kind == "vanish":
            log(f"{serial}: refuse_boot(vanish): gone from USB")
            self.disconnect(b)

    # -- requests -------------------------------------------------------------------------
    def op_ping(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "root_dir": self.root_dir}

    def op_add_board(self, serial: str, mcu: str = "stm32f446xx", mode: str = "katapult",
                     page_size: int = 16 * 1024, app_start: Optional[int] = None, version: str = "v0.12.0-farm",
                     bootloader_version: str = "v0.0.1-110-gb0bf421", flash_base: Optional[int] = None,
                     flash_size: int = 512 * 1024, old_image: Optional[str] = None,
                     reconnect_delay: float = 0.0, plugged: bool = True,
                     name: Optional[str] = None, can_interface: Optional[str] = None,
                     no_katapult: bool = False, rom_bootloader: Optional[str] = None) -> Dict[str, Any]:
        """``rom_bootloader`` ("stm32_dfu", "rp2040_bootsel"; ``no_katapult`` alone means
        "stm32_dfu"): the board has no Katapult, and a bootloader request (1200 baud on USB,
        the CAN request for a bridge) lands it in that ROM bootloader on the same USB port.
        ``app_start`` and ``flash_base`` default to Katapult's defaults for the MCU family."""
        if not isinstance(serial, str) or not re.fullmatch(r"[0-9A-Za-z]{1,64}", serial):
            raise RequestError(f"bad serial {serial!r}: 1-64 letters/digits, as a USB serial number")
        key = name or serial
        if not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", key):
            raise RequestError(f"bad name {key!r}: 1-64 letters, digits, '_' or '-'")
        if key in self.boards:
            raise RequestError(f"board {key} exists already")
        if mode not in MODES:
            raise RequestError(f"bad mode {mode!r}: one of {', '.join(MODES)}")
        if rom_bootloader is None and no_katapult:
            rom_bootloader = "stm32_dfu"
        if rom_bootloader is not None and rom_bootloader not in ROM_BOOTLOADERS:
            raise RequestError(f"bad rom_bootloader {rom_bootloader!r}: one of {', '.join(ROM_BOOTLOADERS)}")
        family_base, family_start = FAMILY_FLASH.get(mcu[:3].lower(), FAMILY_FLASH["stm"])
        flash_base = family_base if flash_base is None else flash_base
        app_start = family_start if app_start is None else app_start
        if not flash_base <= app_start < flash_base + flash_size:
            raise RequestError(f"app_start 0x{app_start:x} outside flash")
        try:
            b = Board(serial, mcu, self.next_port, int(page_size), int(app_start), version,
                      bootloader_version, int(flash_base), int(flash_size), float(reconnect_delay), key)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        if old_image is not None:
            b.flash.load(b.app_start, base64.b64decode(old_image))
        b.can_interface = can_interface
        b.no_katapult = rom_bootloader is not None
        b.rom_bootloader = rom_bootloader
        self.next_port += 1
        self.boards[key] = b
        if plugged:
            self.enumerate(b, mode)
        else:
            b.mode = mode
        return b.info()

    def op_unplug(self, serial: str) -> Dict[str, Any]:
        b = self.board(serial)
        self.disconnect(b)
        return b.info()

    def op_plug(self, serial: str, mode: Optional[str] = None) -> Dict[str, Any]:
        b = self.board(serial)
        mode = mode or b.mode
        if mode not in MODES:
            raise RequestError(f"bad mode {mode!r}: one of {', '.join(MODES)}")
        self.enumerate(b, mode)
        return b.info()

    def op_reset(self, serial: str, mode: Optional[str] = None) -> Dict[str, Any]:
        """Reset button: ``katapult`` = double-tap; default starts the app if there is one."""
        b = self.board(serial)
        if mode is None:
            mode = "klipper" if b.app_present() else "katapult"
        if mode not in MODES:
            raise RequestError(f"bad mode {mode!r}: one of {', '.join(MODES)}")
        self.reenumerate(b, mode)
        return b.info()

    def op_board(self, serial: str) -> Dict[str, Any]:
        return self.board(serial).info()

    def op_boards(self) -> List[Dict[str, Any]]:
        return [b.info() for b in self.boards.values()]

    def op_flashed_image(self, serial: str, length: Optional[int] = None, offset: int = 0) -> str:
        b = self.board(serial)
        start = b.app_start + int(offset)
        if length is None:
            length = b.flash.base + b.flash.size - start
        return base64.b64encode(b.flash.read(start, int(length))).decode()

    def op_load_flash(self, serial: str, image: str, addr: Optional[int] = None) -> Dict[str, Any]:
        b = self.board(serial)
        b.flash.load(b.app_start if addr is None else int(addr), base64.b64decode(image))
        return b.info()

    def op_set_fault(self, serial: str, fault: Optional[str] = None,
                     params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        b = self.board(serial)
        try:
            b.fault = Fault(fault, dict(params or {}))
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        if isinstance(b.device, KatapultEmulator):
            b.device.apply_fault(b.fault)
        return b.info()

    def dispatch(self, line: str) -> Dict[str, Any]:
        req_id: Any = None
        try:
            try:
                req = json.loads(line)
            except ValueError as exc:
                raise RequestError(f"request is not JSON: {exc}") from exc
            if not isinstance(req, dict):
                raise RequestError("request must be a JSON object")
            req_id = req.get("id")
            op = req.get("op")
            args = req.get("args") or {}
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise RequestError(f"unknown op {op!r}")
            if not isinstance(args, dict):
                raise RequestError("args must be a JSON object")
            try:
                result = handler(**args)
            except TypeError as exc:
                raise RequestError(f"{op}: {exc}") from exc
            return {"id": req_id, "ok": True, "result": result}
        except RequestError as exc:
            return {"id": req_id, "ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug must reach the test, not kill the farm
            log(traceback.format_exc())
            return {"id": req_id, "ok": False, "error": f"internal error: {exc!r}"}

    # -- main loop ------------------------------------------------------------------------
    def run(self, out: Any) -> None:
        out.write(json.dumps({
            "event": "ready", "root_dir": self.root_dir, "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "pid": os.getpid(), "umockdev_version": ".".join(map(str, self.version)),
            "canbus": self.canbus.path,
        }) + "\n")
        out.flush()
        stdin_fd = sys.stdin.fileno()
        pending = b""
        while True:
            now = time.monotonic()
            due = [t for t in self.timers if t[0] <= now]
            self.timers = [t for t in self.timers if t[0] > now]
            for _, callback in due:
                try:
                    callback()
                except Exception:  # noqa: BLE001
                    log(traceback.format_exc())
            timeout = max(0.0, min(t[0] for t in self.timers) - now) if self.timers else None
            readable, _, _ = select.select([stdin_fd, self.wake_r, self.canbus.fileno()], [], [], timeout)
            if self.canbus.fileno() in readable:
                try:
                    self.canbus.accept()
                except Exception:  # noqa: BLE001
                    log(traceback.format_exc())
            if self.wake_r in readable:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            while True:
                try:
                    kind, serial, device = self.events.get_nowait()
                except queue.Empty:
                    break
                try:
                    self.handle_event(kind, serial, device)
                except Exception:  # noqa: BLE001
                    log(traceback.format_exc())
            if stdin_fd in readable:
                chunk = os.read(stdin_fd, 65536)
                if not chunk:
                    log("stdin closed: stopping")
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if not line.strip():
                        continue
                    reply = self.dispatch(line.decode("utf-8", "replace"))
                    out.write(json.dumps(reply) + "\n")
                    out.flush()
                    if reply.get("ok") and json.loads(line).get("op") == "shutdown":
                        return

    def op_shutdown(self) -> bool:
        return True

    def close(self) -> None:
        self.canbus.close()
        for b in self.boards.values():
            if b.device is not None:
                try:
                    b.device.stop()
                except Exception:  # noqa: BLE001
                    log(traceback.format_exc())


def main() -> int:
    # stdout carries the protocol only: anything else that prints goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if "LD_PRELOAD" not in os.environ or "umockdev" not in os.environ.get("LD_PRELOAD", ""):
        out.write(json.dumps({"event": "error", "error": "not running under umockdev-wrapper"}) + "\n")
        out.flush()
        return 2
    controller = Controller()
    try:
        controller.run(out)
    finally:
        controller.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
