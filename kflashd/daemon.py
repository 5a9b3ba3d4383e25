"""kflashd, the daemon: one loop that watches udev, serves kflashctl and runs flash cycles.

The loop thread owns pyudev, the control socket, signals, timers and the watchdog; a flash
cycle runs in one worker thread at a time (one board is flashed at a time: every cycle
stops the same Klipper). The worker reports back through `Reactor.call_soon_threadsafe`,
so all daemon state below is touched by the loop thread only, except the board waiters,
which have their own lock.

Shutdown (SIGTERM/SIGINT) never leaves Klipper stopped: the loop sets the abort event,
the worker kills the flash tool's process group, the cycle's context manager starts
Klipper, and only then does the loop stop and send STOPPING=1.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from . import __version__, firmware, journal
from .config import Config, load_config
from .control import Connection, ControlServer, Reply, Request, error_reply
from .cycle import BUSY, DONE, FAILED, INTERRUPTED, PHASE_STOPPING, CycleHost, FlashCycle, Outcome
from .cycle import image_matches_board, job_fields
from .devices import BoardMonitor, serial_from_by_id
from .errors import ConfigError, KflashError, QueueError
from .models import (
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_INTERRUPTED,
    JOB_QUEUED,
    JOB_RUNNING,
    MODE_KATAPULT,
    MODE_KLIPPER,
    Board,
    Job,
)
from .notify import Notifier
from .reactor import NEVER, Reactor
from .store import JobStore

log = logging.getLogger("kflashd")

_SERIAL_RE = re.compile(r"\A[0-9A-Fa-f]{4,64}\Z")  # not "$": it also matches before a final "\n"


class BoardWaiter:
    __slots__ = ("serial", "mode", "event", "board")

    def __init__(self, serial: str, mode: str) -> None:
        self.serial = serial
        self.mode = mode
        self.event = threading.Event()
        self.board: Optional[Board] = None


class RunningCycle:
    """The cycle in the worker thread, as the loop sees it."""

    def __init__(self, job: Job, board: Board) -> None:
        self.job = job
        self.board = board
        self.abort = threading.Event()
        self.phase = "starting"
        self.percent: Optional[int] = None
        self.thread: Optional[threading.Thread] = None
        self.klipper_touched = False  # the cycle stopped (and so restarted) Klipper
        self.start_failed = False


class Daemon(CycleHost):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.reactor = Reactor()
        self.notifier = Notifier()
        self.store = JobStore(config.state_dir)
        self.monitor: Optional[BoardMonitor] = None
        self.control: Optional[ControlServer] = None
        self.cycle: Optional[RunningCycle] = None
        self.stopping = False
        self.klipper_down: Optional[str] = None
        self.guard_wait: Optional[str] = None  # why queued jobs are held back
        self._guard_hold = False  # no cycle starts until the guard's retry timer fires
        self._waiters: List[BoardWaiter] = []
        self._waiters_lock = threading.Lock()
        self._guard_timer = self.reactor.register_timer(self._guard_retry)
        self._klipper_timer = self.reactor.register_timer(self._retry_klipper_start)
        self._klipper_starting = False  # a retry of `systemctl start` runs in a thread
        self._last_status = ""
        self.exit_code = 0

    # ---------------------------------------------------------------- start-up ------

    def run(self) -> int:
        for warning in self.config.check_paths():
            log.warning(warning)
        for problem in self.store.load():
            log.error(problem)
        self._recover_from_crash()

        self.monitor = BoardMonitor()
        present = self.monitor.start()
        self.reactor.register_fd(self.monitor.fileno(), self._on_udev)
        for board in present:
            log.info(f"{board.mode} board {board.serial} ({board.mcu}) at {board.device_node}")
        self._requeue_interrupted()

        self.control = ControlServer(
            self.reactor,
            self.config.control_socket,
            self.config.group,
            self._max_request(),
            self._handle_request,
            log.warning,
        )
        self.control.start()

        for signum in (signal.SIGTERM, signal.SIGINT):
            self.reactor.register_signal(signum, self._on_stop_signal)
        self.reactor.register_signal(signal.SIGHUP, self._on_reload_signal)
        interval = self.notifier.watchdog_interval()
        if interval:
            self.reactor.register_timer(lambda now: self._ping_watchdog(now, interval), 0.0)

        self.notifier.ready()
        log.info(f"kflashd {__version__} ready: {len(self.store.queued())} job(s) queued")
        self._update_status()
        self._schedule()
        try:
            self.reactor.run()
        finally:
            if self.cycle is not None and self.cycle.thread is not None:
                # Only reached if the loop itself failed: let the cycle start Klipper first.
                self.cycle.abort.set()
                self.cycle.thread.join(self.config.timeout_flash + 3 * self.config.timeout_service)
            self.notifier.stopping()
            if self.control is not None:
                self.control.stop()
            self.reactor.close()
        return self.exit_code

    @property
    def _marker_path(self) -> str:
        return os.path.join(self.config.runtime_dir, "cycle.marker")

    def _max_request(self) -> int:
        # The image travels base64-encoded (4/3) inside one JSON line.
        return self.config.max_image_size * 4 // 3 + 64 * 1024

    def _recover_from_crash(self) -> None:
        """A marker means a daemon died with Klipper stopped: start Klipper before anything."""
        from . import service

        marker = self._marker_path
        data: Dict[str, Any] = {}
        try:
            with open(marker, "rb") as f:
                data = json.loads(f.read() or b"{}")
        except FileNotFoundError:
            marker = ""
        except (OSError, ValueError) as e:
            log.error(f"cycle marker {marker} unreadable ({e}); assuming a cycle was cut short")
        if marker:
            services = data.get("services") or self.config.klipper_services
            log.warning(
                f"a previous kflashd (pid {data.get('pid', '?')}) may have left Klipper stopped "
                f"(job {data.get('job', '?')}): starting Klipper now"
            )
            try:
                service.start_services(tuple(services), timeout=self.config.timeout_service)
            except KflashError as e:
                log.critical(
                    f"KLIPPER IS NOT RUNNING: {e}",
                    extra={"journal_fields": {"MESSAGE_ID": journal.MSG_KLIPPER_RESTART_FAILED}},
                )
                self.klipper_start_failed(None, str(e))  # retried; the marker stays till then
            else:
                os.unlink(marker)
        for job in self.store.running():
            self._finish(
                job,
                JOB_INTERRUPTED,
                "interrupted: kflashd stopped during the flash; it is flashed again when the "
                "board waits in Katapult",
            )

    def _requeue_interrupted(self, serial: Optional[str] = None) -> None:
        """Interrupted jobs go again when their board waits in Katapult (half-flashed, most
        likely), whenever it shows up; at start-up (`serial` None) also those interrupted
        before anything was written, which simply wait for their board again."""
        assert self.monitor is not None
        for job in self.store.jobs():
            if job.state != JOB_INTERRUPTED or (serial is not None and job.serial != serial):
                continue
            if self.store.queued_for(job.serial):
                continue
            if self.monitor.find(job.serial, MODE_KATAPULT):
                why = "re-queued: the board waits in Katapult"
            elif serial is None and not job.results:
                why = "re-queued: it was interrupted before anything was written"
            else:
                continue
            self.store.requeue(job, why)
            self._log(logging.INFO, why, job)

    # ---------------------------------------------------------------- events ------

    def _on_udev(self) -> None:
        assert self.monitor is not None
        changed = False
        for action, board in self.monitor.poll():
            changed = True
            log.info(f"{action}: {board.mode} board {board.serial} ({board.mcu}) at {board.device_node}")
            if action == "add":
                self._wake_waiters(board)
                if board.mode == MODE_KATAPULT and self.cycle is None:
                    self._requeue_interrupted(board.serial)
        if changed:
            self._schedule()

    def _on_stop_signal(self, signum: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        name = signal.Signals(signum).name
        if self.cycle is not None:
            log.warning(f"{name}: interrupting the flash of job {self.cycle.job.id}; Klipper is started first")
            self.cycle.abort.set()
            self._set_status("Stopping: interrupting the flash, then starting Klipper")
            with self._waiters_lock:
                for waiter in self._waiters:
                    waiter.event.set()
        elif self._klipper_starting:
            log.info(f"{name}: stopping once the running `systemctl start` returns")
        else:
            log.info(f"{name}: stopping")
            self.reactor.stop()

    def _on_reload_signal(self, _signum: int) -> None:
        self.notifier.reloading()
        path = self.config.path
        try:
            new = load_config(path)
            for warning in new.check_paths():
                log.warning(warning)
        except ConfigError as e:
            log.error(f"reload failed, keeping the old configuration: {e}")
            self.notifier.ready()
            self._update_status()
            return
        for key in ("state_dir", "runtime_dir"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning(f"{key} changed: takes effect at the next restart of kflashd")
                setattr(new, key, getattr(self.config, key))
        self.config = new
        if self.control is not None:
            self.control.reconfigure(new.group, self._max_request())
        log.info(f"configuration reloaded from {path or 'defaults'}")
        self.notifier.ready()
        self._update_status()
        self._schedule()

    def _ping_watchdog(self, now: float, interval: float) -> float:
        self.notifier.watchdog()
        return now + interval

    def _guard_retry(self, now: float) -> float:
        self._guard_hold = False
        self._schedule()
        return NEVER

    # ---------------------------------------------------------------- scheduling ------

    def _schedule(self) -> None:
        """Start a cycle if a queued job's board is ready for it (loop thread only)."""
        busy = self.cycle is not None or self._klipper_starting or self._guard_hold
        if busy or self.stopping or self.monitor is None:
            self._update_status()
            return
        for job in self.store.queued():
            board = self._board_for(job)
            if board is not None:
                self._start_cycle(job, board)
                break
        self._update_status()

    def _board_for(self, job: Job) -> Optional[Board]:
        assert self.monitor is not None
        in_katapult = self.monitor.find(job.serial, MODE_KATAPULT)
        if in_katapult:
            return in_katapult[0]
        if job.now:
            in_klipper = self.monitor.find(job.serial, MODE_KLIPPER)
            if in_klipper:
                return in_klipper[0]
        return None

    def _start_cycle(self, job: Job, board: Board) -> None:
        self.guard_wait = None
        job.state = JOB_RUNNING
        job.attempts += 1
        job.message = f"flashing {board.device_node}"
        self.store.update(job)
        running = RunningCycle(job, board)
        self.cycle = running
        config = self.config
        self._log(
            logging.INFO,
            f"flash started: {board.mode} board at {board.device_node}",
            job,
            message_id=journal.MSG_FLASH_STARTED,
        )

        def work() -> None:
            try:
                outcome = FlashCycle(self, config, self.store, job, board, running.abort).run()
            except Exception as e:  # a bug must not leave the loop waiting forever
                log.exception(f"job {job.id}: unexpected error in the flash cycle")
                outcome = Outcome(FAILED, f"internal error: {e}")
            self.reactor.call_soon_threadsafe(lambda: self._cycle_finished(running, outcome))

        running.thread = threading.Thread(target=work, name=f"flash-{job.id}", daemon=True)
        running.thread.start()

    def _cycle_finished(self, running: RunningCycle, outcome: Outcome) -> None:
        if running.thread is not None:
            running.thread.join()
        self.cycle = None
        job = running.job
        if running.klipper_touched and not running.start_failed and self.klipper_down:
            log.warning("Klipper was started again: it is no longer down")
            self.klipper_down = None
        if outcome.kind == BUSY:
            job.state = JOB_QUEUED
            job.attempts -= 1
            job.message = f"waiting: {outcome.message}"
            self.store.update(job)
            self.guard_wait = outcome.message
            self._guard_hold = True
            self._log(
                logging.INFO,
                f"printer busy, the job waits: {outcome.message}",
                job,
                message_id=journal.MSG_PRINT_GUARD_WAIT,
            )
            self._notify_watchers(job, {"event": "phase", "phase": "waiting for printer", "message": outcome.message})
            self.reactor.update_timer(
                self._guard_timer, self.reactor.monotonic() + self.config.guard_retry
            )
        elif outcome.kind == DONE:
            self._finish(job, JOB_DONE, outcome.message)
        elif outcome.kind == INTERRUPTED:
            self._finish(job, JOB_INTERRUPTED, outcome.message)
        else:
            self._finish(job, JOB_FAILED, outcome.message)
        if self.stopping:
            self.reactor.stop()
            return
        self._schedule()

    def _finish(self, job: Job, state: str, message: str) -> None:
        self.store.finish(job, state, message)
        method = job.results[-1].method if job.results else ""
        if state == JOB_DONE:
            text = f"flash succeeded: {message}"
            if job.version_confirmed is not None:
                text += (
                    f"; Klipper reports {job.mcu_version_after}"
                    if job.version_confirmed
                    else f"; but Klipper reports {job.mcu_version_after!r}, not {job.image_version!r}"
                )
            self._log(logging.INFO, text, job, message_id=journal.MSG_FLASH_SUCCEEDED, method=method, result="done")
        elif state == JOB_INTERRUPTED:
            self._log(logging.WARNING, f"flash interrupted: {message}", job,
                      message_id=journal.MSG_JOB_INTERRUPTED, method=method, result=state)
        elif state == JOB_FAILED:
            self._log(logging.ERROR, f"flash failed: {message}", job,
                      message_id=journal.MSG_FLASH_FAILED, method=method, result=state)
        else:
            self._log(logging.INFO, f"{state}: {message}", job, result=state)
        self.store.prune()
        self._notify_watchers(job, {"event": "end", "job": job.to_dict()})
        for conn in self.control.watchers(job.id) if self.control else []:
            conn.finish()

    # ---------------------------------------------------------------- CycleHost ------

    def phase(self, job: Job, phase: str, percent: Optional[int] = None) -> None:
        def update() -> None:
            if self.cycle is None or self.cycle.job.id != job.id:
                return
            if phase == PHASE_STOPPING:
                self.cycle.klipper_touched = True
            if self.cycle.phase == phase and self.cycle.percent == percent:
                return
            self.cycle.phase, self.cycle.percent = phase, percent
            self._notify_watchers(job, {"event": "phase", "phase": phase, "percent": percent})
            self._update_status()

        self.reactor.call_soon_threadsafe(update)

    def wait_for_board(
        self, serial: str, mode: str, timeout: float, abort: threading.Event
    ) -> Optional[Board]:
        waiter = BoardWaiter(serial, mode)
        with self._waiters_lock:
            self._waiters.append(waiter)
            if abort.is_set():  # a stop signal came before we were on the list to be woken
                waiter.event.set()
        # The board may already be there: ask the loop, which owns the board table.
        self.reactor.call_soon_threadsafe(lambda: self._check_waiter(waiter))
        try:
            waiter.event.wait(timeout)
        finally:
            with self._waiters_lock:
                self._waiters.remove(waiter)
        return waiter.board

    def _check_waiter(self, waiter: BoardWaiter) -> None:
        assert self.monitor is not None
        found = self.monitor.find(waiter.serial, waiter.mode)
        if found:
            waiter.board = found[0]
            waiter.event.set()

    def _wake_waiters(self, board: Board) -> None:
        with self._waiters_lock:
            for waiter in self._waiters:
                if waiter.serial == board.serial and waiter.mode == board.mode:
                    waiter.board = board
                    waiter.event.set()

    def klipper_start_failed(self, job: Optional[Job], message: str) -> None:
        def update() -> None:
            self.klipper_down = message
            if self.cycle is not None:
                self.cycle.start_failed = True
            self.reactor.update_timer(self._klipper_timer, self.reactor.monotonic() + self.config.klipper_retry)
            self._update_status()

        # The flash core has logged it (CRITICAL, MESSAGE_ID); here it becomes STATUS.
        self.reactor.call_soon_threadsafe(update)

    def _retry_klipper_start(self, now: float) -> float:
        """Klipper is down after a failed start: keep trying, off the loop thread."""
        if not self.klipper_down or self.stopping:
            return NEVER
        if self.cycle is not None:  # the cycle's own start is the next try
            return now + self.config.klipper_retry
        from . import service

        services = tuple(self.config.klipper_services)
        timeout = self.config.timeout_service
        self._klipper_starting = True

        def work() -> None:
            try:
                service.start_services(services, timeout=timeout, tries=1)
                error = None
            except KflashError as e:
                error = str(e)
            self.reactor.call_soon_threadsafe(lambda: self._klipper_retry_done(error))

        threading.Thread(target=work, name="klipper-retry", daemon=True).start()
        return NEVER

    def _klipper_retry_done(self, error: Optional[str]) -> None:
        self._klipper_starting = False
        if self.stopping:
            self.reactor.stop()
        if error is None:
            log.warning("Klipper was started again: it is no longer down")
            self.klipper_down = None
            try:
                os.unlink(self._marker_path)
            except FileNotFoundError:
                pass
        else:
            log.error(f"Klipper is still down: {error}; trying again in {self.config.klipper_retry:g} s")
            self.klipper_down = error
            self.reactor.update_timer(self._klipper_timer, self.reactor.monotonic() + self.config.klipper_retry)
        self._update_status()
        self._schedule()

    # ---------------------------------------------------------------- reporting ------

    def _log(
        self,
        level: int,
        message: str,
        job: Optional[Job],
        message_id: Optional[str] = None,
        method: Optional[str] = None,
        result: Optional[str] = None,
        **extra: str,
    ) -> None:
        fields: Dict[str, str] = {}
        if job is not None:
            fields.update(job_fields(job))
            message = f"[{job.label} job {job.id}] {message}"
        if message_id:
            fields["MESSAGE_ID"] = message_id
        if method:
            fields["KFLASHD_METHOD"] = method
        if result:
            fields["KFLASHD_RESULT"] = result
        fields.update(extra)
        log.log(level, message, extra={"journal_fields": fields})

    def _status_text(self) -> str:
        queued = len(self.store.queued())
        jobs = f"{queued} job{'s' if queued != 1 else ''} queued"
        if self.cycle is not None:
            c = self.cycle
            text = f"{c.phase.capitalize()} {c.job.label}"
            if c.phase in ("flashing", "verifying", "flashing via make flash"):
                text = f"{'Flashing' if c.phase == 'flashing' else c.phase.capitalize()} {c.job.label}"
                if c.phase == "flashing":
                    text += " via katapult"
                if c.percent is not None:
                    text += f": {c.percent}%"
        elif self.stopping:
            text = "Stopping"
        elif self.guard_wait and queued:
            text = f"Waiting for the printer ({self.guard_wait}), {jobs}"
        else:
            text = f"Idle, {jobs}" if queued else "Idle, no jobs queued"
        if self.klipper_down:
            text += f"; KLIPPER IS DOWN: {self.klipper_down}"
        return text

    def _update_status(self) -> None:
        text = self._status_text()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def _set_status(self, text: str) -> None:
        self._last_status = text
        self.notifier.status(text)

    def _notify_watchers(self, job: Job, event: Dict[str, Any]) -> None:
        if self.control is None:
            return
        event = dict(event, job_id=job.id)
        for conn in self.control.watchers(job.id):
            conn.send(event)

    # ---------------------------------------------------------------- requests ------

    def _handle_request(self, conn: Connection, request: Request) -> Optional[Reply]:
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
        selector = _string(request, "board")
        image_b64 = _string(request, "image")
        sha256 = _string(request, "sha256").lower()
        force = _flag(request, "force")
        now = _flag(request, "now")
        image_mcu = _optional_string(request, "mcu")
        image_version = _optional_string(request, "version")
        try:
            image = base64.b64decode(image_b64, validate=True)
        except (binascii.Error, ValueError):
            return error_reply("bad_request", "image is not valid base64")
        if not image:
            return error_reply("rejected", "the image is empty")
        if len(image) > self.config.max_image_size:
            return error_reply(
                "rejected",
                f"the image is {len(image)} bytes, more than max_image_size "
                f"({self.config.max_image_size}); is it really a firmware image?",
            )
        if hashlib.sha256(image).hexdigest() != sha256:
            return error_reply("rejected", "the image's sha256 does not match: transfer damaged")
        # The client's word on the MCU is checked against the bytes themselves: a Klipper
        # build embeds its data dictionary (with config.MCU) in klipper.bin.
        embedded = firmware.info_from_image(image)
        if embedded.mcu and image_mcu and embedded.mcu.lower() != image_mcu.lower() and not force:
            return error_reply(
                "mismatch",
                f"the image says it is built for {embedded.mcu}, but its klipper.dict says "
                f"{image_mcu}: a stale klipper.dict? rebuild, or queue again with --force",
            )
        image_mcu = embedded.mcu or image_mcu
        image_version = embedded.version or image_version
        serial, name, board, warnings = self._resolve_selector(selector)
        if board is not None and not force:
            refusal = image_matches_board(image_mcu, board, self.config)
            if refusal:
                return error_reply("mismatch", refusal)
        job = Job(
            id=self.store.new_id(),
            selector=selector,
            serial=serial,
            board_name=name,
            image_sha256=sha256,
            image_size=len(image),
            created=time.time(),
            image_mcu=image_mcu,
            image_version=image_version,
            force=force,
            now=now,
            message="waiting for the board in Katapult" if not now else "waiting for the board",
        )
        replaced = self.store.stage(job, image)
        if replaced is not None:
            warnings.append(f"replaces job {replaced.id}, which was queued for the same board")
            self._notify_watchers(replaced, {"event": "end", "job": replaced.to_dict()})
        if now and board is None:
            warnings.append("--now: the board is not connected; the job waits for it")
        elif now and board is not None and board.mode == MODE_KATAPULT:
            warnings.append("--now: the board already waits in Katapult")
        self._log(
            logging.INFO,
            f"staged: {len(image)} bytes, sha256 {sha256[:12]}"
            + (f", {image_mcu}" if image_mcu else "")
            + (" (forced)" if force else ""),
            job,
            message_id=journal.MSG_JOB_STAGED,
        )
        self.reactor.call_soon_threadsafe(self._schedule)
        return {
            "ok": True,
            "job": job.to_dict(),
            "replaced": replaced.to_dict() if replaced else None,
            "warnings": warnings,
        }

    def _resolve_selector(self, selector: str):
        """Board name, USB serial, or by-id path (either mode) -> (serial, name, board, warnings)."""
        assert self.monitor is not None
        warnings: List[str] = []
        named = self.config.board_by_name(selector)
        if named is not None:
            serial = named.serial
        elif selector.startswith("/dev/"):
            present = [b for b in self.monitor.boards.values() if selector in (b.by_id, b.by_path, b.device_node)]
            by_id_serial = serial_from_by_id(selector)
            if present:
                serial = present[0].serial
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
            names = ", ".join(sorted(self.config.boards)) or "none configured"
            raise QueueError(
                f"unknown board {selector!r}: give a board name from the config (known: {names}), a "
                f"USB serial number, or a /dev/serial/by-id/ path (see `kflashctl devices`)"
            )
        present = self.monitor.find(serial)
        ports = {b.port_path for b in present}
        if len(ports) > 1:
            raise QueueError(
                f"ambiguous board {selector!r}: {len(ports)} connected boards report serial {serial} "
                f"({', '.join(sorted(b.device_node for b in present))}); flash them one at a time"
            )
        board = present[0] if present else None
        if board is None and named is None:
            warnings.append(f"no board with serial {serial} is connected now; the job waits for it")
        config_board = self.config.board_by_serial(serial)
        return serial, (config_board.name if config_board else None), board, warnings

    def _cmd_list(self, conn: Connection, request: Request) -> Reply:
        return {"ok": True, "jobs": [j.to_dict() for j in self.store.jobs() if j.state in (JOB_QUEUED, JOB_RUNNING)]}

    def _cmd_history(self, conn: Connection, request: Request) -> Reply:
        limit = request.get("limit", 50)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
            return error_reply("bad_request", "limit must be a number from 1 to 10000")
        return {"ok": True, "jobs": [j.to_dict() for j in self.store.history(limit)]}

    def _cmd_status(self, conn: Connection, request: Request) -> Reply:
        current = None
        if self.cycle is not None:
            current = dict(self.cycle.job.to_dict(), phase=self.cycle.phase, percent=self.cycle.percent)
        return {
            "ok": True,
            "status": self._status_text(),
            "current": current,
            "queued": [j.to_dict() for j in self.store.queued()],
            "klipper_down": self.klipper_down,
            "printer_busy": self.guard_wait,
            "boards": self._boards_reply(),
            "version": __version__,
            "udev": dict(self.monitor.stats) if self.monitor is not None else None,
        }

    def _cmd_devices(self, conn: Connection, request: Request) -> Reply:
        return {"ok": True, "boards": self._boards_reply()}

    def _boards_reply(self) -> List[Dict[str, Any]]:
        assert self.monitor is not None
        boards = []
        for board in sorted(self.monitor.boards.values(), key=lambda b: b.device_node):
            named = self.config.board_by_serial(board.serial)
            queued = self.store.queued_for(board.serial)
            boards.append(dict(board.to_dict(), name=named.name if named else None,
                               queued_job=queued.id if queued else None))
        return boards

    def _cmd_cancel(self, conn: Connection, request: Request) -> Reply:
        job = self.store.cancel(_string(request, "job"))
        self._log(logging.INFO, "cancelled by user", job, result=JOB_CANCELLED)
        self._notify_watchers(job, {"event": "end", "job": job.to_dict()})
        self._update_status()
        return {"ok": True, "job": job.to_dict()}

    def _cmd_watch(self, conn: Connection, request: Request) -> Optional[Reply]:
        job = self.store.get(_string(request, "job"))
        conn.send({"ok": True, "job": job.to_dict()})
        if job.state not in (JOB_QUEUED, JOB_RUNNING):
            conn.send({"event": "end", "job": job.to_dict(), "job_id": job.id})
            conn.finish()
            return None
        conn.watching = job.id
        if self.cycle is not None and self.cycle.job.id == job.id:
            conn.send({"event": "phase", "phase": self.cycle.phase, "percent": self.cycle.percent, "job_id": job.id})
        elif self.guard_wait:
            conn.send({"event": "phase", "phase": "waiting for printer", "message": self.guard_wait, "job_id": job.id})
        return None


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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kflashd",
        description=(
            "Run the kflashd daemon in the foreground (systemd runs it so). It watches udev for "
            "Klipper boards in the Katapult bootloader and flashes the jobs staged with "
            "`kflashctl queue`, stopping Klipper for the flash and always starting it again."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="config file (default /etc/kflashd/kflashd.toml)")
    parser.add_argument("--version", action="version", version=f"kflashd {__version__}")
    args = parser.parse_args(argv)
    journal.setup_logging()
    try:
        config = load_config(args.config)
        return Daemon(config).run()
    except ConfigError as e:
        log.error(f"configuration error: {e}")
        return 78  # EX_CONFIG: systemd's RestartPreventExitStatus can stop a restart loop
    except KflashError as e:
        log.error(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
