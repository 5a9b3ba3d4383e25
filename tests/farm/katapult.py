"""Katapult bootloader emulator: the device side of Katapult's serial protocol.

Written from the protocol facts in ``docs/katapult-protocol.md`` (Katapult
``src/command.c``, ``src/flashcmd.c``, ``src/stm32/flash.c``), not from its code:

- frame ``01 88 | code | nwords | payload (4*nwords) | crc16 LE | 99 03``, 8..128 bytes,
  CRC-16/MCRF4XX over code, nwords and payload;
- CONNECT answers proto 1.1.0, the application start, block size 64, the MCU string
  (NUL-padded to words), a zero word and the NUL-padded version;
- SEND_BLOCK writes 64 bytes with stm32 page semantics (see ``Flash``), SEND_EOF reports
  the pages written, REQUEST_BLOCK reads 64 bytes back, COMPLETE acks and "boots" 100 ms
  later; anything else (the 0x90 "prime", GET_CANBUS_ID on a USB build) gets 0xF2;
- a bad frame gets ONE NACK (until the next valid frame) and the parser drops bytes up to
  the next 0x01.

Deviation on purpose: the firmware stalls forever when a bad frame itself starts with 0x01
(it "resyncs" to offset 0); the emulator resyncs to the next 0x01 after it, so a test can
corrupt a frame and keep talking.

It must never talk to umockdev or the farm: it serves any PTY master fd, so unit tests run
it on ``pty.openpty()``.
"""
from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from tests.farm.pty_device import PtyDevice

CMD_CONNECT = 0x11
CMD_SEND_BLOCK = 0x12
CMD_SEND_EOF = 0x13
CMD_REQUEST_BLOCK = 0x14
CMD_COMPLETE = 0x15
CMD_GET_CANBUS_ID = 0x16  # CAN builds only: answers the node's 6-byte UUID
RESPONSE_ACK = 0xA0
RESPONSE_NACK = 0xF1
RESPONSE_COMMAND_ERROR = 0xF2

PROTO_VERSION = 0x00010100  # 1.1.0
BLOCK_SIZE = 64
MESSAGE_MIN = 8
MESSAGE_MAX = 128
STX = b"\x01\x88"
TRAILER = b"\x99\x03"
# Katapult's complete_task jumps to the application 100 ms after acking COMPLETE.
BOOT_DELAY_SECONDS = 0.1

FAULTS = ("silent", "corrupt_crc", "drop", "slow", "refuse_boot")


