"""Fault injection: the real daemon on emulated boards, one fault at a time (issue 5).

Every test ends with the same three promises, checked on what really happened:
- Klipper runs afterwards (the fake Klipper process alive, the unit active); where starting
  it is the fault, STATUS and the journal say loudly that it is DOWN;
- no staged job is lost: a bystander job, queued for a second board that never shows up,
  is still queued with its staged image byte-for-byte intact, and the faulted job is in a
  sensible state (failed/interrupted/done, never vanished or stuck "running");
- a clear record: the job's message names the cause, and a log or journal line says it.

The observed values go to the reliability matrix (`tests/e2e/reliability.py`, which writes
docs/reliability.md when run as `python -m tests.e2e.reliability --run`). Faults that
test_cycle.py already covers (SIGKILL and SIGTERM mid-flash, unplug with the make fallback
refused, Katapult silent with the fallback working) are referenced there, not repeated.

Speed: small images, the stand-in flashtool's knobs (short read timeouts, few tries, no
drain) and short kflashd timeouts keep each test to a few seconds; nothing sleeps a fixed
time, every wait polls for a condition.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.e2e.conftest import MCU, SERIAL, Printer, padded, wait_for_board_facts
from tests.e2e.harness import PYTHON, REPO, KflashdProcess, wait_until
from tests.e2e.reliability import record
from tests.e2e.scene import BYSTANDER, flashing_percent, slow_flash, write_image
from tests.standins.fixtures import pid_alive

pytestmark = pytest.mark.e2e

#: Stand-in flashtool knobs that make a dead or garbling board fail in about a second
#: instead of the real tool's minutes (read timeout 0.3 s, 2 tries, no pauses).
FAST_FAILURE = {"timeout": 0.3, "tries": 2, "retry_sleep": 0, "drain": 0}

#: Seconds the stand-in flashtool pauses after each block where a fault must land mid-write:
#: 79 blocks then take about 1.6 s, ample time between "10 %" on STATUS and the injection.
BLOCK_PAUSE = 0.02

MSG_KLIPPER_RESTART_FAILED = "198456ada4aa484d80ae1f870353c26d"


# ----------------------------------------------------------------------------- helpers ----


def blocks_of(image: Path, block: int = 64) -> int:
    return -(-image.stat().st_size // block)


def make_tree(tmp_path: Path, image: Path) -> Path:
    """A Klipper tree owned by nobody whose out/klipper.bin is the image: make flash allowed."""
    tree = tmp_path / "klipper-tree"
    (tree / "out").mkdir(parents=True)
    (tree / "out" / "klipper.bin").write_bytes(image.read_bytes())
    os.chown(tree, 65534, 65534)
    return tree


def no_orphans(pids: List[int], timeout: float = 5) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout,
               f"processes {pids} (tool and its forked child) to be gone")


# ----------------------------------------------------------------- the flash tool fails ----


def test_flashtool_crash_mid_flash(scene, farm, standins, image):
    s = scene()
    standins.set("flashtool", {"crash_after_blocks": 20})
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")

    job = s.daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "failed", job
    assert "flashtool.py failed (exit status 1): stand-in flashtool: crashing after 20 blocks" in job["message"], \
        job["message"]
    assert "make flash not tried" in job["message"], job["message"]
    board = farm.board(SERIAL)
    assert board["blocks_received"] == 20 and board["completes"] == 0, board  # died without a word
    klipper = s.klipper_running()
    assert standins.systemctl_verbs()[-2:] == ["stop", "start"]
    s.nothing_lost(job_id)
    line = s.log_line("failed:", job_id)
    s.record("flashtool.py crashes (exit 1, no COMPLETE)",
             f"mid-flash: after {board['blocks_received']} of {blocks_of(image)} blocks written",
             klipper, job, line)


def test_flashtool_hang_is_killed_at_the_timeout(scene, farm, standins, image):
    s = scene(timeouts={"flash": 2})
    standins.set("flashtool", {"hang_after_blocks": 10})
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "failed", job
    assert "flashtool.py timed out after 2 s" in job["message"], job["message"]
    tool = [c["pid"] for c in standins.calls("flashtool") if c.get("event") != "child"]
    children = standins.child_pids("flashtool")
    assert len(tool) == 1 and len(children) == 1, standins.calls("flashtool")
    no_orphans(tool + children)
    board = farm.board(SERIAL)
    assert board["blocks_received"] == 10, board
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    line = s.log_line("failed:", job_id, "timed out")
    s.record("flashtool.py hangs (with a forked child that ignores SIGTERM)",
             f"mid-flash: after {board['blocks_received']} of {blocks_of(image)} blocks; "
             f"timeouts.flash = 2 s", klipper, job,
             f"{line}; tool pid {tool[0]} and child pid {children[0]} gone (process group killed)")


def test_make_flash_hang_is_killed_at_the_timeout(scene, farm, standins, image, tmp_path):
    tree = make_tree(tmp_path, image)
    s = scene(timeouts={"flash": 3, "reboot": 0}, klipper_dir=tree)
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    # The daemon reads the board's Katapult when it appears (its application start is
    # remembered); then Katapult falls silent: flashtool fails fast, and the fallback runs.
    wait_for_board_facts(s.daemon)
    farm.set_fault(SERIAL, "silent")
    standins.set("flashtool", FAST_FAILURE)
    standins.set("make", {"hang": True})

    job_id = s.daemon.queue(SERIAL, str(image))
    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "failed", job
    assert "make flash: make flash timed out after 3 s" in job["message"], job["message"]
    assert "Katapult: Error sending command [CONNECT]" in job["message"], job["message"]
    make = standins.calls("make", query=False)
    children = standins.child_pids("make")
    assert len(make) == 1 and make[0]["uid"] == 65534 and len(children) == 1, make
    no_orphans([make[0]["pid"]] + children)
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    line = s.log_line("failed:", job_id, "make flash timed out")
    s.record("`make flash` fallback hangs (with a forked child that ignores SIGTERM)",
             "after Katapult failed (silent board); timeouts.flash = 3 s", klipper, job,
             f"{line}; make pid {make[0]['pid']} (uid 65534) and child pid {children[0]} gone")


# -------------------------------------------------------------------- the board fails ----


def test_unplugged_mid_flash_with_make_fallback_available(scene, farm, standins, notify_socket, tmp_path):
    """The fallback must not run against a device that is gone (its node may be reused)."""
    image = write_image(tmp_path / "out", size=5000, seed=21)
    tree = make_tree(tmp_path, image)
    s = scene(klipper_dir=tree, timeouts={"reboot": 0})
    standins.set("flashtool", dict(FAST_FAILURE, slow=BLOCK_PAUSE))
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    percent = flashing_percent(notify_socket, 10)
    farm.unplug(SERIAL)

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "failed", job
    assert "no longer connected" in job["message"] or "gone" in job["message"], job["message"]
    assert standins.calls("make") == [], "make flash ran against a board that was unplugged"
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    line = s.log_line("failed:", job_id)
    s.record("board unplugged (make fallback would be allowed: tree image matches)",
             f"mid-flash: write phase at {percent} %", klipper, job,
             f"{line}; make not run (0 calls)")


@pytest.mark.parametrize("count", [None, 2], ids=["every-reply", "two-replies"])
def test_katapult_corrupts_crcs_mid_flash(scene, farm, standins, notify_socket, image, count):
    s = scene()
    knobs = dict(FAST_FAILURE, slow=BLOCK_PAUSE)
    if count is not None:
        del knobs["tries"]  # the real tool's tries (3 per block): a short burst is survivable
    standins.set("flashtool", knobs)
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    percent = flashing_percent(notify_socket, 10)
    params = {} if count is None else {"count": count}
    farm.set_fault(SERIAL, "corrupt_crc", **params)

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    board = farm.board(SERIAL)
    if count is None:
        assert job["state"] == "failed", job
        assert "Error sending command [SEND_BLOCK]" in job["message"], job["message"]
        evidence = s.log_line("failed:", job_id)
    else:
        # A few garbled replies are retried by the tool: the flash goes through, byte-exact.
        assert job["state"] == "done", job
        data = image.read_bytes()
        assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
        evidence = s.log_line("flash succeeded", job_id)
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    s.record(f"Katapult replies with a bad CRC ({'every reply' if count is None else f'{count} replies'})",
             f"mid-flash: write phase at {percent} %", klipper, job,
             f"{evidence}; board: {board['blocks_received']} blocks received")


def test_katapult_goes_silent_mid_flash(scene, farm, standins, notify_socket, image):
    s = scene()
    standins.set("flashtool", dict(FAST_FAILURE, slow=BLOCK_PAUSE))
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    percent = flashing_percent(notify_socket, 10)
    farm.set_fault(SERIAL, "silent")

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "failed", job
    assert "Error sending command [SEND_BLOCK]" in job["message"], job["message"]
    assert "make flash not tried" in job["message"], job["message"]
    board = farm.board(SERIAL)
    assert 0 < board["blocks_received"] < blocks_of(image) and board["completes"] == 0, board
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    line = s.log_line("failed:", job_id)
    s.record("Katapult goes silent", f"mid-flash: write phase at {percent} %", klipper, job,
             f"{line}; board: {board['blocks_received']} of {blocks_of(image)} blocks received")


@pytest.mark.parametrize("hangup", [False, True], ids=["stops-answering", "hangs-up-the-line"])
def test_katapult_drops_mid_block(scene, farm, standins, image, hangup):
    s = scene()
    standins.set("flashtool", FAST_FAILURE)
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "drop", after_blocks=30, hangup=hangup)
    job_id = s.daemon.queue(SERIAL, str(image))

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "failed", job
    assert "Error sending command [SEND_BLOCK]" in job["message"], job["message"]
    if hangup:
        assert "no longer connected" in job["message"], job["message"]
    board = farm.board(SERIAL)
    assert board["blocks_received"] == 30, board
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    line = s.log_line("failed:", job_id)
    s.record("Katapult drops the transfer" + (" and hangs up the line" if hangup else ""),
             f"mid-flash: after {board['blocks_received']} of {blocks_of(image)} blocks acked",
             klipper, job, line)


# ------------------------------------------------------------------- systemctl fails ----


def test_systemctl_stop_fails_nothing_is_flashed(scene, farm, standins, image):
    s = scene()
    pid_before = standins.unit_pid("klipper")
    denied = "Failed to stop klipper.service: Access denied"
    standins.set("systemctl", {"stop": {"exit": 4, "stderr": denied}})
    verbs_before = len(standins.systemctl_verbs())
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")

    job = s.daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "failed", job
    assert "Klipper could not be stopped, nothing was flashed" in job["message"], job["message"]
    assert denied in job["message"], job["message"]
    assert farm.board(SERIAL)["blocks_received"] == 0
    assert standins.calls("flashtool") == [] and standins.calls("make") == []
    verbs = standins.systemctl_verbs()[verbs_before:]
    assert "start" not in verbs, verbs  # Klipper was never down: nothing to start
    klipper = s.klipper_running()
    assert standins.unit_pid("klipper") == pid_before  # untouched: the same process
    s.nothing_lost(job_id)
    line = s.log_line("failed:", job_id, "Access denied")
    s.record("`systemctl stop klipper` fails (Access denied)", "at the stop, before any flash", klipper,
             job, f"{line}; board: 0 blocks received; systemctl verbs {verbs}; same Klipper pid {pid_before}")


def test_systemctl_start_fails_klipper_down_is_loud(scene, farm, standins, image, journald, notify_socket):
    s = scene(journal_socket=journald.socket, timeouts={"reboot": 2})
    reason = "Job for klipper.service failed because the control process exited with error code."
    standins.set("systemctl", {"start": {"exit": 1, "fail_times": 3, "stderr": reason}})
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=40)
    starts = standins.systemctl_verbs().count("start") - 1  # minus the boot-time start
    assert starts == 3, standins.systemctl_verbs()  # retried
    entries = journald.read(count=1, MESSAGE_ID=MSG_KLIPPER_RESTART_FAILED)
    assert entries, "no Klipper-restart-failed entry in the journal"
    critical = entries[0]
    assert critical["PRIORITY"] == "2", critical
    assert "KLIPPER IS NOT RUNNING" in critical["MESSAGE"] and reason in critical["MESSAGE"], critical
    assert critical.get("KFLASHD_JOB") == job_id, critical
    # The cycle is over and STATUS keeps saying it (not only while "starting Klipper").
    status = notify_socket.wait_for(lambda m: m.startswith("STATUS=Idle") and "KLIPPER IS DOWN" in m, timeout=10)
    assert reason in status, status
    reply = s.daemon.ctl_json("status")
    assert reply["klipper_down"] and reason in reply["klipper_down"], reply
    assert "KLIPPER IS DOWN" in reply["status"], reply
    # Klipper really is down: the unit is inactive and no klippy runs.
    assert not s.printer.running and standins.unit_state("klipper") == "inactive"
    # The flash itself went through; the job's record must not hide that Klipper is down.
    assert job["state"] in ("done", "failed"), job
    data = image.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
    assert job["state"] == "done" and "KLIPPER IS NOT RUNNING" in job["message"], job["message"]
    assert reason in job["message"], job["message"]
    s.nothing_lost(job_id)
    s.record("`systemctl start klipper` fails (every try)", "at the restart after a good flash",
             f"DOWN, reported: STATUS \"{status.split('STATUS=', 1)[-1]}\"; unit "
             f"{standins.unit_state('klipper')}; {starts} start tries",
             job, f"journal PRIORITY={critical['PRIORITY']} MESSAGE_ID={critical['MESSAGE_ID']}: "
                  f"{critical['MESSAGE']}")


def test_klipper_left_down_is_started_again_later(scene, farm, standins, image, notify_socket):
    """After every try failed, kflashd keeps trying (timeouts.klipper_retry) until Klipper runs."""
    s = scene(timeouts={"reboot": 2, "klipper_retry": 0.5})
    standins.set("systemctl", {"start": {"exit": 1, "fail_times": 4, "stderr": "start refused"}})
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=40)
    assert "KLIPPER IS NOT RUNNING" in job["message"], job
    down_at = notify_socket.index_of(lambda m: "KLIPPER IS DOWN" in m, timeout=10)
    # The 4th start (the first retry) fails too, the 5th succeeds: Klipper runs again.
    wait_until(lambda: s.printer.running, 15, "Klipper started by a later retry")
    notify_socket.wait_for(lambda m: m == "STATUS=Idle, 1 job queued", after=down_at, timeout=10)
    assert s.daemon.ctl_json("status")["klipper_down"] is None
    starts = standins.systemctl_verbs().count("start") - 1
    assert starts == 5, standins.systemctl_verbs()
    s.nothing_lost(job_id)
    line = s.log_line("Klipper was started again")
    s.record("`systemctl start klipper` fails 4 times", "at the restart after a good flash, then retried",
             f"{s.klipper_running()} after {starts} start tries (3 in the cycle, 2 retries "
             f"{0.5:g} s apart)", job, line)


def test_systemctl_start_fails_once_is_retried(scene, farm, standins, image, notify_socket):
    s = scene()
    standins.set("systemctl", {"start": {"exit": 1, "fail_times": 1}})
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "done", job
    starts = standins.systemctl_verbs().count("start") - 1
    assert starts == 2, standins.systemctl_verbs()
    klipper = s.klipper_running()
    assert not any("KLIPPER IS DOWN" in m for m in notify_socket.messages), notify_socket.statuses()
    assert s.daemon.ctl_json("status")["klipper_down"] is None
    s.nothing_lost(job_id)
    line = s.log_line("stand-in failure", "try 1 of 3")
    s.record("`systemctl start klipper` fails once", "at the restart after a good flash",
             f"{klipper}; {starts} start tries; never reported DOWN", job, line)


# --------------------------------------------------------------- the daemon is stopped ----


def test_sigint_mid_flash_stops_tool_starts_klipper(scene, farm, standins, notify_socket):
    s = scene()
    job_id, path, percent = slow_flash(s, farm, notify_socket, seed=4, version="v-big")
    assert not s.printer.running

    assert s.daemon.stop(signal.SIGINT) == 0
    notify_socket.wait_for("STOPPING=1")
    tool = [c["pid"] for c in standins.calls("flashtool") if c.get("event") != "child"]
    assert tool and not any(pid_alive(p) for p in tool)
    assert standins.systemctl_verbs()[-1] == "start"
    klipper = s.klipper_running()
    # The daemon is gone: read the record from disk, as the next daemon will.
    state = json.loads((s.daemon.state_dir / "jobs" / f"{job_id}.json").read_text())
    assert state["state"] == "interrupted", state
    assert (s.daemon.state_dir / "images" / f"{job_id}.bin").exists()  # kept for the re-flash
    bystander = json.loads((s.daemon.state_dir / "jobs" / f"{s.bystander}.json").read_text())
    assert bystander["state"] == "queued"
    assert (s.daemon.state_dir / "images" / f"{s.bystander}.bin").read_bytes() == s.bystander_image
    line = s.log_line("SIGINT")
    s.record("SIGINT to kflashd", f"mid-flash: write phase at {percent} % (slow board)", klipper,
             state, f"{line}; exit 0, STOPPING=1, flash tool pid {tool[0]} gone")


def test_daemon_restarted_mid_flash_flashes_again(scene, farm, standins, notify_socket):
    """`systemctl restart kflashd` during a flash: SIGTERM, then a new daemon on the same state."""
    s = scene()
    job_id, path, percent = slow_flash(s, farm, notify_socket, seed=5, version="v-restart")

    assert s.daemon.stop(signal.SIGTERM) == 0
    assert s.printer.running  # started again before the old daemon exited
    farm.set_fault(SERIAL, None)
    s.daemon.start_ready(notify_socket)

    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "done", job
    assert job["attempts"] == 2, job
    data = path.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    line = s.log_line("re-queued", job_id)
    s.record("kflashd restarted (SIGTERM, then a new kflashd on the same state)",
             f"mid-flash: write phase at {percent} % (slow board)", klipper, job,
             f"{line}; attempts {job['attempts']}; image byte-exact on the board")


# ----------------------------------------------------------------- the state dir fails ----


@pytest.fixture
def small_state_fs(tmp_path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted where the daemon's state_dir will be (tmp_path/state)."""
    path = tmp_path / "state"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(path)],
                   check=True, capture_output=True, timeout=10)
    try:
        yield path
    finally:
        # Lazy: the daemon (stopped by make_daemon's teardown, which runs after this) may
        # still be in it.
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def test_state_dir_full_rejects_staging_keeps_jobs(small_state_fs, scene, farm, standins, tmp_path):
    s = scene()
    assert s.daemon.state_dir == small_state_fs
    mine = write_image(tmp_path / "mine", seed=31, version="v-mine")
    job_id = s.daemon.queue(SERIAL, str(mine))
    big = write_image(tmp_path / "huge", size=300 * 1024, seed=32, version="v-huge")
    before = sorted(p.name for p in (small_state_fs / "images").iterdir())

    result = s.daemon.ctl("queue", "1A2B3C4D5E6F", str(big))
    assert result.returncode != 0, result.stdout
    assert "no space left" in result.stderr, result.stderr
    after = sorted(p.name for p in (small_state_fs / "images").iterdir())
    assert after == before, (before, after)  # nothing half-written left behind
    assert {j["id"] for j in s.daemon.ctl_json("list")} == {job_id, s.bystander}

    # Still serving: the queued job is flashed when its board shows up.
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = s.daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "done", job
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    s.record("state dir full (ENOSPC while staging a 300 KiB image on a 256 KiB tmpfs)",
             "at `kflashctl queue`", klipper, job,
             f"kflashctl exit {result.returncode}: {result.stderr.strip()}; images/ unchanged "
             f"({len(before)} files); the earlier job then flashed")


