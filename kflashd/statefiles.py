"""The files under `state_dir`: how a job is laid out on disk, written, read and quarantined.

Layout (everything 0600 in 0700 directories; the daemon is the only writer)::

    state_dir/jobs/<id>.json        one job's metadata (the commit point of a job)
    state_dir/images/<id>.bin       its staged image, while the job may still be flashed
    state_dir/quarantine/           job files that failed the checks at load, with their images

Every file is written with `atomic_write` (temp file in the same directory, fsync, rename
over, fsync the directory), so a reader sees the old bytes or the new bytes, never a mix
(boardfacts.py and klipper_stop.py use it too). A job file is read back only through
`JobFiles.read_job_file`, which checks every field and the image's size and sha256:
anything that did not come from this code path is a `LoadProblem`, and the file is moved
to `quarantine/` rather than served or silently deleted.

This module owns file names and bytes, never job state: which jobs exist, and what happens
to them, is store.py's (the in-memory queue). It must never open a path that a client
named: job ids are checked against `JOB_ID_RE` before any file name is built from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from typing import Dict, Tuple

from .errors import QueueError
from .models import JOB_FINAL_STATES, JOB_INTERRUPTED, JOB_QUEUED, JOB_RUNNING, Job

#: Job ids are `secrets.token_hex(6)`: exactly 12 lower-case hex characters. Nothing else
#: (no "../x", no "", no upper case) ever becomes part of a file name.
JOB_ID_RE = re.compile(r"\A[0-9a-f]{12}\Z")

#: Temp files of `atomic_write` look like ".<target name>.tmp-<random>"; the leading dot
#: keeps them out of the way of "<id>.json" matching, and load() removes leftovers.
TMP_MARK = ".tmp-"

#: States whose image must still be on disk: they may yet be flashed.
STATES_WITH_IMAGE = (JOB_QUEUED, JOB_RUNNING)
ALL_STATES = (JOB_QUEUED, JOB_RUNNING) + tuple(JOB_FINAL_STATES)

#: Metadata fields a job file must carry, with the JSON types they must have.
REQUIRED_FIELDS: Dict[str, Tuple[type, ...]] = {
    "id": (str,),
    "selector": (str,),
    "serial": (str,),
    "image_sha256": (str,),
    "image_size": (int,),
    "created": (int, float),
    "state": (str,),
}
SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def needs_image(job: Job) -> bool:
    """The job may still be flashed: queued, running, or interrupted mid-write with a resume
    deadline (recovery.py). Every other job gives up its image."""
    if job.state in STATES_WITH_IMAGE:
        return True
    return job.state == JOB_INTERRUPTED and job.resume_until is not None

#: Version of the metadata layout, written into every job file for future migrations.
FORMAT_VERSION = 1


def fsync_dir(path: str) -> None:
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
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}{secrets.token_hex(4)}")
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
        fsync_dir(directory)
    except BaseException:
        if not renamed:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise


def is_temp(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def describe_id(job_id: object) -> str:
    """An id fit for a message: valid ids as they are, anything else quoted and cut short
    (a hostile client may send megabytes or control characters)."""
    if isinstance(job_id, str) and JOB_ID_RE.match(job_id):
        return job_id
    text = repr(job_id)
    return text if len(text) <= 40 else text[:37] + "..."


def os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def unlink_quietly(path: str) -> bool:
    """Remove `path` if it is there; True when something was removed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class LoadProblem(Exception):
    """Why a job file cannot be served (load-time only)."""


