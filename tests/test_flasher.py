"""flash_device(): Katapult first, the guarded make flash fallback, timeouts, progress, errors."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pty
import pwd
import select
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from kflashd import flasher, proc
from kflashd.errors import DiscoveryError
from tests.standins.fixtures import FLASHTOOL, KATAPULT_DIR, Standins, pid_alive, standins, wait_until
from tests.support import public

__all__ = ["standins"]

DEVICE = "/dev/ttyACM0"  # scripted mode never opens it
KATAPULT = str(KATAPULT_DIR)

# stderr of the real flashtool.py against a silent device (docs/katapult-protocol.md), verbatim
# but for the file paths: the root cause is the first exception of the chain.
REAL_CONNECT_FAILURE = """ERROR:root:Flash Tool Error
Traceback (most recent call last):
  File "/home/pi/katapult/scripts/flashtool.py", line 1076, in run
    await flasher.connect_btl()
  File "/home/pi/katapult/scripts/flashtool.py", line 407, in send_command
    raise FlashError("Error sending command [%s] to Device" % (cmdname))
FlashError: Error sending command [CONNECT] to Device

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/home/pi/katapult/scripts/flashtool.py", line 1104, in main
    await sock.run()
  File "/home/pi/katapult/scripts/flashtool.py", line 407, in send_command
    raise FlashError("Error sending command [%s] to Device" % (cmdname))
FlashError: Error sending command [COMPLETE] to Device
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "staged.bin"
    path.write_bytes(os.urandom(5000))
    return path


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir that an unprivileged user can enter (pytest's tmp_path is root-only)."""
    yield from public.open_dir("kflashd-tree-")


def klipper_tree(base: Path, content: bytes, owner: str = "nobody") -> Path:
    tree = base / "klipper"
    (tree / "out").mkdir(parents=True)
    (tree / "out" / "klipper.bin").write_bytes(content)
    entry = pwd.getpwnam(owner)
    for path in (tree, tree / "out", tree / "out" / "klipper.bin"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return tree


def test_katapult_first_and_alone_on_success(standins: Standins, image: Path) -> None:
    standins.set("flashtool", {"mode": "scripted"})
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, None)
    assert result.success and result.method == "katapult" and result.error_message is None
    assert result.elapsed_seconds > 0
    assert [c["prog"] for c in standins.calls()] == ["flashtool"]
    call = standins.calls("flashtool")[0]
    assert call["argv"][:2] == ["-d", DEVICE] and "-b" not in call["argv"]
    # flashtool.py checks the image against the board only for a file named klipper.bin
    assert os.path.basename(call["firmware"]) == "klipper.bin"
    assert call["firmware"] != str(image)
    assert call["firmware_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert not os.path.exists(call["firmware"])  # the private copy is gone afterwards


def test_baud_passed_only_when_configured(standins: Standins, image: Path) -> None:
    standins.set("flashtool", {"mode": "scripted"})
    assert flasher.flash_device(DEVICE, str(image), KATAPULT, None, baud=250000).success
    argv = standins.calls("flashtool")[0]["argv"]
    assert argv[argv.index("-b") + 1] == "250000"


def test_make_flash_only_after_katapult_fails(
    standins: Standins, image: Path, shared_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    tree = klipper_tree(shared_tmp, image.read_bytes())
    seen: List[Tuple[str, int]] = []
    with caplog.at_level(logging.INFO):
        result = flasher.flash_device(
            DEVICE, str(image), KATAPULT, str(tree), progress=lambda p, v: seen.append((p, v))
        )
    assert result.success and result.method == "make_flash", result
    # flashtool, then make's "is out/klipper.bin up to date?" question, then make flash.
    assert [(c["prog"], c.get("query")) for c in standins.calls()] == [
        ("flashtool", None), ("make", True), ("make", False)]
    make = standins.calls("make", query=False)[0]
    # NOSUDO=1: Klipper's flash_usb.py must never call sudo from the sandboxed unit.
    assert make["argv"] == ["NOSUDO=1", f"FLASH_DEVICE={DEVICE}", "flash"]
    assert make["cwd"] == str(tree)
    assert make["monotonic"] > standins.calls("flashtool")[0]["monotonic"]
    assert "Katapult failed, trying make flash..." in caplog.text
    assert ("make_flash", 0) in seen


def test_no_make_flash_when_tree_image_differs(
    standins: Standins, image: Path, shared_tmp: Path
) -> None:
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    tree = klipper_tree(shared_tmp, b"another build")
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, str(tree))
    assert not result.success
    assert standins.calls("make") == []
    assert "differs from the image being flashed" in (result.error_message or "")
    assert "Error sending command [CONNECT] to Device" in (result.error_message or "")


def test_no_make_flash_when_make_would_rebuild_first(
    standins: Standins, image: Path, shared_tmp: Path
) -> None:
    """Same bytes in out/klipper.bin, but .config changed since: make flash would rebuild."""
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    standins.set("make", {"stale": True})
    tree = klipper_tree(shared_tmp, image.read_bytes())
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, str(tree))
    assert not result.success
    assert [c["targets"] for c in standins.calls("make")] == [["out/klipper.bin"]]
    assert standins.calls("make", query=False) == []
    assert "older than the tree's .config or sources" in (result.error_message or "")


def test_no_make_flash_without_tree(standins: Standins, image: Path, tmp_path: Path) -> None:
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, str(tmp_path / "nope"))
    assert not result.success and result.method == "katapult"
    assert "fallback unavailable" in (result.error_message or "")
    assert standins.calls("make") == []


