"""The control socket: line-delimited JSON between kflashctl and the daemon.

Server side runs in the daemon's loop thread and never blocks: sockets are non-blocking,
each connection has bounded in/out buffers, and a request that is malformed, oversized or
from a user who may not queue gets an error reply and the connection is closed; the daemon
itself never stops because of what a client sent.

Memory is bounded in total, not just per connection: every request but `queue` fits in
_SMALL_REQUEST, and only one connection at a time may hold a request larger than that (the
"large slot", up to `max_request`). The others stop being read while they wait for the
slot: their bytes stay in the kernel's socket buffer, and a client that waits longer than
LARGE_WAIT is told the daemon is busy. The slot is held from the request's first large
byte until its reply (the checks of the image run in a worker, see staging.py), and a
holder that takes longer than LARGE_SEND to send its request is cut off. Figures:
docs/reliability.md, "Memory". Authorisation is by peer credentials
(SO_PEERCRED), checked once at accept: root, the daemon's own user, or a member of the
configured group.

The protocol: each request is one JSON object on one line with a "cmd" key; each reply is
one JSON object on one line with "ok" (true/false) and, on error, "error" (a sentence for
the user) and "code" (machine-readable). A "watch" request keeps the connection open and
streams one event object per line until the job ends.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import struct
import traceback
from typing import Any, Callable, Dict, List, Optional

from .client import ControlClient  # noqa: F401 (kflashctl's side, imported from here by many)
from .errors import ProtocolError
from .protocol import Reply, Request, encode, error_reply  # noqa: F401 (re-exported)
from .reactor import NEVER, Reactor

MAX_CONNECTIONS = 64
MAX_OUTPUT_BUFFER = 1024 * 1024  # a client that does not read its replies is dropped
# A connection that sends nothing for this long (and watches no job) is closed, so idle
# clients cannot hold every slot. The sweep timer runs only while connections exist: an
# idle daemon keeps no periodic wake-up.
IDLE_TIMEOUT = 60.0
_SMALL_REQUEST = 64 * 1024  # every request but "queue" fits in this
#: Seconds the large-slot holder has to send its whole request line (8 MiB over a local
#: socket takes well under one) ...
LARGE_SEND = 15.0
#: ... and seconds a connection may wait for the slot before it is told to try again:
#: less than kflashctl's 30 s timeout, so the client reads the reason instead of timing out.
LARGE_WAIT = 20.0
_RECV_CHUNK = 256 * 1024

#: A handler's return value meaning "the reply comes later, through Connection.reply()";
#: the connection's further requests wait until then.
PENDING: Dict[str, Any] = {"pending": True}

class PeerCredentials:
    __slots__ = ("pid", "uid", "gid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid, self.uid, self.gid = pid, uid, gid

    @classmethod
    def of(cls, sock: socket.socket) -> "PeerCredentials":
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return cls(*struct.unpack("3i", data))

    def user_name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


def peer_allowed(peer: PeerCredentials, group: str) -> bool:
    """Root, the daemon's own user, or a member of `group` (primary or supplementary)."""
    if peer.uid in (0, os.geteuid()):
        return True
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    if peer.gid == entry.gr_gid:
        return True
    try:
        user = pwd.getpwuid(peer.uid)
    except KeyError:
        return False
    return user.pw_gid == entry.gr_gid or user.pw_name in entry.gr_mem


class Connection:
    """One client connection: buffers, peer credentials, and whether it streams events."""

    def __init__(self, server: "ControlServer", sock: socket.socket, peer: PeerCredentials) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False  # close once outbuf is flushed
        self.closed = False
        self.watching: Optional[str] = None  # job id whose events this connection streams
        self.last_active = server.reactor.monotonic()
        self.pending = False  # a request of this connection is being worked on elsewhere
        self.waiting_since: Optional[float] = None  # waits for the large slot since then

    def send(self, message: Dict[str, Any]) -> None:
        if self.closed:
            return
        self.outbuf += encode(message)
        if len(self.outbuf) > MAX_OUTPUT_BUFFER:
            self.server.close(self)
            return
        self.server.want_write(self)

    def finish(self) -> None:
        """Close after what is queued for the client has been sent."""
        self.closing = True
        self.server.want_write(self)

    def reply(self, message: Reply) -> None:
        """The late reply to the request the handler answered with PENDING (loop thread)."""
        self.pending = False
        self.send(message)
        self.server.request_done(self)


