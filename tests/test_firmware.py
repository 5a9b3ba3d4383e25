"""Image identity: the data dictionary embedded in klipper.bin, and klipper.dict beside it."""

from __future__ import annotations

import json
import random
import time
import zlib

import pytest

from kflashd.firmware import (
    SEARCH_MAX_SECONDS,
    SOURCE_DICT_FILE,
    SOURCE_EMBEDDED,
    ImageInfo,
    SearchBudget,
    find_embedded_dict,
    info_from_image,
    read_image_info,
    search_embedded_dict,
)
from tests.farm.images import bomb_image, bomb_unit


def data_dictionary(mcu="stm32f446xx", version="v0.13.0-42-gdeadbee", **extra):
    """A data dictionary shaped like the one Klipper's buildcommands.py writes."""
    data = {
        "app": "Klipper",
        "build_versions": "gcc: (15:12.2.rel1-1) 12.2.1 20221205 binutils: (2.40-2+18+b1) 2.40",
        "commands": {f"cmd_{i} oid=%c value=%u": i for i in range(60)},
        "config": {"MCU": mcu, "CLOCK_FREQ": 180000000, "RESERVE_PINS_USB": "PA11,PA12"},
        "enumerations": {"pin": {"PA0": [0, 16]}},
        "license": "GNU GPLv3",
        "responses": {"identify_response offset=%u data=%.*s": 0},
        "version": version,
    }
    if mcu is None:
        del data["config"]["MCU"]
    if version is None:
        del data["version"]
    data.update(extra)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def image_with(*parts: bytes, seed: int = 1, size: int = 40_000) -> bytes:
    """Random 'code' bytes with `parts` placed at random spots, like sections of a real image."""
    rng = random.Random(seed)
    out = bytearray()
    for part in parts:
        out += bytes(rng.getrandbits(8) for _ in range(rng.randrange(100, size)))
        out += part
    out += bytes(rng.getrandbits(8) for _ in range(rng.randrange(100, size)))
    return bytes(out)


@pytest.mark.parametrize("level", [0, 1, 6, 9])  # headers 78 01, 78 01, 78 9c, 78 da
def test_embedded_dictionary_any_compression_level(level):
    image = image_with(zlib.compress(data_dictionary(), level))
    assert info_from_image(image) == ImageInfo("stm32f446xx", "v0.13.0-42-gdeadbee", SOURCE_EMBEDDED)


def test_decoy_streams_are_skipped():
    decoys = [
        zlib.compress(b"not json at all, just text" * 20, 9),
        zlib.compress(json.dumps({"unrelated": True}).encode(), 9),  # JSON, but not a dictionary
        zlib.compress(data_dictionary(), 9)[:-30],  # truncated stream
        bytes([0x78, 0x9C]) * 500,  # headers with nothing behind them
    ]
    image = image_with(*decoys, zlib.compress(data_dictionary("rp2040", "v0.12.0-1-gabc"), 9))
    assert info_from_image(image) == ImageInfo("rp2040", "v0.12.0-1-gabc", SOURCE_EMBEDDED)


def test_no_dictionary_means_unknown():
    image = image_with(b"", size=100_000)
    info = info_from_image(image)
    assert info == ImageInfo(None, None, None)
    assert not info.known


def test_truncated_dictionary_is_not_trusted():
    image = image_with(zlib.compress(data_dictionary(), 9)[:200])
    assert find_embedded_dict(image) is None


def test_dictionary_without_mcu():
    image = image_with(zlib.compress(data_dictionary(mcu=None), 9))
    assert info_from_image(image) == ImageInfo(None, "v0.13.0-42-gdeadbee", SOURCE_EMBEDDED)


def test_large_image_is_scanned_quickly():
    # 1 MiB of noise, with plenty of zlib-looking headers, and the dictionary at the end
    rng = random.Random(7)
    noise = bytearray(rng.getrandbits(8) for _ in range(1 << 20))
    for i in range(0, len(noise) - 2, 997):
        noise[i:i + 2] = bytes([0x78, rng.choice([0x01, 0x5E, 0x9C, 0xDA])])
    image = bytes(noise) + zlib.compress(data_dictionary(), 9)
    started = time.monotonic()
    info = info_from_image(image)
    elapsed = time.monotonic() - started
    assert info.mcu == "stm32f446xx"
    assert elapsed < 5.0


