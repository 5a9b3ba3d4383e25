"""The control protocol's commands: what kflashctl may ask, and the checks on each request.

The control socket (control.py) has already framed the request and checked who sent it;
this module validates every field (a request is hostile until proven otherwise), turns it
into daemon actions and builds the reply. It runs on the loop thread and never blocks on
anything but the daemon's own state; it never opens or executes a path a client sent.
The one costly step, checking a queued image's bytes, runs in the staging worker
(staging.py: the pipeline's three steps are described there); `queue` answers PENDING and
replies when the worker's result is back on the loop.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from . import __version__, cancycle, canbus, journal, preflight, staging
from .control import PENDING, Connection, Reply, Request, error_reply
from .cycle import image_matches_board
from .devices import serial_from_by_id
from .errors import QueueError
from .models import JOB_CANCELLED, JOB_INTERRUPTED, JOB_QUEUED, JOB_RUNNING, MODE_BRIDGE, MODE_KATAPULT, Board, Job

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("kflashd")

_SERIAL_RE = re.compile(r"\A[0-9A-Fa-f]{4,64}\Z")  # not "$": it also matches before a final "\n"


@dataclass
class Target:
    """What a request's BOARD resolved to."""

    serial: str
    port: Optional[str]  # bound USB port path, where boards share the serial
    name: Optional[str]  # the config's name for it
    board: Optional[Board]  # connected now
    warnings: List[str]


def ambiguous_serial(selector: str, serial: str, present: List[Board]) -> str:
    """Why a job that names only a shared serial is refused, and how to name the board."""
    seen = ", ".join(
        sorted(f"{b.device_node} on port {b.port_path} ({b.by_path or 'no by-path link'})" for b in present)
    )
    return (
        f"ambiguous board {selector!r}: more than one board reports serial {serial}"
        + (f" ({seen})" if seen else "")
        + "; name the board by its USB port: its /dev/serial/by-path/ link, or a "
        f"[boards.NAME] table with serial = \"{serial}\" and port = \"PORT\" (see `kflashctl devices`)"
    )


