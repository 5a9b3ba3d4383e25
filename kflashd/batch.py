"""A printer's update (`kflashctl update`): build every board, skip the current, flash the rest
inside ONE stop of Klipper.

The batch is a composite in fwupd's sense: stopping Klipper is its prepare, starting it its
cleanup (on every path), and each board is written in its turn with its own job and record.
The story, as `BatchRun.run()` tells it, in the worker thread:

1. While Klipper keeps running, board by board: the version Klipper reports for the board's
   `[mcu ...]` against the tree's (`build.tree_version`); equal means skipped (unless
   --force); else a build from the board's saved kconfig, staged as a job with every check
   a queued image gets.
2. The print guard is asked; a print means wait and ask again (nothing is stopped).
3. One stop of Klipper (`klipper_stop.KlipperStop`): the jobs in `flash_order` (CAN
   toolheads, USB boards, the USB-to-CAN bridge last, since it carries the toolheads' bus),
   each one `FlashCycle.flash_in_stop()`: a failure ends that board only, except that
   nothing is flashed over a bus whose bridge failed. A stop signal ends the batch after
   the board being written; the rest stay queued.
4. Klipper started once; each flashed board's version confirmed; one summary.

One board's flash steps stay in cycle.py, the batch's data and its order in
batch_records.py; this module owns the sequence and the one stop. It gets plain data and
talks to the daemon only through `BatchHost`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, List, MutableMapping, Optional, Tuple, Union

from . import build, canbus, cancycle, guard, instances
from .batch_records import (
    B_BUILD_FAILED, B_BUILDING, B_DONE, B_FAILED, B_FLASHING, B_INTERRUPTED, B_NOT_FLASHED, B_QUEUED,
    B_SKIPPED, BOARD_FINAL, KIND_CAN_BRIDGE, KIND_CAN_TOOLHEAD, S_DONE, S_FAILED, S_FLASHING,
    S_INTERRUPTED, S_WAITING, Batch, BatchBoard,
)
from .config import BoardConfig, Config
from .cycle import DONE, FAILED, INTERRUPTED, PHASE_STARTING, PHASE_STOPPING, CycleHost, FlashCycle, Outcome
from .errors import KflashError, ServiceError
from .klipper_stop import KlipperStop
from .models import JOB_QUEUED, KLIPPER_MODES, MODE_KATAPULT, MODE_KLIPPER, Board, Job
from .store import JobStore

class BatchHost(CycleHost):
    """What a batch needs from the daemon; every method is safe to call from the worker."""

    def batch_changed(self, batch: Batch) -> None:
        raise NotImplementedError

    def stage_built(self, batch: Batch, board: BatchBoard, image: bytes, result: build.BuildResult) -> Job:
        """Stage a built image as the board's job (the checks of `queue`); QueueError if refused."""
        raise NotImplementedError

    def claim_klipper(self, abort: threading.Event) -> bool:
        """Wait until no single job's cycle runs, then keep them from starting; False on abort."""
        raise NotImplementedError

    def job_running(self, job: Job, board: Board) -> None:
        raise NotImplementedError

    def job_finished(self, job: Job, outcome: Outcome) -> None:
        raise NotImplementedError


class BatchLog(logging.LoggerAdapter):
    """Names the batch in every line and gives it the KFLASHD_BATCH field."""

    def __init__(self, logger: logging.Logger, batch: Batch) -> None:
        super().__init__(logger, {})
        self.batch = batch

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> Tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        fields = {"KFLASHD_BATCH": self.batch.id}
        fields.update(extra.get("journal_fields") or {})
        extra["journal_fields"] = fields
        kwargs["extra"] = extra
        return f"[update {self.batch.id}] {msg}", kwargs


