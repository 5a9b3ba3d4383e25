"""What the daemon has learnt about each board from the board itself, kept in state_dir.

Per USB serial: whether (and when) it was last seen in Katapult mode, and what its Katapult
reported in CONNECT (application start, MCU, Katapult version). Two decisions rest on it:
- a board is sent to its bootloader (`--now`) only when it is known to run Katapult (seen
  here before, or `katapult = true` in its `[boards.NAME]`): a bootloader request to a
  board without Katapult drops it into its ROM bootloader until someone power-cycles it;
- an image is checked against the board's application start before Klipper is stopped,
  even while the board runs Klipper (preflight.py).

One small JSON file, `state_dir/boards.json`, written with `atomic_write` (old or new
content after a crash, never a mix). A damaged file is not fatal: the daemon then knows
less (every board is "never seen"), which only makes it refuse more, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional

from . import katapult
from .models import Board
from .store import atomic_write

FILE_NAME = "boards.json"
FORMAT_VERSION = 1

log = logging.getLogger("kflashd.boardfacts")


@dataclass
class BoardFacts:
    serial: str
    seen_katapult: Optional[float] = None  # last time the board was seen as 1d50:6177
    port_path: Optional[str] = None  # USB port it was last seen on
    mcu: Optional[str] = None  # as Katapult reports it in CONNECT
    app_start: Optional[int] = None
    katapult_version: Optional[str] = None
    probed: Optional[float] = None  # when CONNECT last answered
    rom_bootloader: Optional[str] = None  # "STM32 DFU" if it was last seen there instead

    @classmethod
    def from_dict(cls, data: Dict) -> "BoardFacts":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class BoardFactsStore:
    """The per-board facts; safe to use from the loop thread and the flash worker."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, FILE_NAME)
        self._lock = threading.Lock()
        self._boards: Dict[str, BoardFacts] = {}
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
            boards = data["boards"]
            for serial, entry in boards.items():
                if isinstance(serial, str) and isinstance(entry, dict):
                    self._boards[serial] = BoardFacts.from_dict(dict(entry, serial=serial))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error(
                f"{self.path} is unreadable ({e}): kflashd forgets which boards run Katapult; "
                f"--now is refused until each board was seen in Katapult again (double-tap reset)"
            )
            self._boards = {}

    def get(self, serial: str) -> Optional[BoardFacts]:
        with self._lock:
            facts = self._boards.get(serial)
            return BoardFacts(**asdict(facts)) if facts is not None else None

    def known_katapult(self, serial: str) -> bool:
        facts = self.get(serial)
        return facts is not None and facts.seen_katapult is not None

    def seen_in_katapult(self, serial: str, port_path: Optional[str]) -> None:
        """The board showed up as Katapult (USB 1d50:6177): it runs Katapult."""
        with self._lock:
            facts = self._boards.get(serial) or BoardFacts(serial)
            changed = facts.seen_katapult is None or facts.port_path != port_path or facts.rom_bootloader
            facts.seen_katapult = time.time()
            facts.port_path = port_path
            facts.rom_bootloader = None
            self._boards[serial] = facts
            if changed:  # the time alone is not worth a disk write on every plug-in
                self._save_locked()

    def probed(self, serial: str, port_path: Optional[str], mcu: str, app_start: int, version: str) -> None:
        """Katapult answered CONNECT with these facts."""
        with self._lock:
            facts = self._boards.get(serial) or BoardFacts(serial)
            facts.seen_katapult = facts.probed = time.time()
            facts.port_path = port_path
            facts.mcu, facts.app_start, facts.katapult_version = mcu, app_start, version
            facts.rom_bootloader = None
            self._boards[serial] = facts
            self._save_locked()

    def landed_in_rom(self, serial: str, what: str) -> None:
        """A reboot request put the board in its ROM bootloader: it has no Katapult (any more)."""
        with self._lock:
            facts = self._boards.get(serial) or BoardFacts(serial)
            facts.seen_katapult = None
            facts.rom_bootloader = what
            self._boards[serial] = facts
            self._save_locked()

    def _save_locked(self) -> None:
        data = {"format": FORMAT_VERSION,
                "boards": {s: {k: v for k, v in asdict(f).items() if k != "serial"} for s, f in self._boards.items()}}
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as e:
            # Not fatal: the facts stay in memory; the daemon only knows less after a restart.
            log.error(f"cannot save board facts to {self.path}: {e.strerror or e}")


def learn_board(facts: BoardFactsStore, board: Board, baud: int = 0, timeout: float = 1.0,
                tries: int = 3) -> katapult.KatapultInfo:
    """CONNECT to `board` (in Katapult), remember what it reports, and return it.

    Read-only: no write, no COMPLETE; the board stays in Katapult. Raises DiscoveryError.
    """
    info = katapult.probe(board.device_node, board.mcu, baud, timeout=timeout, tries=tries)
    facts.probed(board.serial, board.port_path, info.mcu, info.app_start, info.version)
    return info
