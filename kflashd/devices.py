"""udev -> Board records: classify tty devices, enumerate, and follow the netlink monitor.

Only the daemon's loop thread may touch pyudev objects (they are not thread-safe); everything
that leaves this module is a plain `Board`. The monitor is started *before* the initial
enumeration so that a board plugged in between the two is seen (possibly twice, which the
caller's board table absorbs) rather than missed.

What is a board: a tty whose USB device is Katapult (1d50:6177) or Klipper (1d50:614e), or
a USB device that runs Klipper as a USB-to-CAN bridge (1d50:606f: no tty, a `net` child
such as can0). CAN interfaces (any `net` device of type CAN, under a bridge or another
adapter) are followed too (`interfaces`), so the daemon knows when a bus appears or goes.
A chip's ROM bootloader (STM32 DFU 0483:df11, RP2040 BOOTSEL 2e8a:0003: a USB device
without a tty that a board without Katapult lands in after a bootloader request) is
reported too ("rom", a RomBootloader), so a cycle waiting for Katapult on that USB port
fails at once. Anything else (a USB-serial adapter) is ignored.
"""

from __future__ import annotations

import dataclasses
import errno
import re
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

from .errors import DiscoveryError
from .canbus import Interface, is_up
from .models import (
    BRIDGE_USB_ID,
    KATAPULT_USB_ID,
    KLIPPER_USB_ID,
    MODE_BRIDGE,
    MODE_KATAPULT,
    MODE_KLIPPER,
    ROM_BOOTLOADER_IDS,
    Board,
    RomBootloader,
)

_SUBSYSTEMS = ("tty", "usb", "net")
_ARPHRD_CAN = "280"  # /sys/class/net/<if>/type of a CAN interface (linux/if_arp.h)

# by-id names of both modes carry the serial; see docs/katapult-protocol.md, "USB identity".
_BY_ID_RE = re.compile(r"usb-(?:katapult|Klipper)_(?P<mcu>.+)_(?P<serial>[^_]+)-if\d+")


def serial_from_by_id(path: str) -> Optional[str]:
    """The USB serial inside a `/dev/serial/by-id/usb-katapult_<mcu>_<serial>-ifNN` name."""
    name = path.rsplit("/", 1)[-1]
    if len(name) > 255:
        # No file name is longer (NAME_MAX), and the regex backtracks quadratically on a
        # long crafted one ("usb-katapult_" * 10000): a client must not stall the loop.
        return None
    match = _BY_ID_RE.fullmatch(name)  # anchored at both ends: one start, linear backtracking
    return match.group("serial") if match else None


def _mode_of(vendor: Optional[str], product: Optional[str]) -> Optional[str]:
    ids = ((vendor or "").lower(), (product or "").lower())
    if ids == KATAPULT_USB_ID:
        return MODE_KATAPULT
    if ids == KLIPPER_USB_ID:
        return MODE_KLIPPER
    return None


def board_from_device(device) -> Optional[Board]:
    """Classify one pyudev tty device; None for anything that is not a Klipper/Katapult board."""
    props = device.properties
    usb = device.find_parent("usb", "usb_device")
    vendor = props.get("ID_VENDOR_ID")
    product = props.get("ID_MODEL_ID")
    if (vendor is None or product is None) and usb is not None:
        vendor = _attr(usb, "idVendor")
        product = _attr(usb, "idProduct")
    mode = _mode_of(vendor, product)
    if mode is None or device.device_node is None:
        return None
    serial = props.get("ID_SERIAL_SHORT") or (usb is not None and _attr(usb, "serial")) or None
    if not serial:
        return None
    mcu = (usb is not None and _attr(usb, "product")) or props.get("ID_MODEL") or ""
    links = (props.get("DEVLINKS") or "").split()
    by_id = next((link for link in links if link.startswith("/dev/serial/by-id/")), None)
    by_path = next((link for link in links if link.startswith("/dev/serial/by-path/")), None)
    return Board(
        serial=serial,
        mode=mode,
        mcu=mcu,
        device_node=device.device_node,
        sys_path=device.sys_path,
        by_id=by_id,
        by_path=by_path,
        port_path=usb.sys_name if usb is not None else None,
    )