class BatchRun(CycleHost):
    """The worker side of one batch (see the module docstring for the story).

    It is the CycleHost of the FlashCycles it runs: their phases become its boards' phase
    and percent; everything else goes to the daemon.
    """

    def __init__(self, host: BatchHost, config: Config, store: JobStore, batch: Batch,
                 abort: threading.Event) -> None:
        self.host = host
        self.config = config
        self.store = store
        self.batch = batch
        self.abort = abort
        self.log = BatchLog(logging.getLogger("kflashd.batch"), batch)

    def _changed(self) -> None:
        self.host.batch_changed(self.batch)

    # CycleHost, for the FlashCycles of this batch
    def phase(self, job: Job, phase: str, percent: Optional[int] = None) -> None:
        for board in self.batch.boards:
            if board.job == job.id and (board.phase, board.percent) != (phase, percent):
                board.phase, board.percent = phase, percent
                self._changed()

    def wait_for_board(self, serial: str, mode: Union[str, Tuple[str, ...]], timeout: float,
                       abort: threading.Event, port: Optional[str] = None,
                       rom_port: Optional[str] = None) -> Optional[Any]:
        return self.host.wait_for_board(serial, mode, timeout, abort, port=port, rom_port=rom_port)

    def klipper_start_failed(self, job: Optional[Job], message: str) -> None:  # type: ignore[override]
        self.host.klipper_start_failed(job, message)  # type: ignore[arg-type]

    def run(self) -> Batch:
        batch = self.batch
        self.log.info(f"update started: {', '.join(b.name for b in batch.boards)}"
                      + (" (forced)" if batch.force else ""))
        jobs = self._build_all()
        if jobs and not self.abort.is_set():
            self._flash_all(jobs)
        for board in batch.boards:
            if board.state not in BOARD_FINAL and board.state != B_QUEUED:
                board.state, board.phase, board.percent = B_NOT_FLASHED, "", None
                board.message = board.message or "not flashed: kflashd is stopping"
        if self.abort.is_set():
            batch.state = S_INTERRUPTED
        elif any(b.state in (B_FAILED, B_BUILD_FAILED, B_NOT_FLASHED, B_INTERRUPTED, B_QUEUED)
                 for b in batch.boards):  # B_QUEUED here: not connected, its job waits
            batch.state = S_FAILED
        else:
            batch.state = S_DONE
        for board in batch.boards:
            if board.state == B_QUEUED and self.abort.is_set():
                board.message = f"still queued (job {board.job}): kflashd stopped before its flash"
        batch.message = batch.summary()
        batch.finished = time.time()
        self.log.info(f"update {batch.state}: {batch.message}",
                      extra={"journal_fields": {"KFLASHD_RESULT": batch.state}})
        return batch

    # ------------------------------------------------------------ 1. builds ------

    def _build_all(self) -> List[Tuple[BatchBoard, Job]]:
        batch, config = self.batch, self.config
        try:
            owner = build.build_user(config.klipper_dir)
            batch.tree_version = build.tree_version(config.klipper_dir, owner, self.abort)
        except KflashError as e:
            for board in batch.boards:
                board.state, board.message = B_BUILD_FAILED, str(e)
            self._changed()
            return []
        self.log.info(f"Klipper tree {config.klipper_dir} is at {batch.tree_version or 'an unknown version'}")
        jobs: List[Tuple[BatchBoard, Job]] = []
        for board in batch.boards:
            if self.abort.is_set():
                break
            board_config = config.board_by_name(board.name)
            if board_config is None or not board_config.kconfig:
                board.state, board.message = B_BUILD_FAILED, f"boards.{board.name} has no kconfig"
                continue
            board.running_version = self._running_version(board)
            if (not batch.force and batch.tree_version is not None
                    and board.running_version == batch.tree_version):
                board.state = B_SKIPPED
                board.message = f"already runs {board.running_version}"
                self.log.info(f"{board.name}: skipped, it already runs {board.running_version}")
                self._changed()
                continue
            job = self._build_one(board, board_config)
            if job is not None:
                jobs.append((board, job))
        return jobs

    def _running_version(self, board: BatchBoard) -> Optional[str]:
        """What Klipper reports for this board's [mcu ...] (None: not known, never "current").

        A CAN toolhead's and a bridge's [mcu] name them by canbus_uuid (a bridge's is
        configured or derived from its USB serial); a USB board's by its serial path.
        """
        sockets = instances.api_sockets(self.config)  # every Klipper instance's
        uuid: Optional[str] = None
        by_path: Optional[str] = None
        if board.kind == KIND_CAN_TOOLHEAD:
            uuid = board.serial
        elif board.kind == KIND_CAN_BRIDGE:
            uuid = canbus.bridge_uuid(self.config, board.serial)
            if not uuid:
                return None
        else:
            present = self.host.wait_for_board(board.serial, MODE_KLIPPER, 0.5, self.abort, port=board.port)
            by_path = present.by_path if present else None
        for api in sockets:
            if uuid is not None:
                version = canbus.query_mcu_version_for_uuid(api, uuid)
            else:  # several instances: only a section that names the board counts
                version = guard.query_mcu_version_for(api, board.serial, by_path=by_path,
                                                      lone_mcu=len(sockets) == 1)
            if version is not None:
                return version
        return None

    def _build_one(self, board: BatchBoard, board_config: BoardConfig) -> Optional[Job]:
        board.state, board.phase, board.percent = B_BUILDING, "building", None
        self._changed()

        def progress(lines: int, percent: Optional[int]) -> None:
            board.phase, board.percent = f"building ({lines} lines)", percent
            self._changed()

        assert board_config.kconfig is not None
        result = build.build_board(board.name, board_config.kconfig, self.config.klipper_dir,
                                   self.config.state_dir, self.config.timeout_build,
                                   self.config.max_image_size, progress, self.abort, self.log)  # type: ignore[arg-type]
        board.phase, board.percent = "", None
        if not result.ok:
            board.state, board.message = B_BUILD_FAILED, result.message
            self.log.error(f"{board.name}: {result.message}")
            self._changed()
            return None
        board.built_version = result.info.version
        try:
            assert result.image is not None
            job = self.host.stage_built(self.batch, board, result.image, result)
        except KflashError as e:
            board.state, board.message = B_BUILD_FAILED, f"built, but not staged: {e}"
            self.log.error(f"{board.name}: {board.message}")
            self._changed()
            return None
        board.state, board.job = B_QUEUED, job.id
        board.message = f"{result.message}, {result.info.version or 'version unknown'}; job {job.id} queued"
        self._changed()
        return job

    # ------------------------------------------------------------ 2-4. one stop ------

    def _flash_all(self, jobs: List[Tuple[BatchBoard, Job]]) -> None:
        batch, config = self.batch, self.config
        if not self.host.claim_klipper(self.abort):
            return
        if not self._printer_idle():
            return
        ready = [prepared for prepared in (self._prepare(board, job) for board, job in jobs) if prepared]
        if not ready or self.abort.is_set():
            return
        batch.state = S_FLASHING
        self._changed()
        owner = {"batch": batch.id, "job": batch.id, "jobs": [job.id for _, job, _, _ in ready]}
        done: List[Tuple[BatchBoard, Job, FlashCycle, Outcome]] = []
        failed_buses: List[str] = []
        stop = KlipperStop(config, self.log, owner,  # type: ignore[arg-type]
                           lambda message: self.host.klipper_start_failed(None, message))  # type: ignore[arg-type]
        self.log.info(f"stopping Klipper once for {len(ready)} board(s)")
        batch.message = PHASE_STOPPING
        self._changed()
        try:
            with stop:
                batch.klipper_stops += 1
                for board, job, cycle, image_path in ready:
                    if self.abort.is_set():
                        break  # the rest stay queued: flashed when their board waits in Katapult
                    if board.kind == KIND_CAN_TOOLHEAD and board.bus in failed_buses:
                        self._not_flashed(board, job, f"not flashed: the bridge carrying {board.bus} failed")
                        continue
                    outcome = self._flash_one(board, job, cycle, image_path)
                    done.append((board, job, cycle, outcome))
                    if outcome.kind != DONE and board.kind == KIND_CAN_BRIDGE and board.bus:
                        failed_buses.append(board.bus)
                batch.message = PHASE_STARTING
                self._changed()
        except ServiceError as e:
            for board, job, _, _ in ready:
                outcome = Outcome(FAILED, f"Klipper could not be stopped, nothing was flashed: {e}")
                self._record(board, job, outcome)
            return
        for board, job, cycle, outcome in done:
            outcome = cycle.after_start(outcome, stop.start_failure)
            self._record(board, job, outcome)

    def _prepare(self, board: BatchBoard, job: Job) -> Optional[Tuple[BatchBoard, Job, FlashCycle, str]]:
        """Everything that can refuse a board before the stop (read-only, Klipper running):
        the board is there, the image suits it, the CAN bus is up, the staged bytes are whole."""
        current = self.store.get(job.id)
        if current.state != JOB_QUEUED:  # cancelled, or replaced by a `queue` for the board
            self._not_flashed(board, job, f"not flashed: its job {job.id} was {current.state} ({current.message})")
            return None
        present = self._find(board)
        if present is None:
            # Not connected now: its job stays queued and waits for the board in Katapult.
            board.message = "not connected: its job waits for the board in Katapult"
            self._changed()
            return None
        cycle = FlashCycle(self, self.config, self.store, job, present, self.abort,
                           facts=getattr(self.host, "facts", None))
        refusal = cycle.refusal() or cycle.can_refusal()
        if refusal:
            self._record(board, job, Outcome(FAILED, refusal))
            return None
        try:
            image_path = cycle.checked_image()
        except KflashError as e:
            self._record(board, job, Outcome(FAILED, str(e)))
            return None
        return board, job, cycle, image_path

    def _find(self, board: BatchBoard) -> Optional[Board]:
        """The board now: a CAN toolhead's record comes from the config (no udev identity)."""
        if board.kind == KIND_CAN_TOOLHEAD:
            return cancycle.node_board(self.config, board.serial)
        for modes in (MODE_KATAPULT, KLIPPER_MODES):
            found = self.host.wait_for_board(board.serial, modes, 0.2, self.abort, port=board.port)
            if found is not None:
                return found
        return None

    def _printer_idle(self) -> bool:
        """The print guard before the stop; a busy printer means wait, never stop."""
        while not self.abort.is_set():
            # Every Klipper instance is asked (instances.check_all), as for a single job.
            verdict, _ = instances.check_all(self.config)
            if not verdict.busy:
                return True
            if self.batch.state != S_WAITING:
                self.batch.state, self.batch.message = S_WAITING, verdict.reason
                what = "print guard cannot ask Klipper" if verdict.warning else "printer busy"
                self.log.log(logging.WARNING if verdict.warning else logging.INFO,
                             f"{what}, the update waits: {verdict.reason}")
                self._changed()
            self.abort.wait(self.config.guard_retry)
        return False

    def _flash_one(self, board: BatchBoard, job: Job, cycle: FlashCycle, image_path: str) -> Outcome:
        board.state, board.phase, board.percent = B_FLASHING, "", None
        self._changed()
        try:
            self.host.job_running(job, cycle.board)
        except KflashError as e:  # no record of the flash's start: write nothing (fail closed)
            outcome = Outcome(FAILED, f"not flashed: {e}")
        else:
            outcome = cycle.flash_in_stop(image_path)
        board.phase, board.percent = "", None
        board.state = {DONE: B_DONE, INTERRUPTED: B_INTERRUPTED}.get(outcome.kind, B_FAILED)
        board.message = outcome.message
        self._changed()
        return outcome

    def _not_flashed(self, board: BatchBoard, job: Job, why: str) -> None:
        board.state, board.message = B_NOT_FLASHED, why
        self.log.warning(f"{board.name}: {why}")
        self._changed()

    def _record(self, board: BatchBoard, job: Job, outcome: Outcome) -> None:
        board.state = {DONE: B_DONE, INTERRUPTED: B_INTERRUPTED}.get(outcome.kind, B_FAILED)
        board.message = outcome.message
        if job.version_confirmed:
            board.message += f"; Klipper reports {job.mcu_version_after}"
        elif job.version_confirmed is False:
            board.message += f"; but Klipper reports {job.mcu_version_after!r}, not {job.image_version!r}"
        self.host.job_finished(job, outcome)
        self._changed()
