"""Klipper is down after a failed start: say so, and keep trying to start it.

Owns `klipper_down` (the reason shown in STATUS and `kflashctl status`) and its retry timer.
The retry runs `systemctl start` in a thread, never on the loop thread, and not while a
cycle or a batch holds Klipper (their own start is the next try). Must never stop Klipper.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from .config import Config
from .errors import KflashError
from .models import Job
from .reactor import NEVER, Reactor
from .recovery import remove_marker

log = logging.getLogger("kflashd")


class KlipperRetry:
    """The Klipper-down retry (a mixin of `Daemon`, which registers `_klipper_timer`)."""

    config: Config
    reactor: Reactor
    cycle: Optional[Any]
    updates: Any
    stopping: bool
    klipper_down: Optional[str]
    _klipper_starting: bool
    _klipper_timer: Any

    def klipper_start_failed(self, job: Optional[Job], message: str) -> None:
        def update() -> None:
            self.klipper_down = message
            if self.cycle is not None:
                self.cycle.start_failed = True
            self.reactor.update_timer(self._klipper_timer, self.reactor.monotonic() + self.config.klipper_retry)
            self.update_status()

        # The flash core has logged it (CRITICAL, MESSAGE_ID); here it becomes STATUS.
        self.reactor.call_soon_threadsafe(update)

    def _retry_klipper_start(self, now: float) -> float:
        """Klipper is down after a failed start: keep trying, off the loop thread."""
        if not self.klipper_down or self.stopping:
            return NEVER
        if self.cycle is not None or self.updates.holds_klipper():  # their own start is the next try
            return now + self.config.klipper_retry
        from . import service

        services = tuple(self.config.klipper_services)
        timeout = self.config.timeout_service
        self._klipper_starting = True

        def work() -> None:
            try:
                service.start_services(services, timeout=timeout, tries=1)
                error = None
            except KflashError as e:
                error = str(e)
            self.reactor.call_soon_threadsafe(lambda: self._klipper_retry_done(error))

        threading.Thread(target=work, name="klipper-retry", daemon=True).start()
        return NEVER

    def _klipper_retry_done(self, error: Optional[str]) -> None:
        self._klipper_starting = False
        if self.stopping:
            self.reactor.stop()
        if error is None:
            log.warning("Klipper was started again: it is no longer down")
            self.klipper_down = None
            remove_marker(self.config.runtime_dir)
        else:
            log.error(f"Klipper is still down: {error}; trying again in {self.config.klipper_retry:g} s")
            self.klipper_down = error
            self.reactor.update_timer(self._klipper_timer, self.reactor.monotonic() + self.config.klipper_retry)
        self.update_status()
        self.schedule()
