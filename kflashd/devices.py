"""udev -> Board records: classify tty devices, enumerate, and follow the netlink monitor.

Only the daemon's loop thread may touch pyudev objects (they are not thread-safe); everything
that leaves this module is a plain `Board`. The monitor is started *before* the initial
enumeration so that a board plugged in between the two is seen (possibly twice, which the
caller's board table absorbs) rather than missed.

What is a board: a tty whose USB device is Katapult (1d50:6177) or Klipper (1d50:614e).
Anything else (a USB-serial adapter, a CAN bridge) is ignored.
"""

from __future__ import annotations

import errno
import re
from typing import Dict, Iterator, List, Optional, Set, Tuple

from .errors import DiscoveryError
from .models import KATAPULT_USB_ID, KLIPPER_USB_ID, MODE_KATAPULT, MODE_KLIPPER, Board

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
        self.boards: Dict[str, Board] = {}
        # Serials seen on two USB ports at once (boards built without the chip id all say
        # 12345): a chip id is unique, so such a serial names no board by itself, ever.
        self.shared_serials: Set[str] = set()
        # Counters for `kflashctl status --json` and the benchmark: a uevent burst must
        # show every event seen (or an overflow that forced a re-read), never a silent loss.
        self.stats: Dict[str, int] = {"uevents": 0, "board_events": 0, "overflows": 0}

    def start(self) -> List[Board]:
        """Start listening, then enumerate what is already there (in that order: no race)."""
        try:
            self._monitor.start()
        except OSError as e:
            raise DiscoveryError(f"cannot listen to udev: {e.strerror}") from None
        for device in self._context.list_devices(subsystem="tty"):
            board = board_from_device(device)
            if board is not None:
                self.boards[board.sys_path] = board
                self._note_ports(board.serial)
        return list(self.boards.values())

    def fileno(self) -> int:
        return self._monitor.fileno()

    def poll(self) -> Iterator[Tuple[str, Board]]:
        """Drain pending uevents without blocking: yields ("add"|"remove", board)."""
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
            self.stats["uevents"] += 1
            action = device.action
            if action == "remove":
                board = self.boards.pop(device.sys_path, None)
                if board is not None:
                    self.stats["board_events"] += 1
                    yield "remove", board
            elif action in ("add", "change", "bind", "move"):
                board = board_from_device(device)
                if board is not None:
                    known = self.boards.get(board.sys_path)
                    self.boards[board.sys_path] = board
                    self._note_ports(board.serial)
                    if known != board:
                        self.stats["board_events"] += 1
                        yield "add", board

    def _resync(self) -> Iterator[Tuple[str, Board]]:
        old = self.boards
        self.boards = {}
        for device in self._context.list_devices(subsystem="tty"):
            board = board_from_device(device)
            if board is not None:
                self.boards[board.sys_path] = board
                self._note_ports(board.serial)
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

    def find(self, serial: str, mode: Optional[str] = None) -> List[Board]:
        return [
            b for b in self.boards.values() if b.serial == serial and (mode is None or b.mode == mode)
        ]
