"""CAN: USB-to-CAN bridge mainboards, CAN toolhead boards, and the buses between them.

A printer on CAN has its mainboard running Klipper as a USB-to-CAN bridge (USB
`1d50:606f`, gs_usb, a `net` interface such as `can0` under it, no tty) and toolhead
boards on that bus that have no USB identity at all: a toolhead is named by its
`canbus_uuid` on an interface. This module owns the facts kflashd needs about them:

- the UUID a bridge has on its own bus, derived from its USB serial (the chip id) the
  way Katapult's flashtool.py and Klipper derive it: fasthash64 of the chip id bytes
  with seed 0xA16231A7, of which the low 6 bytes, most significant last, are the UUID;
- the state of a CAN interface (present, up or down) read from sysfs, and the message
  that names the fix when it is down;
- which bus a board carries (a bridge: its interface) and which bus it rides on (a
  toolhead: its `canbus_interface`), so a queue or a batch can flash the riders before
  the carrier (flashing the bridge takes the bus down);
- the flashtool.py arguments for a CAN target, and reading its CAN output lines.

Nothing here touches pyudev: the daemon's monitor (devices.py) calls in with plain data.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional

if TYPE_CHECKING:
    from .config import BoardConfig, Config
    from .models import Board, Job

#: Default interface of a CAN board (Klipper's `canbus_interface` default too).
DEFAULT_INTERFACE = "can0"
#: The bitrate almost every Klipper CAN printer uses; only shown in the fix, never set.
TYPICAL_BITRATE = 1000000

_MASK64 = (1 << 64) - 1
_FASTHASH_M = 0x880355F21E6D1965
_MIX_MUL = 0x2127599BF4325C37
_UUID_SEED = 0xA16231A7
_UUID_RE = re.compile(r"\A[0-9a-f]{12}\Z")
_IFACE_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,15}\Z")  # IFNAMSIZ - 1, no slashes

# sysfs net flags (linux/if.h): IFF_UP is the administrative state `ip link set up` sets.
_IFF_UP = 0x1


def _mix(value: int) -> int:
    value ^= value >> 23
    value = (value * _MIX_MUL) & _MASK64
    return value ^ (value >> 47)


def fasthash64(data: bytes, seed: int) -> int:
    """fast-hash's 64-bit hash (Zilong Tan's algorithm): 8-byte little-endian words, each
    mixed into the state; a short tail is read as one little-endian word."""
    h = seed ^ ((len(data) * _FASTHASH_M) & _MASK64)
    whole = len(data) - len(data) % 8
    for pos in range(0, whole, 8):
        h ^= _mix(int.from_bytes(data[pos:pos + 8], "little"))
        h = (h * _FASTHASH_M) & _MASK64
    tail = data[whole:]
    if tail:
        h ^= _mix(int.from_bytes(tail, "little"))
        h = (h * _FASTHASH_M) & _MASK64
    return _mix(h)


def uuid_from_serial(serial: str) -> Optional[str]:
    """The canbus UUID (12 lower-case hex digits) of a USB-to-CAN bridge with this USB serial.

    None when the serial is not hex (a chip id is; Klipper without CHIPID reports "12345",
    which is hex but shared by every such board, so its UUID names no one board either).
    """
    try:
        chip_id = bytes.fromhex(serial)
    except ValueError:
        return None
    if not chip_id:
        return None
    digest = fasthash64(chip_id, _UUID_SEED)
    return digest.to_bytes(8, "little")[:6].hex()


def normalize_uuid(text: str) -> Optional[str]:
    """A canbus_uuid as Klipper writes it (12 hex digits), lower-cased; None if it is not one."""
    value = text.strip().lower()
    return value if _UUID_RE.match(value) else None


def valid_interface(name: str) -> bool:
    return bool(_IFACE_RE.match(name)) and name not in (".", "..")


# ---------------------------------------------------------------- interfaces --------------


@dataclass(frozen=True)
class Interface:
    """A CAN network interface as sysfs shows it now."""

    name: str
    present: bool
    up: bool = False
    operstate: str = ""
    sys_path: Optional[str] = None
    bridge_serial: Optional[str] = None  # the USB-to-CAN bridge it belongs to, if any

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "present": self.present, "up": self.up,
                "operstate": self.operstate, "bridge_serial": self.bridge_serial}

    @property
    def state(self) -> str:
        """What `kflashctl devices` shows: up, down or missing."""
        if not self.present:
            return "missing"
        return "up" if self.up else "down"


def is_up(flags: Optional[str], operstate: Optional[str]) -> bool:
    """An interface is usable when it is administratively up (IFF_UP) and its operstate is
    not down: `ip link set can0 up` sets the flag; a bus-off controller reports down."""
    try:
        admin_up = bool(int((flags or "0").strip(), 16) & _IFF_UP)
    except ValueError:
        admin_up = False
    state = (operstate or "").strip().lower()
    return admin_up and state not in ("down", "lowerlayerdown", "notpresent")


def read_interface(name: str, sysfs: str = "/sys/class/net") -> Interface:
    """The interface's state straight from sysfs (no uevent is sent when a link goes up or
    down, so the daemon reads this again before it trusts the bus)."""
    if not valid_interface(name):
        return Interface(name, False)
    path = os.path.join(sysfs, name)
    if not os.path.exists(path):
        return Interface(name, False)

    def attr(key: str) -> Optional[str]:
        try:
            with open(os.path.join(path, key), encoding="ascii", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return None

    operstate = attr("operstate") or ""
    return Interface(name, True, is_up(attr("flags"), operstate), operstate, os.path.realpath(path))


def down_message(interface: Interface) -> Optional[str]:
    """Why nothing can be flashed over this interface now (naming the fix), or None."""
    if not interface.present:
        return (
            f"{interface.name} does not exist: is the USB-to-CAN bridge (or CAN adapter) "
            f"connected and running? (`ip link show {interface.name}`)"
        )
    if not interface.up:
        return (
            f"{interface.name} is down: bring it up (ip link set {interface.name} up type can "
            f"bitrate {TYPICAL_BITRATE})"
        )
    return None


# ---------------------------------------------------------------- boards and buses -------


def can_board(config: "Config", key: str) -> Optional["BoardConfig"]:
    """The configured CAN toolhead board whose canbus_uuid is `key` (a job's serial)."""
    uuid = normalize_uuid(key)
    if uuid is None:
        return None
    for board in config.boards.values():
        if board.canbus_uuid == uuid and not board.serial:
            return board
    return None


def rides_on(config: "Config", key: str) -> Optional[str]:
    """The bus a board rides on (a CAN toolhead: its interface), or None for a USB board.

    `key` is what a job names the board by: a USB serial, or a toolhead's UUID.
    """
    board = can_board(config, key)
    return board.canbus_interface if board is not None else None


def carries(config: "Config", key: str, bridges: Iterable["Board"] = ()) -> Optional[str]:
    """The bus a board carries (a USB-to-CAN bridge: its interface), or None.

    Known from a bridge present now (`bridges`: the monitor's bridge boards), else from the
    config: a USB board configured with a `canbus_uuid` is a bridge on its
    `canbus_interface`.
    """
    for bridge in bridges:
        if bridge.serial == key and bridge.interface:
            return bridge.interface
    for board in config.boards.values():
        if board.serial == key and board.canbus_uuid:
            return board.canbus_interface
    return None


def order_jobs(jobs: List["Job"], config: "Config", bridges: Iterable["Board"] = ()) -> List["Job"]:
    """`jobs` with every CAN toolhead's job before the job of the bridge carrying its bus.

    Stable otherwise (the queue's own order): only bridge jobs move, behind the last
    rider of their bus.
    """
    bridges = list(bridges)
    buses = {rides_on(config, j.serial) for j in jobs} - {None}
    if not buses:
        return list(jobs)
    riders = [j for j in jobs if rides_on(config, j.serial) is not None]
    carriers = [j for j in jobs if carries(config, j.serial, bridges) in buses]
    rest = [j for j in jobs if j not in carriers]
    last_rider = max((rest.index(j) for j in riders), default=-1)
    return rest[:last_rider + 1] + carriers + rest[last_rider + 1:]


def bridge_uuid(config: "Config", serial: str) -> Optional[str]:
    """A bridge's UUID: the configured canbus_uuid if given, else derived from its serial."""
    for board in config.boards.values():
        if board.serial == serial and board.canbus_uuid:
            return board.canbus_uuid
    return uuid_from_serial(serial)


# ---------------------------------------------------------------- proof -----------------


def query_mcu_version_for_uuid(api_socket: str, uuid: str, timeout: float = 2.0) -> Optional[str]:
    """The version Klipper reports for the [mcu] / [mcu NAME] whose canbus_uuid is `uuid`.

    Exactly one section must name it (klippy/mcu.py reads canbus_uuid before serial); None
    covers every way of not knowing, so a caller polls and never takes another MCU's word.
    """
    from . import guard

    try:
        mcus = [n for n in guard.list_objects(api_socket, timeout) if n == "mcu" or n.startswith("mcu ")]
        if not mcus:
            return None
        query: Dict[str, Optional[List[str]]] = {"configfile": ["settings"]}
        query.update({n: ["mcu_version"] for n in mcus})
        status = guard.query_objects(api_socket, query, timeout)
    except guard.ApiError:
        return None
    configfile = status.get("configfile")
    settings = configfile.get("settings") if isinstance(configfile, dict) else None
    if not isinstance(settings, dict):
        return None
    named = [n for n in mcus if isinstance(settings.get(n.lower()), dict)
             and normalize_uuid(str(settings[n.lower()].get("canbus_uuid") or "")) == uuid]
    if len(named) != 1:
        return None
    mcu = status.get(named[0])
    version = mcu.get("mcu_version") if isinstance(mcu, dict) else None
    return version if isinstance(version, str) and version else None


# ---------------------------------------------------------------- flashtool.py -----------


def target_args(interface: str, uuid: str) -> List[str]:
    """flashtool.py's CAN target: `-i IFACE -u UUID` (instead of `-d DEVICE`)."""
    return ["-i", interface, "-u", uuid]


#: The line flashtool.py prints when a bridge re-enumerated as something other than
#: Katapult (the chip's ROM bootloader): it then exits 0 as after a bootloader request.
NOT_KATAPULT_LINE = "Device is not Katapult, exiting..."

_QUERY_LINE = re.compile(r"^Detected UUID: ([0-9a-f]{12}), Application: (\w+)\s*$", re.M)


def parse_query(output: str) -> Dict[str, str]:
    """`flashtool.py -i IFACE -q` output -> {uuid: application} ("Katapult", "Klipper", ...)."""
    return {m.group(1): m.group(2) for m in _QUERY_LINE.finditer(output)}


def in_rom_bootloader(output: str) -> bool:
    return NOT_KATAPULT_LINE in output


def rom_bootloader_message(serial: str, output: str) -> str:
    detected = re.search(r"^Detected new USB Device: (.*)$", output, re.M)
    what = f" ({detected.group(1).strip()})" if detected else ""
    return (
        f"board {serial} rebooted into a bootloader that is not Katapult{what}: it is probably "
        f"in its chip's ROM bootloader (DFU/BOOTSEL) and stays there until it is power-cycled; "
        f"nothing was written (install Katapult on it, or flash it by hand)"
    )
