"""One emulated serial device served from a PTY master fd in its own thread.

Shared by the Katapult bootloader emulator and the Klipper-mode board. The class works on
any PTY master (umockdev's, or a plain ``pty.openpty()`` one in unit tests) and never
closes the fd it was given: umockdev owns its masters and closes them when the testbed
goes away. The only way it gives the fd up is ``hang_up()``, which replaces the master by
/dev/null (``dup2``) so the slave side sees a hangup while the fd number stays valid for
its owner.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import time
from typing import Callable, List, Optional, Tuple

# Reading a PTY master gives EIO (and select() calls it readable) while no process has the
# slave open; retry after this long instead of spinning.
_EIO_RETRY_SECONDS = 0.01


class PtyDevice:
    """Base class: a thread that reads the master, calls ``on_data`` and writes replies.

    Subclasses override ``on_data(data)`` and optionally ``on_tick(now)`` (called at least
    every ``tick_interval`` seconds when that is set). Replies go through ``send()``; an
    optional ``bytes_per_second`` caps the reply rate (the "slow board" fault).
    """

    tick_interval: Optional[float] = None

    def __init__(self, fd: int, name: str = "pty") -> None:
        self.fd = fd
        self.name = name
        self.bytes_per_second: Optional[float] = None
        self.hung_up = False
        self._out = bytearray()
        self._next_send = 0.0
        self._timers: List[Tuple[float, Callable[[], None]]] = []
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = os.pipe()
        for wake_fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(wake_fd, fcntl.F_SETFL, fcntl.fcntl(wake_fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.error: Optional[BaseException] = None

    # -- hooks -------------------------------------------------------------------------
    def on_data(self, data: bytes) -> None:  # pragma: no cover - overridden
        """Bytes the host wrote to the slave side."""

    def on_tick(self, now: float) -> None:
        """Periodic work (e.g. watching the line settings)."""

    # -- API for subclasses ------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue bytes for the host; written from the device thread."""
        self._out += data

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the device thread after ``delay`` seconds."""
        self._timers.append((time.monotonic() + delay, callback))
        self._wake()

    def hang_up(self) -> None:
        """Close the PTY master under its owner's fd number: the host sees a hangup."""
        if self.hung_up:
            return
        null_fd = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null_fd, self.fd)
        finally:
            os.close(null_fd)
        self.hung_up = True
        self._out.clear()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "PtyDevice":
        self._thread = threading.Thread(target=self._run_guarded, name=f"board-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (idempotent); the fd stays open for its owner."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"{self.name}: device thread did not stop within {timeout} s")
        for wake_fd in (self._wake_r, self._wake_w):
            try:
                os.close(wake_fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # pipe full (already awake) or closed (stopping)

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - recorded and reported by the owner
            self.error = exc
            import traceback

            traceback.print_exc()

    def _run(self) -> None:
        eio_until = 0.0
        while not self._stopping:
            now = time.monotonic()
            due = [t for t in self._timers if t[0] <= now]
            if due:
                self._timers = [t for t in self._timers if t[0] > now]
                for _, callback in due:
                    callback()
                continue
            if self.tick_interval is not None:
                self.on_tick(now)
            deadlines = [t[0] for t in self._timers]
            if self.tick_interval is not None:
                deadlines.append(now + self.tick_interval)
            usable = not self.hung_up
            readers = [self._wake_r]
            if usable and now >= eio_until:
                readers.append(self.fd)
            elif usable:
                deadlines.append(eio_until)
            writers = []
            if usable and self._out:
                if now >= self._next_send:
                    writers.append(self.fd)
                else:
                    deadlines.append(self._next_send)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            readable, writable, _ = select.select(readers, writers, [], timeout)
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            if self.hung_up:
                continue
            if self.fd in readable:
                try:
                    data = os.read(self.fd, 4096)
                except BlockingIOError:
                    data = b""
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    eio_until = time.monotonic() + _EIO_RETRY_SECONDS
                    data = b""
                if data:
                    self.on_data(data)
            if self.fd in writable and self._out:
                self._write_some()

    def _write_some(self) -> None:
        chunk_len = len(self._out)
        if self.bytes_per_second:
            # Small chunks at the capped rate: a slow board dribbles its replies.
            chunk_len = min(chunk_len, max(1, int(self.bytes_per_second // 50)))
        try:
            written = os.write(self.fd, bytes(self._out[:chunk_len]))
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            written = len(self._out)  # nobody listening: the bytes are lost, as on a real link
        del self._out[:written]
        if self.bytes_per_second:
            self._next_send = time.monotonic() + written / self.bytes_per_second
