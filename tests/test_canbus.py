"""CAN facts kflashd computes itself: bridge UUIDs, interface state, queue order, config keys."""

from __future__ import annotations

import pytest

from kflashd import canbus
from kflashd.config import load_config
from kflashd.errors import ConfigError
from kflashd.models import MODE_BRIDGE, Board, Job


@pytest.mark.parametrize("serial, uuid", [
    # Computed with Katapult's own convert_usbsn_to_uuid (flashtool.py).
    ("3A0029000851313433383932", "802399d9469c"),
    ("1F0043000F51333231393630", "d0558565c5d5"),
])
def test_bridge_uuid_from_serial_matches_katapult(serial, uuid):
    assert canbus.uuid_from_serial(serial) == uuid
    assert canbus.uuid_from_serial(serial.lower()) == uuid  # flashtool lower-cases sysfs' serial


def test_uuid_from_a_serial_that_is_no_chip_id():
    assert canbus.uuid_from_serial("not-hex") is None
    assert canbus.uuid_from_serial("") is None


@pytest.mark.parametrize("flags, operstate, up", [
    ("0x40081", "up", True),   # ip link set can0 up, bus running
    ("0x1", "unknown", True),  # up; some drivers never report an operstate
    ("0x80", "down", False),   # ip link set can0 down
    ("0x1", "down", False),    # up, but the controller went bus-off / no carrier
    ("garbage", "up", False),
])
def test_interface_is_up(flags, operstate, up):
    assert canbus.is_up(flags, operstate) is up


def test_read_interface_from_sysfs(tmp_path):
    (tmp_path / "can0").mkdir()
    (tmp_path / "can0" / "operstate").write_text("down\n")
    (tmp_path / "can0" / "flags").write_text("0x80\n")
    down = canbus.read_interface("can0", str(tmp_path))
    assert down.present and not down.up
    assert canbus.down_message(down) == "can0 is down: bring it up (ip link set can0 up type can bitrate 1000000)"
    missing = canbus.read_interface("can1", str(tmp_path))
    assert missing.state == "missing" and "can1 does not exist" in canbus.down_message(missing)
    assert not canbus.read_interface("../etc", str(tmp_path)).present


def write_config(tmp_path, boards: str):
    path = tmp_path / "kflashd.toml"
    path.write_text(boards)
    return load_config(str(path))


CAN_PRINTER = """
[boards.octopus]
serial = "3A0029000851313433383932"
mcu = "stm32f446xx"
[boards.ebb]
canbus_uuid = "0e0d81e4210c"
mcu = "stm32g0b1xx"
[boards.sb2209]
canbus_uuid = "aabbccddeeff"
canbus_interface = "can1"
[boards.pico]
serial = "E6616407E3246B29"
"""


def job(serial: str, n: int) -> Job:
    return Job(id=f"j{n}", selector=serial, serial=serial, board_name=None, image_sha256="0" * 64,
               image_size=1, created=float(n))


def test_config_can_boards(tmp_path):
    config = write_config(tmp_path, CAN_PRINTER)
    ebb = config.boards["ebb"]
    assert ebb.serial is None and ebb.canbus_uuid == "0e0d81e4210c" and ebb.canbus_interface == "can0"
    assert canbus.can_board(config, "0E0D81E4210C") is ebb
    assert config.boards["sb2209"].canbus_interface == "can1"
    assert canbus.rides_on(config, "0e0d81e4210c") == "can0"
    assert canbus.rides_on(config, "3A0029000851313433383932") is None


@pytest.mark.parametrize("table, error", [
    ('canbus_uuid = "0e0d81e4210"', "12 lower-case hex digits"),
    ('canbus_uuid = "0e0d81e4210c"\ncanbus_interface = "../x"', "interface name"),
    ('mcu = "rp2040"', "serial .a USB board. or canbus_uuid"),
])
def test_config_refuses_bad_can_keys(tmp_path, table, error):
    with pytest.raises(ConfigError, match=error):
        write_config(tmp_path, f"[boards.x]\n{table}\n")


def test_toolheads_go_before_the_bridge_carrying_their_bus(tmp_path):
    config = write_config(tmp_path, CAN_PRINTER)
    bridge = Board(serial="3A0029000851313433383932", mode=MODE_BRIDGE, mcu="stm32f446xx",
                   device_node="can0", sys_path="/sys/devices/usb1/1-1.1", interface="can0")
    jobs = [job("3A0029000851313433383932", 1), job("E6616407E3246B29", 2), job("0e0d81e4210c", 3)]
    ordered = canbus.order_jobs(jobs, config, [bridge])
    assert [j.id for j in ordered] == ["j2", "j3", "j1"]
    # The bridge carries can0 only: a toolhead on can1 does not hold it back.
    jobs = [job("3A0029000851313433383932", 1), job("aabbccddeeff", 2)]
    assert [j.id for j in canbus.order_jobs(jobs, config, [bridge])] == ["j1", "j2"]
    # Nothing on CAN: the queue's own order.
    jobs = [job("E6616407E3246B29", 1), job("3A0029000851313433383932", 2)]
    assert [j.id for j in canbus.order_jobs(jobs, config, [bridge])] == ["j1", "j2"]


def test_parse_query_and_rom_bootloader_lines():
    out = ("Resetting all bootloader node IDs...\nChecking for Katapult nodes...\n"
           "Detected UUID: 0e0d81e4210c, Application: Katapult\n"
           "Detected UUID: aabbccddeeff, Application: Klipper\nCANBus UUID Query Complete\n")
    assert canbus.parse_query(out) == {"0e0d81e4210c": "Katapult", "aabbccddeeff": "Klipper"}
    dfu = ("Waiting for USB Reconnect...done\nDetected new USB Device: 0483:df11 stmicroelectronics "
           "stm32  bootloader\nDevice is not Katapult, exiting...\nBootloader Request Complete\n")
    assert canbus.in_rom_bootloader(dfu)
    assert "0483:df11" in canbus.rom_bootloader_message("3A00", dfu)
