"""What an admin sees: sd_notify datagrams and a real journald receiving the cycle's story."""

from __future__ import annotations

import re
import signal

import pytest

from tests.e2e.conftest import MCU, SERIAL, Printer
from tests.e2e.harness import wait_until

pytestmark = pytest.mark.e2e

MSG_JOB_STAGED = "4c1e4a1794ae417098e7505efaca5ab2"
MSG_FLASH_STARTED = "ba0fa4ff40024cf5a2c8115f252a44e8"
MSG_FLASH_SUCCEEDED = "57110a25f0e843feba707007fb1f5e32"


def test_journal_has_the_whole_story_of_a_job(make_daemon, farm, standins, image, journald):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon(journal_socket=journald.socket, boards={"octopus": {"serial": SERIAL}})
    Printer(standins, daemon).start()
    result = daemon.ctl("queue", "octopus", str(image), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"job ([0-9a-f]{12}) queued", result.stdout).group(1)

    entries = journald.read(count=3, KFLASHD_JOB=job_id)
    by_id = {e.get("MESSAGE_ID"): e for e in entries if e.get("MESSAGE_ID")}
    assert {MSG_JOB_STAGED, MSG_FLASH_STARTED, MSG_FLASH_SUCCEEDED} <= set(by_id), entries
    done = by_id[MSG_FLASH_SUCCEEDED]
    assert done["KFLASHD_BOARD"] == "octopus"
    assert done["KFLASHD_SERIAL"] == SERIAL
    assert done["KFLASHD_METHOD"] == "katapult"
    assert done["KFLASHD_RESULT"] == "done"
    assert done["SYSLOG_IDENTIFIER"] == "kflashd"
    assert done["PRIORITY"] == "6"
    assert "octopus" in done["MESSAGE"] and "succeeded" in done["MESSAGE"]
    # Every message of the job carries the job's fields, so one query finds its whole story.
    assert all(e["KFLASHD_SERIAL"] == SERIAL for e in entries)


def test_notify_ready_status_watchdog_reload_stopping(make_daemon, farm, standins, notify_socket, tmp_path):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=6000)
    daemon = make_daemon(watchdog_usec=200_000)
    Printer(standins, daemon).start()
    assert notify_socket.messages[0].startswith("READY=1") or "READY=1" in notify_socket.messages

    # The watchdog is fed at half of WATCHDOG_USEC, also during a long flash.
    path = daemon.workdir / "big.bin"
    from tests.farm.images import make_image

    path.write_bytes(make_image(mcu=MCU, version="v-notify", size=12000, seed=9))
    job_id = daemon.queue(SERIAL, str(path))
    first = notify_socket.index_of(lambda m: re.search(r"Flashing \w+ via katapult: \d+%", m), timeout=20)
    pings_at_start = notify_socket.count("WATCHDOG=1")
    wait_until(lambda: notify_socket.count("WATCHDOG=1") >= pings_at_start + 3, 5, "watchdog pings during the flash")
    job = daemon.wait_job(job_id, ["done", "failed"], timeout=60)
    assert job["state"] == "done", job["message"]
    percents = [int(m) for m in re.findall(r"via katapult: (\d+)%", "\n".join(notify_socket.messages[first:]))]
    assert len(percents) >= 3 and percents == sorted(percents), percents
    notify_socket.wait_for(lambda m: m == "STATUS=Idle, no jobs queued", after=first, timeout=10)

    # SIGHUP reloads: RELOADING=1, then READY=1 again.
    at = len(notify_socket.messages)
    daemon.send_signal(signal.SIGHUP)
    reload_at = notify_socket.index_of(lambda m: m.startswith("RELOADING=1"), after=at)
    assert "MONOTONIC_USEC=" in notify_socket.messages[reload_at]
    notify_socket.index_of(lambda m: m.startswith("READY=1"), after=reload_at)

    assert daemon.stop(signal.SIGTERM) == 0
    notify_socket.wait_for("STOPPING=1")
    # Children never inherit the notify socket: stand-ins record what they were given.
    assert all(not c.get("notify_env") for c in standins.calls() if c["prog"] in ("systemctl", "flashtool"))


def test_queue_wait_draws_a_progress_bar_on_a_terminal(make_daemon, farm, standins, image):
    """On a terminal `queue --wait` redraws one bar line with the Katapult percentage."""
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=8000)
    daemon = make_daemon()
    Printer(standins, daemon).start()
    returncode, text = daemon.ctl_on_terminal("queue", SERIAL, str(image), "--wait")
    assert returncode == 0, text
    bars = re.findall(r"\rflashing\s+\[(#*)\s*\]\s+(\d+)%", text)
    assert len(bars) >= 3, text
    assert [int(p) for _, p in bars] == sorted(int(p) for _, p in bars)
    assert bars[-1][1] == "100" and len(bars[-1][0]) == 30
    assert "done: flashed via katapult" in text
