"""The 1200-baud bootloader request on a real pseudo-terminal (what umockdev boards are)."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import struct
import termios

import pytest

from kflashd import bootloader
from kflashd.errors import DiscoveryError


@pytest.fixture
def board_tty():
    """A pty pair: the slave is the 'board's tty', the master is where a board emulator sits."""
    master, slave = pty.openpty()
    path = os.ttyname(slave)
    # the emulator keeps only the master; the slave is opened by the code under test
    os.close(slave)
    yield master, path
    os.close(master)


def _fds_open_on(path: str):
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                found.append(fd)
        except OSError:
            pass
    return found


def test_line_is_left_at_1200_baud(board_tty):
    # Linux pty masters report the slave's line settings: this is what an emulated board sees.
    master, path = board_tty
    attrs = termios.tcgetattr(master)
    attrs[4] = attrs[5] = termios.B115200
    termios.tcsetattr(master, termios.TCSANOW, attrs)
    assert termios.tcgetattr(master)[4:6] == [termios.B115200, termios.B115200]

    bootloader.request_bootloader(path)

    assert termios.tcgetattr(master)[4:6] == [termios.B1200, termios.B1200]
    assert _fds_open_on(path) == []  # closed again: flashtool.py refuses a tty someone holds


def test_ptys_refuse_modem_lines(board_tty):
    # The premise of the ENOTTY rule: DTR ioctls on a pty fail with ENOTTY, which is what
    # makes flashtool.py -r give up before it changes the baud.
    master, path = board_tty
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        with pytest.raises(OSError) as raised:
            fcntl.ioctl(fd, termios.TIOCMBIS, struct.pack("I", termios.TIOCM_DTR))
        assert raised.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


class SysCallLog:
    """Records the modem-line ioctls and line-setting calls while passing them through."""

    def __init__(self, monkeypatch, fail_ioctl=None):
        self.calls = []
        real_ioctl, real_tcsetattr = fcntl.ioctl, termios.tcsetattr
        names = {termios.TIOCMBIS: "set", termios.TIOCMBIC: "clear"}
        lines = {termios.TIOCM_DTR: "DTR", termios.TIOCM_RTS: "RTS"}

        def ioctl(fd, request, arg=0, *rest):
            if request in names and isinstance(arg, bytes):
                call = f"{names[request]} {lines.get(struct.unpack('I', arg)[0], '?')}"
                self.calls.append(call)
                # fail_ioctl = (call, errno, n): the n-th such call (1-based) fails
                if fail_ioctl and fail_ioctl[0] == call and self.calls.count(call) == fail_ioctl[2]:
                    raise OSError(fail_ioctl[1], os.strerror(fail_ioctl[1]))
            return real_ioctl(fd, request, arg, *rest)

        def tcsetattr(fd, when, attributes):
            speeds = {termios.B1200: "1200", termios.B9600: "9600"}
            self.calls.append(f"baud {speeds.get(attributes[5], attributes[5])}")
            return real_tcsetattr(fd, when, attributes)

        monkeypatch.setattr(fcntl, "ioctl", ioctl)
        monkeypatch.setattr(termios, "tcsetattr", tcsetattr)


def test_exact_sequence(board_tty, monkeypatch):
    master, path = board_tty
    log = SysCallLog(monkeypatch)
    bootloader.request_bootloader(path)
    # open (pyserial configures the line and raises DTR/RTS), then: DTR on, 1200, DTR off
    calls = log.calls
    assert calls[0] == "baud 9600"
    assert calls[-3:] == ["set DTR", "baud 1200", "clear DTR"]
    assert termios.tcgetattr(master)[4:6] == [termios.B1200, termios.B1200]


@pytest.mark.parametrize(
    "call, nth, words",
    [
        ("set DTR", 1, "cannot open"),  # pyserial's own DTR at open
        ("set DTR", 2, "cannot raise DTR"),
        ("clear DTR", 1, "cannot drop DTR"),
    ],
)
def test_other_modem_line_errors_are_discovery_errors(board_tty, monkeypatch, call, nth, words):
    master, path = board_tty
    SysCallLog(monkeypatch, fail_ioctl=(call, errno.EPERM, nth))
    with pytest.raises(DiscoveryError) as raised:
        bootloader.request_bootloader(path)
    assert path in str(raised.value)
    assert words in str(raised.value)
    assert _fds_open_on(path) == []


def test_board_leaving_at_the_last_step_is_fine(board_tty, monkeypatch):
    # The DTR drop at 1200 baud is what reboots the board; its tty may vanish right then.
    master, path = board_tty
    SysCallLog(monkeypatch, fail_ioctl=("clear DTR", errno.EIO, 1))
    bootloader.request_bootloader(path)
    assert termios.tcgetattr(master)[4:6] == [termios.B1200, termios.B1200]


def test_missing_device(tmp_path):
    path = str(tmp_path / "ttyACM9")
    with pytest.raises(DiscoveryError, match="ttyACM9"):
        bootloader.request_bootloader(path)


def test_not_a_tty(tmp_path):
    path = tmp_path / "ttyACM0"
    path.write_bytes(b"")
    with pytest.raises(DiscoveryError) as raised:
        bootloader.request_bootloader(str(path))
    assert str(path) in str(raised.value)
    assert _fds_open_on(str(path)) == []