class JobFiles:
    """The job and image files of one `state_dir` (no lock: JobStore holds its own)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.images_dir = os.path.join(state_dir, "images")
        self.quarantine_dir = os.path.join(state_dir, "quarantine")

    def make_dirs(self) -> None:
        for directory in (self.state_dir, self.jobs_dir, self.images_dir, self.quarantine_dir):
            os.makedirs(directory, mode=0o700, exist_ok=True)

    # ------------------------------------------------------------------ paths ------

    def check_id(self, job_id: object) -> str:
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise QueueError(f"no such job: {describe_id(job_id)}")
        return job_id

    def meta_path(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, self.check_id(job_id) + ".json")

    def image_path(self, job_id: str) -> str:
        return os.path.join(self.images_dir, self.check_id(job_id) + ".bin")

    # ------------------------------------------------------------------ reading ------

    def remove_temp_files(self) -> None:
        """Temp files are writes cut short by a crash: never committed, never served."""
        for directory in (self.jobs_dir, self.images_dir):
            for name in os.listdir(directory):
                if is_temp(name):
                    unlink_quietly(os.path.join(directory, name))

    def read_job_file(self, name: str, path: str) -> Job:
        """The job in jobs/`name`, every field checked, and its image if it still needs one;
        LoadProblem says why not."""
        if not name.endswith(".json") or not JOB_ID_RE.match(name[: -len(".json")]):
            raise LoadProblem("not a job file name (expected <12 hex digits>.json)")
        file_id = name[: -len(".json")]
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except IsADirectoryError:
            raise LoadProblem("is a directory")
        except OSError as e:
            raise LoadProblem(f"unreadable ({os_reason(e)})")
        if not raw:
            raise LoadProblem("empty file")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise LoadProblem(f"not valid JSON ({e})")
        if not isinstance(data, dict):
            raise LoadProblem("not a JSON object")
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            raise LoadProblem(f"missing field(s) {', '.join(missing)}")
        for key, types in REQUIRED_FIELDS.items():
            value = data[key]
            if not isinstance(value, types) or isinstance(value, bool):
                raise LoadProblem(f"field {key} has the wrong type ({type(value).__name__})")
        if data["id"] != file_id:
            raise LoadProblem(f"its id {describe_id(data['id'])} does not match the file name")
        if data["state"] not in ALL_STATES:
            raise LoadProblem(f"unknown state {data['state']!r}")
        if not SHA256_RE.match(data["image_sha256"]):
            raise LoadProblem("image_sha256 is not a sha256 hex digest")
        if data["image_size"] < 0:
            raise LoadProblem("negative image_size")
        if not isinstance(data.get("results", []), list):
            raise LoadProblem("field results is not a list")
        try:
            job = Job.from_dict(data)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise LoadProblem(f"fields do not form a job ({type(e).__name__}: {e})")
        if needs_image(job):
            self._verify_image_file(job)
        return job

    def _verify_image_file(self, job: Job) -> None:
        path = self.image_path(job.id)
        try:
            with open(path, "rb") as f:
                image = f.read(job.image_size + 1)
        except FileNotFoundError:
            raise LoadProblem(f"its image images/{job.id}.bin is missing")
        except OSError as e:
            raise LoadProblem(f"its image images/{job.id}.bin is unreadable ({os_reason(e)})")
        if len(image) != job.image_size:
            raise LoadProblem(
                f"its image images/{job.id}.bin has the wrong size "
                f"({'more than ' + str(job.image_size) if len(image) > job.image_size else len(image)}"
                f" bytes, expected {job.image_size})"
            )
        if hashlib.sha256(image).hexdigest() != job.image_sha256:
            raise LoadProblem(f"its image images/{job.id}.bin does not match its sha256")

    def quarantine(self, name: str, why: str) -> str:
        """Move a bad job file (and its image, if any) aside; return the report line."""
        moved = [self._move_to_quarantine(os.path.join(self.jobs_dir, name), name)]
        stem = name[: -len(".json")] if name.endswith(".json") else None
        if stem is not None and JOB_ID_RE.match(stem):
            image = os.path.join(self.images_dir, stem + ".bin")
            if os.path.lexists(image):
                moved.append(self._move_to_quarantine(image, stem + ".bin"))
        for directory in (self.jobs_dir, self.images_dir, self.quarantine_dir):
            fsync_dir(directory)
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

    # ------------------------------------------------------------------ writing ------

    def write_meta(self, job: Job) -> None:
        data = job.to_dict()
        data["format"] = FORMAT_VERSION
        atomic_write(self.meta_path(job.id), json.dumps(data, indent=1, sort_keys=True).encode())

    def remove_image(self, job_id: str) -> None:
        """Best effort: an image left behind is an orphan that the next load() removes."""
        try:
            if unlink_quietly(self.image_path(job_id)):
                fsync_dir(self.images_dir)
        except OSError:
            pass

    def discard_files(self, job_id: str) -> None:
        """Remove what a failed staging may have written (metadata first: the commit point).
        On a read-only file system nothing was written, and unlink fails too: no matter."""
        for path in (self.meta_path(job_id), self.image_path(job_id)):
            try:
                unlink_quietly(path)
            except OSError:
                pass
        self.sync_job_dirs()

    def remove_job_files(self, job_id: str) -> None:
        """Metadata first: without it an image is an orphan that the next load removes.
        An OSError (a read-only or failing disk) is the caller's to handle."""
        unlink_quietly(self.meta_path(job_id))
        unlink_quietly(self.image_path(job_id))

    def sync_job_dirs(self) -> None:
        """Best effort: make removals in jobs/ and images/ durable."""
        for directory in (self.jobs_dir, self.images_dir):
            try:
                fsync_dir(directory)
            except OSError:
                pass
