"""The Katapult bootloader emulator on a plain pty, driven by an independent host.

``KatapultHost`` below is written from the protocol description again (framing and CRC
included) and shares no code with ``tests.farm.katapult``, so a framing bug in the emulator
cannot hide behind the same bug in the test.
"""
from __future__ import annotations

import errno
import os
import pty
import random
import select
import struct
import termios
import time
import tty
from typing import Iterator, Optional, Tuple

import pytest

from tests.farm.client import wait_until
from tests.farm.katapult import Fault, Flash, KatapultEmulator, crc16_mcrf4xx
from tests.farm.klipper_app import IDENTIFY_QUERY, KlipperAppEmulator

APP_START = 0x8008000
MCU = "stm32f446xx"
BL_VERSION = "v0.0.1-110-gb0bf421"
NACK = bytes.fromhex("0188f1006895 9903".replace(" ", ""))
COMMAND_ERROR = bytes.fromhex("0188f20000bf9903")


def host_crc(data: bytes) -> int:
    """CRC-16/MCRF4XX, byte-wise (the CCITT update formula), independent of the emulator's."""
    crc = 0xFFFF
    for byte in data:
        byte ^= crc & 0xFF
        byte = (byte ^ (byte << 4)) & 0xFF
        crc = ((byte << 8) | (crc >> 8)) ^ (byte >> 4) ^ (byte << 3)
        crc &= 0xFFFF
    return crc


class KatapultHost:
    """Minimal host side of the protocol over the pty slave."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    @staticmethod
    def frame(cmd: int, payload: bytes = b"") -> bytes:
        words = len(payload) // 4
        inner = bytes((cmd, words)) + payload
        return b"\x01\x88" + inner + host_crc(inner).to_bytes(2, "little") + b"\x99\x03"

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_raw(self, count: int, timeout: float = 2.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if select.select([self.fd], [], [], remaining)[0]:
                self.buf += os.read(self.fd, 4096)
        out, self.buf = self.buf[:count], self.buf[count:]
        return out

    def reply(self, timeout: float = 2.0, check_crc: bool = True) -> Tuple[int, bytes]:
        head = self.read_raw(4, timeout)
        assert len(head) == 4, f"no reply header (got {head!r})"
        assert head[:2] == b"\x01\x88", head
        rest = self.read_raw(head[3] * 4 + 4, timeout)
        payload, crc, trailer = rest[:-4], rest[-4:-2], rest[-2:]
        assert trailer == b"\x99\x03"
        if check_crc:
            assert int.from_bytes(crc, "little") == host_crc(head[2:] + payload), "bad reply CRC"
        return head[2], payload

    def command(self, cmd: int, payload: bytes = b"", timeout: float = 2.0) -> Tuple[int, bytes]:
        self.write(self.frame(cmd, payload))
        return self.reply(timeout)

    def connect(self) -> dict:
        code, payload = self.command(0x11)
        assert code == 0xA0
        acked, proto, app_start, block_size = struct.unpack_from("<IIII", payload)
        mcu, _, version = payload[16:].partition(b"\x00")
        return {"acked": acked, "proto": proto, "app_start": app_start, "block_size": block_size,
                "mcu": mcu.decode(), "info": payload[16:], "version": version.strip(b"\x00").decode()}

    def flash(self, image: bytes, app_start: int = APP_START) -> int:
        """Send the image in 64-byte blocks (last padded with 0xFF); returns EOF's page count."""
        padded = image + b"\xff" * (-len(image) % 64)
        for off in range(0, len(padded), 64):
            addr = app_start + off
            code, payload = self.command(0x12, struct.pack("<I", addr) + padded[off:off + 64])
            assert (code, payload) == (0xA0, struct.pack("<II", 0x12, addr)), (hex(code), payload)
        code, payload = self.command(0x13)
        assert code == 0xA0 and struct.unpack("<I", payload[:4])[0] == 0x13
        return struct.unpack("<I", payload[4:8])[0]

    def read_back(self, length: int, app_start: int = APP_START) -> bytes:
        out = b""
        for off in range(0, length, 64):
            code, payload = self.command(0x14, struct.pack("<I", app_start + off))
            assert code == 0xA0 and struct.unpack("<II", payload[:8]) == (0x14, app_start + off)
            out += payload[8:72]
        return out[:length]

    def silent_for(self, seconds: float) -> bool:
        """True when nothing at all arrives for ``seconds`` (asserting an absence)."""
        return not select.select([self.fd], [], [], seconds)[0] and not self.buf


