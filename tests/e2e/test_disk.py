"""A failing disk ends a job, not the daemon (issue 13.1).

state_dir is a small tmpfs of its own (the suite runs as root): filled to the last page
(ENOSPC) or remounted read-only (EROFS) at a chosen point of a cycle. Each test checks
that the affected job ends with "cannot record ...: <the system's words>", that a
`kflashctl queue --wait` client gets its end and exits, that Klipper runs, that
`kflashctl status` answers and names the problem, and where it applies that SIGTERM still
stops the daemon promptly and that staging is refused without leaving files behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.e2e.conftest import MCU, SERIAL
from tests.e2e.scene import flashing_percent, write_image

pytestmark = pytest.mark.e2e


@pytest.fixture
def state_fs(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs where the daemon's state_dir will be (tmp_path/state)."""
    path = tmp_path / "state"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)],
                   check=True, capture_output=True, timeout=10)
    try:
        yield path
    finally:
        # Lazy: the daemon (stopped by make_daemon's teardown, which runs first) may linger.
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(fs: Path) -> Path:
    """Take every free page of the tmpfs (root has no reserve there); return the filler."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 4096
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    finally:
        os.close(fd)
    probe = fs / "probe"
    with pytest.raises(OSError):
        probe.write_bytes(b"x" * 4096)  # really full
    return filler


def remount(fs: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(fs)], check=True, capture_output=True, timeout=10)


def files(fs: Path) -> List[str]:
    return sorted(str(p.relative_to(fs)) for p in fs.rglob("*") if p.name not in ("filler", "probe"))


def start_watched(s, path: Path, *extra: str) -> "tuple[subprocess.Popen, str]":
    """`kflashctl queue SERIAL PATH --wait` in the background: (process, job id)."""
    proc = s.daemon.ctl_popen("queue", SERIAL, str(path), "--wait", *extra)
    seen = ""
    for line in proc.stdout:  # "note: ..." lines come first
        seen += line
        match = re.search(r"^job ([0-9a-f]{12}) queued", line)
        if match:
            return proc, match.group(1)
    raise AssertionError(f"kflashctl queue did not queue:\n{seen}")


def ended(proc: subprocess.Popen, timeout: float = 20) -> "tuple[int, str]":
    """The watcher must end by itself (its end event), well before any silence bound."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"kflashctl queue --wait still waiting after {timeout} s:\n{out}")
    return proc.returncode, out


def test_disk_full_mid_flash_then_sigterm_exits_and_the_watcher_ends(state_fs, scene, farm, standins, notify_socket):
    s = scene()
    assert s.daemon.state_dir == state_fs
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=1000)
    path = write_image(s.daemon.workdir / "big", size=20000, seed=51, version="v-full")
    watcher, job_id = start_watched(s, path)
    percent = flashing_percent(notify_socket, 2)
    fill(state_fs)

    t0 = time.monotonic()
    assert s.daemon.stop(signal.SIGTERM, timeout=60) == 0
    took = time.monotonic() - t0
    code, out = ended(watcher)
    assert "cannot record the result: No space left on device" in out, out
    assert code == 5 and out.splitlines()[-1].startswith("interrupted:"), (code, out)
    klipper = s.klipper_running()
    line = s.log_line(job_id, "No space left on device")
    # Disk and memory disagree, and the disk is what the next daemon reads: the last record
    # that made it says the write had started (so at most a repeat onto the same board).
    assert '"write": "started"' in (state_fs / "jobs" / f"{job_id}.json").read_text()
    bystander = json.loads((state_fs / "jobs" / f"{s.bystander}.json").read_text())
    assert bystander["state"] == "queued", bystander
    assert (state_fs / "images" / f"{s.bystander}.bin").read_bytes() == s.bystander_image
    s.record("state_dir full (ENOSPC) mid-flash, then SIGTERM",
             f"mid-write (write phase at {percent} %), tmpfs filled, then SIGTERM", klipper,
             {"state": "interrupted", "message": out.splitlines()[-1].split(": ", 1)[1]},
             f"{line}; exit 0 {took:.1f} s after SIGTERM; `queue --wait` got its end (exit {code})")


def test_read_only_state_dir_mid_flash_ends_the_job_and_the_daemon_serves(state_fs, scene, farm, standins,
                                                                          notify_socket):
    s = scene()
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=2000)
    path = write_image(s.daemon.workdir / "ro", size=12000, seed=52, version="v-ro")
    watcher, job_id = start_watched(s, path)
    percent = flashing_percent(notify_socket, 2)
    remount(state_fs, "ro")
    try:
        code, out = ended(watcher, timeout=60)
        assert code == 1, (code, out)
        assert "failed: cannot record the result: Read-only file system" in out, out
        # The flash itself went through: the message says so after the cause.
        assert "flashed via katapult" in out, out
        klipper = s.klipper_running()
        status = s.daemon.ctl_json("status")
        assert "Read-only file system" in (status["state_problem"] or ""), status
        assert "STATE NOT SAVED" in status["status"], status["status"]
        notify_socket.wait_for(lambda m: "STATE NOT SAVED" in m and "Read-only file system" in m, timeout=10)
        before = files(state_fs)
        other = write_image(s.daemon.workdir / "other", seed=53, version="v-other")
        refused = s.daemon.ctl("queue", "1A2B3C4D5E6F", str(other))
        assert refused.returncode == 2 and "Read-only file system" in refused.stderr, refused.stderr
        assert files(state_fs) == before  # nothing half-written
        job = s.daemon.job(job_id)
        assert job["state"] == "failed", job
        s.nothing_lost(job_id)
    finally:
        remount(state_fs, "rw")
    t0 = time.monotonic()
    assert s.daemon.stop(signal.SIGTERM, timeout=30) == 0
    s.record("state_dir remounted read-only (EROFS) mid-flash",
             f"mid-write (write phase at {percent} %)", klipper, job,
             f"`queue --wait` exit {code}; status: {status['state_problem']}; staging refused: "
             f"{refused.stderr.strip()}; SIGTERM afterwards: exit 0 in {time.monotonic() - t0:.1f} s")


def test_disk_full_before_the_cycle_nothing_is_touched(state_fs, scene, farm, standins, notify_socket):
    """The job cannot be recorded as running: it ends, and no cycle runs without a record."""
    s = scene()
    path = write_image(s.daemon.workdir / "early", size=3000, seed=54, version="v-early")
    watcher, job_id = start_watched(s, path)
    fill(state_fs)
    before = files(state_fs)
    refused = s.daemon.ctl("queue", "1A2B3C4D5E6F", str(path))
    assert refused.returncode == 2 and "no space left" in refused.stderr, refused.stderr
    assert files(state_fs) == before  # staging left nothing behind
    verbs = len(standins.systemctl_verbs())
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")

    code, out = ended(watcher)
    assert code == 1, (code, out)
    assert "cannot record the start of the job: No space left on device; nothing was touched" in out, out
    assert standins.systemctl_verbs()[verbs:] == [] and standins.calls("flashtool") == []
    assert s.daemon.ctl_json("status")["current"] is None
    klipper = s.klipper_running()
    job = s.daemon.job(job_id)
    assert job["state"] == "failed", job
    s.nothing_lost(job_id)
    s.record("state_dir full (ENOSPC) when the board arrives", "before the cycle (recording \"running\")",
             klipper, job, f"Klipper never stopped, no flash tool run; staging refused: "
                           f"{refused.stderr.strip()}; state_dir unchanged")
