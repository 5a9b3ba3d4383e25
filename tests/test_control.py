"""The control socket on its own: a real ControlServer in a Reactor thread, real sockets.

No daemon here: the handler is a small test double, so every test is about what the socket
layer promises whatever the daemon does with a request: framing, bounded buffers, error
replies that never stop the loop, and who may connect (file mode, group, SO_PEERCRED). The
peer tests run a real client process as `nobody`, so the kernel and SO_PEERCRED decide, not
a mock.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import queue
import secrets
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from tests.support import public
from tests.support.wait import wait_until

from kflashd.control import (
    MAX_CONNECTIONS,
    ControlClient,
    ControlServer,
    PeerCredentials,
    peer_allowed,
)
from kflashd import control
from kflashd.errors import AccessDenied, DaemonUnreachable, ProtocolError
from kflashd.reactor import Reactor

NOBODY = pwd.getpwnam("nobody")
ROOT_GROUP = grp.getgrgid(os.getgid()).gr_name


class Server:
    """A ControlServer served by a Reactor in a thread, with a scriptable handler."""

    def __init__(self, directory: str, group: str = ROOT_GROUP, max_request: int = 4096) -> None:
        self.reactor = Reactor()
        self.path = os.path.join(directory, "control.sock")
        self.requests: List[Dict[str, Any]] = []
        self.logs: List[str] = []
        self.pending: List[Any] = []  # connections whose "later" request awaits its reply
        self.loop_error: Optional[BaseException] = None
        self.server = ControlServer(self.reactor, self.path, group, max_request, self.handle, self.logs.append)
        self.server.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.reactor.run()
        except BaseException as e:  # the test fails on it: the loop must never die
            self.loop_error = e

    def handle(self, conn, request: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        self.requests.append(request)
        cmd = request["cmd"]
        if cmd == "echo":
            return {"ok": True, "echo": request}
        if cmd == "protocol":
            raise ProtocolError("that is not how it works")
        if cmd == "bug":
            raise RuntimeError("a bug in a handler")
        if cmd == "big":
            return {"ok": True, "data": "x" * int(request.get("n", 65536))}
        if cmd == "queue" and request.get("later"):  # answered by the test, like an image
            self.pending.append(conn)
            return control.PENDING
        if cmd == "watch":
            conn.watching = "job1"
            conn.send({"ok": True, "watching": "job1"})
            return None
        return {"ok": False, "code": "bad_request", "error": f"unknown command {cmd!r}"}

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the loop thread (which owns the server) and return its result."""
        result: "queue.Queue[Any]" = queue.Queue()
        self.reactor.call_soon_threadsafe(lambda: result.put(fn()))
        try:
            return result.get(timeout=5)
        except queue.Empty:
            raise AssertionError(f"the loop thread does not answer (died with {self.loop_error!r})") from None

    def connection_count(self) -> int:
        return self.call(lambda: len(self.server.connections))

    def watchers(self) -> int:
        return self.call(lambda: len(self.server.watchers("job1")))

    def close(self) -> None:
        if self.thread.is_alive():
            self.call(self.server.stop)
            self.reactor.stop()
            self.thread.join(5)
        self.reactor.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A directory anyone may enter (pytest's tmp_path is root-only): the peer tests need it."""
    directory = tempfile.mkdtemp(prefix="kflashd-ctl-")
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_server(sockdir: str) -> Iterator[Callable[..., Server]]:
    servers: List[Server] = []

    def factory(**options: Any) -> Server:
        server = Server(sockdir, **options)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()
    for server in servers:
        assert server.loop_error is None, f"the server loop died: {server.loop_error!r}"


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


def connect(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(server.path)
    return sock


class Reader:
    """Line reader over a raw socket; EOF and a reset both end the stream."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def line(self) -> Optional[Dict[str, Any]]:
        """The next reply, or None at EOF (a partial last line fails the test)."""
        while b"\n" not in self.buffer:
            if not self._fill():
                assert not self.buffer, f"connection closed mid-reply: {bytes(self.buffer[:200])!r}"
                return None
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        reply = json.loads(line)
        assert isinstance(reply, dict), reply
        return reply

    def lines(self, count: int) -> List[Dict[str, Any]]:
        replies = []
        for _ in range(count):
            reply = self.line()
            assert reply is not None, f"EOF after {len(replies)} of {count} replies: {replies}"
            replies.append(reply)
        return replies

    def until_eof(self) -> List[Dict[str, Any]]:
        replies = []
        while True:
            reply = self.line()
            if reply is None:
                return replies
            replies.append(reply)


def request(server: Server, message: Any) -> Dict[str, Any]:
    with connect(server) as sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        return Reader(sock).lines(1)[0]


def still_serving(server: Server) -> None:
    assert request(server, {"cmd": "echo", "n": 1}) == {"ok": True, "echo": {"cmd": "echo", "n": 1}}


# ---------------------------------------------------------------- framing ------------


def test_one_request_per_line_replies_in_order(server):
    with connect(server) as sock:
        sock.sendall(b'{"cmd":"echo","i":1}\n{"cmd":"echo","i":2}\n{"cmd":"echo","i":3}\n')
        replies = Reader(sock).lines(3)
    assert [r["echo"]["i"] for r in replies] == [1, 2, 3]


def test_request_split_across_writes_is_answered_once_complete(server):
    line = b'{"cmd":"echo","text":"split \\u00e9 \\ud83d\\ude00"}\n'
    with connect(server) as sock:
        for i in range(len(line) - 1):
            sock.sendall(line[i:i + 1])
        # Everything but the newline: the loop has read it all (call() runs after the
        # pending reads in its turn order is not guaranteed, so poll the buffer) yet
        # dispatched nothing.
        wait_until(lambda: server.call(lambda: sum(len(c.inbuf) for c in server.server.connections.values()))
                   == len(line) - 1, what="the partial line to be buffered")
        assert server.call(lambda: list(server.requests)) == []
        sock.sendall(b"\n")
        reply = Reader(sock).lines(1)[0]
    assert reply["echo"]["text"] == "split \u00e9 \U0001F600"


@pytest.mark.parametrize(
    "line, error",
    [
        (b"not json", "not valid JSON"),
        (b"{\"cmd\": \"echo\"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[" * 100000, "not valid JSON"),  # deeper than the decoder's recursion limit
        (b"{\"cmd\":" + b"[" * 100000 + b"]" * 100000 + b"}", "not valid JSON"),
        (b"[1, 2]", "JSON object with a \"cmd\""),
        (b"\"cmd\"", "JSON object with a \"cmd\""),
        (b"null", "JSON object with a \"cmd\""),
        (b"{}", "JSON object with a \"cmd\""),
        (b"{\"cmd\": 7}", "JSON object with a \"cmd\""),
        (b"{\"cmd\": null}", "JSON object with a \"cmd\""),
        (b"{\"cmd\": [\"echo\"]}", "JSON object with a \"cmd\""),
    ],
)
def test_malformed_request_gets_an_error_and_the_connection_goes_on(make_server, line, error):
    server = make_server(max_request=1 << 20)
    with connect(server) as sock:
        sock.sendall(line + b"\n" + b'{"cmd":"echo","after":true}\n')
        first, second = Reader(sock).lines(2)
    assert first["ok"] is False and first["code"] == "bad_request" and error in first["error"], first
    assert second == {"ok": True, "echo": {"cmd": "echo", "after": True}}
    assert [r["cmd"] for r in server.requests] == ["echo"]


def test_handler_errors_become_replies_and_the_loop_survives(server):
    with connect(server) as sock:
        sock.sendall(b'{"cmd":"protocol"}\n{"cmd":"bug"}\n{"cmd":"echo"}\n')
        protocol, bug, echo = Reader(sock).lines(3)
    assert protocol == {"ok": False, "code": "bad_request", "error": "that is not how it works"}
    assert bug["ok"] is False and bug["code"] == "internal", bug
    assert echo["ok"] is True
    assert any("a bug in a handler" in entry and "Traceback" in entry for entry in server.logs), server.logs


# ---------------------------------------------------------------- sizes --------------


def test_oversized_line_without_newline_is_refused_and_closed(server):
    with connect(server) as sock:
        sock.sendall(b"x" * 5000)  # max_request is 4096; no newline ever comes
        replies = Reader(sock).until_eof()
    assert replies == [{"ok": False, "code": "too_large", "error": "request too large"}]
    still_serving(server)
    assert wait_until(lambda: server.connection_count() == 0, what="the connection to be closed")


def test_endless_line_is_cut_off_while_the_client_still_sends(server):
    sock = connect(server)
    errors: List[BaseException] = []

    def flood() -> None:
        try:
            chunk = b"y" * 65536
            for _ in range(64):  # 4 MiB, far past max_request
                sock.sendall(chunk)
        except OSError as e:
            errors.append(e)  # the server hung up on us: expected

    sender = threading.Thread(target=flood)
    sender.start()
    try:
        replies = Reader(sock).until_eof()
    finally:
        sender.join(10)
        sock.close()
    assert replies == [{"ok": False, "code": "too_large", "error": "request too large"}]
    assert errors, "the server kept reading an endless line"
    still_serving(server)


def test_oversized_line_with_newline_is_refused(server):
    with connect(server) as sock:
        sock.sendall(json.dumps({"cmd": "echo", "pad": "p" * 5000}).encode() + b"\n")
        replies = Reader(sock).until_eof()
    assert replies == [{"ok": False, "code": "too_large", "error": "request too large"}]
    assert server.requests == []
    still_serving(server)


def test_only_queue_requests_may_be_large(make_server):
    server = make_server(max_request=1 << 20)
    pad = "p" * (100 * 1024)  # over the 64 KiB of an ordinary request, under max_request
    queue_reply = request(server, {"cmd": "queue", "pad": pad})
    assert queue_reply["ok"] is False and "unknown command 'queue'" in queue_reply["error"]  # reached the handler
    with connect(server) as sock:
        sock.sendall(json.dumps({"cmd": "echo", "pad": pad}).encode() + b"\n")
        assert Reader(sock).until_eof() == [{"ok": False, "code": "too_large", "error": "request too large"}]
    assert [r["cmd"] for r in server.requests] == ["queue"]


def test_client_that_never_reads_is_dropped(server):
    sock = connect(server)
    try:
        # 128 replies of 64 KiB: far more than the socket buffers plus the 4 MiB output cap.
        sock.sendall(b'{"cmd":"big","n":65536}\n' * 128)
        wait_until(lambda: server.connection_count() == 0, 10, "the non-reading client to be dropped")
        still_serving(server)
    finally:
        sock.close()
    assert len(server.requests) < 128 + 1  # it stopped dispatching once the client was dropped


# ---------------------------------------------------------------- half-closed --------


def test_half_closed_client_still_gets_its_replies(server):
    with connect(server) as sock:
        sock.sendall(b'{"cmd":"echo","i":1}\n{"cmd":"echo","i":2}\n')
        sock.shutdown(socket.SHUT_WR)
        replies = Reader(sock).until_eof()
    assert [r["echo"]["i"] for r in replies] == [1, 2]
    wait_until(lambda: server.connection_count() == 0, what="the half-closed connection to be closed")


def test_half_closed_big_reply_is_flushed_completely(server):
    with connect(server) as sock:
        sock.sendall(b'{"cmd":"big","n":1000000}\n')
        sock.shutdown(socket.SHUT_WR)
        replies = Reader(sock).until_eof()
    assert len(replies) == 1 and len(replies[0]["data"]) == 1000000


def test_half_closed_mid_line_or_empty_closes_quietly(server):
    for data in (b'{"cmd":"echo"', b""):
        with connect(server) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert Reader(sock).until_eof() == []
    wait_until(lambda: server.connection_count() == 0, what="the connections to be closed")
    assert server.requests == []
    still_serving(server)


def test_half_closed_watcher_is_forgotten(server):
    with connect(server) as sock:
        sock.sendall(b'{"cmd":"watch"}\n')
        reader = Reader(sock)
        assert reader.lines(1) == [{"ok": True, "watching": "job1"}]
        assert server.watchers() == 1
        sock.shutdown(socket.SHUT_WR)
        assert reader.until_eof() == []
    wait_until(lambda: server.watchers() == 0 and server.connection_count() == 0, what="the watcher to go")


# ---------------------------------------------------------------- many clients -------


def test_connections_past_the_limit_are_told_busy_and_the_rest_are_served(server):
    extra = 12
    socks = []
    try:
        for i in range(MAX_CONNECTIONS + extra):
            socks.append(connect(server))
            if i < MAX_CONNECTIONS:
                # Accepted in order: wait until the server holds this one before the next.
                wait_until(lambda n=i + 1: server.connection_count() >= n, what=f"connection {i + 1}")
        busy = []
        for sock in socks[MAX_CONNECTIONS:]:
            replies = Reader(sock).until_eof()
            assert replies == [{"ok": False, "code": "busy", "error": "too many kflashctl connections; try again"}]
            busy.append(sock)
        assert len(busy) == extra
        for i, sock in enumerate(socks[:MAX_CONNECTIONS]):
            sock.sendall(json.dumps({"cmd": "echo", "i": i}).encode() + b"\n")
        for i, sock in enumerate(socks[:MAX_CONNECTIONS]):
            assert Reader(sock).lines(1) == [{"ok": True, "echo": {"cmd": "echo", "i": i}}]
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: server.connection_count() == 0, what="all connections to be closed")
    still_serving(server)


def test_many_concurrent_clients_each_get_their_own_replies(server):
    threads, per_thread, per_batch = 100, 40, 10
    failures: List[str] = []
    busy = [0]

    def client(t: int) -> None:
        try:
            done = 0
            while done < per_thread:
                batch = [{"cmd": "echo", "t": t, "i": done + k} for k in range(per_batch)]
                # kflashctl's client: a full listen backlog makes it wait, not fail.
                with ControlClient(server.path, timeout=30) as client:
                    for message in batch:
                        client.send(message)  # a busy refusal mid-batch is in the reply
                    first = client.receive()
                    if first.get("code") == "busy":
                        busy[0] += 1
                        time.sleep(0.005)  # back off like a person retrying; not a wait for a condition
                        continue
                    replies = [first] + [client.receive() for _ in range(per_batch - 1)]
                assert [r["echo"] for r in replies] == batch, (t, replies)
                done += per_batch
        except BaseException as e:  # reported below with the thread number
            failures.append(f"client {t}: {e!r}")

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not failures, failures[:5]
    assert len(server.requests) == threads * per_thread
    still_serving(server)


# ---------------------------------------------------------------- who may connect ----


def test_socket_is_0660_and_owned_by_the_group(make_server, temp_group):
    server = make_server(group=temp_group)
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam(temp_group).gr_gid
    server.call(server.server.stop)
    assert not os.path.exists(server.path)


def test_missing_group_is_reported_and_the_socket_stays_0660(make_server):
    server = make_server(group="kflash-no-such-group")
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660
    assert any("group 'kflash-no-such-group' does not exist" in entry and "groupadd" in entry
               for entry in server.logs), server.logs
    still_serving(server)  # root may still use it


CLIENT = """
import json, sys
from kflashd.control import ControlClient
from kflashd.errors import AccessDenied
try:
    with ControlClient(sys.argv[1], timeout=10) as client:
        print(json.dumps({"reply": client.request({"cmd": "echo", "who": "child"})}))
except AccessDenied as e:
    print(json.dumps({"denied": str(e)}))
"""


def as_nobody(server: Server, group: str = "nogroup", extra_groups: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run a ControlClient in a child process as nobody, with exactly the groups given."""
    result = subprocess.run(
        [public.python(), "-c", CLIENT, server.path],
        user="nobody", group=group, extra_groups=extra_groups or [],
        capture_output=True, text=True, timeout=30, cwd=str(public.root()),
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_kernel_refuses_a_user_outside_the_group(make_server, temp_group):
    server = make_server(group=temp_group)
    outcome = as_nobody(server)
    assert "denied" in outcome, outcome
    assert f"permission denied on {server.path}" in outcome["denied"]
    assert f"usermod -aG {temp_group} " in outcome["denied"]
    assert server.requests == []


def test_peer_credentials_refuse_a_user_outside_the_group_on_a_0666_socket(make_server, temp_group):
    server = make_server(group=temp_group)
    os.chmod(server.path, 0o666)  # a misconfigured mode: SO_PEERCRED still decides
    outcome = as_nobody(server)
    assert "denied" in outcome, outcome
    assert outcome["denied"].startswith("user nobody may not use kflashd")
    assert f"add it to group '{temp_group}' (sudo usermod -aG {temp_group} nobody)" in outcome["denied"]
    assert server.requests == []  # the request was never dispatched
    wait_until(lambda: server.connection_count() == 0, what="the refused connection to be closed")
    still_serving(server)


def test_group_member_is_allowed(make_server, temp_group):
    subprocess.run(["gpasswd", "-a", "nobody", temp_group], check=True, capture_output=True, timeout=30)
    server = make_server(group=temp_group)
    # As after a login: the group is among the process's supplementary groups.
    outcome = as_nobody(server, extra_groups=[temp_group])
    assert outcome == {"reply": {"ok": True, "echo": {"cmd": "echo", "who": "child"}}}
    # Listed in /etc/group is what SO_PEERCRED checks, also on a 0666 socket.
    os.chmod(server.path, 0o666)
    assert as_nobody(server)["reply"]["ok"] is True


def test_primary_group_is_allowed(make_server, temp_group):
    server = make_server(group=temp_group)
    outcome = as_nobody(server, group=temp_group)
    assert outcome == {"reply": {"ok": True, "echo": {"cmd": "echo", "who": "child"}}}


def test_peer_allowed_rules(temp_group):
    gid = grp.getgrnam(temp_group).gr_gid
    nogroup = NOBODY.pw_gid
    unknown_uid = 4242424
    assert peer_allowed(PeerCredentials(1, 0, 0), temp_group)  # root
    assert peer_allowed(PeerCredentials(1, 0, 0), "kflash-no-such-group")
    assert peer_allowed(PeerCredentials(1, os.geteuid(), nogroup), temp_group)  # the daemon's own user
    assert not peer_allowed(PeerCredentials(1, NOBODY.pw_uid, nogroup), temp_group)
    assert not peer_allowed(PeerCredentials(1, NOBODY.pw_uid, nogroup), "kflash-no-such-group")
    assert peer_allowed(PeerCredentials(1, NOBODY.pw_uid, gid), temp_group)  # effective gid
    assert peer_allowed(PeerCredentials(1, unknown_uid, gid), temp_group)
    assert not peer_allowed(PeerCredentials(1, unknown_uid, nogroup), temp_group)
    subprocess.run(["gpasswd", "-a", "nobody", temp_group], check=True, capture_output=True, timeout=30)
    assert peer_allowed(PeerCredentials(1, NOBODY.pw_uid, nogroup), temp_group)  # listed member


def test_peer_credentials_of_a_real_connection(server):
    with connect(server) as sock:
        peer = PeerCredentials.of(sock)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.user_name() == pwd.getpwuid(os.geteuid()).pw_name
    assert PeerCredentials(1, 4242424, 0).user_name() == "uid 4242424"


# ---------------------------------------------------------------- the client ---------


def test_client_round_trip_and_forbidden_reply(server, sockdir):
    with ControlClient(server.path, timeout=5) as client:
        assert client.request({"cmd": "echo", "x": [1, "é"]}) == {"ok": True, "echo": {"cmd": "echo", "x": [1, "é"]}}


def test_client_errors_say_what_happened(sockdir):
    missing = os.path.join(sockdir, "missing.sock")
    with pytest.raises(DaemonUnreachable, match="kflashd is not running .*systemctl start kflashd"):
        ControlClient(missing)

    stale = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # a socket file nobody listens on, as after a daemon crash
    with pytest.raises(DaemonUnreachable, match="not running"):
        ControlClient(stale)


class RawServer:
    """A listener that answers each connection with canned bytes (or nothing)."""

    def __init__(self, directory: str, answer: Optional[bytes]) -> None:
        self.path = os.path.join(directory, f"raw-{secrets.token_hex(3)}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.answer = answer
        self.held: List[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.recv(65536)
        if self.answer is None:
            self.held.append(conn)  # never answers
            return
        conn.sendall(self.answer)
        conn.close()

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize(
    "answer, error, match",
    [
        (b"this is not json\n", ProtocolError, "not JSON"),
        (b"", DaemonUnreachable, "closed the connection"),
        (b'{"ok": fa', DaemonUnreachable, "closed the connection"),
        (b'{"ok":false,"code":"forbidden","error":"user x may not use kflashd"}\n', AccessDenied,
         "user x may not use kflashd"),
        (None, DaemonUnreachable, "did not answer in time"),
    ],
)
def test_client_on_a_bad_server(sockdir, answer, error, match):
    raw = RawServer(sockdir, answer)
    try:
        with ControlClient(raw.path, timeout=0.5) as client:
            with pytest.raises(error, match=match):
                client.request({"cmd": "status"})
    finally:
        raw.close()


def test_idle_connections_are_closed_active_and_watching_ones_kept(make_server, monkeypatch):
    """Idle clients cannot hold every slot; a client that talks or watches a job stays."""
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.4)
    server = make_server()
    idle, talker, watcher = connect(server), connect(server), connect(server)
    watcher.sendall(b'{"cmd":"watch"}\n')
    assert json.loads(watcher.makefile().readline())["watching"] == "job1"
    talker_file = talker.makefile()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # the talker keeps talking past the timeout
        talker.sendall(b'{"cmd":"echo"}\n')
        assert json.loads(talker_file.readline())["ok"] is True
        time.sleep(0.1)
    idle.settimeout(5)
    assert idle.recv(1) == b""  # closed by the daemon
    assert wait_until(lambda: server.connection_count() == 2, what="only the idle one closed")
    assert server.watchers() == 1
    talker.close()
    # With only a watcher left, nothing is swept and the timer is not left spinning.
    assert wait_until(lambda: server.connection_count() == 1, what="the talker's close seen")
    wait_until(lambda: server.call(lambda: server.server._sweep_timer.waketime) == control.NEVER,
               what="the sweep timer to disarm")


# ---------------------------------------------------------------- memory bound -------


def fill(sock: socket.socket, data: bytes, timeout: float = 0.3) -> int:
    """Send as much of `data` as the peer takes: stop when the socket stays full for
    `timeout` (the peer does not read it). Returns the bytes sent."""
    sock.setblocking(False)
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            if not select.select([], [sock], [], timeout)[1]:
                break
    sock.setblocking(True)
    return sent


def buffered(server: Server) -> int:
    return server.call(lambda: sum(len(c.inbuf) + len(c.outbuf) for c in server.server.connections.values()))


def test_one_large_request_at_a_time_bounds_memory(make_server):
    """60 clients each start a 4 MiB request: only one is read beyond 64 KiB; when its
    (late) reply is out, the next one gets the slot and is served in turn."""
    max_request = 4 << 20
    server = make_server(max_request=max_request)
    line = json.dumps({"cmd": "queue", "later": True, "pad": "p" * (max_request - 100)}).encode() + b"\n"
    socks = [connect(server) for _ in range(60)]
    try:
        sent = [fill(sock, line[:-1], timeout=5 if i == 0 else 0.05) for i, sock in enumerate(socks)]
        assert sent[0] == len(line) - 1  # the first one got the slot and was read whole
        held = buffered(server)
        # One large request, and at most 64 KiB (+1 byte) for each of the others.
        assert held <= max_request + 59 * (control._SMALL_REQUEST + 1), held
        # The first completes its request; the slot stays with it until its reply.
        socks[0].sendall(b"\n")
        wait_until(lambda: server.call(lambda: len(server.pending)) == 1, what="the first request")
        assert buffered(server) <= 60 * (control._SMALL_REQUEST + 1)
        for i in (1, 2):  # hand the slot on, twice: each waiter is served in turn
            conn = server.pending.pop(0)
            server.call(lambda c=conn: c.reply({"ok": True, "n": i}))
            assert Reader(socks[i - 1]).lines(1) == [{"ok": True, "n": i}]
            assert fill(socks[i], line[sent[i]:], timeout=5) == len(line) - sent[i]
            wait_until(lambda: server.call(lambda: len(server.pending)) == 1, what=f"request {i + 1}")
        still_serving(server)
        conn = server.pending.pop(0)
        server.call(lambda: conn.reply({"ok": True, "n": 3}))
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: server.connection_count() == 0, what="all connections to be closed")
    assert server.call(lambda: server.server.large_owner) is None
    still_serving(server)


def test_large_slot_waiter_and_slow_holder_are_told_why(make_server, monkeypatch):
    monkeypatch.setattr(control, "LARGE_WAIT", 0.5)
    monkeypatch.setattr(control, "LARGE_SEND", 1.0)
    server = make_server(max_request=1 << 20)
    partial = b'{"cmd":"queue","later":true,"pad":"' + b"p" * (200 * 1024)
    holder, waiter = connect(server), connect(server)
    try:
        fill(holder, partial, timeout=5)
        wait_until(lambda: server.call(lambda: server.server.large_owner is not None), what="the slot taken")
        fill(waiter, partial, timeout=0.05)
        assert Reader(waiter).until_eof() == [
            {"ok": False, "code": "busy", "error": "kflashd is receiving another image; try again"}]
        assert Reader(holder).until_eof() == [
            {"ok": False, "code": "too_slow", "error": "the request did not arrive within 1 s"}]
    finally:
        holder.close()
        waiter.close()
    assert server.call(lambda: server.server.large_owner) is None
    assert request(server, {"cmd": "echo", "pad": "x"}) == {"ok": True, "echo": {"cmd": "echo", "pad": "x"}}
