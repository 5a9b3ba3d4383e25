"""Preflight checks that need the board's own facts: the bootloader offset, and whether a
board may be sent to its bootloader at all. Pure functions: no I/O.

Offset. Katapult writes an image at the application start it reports in CONNECT, whatever
address the image was linked for. A Cortex-M image begins with its vector table: word 0 is
the initial stack pointer, word 1 the reset vector (an address in the image, Thumb bit set).
Placed at `app_start`, the image occupies [app_start, app_start + size); a reset vector
outside that range means the image was linked for another offset. Real Klipper builds
satisfy this for their own offset (an STM32F446 build for 32 KiB has its reset handler at
0x0800F00D, 28 KiB into a 44 KiB image; the 64 KiB build's lies at 0x0801700D, past the end
of the image when placed at 0x08008000).

Which images are checked: those for Cortex-M families (stm32, rp2040/rp2350, lpc17xx, the
Atmel/Microchip SAM parts, hc32f460), decided by the MCU name that Katapult reports (else
the image's). Other families (AVR, Linux, PRU, ...) have no such vector table and Katapult
does not run on them; their images are not refused for want of one, and the job's log
says the offset was not checked.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

# MCU name prefixes (Klipper's CONFIG_MCU) of Cortex-M parts.
CORTEX_M_PREFIXES = ("stm32", "rp2040", "rp2350", "lpc17", "sam3", "sam4", "samc", "samd", "same5", "same7",
                     "hc32f460")

# Flash base and the application starts Klipper's Kconfig offers, most common first: used
# only to name the offset an image was probably built for, never to decide.
_FAMILIES: List[Tuple[str, int, Tuple[int, ...]]] = [
    ("stm32", 0x08000000, (0x8000, 0x10000, 0x2000, 0x0, 0x4000, 0x7000, 0x5000, 0x20000, 0x1000, 0x800,
                           0x8800, 0x9000, 0xC000, 0x20200)),
    ("rp2", 0x10000000, (0x4000, 0x100, 0x0)),
    ("lpc17", 0x0, (0x4000, 0x10000, 0x0)),
    ("samd", 0x0, (0x2000, 0x4000, 0x0)),
]

#: Fields the offset check reports (used by messages and tests).
FAMILY_UNCHECKED = "unchecked"


def is_cortex_m(mcu: Optional[str]) -> bool:
    return bool(mcu) and mcu.lower().startswith(CORTEX_M_PREFIXES)  # type: ignore[union-attr]


def _family(mcu: Optional[str]) -> Optional[Tuple[int, Tuple[int, ...]]]:
    name = (mcu or "").lower()
    for prefix, base, offsets in _FAMILIES:
        if name.startswith(prefix):
            return base, offsets
    return None


def describe_start(address: int, mcu: Optional[str]) -> str:
    """"0x08008000 (32 KiB bootloader)" where the family's flash base is known."""
    text = f"0x{address:08X}"
    family = _family(mcu)
    if family is not None and address >= family[0]:
        size = address - family[0]
        if size == 0:
            return f"{text} (no bootloader)"
        kib = f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} bytes"
        return f"{text} ({kib} bootloader)"
    return text


def reset_vector(image: bytes) -> Optional[int]:
    """The reset vector (word 1, Thumb bit cleared), or None for an image under 8 bytes."""
    if len(image) < 8:
        return None
    return struct.unpack_from("<I", image, 4)[0] & ~1


def _likely_start(image: bytes, mcu: Optional[str]) -> Optional[int]:
    """The application start an image was probably linked for: a Kconfig offset at which
    the reset vector lies inside the image, the most common first; None if none fits."""
    family = _family(mcu)
    vector = reset_vector(image)
    if family is None or vector is None:
        return None
    base, offsets = family
    for offset in offsets:
        start = base + offset
        if start <= vector < start + len(image):
            return start
    return None


def offset_refusal(image: bytes, app_start: int, mcu: Optional[str]) -> Optional[str]:
    """Why `image` must not be written at `app_start`, or None when its reset vector fits.

    None too for non-Cortex-M MCUs (see the module docstring): `is_cortex_m` tells the
    caller whether the check really ran.
    """
    if not is_cortex_m(mcu):
        return None
    board = describe_start(app_start, mcu)
    vector = reset_vector(image)
    if vector is None:
        return (f"the image is {len(image)} bytes, too short for a Cortex-M vector table: refusing to "
                f"write it at {board}")
    end = app_start + len(image)
    if app_start <= vector < end:
        return None
    likely = _likely_start(image, mcu)
    built = (f"built for {describe_start(likely, mcu)}" if likely is not None
             else "linked for another address")
    return (
        f"image is {built} but the board's Katapult starts the application at {board}: its reset "
        f"vector 0x{vector:08X} lies outside 0x{app_start:08X}-0x{end:08X} where it would be "
        f"written, so it would never boot. Rebuild with the bootloader offset that matches the "
        f"board's Katapult (make menuconfig) and queue it again; nothing was touched"
    )


def reboot_refusal(label: str, known_katapult: bool, configured: bool, name: Optional[str]) -> Optional[str]:
    """Why a board that runs Klipper must not be asked to reboot into its bootloader."""
    if known_katapult or configured:
        return None
    where = f"[boards.{name}]" if name else "a [boards.NAME] section for it"
    return (
        f"--now refused: kflashd has never seen board {label} in Katapult, and {where} does not "
        f"say `katapult = true`. A bootloader request to a board without Katapult leaves it in "
        f"its ROM bootloader (STM32 DFU, RP2040 BOOTSEL) until it is power-cycled. Enter Katapult "
        f"by hand instead: double-tap the board's reset button (the queued job then runs, and "
        f"kflashd remembers the board), or set `katapult = true` in {where} if it runs Katapult"
    )
