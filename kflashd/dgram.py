"""A non-blocking sender of Unix datagrams to a receiver that must never stall the daemon.

This module owns the one transport that the journal (kflashd.journal, journald's native
socket) and sd_notify (kflashd.notify, NOTIFY_SOCKET) have in common: an AF_UNIX SOCK_DGRAM
socket, connected lazily, shared by the event-loop thread and the flash worker under a lock.

Why each piece is there:
- Connected, so that poll(POLLOUT) can wait for room in the receiver's queue (an unconnected
  datagram socket is always "writable").
- Every send is MSG_DONTWAIT. When the queue is full (EAGAIN: the kernel keeps only ~10
  datagrams unless systemd's sysctl raised net.unix.max_dgram_qlen) we wait for room for at
  most `max_wait`, then fail. After one such failure the sender is "congested" and does not
  wait again until a send succeeds, so a receiver that has stopped reading costs the caller
  `max_wait` once, not on every message, and the watchdog ping keeps its rhythm.
- A receiver that was re-created (journald restarted, systemd re-executed, a test rebinding
  the path) leaves our socket connected to a dead peer: ECONNREFUSED, ENOTCONN, or ENOENT
  when the path is gone. We reconnect once and send again.

What it must never do: block longer than `max_wait` per send, retry more than once, or
decide what a failure means to the caller: `send` raises OSError and the caller chooses
(the journal writes to stderr, the notifier drops and counts).
"""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from typing import Callable, Optional, Union

#: The peer is gone or was re-created: connect again (once) and resend.
RECONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT})
#: The receiver's queue is full: wait for room (bounded), then fail.
QUEUE_FULL_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})
#: The datagram is larger than the socket can take in one piece: handed to `on_too_big`.
TOO_BIG_ERRNOS = frozenset({errno.EMSGSIZE, errno.ENOBUFS})

#: A socket address (a path, or "\\0name" for the abstract namespace), or a function that
#: returns one at every send.
Address = Union[str, Callable[[], str]]

#: Called under the sender's lock with the connected socket and the payload when a send
#: fails with EMSGSIZE/ENOBUFS; it must deliver the payload another way or raise OSError.
TooBigHook = Callable[[socket.socket, bytes], None]


class DatagramSender:
    """One lazily connected, non-blocking datagram socket to `address`; safe to share between threads.

    `address` may be a function: it is then called at every send, and when its answer changes
    the old socket is closed and the new address connected (the journal follows
    KFLASHD_JOURNAL_SOCKET this way). `on_too_big` lets a caller deliver an oversized payload
    differently (the journal passes a sealed memfd); without it EMSGSIZE/ENOBUFS raise.
    """

    def __init__(self, address: Address, max_wait: float, on_too_big: Optional[TooBigHook] = None) -> None:
        self._address = address
        self.max_wait = max_wait
        self._on_too_big = on_too_big
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._sock_address: Optional[str] = None
        self._congested = False

    @property
    def address(self) -> str:
        """The address the next send goes to."""
        return self._address() if callable(self._address) else self._address

    @property
    def congested(self) -> bool:
        """True after a send gave up on a full queue, until a send succeeds again."""
        return self._congested

    def send(self, payload: bytes) -> None:
        """Send `payload` as one datagram; raise OSError if it could not be delivered.

        Waits for room at most `max_wait` (not at all while congested); reconnects once if
        the receiver was re-created.
        """
        with self._lock:
            address = self.address
            try:
                self._send_once_locked(self._connect_locked(address), payload)
            except OSError as e:
                if e.errno not in RECONNECT_ERRNOS:
                    raise
                self._drop_socket_locked()
                self._send_once_locked(self._connect_locked(address), payload)

    def close(self) -> None:
        """Close the socket; a later send connects again."""
        with self._lock:
            self._drop_socket_locked()

    def _connect_locked(self, address: str) -> socket.socket:
        if self._sock is not None and self._sock_address != address:
            self._drop_socket_locked()
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self._sock, self._sock_address = sock, address
        return self._sock

    def _drop_socket_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._sock_address = None, None

    def _send_once_locked(self, sock: socket.socket, payload: bytes) -> None:
        deadline = time.monotonic() + (0.0 if self._congested else self.max_wait)
        while True:
            try:
                sock.send(payload, socket.MSG_DONTWAIT)
                self._congested = False
                return
            except OSError as e:
                if e.errno in TOO_BIG_ERRNOS and self._on_too_big is not None:
                    self._on_too_big(sock, payload)
                    return
                if e.errno not in QUEUE_FULL_ERRNOS:
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._congested = True
                    raise
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLOUT)
                poller.poll(max(1, int(remaining * 1000)))