class Bench:
    """Emulator on a pty master, host on the raw slave."""

    def __init__(self, page_size: int = 2048, old: Optional[bytes] = None, fault: Optional[Fault] = None) -> None:
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)  # no echo, no newline translation: a binary serial line
        self.flash = Flash(page_size=page_size)
        if old is not None:
            self.flash.load(APP_START, old)
        self.boots: list = []
        self.emulator = KatapultEmulator(self.master, self.flash, mcu=MCU, app_start=APP_START, version=BL_VERSION,
                                         on_boot=lambda e: self.boots.append(time.monotonic()), fault=fault)
        self.emulator.start()
        self.host = KatapultHost(self.slave)

    def close(self) -> None:
        self.emulator.stop()
        os.close(self.slave)
        os.close(self.master)


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    b.close()


def make_bench(**kwargs) -> Bench:
    return Bench(**kwargs)


def test_crc_check_value() -> None:
    assert host_crc(b"123456789") == 0x6F91
    assert crc16_mcrf4xx(b"123456789") == 0x6F91
    # The fixed frames of docs/katapult-protocol.md: NACK, command error, busy.
    assert KatapultHost.frame(0xF1) == NACK
    assert KatapultHost.frame(0xF2) == COMMAND_ERROR
    assert KatapultHost.frame(0xF3) == bytes.fromhex("0188f300d8a69903")


def test_connect_reply_carries_identity(bench: Bench) -> None:
    info = bench.host.connect()
    assert info["acked"] == 0x11
    assert info["proto"] == 0x00010100
    assert info["app_start"] == APP_START
    assert info["block_size"] == 64
    assert info["mcu"] == MCU
    # MCU NUL-padded to words, a zero word, the version NUL-padded to words.
    assert info["info"] == b"stm32f446xx\x00" + b"\x00" * 4 + b"v0.0.1-110-gb0bf421\x00"
    assert info["version"] == BL_VERSION


def test_flash_multi_page_image_byte_for_byte() -> None:
    page = 2048
    old = random.Random(1).randbytes(6 * page)
    image = random.Random(2).randbytes(2 * page + 1000)  # 3 pages, last one partly used
    b = make_bench(page_size=page, old=old)
    try:
        b.host.connect()
        assert b.host.flash(image) == 3
        assert b.host.read_back(len(image)) == image
        content = b.flash.read(APP_START, 6 * page)
        assert content[:len(image)] == image
        # The rest of the last written page is erased (0xFF), pages beyond keep the old firmware.
        assert content[len(image):3 * page] == b"\xff" * (3 * page - len(image))
        assert content[3 * page:] == old[3 * page:]
        code, payload = b.host.command(0x15)
        acked_at = time.monotonic()
        assert (code, payload) == (0xA0, struct.pack("<I", 0x15))
        wait_until(lambda: b.boots, timeout=2, what="boot after COMPLETE")
        assert b.boots[0] - acked_at >= 0.05  # Katapult jumps ~100 ms after the ACK
        assert b.emulator.booted.is_set()
        b.host.write(b.host.frame(0x11))
        assert b.host.silent_for(0.2), "the booted application must not answer bootloader frames"
    finally:
        b.close()


def test_flash_rules_like_stm32(bench: Bench) -> None:
    block = bytes(range(64))
    # Below the application start: command error.
    assert bench.host.command(0x12, struct.pack("<I", APP_START - 64) + block) == (0xF2, b"")
    # First block of a page, then a later block; an identical retransmission is accepted.
    assert bench.host.command(0x12, struct.pack("<I", APP_START) + block)[0] == 0xA0
    assert bench.host.command(0x12, struct.pack("<I", APP_START + 64) + block)[0] == 0xA0
    assert bench.host.command(0x12, struct.pack("<I", APP_START + 64) + block)[0] == 0xA0
    # A later block on non-blank different data is an error.
    assert bench.host.command(0x12, struct.pack("<I", APP_START + 64) + bytes(64))[0] == 0xF2
    # Wrong word count: error.
    assert bench.host.command(0x12, struct.pack("<I", APP_START + 128) + bytes(32))[0] == 0xF2
    # Writing the page's first block again with new data erases the page.
    assert bench.host.command(0x12, struct.pack("<I", APP_START) + bytes(64))[0] == 0xA0
    assert bench.flash.read(APP_START, 128) == bytes(64) + b"\xff" * 64
    code, payload = bench.host.command(0x13)
    assert code == 0xA0 and struct.unpack("<II", payload) == (0x13, 2)


def test_prime_and_unknown_commands_get_command_error(bench: Bench) -> None:
    bench.host.write(bench.host.frame(0x90))
    assert bench.host.read_raw(8) == COMMAND_ERROR
    bench.host.write(bench.host.frame(0x16))  # GET_CANBUS_ID on a USB build
    assert bench.host.read_raw(8) == COMMAND_ERROR
    assert bench.host.connect()["mcu"] == MCU


