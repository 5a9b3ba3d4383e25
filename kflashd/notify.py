"""sd_notify for kflashd: READY/STATUS/WATCHDOG/RELOADING/STOPPING to systemd, never blocking.

This module owns the daemon's side of NOTIFY_SOCKET: it is kflashd's one notify path. It is
a small sender of its own, not the `sdnotify` package (which is not a dependency; why, in
docs/design.md, "Shape of the code"): sdnotify's notifier sends with a blocking socket, so a
manager (or a test) that does not drain its queue, which the kernel keeps only ~10 datagrams
deep unless systemd's sysctl raised it, would stall the event loop and with it the watchdog
ping; it also hides every error and encodes text as Latin-1. Here every send is
non-blocking; when the queue is full we wait for room for at most `max_wait` (50 ms) once,
then drop the message and count it (`dropped`). After one such drop we stop waiting until a
send succeeds again, so a receiver that has stopped reading costs the daemon 50 ms once, not
on every STATUS line.

Without NOTIFY_SOCKET every call is a no-op (the daemon run by hand, or by a non-notify unit).

By default the Notifier removes NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from
os.environ when it is created (as sd_notify's `unset_environment` does), so that no child
(flashtool.py, make, systemctl, sudo) can inherit them and talk to systemd in the daemon's
name. `child_environment()` builds such an environment explicitly.

The transport (non-blocking send, bounded wait, congested flag, reconnect once) is
kflashd.dgram's DatagramSender, shared with the journal.

Thread safety: one socket under a lock; the loop thread and the flash worker may both call.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Dict, Mapping, MutableMapping, Optional

from kflashd.dgram import DatagramSender

#: Variables that belong to this process's relationship with the service manager.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_environment(base: Optional[Mapping[str, str]] = None, **overrides: str) -> Dict[str, str]:
    """A copy of `base` (default os.environ) without NOTIFY_SOCKET/WATCHDOG_*, plus `overrides`.

    Why: a child that inherits NOTIFY_SOCKET could send READY=1 or STOPPING=1 for the
    daemon (systemd accepts it with NotifyAccess=all), and one that inherits WATCHDOG_USEC
    might start pinging for it.
    """
    env = dict(os.environ if base is None else base)
    for name in NOTIFY_VARIABLES:
        env.pop(name, None)
    env.update(overrides)
    return env


def _socket_address(value: str) -> Optional[str]:
    """NOTIFY_SOCKET's value as a socket address: a path, or '@name' for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (systemd 253+ for VMs): not for a daemon like this one


class Notifier:
    """Sends sd_notify messages for this process; every method is safe to call without systemd.

    `environ` is read once at creation (default os.environ). With `unset_environment` (the
    default) and `environ` left at os.environ, the notify variables are then removed from
    os.environ (see the module docstring).
    """

    def __init__(
        self,
        environ: Optional[MutableMapping[str, str]] = None,
        unset_environment: bool = True,
        max_wait: float = 0.05,
    ) -> None:
        source = os.environ if environ is None else environ
        self.socket_value = source.get("NOTIFY_SOCKET") or None
        self.address = _socket_address(self.socket_value) if self.socket_value else None
        self._watchdog_usec = source.get("WATCHDOG_USEC")
        self._watchdog_pid = source.get("WATCHDOG_PID")
        if unset_environment and environ is None:
            for name in NOTIFY_VARIABLES:
                os.environ.pop(name, None)
        # The socket, the bounded wait and the reconnect live in DatagramSender; this lock
        # keeps `sent`/`dropped` in step with the sends.
        self._lock = threading.Lock()
        self._max_wait = max_wait
        self._sender = DatagramSender(self.address, max_wait) if self.address is not None else None
        #: Messages the receiver took, and messages dropped (full queue, receiver gone).
        self.sent = 0
        self.dropped = 0

    @property
    def max_wait(self) -> float:
        """Longest wait, in seconds, for room in a full queue before a message is dropped."""
        return self._max_wait

    @max_wait.setter
    def max_wait(self, seconds: float) -> None:
        self._max_wait = seconds
        if self._sender is not None:
            self._sender.max_wait = seconds

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self.address is not None

    # ------------------------------------------------------------------ messages -----

    def ready(self, status: Optional[str] = None) -> bool:
        """READY=1: start-up (or a reload) is complete; optionally with a STATUS line."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """STATUS=<text>: one line for `systemctl status` (newlines become spaces)."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the loop is alive."""
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (required by Type=notify-reload, harmless before)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun (Klipper is being restarted, then we exit)."""
        return self.notify("STOPPING=1")

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, or None when not asked.

        WATCHDOG_PID, when set, names the process the watchdog is meant for; if that is not
        us (a variable leaked from a parent), we must not ping.
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    # ------------------------------------------------------------------ transport ----

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; True if the receiver took it.

        Never raises and never blocks longer than max_wait (see the module docstring).
        """
        if self._sender is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                self._sender.send(payload)
            except OSError:
                self.dropped += 1
                return False
            self.sent += 1
            return True

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(str(text).splitlines())
