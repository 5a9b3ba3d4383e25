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


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Not pytest's tmp_path: a Unix socket path is limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="kfd")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(address)
    sock.settimeout(5)
    return sock


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


def test_sends_and_reuses_one_connection(sockdir):
    address = os.path.join(sockdir, "r.sock")
    rx = receiver(address)
    try:
        sender = DatagramSender(address, max_wait=0.1)
        sender.send(b"one")
        first = sender._sock
        sender.send(b"two")
        assert sender._sock is first
        assert [rx.recv(100), rx.recv(100)] == [b"one", b"two"]
        assert not sender.congested
    finally:
        rx.close()


def test_full_queue_waits_once_then_fails_fast_until_it_recovers(sockdir):
    # A bound receiver that does not read: the first send that finds the queue full waits
    # max_wait for room and fails; while congested, sends fail at once; once the receiver
    # reads, sends work again and the next full queue is waited for again.
    address = os.path.join(sockdir, "stuck.sock")
    rx = receiver(address)
    max_wait = 0.3
    try:
        sender = DatagramSender(address, max_wait=max_wait)
        queued = fill_queue(sender)
        assert queued > 0
        # fill_queue's last send failed without waiting (max_wait 0), so we are congested:
        # clear that by having room once, then fill again for the timed send.
        assert sender.congested
        rx.recv(100)
        sender.send(b"room")
        assert not sender.congested

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
        received = drain(rx)
        assert received == [b"fill %d" % i for i in range(1, queued)] + [b"room"]

        sender.send(b"recovered")
        assert not sender.congested
        assert rx.recv(100) == b"recovered"

        # Recovered means a full queue is waited for again (the flag was cleared).
        fill_queue(sender)
        rx.recv(100)
        sender.send(b"room again")
        started = time.monotonic()
        with pytest.raises(BlockingIOError):
            sender.send(b"waits again")
        assert time.monotonic() - started >= max_wait * 0.9
    finally:
        rx.close()


def test_wait_for_room_ends_when_the_receiver_reads(sockdir):
    address = os.path.join(sockdir, "slow.sock")
    rx = receiver(address)
    try:
        sender = DatagramSender(address, max_wait=10.0)
        fill_queue(sender)
        rx.recv(100)
        sender.send(b"refill")  # the queue is full again, and not congested
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
    finally:
        rx.close()


def test_reconnects_once_after_the_receiver_is_recreated(sockdir):
    address = os.path.join(sockdir, "r.sock")
    first = receiver(address)
    sender = DatagramSender(address, max_wait=0.1)
    sender.send(b"to first")
    assert first.recv(100) == b"to first"
    old = sender._sock
    first.close()
    os.unlink(address)
    second = receiver(address)
    try:
        sender.send(b"to second")
        assert second.recv(100) == b"to second"
        assert sender._sock is not old
    finally:
        second.close()


def test_receiver_gone_raises_after_one_reconnect(sockdir):
    address = os.path.join(sockdir, "gone.sock")
    rx = receiver(address)
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
    again = receiver(address)
    try:
        sender.send(b"back")
        assert again.recv(100) == b"back"
    finally:
        again.close()


def test_abstract_address_and_its_recreation():
    address = "\0kflashd-test-dgram-" + secrets.token_hex(6)
    first = receiver(address)
    sender = DatagramSender(address, max_wait=0.1)
    sender.send(b"abstract")
    assert first.recv(100) == b"abstract"
    first.close()
    second = receiver(address)
    try:
        sender.send(b"abstract again")
        assert second.recv(100) == b"abstract again"
    finally:
        second.close()


def test_callable_address_is_followed(sockdir):
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    rx_a, rx_b = receiver(a), receiver(b)
    target = [a]
    try:
        sender = DatagramSender(lambda: target[0], max_wait=0.1)
        sender.send(b"to a")
        target[0] = b
        assert sender.address == b
        sender.send(b"to b")
        assert rx_a.recv(100) == b"to a"
        assert rx_b.recv(100) == b"to b"
        assert drain(rx_a) == []
    finally:
        rx_a.close()
        rx_b.close()


def test_oversized_payload_goes_to_the_hook(sockdir):
    address = os.path.join(sockdir, "big.sock")
    rx = receiver(address)
    big = b"x" * (4 * 1024 * 1024)  # above any default SO_SNDBUF: EMSGSIZE
    try:
        with pytest.raises(OSError) as failure:
            DatagramSender(address, max_wait=0.1).send(big)
        assert failure.value.errno in (errno.EMSGSIZE, errno.ENOBUFS)

        handed: List[int] = []

        def too_big(sock: socket.socket, payload: bytes) -> None:
            handed.append(len(payload))
            sock.send(b"instead")

        DatagramSender(address, max_wait=0.1, on_too_big=too_big).send(big)
        assert handed == [len(big)]
        assert rx.recv(100) == b"instead"
    finally:
        rx.close()


def test_close_then_send_connects_again(sockdir):
    address = os.path.join(sockdir, "c.sock")
    rx = receiver(address)
    try:
        sender = DatagramSender(address, max_wait=0.1)
        sender.send(b"1")
        sender.close()
        assert sender._sock is None
        sender.send(b"2")
        assert [rx.recv(100), rx.recv(100)] == [b"1", b"2"]
    finally:
        sender.close()
        rx.close()


def test_threads_share_one_sender(sockdir):
    address = os.path.join(sockdir, "t.sock")
    rx = receiver(address)
    sender = DatagramSender(address, max_wait=5.0)
    received: List[bytes] = []
    expected = 4 * 200

    def reader() -> None:
        while len(received) < expected:
            try:
                received.append(rx.recv(100))
            except socket.timeout:
                return

    def writer(tag: int) -> None:
        for i in range(200):
            sender.send(b"%d-%d" % (tag, i))

    drainer = threading.Thread(target=reader)
    drainer.start()
    writers = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    try:
        for w in writers:
            w.start()
        for w in writers:
            w.join(timeout=15)
        drainer.join(timeout=15)
        assert sorted(received) == sorted(b"%d-%d" % (t, i) for t in range(4) for i in range(200))
    finally:
        rx.close()
