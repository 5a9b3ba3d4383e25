"""Crash recovery: Klipper first, then what each interrupted job may still do.

A daemon can die at any instruction (SIGKILL, OOM, the watchdog, a power cut). Two records
let the next one act on facts instead of guesses:

- the cycle marker in `runtime_dir`, written before Klipper is stopped and removed once it
  runs again (klipper_stop.py): found at start-up, it means "Klipper may be down", and
  Klipper is started before anything else;
- the job's write-ahead record in `state_dir` (`Job.write`, fsynced by the store):
  "started" before the flash tool may write a byte, with the board's USB port, and
  "written" with the tool's result as soon as it returns.

What a job cut short becomes (the same for a crash and for a stop by SIGTERM):

- written: done (unconfirmed) or failed, from the recorded result; never flashed again;
- interrupted mid-write: the board may hold half an image, and flashing the same image
  again is how to repair it; but only onto the same board (same serial AND USB port) while
  it waits in Katapult, and only within `timeouts.resume` of the write's start; after
  that, or once another job was queued for the board, the job ends "interrupted" with
  advice (an image written hours later, maybe over what its owner flashed by hand, is
  exactly the harm this module exists to prevent);
- interrupted before the write started: "interrupted, nothing written", never re-queued.

Interrupted jobs are examined at start-up, after every cycle, when a board enters Katapult
and when the next deadline passes. Runs on the daemon's loop thread.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from . import cancycle, journal, service
from .errors import KflashError, StateWriteError
from .models import (
    JOB_DONE,
    JOB_FAILED,
    JOB_INTERRUPTED,
    JOB_QUEUED,
    MODE_KATAPULT,
    WRITE_DONE,
    WRITE_STARTED,
    Board,
    Job,
)
from .klipper_stop import MARKER_NAME
from .reactor import NEVER

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("kflashd")

# ------------------------------------------------------------------- the cycle marker ----


def marker_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, MARKER_NAME)


def remove_marker(runtime_dir: str) -> None:
    """Klipper runs again (a retry of its start worked): the marker has done its job."""
    try:
        os.unlink(marker_path(runtime_dir))
    except FileNotFoundError:
        pass


def read_marker(runtime_dir: str) -> Optional[Dict[str, Any]]:
    """The marker's contents; None when there is none, {} when it cannot be read (a cycle
    was cut short all the same: the caller assumes the worst)."""
    path = marker_path(runtime_dir)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error(f"cycle marker {path} unreadable ({e}); assuming a cycle was cut short")
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------ the decisions ----


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def settled_after_write(job: Job, why: str) -> Tuple[str, str]:
    """(state, message) for a job whose write record says "written": the tool finished."""
    result = job.results[-1] if job.results else None
    if result is not None and result.success:
        return JOB_DONE, (
            f"flashed via {result.method} in {result.elapsed_seconds:.1f} s; unconfirmed ({why} "
            f"before the board was seen back: `kflashctl devices` shows its mode)"
        )
    error = result.error_message if result is not None and result.error_message else "flash failed"
    return JOB_FAILED, f"{error} ({why} after the flash tool ended)"


def same_board(job: Job, board: Board) -> bool:
    """The board the interrupted write went to: same serial AND same USB port, in Katapult.

    A serial alone is not an identity (boards built without a chip id all say "12345"),
    and a job without a recorded port cannot prove it, so it never matches.
    """
    return (
        board.mode == MODE_KATAPULT
        and board.serial == job.serial
        and job.write_port is not None
        and board.port_path == job.write_port
    )


def no_resume_reason(job: Job, others: List[Job], now: float, resume: float) -> Optional[str]:
    """Why an interrupted write must not be repeated now; None while it still may be."""
    if job.write_port is None:
        return "the USB port it was written through is not known, so the same board cannot be recognised"
    if job.write_started is None or now < job.write_started:
        return "the time of the write is unknown or in the future (the clock moved back?)"
    if job.resume_until is None or now > job.resume_until:
        return (
            f"its board did not wait in Katapult within timeouts.resume ({resume:g} s) of the "
            f"write's start"
        )
    for other in others:
        if other.id != job.id and other.serial == job.serial and other.created > job.created:
            return f"job {other.id} was queued for this board since"
    return None


def can_node_advice(job: Job, why: str) -> str:
    """What an interrupted write to a CAN toolhead becomes: never repeated on its own.

    A CAN node never appears in udev (as Katapult or otherwise): kflashd learns of it only by
    asking its bus when a --now job runs, so there is no "the same board waits in Katapult"
    to resume on. The user queues the image again with --now.
    """
    bus = f" on {job.write_device}" if job.write_device else ""
    return (
        f"interrupted mid-write{f' ({why})' if why else ''} and not flashed again: the CAN node "
        f"{job.serial}{bus} may hold a half-written image, and a CAN node is never seen in "
        f"Katapult through udev, so kflashd does not repeat the write on its own. Queue the "
        f"image again with --now (kflashctl queue {job.selector} FIRMWARE --now --wait): it is "
        f"flashed once the node answers on its CAN bus"
    )


class Recovery:
    """The daemon's crash-recovery duties (loop thread)."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self._timer = daemon.reactor.register_timer(self._deadline_passed)

    # -- start-up -------------------------------------------------------------------

    def start_klipper_if_marked(self) -> None:
        """A marker means a daemon died with Klipper stopped: start Klipper before anything."""
        d = self.daemon
        data = read_marker(d.config.runtime_dir)
        if data is None:
            return
        services = data.get("services") or d.config.klipper_services
        log.warning(
            f"a previous kflashd (pid {data.get('pid', '?')}) may have left Klipper stopped "
            f"(job {data.get('job', '?')}): starting Klipper now"
        )
        try:
            service.start_services(tuple(services), timeout=d.config.timeout_service,
                                   abort=d.stop_requested)
        except KflashError as e:
            log.critical(
                f"KLIPPER IS NOT RUNNING: {e}",
                extra={"journal_fields": {"MESSAGE_ID": journal.MSG_KLIPPER_RESTART_FAILED}},
            )
            d.klipper_start_failed(None, str(e))  # retried; the marker stays till then
        else:
            remove_marker(d.config.runtime_dir)

    def settle_crashed_jobs(self) -> None:
        """Jobs found "running": their daemon died. Decide each from its write record."""
        for job in self.daemon.store.running():
            state, message = self.after_interruption(job, "a previous kflashd died during the cycle")
            self.daemon._finish(job, state, message)

    # -- one interrupted job --------------------------------------------------------

    def after_interruption(self, job: Job, why: str) -> Tuple[str, str]:
        """(state, message) for a job cut short; sets or clears `job.resume_until`."""
        job.resume_until = None
        if job.write == WRITE_DONE:
            return settled_after_write(job, why)
        if job.write != WRITE_STARTED:
            return JOB_INTERRUPTED, (
                f"interrupted, nothing written ({why}); it is not queued again: queue it again "
                f"if it is still wanted"
            )
        if cancycle.node_board(self.daemon.config, job.serial) is not None:
            return JOB_INTERRUPTED, can_node_advice(job, why)
        resume = self.daemon.config.timeout_resume
        if job.write_started is not None and resume > 0:
            job.resume_until = job.write_started + resume
        reason = no_resume_reason(job, [], time.time(), resume)
        if reason is not None:
            job.resume_until = None
            return JOB_INTERRUPTED, self._advice(job, why, reason)
        return JOB_INTERRUPTED, (
            f"interrupted mid-write ({why}): the board may hold a half-written image. It is "
            f"flashed again only onto the same board (USB port {job.write_port}) when it waits "
            f"in Katapult before {_when(job.resume_until)} (timeouts.resume)"
        )

    @staticmethod
    def _advice(job: Job, why: str, reason: str) -> str:
        return (
            f"interrupted mid-write{f' ({why})' if why else ''} and not flashed again: {reason}. "
            f"The board may hold "
            f"a half-written image: enter Katapult (double-tap reset) and queue the image again "
            f"(kflashctl queue {job.selector} FIRMWARE --wait)"
        )

    # -- examined after every cycle -------------------------------------------------

    def examine(self) -> None:
        """Resume an interrupted write whose board waits in Katapult; end those that may no
        longer be resumed; arm the timer for the next deadline."""
        d = self.daemon
        if d.monitor is None or d.stopping:
            return
        now = time.time()
        jobs = d.store.jobs()
        next_deadline = NEVER
        for job in jobs:
            if job.resume_until is None or job.state not in (JOB_INTERRUPTED, JOB_QUEUED):
                continue
            reason = no_resume_reason(job, jobs, now, d.config.timeout_resume)
            if reason is not None:
                job.resume_until = None
                d._finish(job, JOB_INTERRUPTED, self._advice(job, "", reason))
                continue
            next_deadline = min(next_deadline, job.resume_until)
            if job.state != JOB_INTERRUPTED or d.store.queued_for(job.serial) is not None:
                continue
            if d.cycle is not None and d.cycle.job.serial == job.serial:
                continue
            board = self.board_for(job)
            if board is None:
                continue
            why = (
                f"re-queued: the board it was writing to (USB port {job.write_port}) waits in "
                f"Katapult; the interrupted write is repeated"
            )
            try:
                d.store.requeue(job, why)
            except StateWriteError as e:
                log.error(f"job {job.id}: {e}")
            d.log_job(logging.INFO, why, job)
        if next_deadline == NEVER:
            d.reactor.update_timer(self._timer, NEVER)
        else:
            # Wall clock to loop clock: the deadline is checked again when the timer fires.
            d.reactor.update_timer(self._timer, d.reactor.monotonic() + max(next_deadline - now, 0) + 0.05)

    def board_for(self, job: Job) -> Optional[Board]:
        """The same board as the interrupted write's, in Katapult now, within the deadline."""
        assert self.daemon.monitor is not None
        if job.resume_until is None or time.time() > job.resume_until:
            return None
        for board in self.daemon.monitor.find(job.serial, MODE_KATAPULT):
            if same_board(job, board):
                return board
        return None

    def _deadline_passed(self, now: float) -> float:
        self.daemon.reactor.call_soon_threadsafe(self._examine_and_schedule)
        return NEVER

    def _examine_and_schedule(self) -> None:
        self.examine()
        self.daemon.update_status()