class ControlServer:
    """Accepts connections on the control socket and dispatches requests to `handler`.

    `handler(conn, request)` returns a reply dict, or None when it keeps the connection open
    (watch). `max_request` bounds one request line (the image travels base64-encoded).
    """

    def __init__(
        self,
        reactor: Reactor,
        path: str,
        group: str,
        max_request: int,
        handler: Callable[[Connection, Request], Optional[Reply]],
        log: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.group = group
        self.max_request = max_request
        self.handler = handler
        self.log = log
        self.connections: Dict[int, Connection] = {}
        self.sock: Optional[socket.socket] = None
        self._sweep_timer = reactor.register_timer(self._sweep_idle)
        self.large_owner: Optional[Connection] = None  # may hold a request > _SMALL_REQUEST
        self._large_since = 0.0
        self._large_waiting: List[Connection] = []
        self._large_timer = reactor.register_timer(self._check_large)

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o117)  # the socket is born 0660: no window with wider access
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            gid = None
            self.log(
                f"group {self.group!r} does not exist: only root and this daemon's user may use "
                f"kflashctl (create it with: groupadd --system {self.group})"
            )
        if gid is not None:
            try:
                os.chown(self.path, -1, gid)
            except PermissionError:
                self.log(f"cannot give the control socket to group {self.group!r}: not permitted")
        os.chmod(self.path, 0o660)
        sock.listen(MAX_CONNECTIONS)  # a burst of kflashctl calls waits in the backlog, not in errors
        sock.setblocking(False)
        self.sock = sock
        self.reactor.register_fd(sock.fileno(), self._accept)

    def stop(self) -> None:
        for conn in list(self.connections.values()):
            # What is queued (a watcher's "end" event above all) goes out if the socket
            # takes it now: best effort, never blocking the daemon's exit.
            if conn.outbuf and not conn.closed:
                try:
                    conn.sock.send(conn.outbuf, socket.MSG_DONTWAIT)
                except OSError:
                    pass
            self.close(conn)
        if self.sock is not None:
            self.reactor.unregister_fd(self.sock.fileno())
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def reconfigure(self, group: str, max_request: int) -> None:
        self.max_request = max_request
        if group != self.group:
            self.group = group
            try:
                os.chown(self.path, -1, grp.getgrnam(group).gr_gid)
            except (KeyError, PermissionError) as e:
                self.log(f"cannot give the control socket to group {group!r}: {e}")

    def watchers(self, job_id: str) -> List[Connection]:
        return [c for c in self.connections.values() if c.watching == job_id and not c.closed]

    # -- socket events -----------------------------------------------------------------

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: log and keep serving the clients we have.
                self.log(f"control socket accept failed: {e.strerror}")
                return
            client.setblocking(False)
            peer = PeerCredentials.of(client)
            conn = Connection(self, client, peer)
            self.connections[client.fileno()] = conn
            self.reactor.register_fd(client.fileno(), lambda c=conn: self._on_event(c))
            if self._sweep_timer.waketime == NEVER:
                self.reactor.update_timer(self._sweep_timer, conn.last_active + IDLE_TIMEOUT)
            if len(self.connections) > MAX_CONNECTIONS:
                conn.send(error_reply("busy", "too many kflashctl connections; try again"))
                conn.finish()
            elif not peer_allowed(peer, self.group):
                conn.send(
                    error_reply(
                        "forbidden",
                        f"user {peer.user_name()} may not use kflashd: add it to group "
                        f"{self.group!r} (sudo usermod -aG {self.group} {peer.user_name()}) "
                        f"and log in again, or use sudo",
                    )
                )
                conn.finish()

    def want_write(self, conn: Connection) -> None:
        self._interest(conn)

    def _interest(self, conn: Connection) -> None:
        """Poll for what the connection needs now: write while output waits (or to close),
        read unless closing, answered later (PENDING) or waiting for the large slot."""
        if conn.closed:
            return
        read = not conn.closing and not conn.pending and conn.waiting_since is None
        self.reactor.modify_fd(conn.sock.fileno(), lambda c=conn: self._on_event(c),
                               read=read, write=bool(conn.outbuf) or conn.closing)

    def _on_event(self, conn: Connection) -> None:
        if conn.closed:
            return
        if conn.outbuf:
            self._flush(conn)
            if conn.closed:
                return
        if conn.closing:
            if not conn.outbuf:
                self.close(conn)
            return
        self._read(conn)

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            if conn.closing:
                self.close(conn)
            else:
                self._interest(conn)

    def _sweep_idle(self, now: float) -> float:
        for conn in list(self.connections.values()):
            if self._idle(conn) and now - conn.last_active >= IDLE_TIMEOUT:
                self.close(conn)
        idle_candidates = [c.last_active for c in self.connections.values() if self._idle(c)]
        return min(idle_candidates) + IDLE_TIMEOUT if idle_candidates else NEVER

    @staticmethod
    def _idle(conn: Connection) -> bool:
        """Whether silence is the client's fault (not: watching, answered later, waiting)."""
        return conn.watching is None and not conn.pending and conn.waiting_since is None

    def _read(self, conn: Connection) -> None:
        if conn.pending or conn.waiting_since is not None:
            return
        limit = self.max_request if conn is self.large_owner else _SMALL_REQUEST
        try:
            # Never more than the line may still grow: inbuf stays within its bound.
            data = conn.sock.recv(max(1, min(_RECV_CHUNK, limit + 1 - len(conn.inbuf))))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        conn.last_active = self.reactor.monotonic()
        if not data:
            # Half-closed by the client: answer what is complete, then close.
            if conn.watching is None or conn.inbuf:
                conn.finish() if conn.outbuf else self.close(conn)
            else:
                self.close(conn)
            return
        conn.inbuf += data
        self._process(conn)

    def _process(self, conn: Connection) -> None:
        """Dispatch the complete lines in `conn.inbuf`, one at a time (a PENDING reply
        holds the rest back); take or wait for the large slot when a line outgrows
        _SMALL_REQUEST."""
        while not conn.closing and not conn.closed and not conn.pending:
            newline = conn.inbuf.find(b"\n")
            if newline < 0:
                if len(conn.inbuf) > self.max_request:
                    conn.inbuf.clear()
                    conn.send(error_reply("too_large", "request too large"))
                    conn.finish()
                elif len(conn.inbuf) > _SMALL_REQUEST and conn is not self.large_owner:
                    self._want_large(conn)
                return
            line = bytes(conn.inbuf[:newline])
            del conn.inbuf[: newline + 1]
            if len(line) > self.max_request:
                conn.send(error_reply("too_large", "request too large"))
                conn.finish()
                return
            self._dispatch(conn, line)
            if not conn.pending and conn is self.large_owner:
                self._release_large()

    # -- the large slot ----------------------------------------------------------------

    def _want_large(self, conn: Connection) -> None:
        if self.large_owner is None:
            self._take_large(conn)
            return
        # Wait: stop reading it (its bytes stay in the kernel) until the slot is free.
        conn.waiting_since = self.reactor.monotonic()
        self._large_waiting.append(conn)
        self._interest(conn)
        self._arm_large_timer()

    def _take_large(self, conn: Connection) -> None:
        self.large_owner = conn
        self._large_since = self.reactor.monotonic()
        conn.waiting_since = None
        self._arm_large_timer()

    def _release_large(self) -> None:
        self.large_owner = None
        while self._large_waiting:
            conn = self._large_waiting.pop(0)
            if conn.closed:
                continue
            self._take_large(conn)
            self._interest(conn)
            conn.last_active = self.reactor.monotonic()
            self._process(conn)
            if self.large_owner is not None:
                return
        self._arm_large_timer()

    def _arm_large_timer(self) -> None:
        deadlines = [c.waiting_since + LARGE_WAIT for c in self._large_waiting if c.waiting_since is not None]
        if self.large_owner is not None and not self.large_owner.pending:
            deadlines.append(self._large_since + LARGE_SEND)
        self.reactor.update_timer(self._large_timer, min(deadlines) if deadlines else NEVER)

    def _check_large(self, now: float) -> float:
        owner = self.large_owner
        if owner is not None and not owner.pending and now - self._large_since >= LARGE_SEND:
            owner.inbuf.clear()
            owner.send(error_reply("too_slow", f"the request did not arrive within {LARGE_SEND:g} s"))
            owner.finish()
            self._release_large()
        for conn in list(self._large_waiting):
            if conn.waiting_since is not None and now - conn.waiting_since >= LARGE_WAIT:
                self._large_waiting.remove(conn)
                conn.waiting_since = None
                conn.inbuf.clear()
                conn.send(error_reply("busy", "kflashd is receiving another image; try again"))
                conn.finish()
        self._arm_large_timer()
        return self._large_timer.waketime

    def request_done(self, conn: Connection) -> None:
        """A PENDING request was answered: free the slot, go on with the client's lines."""
        if conn is self.large_owner:
            self._release_large()
        if not conn.closed:
            self._interest(conn)
            self._process(conn)

    def _dispatch(self, conn: Connection, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: "[[[[..." nested deeper than the decoder's recursion limit; it
            # is not a ValueError and would otherwise end the loop, and with it the daemon.
            conn.send(error_reply("bad_request", "request is not valid JSON"))
            return
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            conn.send(error_reply("bad_request", "request must be a JSON object with a \"cmd\""))
            return
        if request["cmd"] != "queue" and len(line) > _SMALL_REQUEST:
            conn.send(error_reply("too_large", "request too large"))
            conn.finish()
            return
        try:
            reply = self.handler(conn, request)
            if reply is PENDING:
                conn.pending = True
                self._interest(conn)
                self._arm_large_timer()  # the holder no longer races LARGE_SEND
                return
        except ProtocolError as e:
            reply = error_reply("bad_request", str(e))
        except Exception:
            # A bug in a handler must cost one request, not the daemon: an exception that
            # left the loop would stop it between "Klipper stopped" and "Klipper started".
            self.log(f"internal error in the {request['cmd'][:40]!r} request:\n{traceback.format_exc()}")
            reply = error_reply("internal", "kflashd failed on this request (a bug: see journalctl -u kflashd)")
        if reply is not None:
            conn.send(reply)

    def close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        fd = conn.sock.fileno()
        self.reactor.unregister_fd(fd)
        self.connections.pop(fd, None)
        conn.sock.close()
        conn.inbuf = bytearray()
        if conn in self._large_waiting:
            self._large_waiting.remove(conn)
        if conn is self.large_owner and not conn.pending:
            # A pending request keeps the slot until its work is done (its reply is dropped):
            # the image is still in memory until then.
            self._release_large()