def test_both_failing_reports_both_errors(
    standins: Standins, image: Path, shared_tmp: Path
) -> None:
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    standins.set("make", {"exit": 2})
    tree = klipper_tree(shared_tmp, image.read_bytes())
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, str(tree))
    assert not result.success and result.method == "make_flash"
    message = result.error_message or ""
    assert "Katapult: Error sending command [CONNECT] to Device" in message
    assert "make flash: Unable to find serial 'by-path' folder" in message
    assert "\n" not in message


def test_make_runs_as_tree_owner(standins: Standins, image: Path, shared_tmp: Path) -> None:
    standins.set("flashtool", {"mode": "scripted", "fail": "write"})
    tree = klipper_tree(shared_tmp, image.read_bytes(), owner="nobody")
    assert flasher.flash_device(DEVICE, str(image), KATAPULT, str(tree)).success
    make = standins.calls("make", query=False)[0]
    nobody = pwd.getpwnam("nobody")
    assert (make["uid"], make["gid"]) == (nobody.pw_uid, nobody.pw_gid)
    assert make["home"] == nobody.pw_dir
    assert make["uid"] != 0


def test_root_owned_tree_runs_make_as_root(
    standins: Standins, image: Path, shared_tmp: Path
) -> None:
    """A tree that root owns is built as root anyway: make flash there runs as root (the
    tree's owner), which is no escalation; it is not refused."""
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    tree = klipper_tree(shared_tmp, image.read_bytes(), owner="root")
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, str(tree))
    assert result.success and result.method == "make_flash", result
    assert [c["uid"] for c in standins.calls("make")] == [0, 0]


def test_read_only_tree_names_the_fix(standins: Standins, image: Path, shared_tmp: Path) -> None:
    """Klipper's flash target builds lib/hidflash (STM32) or lib/rp2040_flash first: under a
    unit that keeps the tree read-only that fails, and the message says how to fix it."""
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    standins.set("make", {"exit": 2, "stderr": (
        "/usr/bin/ld: cannot open output file hid-flash: Read-only file system\n"
        "make: *** [src/stm32/Makefile:103: lib/hidflash/hid-flash] Error 2\n")})
    tree = klipper_tree(shared_tmp, image.read_bytes())
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, str(tree))
    assert not result.success
    assert "Read-only file system" in (result.error_message or "")
    assert "run `sudo ./install.sh` again" in (result.error_message or "")


def test_gone_device_gets_no_tool(standins: Standins, image: Path) -> None:
    """Right before a tool is started the path must still lead to the board."""
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, None, device_present=lambda: False)
    assert not result.success and "nothing was written" in (result.error_message or "")
    assert standins.calls() == []


def test_hung_flashtool_killed_with_children_at_timeout(standins: Standins, image: Path) -> None:
    standins.set("flashtool", {"mode": "scripted", "hang": True, "spawn_child": True})
    started = time.monotonic()
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, None, timeout=1.5)
    took = time.monotonic() - started
    assert not result.success
    assert "timed out after 1.5 s" in (result.error_message or "")
    assert "Attempting to connect to bootloader" in (result.error_message or "")
    assert 1.4 < took < 1.5 + proc.KILL_GRACE + 3
    tool_pid = standins.calls("flashtool")[0]["pid"]
    children = standins.child_pids("flashtool")
    assert children, "the hung stand-in should have recorded its child"
    wait_until(lambda: not pid_alive(tool_pid) and not any(pid_alive(p) for p in children))


