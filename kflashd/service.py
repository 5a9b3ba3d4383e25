"""Stopping and starting the Klipper service(s) around a flash.

This module owns one promise: once `klipper_service_stopped()` has asked systemd to stop
Klipper, Klipper is asked to start again on every way out: normal exit, an exception,
KeyboardInterrupt, SIGTERM (main thread), a timeout. A failing start is retried, then
reported loudly (CRITICAL log line and the `on_start_failed` callback, which the daemon
turns into a journal entry with its own MESSAGE_ID and a STATUS line), and it never
replaces the exception that was already on its way out.

Privileges: as root, `systemctl` runs directly. As any other user every systemctl call is
prefixed with `sudo -n`, and before the first one `sudo -n true` proves that sudo will not
ask for a password; if it would, nothing is touched and the ServiceError names the sudoers
line to add. This module never runs a shell and never waits without a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import sys
import threading
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from . import proc
from .journal import MSG_KLIPPER_RESTART_FAILED
from .errors import Interrupted, ServiceError

TIMEOUT_SERVICE = 30  # seconds for one systemctl stop/start
TIMEOUT_SUDO = 5  # seconds for `sudo -n true`
START_TRIES = 3
START_RETRY_DELAY = 1.0  # seconds between two start attempts

_log = logging.getLogger("kflashd.service")

StartFailedCallback = Callable[[str], None]


class Terminated(Interrupted):
    """Raised in the main thread by the SIGTERM handler of `klipper_service_stopped()`.

    A subclass of `Interrupted`, so callers that handle an interrupted cycle handle this
    too; raising it (instead of dying of the signal) is what lets the `finally` run.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def running_as_root() -> bool:
    """Whether systemctl can be called directly (tests replace this to exercise sudo)."""
    return os.geteuid() == 0


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _units(services: Sequence[str]) -> List[str]:
    units = [str(s) for s in services]
    if not units:
        raise ServiceError("no Klipper service configured (klipper.services is empty)")
    return units


def sudo_fix(services: Sequence[str]) -> str:
    """The exact rule a non-root kflashd needs, for error messages and the README."""
    units = " ".join(services)
    user = _user_name()
    return (
        f"add a sudoers rule (visudo -f /etc/sudoers.d/kflashd): "
        f"'{user} ALL=(root) NOPASSWD: /usr/bin/true, /usr/bin/systemctl stop {units}, "
        f"/usr/bin/systemctl start {units}', or run kflashd as root"
    )


def verify_passwordless_sudo() -> bool:
    """True when `sudo -n true` succeeds within 5 s (sudo will not ask for a password)."""
    try:
        result = proc.run(["sudo", "-n", "true"], TIMEOUT_SUDO)
    except OSError:
        return False
    return result.ok


def _check_sudo(services: Sequence[str], log: logging.Logger) -> None:
    """Prove sudo works before the first service operation, or say what is missing."""
    try:
        result = proc.run(["sudo", "-n", "true"], TIMEOUT_SUDO)
    except OSError as e:
        raise ServiceError(
            f"kflashd runs as {_user_name()} (not root) and needs sudo, which could not be "
            f"run ({e}); install sudo and {sudo_fix(services)}"
        ) from None
    if not result.ok:
        said = _last_line(result.stderr) or result.describe_failure()
        raise ServiceError(
            f"passwordless sudo is not set up for {_user_name()} (`sudo -n true`: {said}); "
            f"nothing was stopped; {sudo_fix(services)}"
        )
    log.debug("passwordless sudo verified")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\x00", "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _systemctl(
    verb: str, units: Sequence[str], timeout: float, use_sudo: bool,
    abort: Optional[threading.Event] = None,
) -> proc.ProcResult:
    argv = ["systemctl", verb, *units]
    if use_sudo:
        argv = ["sudo", "-n", *argv]
    elif not running_as_root():
        # polkit decides; never let systemctl wait for a password prompt nobody sees.
        argv.insert(1, "--no-ask-password")
    return proc.run(argv, timeout, abort=abort)


def _failure_text(verb: str, units: Sequence[str], result: proc.ProcResult) -> str:
    said = " ".join(
        line.strip() for line in result.stderr.splitlines() if line.strip()
    ) or _last_line(result.stdout)
    what = f"systemctl {verb} {' '.join(units)}"
    if not running_as_root() and ("Access denied" in said or "authentication required" in said):
        said += f"; {polkit_fix(units)}"
    if result.timed_out:
        return f"{what} timed out after {result.elapsed:.0f} s" + (f": {said}" if said else "")
    return f"{what} failed ({result.describe_failure()})" + (f": {said}" if said else "")


