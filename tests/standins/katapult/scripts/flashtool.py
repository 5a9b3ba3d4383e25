#!/usr/bin/env python3
"""Stand-in for Katapult's scripts/flashtool.py, for kflashd's tests.

Written from the protocol description in kflashd's docs/katapult-protocol.md,
not from Katapult's code. It prints what the real tool prints for a serial flash, exits
0/1/2 like it, and ends a failure with `ERROR:root:Flash Tool Error` and a chained
traceback on stderr whose exceptions are named FlashError, as the real one's are.
Runs under any python3 >= 3.6 with the standard library only (termios, no pyserial).

Two modes, chosen by $KFLASHD_STANDIN_DIR/flashtool.json (re-read at every call):

"protocol" (default): a real host-side Katapult serial client. It scans /proc/*/fd for
  another holder of the tty, reads the USB identity from sysfs (/sys/class/tty/<tty>),
  primes stm32 parts other than f2/f4/h7 with command 0x90, CONNECTs, checks the MCU of a
  file named klipper.bin against the board, SEND_BLOCKs 64-byte blocks padded with 0xFF,
  SEND_EOF, verifies with REQUEST_BLOCK and SHA1, and always sends COMPLETE afterwards.
"scripted": the same client against an in-process simulated bootloader, so tests get the
  exact output (and failures) without any device.

Behaviour keys (all optional):
  mode               "protocol" | "scripted"
  fail               scripted faults: "connect" (silent device), "checksum", "write",
                     "block_request", "mcu_mismatch", "complete", "in_use", "open",
                     "invalid_block_size"
  blocks             scripted: flash this many 64-byte blocks (image cut/padded with 0xFF)
  mcu, version       scripted: what the simulated bootloader reports
  slow               seconds to sleep after each block (write and verify)
  hang               never return, after "Attempting to connect to bootloader"
  hang_after_blocks  never return after N blocks were written
  spawn_child        with hang*: also fork a child that hangs (default true); its pid is
                     recorded as {"prog": "flashtool", "event": "child", "child_pid": N}
  crash_after_blocks exit(1) abruptly after N blocks (no COMPLETE, no traceback)
  timeout            read timeout of every command in seconds (real tool: 2, blocks 5)
  tries              tries per command (real tool: 5, SEND_BLOCK 3)
  retry_sleep        pause after a failed try (real tool: 0.5)
  drain              seconds spent reading stale bytes after a failed try (real: 0.25)
  exit, stdout, stderr  scripted shortcut: print these and exit with "exit", no flash
Every call is appended to $KFLASHD_STANDIN_DIR/calls.jsonl (prog "flashtool").

CAN (no -d; -i IFACE, -u UUID, -r, -s, -q), with the real tool's output lines: there is no
SocketCAN here, so "the bus" is the board farm's ($KFLASHD_FARM_CANBUS, see
tests/farm/canbus.py): binding fails ("Unable to bind socket to can0") when
/sys/class/net/IFACE does not exist; the admin messages (bootloader jump, node query) and
a node's Katapult session go through the farm's socket. A USB-to-CAN bridge is found as the
real tool finds it (a 1d50:606f USB device, manufacturer "klipper", with IFACE under it,
whose serial hashes to -u), then it waits for the same USB port to come back and, with
-f, flashes it over the new tty as above. Deviations: a down interface fails the first
command at once (the real tool's sends fail and its commands time out: ~14 s); sleeps are
the real tool's (1 s after a jump, 0.5 s settle, 2 s of query answers).
"""

import argparse
import fcntl
import hashlib
import json
import logging
import os
import signal
import select
import socket
import struct
import sys
import termios
import time
import zlib

PROG = "flashtool"
DIR = os.environ.get("KFLASHD_STANDIN_DIR")

CMD = {
    "CONNECT": 0x11,
    "SEND_BLOCK": 0x12,
    "SEND_EOF": 0x13,
    "REQUEST_BLOCK": 0x14,
    "COMPLETE": 0x15,
    "GET_CANBUS_ID": 0x16,
}
ACK, NACK, CMD_ERROR, BUSY = 0xA0, 0xF1, 0xF2, 0xF3
HEADER, TRAILER = b"\x01\x88", b"\x99\x03"
KATAPULT_USB_ID = "1d50:6177"
KLIPPER_USB_ID = "1d50:614e"