def test_hung_make_flash_killed_with_children(
    standins: Standins, image: Path, shared_tmp: Path
) -> None:
    standins.set("flashtool", {"mode": "scripted", "fail": "connect"})
    standins.set("make", {"hang": True})
    tree = klipper_tree(shared_tmp, image.read_bytes())
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, str(tree), timeout=1)
    assert not result.success and "make flash timed out" in (result.error_message or "")
    pids = [standins.calls("make", query=False)[0]["pid"]] + standins.child_pids("make")
    assert len(pids) == 2
    wait_until(lambda: not any(pid_alive(p) for p in pids))


def test_abort_kills_the_tool_promptly(standins: Standins, image: Path) -> None:
    standins.set("flashtool", {"mode": "scripted", "hang": True})
    abort = threading.Event()
    abort_time: List[float] = []

    def abort_once_running() -> None:  # a loaded machine may take a while to start python
        wait_until(lambda: standins.calls("flashtool"), timeout=30)
        abort_time.append(time.monotonic())
        abort.set()

    threading.Thread(target=abort_once_running, daemon=True).start()
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, None, timeout=60, abort=abort)
    assert abort.is_set() and not result.success
    assert time.monotonic() - abort_time[0] < 10
    assert "interrupted" in (result.error_message or "")
    pids = [standins.calls("flashtool")[0]["pid"]] + standins.child_pids("flashtool")
    wait_until(lambda: not any(pid_alive(p) for p in pids))


def test_progress_increases_for_multi_block_image(standins: Standins, image: Path) -> None:
    standins.set("flashtool", {"mode": "scripted", "blocks": 300})
    seen: List[Tuple[str, int]] = []
    result = flasher.flash_device(
        DEVICE, str(image), KATAPULT, None, progress=lambda p, v: seen.append((p, v))
    )
    assert result.success
    write = [v for p, v in seen if p == "write"]
    verify = [v for p, v in seen if p == "verify"]
    assert write == sorted(set(write)) and verify == sorted(set(verify))
    assert write[0] == 0 and write[-1] == 100 and len(write) > 20
    assert verify[0] == 0 and verify[-1] == 100 and len(verify) > 20
    assert seen.index(("write", 100)) < seen.index(("verify", 0))


def test_progress_arrives_while_the_tool_runs(standins: Standins, image: Path) -> None:
    """Marks come without newlines: they must be seen before the tool ends."""
    standins.set("flashtool", {"mode": "scripted", "blocks": 200, "hang_after_blocks": 60})
    seen: List[Tuple[str, int]] = []
    abort = threading.Event()

    def progress(phase: str, percent: int) -> None:
        seen.append((phase, percent))
        if percent >= 20:
            abort.set()

    result = flasher.flash_device(
        DEVICE, str(image), KATAPULT, None, progress=progress, abort=abort, timeout=30
    )
    assert abort.is_set(), seen
    assert not result.success and "interrupted" in (result.error_message or "")
    assert max(v for _, v in seen) < 100