def no_new_privileges() -> bool:
    """Whether this process runs with NoNewPrivileges (then sudo can never work)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NoNewPrivs:"):
                    return line.split()[1] == "1"
    except (OSError, IndexError):
        pass
    return False


def _resolve_sudo(use_sudo: Optional[bool]) -> bool:
    """sudo only for a non-root daemon that could use it.

    The shipped unit runs kflashd as the Klipper user with NoNewPrivileges=yes and a polkit
    rule that allows exactly start/stop of the Klipper units (the way Moonraker does it):
    there systemctl is called directly. Without NoNewPrivileges (kflashd started by hand as
    a user), passwordless sudo is the fallback, verified before the first service operation.
    """
    if use_sudo is not None:
        return use_sudo
    if running_as_root():
        return False
    return not no_new_privileges()


def polkit_fix(services: Sequence[str]) -> str:
    return (
        f"kflashd runs as {_user_name()} without sudo (NoNewPrivileges): install its polkit rule "
        f"allowing {_user_name()} to start/stop {' '.join(services)} (sudo ./install.sh does), "
        f"or run kflashd as root"
    )


def stop_services(
    services: Sequence[str] = ("klipper",),
    timeout: float = TIMEOUT_SERVICE,
    log: Optional[logging.Logger] = None,
    *,
    use_sudo: Optional[bool] = None,
    verify_sudo: bool = True,
) -> None:
    """`systemctl stop UNITS`; raises ServiceError with systemctl's own words on failure.

    `use_sudo=None` means: sudo only when not root (verified first unless `verify_sudo`
    is False, e.g. because the caller already did).
    """
    log = log or _log
    units = _units(services)
    sudo = _resolve_sudo(use_sudo)
    if sudo and verify_sudo:
        _check_sudo(units, log)
    log.info(f"stopping {' '.join(units)}")
    try:
        result = _systemctl("stop", units, timeout, sudo)
    except OSError as e:
        raise ServiceError(f"systemctl stop {' '.join(units)} could not be run: {e}") from None
    if not result.ok:
        raise ServiceError(_failure_text("stop", units, result))


def start_services(
    services: Sequence[str] = ("klipper",),
    timeout: float = TIMEOUT_SERVICE,
    log: Optional[logging.Logger] = None,
    *,
    use_sudo: Optional[bool] = None,
    verify_sudo: bool = True,
    tries: int = START_TRIES,
    retry_delay: Optional[float] = None,
    abort: Optional[threading.Event] = None,
) -> None:
    """`systemctl start UNITS`, retried; raises ServiceError after the last failed try.

    `abort` set (the daemon is stopping during start-up) ends the try in hand and the
    retries: systemd goes on with a start job it accepted; the caller keeps its marker.
    The cycle's own restart of Klipper passes no `abort`: it always runs to its end.

    Used by the context manager's `finally` and by the daemon's crash recovery at start-up
    (a daemon killed with SIGKILL mid-flash left Klipper stopped).
    """
    log = log or _log
    units = _units(services)
    sudo = _resolve_sudo(use_sudo)
    delay = START_RETRY_DELAY if retry_delay is None else retry_delay
    if sudo and verify_sudo:
        _check_sudo(units, log)
    last = ""
    for attempt in range(1, max(1, tries) + 1):
        log.info(f"starting {' '.join(units)}" + (f" (try {attempt})" if attempt > 1 else ""))
        try:
            result = _systemctl("start", units, timeout, sudo, abort)
        except OSError as e:
            last = f"systemctl start {' '.join(units)} could not be run: {e}"
        else:
            if result.ok:
                return
            last = _failure_text("start", units, result)
        log.warning(f"{last} (try {attempt} of {tries})")
        if abort is not None and abort.is_set():
            raise ServiceError(f"{last}; no more tries: kflashd is stopping")
        if attempt < tries:
            if abort is None:
                time.sleep(delay)
            elif abort.is_set() or abort.wait(delay):
                raise ServiceError(f"{last}; no more tries: kflashd is stopping")
    raise ServiceError(last)


def inactive_units(services: Sequence[str], timeout: float = TIMEOUT_SERVICE) -> List[str]:
    """The units that are not 'active' now (`systemctl is-active` needs no privileges).

    If systemctl cannot answer, every unit counts as possibly stopped.
    """
    units = _units(services)
    try:
        result = proc.run(["systemctl", "is-active", *units], timeout)
    except OSError:
        return units
    states = [line.strip() for line in result.stdout.splitlines()]
    if result.timed_out or len(states) != len(units):
        return units
    return [unit for unit, state in zip(units, states) if state != "active"]


@contextlib.contextmanager
def _signals_raise_in_main_thread() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM raises Terminated.

    Python already turns SIGINT into KeyboardInterrupt; SIGTERM's default would kill the
    process with Klipper stopped. Other threads cannot (and must not) touch signals: the
    daemon's loop owns them there and aborts the worker through an event instead.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[List[int]]:
    """While Klipper is being started again, SIGINT/SIGTERM are noted, not raised.

    An exception raised into the start would kill `systemctl start` half-way and leave
    Klipper down: exactly what this module exists to prevent. The caller re-raises a
    noted signal once the start is over.
    """
    pending: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def note(signum: int, frame: object) -> None:
        pending.append(signum)

    saved: List[Tuple[int, object]] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        saved.append((signum, signal.signal(signum, note)))
    try:
        yield pending
    finally:
        for signum, handler in saved:
            signal.signal(signum, handler)  # type: ignore[arg-type]


def _report_start_failure(
    message: str, log: logging.Logger, on_start_failed: Optional[StartFailedCallback]
) -> None:
    log.critical(
        f"KLIPPER IS NOT RUNNING: {message}",
        extra={"journal_fields": {"MESSAGE_ID": MSG_KLIPPER_RESTART_FAILED}},
    )
    if on_start_failed is not None:
        try:
            on_start_failed(message)
        except Exception:  # the report must not become the error
            log.exception("on_start_failed callback failed")


def _start_after(
    units: Sequence[str],
    timeout: float,
    log: logging.Logger,
    sudo: bool,
    on_start_failed: Optional[StartFailedCallback],
) -> List[int]:
    """Start the units with signals deferred; returns the signals that arrived meanwhile."""
    with _signals_deferred() as pending:
        try:
            start_services(units, timeout, log, use_sudo=sudo, verify_sudo=False)
        except Exception as e:  # ServiceError, or anything unexpected: report, never raise
            _report_start_failure(str(e), log, on_start_failed)
    return pending


@contextlib.contextmanager
def klipper_service_stopped(
    services: Sequence[str] = ("klipper",),
    timeout: float = TIMEOUT_SERVICE,
    log: Optional[logging.Logger] = None,
    on_start_failed: Optional[StartFailedCallback] = None,
    *,
    use_sudo: Optional[bool] = None,
) -> Iterator[None]:
    """Stop `services` for the duration of the block; start them again on every exit.

    Entry: when not root, sudo is verified first (a missing rule raises ServiceError and
    nothing is touched); then `systemctl stop`. If the stop fails, ServiceError carries
    systemctl's message and the block does not run; since a failed or timed-out stop may
    have stopped some units anyway, the units that `systemctl is-active` does not report
    as active are started again before the error is raised (an "Access denied" stop thus
    restarts nothing, a stop that timed out half-way restarts what it took down).

    Exit: `systemctl start` (retried START_TRIES times). A failed start is logged at
    CRITICAL and passed to `on_start_failed(message)`; it is never raised, so it cannot
    mask the exception that ends the block, and a flash that succeeded stays a success.
    """
    log = log or _log
    units = _units(services)
    sudo = _resolve_sudo(use_sudo)
    if sudo:
        _check_sudo(units, log)  # before any service operation; raises, nothing touched

    with _signals_raise_in_main_thread():
        restart: List[str] = units  # what the finally starts again
        exc_in_flight = False
        try:
            try:
                stop_services(units, timeout, log, use_sudo=sudo, verify_sudo=False)
            except ServiceError:
                # A failed or timed-out stop may still have taken some units down.
                restart = inactive_units(units, timeout)
                if restart:
                    log.warning(
                        f"stop failed but {' '.join(restart)} is not active: starting it again"
                    )
                raise
            yield
        except BaseException:
            exc_in_flight = True
            raise
        finally:
            pending = _start_until_done(restart, timeout, log, sudo, on_start_failed)
            if pending and not exc_in_flight:
                # A signal came while Klipper was starting: honour it now that it is safe.
                if pending[0] == signal.SIGINT:
                    raise KeyboardInterrupt
                raise Terminated(pending[0])


def _start_until_done(
    units: Sequence[str],
    timeout: float,
    log: logging.Logger,
    sudo: bool,
    on_start_failed: Optional[StartFailedCallback],
) -> List[int]:
    """`_start_after`, robust against a signal landing before its handlers are in place.

    Such a signal raises (KeyboardInterrupt/Terminated) before or after the start proper;
    starting again is harmless (systemctl start of an active unit does nothing), stopping
    the start is not.
    """
    if not units:
        return []
    caught: List[int] = []
    while True:
        try:
            return caught + _start_after(units, timeout, log, sudo, on_start_failed)
        except KeyboardInterrupt:
            caught.append(signal.SIGINT)
        except Terminated as e:
            caught.append(e.signum)


__all__ = [
    "TIMEOUT_SERVICE",
    "Terminated",
    "inactive_units",
    "klipper_service_stopped",
    "running_as_root",
    "start_services",
    "stop_services",
    "sudo_fix",
    "verify_passwordless_sudo",
]

if sys.version_info < (3, 9):  # pragma: no cover
    raise ImportError("kflashd needs Python 3.9 or newer")