def crc16_mcrf4xx(data: bytes) -> int:
    """CRC-16/MCRF4XX (reflected 0x1021, init 0xFFFF, no final xor); check value 0x6F91."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


def build_frame(code: int, payload: bytes = b"") -> bytes:
    """One protocol frame; ``payload`` is padded with zeros to whole words."""
    if len(payload) % 4:
        payload += b"\x00" * (4 - len(payload) % 4)
    body = bytes([code, len(payload) // 4]) + payload
    return STX + body + struct.pack("<H", crc16_mcrf4xx(body)) + TRAILER


def pad_words(text: bytes) -> bytes:
    """NUL-pad to a multiple of 4 bytes (no padding when already aligned, as the firmware)."""
    return text + b"\x00" * (-len(text) % 4)


class FlashWriteError(Exception):
    """A block write the real flash driver refuses (the device answers 0xF2)."""


class Flash:
    """stm32-style flash: uniform pages, a page's first block erases it.

    Facts from Katapult ``src/stm32/flash.c``: writing the first block of a page erases the
    page unless it is blank already or the write is an identical retransmission (then it is
    ignored and not counted); a later block may only land on blank flash or repeat what is
    there. ``pages_written`` counts pages whose first block was written.
    """

    def __init__(self, base: int = 0x8000000, size: int = 512 * 1024, page_size: int = 16 * 1024,
                 block_size: int = BLOCK_SIZE) -> None:
        if page_size % block_size or size % page_size:
            raise ValueError("page size must be a multiple of the block size and divide the flash size")
        self.base = base
        self.size = size
        self.page_size = page_size
        self.block_size = block_size
        self.memory = bytearray(b"\xff" * size)
        self.pages_written = 0
        self.lock = threading.Lock()

    def load(self, addr: int, data: bytes) -> None:
        """Put content in place without flash rules (an "old firmware" already on the chip)."""
        off = self._offset(addr, len(data))
        with self.lock:
            self.memory[off:off + len(data)] = data

    def read(self, addr: int, length: int) -> bytes:
        """Content at ``addr``; outside the modelled flash reads as erased (0xFF)."""
        out = bytearray(b"\xff" * length)
        with self.lock:
            for i in range(length):
                off = addr + i - self.base
                if 0 <= off < self.size:
                    out[i] = self.memory[off]
        return bytes(out)

    def _offset(self, addr: int, length: int) -> int:
        off = addr - self.base
        if off < 0 or off + length > self.size:
            raise FlashWriteError(f"address 0x{addr:x}+{length} outside flash")
        return off

    def write_block(self, addr: int, data: bytes) -> None:
        if len(data) != self.block_size or addr % self.block_size:
            raise FlashWriteError(f"unaligned block write at 0x{addr:x}")
        off = self._offset(addr, self.block_size)
        blank_block = b"\xff" * self.block_size
        with self.lock:
            page_off = off - off % self.page_size
            current = bytes(self.memory[off:off + self.block_size])
            if off == page_off:
                page = self.memory[page_off:page_off + self.page_size]
                rest_blank = page[self.block_size:] == b"\xff" * (self.page_size - self.block_size)
                if page.count(0xFF) == self.page_size:
                    pass  # already erased
                elif current == data and rest_blank:
                    return  # retransmission of a page's first block: ignored, not counted
                else:
                    self.memory[page_off:page_off + self.page_size] = b"\xff" * self.page_size
                self.pages_written += 1
            elif current != blank_block:
                if current == data:
                    return  # retransmission
                raise FlashWriteError(f"block 0x{addr:x} not erased (out of order write?)")
            self.memory[off:off + self.block_size] = data


@dataclass
class Fault:
    """A misbehaviour switched on for a board; ``params`` depend on the fault.

    - ``silent``: never answer anything.
    - ``corrupt_crc``: replies carry a wrong CRC (``count``: only the next N replies).
    - ``drop``: after ``after_blocks`` SEND_BLOCKs were acked, stop answering; with
      ``hangup`` true the board also hangs up the line (USB gone mid-transfer).
    - ``slow``: replies trickle at ``bytes_per_second``.
    - ``refuse_boot``: COMPLETE is acked but the board never re-enumerates (it stays the
      silent bootloader device; with ``vanish`` true it disappears from USB instead).
    """

    name: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name in ("", "none"):
            self.name = None
        if self.name is not None and self.name not in FAULTS:
            raise ValueError(f"unknown fault {self.name!r}; known: {', '.join(FAULTS)}")
        allowed = {
            None: set(), "silent": set(), "corrupt_crc": {"count"}, "drop": {"after_blocks", "hangup"},
            "slow": {"bytes_per_second"}, "refuse_boot": {"vanish"},
        }[self.name]
        unknown = set(self.params) - allowed
        if unknown:
            raise ValueError(f"fault {self.name!r} takes no parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if self.name == "slow" and float(self.params.get("bytes_per_second", 0)) <= 0:
            raise ValueError("fault 'slow' needs bytes_per_second > 0")

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


class KatapultEmulator(PtyDevice):
    """The bootloader on one PTY master.

    ``on_boot(emulator)`` is called from the device thread 100 ms after COMPLETE was acked
    (unless the ``refuse_boot`` fault is on); afterwards the emulator answers nothing (the
    application runs). ``on_vanish`` is called instead for ``refuse_boot`` with ``vanish``.
    Counters (``connects``, ``blocks_received``, ``completes``, ...) are read by the farm.
    """

    def __init__(self, fd: int, flash: Flash, mcu: str = "stm32f446xx", app_start: int = 0x8008000,
                 version: str = "v0.0.1-110-gb0bf421", name: str = "katapult",
                 on_boot: Optional[Callable[["KatapultEmulator"], None]] = None,
                 on_vanish: Optional[Callable[["KatapultEmulator"], None]] = None,
                 fault: Optional[Fault] = None, canbus_uuid: Optional[bytes] = None) -> None:
        super().__init__(fd, name)
        self.canbus_uuid = canbus_uuid  # a CAN build (a node on the farm's CAN bus)
        self.flash = flash
        self.mcu = mcu
        self.app_start = app_start
        self.version = version
        self.on_boot = on_boot
        self.on_vanish = on_vanish
        self.fault = fault or Fault()
        self._rx = bytearray()
        self._need_valid = False  # a NACK was sent; no more NACKs until a valid frame
        self._fault_blocks = 0  # SEND_BLOCKs acked since the fault was set (for "drop")
        self._corrupted = 0
        self.dropped = False
        self.booted = threading.Event()
        self.connects = 0
        self.blocks_received = 0
        self.blocks_read = 0
        self.completes = 0
        self.last_complete: Optional[float] = None
        self.eof_pages: Optional[int] = None
        self.nacks = 0
        self.command_errors = 0
        self.apply_fault(self.fault)

    def apply_fault(self, fault: Fault) -> None:
        """Switch a fault on (or off with ``Fault()``); safe from another thread."""
        self.fault = fault
        self._fault_blocks = 0
        self._corrupted = 0
        self.dropped = False
        self.bytes_per_second = float(fault.params["bytes_per_second"]) if fault.name == "slow" else None

    # -- framing -------------------------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        if self.booted.is_set() or self.dropped or self.fault.name == "silent":
            return  # the application runs / the board hangs / it never answers
        self._rx += data
        while self._rx and not self.dropped and not self.booted.is_set():
            if not self._parse_one():
                break

    def _parse_one(self) -> bool:
        """Handle one frame or one error at the head of the buffer; False = need more data."""
        buf = self._rx
        if len(buf) < MESSAGE_MIN:
            if buf[:len(STX)] != STX[:len(buf)]:
                self._bad_frame()
                return True
            return False
        msglen = buf[3] * 4 + 8
        if buf[:2] != STX or msglen > MESSAGE_MAX:
            self._bad_frame()
            return True
        if len(buf) < msglen:
            return False
        frame = bytes(buf[:msglen])
        body = frame[2:-4]
        crc = struct.unpack("<H", frame[-4:-2])[0]
        if frame[-2:] != TRAILER or crc != crc16_mcrf4xx(body):
            self._bad_frame()
            return True
        del self._rx[:msglen]
        self._need_valid = False
        self._dispatch(body[0], body[2:])
        return True

    def _bad_frame(self) -> None:
        """One NACK per run of garbage, then drop bytes up to the next 0x01 (after offset 0)."""
        nxt = self._rx.find(b"\x01", 1)
        del self._rx[:nxt if nxt >= 0 else len(self._rx)]
        if not self._need_valid:
            self._need_valid = True
            self.nacks += 1
            self._reply(RESPONSE_NACK, b"")

    def _reply(self, code: int, payload: bytes) -> None:
        frame = bytearray(build_frame(code, payload))
        if self.fault.name == "corrupt_crc":
            limit = self.fault.params.get("count")
            if limit is None or self._corrupted < int(limit):
                self._corrupted += 1
                frame[-4] ^= 0xFF
                frame[-3] ^= 0x5A
        self.send(bytes(frame))

    def _ack(self, cmd: int, payload: bytes = b"") -> None:
        self._reply(RESPONSE_ACK, struct.pack("<I", cmd) + payload)

    def _command_error(self) -> None:
        self.command_errors += 1
        self._reply(RESPONSE_COMMAND_ERROR, b"")

    # -- commands ------------------------------------------------------------------------
    def _dispatch(self, cmd: int, payload: bytes) -> None:
        if cmd == CMD_CONNECT:
            self.connects += 1
            mcu = pad_words(self.mcu.encode())
            info = struct.pack("<III", PROTO_VERSION, self.app_start, BLOCK_SIZE)
            self._ack(cmd, info + mcu + b"\x00" * 4 + pad_words(self.version.encode()))
        elif cmd == CMD_SEND_BLOCK:
            if len(payload) != 4 + BLOCK_SIZE:
                self._command_error()
                return
            addr = struct.unpack("<I", payload[:4])[0]
            if addr < self.app_start:
                self._command_error()
                return
            try:
                self.flash.write_block(addr, payload[4:])
            except FlashWriteError:
                self._command_error()
                return
            self.blocks_received += 1
            self._ack(cmd, struct.pack("<I", addr))
            if self.fault.name == "drop":
                self._fault_blocks += 1
                if self._fault_blocks >= int(self.fault.params.get("after_blocks", 0)):
                    self._drop()
        elif cmd == CMD_SEND_EOF:
            self.eof_pages = self.flash.pages_written
            self._ack(cmd, struct.pack("<I", self.flash.pages_written))
        elif cmd == CMD_REQUEST_BLOCK:
            if len(payload) < 4:
                self._command_error()
                return
            addr = struct.unpack("<I", payload[:4])[0]
            self.blocks_read += 1
            self._ack(cmd, struct.pack("<I", addr) + self.flash.read(addr, BLOCK_SIZE))
        elif cmd == CMD_COMPLETE:
            self.completes += 1
            self.last_complete = time.time()
            self._ack(cmd)
            if self.fault.name == "refuse_boot":
                if self.fault.params.get("vanish"):
                    self.call_later(BOOT_DELAY_SECONDS, self._vanish)
                else:
                    self.dropped = True  # hangs in a dead application: no answers, no USB change
            else:
                self.call_later(BOOT_DELAY_SECONDS, self._boot)
        elif cmd == CMD_GET_CANBUS_ID and self.canbus_uuid is not None:
            self._ack(cmd, self.canbus_uuid + b"\x00" * (-len(self.canbus_uuid) % 4))
        else:
            # Unknown command (also the 0x90 "prime" and GET_CANBUS_ID on USB builds).
            self._command_error()

    def _drop(self) -> None:
        self.dropped = True
        if self.fault.params.get("hangup"):
            # Let the last ACK go out first, so "N blocks acked" holds with and without hangup.
            self.call_later(0.02, self.hang_up)

    def _boot(self) -> None:
        self.booted.set()
        if self.on_boot is not None:
            self.on_boot(self)

    def _vanish(self) -> None:
        self.dropped = True
        if self.on_vanish is not None:
            self.on_vanish(self)

    def stats(self) -> Dict[str, Any]:
        return {
            "connects": self.connects, "blocks_received": self.blocks_received,
            "blocks_read": self.blocks_read, "completes": self.completes,
            "last_complete": self.last_complete, "eof_pages": self.eof_pages,
            "nacks": self.nacks, "command_errors": self.command_errors,
        }