def test_progress_for_small_image_counts_blocks(standins: Standins, tmp_path: Path) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(1000))  # 16 blocks: 16 marks in write, 15 in verify
    standins.set("flashtool", {"mode": "scripted"})
    seen: List[Tuple[str, int]] = []
    assert flasher.flash_device(
        DEVICE, str(small), KATAPULT, None, progress=lambda p, v: seen.append((p, v))
    ).success
    write = [v for p, v in seen if p == "write"]
    # one mark per block: percent = marks / blocks, 100 only at the closing bracket
    assert write == [0] + [min(99, k * 100 // 16) for k in range(1, 17)] + [100]


@pytest.mark.parametrize(
    "fail, expected",
    [
        ("connect", "Error sending command [CONNECT] to Device"),
        ("checksum", "Checksum mismatch: Expected "),
        ("write", "Error sending command [SEND_BLOCK] to Device"),
        ("block_request", "Block Request Error, block: 0"),
        ("in_use", f"Serial device {DEVICE} in use"),
    ],
)
def test_error_message_is_the_one_line_root_cause(
    standins: Standins, image: Path, fail: str, expected: str
) -> None:
    standins.set("flashtool", {"mode": "scripted", "fail": fail})
    result = flasher.flash_device(DEVICE, str(image), KATAPULT, None)
    message = result.error_message or ""
    assert message.startswith("Katapult: " + expected), message
    assert "\n" not in message and "Traceback" not in message and "\x00" not in message


def test_mcu_mismatch_joined_in_one_line(standins: Standins, tmp_path: Path) -> None:
    import json
    import zlib

    identify = json.dumps({"app": "Klipper", "version": "v0.13.0", "config": {"MCU": "rp2040"}})
    fw = tmp_path / "build.bin"
    fw.write_bytes(os.urandom(300) + zlib.compress(identify.encode()) + os.urandom(300))
    standins.set("flashtool", {"mode": "scripted", "fail": "mcu_mismatch"})
    result = flasher.flash_device(DEVICE, str(fw), KATAPULT, None)
    assert result.error_message == (
        "Katapult: MCU returned by Katapult does not match MCU identified in klipper.bin. "
        "Katapult MCU: stm32f103xe Klipper Binary MCU: rp2040; make flash fallback "
        "unavailable: no Klipper tree configured (klipper.dir)"
    )


def test_root_cause_of_real_output() -> None:
    assert flasher.root_cause(REAL_CONNECT_FAILURE) == "Error sending command [CONNECT] to Device"
    assert flasher.root_cause("Software Version: \x00\x00oops\nValueError: bad\x00 baud") == (
        "bad baud"
    )
    assert flasher.root_cause("just a line\nlast words\n") == "last words"


def test_children_get_no_notify_env(
    standins: Standins, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/x")
    monkeypatch.setenv("WATCHDOG_USEC", "5")
    standins.set("flashtool", {"mode": "scripted"})
    assert flasher.flash_device(DEVICE, str(image), KATAPULT, None).success
    assert standins.calls("flashtool")[0]["notify_env"] == []


def test_verify_device_path(tmp_path: Path) -> None:
    flasher.verify_device_path("/dev/null")
    link = tmp_path / "usb-katapult_stm32f446xx_3A00-if00"
    link.symlink_to(tmp_path / "ttyACM7")  # a by-id link whose tty vanished
    with pytest.raises(DiscoveryError, match=f"Device no longer connected: {link}"):
        flasher.verify_device_path(str(link))


# ---- the protocol-mode client against a throwaway bootloader on a pty -------------------


def _simulated_bootloader():
    spec = importlib.util.spec_from_file_location("standin_flashtool", FLASHTOOL)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pty_bootloader() -> Iterator[Tuple[str, object]]:
    """A pty whose master end answers like Katapult (the stand-in's own simulated device)."""
    module = _simulated_bootloader()
    master, slave = pty.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    os.close(slave)
    device = module.SimulatedLink("stm32f446xx", "v0.0.1-110-gb0bf421", None)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # no slave open yet: EIO
                time.sleep(0.01)
                continue
            device.write(data)
            reply = device.read(0)
            if reply:
                os.write(master, reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield name, device
    stop.set()
    thread.join(timeout=5)
    os.close(master)


def test_protocol_mode_flashes_a_pty_bootloader(
    standins: Standins, image: Path, pty_bootloader: Tuple[str, object]
) -> None:
    name, device = pty_bootloader
    seen: List[Tuple[str, int]] = []
    result = flasher.flash_device(
        name, str(image), KATAPULT, None, baud=115200, progress=lambda p, v: seen.append((p, v))
    )
    assert result.success, result
    data = image.read_bytes()
    written = b"".join(device.flash[a] for a in sorted(device.flash))  # type: ignore[attr-defined]
    assert written[: len(data)] == data and set(written[len(data):]) <= {0xFF}
    assert ("write", 100) in seen and ("verify", 100) in seen


def test_protocol_mode_refuses_a_tty_in_use(
    standins: Standins, image: Path, pty_bootloader: Tuple[str, object]
) -> None:
    name, _ = pty_bootloader
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; f = open({name!r}, 'rb'); time.sleep(60)"]
    )
    try:
        wait_until(lambda: any(
            os.path.realpath(os.path.join(f"/proc/{holder.pid}/fd", fd)) == name
            for fd in os.listdir(f"/proc/{holder.pid}/fd")
        ))
        result = flasher.flash_device(name, str(image), KATAPULT, None, baud=115200)
    finally:
        holder.kill()
        holder.wait()
    assert not result.success
    assert result.error_message.startswith(f"Katapult: Serial device {name} in use")


def test_protocol_mode_silent_device_times_out_quickly(
    standins: Standins, image: Path
) -> None:
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    standins.set("flashtool", {"timeout": 0.1, "retry_sleep": 0, "drain": 0})
    try:
        result = flasher.flash_device(name, str(image), KATAPULT, None, baud=115200)
    finally:
        os.close(master)
    assert result.error_message.startswith("Katapult: Error sending command [CONNECT] to Device")
