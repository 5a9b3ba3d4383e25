"""A CAN printer end to end: a USB-to-CAN bridge mainboard and a toolhead on its bus.

No SocketCAN here: the bus is the farm's (tests/farm/canbus.py), reached by the stand-in
flashtool.py's CAN side. What is real: the daemon, pyudev under umockdev seeing the bridge
as USB 1d50:606f with its `net` child can0 (operstate/flags, uevents), the bridge's
re-enumeration as Katapult USB, the Katapult protocol to the toolhead node, Klipper's API.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import MCU, Printer, padded
from tests.e2e.harness import wait_until
from tests.farm.fixtures import write_printer_state
from tests.farm.images import make_dict, make_image

pytestmark = pytest.mark.e2e

BRIDGE_SERIAL = "3A0029000851313433383932"
BRIDGE_UUID = "802399d9469c"  # Katapult's own function gives this for the serial above
EBB_UUID = "0e0d81e4210c"
EBB_MCU = "stm32g0b1xx"
NEW = "v0.13.0-130-gcanbus"
OLD = "v0.12.0-1-gold"


def build(tmp_path, name: str, mcu: str, version: str = NEW, seed: int = 3):
    out = tmp_path / f"{name}-out"
    out.mkdir()
    (out / "klipper.bin").write_bytes(make_image(mcu=mcu, version=version, size=3000, seed=seed))
    (out / "klipper.dict").write_text(make_dict(mcu=mcu, version=version))
    return out / "klipper.bin"


def can_printer(make_daemon, farm, standins, bridge_mode: str = "klipper", toolhead: bool = True, **options):
    """Bridge mainboard (+ EBB toolhead on can0), "Klipper" configured with both by UUID."""
    farm.add_bridge(BRIDGE_SERIAL, mcu=MCU, mode=bridge_mode, version=OLD)
    # katapult = true: the bridge may be sent to its bootloader (--now) before kflashd has
    # seen it in Katapult.
    boards = {"octopus": {"serial": BRIDGE_SERIAL, "mcu": MCU, "katapult": True}}
    mcus = {"mcu": {"canbus_uuid": BRIDGE_UUID}}
    if toolhead:
        farm.add_can_node(EBB_UUID, mcu=EBB_MCU, version=OLD)
        boards["ebb"] = {"canbus_uuid": EBB_UUID, "mcu": EBB_MCU}
        mcus["mcu EBB"] = {"canbus_uuid": EBB_UUID}
    daemon = make_daemon(boards=boards, **options)
    write_printer_state(daemon.printer_state, idle_timeout="Ready", mcus=mcus)
    printer = Printer(standins, daemon)
    printer.start()
    wait_until(lambda: printer.running, 10, "the fake Klipper to run")
    return daemon, printer


def flashtool_calls(standins):
    return [c for c in standins.calls("flashtool") if c.get("event") != "child"]


def started_cycles(daemon) -> int:
    return daemon.log().count("flash started:")


def test_devices_lists_the_bridge_and_the_toolhead_with_their_bus(make_daemon, farm, standins):
    daemon, _ = can_printer(make_daemon, farm, standins)
    devices = {d["name"]: d for d in daemon.ctl_json("devices")}
    assert devices["octopus"]["mode"] == "can_bridge"
    assert devices["octopus"]["interface"] == "can0"
    assert devices["octopus"]["canbus_uuid"] == BRIDGE_UUID
    assert devices["octopus"]["interface_state"] == "up"
    assert devices["ebb"]["mode"] == "can_node"
    assert devices["ebb"]["interface_state"] == "up"
    farm.set_link("can0", False)
    wait_until(lambda: {d["name"]: d for d in daemon.ctl_json("devices")}["ebb"]["interface_state"] == "down",
               10, "can0 shown down")
    text = daemon.ctl("devices").stdout
    assert "on can0: down" in text and "bus can0: down" in text, text


def test_bridge_in_katapult_is_flashed_and_comes_back_as_a_bridge(make_daemon, farm, standins, tmp_path):
    daemon, printer = can_printer(make_daemon, farm, standins, bridge_mode="katapult", toolhead=False)
    image = build(tmp_path, "octopus", MCU)
    result = daemon.ctl("queue", "octopus", str(image), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["state"] == "done", job["message"]
    info = farm.board(BRIDGE_SERIAL)
    assert info["present"] and info["mode"] == "klipper" and info["device_node"] is None  # 606f, no tty
    assert farm.flashed_image(BRIDGE_SERIAL, len(padded(image.read_bytes()))) == padded(image.read_bytes())
    # Proof through the [mcu] whose canbus_uuid is the bridge's (derived from its serial).
    assert job["version_confirmed"] is True, job
    assert job["mcu_version_after"] == NEW
    assert printer.running


def test_bridge_running_klipper_is_sent_to_katapult_over_its_bus(make_daemon, farm, standins, tmp_path):
    daemon, printer = can_printer(make_daemon, farm, standins, toolhead=False)
    image = build(tmp_path, "octopus", MCU)
    result = daemon.ctl("queue", "octopus", str(image), "--now", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["state"] == "done", job["message"]
    assert job["version_confirmed"] is True, job
    calls = flashtool_calls(standins)
    assert [c["argv"][:5] for c in calls][0] == ["-i", "can0", "-u", BRIDGE_UUID, "-r"], calls
    assert "usb-katapult_" in calls[1]["device"], calls  # then over USB, as Katapult
    assert farm.board(BRIDGE_SERIAL)["bootloader_requests"] == 1
    assert farm.board(BRIDGE_SERIAL)["history"] == ["bridge:can0", "katapult:ttyACM0", "bridge:can0"]
    # Its arrival as 6177 during that cycle started no second one.
    assert started_cycles(daemon) == 1, daemon.log()
    assert standins.systemctl_verbs().count("stop") == 1
    assert printer.running


def test_toolhead_is_flashed_through_the_bridge(make_daemon, farm, standins, tmp_path):
    daemon, printer = can_printer(make_daemon, farm, standins)
    image = build(tmp_path, "ebb", EBB_MCU)
    result = daemon.ctl("queue", "ebb", str(image), "--now", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["state"] == "done", job["message"]
    data = image.read_bytes()
    assert farm.can_flashed_image(EBB_UUID, len(padded(data))) == padded(data)
    node = farm.can_node(EBB_UUID)
    assert node["mode"] == "klipper" and node["jumps"] == 1 and node["running_version"] == NEW
    assert job["version_confirmed"] is True, job  # from "mcu EBB", not the bridge's "mcu"
    flash = [c for c in flashtool_calls(standins) if c.get("firmware_sha256")]
    assert flash[-1]["argv"][:4] == ["-i", "can0", "-u", EBB_UUID], flash
    assert farm.board(BRIDGE_SERIAL)["bootloader_requests"] == 0  # the bridge was not touched
    verbs = standins.systemctl_verbs()
    assert verbs.count("stop") == 1 and verbs[-1] == "start", verbs
    assert printer.running


def test_bus_down_refuses_before_klipper_is_touched(make_daemon, farm, standins, tmp_path):
    daemon, printer = can_printer(make_daemon, farm, standins)
    farm.set_link("can0", False)
    image = build(tmp_path, "ebb", EBB_MCU)
    result = daemon.ctl("queue", "ebb", str(image), "--now")
    assert result.returncode == 0, result.stdout + result.stderr
    fix = "can0 is down: bring it up (ip link set can0 up type can bitrate 1000000)"
    assert fix in result.stdout + result.stderr
    job_id = daemon.ctl_json("list")[0]["id"]
    wait_until(lambda: fix in daemon.job(job_id)["message"], 10, "the job saying why it waits")
    assert standins.systemctl_verbs() == ["start"]  # only the test's own start: Klipper untouched
    assert flashtool_calls(standins) == []
    assert printer.running
    # The bus comes up: the job runs at once.
    farm.set_link("can0", True)
    job = daemon.wait_job(job_id, ["done", "failed"], timeout=60)
    assert job["state"] == "done", job["message"]


def test_toolhead_goes_before_the_bridge_carrying_its_bus(make_daemon, farm, standins, tmp_path):
    daemon, printer = can_printer(make_daemon, farm, standins)
    mcus = {"mcu": {"canbus_uuid": BRIDGE_UUID}, "mcu EBB": {"canbus_uuid": EBB_UUID}}
    # Printing while both are queued (the bridge first), so neither can start before both are in.
    write_printer_state(daemon.printer_state, print_stats="printing", idle_timeout="Printing", mcus=mcus)
    bridge_job = daemon.queue("octopus", str(build(tmp_path, "octopus", MCU)), "--now")
    ebb_job = daemon.queue("ebb", str(build(tmp_path, "ebb", EBB_MCU, seed=5)), "--now")
    write_printer_state(daemon.printer_state, idle_timeout="Ready", mcus=mcus)
    first = daemon.wait_job(ebb_job, ["done", "failed"], timeout=60)
    second = daemon.wait_job(bridge_job, ["done", "failed"], timeout=60)
    assert first["state"] == "done" and second["state"] == "done", (first, second)
    assert first["updated"] < second["updated"]
    order = [c["uuid"] for c in flashtool_calls(standins) if c.get("uuid")]
    assert order[0] == EBB_UUID and BRIDGE_UUID in order, order
    assert printer.running


def test_bridge_landing_in_its_rom_bootloader_is_a_failure_that_says_so(make_daemon, farm, standins, tmp_path):
    # No Katapult on the bridge: the CAN reboot request lands in the STM32 ROM DFU
    # (0483:df11). flashtool says "Device is not Katapult, exiting..." and exits 0.
    farm.add_bridge(BRIDGE_SERIAL, mcu=MCU, version=OLD, no_katapult=True)
    # Configured as running Katapult (wrongly): the request is sent, and lands in the ROM.
    daemon = make_daemon(boards={"octopus": {"serial": BRIDGE_SERIAL, "mcu": MCU, "katapult": True}})
    write_printer_state(daemon.printer_state, idle_timeout="Ready", mcus={"mcu": {"canbus_uuid": BRIDGE_UUID}})
    printer = Printer(standins, daemon)
    printer.start()
    result = daemon.ctl("queue", "octopus", str(build(tmp_path, "octopus", MCU)), "--now", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["state"] == "failed"
    assert "not Katapult (0483:df11" in job["message"] and "power-cycled" in job["message"], job["message"]
    assert farm.board(BRIDGE_SERIAL)["in_dfu"]
    assert [c for c in flashtool_calls(standins) if c.get("firmware_sha256") and not c.get("can_request")] == []
    verbs = standins.systemctl_verbs()
    assert verbs.count("stop") == 1 and verbs[-1] == "start", verbs
    wait_until(lambda: printer.running, 10, "Klipper running again")


def test_toolhead_in_katapult_that_is_another_mcu_is_refused_before_the_stop(make_daemon, farm, standins, tmp_path):
    # The node waits in Katapult (a flash that never finished, or a double-tap); no `mcu`
    # in its table, so only Katapult's own answer (-s) can tell it is an rp2040.
    farm.add_bridge(BRIDGE_SERIAL, mcu=MCU, version=OLD)
    farm.add_can_node(EBB_UUID, mcu="rp2040", mode="katapult")
    daemon = make_daemon(boards={"ebb": {"canbus_uuid": EBB_UUID}})
    Printer(standins, daemon).start()
    result = daemon.ctl("queue", "ebb", str(build(tmp_path, "ebb", EBB_MCU)), "--now", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert "built for stm32g0b1xx but the CAN node 0e0d81e4210c is rp2040" in job["message"], job["message"]
    assert "Klipper was not touched" in job["message"]
    assert [c["argv"][-1] for c in flashtool_calls(standins)] == ["-q", "-s"]
    assert standins.systemctl_verbs() == ["start"]  # the test's own start only
    assert farm.can_node(EBB_UUID)["blocks_received"] == 0


def test_toolhead_running_klipper_that_is_another_mcu_gets_nothing_written(make_daemon, farm, standins, tmp_path):
    # Running Klipper, the node answers no -s; with no `mcu` in its table the check is
    # flashtool's own, right after the jump, before the first block: nothing is written and
    # COMPLETE sends the node back to its old firmware.
    farm.add_bridge(BRIDGE_SERIAL, mcu=MCU, version=OLD)
    old = make_image(mcu="rp2040", version=OLD, size=2000, seed=9)
    farm.add_can_node(EBB_UUID, mcu="rp2040", old_image=old)
    daemon = make_daemon(boards={"ebb": {"canbus_uuid": EBB_UUID}})
    printer = Printer(standins, daemon)
    printer.start()
    result = daemon.ctl("queue", "ebb", str(build(tmp_path, "ebb", EBB_MCU)), "--now", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert "Katapult MCU: rp2040 Klipper Binary MCU: stm32g0b1xx" in job["message"], job["message"]
    node = farm.can_node(EBB_UUID)
    assert node["blocks_received"] == 0 and node["mode"] == "klipper", node
    assert farm.can_flashed_image(EBB_UUID, len(old)) == old
    wait_until(lambda: printer.running, 10, "Klipper running again")


def test_bridge_with_its_bus_down_is_refused_before_the_stop(make_daemon, farm, standins, tmp_path):
    daemon, printer = can_printer(make_daemon, farm, standins, toolhead=False)
    farm.set_link("can0", False)
    result = daemon.ctl("queue", "octopus", str(build(tmp_path, "octopus", MCU)), "--now", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["message"].startswith("can0 is down: bring it up (ip link set can0 up type can bitrate 1000000)")
    assert "double-tap" in job["message"] and "Klipper was not touched" in job["message"]
    assert standins.systemctl_verbs() == ["start"] and flashtool_calls(standins) == []
    assert farm.board(BRIDGE_SERIAL)["bootloader_requests"] == 0
    assert printer.running
