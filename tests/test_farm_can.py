"""The farm's USB-to-CAN bridge and CAN bus, seen through kflashd's own udev monitor.

kflashd's BoardMonitor runs in a child under the umockdev preload (real pyudev, real
netlink uevents) and prints what it yields; the test drives the farm: a bridge appears as
USB 606f with its can0, the link goes down and up, the CAN reboot request brings the
bridge back on USB as Katapult at the same port.
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
from typing import Any, Dict, Iterator

import pytest

from tests.farm.client import REPO_ROOT, BoardFarm
from tests.farm.fixtures import farm  # noqa: F401

BRIDGE = "3A0029000851313433383932"
BRIDGE_UUID = "802399d9469c"

MONITOR = r"""
import json, select
from kflashd.devices import BoardMonitor
m = BoardMonitor()
boards = m.start()
print(json.dumps({"start": [b.to_dict() for b in boards],
                  "interfaces": {k: v.to_dict() for k, v in m.interfaces.items()}}), flush=True)
while True:
    select.select([m.fileno()], [], [])
    for action, board in m.poll():
        iface = m.interface(board.device_node) if action == "net" else None
        print(json.dumps({"action": action, "board": board.to_dict(),
                          "interface": iface.to_dict() if iface else None}), flush=True)
"""


class Monitor:
    def __init__(self, farm: BoardFarm) -> None:  # noqa: F811
        env = {**os.environ, **farm.env, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", MONITOR], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.buf = b""

    def next(self, timeout: float = 10.0) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no event from kflashd's monitor"
            if select.select([self.proc.stdout], [], [], remaining)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, self.proc.stderr.read().decode() if self.proc.stderr else "monitor died"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def until(self, predicate, timeout: float = 10.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(0.1, deadline - time.monotonic()))
            if predicate(event):
                return event

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)


@pytest.fixture
def monitor(farm: BoardFarm) -> Iterator[Monitor]:  # noqa: F811
    farm.add_bridge(BRIDGE)
    m = Monitor(farm)
    yield m
    m.close()


def bus_request(farm: BoardFarm, request: Dict[str, Any]) -> Dict[str, Any]:  # noqa: F811
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(farm.canbus)
        conn.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(conn.makefile().readline())


def test_bridge_is_a_board_with_its_interface(farm: BoardFarm, monitor: Monitor) -> None:  # noqa: F811
    start = monitor.next()
    (bridge,) = start["start"]
    assert bridge["mode"] == "can_bridge" and bridge["serial"] == BRIDGE
    assert bridge["interface"] == "can0" and bridge["port_path"] == "1-1.1"
    assert start["interfaces"]["can0"]["up"] is True
    assert start["interfaces"]["can0"]["bridge_serial"] == BRIDGE

    farm.set_link("can0", False)
    event = monitor.until(lambda e: e.get("action") == "net")
    assert event["board"]["interface"] == "can0" and event["board"]["serial"] == BRIDGE
    assert event["interface"]["up"] is False and event["interface"]["operstate"] == "down"
    assert bus_request(farm, {"op": "query", "iface": "can0"}) == {"ok": False, "error": "down"}
    farm.set_link("can0", True)
    assert monitor.until(lambda e: e.get("action") == "net")["interface"]["up"] is True


def test_can_reboot_request_brings_the_bridge_back_as_katapult(farm: BoardFarm, monitor: Monitor) -> None:  # noqa: F811
    monitor.next()
    assert bus_request(farm, {"op": "jump", "iface": "can0", "uuid": "0e0d81e4210c"}) == {"ok": True, "bridge": False}
    assert bus_request(farm, {"op": "jump", "iface": "can0", "uuid": BRIDGE_UUID}) == {"ok": True, "bridge": True}
    gone = monitor.until(lambda e: e.get("action") == "remove")
    assert gone["board"]["mode"] == "can_bridge"
    back = monitor.until(lambda e: e.get("action") == "add")
    assert back["board"]["mode"] == "katapult" and back["board"]["serial"] == BRIDGE
    assert back["board"]["port_path"] == "1-1.1"  # the same USB port
    assert back["board"]["device_node"].startswith("/dev/ttyACM")
    assert bus_request(farm, {"op": "query", "iface": "can0"}) == {"ok": False, "error": "missing"}
