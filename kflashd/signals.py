"""SIGTERM, SIGINT and SIGHUP from the daemon's first instruction, before the loop exists.

Start-up can take long: a crash marker makes the daemon start Klipper before anything else,
up to 3 tries of timeouts.service (~90 s). Until the loop registers its own handlers, a
signal would take its default action: a SIGHUP (`systemctl reload`) would kill the daemon,
a SIGTERM would kill it between two tries. `EarlySignals`, installed first thing in
`main()`, holds them instead: a stop request sets `stop` (start-up's retries watch it and
the daemon stops cleanly, Klipper's marker left for the next start), and every signal is
handed to the loop once it runs (`replay`), so a SIGHUP becomes a reload once ready.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, List

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class EarlySignals:
    """Latches the signals in HANDLED until the loop takes them over (main thread only)."""

    def __init__(self) -> None:
        self.received: List[int] = []
        self.stop = threading.Event()  # a SIGTERM or SIGINT came
        for signum in HANDLED:
            signal.signal(signum, self._handler)

    def _handler(self, signum: int, _frame: object) -> None:
        # Only a list append and an Event.set: both safe in a Python signal handler.
        self.received.append(signum)
        if signum != signal.SIGHUP:
            self.stop.set()

    def replay(self, deliver: Callable[[int], None]) -> None:
        """Hand what was latched to `deliver` (the loop's handlers are installed by now)."""
        pending, self.received = self.received, []
        for signum in pending:
            deliver(signum)
