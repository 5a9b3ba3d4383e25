"""The board farm under umockdev, seen from outside the way kflashd will see it.

Every check runs in a child process started with ``farm.env`` (the umockdev preload), using
real pyudev, real netlink uevents and real tty opens; the test process itself never runs
under the preload.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.farm.client import REPO_ROOT, BoardFarm, FarmError, wait_until
from tests.farm.fixtures import farm, fake_klipper_argv, write_klipper_unit, write_printer_state  # noqa: F401
from tests.farm.images import make_image

SN1 = "3A0029000851313433383932"
SN2 = "1B0034000E51373330333138"

MONITOR_SCRIPT = r"""
import json, pyudev, sys
ctx = pyudev.Context()
mon = pyudev.Monitor.from_netlink(ctx)
mon.filter_by("tty")
mon.start()
print(json.dumps({"ready": True}), flush=True)
for dev in iter(mon.poll, None):
    usb = None
    if dev.action != "remove":
        parent = dev.find_parent("usb", "usb_device")
        usb = {k: parent.attributes.asstring(k) for k in
               ("idVendor", "idProduct", "manufacturer", "product", "serial", "busnum", "devnum")}
    print(json.dumps({"action": dev.action, "node": dev.device_node, "sys_path": dev.sys_path,
                      "props": dict(dev.properties), "links": sorted(dev.device_links), "usb": usb}),
          flush=True)
"""


def child_env(farm: BoardFarm) -> Dict[str, str]:
    return {**os.environ, **farm.env, "PYTHONPATH": str(REPO_ROOT)}


def run_child(farm: BoardFarm, script: str, *args: str, timeout: float = 30) -> str:
    """Run a Python snippet under the farm's preload; returns stdout, fails with stderr."""
    proc = subprocess.run([sys.executable, "-c", script, *args], env=child_env(farm), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}\n{farm.log_text()}"
    return proc.stdout


class UdevWatcher:
    """A pyudev netlink monitor in a child process; events come back as JSON lines."""

    def __init__(self, farm: BoardFarm) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", MONITOR_SCRIPT], env=child_env(farm),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.buf = b""
        assert self.next_event(timeout=15) == {"ready": True}

    def next_event(self, timeout: float = 5.0) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no udev event within {timeout} s")
            if select.select([self.proc.stdout], [], [], remaining)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"monitor died: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def events(self, count: int, timeout: float = 5.0) -> List[Dict[str, Any]]:
        return [self.next_event(timeout) for _ in range(count)]

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)


@pytest.fixture
def watcher(farm: BoardFarm) -> Iterator[UdevWatcher]:  # noqa: F811
    w = UdevWatcher(farm)
    yield w
    w.close()


def assert_tty_identity(event: Dict[str, Any], serial: str, mode: str) -> None:
    vid, pid, mfr = {"katapult": ("1d50", "6177", "katapult"), "klipper": ("1d50", "614e", "Klipper")}[mode]
    props = event["props"]
    id_serial = f"{mfr}_stm32f446xx_{serial}"
    assert props["SUBSYSTEM"] == "tty"
    assert props["DEVNAME"] == event["node"] and event["node"].startswith("/dev/ttyACM")
    assert props["MAJOR"] == "166" and props["MINOR"] == event["node"][len("/dev/ttyACM"):]
    assert (props["ID_VENDOR_ID"], props["ID_MODEL_ID"]) == (vid, pid)
    assert props["ID_VENDOR"] == mfr and props["ID_MODEL"] == "stm32f446xx"
    assert props["ID_SERIAL"] == id_serial and props["ID_SERIAL_SHORT"] == serial
    assert props["ID_USB_INTERFACE_NUM"] == "00"
    by_id = f"/dev/serial/by-id/usb-{id_serial}-if00"
    by_path = f"/dev/serial/by-path/{props['ID_PATH']}"
    assert sorted(props["DEVLINKS"].split()) == sorted([by_id, by_path]) == event["links"]
    if event["usb"] is not None:
        assert event["usb"]["idVendor"] == vid and event["usb"]["idProduct"] == pid
        assert event["usb"]["manufacturer"] == mfr and event["usb"]["product"] == "stm32f446xx"
        assert event["usb"]["serial"] == serial


