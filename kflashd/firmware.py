"""What a Klipper firmware image says about itself: the MCU it was built for and its version.

Two sources, both written by Klipper's build (its scripts/buildcommands.py; facts in
docs/katapult-protocol.md, "out/klipper.dict"):
- the data dictionary, zlib-compressed and embedded in the image itself (the MCU sends it to
  Klipper on `identify`); flashtool.py finds it the same way, by trying to decompress at
  each offset;
- `out/klipper.dict`, the same JSON written beside `out/klipper.bin`.

Both carry `config.MCU` (e.g. "stm32f446xx") and `version` (e.g. "v0.13.0-42-gdeadbee").

Which one wins: the embedded copy, because it is part of the bytes that will be flashed and
cannot go stale. A klipper.dict beside an image that was copied somewhere is only a
neighbour; it is used to fill in what the image itself does not tell (an image without an
embedded dictionary). The daemon, which receives only bytes, calls this with no path and
gets the same answer the client got from the same bytes.

Used by kflashctl (client side, with the path) and by the daemon (bytes only). Pure: reads
at most the image and one or two small files beside it; never raises for a bad image, it
just knows less (None fields).

The search has a total budget (`SearchBudget`: bytes decompressed over all candidates, and
seconds), because the image comes from a client: a crafted 8 MiB image of back-to-back
zlib streams that each inflate to 16 MiB of blanks would otherwise cost minutes of CPU. A
real image's dictionary is found within its first candidates (well under 1 MiB of output);
when the budget runs out the answer is "unknown" with `complete=False`, never a guess.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

SOURCE_EMBEDDED = "embedded"
SOURCE_DICT_FILE = "klipper.dict"

# zlib stream headers: CMF 0x78 (deflate, 32 KiB window) followed by one of the FLG bytes
# the four compression levels produce. Candidates are found with bytes.find, so a large
# image costs a handful of decompression attempts, not one per byte.
_ZLIB_CMF = 0x78
_ZLIB_FLG = (0x01, 0x5E, 0x9C, 0xDA)
_MAX_DICT_SIZE = 16 * 1024 * 1024  # decompressed; a real data dictionary is ~20-200 KiB
_MAX_DICT_FILE = 16 * 1024 * 1024
_PROBE = 64  # bytes of input fed first, to reject non-JSON candidates cheaply
_IN_CHUNK = 64 * 1024  # compressed input fed per step (slices of a memoryview: no copies)
_OUT_CHUNK = 1024 * 1024  # decompressed output per step: the budget is checked between steps

#: The whole search may decompress this much (over all candidates) ...
SEARCH_MAX_BYTES = 48 * 1024 * 1024
#: ... and take this long, whichever comes first.
SEARCH_MAX_SECONDS = 2.0


class SearchBudget:
    """What one dictionary search may still spend: decompressed bytes and wall time."""

    def __init__(self, max_bytes: int = SEARCH_MAX_BYTES, max_seconds: float = SEARCH_MAX_SECONDS) -> None:
        self.bytes_left = max_bytes
        self.deadline = time.monotonic() + max_seconds
        self.exhausted = False

    def spend(self, count: int) -> bool:
        """Account `count` decompressed bytes; False (and exhausted from then on) when over."""
        self.bytes_left -= count
        if self.bytes_left < 0 or time.monotonic() > self.deadline:
            self.exhausted = True
        return not self.exhausted


@dataclass(frozen=True)
class ImageInfo:
    """Identity of an image. None where unknown. `source` says where it came from."""

    mcu: Optional[str] = None
    version: Optional[str] = None
    source: Optional[str] = None  # SOURCE_EMBEDDED, SOURCE_DICT_FILE, or None
    # False when the search for an embedded dictionary stopped at its budget (see
    # SearchBudget) before the end of the image: one may still be in there.
    complete: bool = True

    @property
    def known(self) -> bool:
        return self.mcu is not None or self.version is not None


def _identity(data: Any) -> Tuple[Optional[str], Optional[str]]:
    if not isinstance(data, dict):
        return None, None
    config = data.get("config")
    mcu = config.get("MCU") if isinstance(config, dict) else None
    version = data.get("version")
    return (
        mcu if isinstance(mcu, str) and mcu else None,
        version if isinstance(version, str) and version else None,
    )


def _try_decompress(view: memoryview, offset: int, budget: SearchBudget) -> Optional[Dict[str, Any]]:
    """The JSON object compressed at `offset`, or None. Cheap to reject: probe first.

    Input is fed in slices and output taken in steps of _OUT_CHUNK, so the budget is
    checked at least every MiB of output however the stream was crafted.
    """
    decomp = zlib.decompressobj()
    try:
        head = decomp.decompress(view[offset:offset + _PROBE], _OUT_CHUNK)
        if not budget.spend(len(head)):
            return None
        first = head.lstrip()[:1]
        if first and first != b"{":
            return None  # decompresses, but not to a JSON object: give up on it early
        out = bytearray(head)
        pos = offset + _PROBE
        tail: Any = decomp.unconsumed_tail
        while not decomp.eof:
            if len(out) >= _MAX_DICT_SIZE:
                return None  # larger than any data dictionary
            if not tail:
                tail = view[pos:pos + _IN_CHUNK]
                pos += len(tail)
            piece = decomp.decompress(tail, min(_OUT_CHUNK, _MAX_DICT_SIZE + 1 - len(out)))
            if not piece and not tail:
                return None  # truncated: no input left and nothing more comes out
            tail = decomp.unconsumed_tail
            out += piece
            if not budget.spend(len(piece)):
                return None
    except zlib.error:
        return None
    try:
        data = json.loads(out.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def search_embedded_dict(
    image: bytes, budget: Optional[SearchBudget] = None
) -> Tuple[Optional[Dict[str, Any]], bool]:
    """(the embedded data dictionary or None, whether the whole image was searched).

    The first zlib stream that decompresses completely to a JSON object with a `version`
    or `config` key wins. The search stops early (second value False) when `budget`
    (a fresh SearchBudget by default) runs out.
    """
    budget = budget if budget is not None else SearchBudget()
    view = memoryview(image)
    offset = image.find(bytes([_ZLIB_CMF]))
    while offset != -1 and offset + 2 <= len(image):
        if image[offset + 1] in _ZLIB_FLG:
            data = _try_decompress(view, offset, budget)
            if data is not None and ("version" in data or "config" in data):
                return data, True
            if budget.exhausted:
                return None, False
        offset = image.find(bytes([_ZLIB_CMF]), offset + 1)
    return None, True


def find_embedded_dict(image: bytes, budget: Optional[SearchBudget] = None) -> Optional[Dict[str, Any]]:
    """Klipper's data dictionary embedded (zlib-compressed JSON) in a firmware image, or None."""
    return search_embedded_dict(image, budget)[0]


