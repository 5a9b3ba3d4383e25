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
import logging
import signal
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

from . import __version__, cancycle, canbus, instances, journal
from .boardfacts import BoardFactsStore
from .commands import Commands, ambiguous_serial
from .config import Config, load_config
from .control import ControlServer
from .cycle import BUSY, DONE, FAILED, INTERRUPTED, PHASE_GUARD, PHASE_STOPPING, CycleHost, FlashCycle, Outcome
from .cycle import job_fields
from .devices import BoardMonitor
from .errors import ConfigError, KflashError, StateWriteError
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
    RomBootloader,
)
from .notify import Notifier
from .reactor import NEVER, Reactor
from .signals import EarlySignals
from .staging import StagingWorker
from .keepalive import Keepalive
from .recovery import Recovery, remove_marker
from .store import JobStore
from .updates import Updates

log = logging.getLogger("kflashd")

#: Seconds between tries to write job records that a full or failing disk refused.
STATE_RETRY = 30.0

class BoardWaiter:
    """A cycle waiting for its board in a mode: same serial, and same USB port where known
    (a board keeps its port across the reboot between Klipper and Katapult)."""

    __slots__ = ("serial", "port", "mode", "event", "board", "rom_port")

    def __init__(self, serial: str, mode: Union[str, Tuple[str, ...]], port: Optional[str],
                 rom_port: Optional[str] = None) -> None:
        self.serial = serial
        self.port = port
        self.mode = (mode,) if isinstance(mode, str) else tuple(mode)
        self.event = threading.Event()
        self.board: Optional[Any] = None  # a Board, or the RomBootloader that came instead
        self.rom_port = rom_port  # also wake on a chip's ROM bootloader on this USB port

    def wants(self, board: Board) -> bool:
        return (board.serial == self.serial and board.mode in self.mode
                and (self.port is None or board.port_path == self.port))


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
    def __init__(self, config: Config, early: Optional[EarlySignals] = None) -> None:
        self.config = config
        self.early = early  # signals that came before the loop (main() installs it first)
        self.stop_requested = early.stop if early is not None else threading.Event()
        self.reactor = Reactor()
        self.notifier = Notifier()
        self.store = JobStore(config.state_dir)
        self.facts = BoardFactsStore(config.state_dir)
        self._probing = False  # a read-only CONNECT to a board in Katapult runs in a thread
        self._probed: set = set()  # sys_paths of Katapult boards read since they appeared
        self.monitor: Optional[BoardMonitor] = None
        self.control: Optional[ControlServer] = None
        self.commands = Commands(self)
        self.recovery = Recovery(self)
        self.keepalive = Keepalive(self)
        self.staging = StagingWorker(self.reactor)
        self.updates = Updates(self)  # `kflashctl update` batches (updates.py, batch.py)
        self.cycle: Optional[RunningCycle] = None
        self.stopping = False
        self.klipper_down: Optional[str] = None
        self.guard_wait: Optional[str] = None  # why queued jobs are held back
        self.guard_warning = False  # ...and that reason is a configuration error to fix
        self._guard_hold = False  # no cycle starts until the guard's retry timer fires
        self._waiters: List[BoardWaiter] = []
        self._waiters_lock = threading.Lock()
        self._guard_timer = self.reactor.register_timer(self._guard_retry)
        self._probe_timer = self.reactor.register_timer(self._probe_overdue)
        self._klipper_timer = self.reactor.register_timer(self._retry_klipper_start)
        self._state_timer = self.reactor.register_timer(self._retry_state_writes)
        # No uevent tells that a CAN link went up: while a CAN job waits for its bus, look.
        self._bus_timer = self.reactor.register_timer(self._bus_poll)
        self._klipper_starting = False  # a retry of `systemctl start` runs in a thread
        self._last_status = ""
        self.exit_code = 0

    # ---------------------------------------------------------------- start-up ------

    def run(self) -> int:
        for warning in self.config.check_paths():
            log.warning(warning)
        self._log_guard_sockets(instances.check_visible(self.config))
        for problem in self.store.load():
            log.error(problem)
        self.updates.load()
        self.recovery.start_klipper_if_marked()
        self.recovery.settle_crashed_jobs()
        if self.stop_requested.is_set():
            # SIGTERM/SIGINT during start-up: stop before serving anything. If Klipper could
            # not be started, its marker stays and the next start tries again.
            log.info("stopping: a stop signal came during start-up")
            self.notifier.stopping()
            self.reactor.close()
            return 0

        self.monitor = BoardMonitor()
        present = self.monitor.start()
        self.reactor.register_fd(self.monitor.fileno(), self._on_udev)
        for board in present:
            log.info(f"{board.mode} board {board.serial} ({board.mcu}) at {board.device_node}")
            if board.mode == MODE_KATAPULT and not self.monitor.serial_is_shared(board.serial):
                self.facts.seen_in_katapult(board.serial, board.port_path)
        for rom in self.monitor.roms.values():
            log.warning(f"a board sits in its ROM bootloader ({rom.what}, {rom.usb_id}) on USB port "
                        f"{rom.port_path}: Klipper cannot reach it until it is power-cycled")
        self.recovery.examine()

        self.control = ControlServer(
            self.reactor,
            self.config.control_socket,
            self.config.group,
            self._max_request(),
            self.commands.handle,
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
        self.update_status()
        self.schedule()
        if self.early is not None:  # a SIGHUP during start-up: the reload happens now
            self.early.replay(lambda signum: self.reactor.call_soon_threadsafe(
                lambda: self.reactor.deliver_signal(signum)))
        try:
            self.reactor.run()
        finally:
            if self.cycle is not None and self.cycle.thread is not None:
                # Only reached if the loop itself failed: let the cycle start Klipper first.
                self.cycle.abort.set()
                self.cycle.thread.join(self.config.timeout_flash + 3 * self.config.timeout_service)
            batch = self.updates.running
            if batch is not None and batch.thread is not None:  # the same for an update
                batch.abort.set()
                batch.thread.join(self.config.timeout_flash + 3 * self.config.timeout_service)
            self.notifier.stopping()
            self.staging.stop()
            if self.control is not None:
                self.control.stop()
            self.reactor.close()
        return self.exit_code

    def _max_request(self) -> int:
        # The image travels base64-encoded (4/3) inside one JSON line.
        return self.config.max_image_size * 4 // 3 + 64 * 1024

    # ---------------------------------------------------------------- events ------

    def _on_udev(self) -> None:
        assert self.monitor is not None
        changed = False
        for action, board in self.monitor.poll():
            changed = True
            if action == "net":
                iface = self.monitor.interface(board.device_node)
                log.info(f"CAN interface {board.device_node}: {iface.state}"
                         + (f" (USB-to-CAN bridge {board.serial})" if board.serial else ""))
                continue
            if action == "rom":
                self._on_rom_bootloader(board)
                continue
            log.info(f"{action}: {board.mode} board {board.serial} ({board.mcu}) at {board.device_node}")
            if action == "remove":
                self._probed.discard(board.sys_path)
            if action == "add":
                if board.mode == MODE_KATAPULT and not self.monitor.serial_is_shared(board.serial):
                    self.facts.seen_in_katapult(board.serial, board.port_path)
                self._wake_waiters(board)
                if board.mode == MODE_KATAPULT and self.cycle is None:
                    self.recovery.examine()
        if changed:
            self.schedule()

    def _on_rom_bootloader(self, rom: RomBootloader) -> None:
        log.warning(f"a board appeared in its ROM bootloader ({rom.what}, {rom.usb_id}) on USB port "
                    f"{rom.port_path}: Klipper cannot reach it until it is power-cycled")
        with self._waiters_lock:
            for waiter in self._waiters:
                if waiter.rom_port is not None and waiter.rom_port == rom.port_path:
                    waiter.board = rom
                    waiter.event.set()

    def _on_stop_signal(self, signum: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        name = signal.Signals(signum).name
        if self.updates.abort():
            log.warning(f"{name}: ending the update after the board being written; Klipper is started first")
            self._set_status("Stopping: ending the update, then starting Klipper")
            with self._waiters_lock:
                for waiter in self._waiters:
                    waiter.event.set()
        if self.cycle is not None:
            log.warning(f"{name}: interrupting the flash of job {self.cycle.job.id}; Klipper is started first")
            self.cycle.abort.set()
            self._set_status("Stopping: interrupting the flash, then starting Klipper")
            with self._waiters_lock:
                for waiter in self._waiters:
                    waiter.event.set()
        elif self._klipper_starting:
            log.info(f"{name}: stopping once the running `systemctl start` returns")
        elif self.updates.running is None:
            log.info(f"{name}: stopping")
            self.reactor.stop()

    def _on_reload_signal(self, _signum: int) -> None:
        self.notifier.reloading()
        path = self.config.path
        try:
            new = load_config(path)
            for warning in new.check_paths():
                log.warning(warning)
            self._log_guard_sockets(instances.check_visible(new))
        except ConfigError as e:
            log.error(f"reload failed, keeping the old configuration: {e}")
            self.notifier.ready()
            self.update_status()
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
        self.update_status()
        self.schedule()

    def _log_guard_sockets(self, found: List[instances.Instance]) -> None:
        for instance in found:
            log.info(f"print guard asks {instance.service} at {instance.socket or '(nowhere)'}: {instance.source}")

    def _ping_watchdog(self, now: float, interval: float) -> float:
        self.notifier.watchdog()
        return now + interval

    def _retry_state_writes(self, now: float) -> float:
        """Records that failed to save are written again while the disk refuses them."""
        self.store.retry_writes()
        self.update_status()
        return now + STATE_RETRY if self.store.unsaved() else NEVER

    def state_problem(self) -> Optional[str]:
        """Why job records on disk lag behind (STATUS and `kflashctl status` say it)."""
        unsaved = self.store.unsaved()
        if not unsaved:
            return None
        reasons = "; ".join(sorted(set(unsaved.values())))
        return (
            f"cannot write to {self.config.state_dir}: {reasons} ({len(unsaved)} job record"
            f"{'s' if len(unsaved) != 1 else ''} not saved; free space there or fix the disk)"
        )

    def _guard_retry(self, now: float) -> float:
        self._guard_hold = False
        self.schedule()
        return NEVER

    # ---------------------------------------------------------------- scheduling ------

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
            self.notify_watchers(job, {"event": "phase", "phase": phase, "percent": percent})
            self.update_status()

        self.reactor.call_soon_threadsafe(update)

    def wait_for_board(
        self, serial: str, mode: Union[str, Tuple[str, ...]], timeout: float, abort: threading.Event,
        port: Optional[str] = None, rom_port: Optional[str] = None,
    ) -> Optional[Any]:
        """The board in `mode`; with `rom_port`, also the RomBootloader that appeared on that
        USB port instead (a board without Katapult); None at the timeout."""
        waiter = BoardWaiter(serial, mode, port, rom_port)
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
        found = [b for b in self.monitor.find(waiter.serial, waiter.mode) if waiter.wants(b)]
        roms = [r for r in self.monitor.roms.values() if waiter.rom_port and r.port_path == waiter.rom_port]
        if found:
            waiter.board = found[0]
            waiter.event.set()
        elif roms:
            waiter.board = roms[0]
            waiter.event.set()

    def _wake_waiters(self, board: Board) -> None:
        with self._waiters_lock:
            for waiter in self._waiters:
                if waiter.wants(board):
                    waiter.board = board
                    waiter.event.set()

    def klipper_start_failed(self, job: Optional[Job], message: str) -> None:
        def update() -> None:
            self.klipper_down = message
            if self.cycle is not None:
                self.cycle.start_failed = True
            self.reactor.update_timer(self._klipper_timer, self.reactor.monotonic() + self.config.klipper_retry)
            self.update_status()

        # The flash core has logged it (CRITICAL, MESSAGE_ID); here it becomes STATUS.
        self.reactor.call_soon_threadsafe(update)

    def _retry_klipper_start(self, now: float) -> float:
        """Klipper is down after a failed start: keep trying, off the loop thread."""
        if not self.klipper_down or self.stopping:
            return NEVER
        if self.cycle is not None or self.updates.holds_klipper():  # their own start is the next try
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
            remove_marker(self.config.runtime_dir)
        else:
            log.error(f"Klipper is still down: {error}; trying again in {self.config.klipper_retry:g} s")
            self.klipper_down = error
            self.reactor.update_timer(self._klipper_timer, self.reactor.monotonic() + self.config.klipper_retry)
        self.update_status()
        self.schedule()

    # ---------------------------------------------------------------- reporting ------

    def log_job(
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

    def status_text(self) -> str:
        queued = len(self.store.queued())
        jobs = f"{queued} job{'s' if queued != 1 else ''} queued"
        updating = self.updates.status_text()
        if updating is not None and not (self.cycle is not None and not self.updates.holds_klipper()):
            text = updating
        elif self.cycle is not None and self.guard_wait and self.cycle.phase in (PHASE_GUARD, "starting"):
            text = self._guard_text(queued + 1)  # the job being checked again is held too
        elif self.cycle is not None:
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
            text = self._guard_text(queued)
        else:
            text = f"Idle, {jobs}" if queued else "Idle, no jobs queued"
        if self.klipper_down:
            text += f"; KLIPPER IS DOWN: {self.klipper_down}"
        problem = self.state_problem()
        if problem:
            text += f"; STATE NOT SAVED: {problem}"
        return text

    def _guard_text(self, queued: int) -> str:
        jobs = f"{queued} job{'s' if queued != 1 else ''} queued"
        if self.guard_warning:
            return f"WARNING: held by a configuration error ({self.guard_wait}), {jobs}"
        return f"Waiting for the printer ({self.guard_wait}), {jobs}"

    def update_status(self) -> None:
        text = self.status_text()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def _set_status(self, text: str) -> None:
        self._last_status = text
        self.notifier.status(text)

    def notify_watchers(self, job: Job, event: Dict[str, Any]) -> None:
        if self.control is None:
            return
        event = dict(event, job_id=job.id)
        for conn in self.control.watchers(job.id):
            conn.send(event)

def main(argv: Optional[List[str]] = None) -> int:
    early = EarlySignals()  # first: no signal may take its default action from here on
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
        return Daemon(config, early).run()
    except ConfigError as e:
        log.error(f"configuration error: {e}")
        return 78  # EX_CONFIG: systemd's RestartPreventExitStatus can stop a restart loop
    except KflashError as e:
        log.error(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
