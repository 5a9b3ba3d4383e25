"""The persistent job queue: round trips, replacement rules, quarantine, full disks, SIGKILL.

The crash tests do not trust a model of the store: they fork a child that stages for
real and is SIGKILLed (at every single write/fsync/rename/unlink of a staging, and at
random moments of a staging loop), and a fresh JobStore in the parent must then find
only whole jobs. The full-disk test uses a real 64 KiB tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import select
import signal
import stat
import subprocess
import threading
import time
import types
from typing import Callable, Dict, Iterator, List, Optional

import pytest

import kflashd.store as store_module
from kflashd.errors import FlashError, QueueError
from kflashd.models import (
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_INTERRUPTED,
    JOB_QUEUED,
    JOB_RUNNING,
    FlashResult,
    Job,
)
from kflashd.store import JOB_ID_RE, JobStore, atomic_write, needs_image

_created = itertools.count(1_700_000_000)


def make_job(store: JobStore, serial: str, image: bytes, **fields) -> Job:
    """A job as the daemon builds it (created times strictly increase, so order is known)."""
    return Job(
        id=store.new_id(),
        selector=fields.pop("selector", serial),
        serial=serial,
        board_name=fields.pop("board_name", None),
        image_sha256=hashlib.sha256(image).hexdigest(),
        image_size=len(image),
        created=float(next(_created)),
        **fields,
    )


def stage(store: JobStore, serial: str, size: int = 1000, **fields):
    image = os.urandom(size)
    job = make_job(store, serial, image, **fields)
    replaced = store.stage(job, image)
    return job, image, replaced


def snapshot(root: str) -> Dict[str, bytes]:
    """Every file under `root` with its content: proves that nothing was touched."""
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def temp_files(root: str) -> List[str]:
    return [p for p in snapshot(root) if ".tmp-" in os.path.basename(p)]


def reload(state_dir: str, **kwargs):
    store = JobStore(state_dir, **kwargs)
    problems = store.load()
    return store, problems


@pytest.fixture
def state_dir(tmp_path) -> str:
    return str(tmp_path / "state")


@pytest.fixture
def store(state_dir) -> JobStore:
    s = JobStore(state_dir)
    assert s.load() == []
    return s


class FakeClock:
    """Replaces time.time inside kflashd.store only, so `updated` order is exact."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=fake.time))
    return fake


# ---------------------------------------------------------------- basics ------