def bridge_from_device(device) -> Optional[Board]:
    """Classify one pyudev usb_device; a Board for a Klipper USB-to-CAN bridge, else None.

    Its interface is the `net` child (can0) once the kernel has made it; until then the
    bridge is listed without one (the net device's own uevent brings it).
    """
    if device.device_type != "usb_device":
        return None
    if (_attr(device, "idVendor") or "", _attr(device, "idProduct") or "") != BRIDGE_USB_ID:
        return None
    serial = _attr(device, "serial") or device.properties.get("ID_SERIAL_SHORT")
    if not serial:
        return None
    interface = None
    for child in device.children:
        if child.subsystem == "net":
            interface = child.sys_name
            break
    return Board(
        serial=serial,
        mode=MODE_BRIDGE,
        mcu=_attr(device, "product") or device.properties.get("ID_MODEL") or "",
        device_node=interface or "",
        sys_path=device.sys_path,
        port_path=device.sys_name,
        interface=interface,
    )


def interface_from_device(device) -> Optional[Interface]:
    """A CAN `net` device -> Interface (with the bridge it belongs to, if it is one's)."""
    if device.subsystem != "net":
        return None
    usb = device.find_parent("usb", "usb_device")
    bridge = bridge_from_device(usb) if usb is not None else None
    if _attr(device, "type") != _ARPHRD_CAN and bridge is None:
        return None
    operstate = _attr(device, "operstate") or ""
    return Interface(
        name=device.sys_name,
        present=True,
        up=is_up(_attr(device, "flags"), operstate),
        operstate=operstate,
        sys_path=device.sys_path,
        bridge_serial=bridge.serial if bridge is not None else None,
    )


def rom_from_device(device) -> Optional[RomBootloader]:
    """Classify one pyudev usb_device: a chip's ROM bootloader, or None."""
    if device.subsystem != "usb" or device.device_type != "usb_device":
        return None
    ids = ((_attr(device, "idVendor") or "").lower(), (_attr(device, "idProduct") or "").lower())
    what = ROM_BOOTLOADER_IDS.get(ids)
    if what is None:
        return None
    return RomBootloader(what=what, port_path=device.sys_name, sys_path=device.sys_path, usb_id=":".join(ids))


def _classify(device) -> Optional[Board]:
    if device.subsystem == "tty":
        return board_from_device(device)
    if device.subsystem == "usb":
        return bridge_from_device(device)
    return None


def _attr(device, name: str) -> Optional[str]:
    try:
        return device.attributes.asstring(name)
    except (KeyError, UnicodeDecodeError, OSError):
        return None


