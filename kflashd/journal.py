"""Structured logging to systemd-journald, with a stderr fallback that keeps the levels.

This module owns the daemon's log output. It speaks journald's native protocol (one datagram
of `KEY=value` fields per entry) so that every cycle message carries KFLASHD_JOB,
KFLASHD_BOARD, ... and a fixed MESSAGE_ID, and `journalctl -u kflashd KFLASHD_JOB=<id>`
finds one job's whole story. The catalog that explains each MESSAGE_ID is
`kflashd/catalog/kflashd.catalog`.

When the journal socket is missing or refuses a message, the entry goes to stderr as one
`<N>text` line per line of text (the sd-daemon(3) prefix), which systemd's stdout/stderr
capture turns back into a priority. That write never blocks either (nbstderr.py): what
stderr cannot take at once is dropped and counted, and the next line that gets through
says how many were lost. Nothing is lost silently, and a journal problem never raises into
the daemon.

Thread safety: the event-loop thread and the flash worker both log. A single datagram
socket is shared under a lock, and every send is non-blocking (MSG_DONTWAIT): when
journald's queue is full we wait for room at most `max_wait` (0.25 s) once, then write to
stderr instead, so a stuck journald cannot stall the loop (and with it the watchdog ping).
That transport is kflashd.dgram's DatagramSender, shared with sd_notify (kflashd.notify).

What this module must never do: block the caller on journald for long, raise from a log call, or
send a field name that journald would reject (names are normalised, see `field_name`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import sys
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from kflashd.dgram import DatagramSender
from kflashd.nbstderr import NonBlockingWriter

#: Where journald listens for native-protocol datagrams, unless KFLASHD_JOURNAL_SOCKET says
#: otherwise (tests point it at a namespaced journald).
DEFAULT_SOCKET = "/run/systemd/journal/socket"
SOCKET_ENV = "KFLASHD_JOURNAL_SOCKET"
SYSLOG_IDENTIFIER = "kflashd"

# One MESSAGE_ID per event kind; kflashd.catalog explains each. Never change a value: users
# filter on them (`journalctl MESSAGE_ID=...`) and the catalog is keyed by them.
MSG_JOB_STAGED = "4c1e4a1794ae417098e7505efaca5ab2"
MSG_FLASH_STARTED = "ba0fa4ff40024cf5a2c8115f252a44e8"
MSG_FLASH_SUCCEEDED = "57110a25f0e843feba707007fb1f5e32"
MSG_FLASH_FAILED = "76b6222e729c46c2aeafdf520c12908c"
MSG_KLIPPER_RESTART_FAILED = "198456ada4aa484d80ae1f870353c26d"
MSG_JOB_INTERRUPTED = "bf79cde4788246e09bb4e11c18dd10b3"
MSG_PRINT_GUARD_WAIT = "039cd6753afe4d55afd802246e84886d"
MSG_ROM_BOOTLOADER = "a75417f737b846e6b29acb1e7525504d"

#: Every MESSAGE_ID above, by name (the catalog test checks each has an entry).
MESSAGE_IDS: Dict[str, str] = {
    "MSG_JOB_STAGED": MSG_JOB_STAGED,
    "MSG_FLASH_STARTED": MSG_FLASH_STARTED,
    "MSG_FLASH_SUCCEEDED": MSG_FLASH_SUCCEEDED,
    "MSG_FLASH_FAILED": MSG_FLASH_FAILED,
    "MSG_KLIPPER_RESTART_FAILED": MSG_KLIPPER_RESTART_FAILED,
    "MSG_JOB_INTERRUPTED": MSG_JOB_INTERRUPTED,
    "MSG_PRINT_GUARD_WAIT": MSG_PRINT_GUARD_WAIT,
    "MSG_ROM_BOOTLOADER": MSG_ROM_BOOTLOADER,
}

#: The catalog file shipped as package data (pyproject: kflashd = ["catalog/*.catalog"]).
CATALOG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catalog", "kflashd.catalog")

# syslog priorities (sd-daemon.h / syslog.h)
LOG_EMERG, LOG_ALERT, LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = range(8)

# journald's rules for a field name (journal_field_valid() in systemd): A-Z, 0-9 and '_',
# not starting with a digit or '_' (those are trusted fields journald sets itself), at most
# 64 characters.
_FIELD_NAME_MAX = 64
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")

FieldValue = Union[str, bytes, int, float]


def field_name(name: str) -> Optional[str]:
    """Turn a caller's field name into one journald accepts, or None if nothing is left.

    Why normalise instead of raising: a bad name comes from our own code (`journal_fields`
    in a log call), and a log call must never raise. "kflashd-job" becomes "KFLASHD_JOB";
    leading underscores are dropped (clients may not forge trusted fields); a leading
    digit gets an "F" in front.
    """
    cleaned = _INVALID_FIELD_CHARS.sub("_", name.upper()).lstrip("_")
    if not cleaned:
        return None
    if cleaned[0].isdigit():
        cleaned = "F" + cleaned
    return cleaned[:_FIELD_NAME_MAX]


def _value_bytes(value: FieldValue) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "replace")


def encode_entry(fields: Iterable[Tuple[str, FieldValue]]) -> bytes:
    """Encode (name, value) pairs in journald's native format.

    A value without a newline is `NAME=value\\n`. A value with a newline cannot use that
    form (the newline ends the field), so it is sent as `NAME\\n`, its length as a 64-bit
    little-endian integer, the raw bytes, and `\\n` (systemd's "Native Journal Protocol").
    Names must already be valid (see `field_name`).
    """
    out = bytearray()
    for name, value in fields:
        data = _value_bytes(value)
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def level_to_priority(levelno: int) -> int:
    """Map a `logging` level to a syslog priority (CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7).

    Levels between WARNING and INFO (custom levels >= 25) count as NOTICE.
    """
    if levelno >= logging.CRITICAL:
        return LOG_CRIT
    if levelno >= logging.ERROR:
        return LOG_ERR
    if levelno >= logging.WARNING:
        return LOG_WARNING
    if levelno >= 25:
        return LOG_NOTICE
    if levelno >= logging.INFO:
        return LOG_INFO
    return LOG_DEBUG


class JournalSender:
    """Sends entries to journald's native socket; falls back to stderr.

    `socket_path=None` means: read KFLASHD_JOURNAL_SOCKET (default DEFAULT_SOCKET) at every
    send, so a process that changes its environment (a test) is followed. Safe to share
    between threads.

    Oversized entries: a datagram larger than the socket's send buffer (~208 KiB by default)
    fails with EMSGSIZE. Such an entry is written to a sealed memfd and the descriptor is
    passed to journald with SCM_RIGHTS, which journald accepts for exactly this case, so a
    long traceback or tool output reaches the journal whole. Only if that fails too does it
    go to stderr.
    """

    def __init__(self, socket_path: Optional[str] = None, stream: Any = None, max_wait: float = 0.25) -> None:
        self._socket_path = socket_path
        # None: fd 2, written without blocking (NonBlockingWriter); unless sys.stderr was
        # swapped for another stream (pytest's capsys), which then gets the text.
        self._stream = stream
        self._stderr = NonBlockingWriter(2)
        # The socket, the bounded wait on a full queue, the congested flag and the reconnect
        # live in DatagramSender; the address is looked up at every send (see socket_path).
        self._dgram = DatagramSender(lambda: self.socket_path, max_wait, on_too_big=_send_memfd)
        # Serialises the stderr fallback (and its count) between the loop and the worker.
        self._lock = threading.Lock()
        #: Entries that went to stderr instead of the journal (for tests and STATUS).
        self.fallbacks = 0

    @property
    def max_wait(self) -> float:
        """Longest wait, in seconds, for room in journald's full queue before going to stderr."""
        return self._dgram.max_wait

    @max_wait.setter
    def max_wait(self, seconds: float) -> None:
        self._dgram.max_wait = seconds

    @property
    def socket_path(self) -> str:
        if self._socket_path is not None:
            return self._socket_path
        return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET

    def send(
        self,
        message: str,
        priority: int = LOG_INFO,
        fields: Optional[Mapping[str, Optional[FieldValue]]] = None,
    ) -> bool:
        """Send one entry; return True if journald took it, False if it went to stderr.

        MESSAGE, PRIORITY and SYSLOG_IDENTIFIER=kflashd are always set; `fields` may
        override SYSLOG_IDENTIFIER but not MESSAGE/PRIORITY. None values are left out.
        """
        entry: List[Tuple[str, FieldValue]] = [
            ("MESSAGE", message),
            ("PRIORITY", int(priority)),
        ]
        seen = {"MESSAGE", "PRIORITY"}
        extra: Dict[str, FieldValue] = {"SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER}
        for raw_name, value in (fields or {}).items():
            name = field_name(raw_name)
            if name is None or name in seen or value is None:
                continue
            extra[name] = value
        entry.extend(extra.items())
        payload = encode_entry(entry)
        try:
            self._dgram.send(payload)
            return True
        except OSError:
            self._write_stderr(message, priority)
            return False

    def _write_stderr(self, message: str, priority: int) -> None:
        # Each line gets the prefix: systemd's stream capture assigns a priority per line,
        # so a multi-line message (a traceback) keeps its level on every line.
        prefix = f"<{int(priority)}>"
        lines = message.splitlines() or [""]
        text = "".join(f"{prefix}{line}\n" for line in lines)
        stream = self._stream
        if stream is None and sys.stderr is sys.__stderr__:
            with self._lock:
                self.fallbacks += 1
            self._stderr.write(text)
            return
        stream = stream if stream is not None else sys.stderr
        try:
            with self._lock:
                self.fallbacks += 1
                stream.write(text)
                stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed: there is nowhere left to tell

    @property
    def dropped(self) -> int:
        """Fallback entries dropped because stderr was full (never waited for)."""
        return self._stderr.dropped_total

    def close(self) -> None:
        self._dgram.close()
        self._stderr.close()


def _send_memfd(sock: socket.socket, payload: bytes) -> None:
    """Pass an entry too large for one datagram (EMSGSIZE/ENOBUFS) as a sealed memfd.

    journald only trusts a memfd that is sealed against change (otherwise it would have to
    check where an ordinary file lives), so it is sealed before it is passed on.
    """
    fd = os.memfd_create("kflashd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
        )
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
        sock.sendmsg([], rights, socket.MSG_DONTWAIT)
    finally:
        os.close(fd)


_default_sender = JournalSender()


def send(message: str, priority: int = LOG_INFO, **fields: Optional[FieldValue]) -> bool:
    """Send one journal entry with extra fields, e.g. `send("...", LOG_ERR, KFLASHD_JOB=job.id)`.

    Returns True if journald took it, False if it went to stderr (see JournalSender).
    """
    return _default_sender.send(message, priority, fields)


class JournalHandler(logging.Handler):
    """A `logging` handler that writes each record as one journal entry.

    Extra fields come from `extra={"journal_fields": {"KFLASHD_JOB": ..., "MESSAGE_ID": ...}}`
    on the log call. Every entry also carries CODE_FILE, CODE_LINE, CODE_FUNC (where the
    log call is) and LOGGER (the logger's name). An exception attached to the record is
    formatted into MESSAGE (multi-line, sent in the binary form).
    """

    def __init__(self, sender: Optional[JournalSender] = None, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.sender = sender if sender is not None else _default_sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields: Dict[str, Optional[FieldValue]] = {
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,
                "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
            }
            extra = getattr(record, "journal_fields", None)
            if isinstance(extra, Mapping):
                fields.update(extra)
            self.sender.send(message, level_to_priority(record.levelno), fields)
        except Exception:  # a log call must never take the daemon down
            self.handleError(record)


def setup_logging(level: int = logging.INFO, logger: Optional[logging.Logger] = None) -> JournalHandler:
    """Route `logging` (the root logger unless one is given) to the journal at `level`.

    Idempotent: a second call returns the JournalHandler already installed instead of
    adding another one (which would log everything twice). Other handlers (pytest's) are
    left alone.
    """
    target = logger if logger is not None else logging.getLogger()
    target.setLevel(level)
    for handler in target.handlers:
        if isinstance(handler, JournalHandler):
            return handler
    handler = JournalHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    target.addHandler(handler)
    return handler
