"""What the daemon says: the STATUS line, the journal entries for jobs, watcher events.

Owns the wording of STATUS (sd_notify, also `kflashctl status`) and the journal fields of
every job line. Reads the daemon's state, never changes it (beyond the last STATUS sent):
deciding and acting belong to the scheduler and the loop.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from .config import Config
from .control import ControlServer
from .cycle import PHASE_GUARD, job_fields
from .models import Job
from .notify import Notifier
from .store import JobStore

log = logging.getLogger("kflashd")


class Reporting:
    """STATUS, job log lines and watcher events (a mixin of `Daemon`)."""

    config: Config
    store: JobStore
    notifier: Notifier
    control: Optional[ControlServer]
    cycle: Optional[Any]
    updates: Any
    stopping: bool
    klipper_down: Optional[str]
    guard_wait: Optional[str]
    guard_warning: bool
    _last_status: str

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
