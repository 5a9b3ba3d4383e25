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


def make_image(mcu: str = "stm32f446xx", version: str = "v0.13.0-test", size: int = DEFAULT_IMAGE_SIZE,
               seed: Optional[int] = 0) -> bytes:
    """A fake ``klipper.bin`` of exactly ``size`` bytes with the embedded compressed dict.

    The first word (initial stack pointer of a Cortex-M vector table) is a plausible RAM
    address, never 0 or 0xFFFFFFFF: Katapult treats those as "no application".
    """
    blob = zlib.compress(make_dict(mcu, version).encode(), 9)
    if size < 64 + len(blob):
        raise ValueError(f"image size {size} too small for the {len(blob)}-byte dictionary")
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    data[0:8] = struct.pack("<II", 0x20020000, 0x08008000 | 0x1F5)
    at = 64 + (size - 64 - len(blob)) // 2
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