class FlashError(Exception):
    pass


# ---------------------------------------------------------------- recording / behaviour


def record(**extra):
    if not DIR:
        return
    entry = {
        "prog": PROG, "argv": sys.argv[1:], "cwd": os.getcwd(), "uid": os.getuid(),
        "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
        "home": os.environ.get("HOME"), "time": time.time(), "monotonic": time.monotonic(),
        "notify_env": sorted(k for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
                             if k in os.environ),
    }
    entry.update(extra)
    fd = os.open(os.path.join(DIR, "calls.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def load_behaviour():
    if not DIR:
        return {}
    try:
        with open(os.path.join(DIR, PROG + ".json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


BEH = {}


def hang_forever():
    sys.stdout.flush()
    if BEH.get("spawn_child", True):
        pid = os.fork()
        if pid == 0:
            # A stubborn grandchild: only SIGKILL to the whole group gets rid of it.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(60)
        record(event="child", child_pid=pid)
    while True:
        time.sleep(60)


def output_line(msg):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def output(msg):
    sys.stdout.write(msg)
    sys.stdout.flush()


# ---------------------------------------------------------------- framing


def crc16(data):
    """CRC-16/MCRF4XX: reflected poly 0x8408, init 0xFFFF, no final xor."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


def build_frame(code, payload=b""):
    body = bytes([code, len(payload) // 4]) + payload
    return HEADER + body + struct.pack("<H", crc16(body)) + TRAILER


class FrameParser:
    """Splits a byte stream into frames; yields (code, payload) or ("bad", None)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf.extend(data)

    def next_frame(self):
        while True:
            start = self.buf.find(HEADER)
            if start < 0:
                del self.buf[:max(0, len(self.buf) - 1)]
                return None
            del self.buf[:start]
            if len(self.buf) < 4:
                return None
            size = 8 + self.buf[3] * 4
            if len(self.buf) < size:
                return None
            frame = bytes(self.buf[:size])
            del self.buf[:size]
            body = frame[2:-4]
            if frame[-2:] != TRAILER or struct.unpack("<H", frame[-4:-2])[0] != crc16(body):
                return ("bad", None)
            return (body[0], body[2:])


# ---------------------------------------------------------------- links


BAUDS = {int(name[1:]): getattr(termios, name) for name in dir(termios)
         if name.startswith("B") and name[1:].isdigit()}


class SerialLink:
    """The board's tty, opened raw with termios (no pyserial)."""

    def __init__(self, path, baud):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            raise FlashError("Unable to open serial port: %s" % (e,))
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            raise FlashError("Unable to open serial port: [Errno %d] Could not exclusively "
                             "lock port %s: %s" % (e.errno, path, e))
        attrs = termios.tcgetattr(self.fd)
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                   | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
                   | termios.IXOFF | termios.IXANY)
        oflag &= ~termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                   | termios.IEXTEN)
        cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB)
        cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
        # A USB CDC-ACM port ignores the line speed; a rate termios has no constant for
        # (the real tool's default 250000) is left as it is instead of a custom ioctl.
        speed = BAUDS.get(int(baud))
        if speed is not None:
            ispeed = ospeed = speed
        cc[termios.VMIN] = 0
        cc[termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW,
                          [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
        termios.tcflush(self.fd, termios.TCIOFLUSH)

    def write(self, data, timeout=5.0):
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise OSError("write timeout")
            n = os.write(self.fd, view)
            view = view[n:]

    def read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            return os.read(self.fd, 4096)
        except BlockingIOError:
            return b""

    def close(self):
        os.close(self.fd)


class SimulatedLink:
    """An in-process Katapult bootloader for scripted mode, with fault injection."""

    def __init__(self, mcu, version, fail):
        self.mcu = mcu
        self.version = version
        self.fail = fail
        self.app_start = 0x8008000
        self.block_size = 64 if fail != "invalid_block_size" else 60
        self.flash = {}
        self.pages = set()
        self.pending = bytearray()
        self.parser = FrameParser()
        self.bad_block_sent = False

    def write(self, data, timeout=5.0):
        self.parser.feed(data)
        while True:
            frame = self.parser.next_frame()
            if frame is None:
                return
            self.pending.extend(self._answer(*frame))

    def _ack(self, cmd, payload=b""):
        return build_frame(ACK, struct.pack("<I", cmd) + payload)

    def _answer(self, code, payload):
        if code == "bad":
            return build_frame(NACK)
        if self.fail == "connect":
            return b""  # a silent device
        words = struct.unpack("<%dI" % (len(payload) // 4), payload) if payload else ()
        if code == CMD["CONNECT"]:
            info = self.mcu.encode() + b"\x00"
            info += b"\x00" * (-len(info) % 4)
            ver = self.version.encode() + b"\x00"
            ver += b"\x00" * (-len(ver) % 4)
            return self._ack(code, struct.pack("<III", 0x00010100, self.app_start,
                                               self.block_size) + info + b"\x00" * 4 + ver)
        if code == CMD["SEND_BLOCK"]:
            if self.fail == "write" or len(words) != 17:
                return build_frame(CMD_ERROR)
            addr = words[0]
            self.flash[addr] = payload[4:]
            self.pages.add((addr - self.app_start) // 2048)
            return self._ack(code, struct.pack("<I", addr))
        if code == CMD["SEND_EOF"]:
            return self._ack(code, struct.pack("<I", len(self.pages)))
        if code == CMD["REQUEST_BLOCK"]:
            addr = words[0]
            data = self.flash.get(addr, b"\xff" * 64)
            if self.fail == "checksum" and not self.bad_block_sent:
                self.bad_block_sent = True
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if self.fail == "block_request":
                addr += 64
            return self._ack(code, struct.pack("<I", addr) + data)
        if code == CMD["COMPLETE"]:
            if self.fail == "complete":
                return b""
            return self._ack(code)
        return build_frame(CMD_ERROR)

    def read(self, timeout):
        data, self.pending = bytes(self.pending), bytearray()
        return data

    def close(self):
        pass


# ---------------------------------------------------------------- the client


class KatapultClient:
    def __init__(self, link, firmware_path, image, scripted):
        self.link = link
        self.firmware_path = firmware_path
        self.image = image
        self.parser = FrameParser()
        self.primed = False
        self.block_size = 64
        self.app_start = 0
        self.block_count = 0
        self.fw_sha = hashlib.sha1()
        self.klipper_dict = None
        self.timeout = BEH.get("timeout")
        self.tries = BEH.get("tries")
        self.retry_sleep = float(BEH.get("retry_sleep", 0.0 if scripted else 0.5))
        self.drain_time = float(BEH.get("drain", 0.0 if scripted else 0.25))
        if scripted and self.timeout is None:
            self.timeout = 0.0

    def check_binary(self):
        """flashtool's own MCU check needs the file named klipper.bin (case-insensitive)."""
        if os.path.basename(self.firmware_path).lower() != "klipper.bin":
            return
        data = self.image
        offset = data.find(b"\x78")
        while offset >= 0:
            try:
                raw = zlib.decompressobj().decompress(data[offset:])
                found = json.loads(raw.decode())
            except (zlib.error, ValueError, UnicodeDecodeError):
                found = None
            if isinstance(found, dict) and found.get("app") == "Klipper":
                self.klipper_dict = found
                output_line("Detected Klipper binary version %s, MCU: %s" % (
                    found.get("version", ""), found.get("config", {}).get("MCU", "")))
                return
            offset = data.find(b"\x78", offset + 1)

    def prime(self):
        # Double-buffered USB stm32 parts answer a command only when the next arrives:
        # an invalid command (answered 0xF2, discarded) gets the first reply moving.
        self.link.write(build_frame(0x90))
        self.primed = True

    def _read_frame(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            frame = self.parser.next_frame()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            data = self.link.read(remaining)
            if data:
                self.parser.feed(data)
            elif remaining <= 0:
                return None

    def send_command(self, name, payload=b"", tries=5, timeout=2.0):
        cmd = CMD[name]
        if self.tries is not None:
            tries = int(self.tries)
        if self.timeout is not None:
            timeout = float(self.timeout)
        frame = build_frame(cmd, payload)
        for attempt in range(tries):
            try:
                self.link.write(frame)
                reply = self._read_frame(timeout)
                if reply is not None and self.primed:
                    self.primed = False  # the prime's own answer
                    reply = self._read_frame(timeout)
            except OSError as e:
                logging.info("Device error on %s: %s", name, e)
                reply = None
            if reply is None:
                logging.info("Response for command %s timed out, %d tries remaining",
                             name, tries - attempt - 1)
            else:
                code, body = reply
                if code == ACK and len(body) >= 4 and struct.unpack("<I", body[:4])[0] == cmd:
                    return body[4:]
                if code == BUSY:
                    time.sleep(1.5)
                logging.info("Command %s: unexpected reply %r", name, code)
            if self.drain_time:
                end = time.monotonic() + self.drain_time
                while time.monotonic() < end:
                    self.link.read(end - time.monotonic())
            self.parser = FrameParser()
            if self.retry_sleep:
                time.sleep(self.retry_sleep)
        raise FlashError("Error sending command [%s] to Device" % (name,))

    def connect(self):
        output_line("Attempting to connect to bootloader")
        if BEH.get("hang"):
            hang_forever()
        reply = self.send_command("CONNECT")
        proto, self.app_start, self.block_size = struct.unpack("<III", reply[:12])
        proto_version = tuple(reversed(struct.pack("<I", proto)[:3]))
        if self.block_size not in (64, 128, 256, 512):
            raise FlashError("Invalid Block Size: %d" % (self.block_size,))
        mcu_info = reply[12:].rstrip(b"\x00")
        software_version = "?"
        if proto_version >= (1, 1, 0):
            parts = mcu_info.split(b"\x00", 1)
            mcu_type = parts[0].decode()
            if len(parts) == 2:
                software_version = parts[1].decode()
            else:
                output_line("Katapult build not reporting software version!")
        else:
            mcu_type = mcu_info.decode()
        output_line(
            "Katapult Connected\n"
            "Software Version: %s\n"
            "Protocol Version: %s\n"
            "Block Size: %d bytes\n"
            "Application Start: 0x%4X\n"
            "MCU type: %s" % (software_version, ".".join(str(v) for v in proto_version),
                              self.block_size, self.app_start, mcu_type))
        if self.klipper_dict is not None:
            bin_mcu = self.klipper_dict.get("config", {}).get("MCU", "")
            if bin_mcu and bin_mcu != mcu_type:
                raise FlashError(
                    "MCU returned by Katapult does not match MCU identified in klipper.bin.\n"
                    "Katapult MCU: %s\nKlipper Binary MCU: %s" % (mcu_type, bin_mcu))

    def _after_block(self, count):
        if BEH.get("slow"):
            time.sleep(float(BEH["slow"]))
        if BEH.get("crash_after_blocks") is not None and count >= int(BEH["crash_after_blocks"]):
            sys.stdout.flush()
            sys.stderr.write("stand-in flashtool: crashing after %d blocks\n" % count)
            sys.stderr.flush()
            os._exit(1)
        if BEH.get("hang_after_blocks") is not None and count >= int(BEH["hang_after_blocks"]):
            hang_forever()

    def send_file(self):
        output_line("Flashing '%s'..." % (self.firmware_path,))
        output("\n[")
        size = len(self.image)
        address = self.app_start
        last_percent = 0
        for offset in range(0, size, self.block_size):
            block = self.image[offset:offset + self.block_size]
            block += b"\xff" * (self.block_size - len(block))
            self.fw_sha.update(block)
            for _ in range(3):
                try:
                    reply = self.send_command("SEND_BLOCK", struct.pack("<I", address) + block,
                                              3, 5.0)
                except FlashError as e:
                    raise FlashError("Flash write failed, flash address 0x%4X" % (address,)) from e
                acked = struct.unpack("<I", reply[:4])[0]
                if acked == address:
                    break
                time.sleep(0.1)
            else:
                raise FlashError("Flash write failed, block address 0x%4X" % (acked,))
            address += self.block_size
            self.block_count += 1
            percent = int(self.block_count * self.block_size / float(size) * 100 + 0.5)
            if percent >= last_percent + 2:
                last_percent += 2
                output("#")
            self._after_block(self.block_count)
        pages = struct.unpack("<I", self.send_command("SEND_EOF")[:4])[0]
        output_line("]\n\nWrite complete: %d pages" % (pages,))

    def verify_file(self):
        output_line("Verifying (block count = %d)..." % (self.block_count,))
        output("\n[")
        size = len(self.image)
        read_sha = hashlib.sha1()
        last_percent = 0
        for i in range(self.block_count):
            address = self.app_start + i * self.block_size
            for _ in range(3):
                reply = self.send_command("REQUEST_BLOCK", struct.pack("<I", address))
                if struct.unpack("<I", reply[:4])[0] == address:
                    break
                time.sleep(0.1)
            else:
                output_line("Error")
                raise FlashError("Block Request Error, block: %d" % (i,))
            read_sha.update(reply[4:])
            percent = int(i * self.block_size / float(size) * 100 + 0.5)
            if percent >= last_percent + 2:
                last_percent += 2
                output("#")
            if BEH.get("slow"):
                time.sleep(float(BEH["slow"]))
        expected = self.fw_sha.hexdigest().upper()
        received = read_sha.hexdigest().upper()
        if expected != received:
            raise FlashError("Checksum mismatch: Expected %s, Received %s" % (expected, received))
        output_line("]\n\nVerification Complete: SHA = %s" % (received,))

    def finish(self):
        self.send_command("COMPLETE")


# ---------------------------------------------------------------- device checks


def holders_of(device):
    """Pids (other than ours) with the tty open; symlinks resolved on both sides."""
    try:
        target = os.stat(device)
    except OSError:
        return []
    real = os.path.realpath(device)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        fd_dir = "/proc/%s/fd" % pid
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            link = os.path.join(fd_dir, name)
            try:
                st = os.stat(link)
                path = os.readlink(link)
            except OSError:
                continue
            same = (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
            if same or os.path.realpath(path) == real:
                found.append(pid)
                break
    return found


def process_name(pid):
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            cmdline = f.read().replace(b"\x00", b" ").decode(errors="replace").strip()
        if cmdline:
            return "Command Line: %s" % cmdline
    except OSError:
        pass
    return "Name Unknown"


def usb_info(device):
    """(usb_id, manufacturer, product) from sysfs, like the real tool; empty if not USB."""
    name = os.path.basename(os.path.realpath(device))
    sys_path = os.path.join("/sys/class/tty", name)
    if not os.path.exists(sys_path):
        return "", "", ""
    path = os.path.realpath(sys_path)
    while path not in ("/", ""):
        if os.path.isfile(os.path.join(path, "devnum")) and os.path.isfile(
                os.path.join(path, "busnum")):
            break
        path = os.path.dirname(path)
    else:
        return "", "", ""

    def read(attr, default=""):
        try:
            with open(os.path.join(path, attr)) as f:
                return f.read().strip().lower()
        except OSError:
            return default

    vid, pid = read("idVendor"), read("idProduct")
    return ("%s:%s" % (vid, pid) if vid and pid else "", read("manufacturer", "unknown"),
            read("product", "unknown"))


def has_double_buffering(product):
    return product.startswith("stm32") and product[5:7] not in ("f2", "f4", "h7")


# ---------------------------------------------------------------- main


def scripted_link(klipper_dict):
    mcu = BEH.get("mcu", "stm32f446xx")
    if BEH.get("fail") == "mcu_mismatch" and "mcu" not in BEH:
        bin_mcu = (klipper_dict or {}).get("config", {}).get("MCU", "")
        mcu = "stm32f446xx" if bin_mcu == "stm32f103xe" else "stm32f103xe"
    return SimulatedLink(mcu, BEH.get("version", "v0.0.1-110-gb0bf421"), BEH.get("fail"))


def flash(args):
    device = args.device
    output_line("Connecting to Serial Device %s, baud %s" % (device, args.baud))
    firmware = os.path.abspath(os.path.expanduser(args.firmware))
    if not os.path.isfile(firmware):
        raise FlashError("Invalid firmware path '%s'" % (firmware,))
    with open(firmware, "rb") as f:
        image = f.read()
    scripted = BEH.get("mode") == "scripted"
    if scripted and BEH.get("blocks") is not None:
        size = int(BEH["blocks"]) * 64
        image = image[:size] + b"\xff" * max(0, size - len(image))
    fail = BEH.get("fail") if scripted else None

    if fail == "in_use" or not scripted:
        if not scripted and not os.path.exists(device):
            raise FlashError("No Serial Device found at %s" % (device,))
        holders = holders_of(device) if not scripted else [str(os.getppid())]
        if holders:
            output_line("Serial device %s in use by another program.\nProcess ID: %s\n"
                        "Process %s" % (device, holders[0], process_name(holders[0])))
            raise FlashError("Serial device %s in use" % (device,))

    usb_id, manufacturer, product = ("", "", "")
    if scripted:
        usb_id, manufacturer, product = KATAPULT_USB_ID, "katapult", BEH.get("mcu", "stm32f446xx")
    else:
        usb_id, manufacturer, product = usb_info(device)
    if manufacturer == "klipper" or usb_id == KLIPPER_USB_ID:
        output_line("Detected USB device running Klipper")
        raise FlashError("Device %s runs Klipper, not Katapult (this stand-in does not "
                         "request the bootloader)" % (device,))
    if manufacturer == "katapult" or usb_id == KATAPULT_USB_ID:
        output_line("Detected USB device running Katapult")
    else:
        product = ""

    client = KatapultClient(None, firmware, image, scripted)
    client.check_binary()
    if scripted:
        if fail == "open":
            raise FlashError("Unable to open serial port: [Errno 2] could not open port %s: "
                             "[Errno 2] No such file or directory: '%s'" % (device, device))
        link = scripted_link(client.klipper_dict)
    else:
        link = SerialLink(device, args.baud)
    client.link = link
    try:
        try:
            if has_double_buffering(product):
                client.prime()
            client.connect()
            client.send_file()
            client.verify_file()
        finally:
            # COMPLETE even after a failure: the board then leaves the bootloader.
            client.finish()
    finally:
        link.close()


# ---------------------------------------------------------------- CAN


GS_CAN_USB_ID = "1d50:606f"
MASK64 = (1 << 64) - 1


def _fh_mix(v):
    v ^= v >> 23
    v = (v * 0x2127599BF4325C37) & MASK64
    return v ^ (v >> 47)


def serial_to_uuid(serial):
    """fasthash64(chip id, seed 0xA16231A7), low 6 bytes most significant last (reference).

    Like the real tool it prints the hash's tail bytes (a leftover debug print in its
    fasthash64: `b'...'` on stdout whenever the chip id is not a multiple of 8 bytes)."""
    data = bytes.fromhex(serial)
    m = 0x880355F21E6D1965
    h = 0xA16231A7 ^ ((len(data) * m) & MASK64)
    n = len(data) // 8 * 8
    for i in range(0, n, 8):
        h = ((h ^ _fh_mix(struct.unpack("<Q", data[i:i + 8])[0])) * m) & MASK64
    if data[n:]:
        print(data[n:])
        sys.stdout.flush()
        h = ((h ^ _fh_mix(int.from_bytes(data[n:], "little"))) * m) & MASK64
    return _fh_mix(h) & 0xFFFFFFFFFFFF, _fh_mix(h).to_bytes(8, "little")[:6].hex()


def sysfs_usb_info(path):
    def read(name, default=""):
        try:
            with open(os.path.join(path, name)) as f:
                return f.read().strip().lower()
        except OSError:
            return default
    vid, pid = read("idVendor"), read("idProduct")
    return ("%s:%s" % (vid, pid) if vid and pid else "", read("manufacturer", "unknown"),
            read("product", "unknown"), read("serial"))


def find_bridge(iface, uuid):
    base = "/sys/bus/usb/devices"
    if not os.path.isdir(base):
        return None
    for name in sorted(os.listdir(base)):
        item = os.path.join(base, name)
        if not os.path.isfile(os.path.join(item, "bDeviceClass")):
            continue
        usb_id, mfr, _, serial = sysfs_usb_info(item)
        if usb_id != GS_CAN_USB_ID or mfr != "klipper":
            continue
        if not any(os.path.exists(os.path.join(item, sub, "net", iface))
                   for sub in os.listdir(item) if sub.startswith(name + ":")):
            continue
        if serial:
            try:
                _, found = serial_to_uuid(serial)
            except ValueError:
                output_line("Failed to convert can bridge serial number %s to a uuid for device %s"
                            % (serial, name))
                continue
            if found == uuid:
                output_line("Canbus Bridge detected at %s" % (item,))
                return item
    return None


def bus(request, keep=False):
    """One request to the farm's CAN bus; with keep, also the open connection."""
    path = os.environ.get("KFLASHD_FARM_CANBUS")
    if not path:
        raise FlashError("no CAN bus here (the stand-in needs the board farm's)")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall(json.dumps(request).encode() + b"\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        line += chunk
    reply = json.loads(line or b"{}")
    if keep and reply.get("ok"):
        return reply, conn
    conn.close()
    return reply, None


class CanLink:
    """A node's Katapult session over the farm's bus (None: the node does not answer)."""

    def __init__(self, conn):
        self.conn = conn
        if conn is not None:
            conn.setblocking(False)

    def write(self, data, timeout=5.0):
        if self.conn is not None:
            self.conn.sendall(data)

    def read(self, timeout):
        if self.conn is None:
            time.sleep(max(0.0, timeout))
            return b""
        ready, _, _ = select.select([self.conn], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            return self.conn.recv(4096)
        except BlockingIOError:
            return b""

    def close(self):
        if self.conn is not None:
            self.conn.close()


def wait_bridge_reset(bridge):
    """Returns the Katapult tty, or None (timed out / not Katapult: bootloader request only)."""
    output("Waiting for USB Reconnect.")
    for _ in range(8):
        time.sleep(0.5)
        output(".")
        usb_id, mfr, product, _ = sysfs_usb_info(bridge)
        if usb_id and usb_id != GS_CAN_USB_ID:
            time.sleep(0.5)
            output_line("done")
            output_line("Detected new USB Device: %s %s %s" % (usb_id, mfr, product))
            if mfr == "katapult" or usb_id == KATAPULT_USB_ID:
                name = os.path.basename(bridge)
                ttys = []
                for sub in os.listdir(bridge):
                    tty_dir = os.path.join(bridge, sub, "tty")
                    if sub.startswith(name + ":") and os.path.isdir(tty_dir):
                        ttys += sorted(os.listdir(tty_dir))
                if not ttys:
                    raise FlashError("Failed to locate serial tty path")
                path = "/dev/" + ttys[0]
                if not os.path.exists(path):
                    raise FlashError("Detected tty path does not exist")
                output_line("Katapult detected at serial port %s" % (path,))
                return path, False
            output_line("Device is not Katapult, exiting...")
            return None, True
    output_line("timed out")
    return None, False


def can_main(args):
    """The CAN side; returns the final line's kind ("query", "request", "status", "flash")."""
    iface = args.interface
    kind = "query" if args.query else "request" if args.request_bootloader else (
        "status" if args.status else "flash")
    uuid = None
    bridge = None
    if kind != "query":
        if args.uuid is None:
            raise FlashError("The 'uuid' option must be specified to flash a CAN device")
        uuid = "%012x" % int(args.uuid, 16)
        bridge = find_bridge(iface, uuid)
        output_line("Connecting to CAN UUID %s on interface %s" % (args.uuid, iface))
    firmware = os.path.abspath(os.path.expanduser(args.firmware))
    if kind == "flash" and not os.path.isfile(firmware):
        raise FlashError("Invalid firmware path '%s'" % (firmware,))
    if not os.path.exists(os.path.join("/sys/class/net", iface)):
        raise FlashError("Unable to bind socket to %s" % (iface,))
    if kind in ("flash", "request"):
        output_line("Sending bootloader jump command...")
        reply, _ = bus({"op": "jump", "iface": iface, "uuid": uuid})
        if not reply.get("ok"):
            logging.info("Socket Write Error, closing")
        if bridge is not None:
            tty, not_katapult = wait_bridge_reset(bridge)
            if kind == "request" or not_katapult:
                return "request"
            if tty is None:
                raise FlashError("Failed to locate serial tty path")
            args.device = tty
            flash(args)
            return "flash"
        time.sleep(1.0)
        if kind == "request":
            return kind
    output_line("Resetting all bootloader node IDs...")
    time.sleep(0.5)
    if kind == "query":
        output_line("Checking for Katapult nodes...")
        reply, _ = bus({"op": "query", "iface": iface})
        time.sleep(2.0)
        for node_uuid, app in reply.get("nodes", []):
            output_line("Detected UUID: %s, Application: %s" % (node_uuid, app))
        return kind
    reply, conn = bus({"op": "connect", "iface": iface, "uuid": uuid}, keep=True)
    if reply.get("error") in ("down", "missing"):
        raise FlashError("Error sending command [CONNECT] to Device")
    image = b""
    if os.path.isfile(firmware):
        with open(firmware, "rb") as f:
            image = f.read()
    client = KatapultClient(CanLink(conn), firmware, image, False)
    client.check_binary()
    time.sleep(0.5)
    try:
        try:
            client.connect()
            output_line("Verifying canbus connection")
            found = client.send_command("GET_CANBUS_ID")[:6]
            if found.hex() != uuid:
                raise FlashError("UUID mismatch (%d vs %d)" % (int(uuid, 16), int(found.hex() or "0", 16)))
            if kind == "flash":
                client.send_file()
                client.verify_file()
        finally:
            if kind == "flash":
                client.finish()
    finally:
        client.link.close()
    return kind


FINAL_LINES = {"query": "CANBus UUID Query Complete", "request": "Bootloader Request Complete",
               "status": "Status Request Complete", "flash": "Programming Complete"}


def main():
    global BEH
    BEH = load_behaviour()
    parser = argparse.ArgumentParser(description="Katapult Flash Tool (kflashd test stand-in)")
    parser.add_argument("-d", "--device", metavar="<serial device>")
    parser.add_argument("-b", "--baud", metavar="<baud rate>", default=250000)
    parser.add_argument("-i", "--interface", default="can0")
    parser.add_argument("-f", "--firmware", default="~/klipper/out/klipper.bin")
    parser.add_argument("-u", "--uuid")
    parser.add_argument("-q", "--query", action="store_true")
    parser.add_argument("-r", "--request-bootloader", action="store_true")
    parser.add_argument("-s", "--status", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    try:
        with open(os.path.expanduser(args.firmware), "rb") as f:
            fw_sha = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        fw_sha = None
    record(mode=BEH.get("mode", "protocol"), device=args.device, firmware=args.firmware,
           firmware_sha256=fw_sha, baud=str(args.baud), interface=args.interface, uuid=args.uuid, can_query=args.query,
           can_request=args.request_bootloader, can_status=args.status)
    if "exit" in BEH:
        sys.stdout.write(BEH.get("stdout", ""))
        sys.stderr.write(BEH.get("stderr", ""))
        return int(BEH["exit"])
    kind = "flash"
    try:
        if args.device is None:
            kind = can_main(args)
        else:
            if args.status or args.request_bootloader:
                raise FlashError("The stand-in flashtool supports flashing only over serial (no -s/-r)")
            flash(args)
    except Exception:
        logging.exception("Flash Tool Error")
        return 1
    output_line(FINAL_LINES[kind])
    return 0


if __name__ == "__main__":
    sys.exit(main())
