"""The persistent job queue: staged images and job metadata under `state_dir`.

Layout (everything 0600 in 0700 directories; the daemon is the only writer)::

    state_dir/jobs/<id>.json        one job's metadata (the commit point of a job)
    state_dir/images/<id>.bin       its staged image, while the job may still be flashed
    state_dir/quarantine/           job files that failed the checks at load, with their images

Crash safety rests on two rules. Every file is written with `atomic_write` (temp file in
the same directory, fsync, rename over, fsync the directory), so a reader sees the old
bytes or the new bytes, never a mix. And a job's image is written before its metadata:
the metadata file is the commit point, so after SIGKILL at any moment a job either exists
whole (metadata and a verified image) or not at all (an image with no metadata is an
unfinished staging and is removed at load). Anything else found at load - unparsable
JSON, missing fields, an image of the wrong size or sha256 - did not come from this code
path, so it is moved aside to `quarantine/` and reported instead of being served or
silently deleted: a person may want to look at it.

This module must never open a path that a client named: job ids are checked against
`JOB_ID_RE` before any file name is built from them.

Thread safety: the daemon calls the store from its loop thread and from one flash worker;
one lock serialises every method. Job records are copied on the way in and out, so a
caller mutating its `Job` (the worker appends results) never changes what the store holds
until it calls `update`/`finish`.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import secrets
import threading
import time
from typing import Dict, List, Optional, Tuple

from .errors import FlashError, QueueError, StateWriteError
from .models import (
    JOB_CANCELLED,
    JOB_FINAL_STATES,
    JOB_INTERRUPTED,
    JOB_QUEUED,
    JOB_RUNNING,
    Job,
)

#: Job ids are `secrets.token_hex(6)`: exactly 12 lower-case hex characters. Nothing else
#: (no "../x", no "", no upper case) ever becomes part of a file name.
JOB_ID_RE = re.compile(r"\A[0-9a-f]{12}\Z")

#: Temp files of `atomic_write` look like ".<target name>.tmp-<random>"; the leading dot
#: keeps them out of the way of "<id>.json" matching, and load() removes leftovers.
_TMP_MARK = ".tmp-"

#: States whose image must still be on disk: they may yet be flashed.
_STATES_WITH_IMAGE = (JOB_QUEUED, JOB_RUNNING)
_ALL_STATES = (JOB_QUEUED, JOB_RUNNING) + tuple(JOB_FINAL_STATES)

#: Metadata fields a job file must carry, with the JSON types they must have.
_REQUIRED_FIELDS: Dict[str, Tuple[type, ...]] = {
    "id": (str,),
    "selector": (str,),
    "serial": (str,),
    "image_sha256": (str,),
    "image_size": (int,),
    "created": (int, float),
    "state": (str,),
}
_SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def needs_image(job: Job) -> bool:
    """The job may still be flashed: queued, running, or interrupted mid-write with a resume
    deadline (recovery.py). Every other job gives up its image."""
    if job.state in _STATES_WITH_IMAGE:
        return True
    return job.state == JOB_INTERRUPTED and job.resume_until is not None

#: Version of the metadata layout, written into every job file for future migrations.
FORMAT_VERSION = 1


def _fsync_dir(path: str) -> None:
    """Make a rename or unlink in `path` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file.

    The temp file lives in the same directory (rename is only atomic within one file
    system) and is created with O_EXCL under a random name, so two writers or a stale
    leftover can never be confused with it. On any error - ENOSPC above all - the temp
    file is removed, the old file is untouched, and the OSError is raised.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}{_TMP_MARK}{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    renamed = False
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        renamed = True
        _fsync_dir(directory)
    except BaseException:
        if not renamed:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise


def _is_temp(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _describe_id(job_id: object) -> str:
    """An id fit for a message: valid ids as they are, anything else quoted and cut short
    (a hostile client may send megabytes or control characters)."""
    if isinstance(job_id, str) and JOB_ID_RE.match(job_id):
        return job_id
    text = repr(job_id)
    return text if len(text) <= 40 else text[:37] + "..."


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


class _Problem(Exception):
    """Why a job file cannot be served (load-time only)."""


class JobStore:
    """Jobs and their staged images in `state_dir`; see the module docstring for the rules."""

    def __init__(self, state_dir: str, history_limit: int = 200) -> None:
        self.state_dir = state_dir
        self.history_limit = history_limit
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.images_dir = os.path.join(state_dir, "images")
        self.quarantine_dir = os.path.join(state_dir, "quarantine")
        self._lock = threading.RLock()
        self._jobs: Dict[str, Job] = {}
        # Jobs whose record on disk lags behind memory (a write failed), and why: retried
        # by `retry_writes`, shown by `kflashctl status` until then.
        self._unsaved: Dict[str, str] = {}

    # ------------------------------------------------------------------ paths ------

    def _check_id(self, job_id: object) -> str:
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise QueueError(f"no such job: {_describe_id(job_id)}")
        return job_id

    def _meta_path(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, self._check_id(job_id) + ".json")

    def _image_path(self, job_id: str) -> str:
        return os.path.join(self.images_dir, self._check_id(job_id) + ".bin")

    def image_path(self, job: Job) -> str:
        """Where the staged image of `job` lives (the flash tool is given this path)."""
        return self._image_path(job.id)

    # ------------------------------------------------------------------ loading ------

    def load(self) -> List[str]:
        """Read the state dir; return one line per problem found (quarantined files).

        Jobs found "running" stay "running": recovery.py decides what a crash mid-cycle
        means (from the job's write-ahead record), after starting Klipper first.
        """
        with self._lock:
            for directory in (self.state_dir, self.jobs_dir, self.images_dir, self.quarantine_dir):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            self._jobs = {}
            problems: List[str] = []
            self._remove_temp_files()

            for name in sorted(os.listdir(self.jobs_dir)):
                path = os.path.join(self.jobs_dir, name)
                try:
                    job = self._read_job_file(name, path)
                except _Problem as why:
                    problems.append(self._quarantine(name, str(why)))
                    continue
                self._jobs[job.id] = job

            problems.extend(self._resolve_duplicates())
            self._remove_orphan_images()
            self._prune_locked()
            return problems

    def _remove_temp_files(self) -> None:
        """Temp files are writes cut short by a crash: never committed, never served."""
        for directory in (self.jobs_dir, self.images_dir):
            for name in os.listdir(directory):
                if _is_temp(name):
                    _unlink_quietly(os.path.join(directory, name))

    def _read_job_file(self, name: str, path: str) -> Job:
        if not name.endswith(".json") or not JOB_ID_RE.match(name[: -len(".json")]):
            raise _Problem("not a job file name (expected <12 hex digits>.json)")
        file_id = name[: -len(".json")]
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except IsADirectoryError:
            raise _Problem("is a directory")
        except OSError as e:
            raise _Problem(f"unreadable ({_os_reason(e)})")
        if not raw:
            raise _Problem("empty file")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _Problem(f"not valid JSON ({e})")
        if not isinstance(data, dict):
            raise _Problem("not a JSON object")
        missing = [k for k in _REQUIRED_FIELDS if k not in data]
        if missing:
            raise _Problem(f"missing field(s) {', '.join(missing)}")
        for key, types in _REQUIRED_FIELDS.items():
            value = data[key]
            if not isinstance(value, types) or isinstance(value, bool):
                raise _Problem(f"field {key} has the wrong type ({type(value).__name__})")
        if data["id"] != file_id:
            raise _Problem(f"its id {_describe_id(data['id'])} does not match the file name")
        if data["state"] not in _ALL_STATES:
            raise _Problem(f"unknown state {data['state']!r}")
        if not _SHA256_RE.match(data["image_sha256"]):
            raise _Problem("image_sha256 is not a sha256 hex digest")
        if data["image_size"] < 0:
            raise _Problem("negative image_size")
        if not isinstance(data.get("results", []), list):
            raise _Problem("field results is not a list")
        try:
            job = Job.from_dict(data)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise _Problem(f"fields do not form a job ({type(e).__name__}: {e})")
        if needs_image(job):
            self._verify_image_file(job)
        return job

    def _verify_image_file(self, job: Job) -> None:
        path = self._image_path(job.id)
        try:
            with open(path, "rb") as f:
                image = f.read(job.image_size + 1)
        except FileNotFoundError:
            raise _Problem(f"its image images/{job.id}.bin is missing")
        except OSError as e:
            raise _Problem(f"its image images/{job.id}.bin is unreadable ({_os_reason(e)})")
        if len(image) != job.image_size:
            raise _Problem(
                f"its image images/{job.id}.bin has the wrong size "
                f"({'more than ' + str(job.image_size) if len(image) > job.image_size else len(image)}"
                f" bytes, expected {job.image_size})"
            )
        if hashlib.sha256(image).hexdigest() != job.image_sha256:
            raise _Problem(f"its image images/{job.id}.bin does not match its sha256")

    def _quarantine(self, name: str, why: str) -> str:
        """Move a bad job file (and its image, if any) aside; return the report line."""
        moved = [self._move_to_quarantine(os.path.join(self.jobs_dir, name), name)]
        stem = name[: -len(".json")] if name.endswith(".json") else None
        if stem is not None and JOB_ID_RE.match(stem):
            image = os.path.join(self.images_dir, stem + ".bin")
            if os.path.lexists(image):
                moved.append(self._move_to_quarantine(image, stem + ".bin"))
        for directory in (self.jobs_dir, self.images_dir, self.quarantine_dir):
            _fsync_dir(directory)
        where = ", ".join(m for m in moved if m)
        return f"quarantined job file jobs/{name}: {why} (moved to {where})"

    def _move_to_quarantine(self, path: str, name: str) -> str:
        target = os.path.join(self.quarantine_dir, name)
        n = 1
        while os.path.lexists(target):
            target = os.path.join(self.quarantine_dir, f"{name}.{n}")
            n += 1
        os.rename(path, target)
        return os.path.relpath(target, self.state_dir)

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
        for name in os.listdir(self.images_dir):
            stem = name[: -len(".bin")] if name.endswith(".bin") else ""
            job = self._jobs.get(stem)
            if job is not None and needs_image(job):
                continue
            try:
                _unlink_quietly(os.path.join(self.images_dir, name))
            except OSError:
                pass  # a directory or similar: not ours to remove, and harmless

    # ------------------------------------------------------------------ staging ------

    def new_id(self) -> str:
        """A fresh job id (12 hex digits, unguessable, not used by any known job)."""
        with self._lock:
            while True:
                job_id = secrets.token_hex(6)
                if job_id not in self._jobs and not os.path.lexists(self._meta_path(job_id)):
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
            self._check_id(job.id)
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
                atomic_write(self._image_path(job.id), image)
                self._write_meta(stored)
            except OSError as e:
                self._discard_files(job.id)
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
                    self._write_meta(replaced)
                except OSError:
                    pass  # keep its image: on disk it is still a queued job until load()
                else:
                    self._remove_image(old.id)
            return copy.deepcopy(replaced) if replaced is not None else None

    def _no_space_message(self, e: OSError) -> str:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"cannot stage job: no space left in {self.state_dir}"
        return f"cannot stage job: {_os_reason(e)} in {self.state_dir}"

    def _discard_files(self, job_id: str) -> None:
        """Remove what a failed staging may have written (metadata first: the commit point).
        On a read-only file system nothing was written, and unlink fails too: no matter."""
        for path in (self._meta_path(job_id), self._image_path(job_id)):
            try:
                _unlink_quietly(path)
            except OSError:
                pass
        for directory in (self.jobs_dir, self.images_dir):
            try:
                _fsync_dir(directory)
            except OSError:
                pass

    def _write_meta(self, job: Job) -> None:
        data = job.to_dict()
        data["format"] = FORMAT_VERSION
        atomic_write(self._meta_path(job.id), json.dumps(data, indent=1, sort_keys=True).encode())

    def _remove_image(self, job_id: str) -> None:
        """Best effort: an image left behind is an orphan that the next load() removes."""
        try:
            if _unlink_quietly(self._image_path(job_id)):
                _fsync_dir(self.images_dir)
        except OSError:
            pass

    # ------------------------------------------------------------------ changes ------

    def update(self, job: Job) -> None:
        """Persist `job`'s metadata (sets `job.updated`).

        The in-memory record follows even if the write fails (the daemon's view must match
        what really happened to the board); the QueueError then says the disk lags behind.
        """
        with self._lock:
            self._check_id(job.id)
            if job.id not in self._jobs:
                raise QueueError(f"no such job: {job.id}")
            job.updated = time.time()
            self._store_and_write(job)

    def _store_and_write(self, job: Job) -> None:
        stored = copy.deepcopy(job)
        self._jobs[job.id] = stored
        try:
            self._write_meta(stored)
        except OSError as e:
            self._unsaved[job.id] = _os_reason(e)
            raise StateWriteError(
                f"cannot save job {job.id} in {self.state_dir}: {_os_reason(e)}", _os_reason(e)
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
                    self._write_meta(job)
                except OSError as e:
                    self._unsaved[job_id] = _os_reason(e)
                    continue
                del self._unsaved[job_id]
                if not needs_image(job):
                    self._remove_image(job_id)

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
            self._check_id(job.id)
            if job.id not in self._jobs:
                raise QueueError(f"no such job: {job.id}")
            self._finish_locked(job, state, message)

    def _finish_locked(self, job: Job, state: str, message: str) -> None:
        job.state = state
        job.message = message
        job.updated = time.time()
        self._store_and_write(job)  # image removal only after the final state is on disk
        if not needs_image(job):
            self._remove_image(job.id)

    def requeue(self, job: Job, message: str) -> None:
        """Put an interrupted (or stale running) job back in the queue; attempts are kept."""
        with self._lock:
            self._check_id(job.id)
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
            # Metadata first: without it an image is an orphan that load() removes anyway.
            try:
                _unlink_quietly(self._meta_path(job.id))
                _unlink_quietly(self._image_path(job.id))
            except OSError:
                continue  # a read-only or failing disk: history is kept, tried again later
            del self._jobs[job.id]
            self._unsaved.pop(job.id, None)
            removed = True
        if removed:
            for directory in (self.jobs_dir, self.images_dir):
                try:
                    _fsync_dir(directory)
                except OSError:
                    pass

    # ------------------------------------------------------------------ queries ------

    def get(self, job_id: str) -> Job:
        with self._lock:
            return copy.deepcopy(self._get_locked(job_id))

    def _get_locked(self, job_id: str) -> Job:
        self._check_id(job_id)
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
            path = self._image_path(job.id)
            try:
                with open(path, "rb") as f:
                    image = f.read()
            except OSError as e:
                raise FlashError(
                    f"staged image of job {job.id} is unreadable ({_os_reason(e)}); queue it again"
                ) from e
        if len(image) != job.image_size or hashlib.sha256(image).hexdigest() != job.image_sha256:
            raise FlashError(
                f"staged image of job {job.id} is damaged (sha256 mismatch); queue it again"
            )
        return image


def _unlink_quietly(path: str) -> bool:
    """Remove `path` if it is there; True when something was removed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


__all__ = ["JOB_ID_RE", "FORMAT_VERSION", "JobStore", "atomic_write"]
