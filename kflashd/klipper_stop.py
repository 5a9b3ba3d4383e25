"""One stop of Klipper, owned by one job (a flash cycle) or by a batch (`kflashctl update`).

Whoever stops Klipper owns three promises, kept here so that a single job and a batch of
boards keep them the same way:

- before the stop, a crash marker in `runtime_dir` says "Klipper may be down" and who
  stopped it: a daemon killed with SIGKILL starts Klipper at its next start-up;
- `service.klipper_service_stopped()` starts Klipper again on every way out of the block;
- the marker goes once Klipper was started; it stays while a start failed, so that a
  restarted daemon still starts Klipper (the daemon removes it once a start works).

This module never decides what happens while Klipper is down; that is the cycle's (one
board) or the batch's (several boards, in order) business.
"""

from __future__ import annotations

import json
import logging
import os
import time
from types import TracebackType
from typing import Any, Callable, ContextManager, Dict, Optional, Type

from . import service
from .config import Config
from .store import atomic_write

MARKER_NAME = "cycle.marker"


def marker_path(config: Config) -> str:
    return os.path.join(config.runtime_dir, MARKER_NAME)


class KlipperStop:
    """`with KlipperStop(...):` Klipper is stopped inside, started again on every exit.

    `owner` goes into the crash marker (e.g. {"job": id, "serial": sn} or {"batch": id,
    "jobs": [...]}) so that recovery can say whose stop it was. Entering raises ServiceError
    when Klipper could not be stopped (nothing was flashed; the marker is removed unless a
    half-done stop had to be undone and that start failed). After the block,
    `start_failure` is None, or why Klipper could not be started again (also passed to
    `on_start_failed` at once, which makes it STATUS and a retry timer).
    """

    def __init__(
        self,
        config: Config,
        log: logging.Logger,
        owner: Dict[str, Any],
        on_start_failed: Callable[[str], None],
    ) -> None:
        self.config = config
        self.log = log
        self.owner = owner
        self.on_start_failed = on_start_failed
        self.start_failure: Optional[str] = None
        self._stopped: Optional[ContextManager[None]] = None

    def _start_failed(self, message: str) -> None:
        self.start_failure = message
        self.on_start_failed(message)

    def __enter__(self) -> "KlipperStop":
        self._write_marker()
        self._stopped = service.klipper_service_stopped(
            services=tuple(self.config.klipper_services),
            timeout=self.config.timeout_service,
            on_start_failed=self._start_failed,
            log=self.log,
        )
        try:
            self._stopped.__enter__()
        except BaseException:
            self._stopped = None
            self._finish()
            raise
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Optional[bool]:
        assert self._stopped is not None
        try:
            return self._stopped.__exit__(exc_type, exc, tb)
        finally:
            self._stopped = None
            self._finish()

    def _finish(self) -> None:
        if self.start_failure is None:
            try:
                os.unlink(marker_path(self.config))
            except FileNotFoundError:
                pass

    def _write_marker(self) -> None:
        data = dict(self.owner, services=self.config.klipper_services, pid=os.getpid(), time=time.time())
        os.makedirs(self.config.runtime_dir, exist_ok=True)
        atomic_write(marker_path(self.config), json.dumps(data).encode())
