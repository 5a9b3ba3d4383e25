"""Talk to a board that sits in Katapult, read-only: CONNECT (its facts) and COMPLETE (leave).

Why the daemon speaks the protocol itself instead of running `flashtool.py -s`: one CONNECT
is a few bytes and a few milliseconds, needs no subprocess, and the same code can send
COMPLETE alone, which `flashtool.py` never does without a write. Nothing here writes flash.

Protocol facts (docs/design.md; Katapult's src/command.c and src/flashcmd.c):
- frame `01 88 | code | nwords | payload (4*nwords, LE) | crc16 LE | 99 03`, CRC-16/MCRF4XX
  (reflected 0x1021, init 0xFFFF) over code, nwords and payload;
- CONNECT (0x11) is answered by ACK (0xA0) carrying: the acked command, the protocol
  version, the application start, the block size, the MCU name (NUL-padded to words), a zero
  word and the Katapult version string (NUL-padded);
- COMPLETE (0x15) is acked, and 100 ms later Katapult jumps to the application in flash:
  without a write before it, that is the firmware the board ran before;
- USB builds of stm32 parts other than f2/f4/h7 want one throw-away command first (the
  "prime", 0x90, answered 0xF2), as flashtool.py sends it.

The bootloader has no timeouts and CONNECT changes nothing on the board, so a probe can be
repeated; the port is always closed afterwards (flashtool.py refuses a tty that any process
holds).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import serial

from .errors import DiscoveryError

CMD_CONNECT = 0x11
CMD_COMPLETE = 0x15
CMD_PRIME = 0x90
ACK = 0xA0
_HEADER = b"\x01\x88"
_TRAILER = b"\x99\x03"
# Any rate but 1200 (a Klipper board would take 1200 as a bootloader request); USB CDC
# ignores it, and 115200 is a rate every tty accepts.
DEFAULT_BAUD = 115200


@dataclass(frozen=True)
class KatapultInfo:
    """What a board's Katapult says about itself in its CONNECT reply."""

    mcu: str
    app_start: int
    block_size: int
    version: str
    protocol: str


def crc16(data: bytes) -> int:
    """CRC-16/MCRF4XX; check value of b"123456789" is 0x6F91."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


def frame(code: int, payload: bytes = b"") -> bytes:
    payload += b"\x00" * (-len(payload) % 4)
    body = bytes([code, len(payload) // 4]) + payload
    return _HEADER + body + struct.pack("<H", crc16(body)) + _TRAILER


def needs_prime(usb_product: str) -> bool:
    """flashtool.py primes USB stm32 parts other than f2/f4/h7 before CONNECT."""
    mcu = usb_product.lower()
    return mcu.startswith("stm32") and not mcu.startswith(("stm32f2", "stm32f4", "stm32h7"))


def _read_frame(port: serial.Serial, deadline: float) -> Optional[Tuple[int, bytes]]:
    """The next well-formed frame (code, payload) before `deadline`, or None."""
    buf = b""
    while time.monotonic() < deadline:
        # One byte with the timeout, then what else is there without waiting (in_waiting's
        # ioctl is not there on every tty).
        port.timeout = max(0.01, min(0.2, deadline - time.monotonic()))
        chunk = port.read(1)
        if chunk:
            port.timeout = 0
            chunk += port.read(256)
        if chunk:
            buf += chunk
        while True:
            start = buf.find(_HEADER)
            if start < 0:
                buf = buf[-1:]
                break
            buf = buf[start:]
            if len(buf) < 8:
                break
            length = buf[3] * 4 + 8
            if length > 128:
                buf = buf[1:]
                continue
            if len(buf) < length:
                break
            candidate, buf = buf[:length], buf[length:]
            body = candidate[2:-4]
            if candidate[-2:] == _TRAILER and struct.unpack("<H", candidate[-4:-2])[0] == crc16(body):
                return body[0], body[2:]
    return None


def _command(port: serial.Serial, code: int, payload: bytes, timeout: float, tries: int) -> bytes:
    """Send `code` until it is acked; the ACK's payload after the acked command word."""
    for _ in range(tries):
        port.reset_input_buffer()
        port.write(frame(code, payload))  # no flush(): tcdrain waits forever on a dead line
        deadline = time.monotonic() + timeout
        while True:
            reply = _read_frame(port, deadline)
            if reply is None:
                break
            rcode, rpayload = reply
            if rcode == ACK and len(rpayload) >= 4 and struct.unpack("<I", rpayload[:4])[0] == code:
                return rpayload[4:]
            if rcode != ACK:
                break  # NACK or command error: send again
    raise DiscoveryError(f"no answer to command 0x{code:02x} after {tries} tries")


