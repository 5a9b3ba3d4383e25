"""The preflight checks of one flash cycle that need the board's own word (docs/design.md,
"The flash cycle", step 0; "Fail closed"): run by FlashCycle, before anything is touched
and again right after a reboot into Katapult.

- Before: a board that runs Klipper may be asked to reboot only when it is known to run
  Katapult (seen there before, or `katapult = true`); its image is checked against the
  application start its Katapult reported on its last visit. A board that sits in Katapult
  is read now (CONNECT only: nothing written, no COMPLETE, it stays in Katapult; Klipper
  does not use a board while it is in its bootloader).
- After the reboot: read and check again (the board may have had no facts yet, or a new
  Katapult). A refusal then writes nothing and sends COMPLETE alone: Katapult boots the
  firmware that was there, and Klipper (started by the cycle) finds the board again.
- A chip's ROM bootloader (STM32 DFU, RP2040 BOOTSEL) on the board's USB port instead of
  Katapult: the job fails at once, with its own journal MESSAGE_ID.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from . import journal, katapult, preflight
from .boardfacts import BoardFactsStore, learn_board
from .config import Config
from .errors import DiscoveryError
from .models import KLIPPER_MODES, MODE_KATAPULT, Board, Job, RomBootloader


class BoardCheck:
    def __init__(self, config: Config, facts: BoardFactsStore, job: Job, log: logging.LoggerAdapter) -> None:
        self.config = config
        self.facts = facts
        self.job = job
        self.log = log

    def before(self, board: Board, image: bytes) -> Optional[str]:
        """Why this job must not go on, or None; touches nothing but a read-only CONNECT."""
        job = self.job
        if board.mode in KLIPPER_MODES:  # runs Klipper (a tty, or a USB-to-CAN bridge)
            named = self.config.board_by_serial(board.serial)
            refusal = preflight.reboot_refusal(
                job.label, self.facts.known_katapult(board.serial), bool(named and named.katapult),
                named.name if named else None,
            )
            if refusal:
                return refusal
            known = self.facts.get(board.serial)
            if known is None or known.app_start is None:
                self.log.info("the board's application start is not known yet: checked after the reboot into Katapult")
                return None
            return self._offset(image, known.app_start, known.mcu or board.mcu)
        if board.mode != MODE_KATAPULT:
            return None  # a CAN toolhead: cancycle's checks
        try:
            info = learn_board(self.facts, board, self.config.katapult_baud)
        except DiscoveryError as e:
            known = self.facts.get(board.serial)
            if known is None or known.app_start is None:
                return (f"cannot read the application start from the board's Katapult ({e}); nothing "
                        f"was touched: replug the board or double-tap reset, then queue again")
            self.log.warning(f"{e}; using the application start it reported before, 0x{known.app_start:08X}")
            return self._offset(image, known.app_start, known.mcu or board.mcu)
        self.log.info(f"Katapult {info.version} on {info.mcu}: application start 0x{info.app_start:08X}")
        return self._offset(image, info.app_start, info.mcu or board.mcu)

    def _offset(self, image: bytes, app_start: int, mcu: Optional[str]) -> Optional[str]:
        mcu = mcu or self.job.image_mcu
        if not preflight.is_cortex_m(mcu):
            self.log.info(f"bootloader offset not checked: {mcu or 'unknown MCU'} is not a Cortex-M part")
            return None
        refusal = preflight.offset_refusal(image, app_start, mcu)
        if refusal and self.job.force:
            self.log.warning(f"--force: writing anyway although the {refusal}")
            return None
        return refusal

    def after_reboot(self, board: Board, image: bytes,
                     wait_for_klipper: Callable[[float], Optional[Any]]) -> Optional[str]:
        """The board just came up in Katapult (Klipper is stopped): check again. On a refusal
        nothing is written and the board is told to boot its old firmware."""
        refusal = self.before(board, image)
        if not refusal:
            return None
        refusal = refusal.replace("nothing was touched", "nothing was written")  # Klipper was stopped
        self.log.error(f"after the reboot into Katapult: {refusal}")
        try:
            katapult.boot_application(board.device_node, self.config.katapult_baud)
        except DiscoveryError as e:
            return f"{refusal}; sending the board back to its firmware failed too ({e}): reset it by hand"
        if wait_for_klipper(self.config.timeout_reboot or 5) is None:
            return f"{refusal}; the board was told to boot its old firmware but did not come back in Klipper mode"
        return f"{refusal}; the board runs its old firmware again"

    def in_rom_bootloader(self, board: Board, rom: RomBootloader) -> str:
        message = (
            f"board {self.job.label} is in its ROM bootloader ({rom.what}), not Katapult: power-cycle it "
            f"(it has no Katapult: nothing was written; install Katapult, or flash it another way)"
        )
        self.facts.landed_in_rom(board.serial, rom.what)
        self.log.error(message, extra={"journal_fields": {
            "MESSAGE_ID": journal.MSG_ROM_BOOTLOADER, "KFLASHD_USB_ID": rom.usb_id, "KFLASHD_PORT": rom.port_path}})
        return message

