"""The one exception hierarchy of kflashd.

Every error that kflashd raises on purpose derives from KflashError, so the daemon loop
and kflashctl can catch "our" failures with one clause and let real bugs surface as
tracebacks. Messages are written for the person at the printer: they say what went wrong
and, where there is one, the fix.
"""


class KflashError(Exception):
    """Base of every deliberate kflashd error."""


class ConfigError(KflashError):
    """The configuration file is unreadable, malformed or names something that is not there."""


class DiscoveryError(KflashError):
    """A board is not where it should be (unplugged, never enumerated, ambiguous)."""


class ServiceError(KflashError):
    """Stopping or starting the Klipper service failed, or we lack the rights to."""


class FlashError(KflashError):
    """A flash could not be attempted at all (missing tool, bad image, MCU mismatch)."""


class BuildError(KflashError):
    """A board's firmware cannot be built (no tree, wrong user, unreadable kconfig)."""


class QueueError(KflashError):
    """A job could not be staged, found, or changed (bad request, full disk, unknown id)."""


class StateWriteError(QueueError):
    """A job's record could not be written to state_dir (ENOSPC, EIO, a read-only remount).

    `reason` is the system's words ("No space left on device"): the daemon ends the
    affected job with "cannot record the result: <reason>" and keeps serving.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class GuardError(KflashError):
    """The print guard says the printer is busy: nothing may be touched now."""


class ProtocolError(KflashError):
    """A control-socket request or reply that does not follow the protocol."""


class Interrupted(KflashError):
    """A running cycle was asked to stop (SIGTERM/SIGINT to the daemon, or a cancel)."""


class DaemonUnreachable(KflashError):
    """kflashctl could not reach the daemon's control socket (not running, wrong runtime_dir)."""


class AccessDenied(KflashError):
    """The daemon (or the socket's permissions) refused this user."""
