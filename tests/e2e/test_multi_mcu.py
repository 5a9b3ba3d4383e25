"""A printer with a toolhead board: proof of a flash comes from the MCU that was flashed.

Klipper reports each MCU's firmware as its own object ("mcu", "mcu EBB"); which one is
which board follows from configfile's settings (each section's `serial`). The fake Klipper
here is configured like printer.cfg with [mcu] on the mainboard and [mcu EBB] on the
toolhead board, both by their Klipper-mode by-id links.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import MCU, SERIAL, Printer
from tests.e2e.harness import wait_until
from tests.farm.fixtures import write_printer_state
from tests.farm.images import make_dict, make_image

pytestmark = pytest.mark.e2e

EBB_SERIAL = "E6616407E3246B29"
EBB_MCU = "rp2040"
MAIN_VERSION = "v0.13.0-120-gmainbrd"
EBB_OLD_VERSION = "v0.12.0-3-gold"
NEW_VERSION = "v0.13.0-121-gtoolhd"


def toolhead_image(tmp_path, version: str = NEW_VERSION):
    out = tmp_path / "ebb-out"
    out.mkdir()
    (out / "klipper.bin").write_bytes(make_image(mcu=EBB_MCU, version=version, size=4000, seed=11))
    (out / "klipper.dict").write_text(make_dict(mcu=EBB_MCU, version=version))
    return out / "klipper.bin"


def printer_with_toolhead(make_daemon, farm, standins, main_version: str = MAIN_VERSION, ebb_by_path: bool = False,
                          **options):
    """Main board and toolhead board running Klipper, "Klipper" configured with both.

    [mcu EBB]'s serial is the toolhead's by-id link, or with `ebb_by_path` its by-path link.
    """
    farm.add_board(serial=SERIAL, mcu=MCU, mode="klipper", version=main_version)
    ebb = farm.add_board(serial=EBB_SERIAL, mcu=EBB_MCU, mode="klipper", version=EBB_OLD_VERSION)
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL, "mcu": MCU, "katapult": True},
                                 "ebb": {"serial": EBB_SERIAL, "mcu": EBB_MCU, "katapult": True}}, **options)
    assert ebb["by_path"].startswith("/dev/serial/by-path/"), ebb
    ebb_spec = {"serial": EBB_SERIAL, "path": ebb["by_path"]} if ebb_by_path else EBB_SERIAL
    write_printer_state(daemon.printer_state, idle_timeout="Ready", mcus={"mcu": SERIAL, "mcu EBB": ebb_spec})
    printer = Printer(standins, daemon)
    printer.start()
    wait_until(lambda: printer.running, 10, "the fake Klipper to run")
    return daemon, printer


def test_toolhead_flash_is_confirmed_by_its_own_mcu(make_daemon, farm, standins, tmp_path):
    daemon, printer = printer_with_toolhead(make_daemon, farm, standins)
    image = toolhead_image(tmp_path)

    started = time.monotonic()
    result = daemon.ctl("queue", "ebb", str(image), "--now", "--wait")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["state"] == "done", job["message"]
    assert job["version_confirmed"] is True, job
    assert job["mcu_version_after"] == NEW_VERSION
    assert f"Klipper reports firmware {NEW_VERSION}" in result.stdout
    # Confirmed as soon as Klipper answered, not after the reboot timeout's 10 s wait for a
    # version that never comes (what asking only "mcu" did).
    assert elapsed < 10, elapsed
    assert farm.board(EBB_SERIAL)["running_version"] == NEW_VERSION
    assert farm.board(SERIAL)["running_version"] == MAIN_VERSION  # the mainboard was not touched
    assert farm.board(SERIAL)["bootloader_requests"] == 0
    assert printer.running


def test_main_board_version_is_not_taken_for_the_toolheads(make_daemon, farm, standins, tmp_path):
    # The mainboard already runs exactly the build being flashed to the toolhead (the usual
    # case: one Klipper tree, two builds). The toolhead's new firmware never boots, so
    # nothing may confirm the flash; reading "mcu" would.
    daemon, printer = printer_with_toolhead(make_daemon, farm, standins, main_version=NEW_VERSION,
                                            timeouts={"reboot": 0})
    farm.set_fault(EBB_SERIAL, "refuse_boot")
    image = toolhead_image(tmp_path)

    result = daemon.ctl("queue", "ebb", str(image), "--now", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr  # written; reboot not awaited
    job = daemon.ctl_json("history")[0]
    assert job["state"] == "done", job["message"]
    assert job["version_confirmed"] is False, job
    assert job["mcu_version_after"] is None, job
    assert farm.board(EBB_SERIAL)["mode"] == "katapult"
    assert farm.board(SERIAL)["running_version"] == NEW_VERSION
    wait_until(lambda: printer.running, 10, "Klipper running again")


def test_mainboard_flash_with_a_toolhead_configured(make_daemon, farm, standins, tmp_path):
    # The other way round: the mainboard is flashed and confirmed through "mcu", while the
    # toolhead keeps its old firmware.
    daemon, printer = printer_with_toolhead(make_daemon, farm, standins)
    out = tmp_path / "main-out"
    out.mkdir()
    (out / "klipper.bin").write_bytes(make_image(mcu=MCU, version=NEW_VERSION, size=5000, seed=12))
    (out / "klipper.dict").write_text(make_dict(mcu=MCU, version=NEW_VERSION))

    result = daemon.ctl("queue", "octopus", str(out / "klipper.bin"), "--now", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["version_confirmed"] is True, job
    assert job["mcu_version_after"] == NEW_VERSION
    assert farm.board(EBB_SERIAL)["running_version"] == EBB_OLD_VERSION
    assert printer.running


def test_toolhead_configured_by_its_usb_port(make_daemon, farm, standins, tmp_path):
    # [mcu EBB] serial: /dev/serial/by-path/...: the board is matched by the port it sits on.
    daemon, printer = printer_with_toolhead(make_daemon, farm, standins, ebb_by_path=True)
    image = toolhead_image(tmp_path)

    result = daemon.ctl("queue", "ebb", str(image), "--now", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["version_confirmed"] is True, job
    assert job["mcu_version_after"] == NEW_VERSION