def test_round_trip(store, state_dir):
    job, image, replaced = stage(store, "3A0042001851", 5000, board_name="octopus", image_mcu="stm32f446xx")
    assert replaced is None
    assert JOB_ID_RE.match(job.id)

    got = store.get(job.id)
    assert got.to_dict() == job.to_dict()
    assert got.state == JOB_QUEUED and got.updated > 0
    assert [j.id for j in store.queued()] == [job.id]
    assert store.queued_for("3A0042001851").id == job.id
    assert store.queued_for("other") is None
    assert store.running() == [] and store.history() == []
    assert store.read_image(job) == image

    # Files: image and metadata, 0600, in 0700 directories.
    image_path = store.image_path(job)
    assert image_path == os.path.join(state_dir, "images", job.id + ".bin")
    meta_path = os.path.join(state_dir, "jobs", job.id + ".json")
    for path in (image_path, meta_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for sub in ("jobs", "images", "quarantine"):
        assert stat.S_IMODE(os.stat(os.path.join(state_dir, sub)).st_mode) == 0o700
    with open(meta_path) as f:
        assert json.load(f)["image_sha256"] == hashlib.sha256(image).hexdigest()

    # Records are copies: changing one the caller holds does not change the store.
    got.state = JOB_DONE
    assert store.get(job.id).state == JOB_QUEUED


def test_stage_checks_image_against_job(store, state_dir):
    image = os.urandom(100)
    job = make_job(store, "AA", image)
    with pytest.raises(QueueError, match="sha256"):
        store.stage(job, image[:-1] + bytes([image[-1] ^ 1]))
    with pytest.raises(QueueError, match="size"):
        store.stage(job, image + b"x")
    assert store.jobs() == []
    assert snapshot(state_dir) == {}


def test_survives_reload(store, state_dir):
    queued, queued_image, _ = stage(store, "S1", board_name="octopus", image_version="v0.12.0")
    running, _, _ = stage(store, "S2")
    running.state = JOB_RUNNING
    running.attempts = 1
    store.update(running)
    done, _, _ = stage(store, "S3")
    done.results.append(FlashResult(True, "katapult", 3.5))
    done.mcu_version_after = "v0.12.0"
    done.version_confirmed = True
    store.finish(done, JOB_DONE, "flashed via katapult in 3.5 s")
    interrupted, interrupted_image, _ = stage(store, "S4")
    interrupted.write, interrupted.write_port, interrupted.write_started = "started", "1-1.2", time.time()
    interrupted.resume_until = time.time() + 3600
    store.finish(interrupted, JOB_INTERRUPTED, "interrupted mid-write")
    nothing_written, _, _ = stage(store, "S5")
    store.finish(nothing_written, JOB_INTERRUPTED, "interrupted, nothing written")
    before = {j.id: j.to_dict() for j in store.jobs()}

    again, problems = reload(state_dir)
    assert problems == []
    assert {j.id: j.to_dict() for j in again.jobs()} == before
    assert again.get(done.id).results == [FlashResult(True, "katapult", 3.5)]
    # Running stays running: the daemon decides what a crash mid-flash means.
    assert [j.id for j in again.running()] == [running.id]
    assert again.read_image(queued) == queued_image
    # Finished jobs give up their image; one interrupted mid-write keeps it while it may be
    # repeated (a resume deadline), one interrupted before the write does not.
    assert not os.path.exists(again.image_path(done))
    assert again.read_image(interrupted) == interrupted_image
    assert not os.path.exists(again.image_path(nothing_written))
    assert [j.id for j in again.history()] == [nothing_written.id, interrupted.id, done.id]


def test_requeue_keeps_attempts_and_image(store, state_dir):
    job, image, _ = stage(store, "S1")
    job.state = JOB_RUNNING
    job.attempts = 1
    store.update(job)
    job.resume_until = time.time() + 3600
    store.finish(job, JOB_INTERRUPTED, "interrupted")
    store.requeue(job, "re-queued: its board waits in Katapult")
    again, _ = reload(state_dir)
    got = again.get(job.id)
    assert (got.state, got.attempts, got.message) == (JOB_QUEUED, 1, "re-queued: its board waits in Katapult")
    assert again.read_image(got) == image

    done, _, _ = stage(store, "S2")
    store.finish(done, JOB_DONE, "ok")
    with pytest.raises(QueueError, match="already done"):
        store.requeue(done, "again")


# ---------------------------------------------------------------- one job per board ------


def test_new_job_replaces_queued_job_for_same_board(store, state_dir):
    first, _, _ = stage(store, "S1")
    other, _, _ = stage(store, "S2")
    second, second_image, replaced = stage(store, "S1")

    assert replaced is not None
    assert replaced.id == first.id
    assert replaced.state == JOB_CANCELLED
    assert replaced.message == f"replaced by job {second.id}"
    assert store.queued_for("S1").id == second.id
    assert [j.id for j in store.queued()] == [other.id, second.id]
    assert not os.path.exists(store.image_path(first))

    again, problems = reload(state_dir)
    assert problems == []
    assert again.get(first.id).state == JOB_CANCELLED
    assert again.get(first.id).message == f"replaced by job {second.id}"
    assert again.read_image(second) == second_image
    assert again.get(other.id).state == JOB_QUEUED


def test_running_job_is_not_replaced(store, state_dir):
    running, _, _ = stage(store, "S1")
    running.state = JOB_RUNNING
    store.update(running)
    before = snapshot(state_dir)

    image = os.urandom(100)
    job = make_job(store, "S1", image)
    with pytest.raises(QueueError) as info:
        store.stage(job, image)
    assert str(info.value) == (
        f"board S1 is being flashed by job {running.id}; wait for it or queue again afterwards"
    )
    assert snapshot(state_dir) == before
    assert store.get(running.id).state == JOB_RUNNING
    with pytest.raises(QueueError, match="no such job"):
        store.get(job.id)


def test_cancel_rules(store, state_dir):
    queued, _, _ = stage(store, "S1")
    cancelled = store.cancel(queued.id)
    assert (cancelled.state, cancelled.message) == (JOB_CANCELLED, "cancelled by user")
    assert not os.path.exists(store.image_path(queued))
    with pytest.raises(QueueError) as info:
        store.cancel(queued.id)
    assert str(info.value) == f"job {queued.id} is already cancelled"

    running, _, _ = stage(store, "S2")
    running.state = JOB_RUNNING
    store.update(running)
    with pytest.raises(QueueError) as info:
        store.cancel(running.id)
    assert str(info.value) == f"job {running.id} is running; it cannot be cancelled mid-flash"
    assert store.get(running.id).state == JOB_RUNNING
    assert os.path.exists(store.image_path(running))

    store.finish(running, JOB_FAILED, "flash tool crashed")
    with pytest.raises(QueueError) as info:
        store.cancel(running.id)
    assert str(info.value) == f"job {running.id} is already failed"

    with pytest.raises(QueueError) as info:
        store.cancel("0123456789ab")
    assert str(info.value) == "no such job: 0123456789ab"

    again, _ = reload(state_dir)
    assert again.get(queued.id).state == JOB_CANCELLED


BAD_IDS = [
    "../x",
    "",
    "..",
    "../../../etc/passwd",
    "/etc/passwd",
    "0123456789ab/../../x",
    "0123456789AB",
    "0123456789a",
    "0123456789abc",
    "0123456789ab\n",
    "0123456789ab.json",
    "x" * 100_000,
    "\x00" * 12,
    None,
    12,
]


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=lambda v: repr(v)[:20])
def test_invalid_job_ids_are_rejected_before_any_file_access(store, state_dir, monkeypatch, bad_id):
    stage(store, "S1")
    before = snapshot(state_dir)

    def no_fs(*args, **kwargs):
        raise AssertionError(f"file system touched for a bad job id: {args!r}"[:200])

    import builtins

    for module, name in [
        (builtins, "open"), (os, "open"), (os, "stat"), (os, "lstat"), (os, "listdir"),
        (os, "unlink"), (os, "rename"), (os, "replace"), (os.path, "exists"), (os.path, "lexists"),
    ]:
        monkeypatch.setattr(module, name, no_fs)

    job = Job(id=bad_id, selector="S9", serial="S9", board_name=None, image_sha256="0" * 64,
              image_size=1, created=1.0)
    for call in (
        lambda: store.get(bad_id),
        lambda: store.cancel(bad_id),
        lambda: store.image_path(job),
        lambda: store.read_image(job),
        lambda: store.update(job),
        lambda: store.finish(job, JOB_DONE, "x"),
        lambda: store.requeue(job, "x"),
        lambda: store.stage(job, b"x"),
    ):
        with pytest.raises(QueueError) as info:
            call()
        assert str(info.value).startswith("no such job: ")
        assert len(str(info.value)) < 80  # a hostile id is not echoed in full
    monkeypatch.undo()
    assert snapshot(state_dir) == before


