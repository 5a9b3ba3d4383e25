"""One flash cycle for one job and one board, run in the daemon's worker thread.

The order is docs/design.md's ("The flash cycle") and it is the safety argument, so it
reads top to bottom in `FlashCycle.run()`: refuse a wrong image before anything is touched, ask the print guard,
stop Klipper (crash marker and sudo check first: `klipper_stop.KlipperStop`), reboot the
board into Katapult if it runs Klipper, check the device is still there, record "writing
started" (fsynced), flash (Katapult, then `make flash`), record "written" with the tool's
result, wait for the board to come back, start Klipper (on every path), and
look for proof that the new firmware runs.

The steps while Klipper is down (`flash_in_stop`) do not own the stop: a batch
(`kflashctl update`, batch.py) runs them for several boards inside one stop of its own.

The worker gets plain data (Job, Board, Config) and talks to the loop only through the
`CycleHost` callbacks; it never touches pyudev or the control socket.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, MutableMapping, Optional, Tuple

from . import bootloader, cancycle, canbus, flasher, guard, instances
from .boardcheck import BoardCheck
from .boardfacts import BoardFactsStore
from .config import Config
from .errors import DiscoveryError, Interrupted, KflashError, ServiceError, StateWriteError
from .models import (
    KLIPPER_MODES,
    MODE_BRIDGE,
    MODE_CAN_NODE,
    MODE_KATAPULT,
    WRITE_DONE,
    WRITE_STARTED,
    Board,
    FlashResult,
    Job,
    RomBootloader,
)
from .klipper_stop import KlipperStop
from .store import JobStore

# Outcomes the loop acts on.
DONE = "done"
FAILED = "failed"
BUSY = "busy"  # the printer is printing: nothing touched, retry later
INTERRUPTED = "interrupted"

# Phases shown by STATUS and streamed to `kflashctl queue --wait`.
PHASE_GUARD = "checking printer"
PHASE_STOPPING = "stopping Klipper"
PHASE_BOOTLOADER = "rebooting into Katapult"
PHASE_FLASHING = "flashing"
PHASE_VERIFYING = "verifying"
PHASE_FALLBACK = "flashing via make flash"
PHASE_REBOOT = "waiting for reboot"
PHASE_STARTING = "starting Klipper"


@dataclass
class Outcome:
    kind: str
    message: str
    result: Optional[FlashResult] = None
    warning: bool = False  # BUSY because of a configuration error (the guard cannot ask)


def job_fields(job: Job) -> Dict[str, str]:
    """The journal fields that tie a message to one job: `journalctl KFLASHD_JOB=…` (and to
    its batch: `journalctl KFLASHD_BATCH=…`)."""
    fields = {"KFLASHD_JOB": job.id, "KFLASHD_BOARD": job.label, "KFLASHD_SERIAL": job.serial}
    if job.batch:
        fields["KFLASHD_BATCH"] = job.batch
    return fields


class JobLog(logging.LoggerAdapter):
    """A logger for the flash core's own messages that names the board and the job."""

    def __init__(self, logger: logging.Logger, job: Job) -> None:
        super().__init__(logger, {})
        self.job = job

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> Tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        fields = job_fields(self.job)
        fields.update(extra.get("journal_fields") or {})
        extra["journal_fields"] = fields
        kwargs["extra"] = extra
        return f"[{self.job.label} job {self.job.id}] {msg}", kwargs


class CycleHost:
    """What the cycle needs from the daemon; every method is safe to call from the worker."""

    def phase(self, job: Job, phase: str, percent: Optional[int] = None) -> None:
        raise NotImplementedError

    def wait_for_board(
        self, serial: str, mode: "str | Tuple[str, ...]", timeout: float, abort: threading.Event,
        port: Optional[str] = None, rom_port: Optional[str] = None,
    ) -> Optional[Any]:
        """The board in `mode`; with `rom_port`, also a RomBootloader on that USB port."""
        raise NotImplementedError

    def klipper_start_failed(self, job: Job, message: str) -> None:
        raise NotImplementedError


def image_matches_board(image_mcu: Optional[str], board: Board, config: Config) -> Optional[str]:
    """Why an image built for `image_mcu` must not go onto this board, or None when it may.

    flashtool.py sends COMPLETE even after its own MCU check fails, so this check, done
    before Klipper is touched, is the one that protects the board.
    """
    if not image_mcu:
        return None
    expected = [("the board", board.mcu)]
    named = config.board_by_serial(board.serial)
    if named is not None and named.mcu:
        expected.append((f"boards.{named.name}.mcu", named.mcu))
    for what, mcu in expected:
        if mcu and mcu.lower() != image_mcu.lower():
            return (
                f"image is built for {image_mcu} but {what} is {mcu}: refusing to flash "
                f"(queue it again with --force only if you are sure)"
            )
    return None


