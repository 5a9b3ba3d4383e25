"""Preflight facts and rules without a daemon: the offset check on Klipper-shaped images,
the read-only CONNECT against the Katapult emulator on a pty, the per-board facts file."""

from __future__ import annotations

import json
import os
import pty
import time
import tty

import pytest

from kflashd import katapult, preflight
from kflashd.boardfacts import BoardFactsStore
from kflashd.errors import DiscoveryError
from tests.farm.images import make_image
from tests.farm.katapult import Fault, Flash, KatapultEmulator
from tests.support.wait import wait_until

# Numbers of real Klipper STM32F446 builds (USB on PA11/PA12): 44516 bytes, the reset
# handler 0x700C bytes in; the 32 KiB build's reset vector is 0x0800F00D, the 64 KiB's 0x0801700D.
REAL_SIZE = 44516


def real_layout(link_base: int) -> bytes:
    image = bytearray(b"\x00" * REAL_SIZE)
    image[0:8] = bytes.fromhex("00000220") + (link_base + 0x700C | 1).to_bytes(4, "little")
    return bytes(image)


@pytest.mark.parametrize("built, board, fits", [
    (0x08008000, 0x08008000, True), (0x08010000, 0x08010000, True),
    (0x08010000, 0x08008000, False), (0x08008000, 0x08010000, False),
])
def test_reset_vector_must_lie_in_the_written_range(built, board, fits):
    refusal = preflight.offset_refusal(real_layout(built), board, "stm32f446xx")
    assert (refusal is None) == fits, refusal
    if not fits:
        assert f"built for {preflight.describe_start(built, 'stm32f446xx')}" in refusal
        assert f"starts the application at {preflight.describe_start(board, 'stm32f446xx')}" in refusal


def test_names_of_offsets():
    assert preflight.describe_start(0x08008000, "stm32f446xx") == "0x08008000 (32 KiB bootloader)"
    assert preflight.describe_start(0x08010000, "stm32g0b1xx") == "0x08010000 (64 KiB bootloader)"
    assert preflight.describe_start(0x10004000, "rp2040") == "0x10004000 (16 KiB bootloader)"
    assert preflight.describe_start(0x08000000, "stm32f103xe") == "0x08000000 (no bootloader)"


def test_farm_images_fit_their_own_offset_only():
    for mcu, base in (("stm32f446xx", 0x08008000), ("rp2040", 0x10004000), ("stm32g0b1xx", 0x08002000)):
        image = make_image(mcu=mcu, size=6000, link_base=base)
        assert preflight.offset_refusal(image, base, mcu) is None
        assert preflight.offset_refusal(image, base + 0x8000, mcu) is not None
        assert preflight.offset_refusal(image, base - 0x2000, mcu) is not None


def test_non_cortex_m_images_are_not_refused_for_their_vectors():
    garbage = os.urandom(3000)
    for mcu in ("atmega2560", "at90usb1286", "linux", "pru", None, ""):
        assert not preflight.is_cortex_m(mcu)
        assert preflight.offset_refusal(garbage, 0x0, mcu) is None
    assert preflight.is_cortex_m("stm32h723xx") and preflight.is_cortex_m("lpc1769")


def test_too_short_cortex_m_image_is_refused():
    assert "too short" in preflight.offset_refusal(b"\x00" * 4, 0x08008000, "stm32f446xx")


def test_reboot_needs_a_known_katapult():
    refusal = preflight.reboot_refusal("octopus", False, False, "octopus")
    assert "double-tap" in refusal and "[boards.octopus]" in refusal and "katapult = true" in refusal
    assert preflight.reboot_refusal("octopus", True, False, "octopus") is None
    assert preflight.reboot_refusal("octopus", False, True, "octopus") is None


class Bench:
    def __init__(self, mcu: str = "stm32g0b1xx", app_start: int = 0x08002000) -> None:
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        self.node = os.ttyname(self.slave)
        self.flash = Flash()
        self.boots: list = []
        self.emulator = KatapultEmulator(self.master, self.flash, mcu=mcu, app_start=app_start,
                                         version="v0.0.1-110-gb0bf421", on_boot=lambda e: self.boots.append(1))
        self.emulator.start()

    def close(self) -> None:
        self.emulator.stop()
        os.close(self.slave)
        os.close(self.master)


@pytest.fixture
def bench():
    b = Bench()
    yield b
    b.close()


def test_probe_reads_katapult_and_writes_nothing(bench):
    before = bytes(bench.flash.memory)
    info = katapult.probe(bench.node, "stm32g0b1xx", timeout=1.0)
    assert (info.mcu, info.app_start, info.block_size) == ("stm32g0b1xx", 0x08002000, 64)
    assert info.version == "v0.0.1-110-gb0bf421" and info.protocol == "1.1.0"
    stats = bench.emulator.stats()
    assert stats["connects"] == 1 and stats["completes"] == 0 and stats["blocks_received"] == 0
    assert stats["command_errors"] == 1  # the stm32g0 "prime", as flashtool.py sends it
    assert bytes(bench.flash.memory) == before and bench.boots == []


def test_boot_application_sends_complete_alone(bench):
    katapult.boot_application(bench.node, timeout=1.0)
    wait_until(lambda: bench.boots, 5, "the emulator to boot its application")
    assert bench.emulator.stats()["blocks_received"] == 0


def test_probe_of_a_silent_board_names_the_device():
    b = Bench()
    try:
        b.emulator.apply_fault(Fault("silent"))
        started = time.monotonic()
        with pytest.raises(DiscoveryError, match=b.node):
            katapult.probe(b.node, "stm32f446xx", timeout=0.2, tries=2)
        assert time.monotonic() - started < 3
    finally:
        b.close()


def test_facts_survive_a_restart_and_a_damaged_file_forgets(tmp_path, caplog):
    store = BoardFactsStore(str(tmp_path))
    assert not store.known_katapult("AB12")
    store.seen_in_katapult("AB12", "1-1.2")
    store.probed("CD34", "1-1.3", "rp2040", 0x10004000, "v0.0.2")
    again = BoardFactsStore(str(tmp_path))
    assert again.known_katapult("AB12") and again.get("CD34").app_start == 0x10004000
    again.landed_in_rom("AB12", "STM32 DFU")
    third = BoardFactsStore(str(tmp_path))
    assert not third.known_katapult("AB12") and third.get("AB12").rom_bootloader == "STM32 DFU"
    assert oct(os.stat(tmp_path / "boards.json").st_mode & 0o777) == "0o600"

    (tmp_path / "boards.json").write_text('{"boards": [1, 2')
    damaged = BoardFactsStore(str(tmp_path))
    assert not damaged.known_katapult("CD34")
    assert "--now is refused" in caplog.text
    damaged.seen_in_katapult("CD34", None)
    assert json.loads((tmp_path / "boards.json").read_text())["boards"]["CD34"]["seen_katapult"]
