"""A crash never writes a stale image (issue 9.4): kflashd killed at each point of a cycle.

SIGKILL (as the OOM killer or the watchdog would) at each point the job's write-ahead
record distinguishes, then a new daemon on the same state:
- before the write started: "interrupted, nothing written", never re-queued;
- mid-write: repeated only onto the same board in Katapult within timeouts.resume
  (test_cycle.py::test_sigkill_mid_flash_restarts_klipper_then_reflashes), otherwise ended
  with advice (here: the deadline passed);
- after "written", before the job's end was recorded: done (unconfirmed), never flashed
  again, although the board still waits in Katapult (the reproduced bug).
And interrupted jobs are examined after every cycle, not only at start-up.

Each test ends with the fault suite's promises (Klipper running, bystander job intact, a
clear record) and a row of the reliability matrix.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.e2e.conftest import MCU, SERIAL, padded
from tests.e2e.harness import wait_until
from tests.e2e.reliability import record
from tests.e2e.scene import BYSTANDER, slow_flash, write_image

pytestmark = pytest.mark.e2e


def on_disk(daemon, job_id: str) -> dict:
    """The job's record as the next daemon will read it."""
    return json.loads((daemon.state_dir / "jobs" / f"{job_id}.json").read_text())


def test_kill_before_the_write_nothing_written_never_requeued(scene, farm, standins, notify_socket):
    s = scene()
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    standins.set("systemctl", {"stop": {"sleep": 3}})
    path = write_image(s.daemon.workdir / "early", size=3000, seed=12, version="v-early")
    job_id = s.daemon.queue(SERIAL, str(path))
    notify_socket.wait_for(lambda m: "Stopping klipper" in m, timeout=10)
    assert on_disk(s.daemon, job_id)["write"] is None

    s.daemon.kill()
    standins.set("systemctl", {})
    s.daemon.start_ready(notify_socket)
    # The board waits in Katapult, yet nothing is flashed: the job ended before READY=1.
    job = s.daemon.job(job_id)
    assert job["state"] == "interrupted", job
    assert job["message"].startswith("interrupted, nothing written"), job["message"]
    assert s.daemon.ctl_json("status")["current"] is None
    assert standins.calls("flashtool") == [] and farm.board(SERIAL)["blocks_received"] == 0
    assert not (s.daemon.state_dir / "images" / f"{job_id}.bin").exists()
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    s.record("SIGKILL to kflashd, then restarted (board waits in Katapult)",
             "before the write: during `systemctl stop klipper`", klipper, job,
             f"{s.log_line('interrupted, nothing written', job_id)}; 0 flash tool runs, image dropped")


def test_kill_after_written_is_done_never_flashed_again(scene, farm, standins, notify_socket):
    """The reproduced bug: flashed, killed before the job was recorded, board in Katapult."""
    s = scene(timeouts={"reboot": 30})
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    # COMPLETE is acked but the board never boots: it stays in Katapult, and the cycle waits
    # for it in "waiting for reboot", after the write and before the job's end.
    farm.set_fault(SERIAL, "refuse_boot")
    path = write_image(s.daemon.workdir / "late", size=3000, seed=13, version="v-late")
    job_id = s.daemon.queue(SERIAL, str(path))
    notify_socket.wait_for(lambda m: "Waiting for reboot" in m, timeout=20)
    record = on_disk(s.daemon, job_id)
    assert record["state"] == "running" and record["write"] == "written", record
    assert record["results"][-1]["success"] is True, record

    s.daemon.kill()
    s.daemon.start_ready(notify_socket)
    job = s.daemon.job(job_id)
    assert job["state"] == "done", job
    assert "unconfirmed" in job["message"], job["message"]
    assert job["attempts"] == 1 and len(standins.calls("flashtool")) == 1, standins.calls("flashtool")
    assert s.daemon.ctl_json("status")["current"] is None
    assert [b["mode"] for b in s.daemon.ctl_json("devices") if b["serial"] == SERIAL] == ["katapult"]
    data = path.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    s.record("SIGKILL to kflashd after a good write, then restarted (board still in Katapult)",
             "after \"written\" was recorded, while waiting for the reboot", klipper, job,
             f"{s.log_line('flash succeeded', 'unconfirmed')}; flash tool ran once, board still "
             f"in Katapult and not flashed again")