def test_board_appears_to_pyudev_with_udev_properties(farm: BoardFarm, watcher: UdevWatcher) -> None:  # noqa: F811
    started = time.monotonic()
    info = farm.add_board(SN1)
    assert time.monotonic() - started < 1.0
    event = watcher.next_event()
    assert event["action"] == "add" and event["node"] == info["device_node"]
    assert_tty_identity(event, SN1, "katapult")
    assert event["sys_path"] == info["sys_path"]
    # Enumeration, sysfs the way flashtool.py reads it, and the by-id link all work.
    out = run_child(farm, r"""
import json, os, pyudev, sys
ctx = pyudev.Context()
devs = [d for d in ctx.list_devices(subsystem="tty") if d.properties.get("ID_VENDOR_ID") == "1d50"]
sysfs = os.path.realpath("/sys/class/tty/" + os.path.basename(sys.argv[1]))
usb = os.path.dirname(os.path.dirname(os.path.dirname(sysfs)))
attrs = {k: open(os.path.join(usb, k)).read().strip() for k in ("idVendor", "idProduct", "manufacturer", "busnum", "devnum")}
print(json.dumps({"nodes": [d.device_node for d in devs], "attrs": attrs,
                  "by_id": os.path.realpath(sys.argv[2])}))
""", info["device_node"], info["by_id"])
    seen = json.loads(out)
    assert seen["nodes"] == [info["device_node"]]
    assert seen["attrs"]["idProduct"] == "6177" and seen["attrs"]["manufacturer"] == "katapult"
    assert seen["by_id"] == info["device_node"]


def test_two_boards_at_once_and_unplug_emits_remove(farm: BoardFarm, watcher: UdevWatcher) -> None:  # noqa: F811
    one = farm.add_board(SN1, mode="katapult")
    two = farm.add_board(SN2, mode="klipper")
    added = watcher.events(2)
    assert [e["props"]["ID_SERIAL_SHORT"] for e in added] == [SN1, SN2]
    assert_tty_identity(added[1], SN2, "klipper")
    assert one["device_node"] != two["device_node"] and one["usb_sys_path"] != two["usb_sys_path"]
    assert one["by_path"] != two["by_path"]
    farm.unplug(SN1)
    removed = watcher.next_event()
    assert removed["action"] == "remove" and removed["node"] == one["device_node"]
    assert removed["props"]["ID_SERIAL_SHORT"] == SN1
    out = run_child(farm, "import pyudev; print([d.device_node for d in pyudev.Context().list_devices(subsystem='tty')])")
    assert out.strip() == repr([two["device_node"]])
    # Plugging back in takes the next ttyACM number (umockdev cannot reuse a node name).
    again = farm.plug(SN1)
    event = watcher.next_event()
    assert event["action"] == "add" and event["node"] == again["device_node"] != one["device_node"]
    assert_tty_identity(event, SN1, "katapult")
    with pytest.raises(FarmError, match="already plugged in"):
        farm.plug(SN1)
    with pytest.raises(FarmError, match="no board with serial"):
        farm.unplug("NOPE")


def test_1200_baud_reboots_klipper_board_into_katapult(farm: BoardFarm, watcher: UdevWatcher) -> None:  # noqa: F811
    info = farm.add_board(SN1, mode="klipper")
    watcher.next_event()
    # A 1200-baud touch, as a host does it: the board may reboot (and its tty vanish, EIO)
    # while pyserial is still opening it, which a host ignores. Whether it rebooted is what
    # the uevents below prove.
    run_child(farm, r"""
import serial, sys, termios
try:
    serial.Serial(sys.argv[1], 1200).close()
except (serial.SerialException, termios.error, OSError):
    pass
""", info["by_id"])
    removed, added = watcher.events(2)
    assert removed["action"] == "remove" and removed["props"]["ID_MODEL_ID"] == "614e"
    assert added["action"] == "add"
    assert_tty_identity(added, SN1, "katapult")
    board = farm.wait_for_mode(SN1, "katapult")
    assert board["bootloader_requests"] == 1
    assert board["device_node"] == added["node"] != info["device_node"]
    assert board["by_path"] == info["by_path"]  # same USB port: the by-path name is stable


