"""Which queued job runs next, and the life of its cycle as the loop sees it.

Owns the choice (board matching, --now, CAN toolheads before their USB-to-CAN bridge, jobs a
`kflashctl update` batch owns left to it), the read-only probe of boards waiting in Katapult,
starting the worker thread, and recording how a cycle ended (`_finish`). Runs on the loop
thread only. Must never touch a board or Klipper itself: the flash cycle (cycle.py) does,
in its worker thread; and never start a cycle while another cycle, a batch, a probe, a
Klipper retry or the print guard's hold is running.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Set

from . import cancycle, canbus, journal
from .boardfacts import BoardFactsStore
from .commands import ambiguous_serial
from .config import Config
from .control import ControlServer
from .cycle import BUSY, DONE, FAILED, INTERRUPTED, PHASE_STOPPING, FlashCycle, Outcome
from .devices import BoardMonitor
from .errors import KflashError, StateWriteError
from .models import (
    JOB_DONE,
    JOB_FAILED,
    JOB_INTERRUPTED,
    JOB_QUEUED,
    JOB_RUNNING,
    MODE_KATAPULT,
    KLIPPER_MODES,
    Board,
    Job,
)
from .reactor import NEVER, Reactor
from .store import JobStore

log = logging.getLogger("kflashd")

#: Seconds between tries to write job records that a full or failing disk refused.
STATE_RETRY = 30.0


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


class Scheduling:
    """The scheduler and the cycle's bookkeeping (a mixin of `Daemon`, which owns the timers
    `_guard_timer`, `_probe_timer`, `_state_timer` and `_bus_timer` and the state they read)."""

    config: Config
    reactor: Reactor
    store: JobStore
    facts: BoardFactsStore
    monitor: Optional[BoardMonitor]
    control: Optional[ControlServer]
    recovery: Any
    updates: Any
    cycle: Optional[RunningCycle]
    stopping: bool
    klipper_down: Optional[str]
    guard_wait: Optional[str]
    guard_warning: bool
    _guard_hold: bool
    _probing: bool
    _probed: Set[str]
    _klipper_starting: bool
    _guard_timer: Any
    _probe_timer: Any
    _state_timer: Any
    _bus_timer: Any

    def schedule(self) -> None:
        """Start a cycle if a queued job's board is ready for it (loop thread only)."""
        busy = self.cycle is not None or self._klipper_starting or self._guard_hold or self._probing
        if self.cycle is None and not self._klipper_starting and not self._probing \
                and self.updates.grant_if_waiting():
            busy = True  # a batch takes Klipper's one stop: no single cycle meanwhile
        if busy or self.updates.holds_klipper() or self.stopping or self.monitor is None:
            if not (self.cycle is not None or self._klipper_starting or self._probing
                    or self.updates.holds_klipper() or self.stopping or self.monitor is None):
                self._probe_next()  # held by the print guard only: a read-only CONNECT may run
            self.update_status()
            return
        for job in canbus.order_jobs(self.store.queued(), self.config, self.monitor.bridges()):
            if self.updates.owns(job):
                continue  # flashed inside the batch's own stop, never on its own
            if job.port is None and self.monitor.serial_is_shared(job.serial):
                self._finish(job, JOB_FAILED, ambiguous_serial(job.selector, job.serial,
                                                               self.monitor.find(job.serial)))
                continue
            board = self._board_for(job)
            if board is not None and self._start_cycle(job, board):
                break
        if self.cycle is None:
            self._probe_next()
        self.update_status()

    def _probe_next(self) -> None:
        """Read one board that waits in Katapult (CONNECT only) and remember its facts.

        Why without a job: a later `--now` job for it (the board then runs Klipper) is checked
        against its application start before Klipper is stopped. Runs only while no cycle
        or batch does (one would find the port held), and schedule() waits for it.
        """
        assert self.monitor is not None
        # Not a serial that two boards share (built without the chip id: 12345): facts are
        # kept per serial, and such a board is touched only by a job that names its port.
        board = next((b for b in self.monitor.boards.values()
                      if b.mode == MODE_KATAPULT and b.sys_path not in self._probed
                      and not self.monitor.serial_is_shared(b.serial)), None)
        if board is None:
            return
        self._probed.add(board.sys_path)
        self._probing = True
        from .katapult import PROBE_BOUND

        # Bounded: a read that hangs (a board gone mid-read) must not hold every job back.
        self.reactor.update_timer(self._probe_timer, self.reactor.monotonic() + PROBE_BOUND)
        from .boardfacts import learn_board

        baud = self.config.katapult_baud

        def work() -> None:
            try:
                info = learn_board(self.facts, board, baud, timeout=0.5, tries=2)
                text = (f"board {board.serial} in Katapult {info.version}: {info.mcu}, application "
                        f"start 0x{info.app_start:08X}")
            except KflashError as e:
                text = f"board {board.serial} in Katapult could not be read: {e}"
            self.reactor.call_soon_threadsafe(lambda: self._probe_done(text))

        threading.Thread(target=work, name=f"probe-{board.serial}", daemon=True).start()

    def _probe_done(self, text: str) -> None:
        log.info(text)
        self._probing = False
        self.reactor.update_timer(self._probe_timer, NEVER)
        if not self.stopping:
            self.schedule()

    def _probe_overdue(self, now: float) -> float:
        log.warning("the read of a board in Katapult did not end in time; scheduling goes on without it")
        self._probing = False
        if not self.stopping:
            self.schedule()
        return NEVER

    def _board_for(self, job: Job) -> Optional[Board]:
        """The job's board, if it is ready: in Katapult, or (for --now) running Klipper."""
        assert self.monitor is not None
        if job.resume_until is not None:  # repeating an interrupted write: that board only
            return self.recovery.board_for(job)
        for board in self.monitor.find(job.serial, MODE_KATAPULT):
            if job.fits(board):
                return board
        node = cancycle.node_board(self.config, job.serial)
        if node is not None:
            return self._can_node_ready(job, node)
        if job.now:
            for board in self.monitor.find(job.serial, KLIPPER_MODES):
                if job.fits(board):
                    return board
        return None

    def _can_node_ready(self, job: Job, node: Board) -> Optional[Board]:
        """A CAN toolhead's job runs on --now once its bus is up; until then it waits, says
        why, and the bus is looked at again (sysfs) every second."""
        if not job.now:
            return None
        why = cancycle.bus_refusal(node)
        if why is None:
            return node
        message = f"waiting: {why}"
        if job.message != message:
            job.message = message
            self.store.update(job)
            self.log_job(logging.WARNING, message, job)
        self.reactor.update_timer(self._bus_timer, self.reactor.monotonic() + 1.0)
        return None

    def _bus_poll(self, now: float) -> float:
        self.schedule()
        return NEVER

    def _start_cycle(self, job: Job, board: Board) -> bool:
        """Start the cycle in a worker thread; False when the job could not be recorded as
        running (then it has ended, with the reason, and no cycle runs)."""
        job.state = JOB_RUNNING
        job.attempts += 1
        job.message = f"flashing {board.device_node}"
        if job.resume_until is None:
            job.write = job.write_started = job.write_port = job.write_device = None
        # else: repeating an interrupted write: its record (the board's port, the write's
        # start) stays until this attempt writes; a guard that holds the job (the API
        # socket not up yet right after Klipper was started) must not lose it.
        try:
            self.store.update(job)
        except StateWriteError as e:
            self._finish(job, JOB_FAILED, f"cannot record the start of the job: {e.reason}; nothing was touched")
            return False
        running = RunningCycle(job, board)
        self.cycle = running
        config = self.config
        self.log_job(
            logging.INFO,
            f"flash started: {board.mode} board at {board.device_node}",
            job,
            message_id=journal.MSG_FLASH_STARTED,
        )

        def work() -> None:
            try:
                outcome = FlashCycle(self, config, self.store, job, board, running.abort, facts=self.facts).run()
            except Exception as e:  # a bug must not leave the loop waiting forever
                log.exception(f"job {job.id}: unexpected error in the flash cycle")
                outcome = Outcome(FAILED, f"internal error: {e}")
            self.reactor.call_soon_threadsafe(lambda: self._cycle_finished(running, outcome))

        running.thread = threading.Thread(target=work, name=f"flash-{job.id}", daemon=True)
        running.thread.start()
        return True

    def _cycle_finished(self, running: RunningCycle, outcome: Outcome) -> None:
        if running.thread is not None:
            running.thread.join()
        self.cycle = None
        try:
            self._record_outcome(running, outcome)
            self.store.retry_writes()
            self.recovery.examine()
        finally:
            # Whatever failed above (a disk, a bug), a stop asked for during the cycle ends
            # the daemon now: Klipper runs again, and systemd must not wait for its timeout.
            if self.stopping and self.updates.running is None:
                self.reactor.stop()
        if not self.stopping:
            self.schedule()

    def _record_outcome(self, running: RunningCycle, outcome: Outcome) -> None:
        job = running.job
        if running.klipper_touched and not running.start_failed and self.klipper_down:
            log.warning("Klipper was started again: it is no longer down")
            self.klipper_down = None
        if outcome.kind != BUSY:
            # Kept while the guard checks again, so STATUS and `kflashctl status` do not
            # flicker between "checking" and "waiting" (or lose the warning) every retry.
            self.guard_wait = None
            self.guard_warning = False
        if outcome.kind == BUSY:
            job.state = JOB_QUEUED
            job.attempts -= 1
            job.message = f"waiting: {outcome.message}"
            try:
                self.store.update(job)
            except StateWriteError as e:
                log.error(f"job {job.id}: {e}")  # nothing was touched; it waits all the same
            self.guard_wait = outcome.message
            self.guard_warning = outcome.warning
            self._guard_hold = True
            self.log_job(
                logging.WARNING if outcome.warning else logging.INFO,
                f"{'print guard cannot ask Klipper' if outcome.warning else 'printer busy'}, "
                f"the job waits: {outcome.message}",
                job,
                message_id=journal.MSG_PRINT_GUARD_WAIT,
            )
            self.notify_watchers(job, {"event": "phase", "phase": "waiting for printer", "message": outcome.message})
            self.reactor.update_timer(
                self._guard_timer, self.reactor.monotonic() + self.config.guard_retry
            )
        elif outcome.kind == INTERRUPTED:
            self._finish(job, *self.recovery.after_interruption(job, outcome.message))
        else:
            job.resume_until = None  # the cycle ran to its end: nothing left to repeat
            self._finish(job, JOB_DONE if outcome.kind == DONE else JOB_FAILED, outcome.message)

    def _finish(self, job: Job, state: str, message: str) -> None:
        """End `job`: record it, log it, tell its watchers. A record that cannot be written
        (full or failing disk) ends the job all the same, failed with the reason; the
        watchers still get their end event and the daemon goes on."""
        try:
            self.store.finish(job, state, message)
        except StateWriteError as e:
            state = JOB_FAILED if state == JOB_DONE else state
            if "cannot record" not in message:
                message = f"cannot record the result: {e.reason}; {message}"
            try:
                self.store.finish(job, state, message)  # in memory at least
            except StateWriteError:
                pass
            log.error(f"job {job.id}: {e} (the job ends {state}; its record is written again later)")
            self.reactor.update_timer(self._state_timer, self.reactor.monotonic() + STATE_RETRY)
        method = job.results[-1].method if job.results else ""
        if state == JOB_DONE:
            text = f"flash succeeded: {message}"
            if job.version_confirmed is not None:
                text += (
                    f"; Klipper reports {job.mcu_version_after}"
                    if job.version_confirmed
                    else f"; but Klipper reports {job.mcu_version_after!r}, not {job.image_version!r}"
                )
            self.log_job(logging.INFO, text, job, message_id=journal.MSG_FLASH_SUCCEEDED, method=method, result="done")
        elif state == JOB_INTERRUPTED:
            self.log_job(logging.WARNING, f"flash interrupted: {message}", job,
                      message_id=journal.MSG_JOB_INTERRUPTED, method=method, result=state)
        elif state == JOB_FAILED:
            self.log_job(logging.ERROR, f"flash failed: {message}", job,
                      message_id=journal.MSG_FLASH_FAILED, method=method, result=state)
        else:
            self.log_job(logging.INFO, f"{state}: {message}", job, result=state)
        self.store.prune()
        self.notify_watchers(job, {"event": "end", "job": job.to_dict()})
        for conn in self.control.watchers(job.id) if self.control else []:
            conn.finish()

    def _guard_retry(self, now: float) -> float:
        self._guard_hold = False
        self.schedule()
        return NEVER

    def phase(self, job: Job, phase: str, percent: Optional[int] = None) -> None:
        def update() -> None:
            if self.cycle is None or self.cycle.job.id != job.id:
                return
            if phase == PHASE_STOPPING:
                self.cycle.klipper_touched = True
            if self.cycle.phase == phase and self.cycle.percent == percent:
                return
            self.cycle.phase, self.cycle.percent = phase, percent
            self.notify_watchers(job, {"event": "phase", "phase": phase, "percent": percent})
            self.update_status()

        self.reactor.call_soon_threadsafe(update)
