"""kflashd.dgram.DatagramSender against real Unix datagram receivers (bound sockets, no mocks)."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from typing import Iterator, List

import pytest

from kflashd.dgram import DatagramSender


def receiver(address: str) -> socket.socket:
    """A datagram socket bound at `address` that never reads unless the test does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(address)
    sock.settimeout(5)
    return sock


class Receivers:
    """Binds receivers in a short temporary directory and closes them all at teardown."""

    def __init__(self) -> None:
        # Not pytest's tmp_path: a Unix socket path is limited to 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="kfd")
        self.bound: List[socket.socket] = []

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def bind(self, name_or_address: str) -> socket.socket:
        """A receiver at `name` in the directory, or at an abstract address ("\\0...")."""
        address = name_or_address if name_or_address.startswith("\0") else self.path(name_or_address)
        sock = receiver(address)
        self.bound.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.bound:
            sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    made = Receivers()
    try:
        yield made
    finally:
        made.close()


def drain(sock: socket.socket) -> List[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            try:
                out.append(sock.recv(65536))
            except BlockingIOError:
                return out
    finally:
        sock.settimeout(5)


def fill_queue(sender: DatagramSender) -> int:
    """Send until the receiver's queue is full; return how many datagrams it took.

    The send that finds the queue full is the one that waits and fails; it is left to the
    caller so that it can be timed.
    """
    for count in range(100_000):
        saved = sender.max_wait
        sender.max_wait = 0.0  # no wait while filling: the timed send comes after
        try:
            sender.send(b"fill %d" % count)
        except BlockingIOError:
            return count
        finally:
            sender.max_wait = saved
    raise AssertionError("the receiver's queue never filled")


def full_and_not_congested(sender: DatagramSender, rx: socket.socket) -> int:
    """Fill the queue, then make room once and take it, so the next send meets a full queue
    without the congested flag (fill_queue's own last send set it). Returns fill_queue's count."""
    queued = fill_queue(sender)
    assert sender.congested
    rx.recv(100)
    sender.send(b"room")
    assert not sender.congested
    return queued


def test_sends_and_reuses_one_connection(receivers):
    rx = receivers.bind("r.sock")
    sender = DatagramSender(rx.getsockname(), max_wait=0.1)
    sender.send(b"one")
    first = sender._sock
    sender.send(b"two")
    assert sender._sock is first
    assert [rx.recv(100), rx.recv(100)] == [b"one", b"two"]
    assert not sender.congested


def test_full_queue_waits_once_then_fails_fast_until_it_recovers(receivers):
    # A bound receiver that does not read: the first send that finds the queue full waits
    # max_wait for room and fails; while congested, sends fail at once; once the receiver
    # reads, sends work again and the next full queue is waited for again.
    rx = receivers.bind("stuck.sock")
    max_wait = 0.3
    sender = DatagramSender(rx.getsockname(), max_wait=max_wait)
    queued = full_and_not_congested(sender, rx)
    assert queued > 0

    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        sender.send(b"waits")
    waited = time.monotonic() - started
    assert failure.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    assert max_wait * 0.9 <= waited < max_wait + 1.0
    assert sender.congested

    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(BlockingIOError):
            sender.send(b"no wait")
    assert time.monotonic() - started < max_wait / 2

    # What was queued is exactly what was sent, in order; nothing of the failures.
    assert drain(rx) == [b"fill %d" % i for i in range(1, queued)] + [b"room"]

    sender.send(b"recovered")
    assert not sender.congested
    assert rx.recv(100) == b"recovered"

    # Recovered means a full queue is waited for again (the flag was cleared).
    full_and_not_congested(sender, rx)
    started = time.monotonic()
    with pytest.raises(BlockingIOError):
        sender.send(b"waits again")
    assert time.monotonic() - started >= max_wait * 0.9


def test_wait_for_room_ends_when_the_receiver_reads(receivers):
    rx = receivers.bind("slow.sock")
    sender = DatagramSender(rx.getsockname(), max_wait=10.0)
    full_and_not_congested(sender, rx)
    outcome: List[object] = []

    def send_blocked() -> None:
        started = time.monotonic()
        try:
            sender.send(b"after room")
            outcome.append(time.monotonic() - started)
        except OSError as e:
            outcome.append(e)

    worker = threading.Thread(target=send_blocked)
    worker.start()
    rx.recv(100)  # make room: the waiting send must go through well before max_wait
    worker.join(timeout=15)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], float), outcome
    assert outcome[0] < 5.0
    assert drain(rx)[-1] == b"after room"