def test_complete_boots_the_flashed_image_as_klipper(farm: BoardFarm, watcher: UdevWatcher) -> None:  # noqa: F811
    old = make_image(version="v0.11.0-old", size=40000, seed=5)
    info = farm.add_board(SN1, old_image=old, page_size=16384)
    watcher.next_event()
    image = make_image(version="v0.13.0-42-gdeadbee", size=5000, seed=9)
    image_path = Path(farm.log_path).parent / "klipper.bin"
    image_path.write_bytes(image)
    out = run_child(farm, r"""
import os, sys
from tests.test_katapult_emulator import KatapultHost
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
import tty; tty.setraw(fd)
host = KatapultHost(fd)
host.write(host.frame(0x90)); host.reply()
info = host.connect()
pages = host.flash(open(sys.argv[2], "rb").read())
print(info["version"], pages, host.command(0x15)[0])
""", info["device_node"], str(image_path))
    assert out.split() == ["v0.0.1-110-gb0bf421", "1", str(0xA0)]
    removed, added = watcher.events(2)
    assert removed["action"] == "remove" and removed["node"] == info["device_node"]
    assert_tty_identity(added, SN1, "klipper")
    board = farm.wait_for_mode(SN1, "klipper")
    assert board["boots"] == 1 and board["blocks_received"] == 79 and board["last_complete"]
    assert board["running_version"] == "v0.13.0-42-gdeadbee"
    flashed = farm.flashed_image(SN1, 40000)
    assert flashed[:5000] == image
    assert flashed[5000:16384] == b"\xff" * (16384 - 5000)
    assert flashed[16384:] == old[16384:]


def test_refuse_boot_keeps_the_bootloader_device(farm: BoardFarm) -> None:  # noqa: F811
    info = farm.add_board(SN1)
    farm.set_fault(SN1, "refuse_boot")
    assert farm.board(SN1)["fault"] == {"name": "refuse_boot", "params": {}}
    out = run_child(farm, r"""
import os, sys, tty
from tests.test_katapult_emulator import KatapultHost
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY); tty.setraw(fd)
host = KatapultHost(fd)
print(host.command(0x15)[0])
host.write(host.frame(0x11))
print(host.silent_for(0.3))
""", info["device_node"])
    assert out.split() == [str(0xA0), "True"]
    board = farm.board(SN1)
    assert board["mode"] == "katapult" and board["present"] and board["boots"] == 0
    with pytest.raises(FarmError, match="unknown fault"):
        farm.set_fault(SN1, "melt")


class ApiClient:
    """Talks to the fake Klipper's API socket like kflashd's print guard would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def send(self, message: Dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\x03")

    def receive(self, timeout: float = 3.0) -> Optional[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while b"\x03" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\x03", 1)
        return json.loads(raw)

    def query(self, req_id: int = 1) -> Optional[Dict[str, Any]]:
        self.send({"id": req_id, "method": "objects/query", "params": {"objects": {
            "print_stats": ["state"], "idle_timeout": ["state"], "webhooks": ["state"], "mcu": ["mcu_version"]}}})
        return self.receive()

    def close(self) -> None:
        self.sock.close()


def pts_of(farm: BoardFarm, node: str) -> str:
    return os.readlink(os.path.join(farm.root_dir, "dev", os.path.basename(node)))


def holds(pid: int, pts: str) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            if os.readlink(entry) == pts:
                return True
        except OSError:
            continue
    return False


def test_fake_klipper_holds_ports_and_answers_api(farm: BoardFarm, tmp_path: Path) -> None:  # noqa: F811
    image = make_image(version="v0.13.0-7-gfeedbee", size=3000, seed=1)
    klipper_board = farm.add_board(SN1, mode="klipper", old_image=image)
    katapult_board = farm.add_board(SN2, mode="katapult")
    sock_path = str(tmp_path / "klippy.sock")
    state = tmp_path / "printer.json"
    write_printer_state(state)
    log = tmp_path / "fake-klipper.log"
    proc = subprocess.Popen(fake_klipper_argv(sock_path, state, log), env=child_env(farm),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        for board in (klipper_board, katapult_board):
            pts = pts_of(farm, board["device_node"])
            wait_until(lambda: holds(proc.pid, pts), timeout=10, what=f"fake Klipper holding {board['device_node']}")
        # flashtool.py's "in use" check (stat of the node vs. /proc/*/fd) sees it, as on a real host.
        out = run_child(farm, r"""
