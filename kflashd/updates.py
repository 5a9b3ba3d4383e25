"""The daemon's side of `kflashctl update`: starting a batch, its record, and its host duties.

batch.py tells the story of one printer's update in a worker thread; this module is what
the loop thread keeps about it: the running batch (at most one), its record on disk
(`state_dir/batches/<id>.json`, for `history`), the watchers that follow it, STATUS
("Updating 2/3: ebb 41%"), and the `BatchHost` calls the worker makes, each carried over
to the loop with `call_soon_threadsafe`. The rule it keeps for the scheduler: while a batch
holds Klipper stopped (or waits to), no single job's cycle starts, and a batch's own jobs
are never flashed by the single-job scheduler while the batch runs.
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import hashlib
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from . import journal, staging
from .batch import BatchHost, BatchRun
from .batch_records import BATCH_FINAL, S_INTERRUPTED, S_WAITING, Batch, BatchBoard, new_batch
from .build import BuildResult
from .cycle import DONE, INTERRUPTED, Outcome
from .errors import QueueError
from .models import JOB_DONE, JOB_FAILED, JOB_INTERRUPTED, JOB_RUNNING, Board, Job
from .store import JOB_ID_RE, atomic_write

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("kflashd")

KEEP_BATCHES = 50


def watch_key(batch_id: str) -> str:
    """What a connection following a batch has as `watching` (never a job id: those are hex)."""
    return f"batch:{batch_id}"


class RunningBatch:
    def __init__(self, batch: Batch) -> None:
        self.batch = batch  # the loop's latest snapshot
        self.abort = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.wants_klipper = threading.Event()  # the worker asked for the stop
        self.holds_klipper = threading.Event()  # granted: no single cycle starts


class Updates(BatchHost):
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.facts = daemon.facts  # what the boards' Katapult said (boardfacts.py), for the batch's cycles
        self.running: Optional[RunningBatch] = None
        self.directory = os.path.join(daemon.config.state_dir, "batches")
        self._start_failed = False  # the running batch's start of Klipper failed

    # ---------------------------------------------------------------- records ------

    def load(self) -> None:
        """A batch left unfinished by a stopped or crashed daemon ends "interrupted"; its
        staged jobs stay queued (flashed when their board waits in Katapult)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for batch in self.history(10 * KEEP_BATCHES):
            if batch.state not in BATCH_FINAL:
                batch.state = S_INTERRUPTED
                batch.message = "interrupted: kflashd stopped during the update; " + batch.summary()
                batch.finished = time.time()
                self._save(batch)

    def history(self, limit: int) -> List[Batch]:
        batches: List[Batch] = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json") or not JOB_ID_RE.match(name[:-5]):
                continue
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    batches.append(Batch.from_dict(json.loads(f.read())))
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning(f"batch record {name} unreadable: {e}")
        batches.sort(key=lambda b: b.created, reverse=True)
        return batches[:limit]

    def _prune(self) -> None:
        """Keep the records of the newest KEEP_BATCHES updates (their jobs prune themselves)."""
        for old in self.history(10 * KEEP_BATCHES)[KEEP_BATCHES:]:
            try:
                os.unlink(os.path.join(self.directory, f"{old.id}.json"))
            except OSError:
                pass

    def _save(self, batch: Batch) -> None:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            atomic_write(os.path.join(self.directory, f"{batch.id}.json"),
                         json.dumps(batch.to_dict(), indent=1).encode())
        except OSError as e:
            log.error(f"cannot save the record of update {batch.id}: {e.strerror or e}")

    # ---------------------------------------------------------------- loop side ------

    def start(self, names: List[str], all_boards: bool, force: bool) -> Batch:
        """Start a batch over the named boards (or every board with a kconfig)."""
        config = self.daemon.config
        if self.running is not None:
            raise QueueError(f"update {self.running.batch.id} is running; follow it with "
                             f"`kflashctl update --wait` or wait for it to end")
        if all_boards and names:
            raise QueueError("give board names or --all, not both")
        if all_boards:
            boards = [b for b in config.boards.values() if b.kconfig]
            if not boards:
                raise QueueError("no board has a kconfig: add `kconfig = \"/path/to/saved.config\"` "
                                 "to its [boards.NAME] table (docs/config.md)")
        elif names:
            boards = []
            for name in dict.fromkeys(names):
                board = config.board_by_name(name)
                if board is None:
                    known = ", ".join(sorted(config.boards)) or "none configured"
                    raise QueueError(f"unknown board {name!r}: `update` takes board names from the "
                                     f"config (known: {known})")
                if not board.kconfig:
                    raise QueueError(f"boards.{name} has no kconfig: save its Klipper .config and set "
                                     f"`kconfig` (docs/config.md)")
                boards.append(board)
        else:
            raise QueueError("name the boards to update, or give --all")
        bridges = self.daemon.monitor.bridges() if self.daemon.monitor is not None else []
        batch = new_batch(self.daemon.store.new_id(), boards, force, bridges)
        running = RunningBatch(batch)
        self.running = running
        self._save(batch)
        config_now, store = self.daemon.config, self.daemon.store

        def work() -> None:
            try:
                final = BatchRun(self, config_now, store, copy.deepcopy(batch), running.abort).run()
            except Exception as e:  # a bug must not leave the batch running forever
                log.exception(f"update {batch.id}: unexpected error")
                final = copy.deepcopy(running.batch)
                final.state, final.message, final.finished = "failed", f"internal error: {e}", time.time()
            self.daemon.reactor.call_soon_threadsafe(lambda: self._finished(running, final))

        running.thread = threading.Thread(target=work, name=f"update-{batch.id}", daemon=True)
        running.thread.start()
        self.daemon.update_status()
        return batch

    def _finished(self, running: RunningBatch, batch: Batch) -> None:
        if running.thread is not None:
            running.thread.join()
        self.running = None
        self._save(batch)
        self._notify(batch, {"event": "end", "batch": batch.to_dict()})
        if self.daemon.control is not None:
            for conn in self.daemon.control.watchers(watch_key(batch.id)):
                conn.finish()
        if batch.klipper_stops and self.daemon.klipper_down and not self._start_failed:
            log.warning("Klipper was started again: it is no longer down")
            self.daemon.klipper_down = None
        self._start_failed = False
        self._prune()
        if self.daemon.stopping and self.daemon.cycle is None:
            self.daemon.reactor.stop()
            return
        self.daemon.schedule()

    def abort(self) -> bool:
        """Stop signal: end the batch after the board being written. True if one runs."""
        if self.running is None:
            return False
        self.running.abort.set()
        return True

    def holds_klipper(self) -> bool:
        return self.running is not None and self.running.holds_klipper.is_set()

    def grant_if_waiting(self) -> bool:
        """Called by the scheduler when no cycle runs: hand Klipper to a waiting batch."""
        running = self.running
        if running is not None and running.wants_klipper.is_set() and not running.holds_klipper.is_set():
            running.holds_klipper.set()
            return True
        return False

    def owns(self, job: Job) -> bool:
        return self.running is not None and job.batch == self.running.batch.id

    def status_text(self) -> Optional[str]:
        """ "Updating 2/3: ebb 41%": the board being built or flashed, its place in the batch."""
        if self.running is None:
            return None
        batch = self.running.batch
        n = len(batch.boards)
        current = batch.current()
        if current is not None:
            i, board = current
            what = f"{board.percent}%" if board.percent is not None else (board.phase or board.state)
            return f"Updating {i + 1}/{n}: {board.name} {what}"
        boards = f"{n} board{'s' if n != 1 else ''}"
        if batch.state == S_WAITING:
            return f"Updating {boards}: waiting for printer ({batch.message})"
        return f"Updating {boards}: {batch.message or batch.state}"

    def watch(self, conn: Any, batch_id: str) -> Optional[Batch]:
        """Follow a batch: None when unknown; a finished one is sent and the stream ends."""
        if self.running is not None and self.running.batch.id == batch_id:
            conn.watching = watch_key(batch_id)
            return self.running.batch
        for batch in self.history(KEEP_BATCHES):
            if batch.id == batch_id:
                return batch
        return None

    def _publish(self, batch: Batch) -> None:
        if self.running is None or self.running.batch.id != batch.id:
            return
        before = [(b.state, b.job) for b in self.running.batch.boards], self.running.batch.state
        self.running.batch = batch
        if before != ([(b.state, b.job) for b in batch.boards], batch.state):
            self._save(batch)  # the record follows states; phases and percents are only live
        self._notify(batch, {"event": "batch", "batch": batch.to_dict()})
        self.daemon.update_status()

    def _notify(self, batch: Batch, event: Dict[str, Any]) -> None:
        if self.daemon.control is None:
            return
        for conn in self.daemon.control.watchers(watch_key(batch.id)):
            conn.send(event)

    def _on_loop(self, fn: Any) -> Any:
        """Run `fn` on the loop thread and return its result to the calling worker."""
        future: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the worker, which decides
                future.set_exception(e)

        self.daemon.reactor.call_soon_threadsafe(call)
        return future.result()

    # ---------------------------------------------------------------- BatchHost ------
    # Called from the batch's worker thread.

    def batch_changed(self, batch: Batch) -> None:
        snapshot = copy.deepcopy(batch)
        self.daemon.reactor.call_soon_threadsafe(lambda: self._publish(snapshot))

    def stage_built(self, batch: Batch, board: BatchBoard, image: bytes, result: BuildResult) -> Job:
        # The byte checks of a queued image, here in the batch's worker as the staging
        # worker runs them for `queue`; then the loop's decisions (board, MCU, the store).
        sha256 = hashlib.sha256(image).hexdigest()
        checked = staging.check_image(base64.b64encode(image).decode(), sha256,
                                      self.daemon.config.max_image_size)
        if not isinstance(checked, staging.CheckedImage):
            raise QueueError(checked.get("error", "the built image was refused"))
        fields = {"selector": board.name, "force": False, "now": False, "mcu": None, "version": None}

        def stage() -> Job:
            job, _, _ = self.daemon.commands.stage_job(fields, checked, batch=batch.id)
            return job

        return self._on_loop(stage)

    def claim_klipper(self, abort: threading.Event) -> bool:
        running = self.running
        assert running is not None
        running.wants_klipper.set()
        self.daemon.reactor.call_soon_threadsafe(self.daemon.schedule)
        while not running.holds_klipper.wait(0.5):
            if abort.is_set():
                return False
        return not abort.is_set()

    def job_running(self, job: Job, board: Board) -> None:
        # Written here, in the worker, before the flash (the store has its own lock): while
        # Klipper is down the batch does not wait for the loop; the log line follows.
        job.state = JOB_RUNNING
        job.attempts += 1
        job.message = f"flashing {board.device_node}"
        self.daemon.store.update(job)
        record = copy.deepcopy(job)
        self.daemon.reactor.call_soon_threadsafe(lambda: self.daemon.log_job(
            logging.INFO, f"flash started: {board.mode} board at {board.device_node}", record,
            message_id=journal.MSG_FLASH_STARTED))

    def job_finished(self, job: Job, outcome: Outcome) -> None:
        state = {DONE: JOB_DONE, INTERRUPTED: JOB_INTERRUPTED}.get(outcome.kind, JOB_FAILED)
        record = copy.deepcopy(job)

        def finish() -> None:
            if state == JOB_INTERRUPTED:  # what the write record allows (recovery.py)
                self.daemon._finish(record, *self.daemon.recovery.after_interruption(record, outcome.message))
            else:
                self.daemon._finish(record, state, outcome.message)

        self._on_loop(finish)

    def wait_for_board(self, serial: str, mode: Union[str, Tuple[str, ...]], timeout: float, abort: threading.Event,
                       port: Optional[str] = None, rom_port: Optional[str] = None) -> Optional[Any]:
        return self.daemon.wait_for_board(serial, mode, timeout, abort, port=port, rom_port=rom_port)

    def klipper_start_failed(self, job: Optional[Job], message: str) -> None:
        def update() -> None:
            self._start_failed = True

        self.daemon.reactor.call_soon_threadsafe(update)
        self.daemon.klipper_start_failed(job, message)
