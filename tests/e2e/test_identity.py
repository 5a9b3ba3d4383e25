"""Which board is which: boards that share a USB serial, and the paths the flash tools get.

Boards built without the chip id all report the serial 12345. Two of them on one printer
must never be confused: a job is matched by serial and USB port, and a job that names only
the shared serial is refused, at queue time and when the second board shows up later.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.conftest import MCU, Printer

pytestmark = pytest.mark.e2e

SHARED = "12345"


def port_of(board: dict) -> str:
    """The USB port path as udev (and `kflashctl devices`) name it, e.g. "1-1.3"."""
    return os.path.basename(board["usb_sys_path"])


def flashed(farm, name: str, image: bytes) -> bool:
    return farm.flashed_image(name, len(image)) == image


def test_shared_serial_is_refused_and_a_port_picks_the_board(make_daemon, farm, standins, image):
    left = farm.add_board(serial=SHARED, name="left", mcu=MCU, mode="klipper")
    right = farm.add_board(serial=SHARED, name="right", mcu=MCU, mode="klipper")
    daemon = make_daemon(boards={"left": {"serial": SHARED, "port": port_of(left)}})
    Printer(standins, daemon).start()

    # `kflashctl devices` shows the port that tells them apart (what `port` wants).
    devices = daemon.ctl("devices").stdout
    assert "PORT" in devices and port_of(left) in devices and port_of(right) in devices, devices

    # By the serial alone: which of the two? Refused, and the message says how to name it.
    refused = daemon.ctl("queue", SHARED, str(image))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "ambiguous board '12345'" in refused.stderr and "by-path" in refused.stderr
    assert daemon.ctl_json("list") == []

    # By name (serial + port): only that board is touched, though both sit in Katapult.
    farm.reset("right", mode="katapult")
    job_id = daemon.queue("left", str(image))
    farm.reset("left", mode="katapult")
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "done", job["message"]
    data = image.read_bytes()
    assert flashed(farm, "left", data)
    assert not flashed(farm, "right", data)
    assert farm.board("right")["connects"] == 0 and farm.board("right")["mode"] == "katapult"
    # The tools were given a link that leads to left's node, not right's.
    flashtool = standins.calls("flashtool")[0]["argv"]
    device = flashtool[flashtool.index("-d") + 1]
    assert device.startswith("/dev/serial/"), device
    assert port_of(right) != port_of(left)


def test_a_second_board_with_the_serial_makes_a_waiting_job_fail(make_daemon, farm, standins, image):
    """Queued by serial while one board is connected, the job waits; when a second board
    with that serial appears in Katapult, the job must not flash it (it may be the wrong
    one): it fails as ambiguous, and neither board is written."""
    farm.add_board(serial=SHARED, name="first", mcu=MCU, mode="klipper")
    daemon = make_daemon()
    printer = Printer(standins, daemon)
    printer.start()
    job_id = daemon.queue(SHARED, str(image))
    assert daemon.job(job_id)["state"] == "queued"

    farm.add_board(serial=SHARED, name="second", mcu=MCU, mode="katapult")
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "failed"
    assert "ambiguous board '12345'" in job["message"], job["message"]
    data = image.read_bytes()
    assert not flashed(farm, "first", data) and not flashed(farm, "second", data)
    assert farm.board("second")["connects"] == 0
    assert standins.calls("flashtool") == [] and printer.running