def flash_target(board: Board) -> str:
    """The path the flash tools get: the board's /dev/serial/by-id link, checked to point
    at the node udev reported (else its by-path link, which is unique where boards share
    a serial and so their by-id name). Never a bare /dev/ttyACMn: after a replug that node
    may belong to another board. Raises DiscoveryError when no link leads to the board.
    """
    flasher.verify_device_path(board.device_node)
    node = os.path.realpath(board.device_node)
    for link in (board.by_id, board.by_path):
        if link and os.path.realpath(link) == node:
            return link
    raise DiscoveryError(
        f"Device no longer connected: {board.device_node} is no longer board {board.serial} "
        f"(its /dev/serial links lead elsewhere or are gone: unplugged or reset?); nothing "
        f"was written"
    )


def still_connected(board: Board) -> bool:
    """The board's node is there and a by-id/by-path link of it still points at it: a node
    that another board took over after an unplug does not count."""
    try:
        flash_target(board)
    except DiscoveryError:
        return False
    return True


class FlashCycle:
    def __init__(
        self,
        host: CycleHost,
        config: Config,
        store: JobStore,
        job: Job,
        board: Board,
        abort: threading.Event,
        facts: Optional[BoardFactsStore] = None,
    ) -> None:
        self.host = host
        self.config = config
        self.store = store
        self.job = job
        self.board = board
        self.abort = abort
        self.log = JobLog(logging.getLogger("kflashd.cycle"), job)
        self.unrecorded: Optional[str] = None  # why the "written" record could not be saved
        self.checks = BoardCheck(config, facts or BoardFactsStore(config.state_dir), job, self.log)
        self.returned: Optional[Board] = None  # the board back in Klipper mode after the flash
        self.api_sockets: List[str] = []  # every instance's socket, for the version proof

    def run(self) -> Outcome:
        """One board's whole story, Klipper stopped and started by this job alone."""
        job, config = self.job, self.config
        refusal = self.refusal()
        if refusal:
            return Outcome(FAILED, refusal)

        self.host.phase(job, PHASE_GUARD)
        # Every instance is asked; any one printing (or unknown while its unit runs) holds.
        verdict, asked = instances.check_all(config)
        if verdict.busy:
            return Outcome(BUSY, verdict.reason, warning=verdict.warning)
        self.api_sockets = [i.socket for i in asked if i.socket]
        self.log.info(f"print guard: {verdict.reason}")

        refusal = self.can_refusal()
        if refusal:
            return Outcome(FAILED, refusal)

        try:
            image_path = self.checked_image()
        except KflashError as e:
            return Outcome(FAILED, str(e))

        if self.abort.is_set():  # stopping before anything was touched: leave it all as it is
            return Outcome(INTERRUPTED, "not started: kflashd is stopping")
        self.host.phase(job, PHASE_STOPPING)
        stop = KlipperStop(config, self.log, {"job": job.id, "serial": self.board.serial},
                           lambda message: self.host.klipper_start_failed(job, message))
        try:
            with stop:
                outcome = self.flash_in_stop(image_path)
                self.host.phase(job, PHASE_STARTING)
        except ServiceError as e:
            return Outcome(FAILED, f"Klipper could not be stopped, nothing was flashed: {e}")
        return self.after_start(outcome, stop.start_failure)

    def refusal(self) -> Optional[str]:
        """Why this job's image must not go onto this board, or this board must not be sent
        to its bootloader (checked before Klipper is touched; boardcheck.py)."""
        if not self.job.force:
            refusal = image_matches_board(self.job.image_mcu, self.board, self.config)
            if refusal:
                return refusal
        if self.board.mode == MODE_CAN_NODE:
            return None  # a CAN toolhead: can_refusal()
        try:
            return self.checks.before(self.board, self.store.read_image(self.job))
        except KflashError as e:
            return str(e)

    def can_refusal(self) -> Optional[str]:
        """CAN: why not now (the bus missing or down, a toolhead in Katapult that is another
        MCU), asked read-only after the print guard and before Klipper is touched; a batch
        asks it for each CAN board before its one stop (cancycle's docstring)."""
        refusal = cancycle.bus_refusal(self.board)
        if refusal is None and self.board.mode == MODE_CAN_NODE:
            refusal = cancycle.preflight_node(self.board, self.config, self.job.image_mcu, self.job.force,
                                              self.abort, self.log)  # type: ignore[arg-type]
        return f"{refusal}; Klipper was not touched" if refusal else None

    def after_start(self, outcome: Outcome, start_failure: Optional[str]) -> Outcome:
        """The job's outcome once Klipper was started again: a failed start is said in the
        job's own record (`queue --wait` and `history` show it; a "done" alone would read as
        "all is well" with Klipper down), else a done flash looks for its proof."""
        if self.unrecorded is not None:
            # The board has what the tool wrote, but the disk says "writing started": the
            # job must not read as a plain success (recovery.py repeats a started write).
            outcome = Outcome(FAILED, f"cannot record the result: {self.unrecorded}; {outcome.message}", outcome.result)
        if start_failure is not None:
            outcome.message += f"; KLIPPER IS NOT RUNNING: starting it again failed: {start_failure}"
        elif outcome.kind == DONE:  # no Klipper to ask otherwise
            self.confirm_version()
        return outcome

    def flash_in_stop(self, image_path: str) -> Outcome:
        """This board's flash while Klipper is stopped (by this job or by a batch): every
        way it can end is an Outcome, so a batch goes on with its next board."""
        try:
            return self._flash_stopped(image_path)
        except Interrupted as e:
            return Outcome(INTERRUPTED, str(e))
        except DiscoveryError as e:
            return Outcome(FAILED, str(e))

    def _flash_stopped(self, image_path: str) -> Outcome:
        """Everything that happens while Klipper is stopped; exceptions end in the caller."""
        job, config = self.job, self.config
        board = self.board
        self._check_abort()  # SIGTERM during the stop: do not send the board to its bootloader
        if board.mode == MODE_CAN_NODE:
            return self._flash_can_node(image_path)
        if board.mode in KLIPPER_MODES:
            self.host.phase(job, PHASE_BOOTLOADER)
            if board.mode == MODE_BRIDGE:
                # Over its own bus; its arrival as 6177 is this cycle's, not a new one.
                self.log.info(f"asking the USB-to-CAN bridge on {board.interface} to reboot into Katapult")
                failure = cancycle.request_bridge_bootloader(board, config, self.abort, self.log)  # type: ignore[arg-type]
                if failure:
                    self._check_abort()
                    return Outcome(FAILED, failure)
            else:
                self.log.info(f"asking {board.device_node} to reboot into Katapult")
                bootloader.request_bootloader(board.device_node)
            found = self.host.wait_for_board(board.serial, MODE_KATAPULT, config.timeout_bootloader, self.abort,
                                             port=board.port_path, rom_port=board.port_path)
            self._check_abort()
            if isinstance(found, RomBootloader):
                return Outcome(FAILED, self.checks.in_rom_bootloader(board, found))
            if found is None:
                return Outcome(
                    FAILED,
                    f"board {board.serial} did not come back in Katapult within "
                    f"{config.timeout_bootloader:g} s after the reboot request (is Katapult "
                    f"installed on it? double-tap reset to enter it by hand)",
                )
            board = self.board = found
            refusal = self.checks.after_reboot(board, self.store.read_image(job), lambda timeout: self.host.wait_for_board(
                board.serial, KLIPPER_MODES, timeout, self.abort, port=board.port_path))
            if refusal:
                return Outcome(FAILED, refusal)

        # Unplugged, or its node now belongs to another board: never flash by a stale node.
        target = flash_target(board)
        self.host.phase(job, PHASE_FLASHING, 0)
        refused = self._announce_write()
        if refused is not None:
            return refused
        result = flasher.flash_device(
            target,
            image_path,
            config.katapult_dir,
            config.klipper_dir,
            timeout=config.timeout_flash,
            baud=config.katapult_baud,
            progress=self._progress,
            abort=self.abort,
            log=self.log,  # type: ignore[arg-type]
            device_present=lambda: still_connected(board),
        )
        self._record_result(result)
        if not result.success:
            return Outcome(FAILED, result.error_message or "flash failed", result)
        done = f"flashed via {result.method} in {result.elapsed_seconds:.1f} s"
        if self.abort.is_set():  # the image is written: that is a success, not an interruption
            return Outcome(DONE, f"{done} (reboot not awaited: kflashd was stopping)", result)

        if config.timeout_reboot > 0:
            self.host.phase(job, PHASE_REBOOT)
            # A USB-to-CAN bridge comes back as 606f (no tty), any other board as 614e.
            back = self.host.wait_for_board(
                board.serial, KLIPPER_MODES, config.timeout_reboot, self.abort, port=board.port_path
            )
            self.returned = back
            if back is None and self.abort.is_set():
                return Outcome(DONE, f"{done} (reboot not awaited: kflashd was stopping)", result)
            if back is None:
                return Outcome(
                    FAILED,
                    f"flashed via {result.method}, but the board did not come back in Klipper "
                    f"mode within {config.timeout_reboot:g} s: the new firmware may not boot",
                    result,
                )
        return Outcome(DONE, done, result)

    def _flash_can_node(self, image_path: str) -> Outcome:
        """A CAN toolhead: flashtool.py sends it to Katapult and flashes it in one run."""
        job, config, board = self.job, self.config, self.board
        self.host.phase(job, PHASE_FLASHING, 0)
        refused = self._announce_write()
        if refused is not None:
            return refused
        iface = board.interface or canbus.DEFAULT_INTERFACE
        result = flasher.flash_device(
            iface, image_path, config.katapult_dir, None, timeout=config.timeout_flash,
            progress=self._progress, abort=self.abort, log=self.log,  # type: ignore[arg-type]
            target=canbus.target_args(iface, board.serial),
        )
        self._record_result(result)
        if not result.success:
            return Outcome(FAILED, result.error_message or "flash failed", result)
        # No udev event tells that a CAN node booted: Klipper reporting the new version
        # for the [mcu] whose canbus_uuid names it is the proof (_confirm_version).
        return Outcome(DONE, f"flashed via {result.method} over {iface} in {result.elapsed_seconds:.1f} s", result)

    def _progress(self, phase: str, percent: int) -> None:
        shown = PHASE_VERIFYING if phase == "verify" else PHASE_FLASHING
        if phase == "make_flash":
            shown = PHASE_FALLBACK
        self.host.phase(self.job, shown, percent)

    def _check_abort(self) -> None:
        if self.abort.is_set():
            raise Interrupted("flash interrupted: kflashd is stopping")

    def checked_image(self) -> str:
        self.store.read_image(self.job)  # re-checks the sha256 of the staged bytes
        return self.store.image_path(self.job)

    def _announce_write(self) -> Optional[Outcome]:
        """Write ahead, fsynced, "writing started" with the board's USB port, before the
        flash tool may write a byte; an Outcome (nothing written) when the disk refuses:
        a write that could not be announced would, after a crash, look like none at all."""
        job = self.job
        job.write = WRITE_STARTED
        job.write_started = time.time()
        job.write_port = self.board.port_path
        job.write_device = self.board.device_node
        job.message = f"writing {self.board.device_node or self.board.serial}"
        try:
            self.store.update(job)
        except StateWriteError as e:
            return Outcome(FAILED, f"cannot record the start of the write: {e.reason}; nothing was written")
        return None

    def _record_result(self, result: FlashResult) -> None:
        """Write ahead "written" with the tool's result, unless a stop cut the tool short
        (then the record stays "started": the board holds half an image). A disk that
        refuses is remembered: the job ends failed with the reason (`after_start`)."""
        job = self.job
        job.results.append(result)
        if not result.success:
            self._check_abort()
        job.write = WRITE_DONE
        job.message = f"written to {self.board.device_node or self.board.serial}"
        try:
            self.store.update(job)
        except StateWriteError as e:
            self.unrecorded = e.reason
            self.log.error(f"cannot record the result of the write: {e}")

    def confirm_version(self) -> None:
        """Proof of success: Klipper reports the image's version for this MCU (best effort).

        "This MCU" is the [mcu] / [mcu NAME] section whose serial names the board just
        flashed (guard.query_mcu_version_for): a toolhead board is asked for as "mcu EBB",
        and another board's version (often the same build) never counts as proof.
        """
        job = self.job
        if not job.image_version:
            return
        deadline = time.monotonic() + max(self.config.timeout_reboot, 2.0)
        version = None
        uuid = cancycle.uuid_of(self.returned or self.board, self.config)
        sockets = self.api_sockets or instances.api_sockets(self.config)
        while time.monotonic() < deadline and not self.abort.is_set():
            for socket in sockets:
                if uuid is not None:  # a CAN node or a bridge: its [mcu] names it by canbus_uuid
                    version = canbus.query_mcu_version_for_uuid(socket, uuid)
                else:
                    # With several instances, only a section that names the board counts.
                    version = guard.query_mcu_version_for(
                        socket, self.board.serial, by_path=self.board.by_path, lone_mcu=len(sockets) == 1
                    )
                if version is not None:
                    break
            if version == job.image_version:
                break
            # The job is done only when this answers: a short poll (two small API queries)
            # ends it soon after Klipper reports the version (0.2 s added ~100 ms a job).
            self.abort.wait(0.05)
        job.mcu_version_after = version
        job.version_confirmed = version == job.image_version
