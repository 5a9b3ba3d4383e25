"""The persistent job queue: the jobs in memory, kept in step with their files on disk.

Owns which jobs exist and their states: staging a new job (replacing the queued one for the
same board), updates, final states, requeue, cancel, pruning the history, and every query.
The files themselves (layout, atomic writes, the checks at load, quarantine) are
statefiles.py's; this module decides when they are written, in what order:

Crash safety: a job's image is written before its metadata, and the metadata file is the
commit point, so after SIGKILL at any moment a job either exists whole (metadata and a
verified image) or not at all (an image with no metadata is an unfinished staging and is
removed at load). A record that cannot be written (full or failing disk) is kept in memory
and listed by `unsaved` until `retry_writes` gets it onto disk: the daemon's view follows
what really happened to the board, never the disk.

Thread safety: the daemon calls the store from its loop thread and from one flash worker;
one lock serialises every method. Job records are copied on the way in and out, so a
caller mutating its `Job` (the worker appends results) never changes what the store holds
until it calls `update`/`finish`. It must never build a file name from an unchecked job id
(statefiles.JobFiles.check_id comes first).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import os
import secrets
import threading
import time
from typing import Dict, List, Optional

from .errors import FlashError, QueueError, StateWriteError
from .models import JOB_CANCELLED, JOB_FINAL_STATES, JOB_INTERRUPTED, JOB_QUEUED, JOB_RUNNING, Job
from .statefiles import (
    FORMAT_VERSION,
    JOB_ID_RE,
    JobFiles,
    LoadProblem,
    atomic_write,
    needs_image,
    os_reason,
    unlink_quietly,
)


class JobStore:
    """Jobs and their staged images in `state_dir`; see the module docstring for the rules."""

    def __init__(self, state_dir: str, history_limit: int = 200) -> None:
        self.state_dir = state_dir
        self.history_limit = history_limit
        self.files = JobFiles(state_dir)
        self._lock = threading.RLock()
        self._jobs: Dict[str, Job] = {}
        # Jobs whose record on disk lags behind memory (a write failed), and why: retried
        # by `retry_writes`, shown by `kflashctl status` until then.
        self._unsaved: Dict[str, str] = {}

    # ------------------------------------------------------------------ paths ------

    def image_path(self, job: Job) -> str:
        """Where the staged image of `job` lives (the flash tool is given this path)."""
        return self.files.image_path(job.id)

    # ------------------------------------------------------------------ loading ------

    def load(self) -> List[str]:
        """Read the state dir; return one line per problem found (quarantined files).

        Jobs found "running" stay "running": recovery.py decides what a crash mid-cycle
        means (from the job's write-ahead record), after starting Klipper first.
        """
        with self._lock:
            self.files.make_dirs()
            self._jobs = {}
            problems: List[str] = []
            self.files.remove_temp_files()

            for name in sorted(os.listdir(self.files.jobs_dir)):
                path = os.path.join(self.files.jobs_dir, name)
                try:
                    job = self.files.read_job_file(name, path)
                except LoadProblem as why:
                    problems.append(self.files.quarantine(name, str(why)))
                    continue
                self._jobs[job.id] = job

            problems.extend(self._resolve_duplicates())
            self._remove_orphan_images()
            self._prune_locked()
            return problems

    def _resolve_duplicates(self) -> List[str]:
        """Two queued jobs for one board: a crash hit `stage` between committing the new
        job and cancelling the one it replaces. Finish that replacement now."""
        lines: List[str] = []
        newest: Dict[str, Job] = {}
        for job in sorted(self._queued_locked(), key=lambda j: (j.created, j.id), reverse=True):
            keeper = newest.setdefault(f"{job.serial}@{job.port or ''}", job)
            if keeper is job:
                continue
            line = (
                f"job {job.id} for board {job.serial} cancelled: replaced by job {keeper.id} "
                f"(kflashd stopped before it could record that)"
            )
            try:
                self._finish_locked(job, JOB_CANCELLED, f"replaced by job {keeper.id}")
            except QueueError as e:
                line += f"; {e}"
            lines.append(line)
        return lines

    def _remove_orphan_images(self) -> None:
        """Images without a job that needs them: a staging cut short before its commit
        point, or a finished job whose image removal was cut short."""
        for name in os.listdir(self.files.images_dir):
            stem = name[: -len(".bin")] if name.endswith(".bin") else ""
            job = self._jobs.get(stem)
            if job is not None and needs_image(job):
                continue
            try:
                unlink_quietly(os.path.join(self.files.images_dir, name))
            except OSError:
                pass  # a directory or similar: not ours to remove, and harmless

    # ------------------------------------------------------------------ staging ------

    def new_id(self) -> str:
        """A fresh job id (12 hex digits, unguessable, not used by any known job)."""
        with self._lock:
            while True:
                job_id = secrets.token_hex(6)
                if job_id not in self._jobs and not os.path.lexists(self.files.meta_path(job_id)):
                    return job_id

    def stage(self, job: Job, image: bytes) -> Optional[Job]:
        """Persist a new queued job with its image; return the queued job it replaced.

        Order: image, then metadata (the commit point), then the replaced job is marked
        cancelled. A crash between the last two leaves two queued jobs for one board,
        which `load` resolves the same way. A failed write before the commit point removes
        everything of the new job and leaves the old one queued; after it, the staging
        stands (see below).
        """
        with self._lock:
            self.files.check_id(job.id)
            if job.id in self._jobs:
                raise QueueError(f"job {job.id} already exists")
            if len(image) != job.image_size:
                raise QueueError(
                    f"image size {len(image)} does not match the declared {job.image_size} bytes"
                )
            if hashlib.sha256(image).hexdigest() != job.image_sha256:
                raise QueueError("the image's sha256 does not match the job's: transfer damaged")
            for other in self._jobs.values():
                if other.state == JOB_RUNNING and other.same_board(job):
                    raise QueueError(
                        f"board {job.serial} is being flashed by job {other.id}; wait for it or "
                        f"queue again afterwards"
                    )
            old = self._queued_for_locked(job.serial, job.port)

            job.state = JOB_QUEUED
            job.updated = time.time()
            stored = copy.deepcopy(job)
            try:
                atomic_write(self.files.image_path(job.id), image)
                self.files.write_meta(stored)
            except OSError as e:
                self.files.discard_files(job.id)
                raise QueueError(self._no_space_message(e)) from e

            self._jobs[job.id] = stored
            replaced: Optional[Job] = None
            if old is not None:
                # Past the commit point: the new job exists. Cancelling the old one is a
                # consequence that load() re-derives (newest queued job per board wins), so
                # a failure to record it now is not a failure of the staging.
                replaced = old
                replaced.state = JOB_CANCELLED
                replaced.message = f"replaced by job {job.id}"
                replaced.updated = time.time()
                try:
                    self.files.write_meta(replaced)
                except OSError:
                    pass  # keep its image: on disk it is still a queued job until load()
                else:
                    self.files.remove_image(old.id)
            return copy.deepcopy(replaced) if replaced is not None else None

    def _no_space_message(self, e: OSError) -> str:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"cannot stage job: no space left in {self.state_dir}"
        return f"cannot stage job: {os_reason(e)} in {self.state_dir}"

    # ------------------------------------------------------------------ changes ------

    def update(self, job: Job) -> None:
        """Persist `job`'s metadata (sets `job.updated`).

        The in-memory record follows even if the write fails (the daemon's view must match
        what really happened to the board); the QueueError then says the disk lags behind.
        """
        with self._lock:
            self.files.check_id(job.id)
            if job.id not in self._jobs:
                raise QueueError(f"no such job: {job.id}")
            job.updated = time.time()
            self._store_and_write(job)

    def _store_and_write(self, job: Job) -> None:
        stored = copy.deepcopy(job)
        self._jobs[job.id] = stored
        try:
            self.files.write_meta(stored)
        except OSError as e:
            self._unsaved[job.id] = os_reason(e)
            raise StateWriteError(
                f"cannot save job {job.id} in {self.state_dir}: {os_reason(e)}", os_reason(e)
            ) from e
        self._unsaved.pop(job.id, None)

    def unsaved(self) -> Dict[str, str]:
        """job id -> why its record on disk is older than the daemon's (a write failed)."""
        with self._lock:
            return dict(self._unsaved)

    def retry_writes(self) -> None:
        """Write again the records that failed to save (the disk may have room again);
        a finished job's image goes once its final state is on disk."""
        with self._lock:
            for job_id in list(self._unsaved):
                job = self._jobs.get(job_id)
                if job is None:
                    self._unsaved.pop(job_id, None)
                    continue
                try:
                    self.files.write_meta(job)
                except OSError as e:
                    self._unsaved[job_id] = os_reason(e)
                    continue
                del self._unsaved[job_id]
                if not needs_image(job):
                    self.files.remove_image(job_id)

    def finish(self, job: Job, state: str, message: str) -> None:
        """Give `job` its final state and message, persist it, then drop its staged image.

        A job interrupted mid-write with a resume deadline keeps the image (it may be
        flashed again onto the same board); every other one gives it up, after the final
        state is on disk. The metadata stays as history until `prune`. When the write
        fails, the in-memory record is final all the same (StateWriteError says the disk
        lags behind) and the image stays until the next `load`.
        """
        if state not in JOB_FINAL_STATES:
            raise ValueError(f"not a final job state: {state!r}")
        with self._lock:
            self.files.check_id(job.id)
            if job.id not in self._jobs:
                raise QueueError(f"no such job: {job.id}")
            self._finish_locked(job, state, message)

    def _finish_locked(self, job: Job, state: str, message: str) -> None:
        job.state = state
        job.message = message
        job.updated = time.time()
        self._store_and_write(job)  # image removal only after the final state is on disk
        if not needs_image(job):
            self.files.remove_image(job.id)

    def requeue(self, job: Job, message: str) -> None:
        """Put an interrupted (or stale running) job back in the queue; attempts are kept."""
        with self._lock:
            self.files.check_id(job.id)
            current = self._jobs.get(job.id)
            if current is None:
                raise QueueError(f"no such job: {job.id}")
            if current.state not in (JOB_INTERRUPTED, JOB_RUNNING, JOB_QUEUED) or not needs_image(current):
                raise QueueError(f"job {job.id} is already {current.state}; it cannot be queued again")
            # A missing or damaged image is not checked here: read_image() refuses it before
            # the flash with a message the user can act on, and start-up must not fail on it.
            job.state = JOB_QUEUED
            job.message = message
            job.updated = time.time()
            self._store_and_write(job)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job. A running job is never cut off mid-flash (a half-written
        board is worse than a late cancel); a finished one has nothing left to cancel."""
        with self._lock:
            job = self._get_locked(job_id)
            if job.state == JOB_RUNNING:
                raise QueueError(f"job {job.id} is running; it cannot be cancelled mid-flash")
            if job.state != JOB_QUEUED:
                raise QueueError(f"job {job.id} is already {job.state}")
            self._finish_locked(job, JOB_CANCELLED, "cancelled by user")
            return copy.deepcopy(job)

    def prune(self) -> None:
        """Keep at most `history_limit` finished jobs; the oldest go with their files."""
        with self._lock:
            self._prune_locked()

    def _prune_locked(self) -> None:
        finished = self._history_locked()
        removed = False
        for job in finished[max(self.history_limit, 0):]:
            if needs_image(job):
                continue  # may still be flashed again (recovery.py ends it first)
            try:
                self.files.remove_job_files(job.id)
            except OSError:
                continue  # a read-only or failing disk: history is kept, tried again later
            del self._jobs[job.id]
            self._unsaved.pop(job.id, None)
            removed = True
        if removed:
            self.files.sync_job_dirs()

    # ------------------------------------------------------------------ queries ------

    def get(self, job_id: str) -> Job:
        with self._lock:
            return copy.deepcopy(self._get_locked(job_id))

    def _get_locked(self, job_id: str) -> Job:
        self.files.check_id(job_id)
        job = self._jobs.get(job_id)
        if job is None:
            raise QueueError(f"no such job: {job_id}")
        return job

    def _queued_locked(self) -> List[Job]:
        jobs = [j for j in self._jobs.values() if j.state == JOB_QUEUED]
        return sorted(jobs, key=lambda j: (j.created, j.id))

    def _queued_for_locked(self, serial: str, port: Optional[str] = None) -> Optional[Job]:
        """The queued job for the board with this serial (on this port, where either the
        job or the caller names one)."""
        for job in self._queued_locked():
            if job.serial == serial and (port is None or job.port is None or job.port == port):
                return job
        return None

    def _history_locked(self) -> List[Job]:
        jobs = [j for j in self._jobs.values() if j.state in JOB_FINAL_STATES]
        return sorted(jobs, key=lambda j: (j.updated, j.created, j.id), reverse=True)

    def queued(self) -> List[Job]:
        """Queued jobs, oldest first (the order in which boards are served)."""
        with self._lock:
            return copy.deepcopy(self._queued_locked())

    def queued_for(self, serial: str, port: Optional[str] = None) -> Optional[Job]:
        with self._lock:
            return copy.deepcopy(self._queued_for_locked(serial, port))

    def running(self) -> List[Job]:
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.state == JOB_RUNNING]
            return copy.deepcopy(sorted(jobs, key=lambda j: (j.created, j.id)))

    def jobs(self) -> List[Job]:
        """Every known job, pending and history, newest first."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: (j.created, j.id), reverse=True)
            return copy.deepcopy(jobs)

    def history(self, limit: int = 50) -> List[Job]:
        """Finished jobs, most recently finished first."""
        with self._lock:
            return copy.deepcopy(self._history_locked()[: max(limit, 0)])

    def read_image(self, job: Job) -> bytes:
        """The staged image, checked against the sha256 the client sent: a file damaged on
        disk must never reach a board."""
        with self._lock:
            path = self.files.image_path(job.id)
            try:
                with open(path, "rb") as f:
                    image = f.read()
            except OSError as e:
                raise FlashError(
                    f"staged image of job {job.id} is unreadable ({os_reason(e)}); queue it again"
                ) from e
        if len(image) != job.image_size or hashlib.sha256(image).hexdigest() != job.image_sha256:
            raise FlashError(
                f"staged image of job {job.id} is damaged (sha256 mismatch); queue it again"
            )
        return image


__all__ = ["JOB_ID_RE", "FORMAT_VERSION", "JobStore", "atomic_write", "needs_image"]