# ---------------------------------------------------------------- load-time checks ------


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_bad_job_files_are_quarantined_and_the_rest_served(store, state_dir):
    good, good_image, _ = stage(store, "GOOD1")
    history, _, _ = stage(store, "GOOD2")
    store.finish(history, JOB_DONE, "ok")  # no image any more: that is fine for history
    with open(os.path.join(state_dir, "jobs", good.id + ".json"), "rb") as f:
        good_meta = json.load(f)
    jobs_dir = os.path.join(state_dir, "jobs")
    images_dir = os.path.join(state_dir, "images")

    def fake(serial: str, image: Optional[bytes], **overrides) -> str:
        """A job file of its own id (with an image unless None), fields overridden."""
        job_id = store.new_id()
        data = dict(good_meta, id=job_id, serial=serial)
        if image is not None:
            data.update(image_size=len(image), image_sha256=hashlib.sha256(image).hexdigest())
            _write(os.path.join(images_dir, job_id + ".bin"), image)
        data.update(overrides)
        _write(os.path.join(jobs_dir, job_id + ".json"), json.dumps(data).encode())
        return job_id

    bad = {}
    # Truncated metadata (a copy of a real file, cut in half), with its image.
    truncated = fake("T1", os.urandom(50))
    path = os.path.join(jobs_dir, truncated + ".json")
    with open(path, "rb") as f:
        raw = f.read()
    _write(path, raw[: len(raw) // 2])
    bad[truncated + ".json"] = "not valid JSON"
    empty = fake("T2", None)
    _write(os.path.join(jobs_dir, empty + ".json"), b"")
    bad[empty + ".json"] = "empty file"
    garbage = fake("T3", None)
    _write(os.path.join(jobs_dir, garbage + ".json"), os.urandom(300))
    bad[garbage + ".json"] = "not valid JSON"
    listing = fake("T4", None)
    _write(os.path.join(jobs_dir, listing + ".json"), b"[1, 2]")
    bad[listing + ".json"] = "not a JSON object"
    no_sha = fake("T5", os.urandom(10))
    with open(os.path.join(jobs_dir, no_sha + ".json")) as f:
        data = json.load(f)
    del data["image_sha256"], data["serial"]
    _write(os.path.join(jobs_dir, no_sha + ".json"), json.dumps(data).encode())
    bad[no_sha + ".json"] = "missing field(s) serial, image_sha256"
    bad[fake("T6", os.urandom(10), image_size="10") + ".json"] = "field image_size has the wrong type"
    bad[fake("T7", os.urandom(10), state="exploded") + ".json"] = "unknown state 'exploded'"
    bad[fake("T8", os.urandom(10), id="../../etc") + ".json"] = "does not match the file name"
    bad[fake("T9", os.urandom(10), results=[{"no": "method"}]) + ".json"] = "fields do not form a job"
    missing_image = fake("T10", os.urandom(10))
    os.unlink(os.path.join(images_dir, missing_image + ".bin"))
    bad[missing_image + ".json"] = f"its image images/{missing_image}.bin is missing"
    short_image = fake("T11", os.urandom(100))
    _write(os.path.join(images_dir, short_image + ".bin"), b"x" * 60)
    bad[short_image + ".json"] = "has the wrong size (60 bytes, expected 100)"
    flipped = fake("T12", bytes(100))
    _write(os.path.join(images_dir, flipped + ".bin"), bytes(99) + b"\x01")
    bad[flipped + ".json"] = "does not match its sha256"
    # A job interrupted mid-write must still have its image (it may be repeated).
    interrupted = fake("T13", os.urandom(10), state=JOB_INTERRUPTED, resume_until=time.time() + 60)
    os.unlink(os.path.join(images_dir, interrupted + ".bin"))
    bad[interrupted + ".json"] = "is missing"
    _write(os.path.join(jobs_dir, "evil.json"), json.dumps(good_meta).encode())
    bad["evil.json"] = "not a job file name"
    os.mkdir(os.path.join(jobs_dir, "0123456789ab.json"))
    bad["0123456789ab.json"] = "is a directory"

    again, problems = reload(state_dir)

    assert len(problems) == len(bad), "\n".join(problems)
    for name, why in bad.items():
        lines = [p for p in problems if p.startswith(f"quarantined job file jobs/{name}: ")]
        assert len(lines) == 1, (name, problems)
        assert why in lines[0], (why, lines[0])
    # Good jobs are served and untouched.
    assert {j.id for j in again.jobs()} == {good.id, history.id}
    assert again.read_image(good) == good_image
    assert sorted(os.listdir(jobs_dir)) == sorted([good.id + ".json", history.id + ".json"])
    assert os.listdir(images_dir) == [good.id + ".bin"]
    # Moved, not deleted: metadata and images alike.
    quarantined = os.listdir(os.path.join(state_dir, "quarantine"))
    for name in bad:
        assert name in quarantined
    for job_id in (truncated, no_sha, short_image, flipped):
        assert job_id + ".bin" in quarantined
    # A second load finds nothing more to complain about, and a name clash in quarantine
    # does not lose the earlier file.
    assert reload(state_dir)[1] == []
    _write(os.path.join(jobs_dir, "evil.json"), b"again")
    assert len(reload(state_dir)[1]) == 1
    assert {"evil.json", "evil.json.1"} <= set(os.listdir(os.path.join(state_dir, "quarantine")))


def test_leftovers_of_cut_short_writes_are_removed(store, state_dir):
    job, image, _ = stage(store, "S1")
    jobs_dir = os.path.join(state_dir, "jobs")
    images_dir = os.path.join(state_dir, "images")
    _write(os.path.join(jobs_dir, f".{job.id}.json.tmp-0badc0de"), b'{"id": ')
    _write(os.path.join(images_dir, ".0123456789ab.bin.tmp-12345678"), b"half an ima")
    _write(os.path.join(images_dir, "0123456789ab.bin"), b"an image whose metadata never came")

    again, problems = reload(state_dir)
    assert problems == []
    assert os.listdir(jobs_dir) == [job.id + ".json"]
    assert os.listdir(images_dir) == [job.id + ".bin"]
    assert again.read_image(job) == image


def test_two_queued_jobs_for_one_board_are_resolved_at_load(store, state_dir):
    """What a crash between committing a new job and cancelling the old one leaves."""
    old, old_image, _ = stage(store, "S1")
    with open(os.path.join(state_dir, "jobs", old.id + ".json"), "rb") as f:
        old_meta = f.read()
    new, new_image, _ = stage(store, "S1")
    _write(os.path.join(state_dir, "jobs", old.id + ".json"), old_meta)  # back to "queued"
    _write(os.path.join(state_dir, "images", old.id + ".bin"), old_image)

    again, problems = reload(state_dir)
    assert len(problems) == 1 and f"job {old.id}" in problems[0] and new.id in problems[0]
    assert [j.id for j in again.queued()] == [new.id]
    assert again.get(old.id).message == f"replaced by job {new.id}"
    assert not os.path.exists(again.image_path(old))
    assert reload(state_dir)[1] == []


# ---------------------------------------------------------------- images ------


def test_read_image_detects_a_flipped_byte(store):
    job, image, _ = stage(store, "S1", 4096)
    path = store.image_path(job)
    with open(path, "r+b") as f:
        f.seek(1234)
        f.write(bytes([image[1234] ^ 0x10]))
    with pytest.raises(FlashError) as info:
        store.read_image(job)
    assert str(info.value) == f"staged image of job {job.id} is damaged (sha256 mismatch); queue it again"

    os.unlink(path)
    with pytest.raises(FlashError, match="unreadable"):
        store.read_image(job)


# ---------------------------------------------------------------- history ------


def test_history_order_and_prune(state_dir, clock):
    store = JobStore(state_dir, history_limit=3)
    store.load()
    jobs = [stage(store, f"S{i}")[0] for i in range(6)]
    pending, _, _ = stage(store, "P")
    # Finish in an order different from creation: history follows finishing time.
    order = [jobs[3], jobs[0], jobs[5], jobs[1], jobs[4]]
    for job, state in zip(order, [JOB_DONE, JOB_FAILED, JOB_INTERRUPTED, JOB_CANCELLED, JOB_DONE]):
        store.finish(job, state, state)
    assert [j.id for j in store.history()] == [j.id for j in reversed(order)]
    assert [j.id for j in store.history(limit=2)] == [jobs[4].id, jobs[1].id]
    assert [j.id for j in store.jobs()] == [pending.id] + [j.id for j in reversed(jobs)]

    store.prune()
    kept = [jobs[4].id, jobs[1].id, jobs[5].id]
    assert [j.id for j in store.history()] == kept
    for gone in (jobs[3], jobs[0]):
        with pytest.raises(QueueError):
            store.get(gone.id)
        assert not os.path.exists(os.path.join(state_dir, "jobs", gone.id + ".json"))
    # Pending jobs never count against the history limit.
    assert {j.id for j in store.queued()} == {jobs[2].id, pending.id}

    # Prune also removes the image an interrupted job kept.
    store.finish(jobs[2], JOB_DONE, "ok")
    store.finish(pending, JOB_DONE, "ok")
    store.prune()
    assert [j.id for j in store.history()] == [pending.id, jobs[2].id, jobs[4].id]
    assert not os.path.exists(store.image_path(jobs[5]))
    assert os.listdir(os.path.join(state_dir, "images")) == []

    again, problems = reload(state_dir, history_limit=3)
    assert problems == []
    assert [j.id for j in again.history()] == [pending.id, jobs[2].id, jobs[4].id]
    # load prunes too, to a smaller limit if the config shrank it.
    again, _ = reload(state_dir, history_limit=1)
    assert [j.id for j in again.history()] == [pending.id]
    assert os.listdir(os.path.join(state_dir, "jobs")) == [pending.id + ".json"]


# ---------------------------------------------------------------- atomic_write ------


def test_atomic_write_replaces_whole_files(tmp_path):
    path = str(tmp_path / "f")
    atomic_write(path, b"old")
    atomic_write(path, b"new contents", mode=0o640)
    with open(path, "rb") as f:
        assert f.read() == b"new contents"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 & ~_umask()
    assert os.listdir(tmp_path) == ["f"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch, failing):
    path = str(tmp_path / "f")
    atomic_write(path, b"old")
    real = getattr(os, failing)

    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError) as info:
        atomic_write(path, b"new")
    assert info.value.errno == errno.EIO
    monkeypatch.setattr(os, failing, real)
    with open(path, "rb") as f:
        assert f.read() == b"old"
    assert os.listdir(tmp_path) == ["f"]


# ---------------------------------------------------------------- a full disk ------


class SmallFs:
    """A 64 KiB file system for the state dir: a real tmpfs (we run as root).

    Should a machine refuse the mount, the same limit is enforced by a wrapper around
    os.write that fails with ENOSPC like tmpfs does (page-granular), so the test still
    runs and still proves the same things rather than being skipped.
    """

    SIZE = 64 * 1024
    PAGE = 4096

    def __init__(self, path: str, monkeypatch) -> None:
        self.path = path
        os.makedirs(path)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.SIZE},mode=0700", "tmpfs", path],
            capture_output=True, timeout=10,
        )
        self.mounted = result.returncode == 0
        if not self.mounted:
            self._simulate(monkeypatch)

    def _used(self) -> int:
        used = 0
        for dirpath, _dirs, names in os.walk(self.path):
            for name in names:
                size = os.lstat(os.path.join(dirpath, name)).st_size
                used += -(-size // self.PAGE) * self.PAGE
        return used

    def _simulate(self, monkeypatch) -> None:
        real_write = os.write

        def write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(self.path + os.sep):
                size = os.fstat(fd).st_size
                grow = -(-(size + len(data)) // self.PAGE) - -(-size // self.PAGE)
                if self._used() + grow * self.PAGE > self.SIZE:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)

    def free(self) -> int:
        if self.mounted:
            st = os.statvfs(self.path)
            return st.f_bavail * st.f_frsize
        return self.SIZE - self._used()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", self.path], capture_output=True, timeout=10, check=True)


@pytest.fixture
def small_fs(tmp_path, monkeypatch) -> Iterator[SmallFs]:
    fs = SmallFs(str(tmp_path / "small"), monkeypatch)
    try:
        yield fs
    finally:
        fs.close()


def test_full_disk_on_staging_keeps_existing_jobs(small_fs):
    state_dir = os.path.join(small_fs.path, "state")
    store, _ = reload(state_dir)
    kept, kept_image, _ = stage(store, "S1", 8000)
    other, other_image, _ = stage(store, "S2", 8000)
    before = snapshot(state_dir)

    # 1. The image itself does not fit (and it replaces S1's queued job: that must not happen).
    image = os.urandom(small_fs.free() + 10_000)
    job = make_job(store, "S1", image)
    with pytest.raises(QueueError) as info:
        store.stage(job, image)
    assert str(info.value) == f"cannot stage job: no space left in {state_dir}"
    assert snapshot(state_dir) == before
    assert store.queued_for("S1").id == kept.id
    with pytest.raises(QueueError, match="no such job"):
        store.get(job.id)

    # 2. The image fits to the last page, its metadata does not: the image must go again.
    image = os.urandom(small_fs.free() - 100)
    job = make_job(store, "S3", image)
    with pytest.raises(QueueError, match="no space left"):
        store.stage(job, image)
    assert snapshot(state_dir) == before
    assert temp_files(state_dir) == []

    # Space enough again: staging works and replaces S1's job as usual.
    again, problems = reload(state_dir)
    assert problems == []
    assert again.read_image(kept) == kept_image and again.read_image(other) == other_image
    new, _, replaced = stage(again, "S1", 1000)
    assert replaced.id == kept.id


STAGING_CALLS = ("write", "fsync", "rename", "unlink")


def _count_calls(monkeypatch, on_call: Callable[[str, int], None]) -> None:
    """Route the syscalls of a staging through `on_call(name, n)` (n counts from 1)."""
    counter = itertools.count(1)
    for name in STAGING_CALLS:
        real = getattr(os, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            on_call(_name, next(counter))
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapped)


def _setup_for_replacement(state_dir: str):
    """Two queued jobs; the staging under test replaces one of them."""
    store, _ = reload(state_dir)
    old, old_image, _ = stage(store, "S1", 3000)
    other, other_image, _ = stage(store, "S2", 3000)
    return store, {old.id: old_image, other.id: other_image}, old


def _staging_steps(tmp_path, monkeypatch) -> List[str]:
    """The write/fsync/rename/unlink calls one replacing staging makes, in order."""
    store, _, _ = _setup_for_replacement(str(tmp_path / "count"))
    calls: List[str] = []
    with monkeypatch.context() as m:
        _count_calls(m, lambda name, n: calls.append(name))
        stage(store, "S1", 3000)
    assert calls.count("rename") == 3  # image, metadata, the replaced job's metadata
    return calls


def _commit_step(calls: List[str]) -> int:
    """The call that commits a staging: the directory fsync after the metadata's rename."""
    second_rename = [i for i, name in enumerate(calls, 1) if name == "rename"][1]
    assert calls[second_rename] == "fsync"
    return second_rename + 1


def test_failure_at_every_step_of_staging_leaves_store_as_it_was(tmp_path, monkeypatch):
    """ENOSPC from each syscall of a staging in turn: all or nothing."""
    calls = _staging_steps(tmp_path, monkeypatch)
    commit = _commit_step(calls)
    for step in range(1, len(calls) + 1):
        state_dir = str(tmp_path / f"state{step}")
        store, images, old = _setup_for_replacement(state_dir)
        before = snapshot(state_dir)
        image = os.urandom(3000)
        job = make_job(store, "S1", image)
        failed: List[str] = []

        def fail_at(name: str, n: int) -> None:
            if n == step:
                failed.append(name)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with monkeypatch.context() as m:
            _count_calls(m, fail_at)
            try:
                replaced = store.stage(job, image)
            except QueueError as e:
                outcome = str(e)
            else:
                outcome = "staged"
        assert failed == [calls[step - 1]]
        if step > commit:
            # After the commit point the staging stands; what is left to record (the
            # replaced job's cancel, its image removal) load() re-derives.
            assert outcome == "staged", (step, failed)
            assert replaced.id == old.id and replaced.state == JOB_CANCELLED
            assert store.get(job.id).state == JOB_QUEUED
            assert store.get(old.id).state == JOB_CANCELLED
        else:
            assert outcome == f"cannot stage job: no space left in {state_dir}", (step, failed)
            assert snapshot(state_dir) == before, (step, failed)
            assert store.queued_for("S1").id == old.id
        assert temp_files(state_dir) == []
        again, problems = reload(state_dir)
        assert [p for p in problems if "quarantined" in p] == [], (step, problems)
        assert {j.id for j in again.queued()} == {j.id for j in store.queued()}
        for job_id in images:
            if again.get(job_id).state == JOB_QUEUED:
                assert again.read_image(again.get(job_id)) == images[job_id]


# ---------------------------------------------------------------- SIGKILL ------


def _in_child(work: Callable[[], None]) -> int:
    """Run `work` in a forked child; return its wait status (the child never returns)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            work()
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _assert_consistent(state_dir: str, known: Dict[str, bytes], history_limit: int = 200) -> JobStore:
    """A reloaded store that serves only whole jobs and loses none it had committed."""
    store, problems = reload(state_dir, history_limit=history_limit)
    assert [p for p in problems if "quarantined" in p] == []
    assert temp_files(state_dir) == []
    queued_serials = [j.serial for j in store.queued()]
    assert len(queued_serials) == len(set(queued_serials)), "two queued jobs for one board"
    for job in store.jobs():
        if job.state == JOB_QUEUED:
            assert len(store.read_image(job)) == job.image_size
    for job_id in known:
        store.get(job_id)  # raises if a committed job was lost
    images = set(os.listdir(os.path.join(state_dir, "images")))
    assert images == {j.id + ".bin" for j in store.jobs() if needs_image(j)}
    return store


def test_sigkill_at_every_step_of_staging(tmp_path, monkeypatch):
    steps = len(_staging_steps(tmp_path, monkeypatch))
    outcomes = set()
    for step in range(1, steps + 2):
        state_dir = str(tmp_path / f"state{step}")
        store, images, old = _setup_for_replacement(state_dir)
        image = os.urandom(3000)
        job = make_job(store, "S1", image)

        def work() -> None:
            def kill_at(name: str, n: int) -> None:
                if n == step:
                    os.kill(os.getpid(), signal.SIGKILL)

            _count_calls(monkeypatch, kill_at)
            store.stage(job, image)

        status = _in_child(work)
        monkeypatch.undo()
        if step <= steps:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, step
        else:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

        again = _assert_consistent(state_dir, images)
        queued = again.queued_for("S1")
        outcomes.add(queued.id == job.id)
        if queued.id == job.id:  # committed: whole, and the old job gave way
            assert again.read_image(queued) == image
            assert again.get(old.id).state == JOB_CANCELLED
        else:  # not committed: nothing of it is left
            assert queued.id == old.id
            assert not os.path.exists(again.image_path(job))
            with pytest.raises(QueueError):
                again.get(job.id)
    assert outcomes == {True, False}  # the kills fell on both sides of the commit point


def test_sigkill_during_a_staging_loop(tmp_path):
    """A child stages big images in a loop; SIGKILL lands wherever it lands, five times."""
    state_dir = str(tmp_path / "state")
    committed: Dict[str, bytes] = {}
    last_for_serial: Dict[str, str] = {}
    rng = random.Random(4)
    for round_number in range(5):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(read_end)
                child_store = JobStore(state_dir, history_limit=100_000)
                child_store.load()
                for i in itertools.count():
                    image = os.urandom(256 * 1024 + i)
                    job = make_job(child_store, f"S{i % 3}", image)
                    job.created = time.time()  # forked children share the test's counter
                    child_store.stage(job, image)
                    os.write(write_end, f"{job.id} {job.serial}\n".encode())
            finally:
                os._exit(3)
        os.close(write_end)
        wanted = rng.randint(2, 6)
        lines: List[str] = []
        buffer = b""
        deadline = time.monotonic() + 30
        while len(lines) < wanted:
            assert time.monotonic() < deadline, "the staging child stalled"
            ready, _, _ = select.select([read_end], [], [], 1.0)
            if ready:
                chunk = os.read(read_end, 4096)
                assert chunk, "the staging child died"
                buffer += chunk
                *done, buffer = buffer.split(b"\n")
                lines.extend(line.decode() for line in done)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        buffer += _drain(read_end)
        os.close(read_end)
        lines.extend(line.decode() for line in buffer.split(b"\n") if line)

        for line in lines:
            job_id, serial = line.split()
            committed[job_id] = b""
            last_for_serial[serial] = job_id
        store = _assert_consistent(state_dir, committed, history_limit=100_000)
        for serial, job_id in last_for_serial.items():
            queued = store.queued_for(serial)
            # The last job it reported, or one it committed but was killed before reporting.
            assert queued.id == job_id or queued.id not in committed, (round_number, serial)
            if queued.id not in committed:
                assert queued.created >= store.get(job_id).created


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


# ---------------------------------------------------------------- threads ------


def test_concurrent_callers_keep_the_store_consistent(store, state_dir):
    errors: List[BaseException] = []
    staged: List[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(20):
                job, _, _ = stage(store, f"T{n}-{i % 4}", 500)
                with lock:
                    staged.append(job.id)
                if i % 3 == 0:
                    try:
                        store.cancel(job.id)
                    except QueueError:
                        pass  # replaced meanwhile by this thread's next job: fine
                store.jobs()
                store.history(10)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(staged) == 80
    before = {j.id: j.to_dict() for j in store.jobs()}
    assert len(before) == 80
    again, problems = reload(state_dir)
    assert problems == []
    assert {j.id: j.to_dict() for j in again.jobs()} == before
    # One per board (4 threads x 4 boards), except the boards whose last job (i = 18) was
    # cancelled.
    assert len(again.queued()) == 12