def test_bad_frame_one_nack_then_resync(bench: Bench) -> None:
    good = bench.host.frame(0x11)
    bad_crc = bytearray(good)
    bad_crc[-4] ^= 0xFF
    # A corrupted frame followed by garbage: ONE NACK for the whole run, then resync to the
    # next 0x01 and a normal answer.
    bench.host.write(bytes(bad_crc) + b"\x55\x01\x77\x99\x03\x02\x01\x00")
    assert bench.host.read_raw(8) == NACK
    assert bench.host.silent_for(0.1)
    assert bench.host.connect()["acked"] == 0x11
    # After a valid frame, the next garbage run is NACKed again.
    bench.host.write(b"\x42\x42\x42\x42\x42\x42\x42\x42")
    assert bench.host.read_raw(8) == NACK
    assert bench.host.connect()["acked"] == 0x11
    assert bench.emulator.nacks == 2


def test_fault_silent() -> None:
    b = make_bench(fault=Fault("silent"))
    try:
        b.host.write(b.host.frame(0x11))
        assert b.host.silent_for(0.3)
        b.emulator.apply_fault(Fault())
        assert b.host.connect()["acked"] == 0x11
    finally:
        b.close()


def raw_reply_crc_ok(host: KatapultHost) -> bool:
    head = host.read_raw(4)
    rest = host.read_raw(head[3] * 4 + 4)
    assert head[:2] == b"\x01\x88" and rest[-2:] == b"\x99\x03"
    return int.from_bytes(rest[-4:-2], "little") == host_crc(head[2:] + rest[:-4])


def test_fault_corrupt_crc() -> None:
    b = make_bench(fault=Fault("corrupt_crc", {"count": 1}))
    try:
        b.host.write(b.host.frame(0x11))
        assert not raw_reply_crc_ok(b.host)
        b.host.write(b.host.frame(0x11))
        assert raw_reply_crc_ok(b.host)  # only the first reply was corrupted
        b.emulator.apply_fault(Fault("corrupt_crc"))
        for _ in range(2):
            b.host.write(b.host.frame(0x11))
            assert not raw_reply_crc_ok(b.host)
    finally:
        b.close()


@pytest.mark.parametrize("hangup", [False, True])
def test_fault_drop_after_blocks(hangup: bool) -> None:
    b = make_bench(fault=Fault("drop", {"after_blocks": 3, "hangup": hangup}))
    try:
        b.host.connect()
        for i in range(3):
            assert b.host.command(0x12, struct.pack("<I", APP_START + 64 * i) + bytes(64))[0] == 0xA0
        b.host.write(b.host.frame(0x12, struct.pack("<I", APP_START + 192) + bytes(64)))
        if hangup:
            def hung() -> bool:
                try:
                    return os.read(b.slave, 1) == b""
                except OSError as exc:
                    return exc.errno == errno.EIO
            assert wait_until(hung, timeout=2, what="line hangup")
        else:
            assert b.host.silent_for(0.3)
        assert b.emulator.blocks_received == 3
    finally:
        b.close()


def test_fault_slow_caps_reply_rate() -> None:
    b = make_bench(fault=Fault("slow", {"bytes_per_second": 400}))
    try:
        start = time.monotonic()
        b.host.command(0x14, struct.pack("<I", APP_START))  # 80-byte reply
        elapsed = time.monotonic() - start
        assert elapsed >= 0.15, elapsed  # 80 bytes at 400 B/s ~ 0.2 s
    finally:
        b.close()


def test_fault_refuse_boot() -> None:
    b = make_bench(fault=Fault("refuse_boot"))
    try:
        assert b.host.command(0x15) == (0xA0, struct.pack("<I", 0x15))
        b.host.write(b.host.frame(0x11))
        assert b.host.silent_for(0.3)
        assert b.boots == []
    finally:
        b.close()


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError):
        Fault("explode")
    with pytest.raises(ValueError):
        Fault("drop", {"after": 3})


def test_klipper_app_bootloader_request_and_identify() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    requests: list = []
    app = KlipperAppEmulator(master, mcu=MCU, serial="ABC123", version="v0.13.0-test",
                             on_bootloader_request=requests.append).start()
    try:
        host = KatapultHost(slave)
        host.write(IDENTIFY_QUERY)
        line = b""
        deadline = time.monotonic() + 2
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            line += host.read_raw(1, timeout=0.5)
        assert b'"version": "v0.13.0-test"' in line and b'"serial": "ABC123"' in line
        assert requests == []
        attrs = termios.tcgetattr(slave)
        attrs[4] = attrs[5] = termios.B1200
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        wait_until(lambda: requests, timeout=2, what="bootloader request at 1200 baud")
        assert requests == [app]
    finally:
        app.stop()
        os.close(slave)
        os.close(master)
