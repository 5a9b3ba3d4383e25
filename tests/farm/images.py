"""Fake Klipper firmware images: ``klipper.bin`` bytes and the matching ``klipper.dict``.

A real Klipper build embeds its data dictionary (compact, sorted JSON) zlib-compressed in
``klipper.bin`` and writes the same JSON to ``out/klipper.dict``; flashtool.py and kflashd
find ``version`` and ``config.MCU`` by trying ``zlib.decompress`` at every offset. These
images have that structure around seeded random bytes, so content checks are byte-exact
and reproducible.
"""
from __future__ import annotations

import json
import random
import struct
import zlib
from typing import Any, Dict, Optional

DEFAULT_IMAGE_SIZE = 5000  # a few KiB and not a multiple of 64: the last block gets padded


def make_dict_data(mcu: str = "stm32f446xx", version: str = "v0.13.0-test") -> Dict[str, Any]:
    """The dictionary a Klipper build would produce (only the keys anyone reads are real)."""
    return {
        "app": "Klipper",
        "build_versions": "gcc: (kflashd farm) 12.2.0 binutils: (kflashd farm) 2.40",
        "commands": {"identify offset=%u count=%c": 1},
        "config": {"CLOCK_FREQ": 180000000, "MCU": mcu, "RESERVE_PINS_USB": "PA11,PA12"},
        "enumerations": {},
        "license": "GNU GPLv3",
        "output": {},
        "responses": {"identify_response offset=%u data=%.*s": 0},
        "version": version,
    }


def make_dict(mcu: str = "stm32f446xx", version: str = "v0.13.0-test") -> str:
    """``out/klipper.dict`` text: compact sorted JSON, as Klipper's buildcommands.py writes."""
    return json.dumps(make_dict_data(mcu, version), separators=(",", ":"), sort_keys=True)


def default_link_base(mcu: str) -> int:
    """Where Klipper links an image for a board with Katapult's default offset."""
    if mcu.lower().startswith("rp2"):
        return 0x10004000  # rp2040: 16 KiB bootloader
    if mcu.lower().startswith("lpc17"):
        return 0x4000
    return 0x08008000  # stm32: 32 KiB bootloader


def vector_table(link_base: int, size: int, words: int) -> bytes:
    """A Cortex-M vector table as a Klipper build has it: the initial stack pointer, then the
    reset handler and every other handler inside the image, with the Thumb bit set.

    Real builds (STM32F446, 32 KiB offset, 44 KiB image) put the reset handler some 28 KiB
    into the image, far from the table: so here it sits at 5/8 of the image, and the default
    handler just after it.
    """
    reset = link_base + (size * 5 // 8 & ~3)
    default = reset + 0x14
    table = [0x20020000, reset | 1] + [default | 1] * (words - 2)
    return struct.pack(f"<{words}I", *table)


def make_image(mcu: str = "stm32f446xx", version: str = "v0.13.0-test", size: int = DEFAULT_IMAGE_SIZE,
               seed: Optional[int] = 0, link_base: Optional[int] = None, dictionary: bool = True) -> bytes:
    """A fake ``klipper.bin`` of exactly ``size`` bytes with the embedded compressed dict.

    It starts with a vector table for ``link_base`` (default: Katapult's default offset for
    the MCU family); its first word is a plausible RAM address, never 0 or 0xFFFFFFFF:
    Katapult treats those as "no application". ``dictionary=False``: no data dictionary
    (like a Katapult deployer.bin or a Marlin build).
    """
    blob = zlib.compress(make_dict(mcu, version).encode(), 9) if dictionary else b""
    if size < 64 + len(blob):
        raise ValueError(f"image size {size} too small for the {len(blob)}-byte dictionary")
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    at = 64 + (size - 64 - len(blob)) // 2
    words = max(2, min(64, at // 4))
    data[0:words * 4] = vector_table(default_link_base(mcu) if link_base is None else link_base, size, words)
    data[at:at + len(blob)] = blob
    return bytes(data)


def find_dict(data: bytes) -> Optional[Dict[str, Any]]:
    """The embedded Klipper dictionary in an image or flash dump, or None.

    Like flashtool.py it tries every offset, but only where a zlib header can start
    (CMF 0x78 and a valid FCHECK), which keeps a scan of a whole flash fast.
    """
    start = 0
    while True:
        idx = data.find(b"\x78", start)
        if idx < 0 or idx + 2 > len(data):
            return None
        start = idx + 1
        if (data[idx] << 8 | data[idx + 1]) % 31:
            continue
        try:
            parsed = json.loads(zlib.decompressobj().decompress(data[idx:]))
        except (zlib.error, ValueError):
            continue
        if isinstance(parsed, dict) and parsed.get("app") == "Klipper":
            return parsed


def bomb_unit(inflated: int = 16 * 1024 * 1024) -> bytes:
    """One unterminated zlib stream (header 78 DA) inflating to "{" and `inflated` blanks.

    It passes the dictionary search's cheap probe (it starts like a JSON object) and never
    ends, so a search without a budget inflates all of it, up to its per-stream cap.
    """
    c = zlib.compressobj(9)
    return c.compress(b"{" + b" " * inflated) + c.flush(zlib.Z_SYNC_FLUSH)


def bomb_image(size: int) -> bytes:
    """The worst image for the dictionary search: `size` bytes of back-to-back bomb_unit()s
    (an 8 MiB one holds ~500, each inflating to 16 MiB: minutes of CPU without a budget)."""
    unit = bomb_unit()
    return (unit * (size // len(unit) + 1))[:size]
