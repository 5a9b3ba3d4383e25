"""What a printer's update (`kflashctl update`) is, as data: its boards, their kinds, their
order in the one stop of Klipper, and the record kept of it (`state_dir/batches/<id>.json`).

Plain values, no I/O: batch.py fills them in as the update goes, updates.py persists and
shows them, kflashctl prints them. The order is the one rule here that is about safety:
flashing a USB-to-CAN bridge takes its CAN bus down, so every toolhead on that bus goes
before it (`flash_order`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import BoardConfig
from .models import Board

# Kinds of board, by what carries them (see flash_order).
KIND_CAN_TOOLHEAD = "can"
KIND_USB = "usb"
KIND_CAN_BRIDGE = "bridge"

# A board's state in the batch.
B_PENDING = "pending"
B_BUILDING = "building"
B_SKIPPED = "skipped"
B_BUILD_FAILED = "build failed"
B_QUEUED = "queued"  # built and staged: its job waits for the stop
B_FLASHING = "flashing"
B_DONE = "done"
B_FAILED = "failed"
B_INTERRUPTED = "interrupted"
B_NOT_FLASHED = "not flashed"  # its bus's bridge failed, or the batch was stopped
BOARD_FINAL = (B_SKIPPED, B_BUILD_FAILED, B_DONE, B_FAILED, B_INTERRUPTED, B_NOT_FLASHED)

# The batch's state.
S_BUILDING = "building"
S_WAITING = "waiting for printer"
S_FLASHING = "flashing"
S_DONE = "done"
S_FAILED = "failed"  # at least one board failed
S_INTERRUPTED = "interrupted"
BATCH_FINAL = (S_DONE, S_FAILED, S_INTERRUPTED)

_RANK = {KIND_CAN_TOOLHEAD: 0, KIND_USB: 1, KIND_CAN_BRIDGE: 2}


def board_kind(board: BoardConfig, bridge_serials: Sequence[str] = ()) -> str:
    """What carries the board: only `canbus_uuid`, a CAN toolhead; `serial` and
    `canbus_uuid` (Klipper talks to it over CAN, Katapult over USB), or a serial that is a
    USB-to-CAN bridge now (`bridge_serials`, from udev), the bridge; else a USB board."""
    if board.serial and (board.canbus_uuid or board.serial in bridge_serials):
        return KIND_CAN_BRIDGE
    if board.canbus_uuid:
        return KIND_CAN_TOOLHEAD
    return KIND_USB


def board_bus(board: BoardConfig, bridges: Sequence[Board] = ()) -> Optional[str]:
    """The CAN interface a toolhead rides on or a bridge carries ("can0"), else None."""
    for bridge in bridges:
        if board.serial and bridge.serial == board.serial and bridge.interface:
            return bridge.interface
    return board.canbus_interface if board.canbus_uuid else None


def flash_order(kinds: Sequence[str]) -> List[int]:
    """Indexes of `kinds` in flash order: CAN toolheads, then USB boards, the bridge last
    (flashing the bridge takes the CAN bus down: every toolhead must be done by then).
    Stable: boards of one kind keep the order they were given in."""
    return sorted(range(len(kinds)), key=lambda i: (_RANK.get(kinds[i], 1), i))


@dataclass
class BatchBoard:
    """One board's line in the batch: what happened to it, and its job once staged."""

    name: str
    serial: str  # what its job names it by: the USB serial, or a CAN toolhead's canbus_uuid
    kind: str = KIND_USB
    port: Optional[str] = None  # USB port path, where boards share a serial
    bus: Optional[str] = None
    state: str = B_PENDING
    phase: str = ""
    percent: Optional[int] = None
    job: Optional[str] = None
    running_version: Optional[str] = None
    built_version: Optional[str] = None
    message: str = ""


@dataclass
class Batch:
    id: str
    created: float
    force: bool = False
    state: str = S_BUILDING
    tree_version: Optional[str] = None
    boards: List[BatchBoard] = field(default_factory=list)
    message: str = ""
    finished: float = 0.0
    klipper_stops: int = 0  # how many times this batch stopped Klipper: 0 or 1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Batch":
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in names}
        board_names = set(BatchBoard.__dataclass_fields__)
        kwargs["boards"] = [BatchBoard(**{k: v for k, v in b.items() if k in board_names})
                            for b in data.get("boards", [])]
        return cls(**kwargs)

    def summary(self) -> str:
        counts: Dict[str, int] = {}
        for b in self.boards:
            counts[b.state] = counts.get(b.state, 0) + 1
        return ", ".join(f"{n} {state}" for state, n in counts.items())

    def current(self) -> Optional[Tuple[int, BatchBoard]]:
        for i, b in enumerate(self.boards):
            if b.state in (B_BUILDING, B_FLASHING):
                return i, b
        return None


def new_batch(batch_id: str, boards: Sequence[BoardConfig], force: bool,
              bridges: Sequence[Board] = ()) -> Batch:
    """A batch over `boards`, listed in flash order (builds go in that order too).
    `bridges`: the USB-to-CAN bridges udev shows now."""
    serials = [b.serial for b in bridges]
    kinds = [board_kind(b, serials) for b in boards]
    return Batch(batch_id, time.time(), force,
                 boards=[BatchBoard(boards[i].name, boards[i].serial or boards[i].canbus_uuid or "",
                                    kinds[i], boards[i].port, board_bus(boards[i], bridges))
                         for i in flash_order(kinds)])
