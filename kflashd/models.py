"""Plain data records shared by the daemon, the cycle and kflashctl.

These are values, not services: no I/O, no pyudev objects. The loop thread turns udev
devices into `Board` records so the flash worker and the control socket only ever see
plain data that is safe to hand between threads and to serialise as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

#: USB ids (vendor, product) of the two modes a board can be in.
KATAPULT_USB_ID = ("1d50", "6177")
KLIPPER_USB_ID = ("1d50", "614e")
#: Klipper running as a USB-to-CAN bridge (gs_usb): a `net` interface (can0), no tty.
BRIDGE_USB_ID = ("1d50", "606f")

MODE_KATAPULT = "katapult"
MODE_KLIPPER = "klipper"
MODE_BRIDGE = "can_bridge"  # Klipper as a USB-to-CAN bridge (1d50:606f)
MODE_CAN_NODE = "can_node"  # a CAN toolhead board: no USB identity, named by its UUID
#: The modes in which a board runs Klipper (what "back in Klipper mode" accepts).
KLIPPER_MODES = (MODE_KLIPPER, MODE_BRIDGE)

METHOD_KATAPULT = "katapult"
METHOD_MAKE_FLASH = "make_flash"


@dataclass
class FlashResult:
    """Outcome of one flash attempt; returned on every path, never raised."""

    success: bool
    method: str  # METHOD_KATAPULT or METHOD_MAKE_FLASH
    elapsed_seconds: float = 0.0
    error_message: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "FlashResult":
        return cls(
            success=bool(data["success"]),
            method=str(data["method"]),
            elapsed_seconds=float(data.get("elapsed_seconds", 0.0)),
            error_message=data.get("error_message"),
        )


@dataclass(frozen=True)
class Board:
    """A Klipper or Katapult USB serial board as udev describes it right now.

    `serial` (the chip id) is the identity: it is the same in both modes, while the device
    node and the by-id link change when the board switches between Klipper and Katapult.
    `port_path` (the USB port, e.g. "1-1.2") breaks ties between boards that share a serial
    (boards built without CHIPID all report "12345").
    A USB-to-CAN bridge (MODE_BRIDGE) has no tty: `device_node` is its interface's name
    (can0) and `interface` says the same; a CAN toolhead (MODE_CAN_NODE) is never in the
    udev table: the daemon makes its record from the config (serial = its canbus_uuid).
    """

    serial: str
    mode: str  # MODE_KATAPULT or MODE_KLIPPER
    mcu: str  # USB product string, e.g. "stm32f446xx"
    device_node: str  # e.g. "/dev/ttyACM0"
    sys_path: str
    by_id: Optional[str] = None  # /dev/serial/by-id/usb-katapult_stm32f446xx_<sn>-if00
    by_path: Optional[str] = None
    port_path: Optional[str] = None
    interface: Optional[str] = None  # CAN: a bridge's net interface / a node's bus

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Board":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


#: ROM bootloaders a board without Katapult lands in after a bootloader request: (vendor,
#: product) -> how messages name it. No tty: Klipper cannot reach the board until it is
#: power-cycled.
ROM_BOOTLOADER_IDS = {("0483", "df11"): "STM32 DFU", ("2e8a", "0003"): "RP2040 BOOTSEL"}


@dataclass(frozen=True)
class RomBootloader:
    """A chip's ROM bootloader on a USB port (see ROM_BOOTLOADER_IDS), as udev reports it."""

    what: str  # "STM32 DFU", "RP2040 BOOTSEL"
    port_path: str  # USB port, e.g. "1-1.2": the same as the board's that went there
    sys_path: str
    usb_id: str  # "0483:df11"


# Job states. queued -> running -> done | failed | cancelled | interrupted;
# a job interrupted mid-write goes back to queued only when the same board (serial and USB
# port) waits in Katapult within timeouts.resume (kflashd/recovery.py).
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
JOB_INTERRUPTED = "interrupted"
JOB_PENDING_STATES = (JOB_QUEUED, JOB_RUNNING)
JOB_FINAL_STATES = (JOB_DONE, JOB_FAILED, JOB_CANCELLED, JOB_INTERRUPTED)

# The write-ahead record of a running job (`Job.write`), each on disk (fsync) before the
# next step: "started" before the flash tool may write a byte, "written" once the tool has
# finished (its result is then in `Job.results`). After a crash these say what the board holds.
WRITE_STARTED = "started"
WRITE_DONE = "written"


@dataclass
class Job:
    """A staged firmware image waiting for (or done with) one board.

    `selector` is what the user typed (a board name, a serial, a by-id path); `serial` is
    what it resolved to, because matching a board that appears in udev is by serial only.
    The image itself lives beside the job's metadata in the state dir; `image_sha256` is
    checked again before every flash so a damaged file is never written to a board.
    """

    id: str
    selector: str
    serial: str
    board_name: Optional[str]
    image_sha256: str
    image_size: int
    created: float
    # The USB port path ("1-1.3") the job is bound to: set when boards share its serial
    # (the config's `port`, or a /dev/serial/by-path/ selector); None matches any port.
    port: Optional[str] = None
    image_mcu: Optional[str] = None  # klipper.dict config.MCU, when the client found it
    image_version: Optional[str] = None  # klipper.dict version
    force: bool = False
    now: bool = False
    state: str = JOB_QUEUED
    attempts: int = 0
    message: str = ""
    updated: float = 0.0
    results: List[FlashResult] = field(default_factory=list)
    mcu_version_after: Optional[str] = None  # what Klipper reported after the flash
    version_confirmed: Optional[bool] = None
    batch: Optional[str] = None  # the `kflashctl update` batch that built and staged it
    write: Optional[str] = None  # None, WRITE_STARTED or WRITE_DONE (of the latest attempt)
    write_started: Optional[float] = None  # wall-clock time the write began
    write_port: Optional[str] = None  # USB port (Board.port_path) of the board written to
    write_device: Optional[str] = None  # its device node then, for messages
    resume_until: Optional[float] = None  # interrupted mid-write: re-flash allowed until then

    def fits(self, board: "Board") -> bool:
        """Whether `board` is this job's board: its serial, and its port where bound."""
        return board.serial == self.serial and (self.port is None or board.port_path == self.port)

    def same_board(self, other: "Job") -> bool:
        """Whether two jobs aim at the same board (unbound ports count as the same: a job
        for a shared serial without a port is ambiguous, so it never slips past another)."""
        return self.serial == other.serial and (
            self.port is None or other.port is None or self.port == other.port
        )

    @property
    def label(self) -> str:
        """How log lines and STATUS name the board: its config name, else its serial."""
        return self.board_name or self.serial

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["results"] = [r.to_dict() for r in self.results]
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Job":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["results"] = [FlashResult.from_dict(r) for r in data.get("results", [])]
        return cls(**kwargs)