def test_kill_mid_write_past_timeouts_resume_is_not_repeated(scene, farm, standins, notify_socket):
    s = scene(timeouts={"resume": 2})
    job_id, path, percent = slow_flash(s, farm, notify_socket, seed=14, version="v-expired")
    started = on_disk(s.daemon, job_id)
    assert started["write"] == "started" and started["write_port"], started

    s.daemon.kill()
    farm.unplug(SERIAL)
    farm.set_fault(SERIAL, None)
    s.daemon.start_ready(notify_socket)
    # The deadline (2 s after the write began) passes with the board away: the job ends.
    job = s.daemon.wait_job(job_id, ["interrupted"], timeout=15)
    wait_until(lambda: "not flashed again" in s.daemon.job(job_id)["message"], 15,
               "the interrupted job to end at its deadline")
    calls = len(standins.calls("flashtool"))
    farm.plug(SERIAL)  # the same board, same port, in Katapult: too late
    wait_until(lambda: any(b["serial"] == SERIAL for b in s.daemon.ctl_json("devices")), 10,
               "kflashd to see the board again")
    job = s.daemon.job(job_id)
    assert job["state"] == "interrupted" and "timeouts.resume (2 s)" in job["message"], job
    assert "queue the image again" in job["message"], job["message"]
    assert s.daemon.ctl_json("status")["current"] is None
    assert len(standins.calls("flashtool")) == calls == 1
    klipper = s.klipper_running()
    s.nothing_lost(job_id)
    s.record("SIGKILL to kflashd mid-write, restarted; board back after timeouts.resume (2 s)",
             f"mid-write: write phase at {percent} % (slow board)", klipper, job,
             f"{s.log_line('not flashed again', job_id)}; board back in Katapult later: not flashed")


def test_interrupted_job_is_examined_after_every_cycle(scene, farm, standins, notify_socket, tmp_path):
    """The interrupted job's board enters Katapult while another board is being flashed: the
    write is repeated as soon as that cycle ends, with no further udev event."""
    s = scene()
    job_id, path, _ = slow_flash(s, farm, notify_socket, seed=15, version="v-first")
    assert s.daemon.stop(signal.SIGTERM) == 0
    assert on_disk(s.daemon, job_id)["resume_until"] is not None
    farm.unplug(SERIAL)
    farm.set_fault(SERIAL, None)
    s.daemon.start_ready(notify_socket)

    # The bystander's board shows up, slow: its cycle runs while the first board returns.
    farm.add_board(serial=BYSTANDER, mcu=MCU, mode="katapult")
    farm.set_fault(BYSTANDER, "slow", bytes_per_second=2000)
    notify_socket.wait_for(lambda m: "Flashing" in m and "%" in m, timeout=20)
    farm.plug(SERIAL)
    wait_until(lambda: any(b["serial"] == SERIAL for b in s.daemon.ctl_json("devices")), 10,
               "kflashd to see the first board in Katapult")
    assert s.daemon.job(job_id)["state"] == "interrupted"  # one cycle at a time

    bystander = s.daemon.wait_job(s.bystander, ["done", "failed"], timeout=60)
    assert bystander["state"] == "done", bystander
    job = s.daemon.wait_job(job_id, ["done", "failed"], timeout=30)
    assert job["state"] == "done", job
    data = path.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
    klipper = s.klipper_running()
    record(fault="kflashd stopped mid-write; its board returns in Katapult while another board flashes",
           injected="mid-write (SIGTERM), then during another job's cycle", klipper=klipper,
           job=f"{job['state']}: {job['message']}",
           evidence=f"{s.log_line('re-queued: the board it was writing to', job_id)} (right after the "
                    f"other cycle, no further uevent); image byte-exact; the other job done too")