def test_read_from_path(tmp_path):
    path = tmp_path / "klipper.bin"
    path.write_bytes(image_with(zlib.compress(data_dictionary(), 9)))
    assert read_image_info(str(path)) == ImageInfo("stm32f446xx", "v0.13.0-42-gdeadbee", SOURCE_EMBEDDED)


def test_bytes_only_like_the_daemon():
    image = image_with(zlib.compress(data_dictionary("lpc1769"), 9))
    assert read_image_info(None, image).mcu == "lpc1769"


def test_dict_file_beside_an_image_without_embedded_data(tmp_path):
    (tmp_path / "klipper.bin").write_bytes(image_with(b""))
    (tmp_path / "klipper.dict").write_bytes(data_dictionary("stm32h723xx", "v0.13.0-7-g1234567"))
    info = read_image_info(str(tmp_path / "klipper.bin"))
    assert info == ImageInfo("stm32h723xx", "v0.13.0-7-g1234567", SOURCE_DICT_FILE)


def test_stem_dict_is_preferred(tmp_path):
    (tmp_path / "octopus.bin").write_bytes(image_with(b""))
    (tmp_path / "klipper.dict").write_bytes(data_dictionary("rp2040"))
    (tmp_path / "octopus.dict").write_bytes(data_dictionary("stm32f446xx"))
    assert read_image_info(str(tmp_path / "octopus.bin")).mcu == "stm32f446xx"


def test_embedded_beats_a_stale_dict_beside(tmp_path):
    # an image copied next to another build's dictionary: the bytes tell the truth
    image = image_with(zlib.compress(data_dictionary("stm32f446xx", "v0.13.0-42-gdeadbee"), 9))
    (tmp_path / "klipper.dict").write_bytes(data_dictionary("rp2040", "v0.11.0"))
    info = read_image_info(str(tmp_path / "klipper.bin"), image)
    assert info == ImageInfo("stm32f446xx", "v0.13.0-42-gdeadbee", SOURCE_EMBEDDED)


def test_dict_beside_fills_in_missing_fields(tmp_path):
    image = image_with(zlib.compress(data_dictionary(version=None), 9))
    (tmp_path / "klipper.dict").write_bytes(data_dictionary(version="v0.13.0-1-gfeed"))
    info = read_image_info(str(tmp_path / "klipper.bin"), image)
    assert info == ImageInfo("stm32f446xx", "v0.13.0-1-gfeed", SOURCE_EMBEDDED)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", json.dumps({"config": {"MCU": 5}}).encode()])
def test_bad_dict_file_is_ignored(tmp_path, content):
    (tmp_path / "klipper.dict").write_bytes(content)
    info = read_image_info(str(tmp_path / "klipper.bin"), image_with(b""))
    assert info == ImageInfo()


def test_missing_image_file(tmp_path):
    assert read_image_info(str(tmp_path / "nope.bin")) == ImageInfo()


def test_crafted_image_stops_at_the_search_budget():
    # ~500 back-to-back streams, each inflating to 16 MiB: minutes of CPU without a budget.
    image = bomb_image(8 * 1024 * 1024)
    started = time.monotonic()
    info = info_from_image(image)
    elapsed = time.monotonic() - started
    assert info == ImageInfo(complete=False) and not info.known
    assert elapsed < SEARCH_MAX_SECONDS + 1.0


def test_search_budget_counts_decompressed_bytes():
    image = bomb_image(100_000) + zlib.compress(data_dictionary(), 9)
    # A whole day's time, but only 1 MiB of output: the first bomb exhausts it.
    assert search_embedded_dict(image, SearchBudget(1024 * 1024, 86400)) == (None, False)
    # Two bombs (2 x 16 MiB) fit in the default budget; the dictionary behind them is found.
    two = bomb_unit() * 2 + zlib.compress(data_dictionary(), 9)
    data, complete = search_embedded_dict(two)
    assert complete and data is not None and data["config"]["MCU"] == "stm32f446xx"
