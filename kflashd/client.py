"""kflashctl's side of the control socket: a blocking client, one request and one reply, or
a stream of events (watch). The daemon's side is control.py; the framing is protocol.py.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import socket
import time
from typing import Any, Iterator, Optional

from .errors import AccessDenied, DaemonUnreachable, ProtocolError
from .protocol import Reply, Request, encode


def _socket_group(path: str) -> str:
    """The group owning the control socket: the one the kernel checks at connect()."""
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return "kflash"  # the packaged default


class ControlClient:
    """Blocking client for kflashctl: one request, one reply; or a stream of events."""

    def __init__(self, path: str, timeout: Optional[float] = 30.0, group: Optional[str] = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self._connect(path, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise DaemonUnreachable(
                f"kflashd is not running (no control socket at {path}); start it with: "
                f"sudo systemctl start kflashd"
            ) from None
        except PermissionError:
            self.sock.close()
            group = group or _socket_group(path)
            raise AccessDenied(
                f"permission denied on {path}: add yourself to kflashd's group {group!r} "
                f"(sudo usermod -aG {group} $USER) and log in again, or use sudo"
            ) from None
        except OSError as e:
            self.sock.close()
            raise DaemonUnreachable(f"cannot reach kflashd at {path}: {e.strerror}") from None
        self._buffer = bytearray()

    def _connect(self, path: str, timeout: Optional[float]) -> None:
        """connect(), waiting while the daemon's listen backlog is full.

        With a timeout the socket is non-blocking inside, and a full AF_UNIX backlog then
        fails at once with EAGAIN instead of waiting (as a blocking connect would): that
        is a busy daemon, not an unreachable one.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    self.sock.close()
                    raise DaemonUnreachable(f"kflashd at {path} is too busy to accept a connection") from None
                time.sleep(0.005)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, request: Request) -> None:
        try:
            self.sock.sendall(encode(request))
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                # The daemon may have refused us and closed: its reply explains why.
                return
            raise DaemonUnreachable(f"lost the connection to kflashd: {e.strerror}") from None

    def receive(self) -> Reply:
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                try:
                    message = json.loads(line)
                except ValueError:
                    raise ProtocolError("kflashd sent a reply that is not JSON") from None
                if isinstance(message, dict) and message.get("code") == "forbidden":
                    raise AccessDenied(message.get("error", "refused"))
                return message
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise DaemonUnreachable("kflashd did not answer in time") from None
            except OSError as e:
                raise DaemonUnreachable(f"lost the connection to kflashd: {e.strerror}") from None
            if not data:
                raise DaemonUnreachable("kflashd closed the connection")
            self._buffer += data

    def request(self, request: Request) -> Reply:
        self.send(request)
        return self.receive()

    def events(self) -> Iterator[Reply]:
        while True:
            yield self.receive()
