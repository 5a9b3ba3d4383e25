"""Staging a queued image: the byte checks off the loop thread, the decisions on it.

A `queue` request carries up to max_image_size bytes (base64) from a client. Decoding,
hashing and searching them for Klipper's data dictionary costs CPU proportional to what
the client chose to send (a crafted image can make the search expensive even with its
budget, see firmware.SearchBudget). None of that may run on the loop thread: it owns the
watchdog ping, and a ping missed during a flash gets the daemon killed mid-write.

The pipeline, in order:

1. the loop (commands.py) reads the request's fields: cheap type checks only;
2. the staging worker (this module, `check_image`) looks only at the bytes: base64, size,
   sha256, the identity the image states (`firmware.info_from_image`). Checks that need
   nothing but the bytes belong here;
3. the loop again (commands.py) decides with the daemon's state: which board, whether the
   image suits it, and writes the job store (which only the loop writes).

One worker thread serves all requests in order; results come back to the loop with
`Reactor.call_soon_threadsafe`. Only one large request is in flight at a time (the control
socket lends its one large-request slot to one connection until the reply), so the queue
holds at most one large image, plus small ones (under 64 KiB of request each, one per
connection at most).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

from . import firmware
from .control import Reply, error_reply
from .reactor import Reactor

log = logging.getLogger("kflashd.staging")


@dataclass(frozen=True)
class CheckedImage:
    """What the bytes say, as found by the worker: ready for the loop's decisions."""

    image: bytes
    sha256: str
    info: firmware.ImageInfo


def check_image(image_b64: str, sha256: str, max_size: int) -> Union[CheckedImage, Reply]:
    """Step 2: decode and check the bytes (worker thread). A Reply means refused."""
    try:
        image = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError):
        return error_reply("bad_request", "image is not valid base64")
    if not image:
        return error_reply("rejected", "the image is empty")
    if len(image) > max_size:
        return error_reply(
            "rejected",
            f"the image is {len(image)} bytes, more than max_image_size ({max_size}); "
            f"is it really a firmware image?",
        )
    if hashlib.sha256(image).hexdigest() != sha256:
        return error_reply("rejected", "the image's sha256 does not match: transfer damaged")
    # A Klipper build embeds its data dictionary (with config.MCU) in klipper.bin.
    return CheckedImage(image, sha256, firmware.info_from_image(image))


class StagingWorker:
    """One thread that runs byte checks in order and hands each result to the loop."""

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self._jobs: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, work: Callable[[], object], done: Callable[[object], None]) -> None:
        """Run `work()` in the worker; then `done(result)` on the loop thread.

        An exception in `work` is a bug: it is logged and `done` gets the exception object,
        so the client still gets an answer.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="staging", daemon=True)
            self._thread.start()

        def job() -> None:
            try:
                result: object = work()
            except Exception as e:
                log.exception("unexpected error while checking a queued image")
                result = e
            self.reactor.call_soon_threadsafe(lambda: done(result))

        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    def stop(self) -> None:
        """Let the thread end after the request in hand (it is a daemon thread: never joined)."""
        if self._thread is not None:
            self._jobs.put(None)