class BoardMonitor:
    """The netlink monitor plus the table of boards present now, keyed by sys_path.

    Removal events may arrive without the properties that identified the board, so the
    table, not the event, says which board went away.
    """

    def __init__(self) -> None:
        import pyudev  # imported here: start-up cost is paid only by the daemon

        self._pyudev = pyudev
        self._context = pyudev.Context()
        self._monitor = pyudev.Monitor.from_netlink(self._context)
        self._monitor.filter_by("tty")
        self._monitor.filter_by("usb", "usb_device")  # a bridge is a USB device without a tty
        self._monitor.filter_by("net")
        self.boards: Dict[str, Board] = {}
        # Serials seen on two USB ports at once (boards built without the chip id all say
        # 12345): a chip id is unique, so such a serial names no board by itself, ever.
        self.shared_serials: Set[str] = set()
        self.interfaces: Dict[str, Interface] = {}  # CAN interfaces by name
        self.roms: Dict[str, RomBootloader] = {}  # chips in their ROM bootloader, by sys_path
        # Counters for `kflashctl status --json` and the benchmark: a uevent burst must
        # show every event seen (or an overflow that forced a re-read), never a silent loss.
        # "uevents" counts tty uevents (every board has one), "can_uevents" those of USB
        # devices and network interfaces (bridges and CAN links come and go through them).
        self.stats: Dict[str, int] = {"uevents": 0, "can_uevents": 0, "board_events": 0, "overflows": 0}

    def start(self) -> List[Board]:
        """Start listening, then enumerate what is already there (in that order: no race)."""
        try:
            self._monitor.start()
        except OSError as e:
            raise DiscoveryError(f"cannot listen to udev: {e.strerror}") from None
        self._read_all()
        return list(self.boards.values())

    def _read_all(self) -> None:
        self.boards, self.interfaces, self.roms = {}, {}, {}
        for subsystem in _SUBSYSTEMS:
            for device in self._context.list_devices(subsystem=subsystem):
                self._take(device)

    def _take(self, device) -> Optional[Board]:
        """Record what `device` is (a board, a bridge, a CAN interface); the board if one."""
        if device.subsystem == "net":
            interface = interface_from_device(device)
            if interface is not None:
                self.interfaces[interface.name] = interface
                return self._bridge_of(device)
            return None
        rom = rom_from_device(device)
        if rom is not None:
            self.roms[rom.sys_path] = rom
            return None
        board = _classify(device)
        if board is not None:
            self.boards[board.sys_path] = board
            self._note_ports(board.serial)
        return board

    def _bridge_of(self, net_device) -> Optional[Board]:
        """A net device came or changed: its bridge's record, refreshed (it names the interface)."""
        usb = net_device.find_parent("usb", "usb_device")
        if usb is None or usb.sys_path not in self.boards:
            return None
        board = bridge_from_device(usb)
        if board is not None:
            self.boards[board.sys_path] = board
        return board

    def interface(self, name: str) -> Interface:
        """The interface as last seen by udev (missing if never seen or gone)."""
        return self.interfaces.get(name) or Interface(name, False)

    def bridges(self) -> List[Board]:
        return [b for b in self.boards.values() if b.mode == MODE_BRIDGE]

    def fileno(self) -> int:
        return self._monitor.fileno()

    def poll(self) -> Iterator[Tuple[str, Any]]:
        """Drain pending uevents without blocking: yields ("add"|"remove", board), ("net",
        bridge) and ("rom", RomBootloader) when a ROM bootloader appears."""
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    return
                if e.errno == errno.ENOBUFS:
                    # The kernel dropped events: re-read the truth instead of guessing.
                    self.stats["overflows"] += 1
                    yield from self._resync()
                    return
                raise
            if device is None:
                return
            self.stats["uevents" if device.subsystem == "tty" else "can_uevents"] += 1
            action = device.action
            if device.subsystem == "net":
                yield from self._net_event(device, action)
                continue
            if action == "remove":
                self.roms.pop(device.sys_path, None)
                board = self.boards.pop(device.sys_path, None)
                if board is not None:
                    self.stats["board_events"] += 1
                    yield "remove", board
            elif action in ("add", "change", "bind", "move"):
                rom = rom_from_device(device)
                if rom is not None:
                    if self.roms.get(rom.sys_path) != rom:
                        self.roms[rom.sys_path] = rom
                        yield "rom", rom
                    continue
                board = _classify(device)
                if board is not None:
                    known = self.boards.get(board.sys_path)
                    self.boards[board.sys_path] = board
                    self._note_ports(board.serial)
                    if known != board:
                        self.stats["board_events"] += 1
                        yield "add", board

    def _net_event(self, device, action: str) -> Iterator[Tuple[str, Board]]:
        """A CAN interface came, went or changed (up/down): the interface table (and the
        bridge's record, which names its interface) is updated, and ("net", record) yielded
        so the daemon reschedules; the record's `interface` names it, `serial` its bridge."""
        known = next((i for i in self.interfaces.values() if i.sys_path == device.sys_path), None)
        if action == "remove":
            if known is None:
                return
            del self.interfaces[known.name]
            for sys_path, board in list(self.boards.items()):
                if board.interface == known.name and board.mode == MODE_BRIDGE:
                    self.boards[sys_path] = dataclasses.replace(board, interface=None, device_node="")
            after: Optional[Interface] = known
        else:
            self._take(device)
            after = next((i for i in self.interfaces.values() if i.sys_path == device.sys_path), None)
            if after is None or after == known:
                return
        self.stats["board_events"] += 1
        yield "net", Board(serial=after.bridge_serial or "", mode="net", mcu="", device_node=after.name,
                           sys_path=device.sys_path, interface=after.name)

    def _resync(self) -> Iterator[Tuple[str, Board]]:
        old = self.boards
        self._read_all()
        for sys_path, board in old.items():
            if sys_path not in self.boards:
                yield "remove", board
        for sys_path, board in self.boards.items():
            if old.get(sys_path) != board:
                yield "add", board

    def _note_ports(self, serial: str) -> None:
        if len({b.port_path for b in self.find(serial)}) > 1:
            self.shared_serials.add(serial)

    def serial_is_shared(self, serial: str) -> bool:
        """Whether this serial was seen on more than one board (at once) since start-up."""
        return serial in self.shared_serials

    def find(self, serial: str, mode: Union[None, str, Tuple[str, ...]] = None) -> List[Board]:
        """Boards with this serial, in `mode` (one mode, or any of a tuple of modes)."""
        modes = (mode,) if isinstance(mode, str) else mode
        return [
            b for b in self.boards.values() if b.serial == serial and (modes is None or b.mode in modes)
        ]