def info_from_image(image: bytes, budget: Optional[SearchBudget] = None) -> ImageInfo:
    """Identity from the dictionary embedded in the image bytes (ImageInfo() if none;
    `complete=False` if the search ran out of budget first)."""
    data, complete = search_embedded_dict(image, budget)
    if data is None:
        return ImageInfo(complete=complete)
    mcu, version = _identity(data)
    return ImageInfo(mcu, version, SOURCE_EMBEDDED)


def dict_file_for(image_path: str) -> Optional[str]:
    """The data dictionary file beside an image: `<stem>.dict`, else `klipper.dict`."""
    directory = os.path.dirname(os.path.abspath(image_path))
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for name in (f"{stem}.dict", "klipper.dict"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def info_from_dict_file(path: str) -> ImageInfo:
    """Identity from a klipper.dict file (ImageInfo() if unreadable or not a dictionary)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_DICT_FILE + 1)
        if len(raw) > _MAX_DICT_FILE:
            return ImageInfo()
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return ImageInfo()
    mcu, version = _identity(data)
    if mcu is None and version is None:
        return ImageInfo()
    return ImageInfo(mcu, version, SOURCE_DICT_FILE)


def read_image_info(path: Optional[str] = None, image: Optional[bytes] = None) -> ImageInfo:
    """Identity of the image at `path` (read unless `image` gives its bytes).

    Embedded dictionary first; a dict file beside `path` fills in fields it lacks (see the
    module docstring). `path=None`: bytes only (the daemon). Never raises for an unreadable
    or foreign image: the fields are then None.
    """
    if image is None and path is not None:
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError:
            image = None
    info = info_from_image(image) if image is not None else ImageInfo()
    if path is None or (info.mcu is not None and info.version is not None):
        return info
    dict_path = dict_file_for(path)
    if dict_path is None:
        return info
    beside = info_from_dict_file(dict_path)
    if not beside.known:
        return info
    if not info.known:
        return beside
    return ImageInfo(info.mcu or beside.mcu, info.version or beside.version, info.source)
