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
from typing import List, Optional

from . import __version__, instances, journal
from .boardfacts import BoardFactsStore
from .commands import Commands
from .config import Config, load_config
from .control import ControlServer
from .cycle import CycleHost
from .devices import BoardMonitor
from .errors import ConfigError, KflashError
from .keepalive import Keepalive
from .klipperdown import KlipperRetry
from .models import MODE_KATAPULT, RomBootloader
from .notify import Notifier
from .reactor import NEVER, Reactor
from .recovery import Recovery
from .reporting import Reporting
from .scheduling import STATE_RETRY, RunningCycle, Scheduling
from .signals import EarlySignals
from .staging import StagingWorker
from .store import JobStore
from .updates import Updates
from .waiters import BoardWaiter, BoardWaiting

log = logging.getLogger("kflashd")


class Daemon(Scheduling, BoardWaiting, KlipperRetry, Reporting, CycleHost):
    """The loop owner: start-up, udev events, signals, reload, watchdog and shutdown.

    What to do with the state lives in the mixins, one job each: which job runs next and
    how its cycle ended (scheduling.py), cycles waiting for their board (waiters.py), the
    Klipper-down retry (klipperdown.py), and STATUS and job log lines (reporting.py).
    All their state is kept here, on the one daemon object, and touched by the loop thread.
    """

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
        self._wake_rom_waiters(rom)

    def _on_stop_signal(self, signum: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        name = signal.Signals(signum).name
        if self.updates.abort():
            log.warning(f"{name}: ending the update after the board being written; Klipper is started first")
            self._set_status("Stopping: ending the update, then starting Klipper")
            self._wake_all_waiters()
        if self.cycle is not None:
            log.warning(f"{name}: interrupting the flash of job {self.cycle.job.id}; Klipper is started first")
            self.cycle.abort.set()
            self._set_status("Stopping: interrupting the flash, then starting Klipper")
            self._wake_all_waiters()
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
