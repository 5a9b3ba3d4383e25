"""Writing to stderr without ever blocking: the journal's last resort.

The journal fallback (journal.py) writes to stderr when journald's native socket refuses
an entry. Under systemd, stderr is a stream socket to journald, so the fallback is needed
exactly when journald is slow, and a plain write() there blocks the caller: the loop
thread, and with it the watchdog ping. Here every write is non-blocking without touching
the flags of fd 2 that other processes may share:

- a socket (systemd's stream to journald): send() with MSG_DONTWAIT on a dup;
- a pipe, FIFO or terminal: a second open of /proc/self/fd/2, which is a new open file
  description with O_NONBLOCK of its own;
- a regular file: an ordinary write (it does not wait for a reader).

What cannot be written at once is dropped and counted; the next write that gets through
first says how many entries were lost, so a gap in the log is never silent.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from typing import Optional


class NonBlockingWriter:
    """Writes whole text blocks to one fd, never waiting; counts what it had to drop."""

    def __init__(self, fd: int = 2) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._own_fd: Optional[int] = None
        self._ready = False
        self._broken_line = False  # a partial write left a line without its newline
        #: Writes (log entries) dropped because the fd was full, since the last report.
        self.dropped = 0
        #: All entries ever dropped (for tests and status).
        self.dropped_total = 0

    def _setup(self) -> None:
        self._ready = True
        try:
            mode = os.fstat(self._fd).st_mode
        except OSError:
            return
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(self._fd))
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            try:
                self._own_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                self._own_fd = None  # no /proc: write the shared fd, still never waiting below

    def _write_some(self, data: bytes) -> int:
        if self._sock is not None:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        fd = self._own_fd if self._own_fd is not None else self._fd
        return os.write(fd, data)

    def write(self, text: str) -> bool:
        """Write `text` now or drop it; True if it was written whole. Never raises."""
        with self._lock:
            if not self._ready:
                self._setup()
            prefix = ""
            if self._broken_line:
                prefix += "\n"
            if self.dropped:
                prefix += f"<4>kflashd: {self.dropped} log entries dropped: stderr was full\n"
            data = (prefix + text).encode("utf-8", "replace")
            try:
                written = self._write_some(data)
            except (BlockingIOError, InterruptedError):
                written = 0
            except (OSError, ValueError):
                return False  # closed: there is nowhere left to tell
            if written == 0:
                self.dropped += 1
                self.dropped_total += 1
                return False
            self._broken_line = written < len(data) and not data[:written].endswith(b"\n")
            if written < len(prefix.encode()):
                self.dropped += 1  # only part of the notice went out; the entry did not
                self.dropped_total += 1
                return False
            self.dropped = 0
            if written < len(data):
                self.dropped_total += 1
                return False
            return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._own_fd is not None:
                os.close(self._own_fd)
                self._own_fd = None
            self._ready = False
