"""An sd_notify receiver for tests: a bound NOTIFY_SOCKET that a thread drains continuously.

Why a thread: the kernel keeps only ~10 datagrams in a Unix datagram socket's queue on this
machine (net.unix.max_dgram_qlen), and kflashd drops notifications rather than block on a
full queue. A test that read only when it got round to it would lose STATUS lines; the
reader here empties the queue as fast as they come.

`notify_socket` (pytest fixture) yields a `NotifyListener`: give `.environ()` (or `.address`
as NOTIFY_SOCKET) to the process under test, then `.wait_for("READY=1")`,
`.wait_for(lambda m: "Flashing" in m)`, `.messages`, `.statuses()`. Each message records the
sender's pid too (`.records`), from SCM_CREDENTIALS like systemd itself uses.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple, Union

import pytest

Matcher = Union[str, Callable[[str], bool]]

_UCRED = struct.Struct("iII")  # pid, uid, gid


def _matches(matcher: Matcher, message: str) -> bool:
    """A string matches a message that has a line starting with it ("READY=1", "STATUS=Flashing")."""
    if callable(matcher):
        return bool(matcher(message))
    return any(line.startswith(matcher) for line in message.split("\n"))


class NotifyListener:
    """A SOCK_DGRAM socket bound at a short temporary path (or an abstract name), drained by a thread."""

    def __init__(self, abstract: bool = False) -> None:
        self._dir: Optional[str] = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"kflashd-test-notify-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            #: What to put in NOTIFY_SOCKET.
            self.address = "@" + name
        else:
            # Not pytest's tmp_path: Unix socket paths are limited to 107 bytes.
            self._dir = tempfile.mkdtemp(prefix="kfn")
            self.address = os.path.join(self._dir, "notify.sock")
            self.sock.bind(self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.records: List[Tuple[Optional[int], str]] = []
        self._cond = threading.Condition()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._drain, name="notify-listener", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        cmsg_size = socket.CMSG_SPACE(_UCRED.size)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            while True:  # empty the queue before polling again
                try:
                    data, ancdata, _flags, _addr = self.sock.recvmsg(65536, cmsg_size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    return
                pid = None
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                        pid = _UCRED.unpack(payload[: _UCRED.size])[0]
                with self._cond:
                    self.records.append((pid, data.decode("utf-8", "replace")))
                    self._cond.notify_all()

    # ------------------------------------------------------------------ reading -------

    @property
    def messages(self) -> List[str]:
        """Every datagram so far, in order of arrival (a snapshot)."""
        with self._cond:
            return [text for _pid, text in self.records]

    def statuses(self) -> List[str]:
        """The STATUS= values so far."""
        return [
            line[len("STATUS="):]
            for message in self.messages
            for line in message.split("\n")
            if line.startswith("STATUS=")
        ]

    def count(self, matcher: Matcher) -> int:
        return sum(1 for message in self.messages if _matches(matcher, message))

    def wait_for(self, matcher: Matcher, timeout: float = 10.0, after: int = 0) -> str:
        """Wait for a message (index >= `after`) that matches; return it.

        `matcher` is a line prefix ("READY=1", "STATUS=Flashing") or a predicate on the whole
        datagram. Raises AssertionError listing what did arrive when the deadline passes.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            index = after
            while True:
                while index < len(self.records):
                    text = self.records[index][1]
                    index += 1
                    if _matches(matcher, text):
                        return text
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [text for _pid, text in self.records]
                    raise AssertionError(f"no notify message matching {matcher!r} within {timeout} s; got {seen!r}")
                self._cond.wait(remaining)

    def index_of(self, matcher: Matcher, timeout: float = 10.0, after: int = 0) -> int:
        """Like wait_for, but the index of the message (to wait for what comes after it)."""
        self.wait_for(matcher, timeout, after)
        with self._cond:
            for i in range(after, len(self.records)):
                if _matches(matcher, self.records[i][1]):
                    return i
        raise AssertionError("unreachable")

    def environ(self) -> dict:
        return {"NOTIFY_SOCKET": self.address}

    # ------------------------------------------------------------------ lifecycle -----

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "NotifyListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifyListener]:
    """A NOTIFY_SOCKET listener at a temporary path, drained by a reader thread."""
    with NotifyListener() as listener:
        yield listener
