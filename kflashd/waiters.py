"""Cycles (and `kflashctl update` batches) waiting in their worker thread for a board.

Owns the list of board waiters and its lock: the one piece of daemon state that worker
threads touch. The loop thread wakes a waiter when udev reports the board (or a chip's ROM
bootloader on the waiter's USB port, or a stop signal); the worker only waits.
Must never decide which job runs or touch a board: it only says "your board is here".
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Tuple, Union

from .devices import BoardMonitor
from .models import Board, RomBootloader
from .reactor import Reactor


class BoardWaiter:
    """A cycle waiting for its board in a mode: same serial, and same USB port where known
    (a board keeps its port across the reboot between Klipper and Katapult)."""

    __slots__ = ("serial", "port", "mode", "event", "board", "rom_port")

    def __init__(self, serial: str, mode: Union[str, Tuple[str, ...]], port: Optional[str],
                 rom_port: Optional[str] = None) -> None:
        self.serial = serial
        self.port = port
        self.mode = (mode,) if isinstance(mode, str) else tuple(mode)
        self.event = threading.Event()
        self.board: Optional[Any] = None  # a Board, or the RomBootloader that came instead
        self.rom_port = rom_port  # also wake on a chip's ROM bootloader on this USB port

    def wants(self, board: Board) -> bool:
        return (board.serial == self.serial and board.mode in self.mode
                and (self.port is None or board.port_path == self.port))


class BoardWaiting:
    """The daemon's side of `CycleHost.wait_for_board` (a mixin of `Daemon`)."""

    reactor: Reactor
    monitor: Optional[BoardMonitor]
    _waiters: List[BoardWaiter]
    _waiters_lock: threading.Lock

    def wait_for_board(
        self, serial: str, mode: Union[str, Tuple[str, ...]], timeout: float, abort: threading.Event,
        port: Optional[str] = None, rom_port: Optional[str] = None,
    ) -> Optional[Any]:
        """The board in `mode`; with `rom_port`, also the RomBootloader that appeared on that
        USB port instead (a board without Katapult); None at the timeout."""
        waiter = BoardWaiter(serial, mode, port, rom_port)
        with self._waiters_lock:
            self._waiters.append(waiter)
            if abort.is_set():  # a stop signal came before we were on the list to be woken
                waiter.event.set()
        # The board may already be there: ask the loop, which owns the board table.
        self.reactor.call_soon_threadsafe(lambda: self._check_waiter(waiter))
        try:
            waiter.event.wait(timeout)
        finally:
            with self._waiters_lock:
                self._waiters.remove(waiter)
        return waiter.board

    def _check_waiter(self, waiter: BoardWaiter) -> None:
        assert self.monitor is not None
        found = [b for b in self.monitor.find(waiter.serial, waiter.mode) if waiter.wants(b)]
        roms = [r for r in self.monitor.roms.values() if waiter.rom_port and r.port_path == waiter.rom_port]
        if found:
            waiter.board = found[0]
            waiter.event.set()
        elif roms:
            waiter.board = roms[0]
            waiter.event.set()

    def _wake_waiters(self, board: Board) -> None:
        with self._waiters_lock:
            for waiter in self._waiters:
                if waiter.wants(board):
                    waiter.board = board
                    waiter.event.set()

    def _wake_rom_waiters(self, rom: RomBootloader) -> None:
        """A chip's ROM bootloader came on a USB port: the waiters on that port see it."""
        with self._waiters_lock:
            for waiter in self._waiters:
                if waiter.rom_port is not None and waiter.rom_port == rom.port_path:
                    waiter.board = rom
                    waiter.event.set()

    def _wake_all_waiters(self) -> None:
        """A stop signal: every waiting worker returns (with no board) and ends its cycle."""
        with self._waiters_lock:
            for waiter in self._waiters:
                waiter.event.set()
