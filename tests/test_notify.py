"""kflashd.notify against a real bound NOTIFY_SOCKET (tests.support.notify_listener)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from kflashd.notify import NOTIFY_VARIABLES, Notifier, child_environment
from tests.support.notify_listener import NotifyListener, notify_socket  # noqa: F401 (fixture)


def test_every_message_kind_arrives(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("Flashing octopus via katapult: 42%")
    assert notifier.watchdog()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.ready("reloaded")
    assert notifier.stopping()
    notify_socket.wait_for("STOPPING=1")
    messages = notify_socket.messages
    assert messages[:3] == ["READY=1", "STATUS=Flashing octopus via katapult: 42%", "WATCHDOG=1"]
    reload_lines = messages[3].split("\n")
    assert reload_lines[0] == "RELOADING=1"
    assert reload_lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(reload_lines[1].split("=", 1)[1]) <= after
    assert messages[4:] == ["READY=1\nSTATUS=reloaded", "STOPPING=1"]
    assert {pid for pid, _ in notify_socket.records} == {os.getpid()}
    assert notifier.sent == 6 and notifier.dropped == 0


def test_status_is_one_line(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})
    notifier.status("flash failed:\nChecksum mismatch")
    assert notify_socket.wait_for("STATUS=") == "STATUS=flash failed: Checksum mismatch"


def test_abstract_socket_address():
    with NotifyListener(abstract=True) as listener:
        assert listener.address.startswith("@")
        notifier = Notifier({"NOTIFY_SOCKET": listener.address})
        assert notifier.ready()
        assert listener.wait_for("READY=1") == "READY=1"


def test_without_notify_socket_everything_is_a_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval() is None
    assert notifier.sent == 0 and notifier.dropped == 0


def test_unsupported_address_is_a_no_op():
    notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_receiver_gone_does_not_raise(tmp_path):
    path = str(tmp_path / "gone.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready()
    receiver.close()
    assert notifier.status("nobody listens") is False
    os.unlink(path)
    assert notifier.stopping() is False
    assert notifier.dropped == 2


def test_receiver_rebound_is_followed(tmp_path):
    address = str(tmp_path / "n.sock")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(address)
    first.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready()
    assert first.recv(100) == b"READY=1"
    first.close()
    os.unlink(address)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(address)
    second.settimeout(5)
    try:
        assert notifier.status("again")
        assert second.recv(100) == b"STATUS=again"
    finally:
        second.close()
    assert notifier.dropped == 0


def test_full_queue_drops_instead_of_blocking(tmp_path):
    # A receiver that never reads: the queue (about 10 datagrams) fills up. The daemon's
    # loop must go on: messages are dropped and counted, and only the first drop waits.
    path = str(tmp_path / "stuck.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(path)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": path}, max_wait=0.2)
        started = time.monotonic()
        results = [notifier.status(f"{i}%") for i in range(200)]
        elapsed = time.monotonic() - started
        assert elapsed < 1.5
        assert notifier.dropped == results.count(False) > 0
        assert notifier.sent == results.count(True) > 0
        # what was sent is really in the queue, in order
        stuck.setblocking(False)
        received = []
        while True:
            try:
                received.append(stuck.recv(100).decode())
            except BlockingIOError:
                break
        assert received == [f"STATUS={i}%" for i in range(notifier.sent)]
        # once the receiver reads again, sending works again
        assert notifier.status("recovered")
        assert stuck.recv(100) == b"STATUS=recovered"
    finally:
        stuck.close()


def test_listener_keeps_up_with_bursts_from_threads(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})

    def burst(tag):
        for i in range(150):
            notifier.status(f"{tag} {i}")

    threads = [threading.Thread(target=burst, args=(t,)) for t in ("loop", "worker")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert notifier.sent + notifier.dropped == 300
    notify_socket.wait_for(lambda m: len(notify_socket.messages) >= notifier.sent, timeout=10)
    statuses = notify_socket.statuses()
    assert len(statuses) == notifier.sent
    # per thread, order is kept
    for tag in ("loop", "worker"):
        numbers = [int(s.split()[1]) for s in statuses if s.startswith(tag)]
        assert numbers == sorted(numbers)
    # a reader thread and a short wait are enough for nothing to be lost
    assert notifier.dropped == 0


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    notifier = Notifier({"NOTIFY_SOCKET": "/run/nothing-here", **env})
    assert notifier.watchdog_interval() == expected


def test_watchdog_without_notify_socket_is_off():
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval() is None


def test_unset_environment_protects_children(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    for name in NOTIFY_VARIABLES:
        assert name not in os.environ
    assert notifier.watchdog_interval() == 2.0
    assert notifier.ready()
    notify_socket.wait_for("READY=1")
    # a child started afterwards cannot reach the socket in our name
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if 'NOTIFY' in k or 'WATCHDOG' in k))"],
        capture_output=True, text=True, timeout=30,
    )
    assert child.stdout.strip() == "[]"


def test_keep_environment_when_asked(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/x")
    Notifier(unset_environment=False)
    assert os.environ["NOTIFY_SOCKET"] == "/run/x"


def test_child_environment():
    base = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2"}
    env = child_environment(base, LANG="C")
    assert env == {"PATH": "/usr/bin", "LANG": "C"}
    assert base["NOTIFY_SOCKET"] == "/run/n"  # the original is left alone


def test_child_environment_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/n")
    monkeypatch.setenv("KFLASHD_TEST_MARK", "1")
    env = child_environment()
    assert "NOTIFY_SOCKET" not in env and env["KFLASHD_TEST_MARK"] == "1"


def test_listener_wait_for_reports_what_arrived(notify_socket):
    Notifier({"NOTIFY_SOCKET": notify_socket.address}).status("hello")
    notify_socket.wait_for("STATUS=hello")
    with pytest.raises(AssertionError, match="STATUS=hello"):
        notify_socket.wait_for("READY=1", timeout=0.2)
