"""The daemon's event loop: file descriptors, timers, signals, and wake-ups from other threads.

Modelled on Klipper's reactor: one thread owns the loop, callbacks are registered on fds and
timers, a timer callback returns its next wake time (or NEVER), and other threads hand work
to the loop with `call_soon_threadsafe()` through a self-pipe. Signals arrive through
`signal.set_wakeup_fd`, so a SIGTERM during a long flash is seen within one loop turn and the
watchdog keeps being fed: nothing in the loop thread may block.

The loop never sleeps on a schedule of its own: with no timer armed it waits on its fds
only, so an idle daemon without a watchdog has no periodic wake-ups.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import signal
import time
from typing import Any, Callable, Deque, Dict, List, Optional

_log = logging.getLogger("kflashd.reactor")

NEVER = float("inf")


class Timer:
    """A registered timer; `waketime` is on the `time.monotonic()` clock."""

    __slots__ = ("callback", "waketime")

    def __init__(self, callback: Callable[[float], float], waketime: float) -> None:
        self.callback = callback
        self.waketime = waketime


class Reactor:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: List[Timer] = []
        self._calls: Deque[Callable[[], None]] = collections.deque()
        self._running = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._sig_r: Optional[int] = None
        self._sig_w: Optional[int] = None
        self._signal_handlers: Dict[int, Callable[[int], None]] = {}

    # -- time and timers ---------------------------------------------------------------

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    def register_timer(self, callback: Callable[[float], float], waketime: float = NEVER) -> Timer:
        timer = Timer(callback, waketime)
        self._timers.append(timer)
        return timer

    def update_timer(self, timer: Timer, waketime: float) -> None:
        timer.waketime = waketime

    # -- file descriptors --------------------------------------------------------------

    def register_fd(self, fd: int, callback: Callable[[], None], write: bool = False) -> None:
        events = selectors.EVENT_WRITE if write else selectors.EVENT_READ
        self._selector.register(fd, events, callback)

    def modify_fd(self, fd: int, callback: Callable[[], None], read: bool, write: bool) -> None:
        """Watch `fd` for the given events; neither means: not at all for now (a level-
        triggered fd whose data we do not want yet would otherwise wake the loop forever)."""
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        if not events:
            self.unregister_fd(fd)
            return
        try:
            self._selector.modify(fd, events, callback)
        except KeyError:
            self._selector.register(fd, events, callback)

    def unregister_fd(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    # -- other threads -----------------------------------------------------------------

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback` in the loop thread at its next turn (safe from any thread)."""
        self._calls.append(callback)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already due to wake

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- signals -----------------------------------------------------------------------

    def register_signal(self, signum: int, callback: Callable[[int], None]) -> None:
        """Deliver `signum` to `callback` in the loop thread (main thread only)."""
        if self._sig_r is None:
            self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
            self._selector.register(self._sig_r, selectors.EVENT_READ, self._read_signals)
        self._signal_handlers[signum] = callback
        # A Python-level handler is needed so the default action (terminate) does not run;
        # the real work happens when the wake-up byte is read in the loop.
        signal.signal(signum, lambda _signum, _frame: None)

    def deliver_signal(self, signum: int) -> None:
        """Run `signum`'s registered handler now (loop thread): a signal latched before the
        loop existed (signals.EarlySignals) is handled like one that comes now."""
        handler = self._signal_handlers.get(signum)
        if handler is not None:
            handler(signum)

    def _read_signals(self) -> None:
        assert self._sig_r is not None
        try:
            data = os.read(self._sig_r, 256)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self._running = True
        while self._running:
            self._run_calls()
            now = self.monotonic()
            next_wake = NEVER
            for timer in list(self._timers):
                if timer.waketime <= now:
                    timer.waketime = self._guarded(timer.callback, now, on_error=NEVER)
                    now = self.monotonic()
                next_wake = min(next_wake, timer.waketime)
            if not self._running:
                break
            if self._calls:
                continue
            timeout = None if next_wake == NEVER else max(0.0, next_wake - self.monotonic())
            try:
                events = self._selector.select(timeout)
            except OSError as e:  # pragma: no cover - select() only fails on EINTR (retried)
                if e.errno != errno.EINTR:
                    raise
                continue
            for key, _ in events:
                self._guarded(key.data)

    def _run_calls(self) -> None:
        while self._calls:
            self._guarded(self._calls.popleft())

    @staticmethod
    def _guarded(callback: Callable[..., Any], *args: Any, on_error: Any = None) -> Any:
        """Run one callback; a bug in one handler is logged, it does not end the daemon."""
        try:
            return callback(*args)
        except Exception:
            _log.exception("unhandled error in the event loop (kflashd keeps running)")
            return on_error

    def stop(self) -> None:
        """End `run()` after the current turn; safe from any thread."""
        self._running = False
        self.call_soon_threadsafe(lambda: None)

    def close(self) -> None:
        if self._sig_r is not None:
            signal.set_wakeup_fd(-1)
            for fd in (self._sig_r, self._sig_w):
                os.close(fd)  # type: ignore[arg-type]
            self._sig_r = self._sig_w = None
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