class Commands:
    """One method per command (`_cmd_<name>`); anything else is an unknown command."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def handle(self, conn: Connection, request: Request) -> Optional[Reply]:
        cmd = request["cmd"]
        handler = getattr(self, f"_cmd_{cmd}", None)
        if handler is None:
            return error_reply("bad_request", f"unknown command {cmd!r}")
        try:
            return handler(conn, request)
        except QueueError as e:
            return error_reply("rejected", str(e))

    def _cmd_ping(self, conn: Connection, request: Request) -> Reply:
        return {"ok": True, "version": __version__}

    def _cmd_queue(self, conn: Connection, request: Request) -> Reply:
        """Step 1 of staging (loop): the fields. Step 2 (worker): the bytes. Step 3: below."""
        fields = {
            "selector": _string(request, "board"),
            "sha256": _string(request, "sha256").lower(),
            "force": _flag(request, "force"),
            "now": _flag(request, "now"),
            "mcu": _optional_string(request, "mcu"),
            "version": _optional_string(request, "version"),
        }
        image_b64 = _string(request, "image")
        sha256, max_size = fields["sha256"], self.daemon.config.max_image_size

        def done(result: object) -> None:
            if conn.closed:  # the client gave up: nobody would learn of a staged job
                conn.reply(error_reply("gone", "client closed the connection"))
                return
            conn.reply(self._queue_reply(fields, result))

        self.daemon.staging.submit(lambda: staging.check_image(image_b64, sha256, max_size), done)
        return PENDING

    def _queue_reply(self, fields: Dict[str, Any], result: object) -> Reply:
        """Step 3 (loop): a checked image becomes a job, or the reply says why not."""
        if isinstance(result, dict):
            return result  # refused by the byte checks
        if not isinstance(result, staging.CheckedImage):
            return error_reply("internal", "kflashd failed on this request (a bug: see journalctl -u kflashd)")
        try:
            return self._stage(fields, result)
        except QueueError as e:
            return error_reply("rejected", str(e))
        except Exception:
            log.exception("internal error while staging a job")
            return error_reply("internal", "kflashd failed on this request (a bug: see journalctl -u kflashd)")

    def _stage(self, fields: Dict[str, Any], checked: "staging.CheckedImage") -> Reply:
        try:
            job, replaced, warnings = self.stage_job(fields, checked)
        except _Mismatch as e:
            return error_reply("mismatch", str(e))
        return {
            "ok": True,
            "job": job.to_dict(),
            "replaced": replaced.to_dict() if replaced else None,
            "warnings": warnings,
        }

    def stage_job(
        self, fields: Dict[str, Any], checked: "staging.CheckedImage", batch: Optional[str] = None
    ) -> Tuple[Job, Optional[Job], List[str]]:
        """A checked image becomes a job, with every decision a staged image gets: for
        `queue` (bytes from a client) and `update` (bytes from a build, `batch` its id).
        Raises QueueError (_Mismatch when the image is for another MCU)."""
        selector, sha256, image = fields["selector"], checked.sha256, checked.image
        force, now = fields["force"], fields["now"]
        image_mcu, image_version = fields["mcu"], fields["version"]
        # The client's word on the MCU is checked against the bytes themselves: a Klipper
        # build embeds its data dictionary (with config.MCU) in klipper.bin.
        embedded = checked.info
        if embedded.mcu and image_mcu and embedded.mcu.lower() != image_mcu.lower() and not force:
            raise _Mismatch(
                f"the image says it is built for {embedded.mcu}, but its klipper.dict says "
                f"{image_mcu}: a stale klipper.dict? rebuild, or queue again with --force",
            )
        if embedded.mcu is None and not force and (embedded.complete or not image_mcu):
            # No data dictionary in the bytes: not a Klipper build (a Katapult deployer.bin,
            # a Marlin build, random bytes), or one whose MCU nobody can check. A klipper.dict
            # beside it is only a neighbour and proves nothing about these bytes; it is taken
            # only when the search stopped at its budget (a warning says so, below).
            raise QueueError(
                ("the search for the image's data dictionary stopped at its budget"
                 if not embedded.complete else "the image carries no Klipper data dictionary")
                + ", so the MCU it was built for cannot be read (a Katapult deployer.bin, another "
                "firmware, or not firmware at all?): refusing it; queue it again with --force only "
                "if you are sure it fits the board"
            )
        image_mcu = embedded.mcu or image_mcu
        image_version = embedded.version or image_version
        target = self._resolve_selector(selector)
        board, warnings = target.board, target.warnings
        if not embedded.complete:
            warnings.append(
                "the search for the image's embedded data dictionary stopped at its budget: the "
                "MCU it was built for is taken from klipper.dict" if image_mcu else
                "the search for the image's embedded data dictionary stopped at its budget: the "
                "MCU it was built for is unknown"
            )
        node = cancycle.node_board(self.daemon.config, target.serial)  # a CAN toolhead: from the config
        if (board or node) is not None and not force:
            refusal = image_matches_board(image_mcu, board or node, self.daemon.config)
            if refusal:
                raise _Mismatch(refusal)
        if node is None:
            refusal = self._preflight(target.serial, target.name, image, now, force)
            if refusal:
                raise QueueError(refusal)
        job = Job(
            id=self.daemon.store.new_id(),
            selector=selector,
            serial=target.serial,
            port=target.port,
            board_name=target.name,
            image_sha256=sha256,
            image_size=len(image),
            created=time.time(),
            image_mcu=image_mcu,
            image_version=image_version,
            force=force,
            now=now,
            message="waiting for the board in Katapult" if not now else "waiting for the board",
            batch=batch,
        )
        replaced = self.daemon.store.stage(job, image)
        if replaced is not None:
            warnings.append(f"replaces job {replaced.id}, which was queued for the same board")
            self.daemon.notify_watchers(replaced, {"event": "end", "job": replaced.to_dict()})
        if node is not None:
            why = cancycle.bus_refusal(node)
            if not now:
                warnings.append("a CAN toolhead board sends no udev event: the job runs with --now only "
                                "(queue it again with --now)")
            elif why:
                warnings.append(f"--now: {why}; the job waits for the bus, Klipper is not touched")
        elif now and board is None:
            warnings.append("--now: the board is not connected; the job waits for it")
        elif now and board is not None and board.mode == MODE_KATAPULT:
            warnings.append("--now: the board already waits in Katapult")
        self.daemon.log_job(
            logging.INFO,
            f"staged: {len(image)} bytes, sha256 {sha256[:12]}"
            + (f", {image_mcu}" if image_mcu else "")
            + (" (forced)" if force else ""),
            job,
            message_id=journal.MSG_JOB_STAGED,
        )
        self.daemon.reactor.call_soon_threadsafe(self.daemon.schedule)
        return job, replaced, warnings

    def _cmd_update(self, conn: Connection, request: Request) -> Reply:
        boards = request.get("boards", [])
        if not isinstance(boards, list) or len(boards) > 64 or not all(
                isinstance(b, str) and 0 < len(b) <= 128 for b in boards):
            return error_reply("bad_request", "boards must be a list of board names")
        batch = self.daemon.updates.start(boards, _flag(request, "all"), _flag(request, "force"))
        return {"ok": True, "batch": batch.to_dict()}

    def _preflight(self, serial: str, name: Optional[str], image: bytes, now: bool, force: bool) -> Optional[str]:
        """The checks that rest on what a USB board told kflashd before (boardfacts.py): it
        is sent to its bootloader only when it is known to run Katapult, and an image must
        fit the application start its Katapult reported. The cycle checks both again."""
        facts = self.daemon.facts.get(serial)
        if now:
            named = self.daemon.config.board_by_serial(serial)
            refusal = preflight.reboot_refusal(
                name or serial, facts is not None and facts.seen_katapult is not None,
                bool(named and named.katapult), named.name if named else None,
            )
            if refusal:
                return refusal
        if force or facts is None or facts.app_start is None or not preflight.is_cortex_m(facts.mcu):
            return None
        return preflight.offset_refusal(image, facts.app_start, facts.mcu)

    def _resolve_selector(self, selector: str) -> "Target":
        """Board name, USB serial, or a /dev path (by-id in either mode, by-path, the node).

        A serial that more than one board reports (boards built without the chip id all
        say 12345) names no board: such a board is chosen by its USB port too, from the
        config's `port` or a /dev/serial/by-path/ link, or the request is refused.
        """
        monitor = self.daemon.monitor
        assert monitor is not None
        warnings: List[str] = []
        port: Optional[str] = None
        named = self.daemon.config.board_by_name(selector)
        if named is not None:
            serial, port = named.serial or named.canbus_uuid or "", named.port
        elif selector.startswith("/dev/"):
            present = [b for b in monitor.boards.values() if selector in (b.by_id, b.by_path, b.device_node)]
            by_id_serial = serial_from_by_id(selector)
            if present:
                serial = present[0].serial
                if selector == present[0].by_path:
                    port = present[0].port_path  # a by-path link names the port itself
            elif by_id_serial:
                serial = by_id_serial
            else:
                raise QueueError(
                    f"unknown board {selector!r}: no connected board has that path, and it is not "
                    f"a /dev/serial/by-id/usb-katapult_… or usb-Klipper_… name"
                )
        elif _SERIAL_RE.match(selector):
            serial = selector
        else:
            names = ", ".join(sorted(self.daemon.config.boards)) or "none configured"
            raise QueueError(
                f"unknown board {selector!r}: give a board name from the config (known: {names}), a "
                f"USB serial number, or a /dev/serial/by-id/ path (see `kflashctl devices`)"
            )
        can_node = canbus.can_board(self.daemon.config, serial)
        if can_node is not None and can_node.canbus_uuid:
            serial = can_node.canbus_uuid  # a CAN toolhead: its job goes by its UUID
        present = [b for b in monitor.find(serial) if port is None or b.port_path == port]
        if port is None and monitor.serial_is_shared(serial):
            raise QueueError(ambiguous_serial(selector, serial, monitor.find(serial)))
        board = present[0] if present else None
        known = self.daemon.config.board_by_serial(serial, port) or canbus.can_board(self.daemon.config, serial)
        if board is None and named is None and known is None:
            where = f" on port {port}" if port else ""
            warnings.append(f"no board with serial {serial}{where} is connected now; the job waits for it")
        return Target(serial, port, known.name if known else None, board, warnings)

    def _cmd_list(self, conn: Connection, request: Request) -> Reply:
        return {"ok": True, "jobs": [j.to_dict() for j in self.daemon.store.jobs() if j.state in (JOB_QUEUED, JOB_RUNNING)]}

    def _cmd_history(self, conn: Connection, request: Request) -> Reply:
        limit = request.get("limit", 50)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
            return error_reply("bad_request", "limit must be a number from 1 to 10000")
        return {"ok": True, "jobs": [j.to_dict() for j in self.daemon.store.history(limit)],
                "batches": [b.to_dict() for b in self.daemon.updates.history(min(limit, 50))]}

    def _cmd_status(self, conn: Connection, request: Request) -> Reply:
        current = None
        if self.daemon.cycle is not None:
            current = dict(self.daemon.cycle.job.to_dict(), phase=self.daemon.cycle.phase, percent=self.daemon.cycle.percent)
        return {
            "ok": True,
            "status": self.daemon.status_text(),
            "current": current,
            "queued": [j.to_dict() for j in self.daemon.store.queued()],
            "klipper_down": self.daemon.klipper_down,
            "state_problem": self.daemon.state_problem(),
            "interrupted": [
                j.to_dict() for j in self.daemon.store.history(10000)
                if j.state == JOB_INTERRUPTED and j.resume_until is not None
            ],
            "update": self.daemon.updates.running.batch.to_dict() if self.daemon.updates.running else None,
            "printer_busy": self.daemon.guard_wait,
            "guard_warning": self.daemon.guard_wait if self.daemon.guard_warning else None,
            "boards": self._boards_reply(),
            "version": __version__,
            "udev": dict(self.daemon.monitor.stats) if self.daemon.monitor is not None else None,
        }

    def _cmd_devices(self, conn: Connection, request: Request) -> Reply:
        return {"ok": True, "boards": self._boards_reply()}

    def _boards_reply(self) -> List[Dict[str, Any]]:
        """USB boards and bridges udev sees, then the configured CAN toolheads (with the
        state of their interface, read now: up, down or missing)."""
        assert self.daemon.monitor is not None
        config = self.daemon.config
        boards = []
        for board in sorted(self.daemon.monitor.boards.values(), key=lambda b: b.device_node):
            named = config.board_by_serial(board.serial, board.port_path)
            queued = self.daemon.store.queued_for(board.serial, board.port_path)
            extra: Dict[str, Any] = {}
            if board.mode == MODE_BRIDGE:
                extra["interface_state"] = canbus.read_interface(board.interface).state if board.interface else "missing"
                extra["canbus_uuid"] = canbus.bridge_uuid(config, board.serial)
            boards.append(dict(board.to_dict(), name=named.name if named else None,
                               queued_job=queued.id if queued else None, **extra))
        for named in config.boards.values():
            node = cancycle.node_board(config, named.canbus_uuid or "") if not named.serial else None
            if node is None:
                continue
            queued = self.daemon.store.queued_for(node.serial)
            boards.append(dict(node.to_dict(), name=named.name, queued_job=queued.id if queued else None,
                               canbus_uuid=node.serial,
                               interface_state=canbus.read_interface(node.interface or "").state))
        return boards

    def _cmd_cancel(self, conn: Connection, request: Request) -> Reply:
        job = self.daemon.store.cancel(_string(request, "job"))
        self.daemon.log_job(logging.INFO, "cancelled by user", job, result=JOB_CANCELLED)
        self.daemon.notify_watchers(job, {"event": "end", "job": job.to_dict()})
        self.daemon.update_status()
        return {"ok": True, "job": job.to_dict()}

    def _cmd_watch(self, conn: Connection, request: Request) -> Optional[Reply]:
        if "batch" in request:
            batch_id = _string(request, "batch")
            batch = self.daemon.updates.watch(conn, batch_id)
            if batch is None:
                return error_reply("rejected", f"no such update: {batch_id[:40]!r}")
            conn.send({"ok": True, "batch": batch.to_dict()})
            if conn.watching is None:
                conn.send({"event": "end", "batch": batch.to_dict()})
                conn.finish()
            else:
                self.daemon.keepalive.arm()
            return None
        job = self.daemon.store.get(_string(request, "job"))
        conn.send({"ok": True, "job": job.to_dict()})
        if job.state not in (JOB_QUEUED, JOB_RUNNING):
            conn.send({"event": "end", "job": job.to_dict(), "job_id": job.id})
            conn.finish()
            return None
        conn.watching = job.id
        self.daemon.keepalive.arm()
        if self.daemon.cycle is not None and self.daemon.cycle.job.id == job.id:
            conn.send({"event": "phase", "phase": self.daemon.cycle.phase, "percent": self.daemon.cycle.percent, "job_id": job.id})
        elif self.daemon.guard_wait:
            conn.send({"event": "phase", "phase": "waiting for printer", "message": self.daemon.guard_wait, "job_id": job.id})
        return None


class _Mismatch(QueueError):
    """The image is built for another MCU than the board's (reply code "mismatch")."""


def _string(request: Request, key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise QueueError(f"request needs {key!r} as a non-empty string")
    return value


def _flag(request: Request, key: str) -> bool:
    """A true/false option; anything else is refused (bool("no") would mean --force)."""
    value = request.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise QueueError(f"{key!r} must be true or false")
    return value


def _optional_string(request: Request, key: str) -> Optional[str]:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise QueueError(f"{key!r} must be a string")
    return value