def test_reconnects_once_after_the_receiver_is_recreated(receivers):
    first = receivers.bind("r.sock")
    address = first.getsockname()
    sender = DatagramSender(address, max_wait=0.1)
    sender.send(b"to first")
    assert first.recv(100) == b"to first"
    old = sender._sock
    first.close()
    os.unlink(address)
    second = receivers.bind("r.sock")
    sender.send(b"to second")
    assert second.recv(100) == b"to second"
    assert sender._sock is not old


def test_receiver_gone_raises_after_one_reconnect(receivers):
    rx = receivers.bind("gone.sock")
    address = rx.getsockname()
    sender = DatagramSender(address, max_wait=0.1)
    sender.send(b"hello")
    rx.close()
    # The socket file stays behind: ECONNREFUSED on the old socket and on the reconnect.
    with pytest.raises(ConnectionRefusedError):
        sender.send(b"nobody")
    os.unlink(address)
    with pytest.raises(FileNotFoundError):
        sender.send(b"no path")
    # A receiver at the path again: the next send goes through.
    again = receivers.bind("gone.sock")
    sender.send(b"back")
    assert again.recv(100) == b"back"


def test_abstract_address_and_its_recreation(receivers):
    address = "\0kflashd-test-dgram-" + secrets.token_hex(6)
    first = receivers.bind(address)
    sender = DatagramSender(address, max_wait=0.1)
    sender.send(b"abstract")
    assert first.recv(100) == b"abstract"
    first.close()
    second = receivers.bind(address)
    sender.send(b"abstract again")
    assert second.recv(100) == b"abstract again"


def test_callable_address_is_followed(receivers):
    rx_a, rx_b = receivers.bind("a.sock"), receivers.bind("b.sock")
    target = [rx_a.getsockname()]
    sender = DatagramSender(lambda: target[0], max_wait=0.1)
    sender.send(b"to a")
    target[0] = rx_b.getsockname()
    assert sender.address == rx_b.getsockname()
    sender.send(b"to b")
    assert rx_a.recv(100) == b"to a"
    assert rx_b.recv(100) == b"to b"
    assert drain(rx_a) == []


def test_oversized_payload_goes_to_the_hook(receivers):
    rx = receivers.bind("big.sock")
    big = b"x" * (4 * 1024 * 1024)  # above any default SO_SNDBUF: EMSGSIZE
    with pytest.raises(OSError) as failure:
        DatagramSender(rx.getsockname(), max_wait=0.1).send(big)
    assert failure.value.errno in (errno.EMSGSIZE, errno.ENOBUFS)

    handed: List[int] = []

    def too_big(sock: socket.socket, payload: bytes) -> None:
        handed.append(len(payload))
        sock.send(b"instead")

    DatagramSender(rx.getsockname(), max_wait=0.1, on_too_big=too_big).send(big)
    assert handed == [len(big)]
    assert rx.recv(100) == b"instead"


def test_close_then_send_connects_again(receivers):
    rx = receivers.bind("c.sock")
    sender = DatagramSender(rx.getsockname(), max_wait=0.1)
    sender.send(b"1")
    sender.close()
    assert sender._sock is None
    sender.send(b"2")
    sender.close()
    assert [rx.recv(100), rx.recv(100)] == [b"1", b"2"]


def test_threads_share_one_sender(receivers):
    rx = receivers.bind("t.sock")
    sender = DatagramSender(rx.getsockname(), max_wait=5.0)
    received: List[bytes] = []
    expected = [b"%d-%d" % (tag, i) for tag in range(4) for i in range(200)]

    def reader() -> None:
        while len(received) < len(expected):
            try:
                received.append(rx.recv(100))
            except socket.timeout:
                return

    def writer(tag: int) -> None:
        for i in range(200):
            sender.send(b"%d-%d" % (tag, i))

    threads = [threading.Thread(target=reader)] + [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert sorted(received) == sorted(expected)