PROBE_BOUND = 5.0  # seconds the daemon's scheduler waits for a background read at most


def _open(device_node: str, baud: int) -> serial.Serial:
    port = serial.Serial()
    port.port = device_node
    port.baudrate = baud or DEFAULT_BAUD
    port.timeout = 0.2
    port.write_timeout = 1.0  # a board that left USB must not hold the caller
    try:
        port.open()
    except (serial.SerialException, OSError, ValueError) as e:
        raise DiscoveryError(f"{device_node}: cannot open Katapult's port: {e}") from e
    return port


def parse_connect(payload: bytes) -> KatapultInfo:
    """The CONNECT reply's fields (after the acked-command word)."""
    if len(payload) < 12:
        raise DiscoveryError(f"CONNECT reply too short ({len(payload)} bytes)")
    proto, app_start, block_size = struct.unpack_from("<III", payload)
    rest = payload[12:]
    mcu_raw, _, tail = rest.partition(b"\x00")
    version = tail.replace(b"\x00", b" ").strip().split(b" ")[0] if tail.strip(b"\x00") else b""
    return KatapultInfo(
        mcu=mcu_raw.decode("ascii", "replace"),
        app_start=app_start,
        block_size=block_size,
        version=version.decode("ascii", "replace") or "?",
        protocol=f"{proto >> 16}.{(proto >> 8) & 0xFF}.{proto & 0xFF}",
    )


def probe(device_node: str, usb_product: str = "", baud: int = 0, timeout: float = 1.0, tries: int = 3) -> KatapultInfo:
    """CONNECT to the Katapult at `device_node` and return what it reports; writes nothing.

    Raises DiscoveryError (naming the device) when the port cannot be opened or Katapult does
    not answer.
    """
    port = _open(device_node, baud)
    try:
        if needs_prime(usb_product):
            port.write(frame(CMD_PRIME))
            _read_frame(port, time.monotonic() + 0.1)  # the 0xF2 it answers is not needed
        try:
            payload = _command(port, CMD_CONNECT, b"", timeout, tries)
        except DiscoveryError as e:
            raise DiscoveryError(f"{device_node}: Katapult did not answer CONNECT ({e})") from None
        except (serial.SerialException, OSError) as e:
            raise DiscoveryError(f"{device_node}: Katapult's port failed during CONNECT: {e}") from e
        return parse_connect(payload)
    finally:
        try:
            port.close()
        except OSError:
            pass


def boot_application(device_node: str, baud: int = 0, timeout: float = 1.0, tries: int = 3) -> None:
    """Send COMPLETE without a write: Katapult starts the firmware already in flash.

    Used when a board was sent to Katapult and the image turned out not to fit: the board
    goes back to what it ran, so Klipper finds it again.
    """
    port = _open(device_node, baud)
    try:
        try:
            _command(port, CMD_COMPLETE, b"", timeout, tries)
        except DiscoveryError as e:
            raise DiscoveryError(f"{device_node}: Katapult did not acknowledge COMPLETE ({e})") from None
        except (serial.SerialException, OSError) as e:
            raise DiscoveryError(f"{device_node}: Katapult's port failed during COMPLETE: {e}") from e
    finally:
        try:
            port.close()
        except OSError:
            pass