import os, sys
dev = os.stat(sys.argv[1])
pid = sys.argv[2]
hits = [e for e in os.listdir(f"/proc/{pid}/fd")
        if (lambda st: (st.st_dev, st.st_ino))(os.stat(f"/proc/{pid}/fd/{e}")) == (dev.st_dev, dev.st_ino)]
print(len(hits))
""", katapult_board["device_node"], str(proc.pid))
        assert out.strip() == "1"
        wait_until(lambda: os.path.exists(sock_path), timeout=10, what="API socket")
        api = ApiClient(sock_path)
        try:
            def ready() -> Optional[Dict[str, Any]]:
                reply = api.query()
                assert reply is not None, "no reply to objects/query"
                status = reply["result"]["status"]
                return status if status["webhooks"]["state"] == "ready" else None
            status = wait_until(ready, timeout=10, what="fake Klipper ready")
            assert status == {"print_stats": {"state": "standby"}, "idle_timeout": {"state": "Idle"},
                              "webhooks": {"state": "ready"}, "mcu": {"mcu_version": "v0.13.0-7-gfeedbee"}}
            write_printer_state(state, print_stats="printing", idle_timeout="Printing")
            status = api.query(2)["result"]["status"]
            assert status["print_stats"]["state"] == "printing" and status["idle_timeout"]["state"] == "Printing"
            # No id: no reply; the next reply belongs to the next request.
            api.send({"method": "objects/query", "params": {"objects": {"webhooks": None}}})
            api.send({"id": 3, "method": "nope/nope", "params": {}})
            assert api.receive() == {"id": 3, "error": {"error": "WebRequestError",
                                                        "message": "webhooks: No registered callback for path 'nope/nope'"}}
            write_printer_state(state, hang=True)
            api.send({"id": 4, "method": "objects/query", "params": {"objects": {"webhooks": None}}})
            assert api.receive(timeout=0.5) is None  # accepts, never answers
        finally:
            api.close()
        # The board going away is noticed: the port is released.
        pts = pts_of(farm, klipper_board["device_node"])
        farm.unplug(SN1)
        wait_until(lambda: not holds(proc.pid, pts), timeout=10, what="port released after unplug")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not os.path.exists(sock_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        print(log.read_text() if log.exists() else "(no fake klipper log)")


def test_write_klipper_unit(tmp_path: Path) -> None:
    path = write_klipper_unit(tmp_path / "standin", tmp_path / "k.sock", tmp_path / "state.json",
                              unit="klipper.service")
    assert path == tmp_path / "standin" / "units" / "klipper.exec"
    argv = json.loads(path.read_text())
    assert argv[0] == sys.executable and argv[1].endswith("tests/farm/fake_klipper.py")
    assert argv[2:] == ["-a", str(tmp_path / "k.sock"), "--state-file", str(tmp_path / "state.json")]
    # the unit file `systemctl show` reads carries the same command line, -a and all
    unit = (tmp_path / "standin" / "units" / "klipper.service").read_text()
    assert f"ExecStart={' '.join(argv)}\n" in unit


def test_controller_rejects_bad_requests_without_dying(farm: BoardFarm) -> None:  # noqa: F811
    with pytest.raises(FarmError, match="unknown op"):
        farm.request("explode")
    with pytest.raises(FarmError, match="bad mode"):
        farm.add_board(SN1, mode="dfu")
    with pytest.raises(FarmError, match="unexpected keyword"):
        farm.request("board", serial=SN1, colour="red")
    assert farm.request("ping")["root_dir"] == farm.root_dir