def test_corrupt_job_files_at_startup_are_quarantined(make_daemon, farm, standins, journald, notify_socket,
                                                     tmp_path):
    # The daemon stages two jobs and stops; then their files are damaged on disk.
    daemon = make_daemon(journal_socket=journald.socket)
    good = daemon.queue(SERIAL, str(write_image(tmp_path / "good", seed=41, version="v-good")))
    cut = daemon.queue(BYSTANDER, str(write_image(tmp_path / "cut", seed=42, version="v-cut")))
    assert daemon.stop() == 0
    jobs = daemon.state_dir / "jobs"
    text = (jobs / f"{cut}.json").read_bytes()
    (jobs / f"{cut}.json").write_bytes(text[: len(text) // 2])  # truncated mid-write
    (jobs / "0123456789ab.json").write_bytes(b"\x00\x13garbage\xff")  # corrupt
    (jobs / "abcdefabcdef.json").write_bytes(b"")  # empty

    after = len(notify_socket.messages)
    # The same daemon again, on the damaged state.
    daemon.start(wait_ready=lambda: any(m.startswith("READY=1") for m in notify_socket.messages[after:]))
    printer = Printer(standins, daemon)
    printer.start()
    entries = journald.read(count=3, PRIORITY=3)
    quarantined = [e["MESSAGE"] for e in entries if "quarantined" in e["MESSAGE"]]
    assert len(quarantined) == 3, entries
    assert any(cut in m and "not valid JSON" in m for m in quarantined), quarantined
    assert any("0123456789ab" in m for m in quarantined) and any("empty file" in m for m in quarantined)
    moved = sorted(p.name for p in (daemon.state_dir / "quarantine").iterdir())
    assert f"{cut}.json" in moved and f"{cut}.bin" in moved, moved  # kept for a person to look at

    # The rest is served: the intact job is listed and flashed.
    assert [j["id"] for j in daemon.ctl_json("list")] == [good]
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = daemon.wait_job(good, ["done", "failed"])
    assert job["state"] == "done", job
    wait_until(lambda: printer.running, 10, "Klipper running")
    klipper = f"running (unit {standins.unit_state('klipper')}, pid {standins.unit_pid('klipper')} alive)"
    record(fault="truncated, corrupt and empty job files in state_dir/jobs",
           injected="before kflashd starts", klipper=klipper,
           job=f"{job['state']}: {job['message']} (the intact job); damaged ones moved to quarantine/: {moved}",
           evidence="journal PRIORITY=3: " + " / ".join(quarantined))


# --------------------------------------------------------------------- config reload ----


def ctl_with(daemon: KflashdProcess, config: Path, *args: str) -> subprocess.CompletedProcess:
    """kflashctl with another config file (the daemon's own file is broken on purpose)."""
    env = {k: v for k, v in daemon.env.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR", "NOTIFY_SOCKET")}
    return subprocess.run([PYTHON, "-m", "kflashd.ctl", "--config", str(config), *args],
                          env=env, capture_output=True, text=True, timeout=60, cwd=str(REPO))


def test_reload_with_invalid_config_keeps_the_old_one(scene, farm, standins, notify_socket, image):
    s = scene(boards={"octopus": {"serial": SERIAL, "mcu": MCU}})
    good = s.daemon.workdir / "good.toml"
    good.write_text(s.daemon.config_path.read_text())
    # Broken: the board is renamed (which would change behaviour) AND an unknown key is set.
    s.daemon.config_path.write_text(
        good.read_text().replace("[boards.octopus]", "[boards.spider]") + "\nflash_speed = 9000\n"
    )
    at = len(notify_socket.messages)
    s.daemon.send_signal(signal.SIGHUP)
    reloading = notify_socket.index_of(lambda m: m.startswith("RELOADING=1"), after=at)
    notify_socket.index_of(lambda m: m.startswith("READY=1"), after=reloading)
    error = s.log_line("reload failed, keeping the old configuration")
    assert "flash_speed" in error, error

    # The old config is in force: "octopus" still names the board, "spider" does not.
    refused = ctl_with(s.daemon, good, "queue", "spider", str(image))
    assert refused.returncode == 2 and "unknown board 'spider'" in refused.stderr, refused.stderr
    queued = ctl_with(s.daemon, good, "queue", "octopus", str(image))
    assert queued.returncode == 0, queued.stdout + queued.stderr
    job_id = re.search(r"job ([0-9a-f]{12}) queued", queued.stdout).group(1)
    # Proven; kflashctl reads the file too, so give it a readable one again (no SIGHUP: the
    # daemon does not see this).
    s.daemon.config_path.write_text(good.read_text())
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = s.daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "done" and job["board_name"] == "octopus", job
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    s.record("config reloaded (SIGHUP) with an invalid file (unknown key, board renamed)",
             "while idle, jobs queued", klipper, job,
             f"{error}; RELOADING=1 then READY=1; 'spider' refused, 'octopus' still resolves and flashes")


# ------------------------------------------------------- stops at the edges of a cycle ----


def test_sigterm_while_klipper_stops_leaves_the_board_alone(scene, farm, standins, notify_socket):
    """A --now job: SIGTERM during `systemctl stop` must not send the board to its bootloader."""
    s = scene(boards={"octopus": {"serial": SERIAL, "katapult": True}})
    farm.add_board(serial=SERIAL, mcu=MCU, mode="klipper")
    standins.set("systemctl", {"stop": {"sleep": 1.5}})
    path = write_image(s.daemon.workdir / "now", size=3000, seed=8, version="v-now")
    job_id = s.daemon.queue(SERIAL, str(path), "--now")
    notify_socket.wait_for(lambda m: "Stopping klipper" in m, timeout=10)

    assert s.daemon.stop(signal.SIGTERM) == 0
    board = farm.board(SERIAL)
    assert board["bootloader_requests"] == 0 and board["mode"] == "klipper", board
    assert standins.calls("flashtool") == []
    klipper = s.klipper_running()
    state = json.loads((s.daemon.state_dir / "jobs" / f"{job_id}.json").read_text())
    assert state["state"] == "interrupted" and state["results"] == [], state
    assert state["message"].startswith("interrupted, nothing written"), state

    # Nothing was written, and the job stays ended: a restart never flashes it later on its
    # own (its owner queues it again if it is still wanted). The start-up examination and
    # first scheduling run before READY=1, so the status reply already reflects them.
    standins.set("systemctl", {})
    s.daemon.start_ready(notify_socket)
    job = s.daemon.job(job_id)
    assert job["state"] == "interrupted" and "nothing written" in job["message"], job
    assert s.daemon.ctl_json("status")["current"] is None
    assert farm.board(SERIAL)["bootloader_requests"] == 0
    assert standins.calls("flashtool") == []
    s.nothing_lost(job_id)
    s.record("SIGTERM while `systemctl stop klipper` runs (--now job), then kflashd restarted",
             "before the bootloader request", klipper, job,
             f"board never asked to reboot (0 requests), no flash tool run, not re-queued after "
             f"the restart; {s.log_line('interrupted, nothing written')}")


def test_interrupted_job_goes_again_when_its_board_returns(scene, farm, standins, notify_socket):
    """Stopped mid-flash, board unplugged meanwhile: the job flashes when it is back in Katapult."""
    s = scene()
    job_id, path, _ = slow_flash(s, farm, notify_socket, seed=6, version="v-return")
    assert s.daemon.stop(signal.SIGTERM) == 0
    farm.unplug(SERIAL)
    farm.set_fault(SERIAL, None)
    s.daemon.start_ready(notify_socket)
    assert s.daemon.job(job_id)["state"] == "interrupted"  # no board yet: nothing to do

    farm.plug(SERIAL)
    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "done", job
    data = path.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    s.record("kflashd stopped mid-flash, board unplugged, daemon restarted, board back later",
             "mid-flash", klipper, job, s.log_line("re-queued: the board it was writing to"))


def test_failed_klipper_start_survives_a_daemon_restart(scene, farm, standins, image, notify_socket):
    """The crash marker stays while Klipper is down, so a restarted kflashd starts it."""
    s = scene(timeouts={"reboot": 2, "klipper_retry": 600})
    standins.set("systemctl", {"start": {"exit": 1, "fail_times": 3, "stderr": "start refused"}})
    job_id = s.daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    s.daemon.wait_job(job_id, ["done", "failed"], timeout=40)
    assert (s.daemon.runtime_dir / "cycle.marker").exists()
    assert not s.printer.running

    assert s.daemon.stop(signal.SIGTERM) == 0
    s.daemon.start_ready(notify_socket)
    klipper = s.klipper_running()
    assert not (s.daemon.runtime_dir / "cycle.marker").exists()
    job = s.daemon.job(job_id)
    s.nothing_lost(job_id)
    s.record("`systemctl start` fails every try, then kflashd is restarted", "after the flash",
             klipper, job, s.log_line("starting Klipper now"))
