"""Keepalives for `kflashctl ... --wait`: a watching client never waits forever.

A job may wait days for its board, so silence on a watch stream is normal and a client
cannot tell it from a daemon that hangs (a loop stuck on a dead disk, a SIGSTOP) or from
an end event that was never sent. So every `INTERVAL` seconds the daemon sends each
watcher `{"event": "keepalive"}`, and kflashctl gives up after `CLIENT_SILENCE` seconds
without a line (ctl.py), saying why. The same tick repairs a missed end: a watched job
that is already over gets its end event now.

The timer runs only while someone watches: an idle daemon keeps no periodic wake-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .errors import QueueError
from .models import JOB_PENDING_STATES, Job
from .reactor import NEVER

if TYPE_CHECKING:
    from .daemon import Daemon

#: Seconds between keepalives on every watch stream.
INTERVAL = 15.0
#: Seconds of silence after which kflashctl stops waiting (four keepalives missed: a daemon
#: whose loop has not run for a minute is hung; the watchdog restarts it after 30 s).
CLIENT_SILENCE = 4 * INTERVAL


class Keepalive:
    def __init__(self, daemon: "Daemon", interval: float = INTERVAL) -> None:
        self.daemon = daemon
        self.interval = interval
        self._timer = daemon.reactor.register_timer(self._tick)

    def arm(self) -> None:
        """A connection started watching: make sure the ticks run."""
        if self._timer.waketime == NEVER:
            self.daemon.reactor.update_timer(self._timer, self.daemon.reactor.monotonic() + self.interval)

    def _tick(self, now: float) -> float:
        control = self.daemon.control
        if control is None:
            return NEVER
        watchers = [c for c in control.connections.values() if c.watching is not None and not c.closed]
        for conn in watchers:
            job = self._job(conn.watching)
            if job is not None and job.state not in JOB_PENDING_STATES:
                # Its end was not delivered (it cannot be: the job ended): deliver it now.
                conn.send({"event": "end", "job": job.to_dict(), "job_id": job.id})
                conn.finish()
            else:
                conn.send({"event": "keepalive"})
        return now + self.interval if watchers else NEVER

    def _job(self, watching: str) -> Optional[Job]:
        try:
            return self.daemon.store.get(watching)
        except QueueError:  # a batch ("batch:<id>"), or a job pruned meanwhile
            return None
