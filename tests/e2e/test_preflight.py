"""The image must fit the board, and a board is sent to its bootloader only if it runs Katapult.

Real daemon, real pyudev under umockdev, the Katapult emulator answering CONNECT with its
application start; images with the vector table a Klipper build has (reset handler 5/8 into
the image, as in a real STM32F446 build).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.conftest import MCU, SERIAL, Printer, wait_for_board_facts
from tests.e2e.harness import wait_until
from tests.farm.images import make_image

pytestmark = pytest.mark.e2e

OLD_VERSION = "v0.12.0-old"
# A real Klipper STM32F446 build is ~44 KiB: its 64 KiB build's reset vector lies past the
# end of the image when placed at 32 KiB, its 32 KiB build's lies below a 64 KiB start.
SIZE = 44516


def write(daemon, name: str, data: bytes):
    path = daemon.workdir / name / "klipper.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def facts(daemon) -> dict:
    path = daemon.state_dir / "boards.json"
    return json.loads(path.read_text())["boards"] if path.exists() else {}


def learnt(daemon, serial: str = SERIAL) -> dict:
    return wait_for_board_facts(daemon, serial)


@pytest.mark.parametrize("board_start, image_base, built, board_text", [
    (0x8008000, 0x08010000, "built for 0x08010000 (64 KiB bootloader)", "0x08008000 (32 KiB bootloader)"),
    (0x8010000, 0x08008000, "built for 0x08008000 (32 KiB bootloader)", "0x08010000 (64 KiB bootloader)"),
], ids=["64k-image-on-32k-board", "32k-image-on-64k-board"])
def test_image_for_another_offset_is_refused_before_klipper_is_touched(
        make_daemon, farm, standins, board_start, image_base, built, board_text):
    daemon = make_daemon()
    printer = Printer(standins, daemon)
    printer.start()
    wrong = write(daemon, "wrong", make_image(mcu=MCU, size=SIZE, seed=3, link_base=image_base))
    job_id = daemon.queue(SERIAL, str(wrong))  # the board was never seen: checked at plug-in
    verbs_before = standins.systemctl_verbs()

    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult", app_start=board_start)
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "failed"
    assert built in job["message"] and board_text in job["message"], job["message"]
    assert standins.systemctl_verbs() == verbs_before  # Klipper never stopped
    assert standins.calls("flashtool") == []
    board = farm.board(SERIAL)
    assert board["blocks_received"] == 0 and board["completes"] == 0
    assert board["mode"] == "katapult" and board["connects"] >= 1  # read, left where it was
    assert printer.running
    # What the board said is remembered: the next wrong image is refused at queue time.
    assert learnt(daemon)["app_start"] == board_start
    again = daemon.ctl("queue", SERIAL, str(wrong))
    assert again.returncode == 2 and built in again.stderr, again.stderr
    # The right image goes through.
    right = write(daemon, "right", make_image(mcu=MCU, size=SIZE, seed=4, link_base=board_start))
    result = daemon.ctl("queue", SERIAL, str(right), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr


def test_now_is_checked_against_remembered_offset_before_klipper_stops(make_daemon, farm, standins):
    old = make_image(mcu=MCU, version=OLD_VERSION, size=8000, seed=1)
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult", old_image=old)
    daemon = make_daemon()
    Printer(standins, daemon).start()
    learnt(daemon)
    farm.reset(SERIAL, mode="klipper")
    farm.wait_for_mode(SERIAL, "klipper")
    verbs_before = standins.systemctl_verbs()

    wrong = write(daemon, "wrong", make_image(mcu=MCU, size=SIZE, seed=3, link_base=0x08010000))
    result = daemon.ctl("queue", SERIAL, str(wrong), "--now")
    assert result.returncode == 2
    assert "built for 0x08010000 (64 KiB bootloader)" in result.stderr
    assert "0x08008000 (32 KiB bootloader)" in result.stderr
    assert standins.systemctl_verbs() == verbs_before
    assert farm.board(SERIAL)["bootloader_requests"] == 0


def test_check_after_the_reboot_boots_the_old_firmware_and_starts_klipper(make_daemon, farm, standins):
    """A board marked `katapult = true` but never read: the offset is known only in Katapult."""
    old = make_image(mcu=MCU, version=OLD_VERSION, size=8000, seed=1)
    farm.add_board(serial=SERIAL, mcu=MCU, mode="klipper", old_image=old)
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL, "katapult": True}})
    printer = Printer(standins, daemon)
    printer.start()
    wait_until(lambda: printer.running, 10, "the fake Klipper to run")

    wrong = write(daemon, "wrong", make_image(mcu=MCU, size=SIZE, seed=3, link_base=0x08010000))
    result = daemon.ctl("queue", "octopus", str(wrong), "--now", "--wait")
    assert result.returncode != 0, result.stdout
    assert "built for 0x08010000 (64 KiB bootloader)" in result.stdout, result.stdout
    assert "0x08008000 (32 KiB bootloader)" in result.stdout
    board = farm.board(SERIAL)
    assert board["bootloader_requests"] == 1
    assert board["blocks_received"] == 0  # nothing written
    assert board["completes"] == 1  # COMPLETE alone: Katapult boots what was there
    assert board["mode"] == "klipper" and board["running_version"] == OLD_VERSION
    assert farm.flashed_image(SERIAL, len(old)) == old
    verbs = standins.systemctl_verbs()
    assert verbs.count("stop") == 1 and verbs[-1] == "start"
    wait_until(lambda: printer.running, 10, "Klipper running again")


def test_image_without_a_dictionary_is_refused_unless_forced(make_daemon, farm, standins):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon()
    Printer(standins, daemon).start()
    deployer = daemon.workdir / "deployer.bin"
    deployer.write_bytes(make_image(mcu=MCU, size=3000, seed=6, dictionary=False))

    refused = daemon.ctl("queue", SERIAL, str(deployer))
    assert refused.returncode == 2
    assert "no Klipper data dictionary" in refused.stderr and "--force" in refused.stderr
    assert daemon.ctl_json("list") == []

    forced = daemon.ctl("queue", SERIAL, str(deployer), "--force", "--wait")
    assert forced.returncode == 0, forced.stdout + forced.stderr


def test_now_is_refused_for_a_board_never_seen_in_katapult(make_daemon, farm, standins, image):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="klipper")
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL}})
    Printer(standins, daemon).start()
    verbs_before = standins.systemctl_verbs()

    result = daemon.ctl("queue", "octopus", str(image), "--now")
    assert result.returncode == 2
    assert "double-tap" in result.stderr and "katapult = true" in result.stderr, result.stderr
    assert daemon.ctl_json("list") == []
    assert farm.board(SERIAL)["bootloader_requests"] == 0
    assert standins.systemctl_verbs() == verbs_before

    # Entered by hand once, the board is known; from then on --now may send it there.
    farm.reset(SERIAL, mode="katapult")
    farm.wait_for_mode(SERIAL, "katapult")
    wait_until(lambda: facts(daemon).get(SERIAL, {}).get("seen_katapult"), 10, "the board remembered")
    farm.reset(SERIAL, mode="klipper")
    farm.wait_for_mode(SERIAL, "klipper")
    result = daemon.ctl("queue", "octopus", str(image), "--now", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert farm.board(SERIAL)["bootloader_requests"] == 1


@pytest.mark.parametrize("rom, what, mcu", [
    ("stm32_dfu", "STM32 DFU", MCU),
    ("rp2040_bootsel", "RP2040 BOOTSEL", "rp2040"),
])
def test_board_that_lands_in_its_rom_bootloader_fails_at_once(
        make_daemon, farm, standins, journald, tmp_path, rom, what, mcu):
    farm.add_board(serial=SERIAL, mcu=mcu, mode="klipper", rom_bootloader=rom)
    # The owner says it has Katapult (it does not): the daemon must see the truth at once.
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL, "katapult": True}},
                         timeouts={"bootloader": 60}, journal_socket=journald.socket)
    printer = Printer(standins, daemon)
    printer.start()
    wait_until(lambda: printer.running, 10, "the fake Klipper to run")
    path = write(daemon, "fw", make_image(mcu=mcu, size=5000, seed=2))

    started = time.monotonic()
    result = daemon.ctl("queue", "octopus", str(path), "--now", "--wait")
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert f"board octopus is in its ROM bootloader ({what}), not Katapult: power-cycle it" in result.stdout, \
        result.stdout
    assert elapsed < 20, f"took {elapsed:.1f} s: the job waited for the bootloader timeout"
    assert farm.board(SERIAL)["in_dfu"] is True  # still there, in its ROM bootloader
    wait_until(lambda: printer.running, 10, "Klipper running again")
    assert standins.systemctl_verbs()[-1] == "start"
    entries = journald.read(count=1, MESSAGE_ID="a75417f737b846e6b29acb1e7525504d")
    assert entries and entries[0]["KFLASHD_SERIAL"] == SERIAL and what in entries[0]["MESSAGE"]
    # It has no Katapult: kflashd no longer counts it as a Katapult board.
    remembered = facts(daemon)[SERIAL]
    assert remembered["rom_bootloader"] == what and remembered["seen_katapult"] is None
