"""A board running "Klipper": reacts to the 1200-baud bootloader request, tells its version.

Facts (docs/katapult-protocol.md, "The 1200-baud request"; Klipper's src/generic/usb_cdc.c):
Klipper reboots into its bootloader when the host sets the line to 1200 baud (with DTR low; umockdev's PTYs do not
forward modem lines, so only the baud rate is watched). On Linux a PTY master reports the
slave's line settings, so ``termios.tcgetattr(master)`` shows the 1200 baud.

The real Klipper wire protocol is not emulated. Instead the board answers one line-based
query so the fake Klipper service can learn which firmware "runs": the host writes
``IDENTIFY_QUERY`` and gets one JSON line back (``app``, ``mcu``, ``serial``, ``version``).
"""
from __future__ import annotations

import json
import termios
from typing import Callable, Optional

from tests.farm.pty_device import PtyDevice

IDENTIFY_QUERY = b"identify\n"
WATCH_INTERVAL_SECONDS = 0.005


class KlipperAppEmulator(PtyDevice):
    """Klipper firmware on one PTY master.

    ``on_bootloader_request(emulator)`` is called once (from the device thread) when the line
    is set to 1200 baud; the owner then re-enumerates the board as Katapult.
    """

    tick_interval = WATCH_INTERVAL_SECONDS

    def __init__(self, fd: int, mcu: str, serial: str, version: str, name: str = "klipper",
                 on_bootloader_request: Optional[Callable[["KlipperAppEmulator"], None]] = None) -> None:
        super().__init__(fd, name)
        self.mcu = mcu
        self.serial = serial
        self.version = version
        self.on_bootloader_request = on_bootloader_request
        self.bootloader_requested = False
        self.queries = 0
        self._line = bytearray()

    def on_tick(self, now: float) -> None:
        if self.bootloader_requested or self.hung_up:
            return
        try:
            ispeed, ospeed = termios.tcgetattr(self.fd)[4:6]
        except termios.error:
            return
        if termios.B1200 in (ispeed, ospeed):
            self.bootloader_requested = True
            if self.on_bootloader_request is not None:
                self.on_bootloader_request(self)

    def on_data(self, data: bytes) -> None:
        if self.bootloader_requested:
            return
        self._line += data
        while b"\n" in self._line:
            line, _, rest = bytes(self._line).partition(b"\n")
            self._line = bytearray(rest)
            if line + b"\n" == IDENTIFY_QUERY:
                self.queries += 1
                reply = {"app": "Klipper", "mcu": self.mcu, "serial": self.serial, "version": self.version}
                self.send(json.dumps(reply, sort_keys=True).encode() + b"\n")
        if len(self._line) > 4096:
            self._line.clear()  # binary noise from some other host program: ignore
