"""The user's workflow, end to end: real daemon, real pyudev under umockdev, emulated boards.

Each test reads like what a person at the printer does: queue an image, plug a board in (or
ask for --now), watch the cycle; and checks what they care about: the image on the board
byte for byte, Klipper stopped only for the flash and running afterwards, the job's record.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.e2e.conftest import MCU, SERIAL, Printer, padded, start_slow_flash, wait_for_board_facts
from tests.e2e.harness import wait_until
from tests.farm.images import make_image

pytestmark = pytest.mark.e2e


def assert_klipper_stopped_only_around(standins, tool: str = "flashtool") -> None:
    """systemctl stop, then the flash tool, then systemctl start, in that order."""
    calls = [c for c in standins.calls() if c["prog"] in ("systemctl", tool) and c.get("event") != "child"]
    order = [c.get("verb", c["prog"]) if c["prog"] == "systemctl" else tool for c in calls]
    assert "stop" in order and tool in order and "start" in order, order
    stop, flash = order.index("stop"), order.index(tool)
    start = len(order) - 1 - order[::-1].index("start")
    assert stop < flash < start, order


def test_queue_then_plug_in_flashes_byte_exact(make_daemon, farm, standins, image, notify_socket):
    daemon = make_daemon()
    printer = Printer(standins, daemon)
    printer.start()

    job_id = daemon.queue(SERIAL, str(image))
    assert daemon.job(job_id)["state"] == "queued"

    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "done", job["message"]
    data = image.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
    assert job["results"][-1]["method"] == "katapult"
    assert job["results"][-1]["success"] is True
    assert job["version_confirmed"] is True, job
    assert_klipper_stopped_only_around(standins)
    assert printer.running
    assert farm.board(SERIAL)["mode"] == "klipper"
    history = daemon.ctl_json("history")
    assert [j["id"] for j in history] == [job_id]
    assert history[0]["results"][-1]["method"] == "katapult"
    assert any("via katapult" in s and "%" in s for s in notify_socket.statuses())


def test_board_already_in_katapult_is_flashed_at_once(make_daemon, farm, standins, image):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon()
    Printer(standins, daemon).start()
    result = daemon.ctl("queue", SERIAL, str(image), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: flashed via katapult" in result.stdout
    data = image.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)


def test_now_reboots_a_running_board_into_katapult(make_daemon, farm, standins, image):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="klipper")
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL, "mcu": MCU, "katapult": True}})
    printer = Printer(standins, daemon)
    printer.start()
    wait_until(lambda: printer.running, 10, "the fake Klipper to run")

    result = daemon.ctl("queue", "octopus", str(image), "--now", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("stopping Klipper", "rebooting into Katapult", "waiting for reboot", "done:"):
        assert step in result.stdout, result.stdout
    board = farm.board(SERIAL)
    assert board["bootloader_requests"] == 1
    assert board["mode"] == "klipper"
    data = image.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)
    assert_klipper_stopped_only_around(standins)
    assert printer.running
    # flashtool's own -r is never used: the daemon asked for the bootloader itself.
    assert all("-r" not in c["argv"] for c in standins.calls("flashtool"))


def test_katapult_failure_falls_back_to_make_flash(make_daemon, farm, standins, image, tmp_path):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    klipper = tmp_path / "klipper"
    (klipper / "out").mkdir(parents=True)
    (klipper / "out" / "klipper.bin").write_bytes(image.read_bytes())
    os.chown(klipper, 65534, 65534)
    standins.set("flashtool", {"timeout": 0.3, "tries": 2, "retry_sleep": 0})
    daemon = make_daemon(klipper_dir=klipper, timeouts={"reboot": 0})
    Printer(standins, daemon).start()
    # The daemon read the board's Katapult when it appeared; then Katapult falls silent: the
    # remembered application start still checks the image, and make flash gets its turn.
    wait_for_board_facts(daemon)
    farm.set_fault(SERIAL, "silent")

    result = daemon.ctl("queue", SERIAL, str(image), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job = daemon.ctl_json("history")[0]
    assert job["results"][-1]["method"] == "make_flash"
    make = standins.calls("make", query=False)
    assert len(make) == 1 and make[0]["uid"] == 65534
    # The tools get the board's by-id link (checked to lead to udev's node), not /dev/ttyACMn.
    assert f"FLASH_DEVICE={farm.board(SERIAL)['by_id']}" in make[0]["argv"]
    flashtool = standins.calls("flashtool")[0]["argv"]
    assert flashtool[flashtool.index("-d") + 1] == farm.board(SERIAL)["by_id"]
    assert_klipper_stopped_only_around(standins, tool="make")


def test_unplugged_mid_flash_fails_clearly_and_klipper_runs(make_daemon, farm, standins, notify_socket):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=1000)
    big = make_image(mcu=MCU, version="v-big", size=40000, seed=3)
    standins.set("flashtool", {"timeout": 0.5, "tries": 2, "retry_sleep": 0})
    daemon = make_daemon()
    path = daemon.workdir / "big.bin"
    path.write_bytes(big)
    printer = Printer(standins, daemon)
    printer.start()

    job_id = daemon.queue(SERIAL, str(path))
    notify_socket.wait_for(lambda m: "Flashing" in m and "%" in m and not m.endswith(": 0%"), timeout=20)
    farm.unplug(SERIAL)
    job = daemon.wait_job(job_id, ["done", "failed"], timeout=60)
    assert job["state"] == "failed"
    assert "Katapult" in job["message"] or "katapult" in job["message"]
    assert "make flash" in job["message"]
    wait_until(lambda: printer.running, 10, "Klipper running again")


def test_print_in_progress_waits_until_idle(make_daemon, farm, standins, image, notify_socket):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon()
    printer = Printer(standins, daemon)
    daemon.set_printer(print_stats="printing", idle_timeout="Printing")
    printer.start()
    stops_before = standins.systemctl_verbs().count("stop")

    job_id = daemon.queue(SERIAL, str(image))
    notify_socket.wait_for(lambda m: "Waiting for the printer" in m, timeout=10)
    # Several guard checks pass (guard_retry 0.3 s), each one asking Klipper again and
    # holding again: a guard that held only on its first check would have flashed by now.
    asked = printer.guard_queries()
    wait_until(lambda: printer.guard_queries() >= asked + 3, 10, "three more guard checks")
    assert daemon.job(job_id)["state"] in ("queued", "running")  # "running": being checked again
    assert standins.calls("flashtool") == []
    assert standins.systemctl_verbs().count("stop") == stops_before
    assert farm.board(SERIAL)["blocks_received"] == 0

    daemon.set_printer(print_stats="complete", idle_timeout="Idle")
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "done", job["message"]


def test_wrong_mcu_is_refused_before_klipper_is_touched(make_daemon, farm, standins, tmp_path):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon()
    Printer(standins, daemon).start()
    rp = tmp_path / "rp" / "klipper.bin"
    rp.parent.mkdir()
    rp.write_bytes(make_image(mcu="rp2040", version="v-rp", size=3000, seed=5))
    verbs_before = standins.systemctl_verbs()

    result = daemon.ctl("queue", SERIAL, str(rp))
    assert result.returncode == 2
    assert "built for rp2040 but the board is stm32f446xx" in result.stderr
    assert standins.systemctl_verbs() == verbs_before
    assert standins.calls("flashtool") == []


def test_wrong_mcu_found_at_plug_in_fails_without_stopping_klipper(make_daemon, farm, standins, tmp_path):
    daemon = make_daemon()
    Printer(standins, daemon).start()
    rp = tmp_path / "rp" / "klipper.bin"
    rp.parent.mkdir()
    rp.write_bytes(make_image(mcu="rp2040", version="v-rp", size=3000, seed=5))
    job_id = daemon.queue(SERIAL, str(rp))
    verbs_before = standins.systemctl_verbs()

    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "failed" and "refusing to flash" in job["message"]
    assert standins.systemctl_verbs() == verbs_before
    assert farm.board(SERIAL)["blocks_received"] == 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkill_mid_flash_restarts_klipper_then_reflashes(make_daemon, farm, standins, notify_socket):
    daemon, printer, job_id, big = start_slow_flash(make_daemon, farm, standins, notify_socket)
    assert not printer.running
    tool = [c["pid"] for c in standins.calls("flashtool") if c.get("event") != "child"][-1]
    group = os.getpgid(tool)

    daemon.kill()
    # The flash tool's whole process group dies with the daemon (pdeath wrapper), at once.
    wait_until(lambda: not group_alive(group), 5, "the flash tool's process group to die with kflashd")
    # Killed, not left to wind down: a tool that outlived the daemon (or ended its own way on
    # a broken pipe) would send COMPLETE, and the half-written board would boot it.
    board = farm.board(SERIAL)
    assert board["completes"] == 0 and board["mode"] == "katapult", board["completes"]
    # The board is away while the new daemon starts: only its start-up recovery (the cycle
    # marker) can start Klipper now, no re-flash cycle can do it in its place.
    farm.unplug(SERIAL)
    farm.set_fault(SERIAL, None)
    verbs_before = len(standins.systemctl_verbs())
    daemon.start_ready(notify_socket)
    wait_until(lambda: printer.running, 10, "Klipper started by the new daemon's recovery")
    assert standins.systemctl_verbs()[verbs_before:] == ["start"]
    job = daemon.job(job_id)
    assert job["state"] == "interrupted" and "interrupted mid-write" in job["message"], job
    assert job["write"] == "started" and job["resume_until"] is not None, job

    # The same board (same USB port) back in Katapult: the cut-short write is repeated.
    farm.plug(SERIAL)
    job = daemon.wait_job(job_id, ["done", "failed"], timeout=60)
    assert job["state"] == "done", job["message"]
    assert job["attempts"] == 2
    assert farm.flashed_image(SERIAL, len(padded(big))) == padded(big)
    wait_until(lambda: printer.running, 10, "Klipper running after the re-flash")


def test_sigterm_mid_flash_stops_tool_starts_klipper(make_daemon, farm, standins, notify_socket):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=1000)
    daemon = make_daemon()
    printer = Printer(standins, daemon)
    printer.start()
    path = daemon.workdir / "big.bin"
    path.write_bytes(make_image(mcu=MCU, version="v-big", size=30000, seed=4))
    job_id = daemon.queue(SERIAL, str(path))
    notify_socket.wait_for(lambda m: "Flashing" in m and "%" in m and not m.endswith(": 0%"), timeout=20)

    assert daemon.stop(signal.SIGTERM) == 0
    assert printer.running
    stopping = notify_socket.index_of("STOPPING=1")
    assert standins.systemctl_verbs()[-1] == "start"
    tool_pids = [c["pid"] for c in standins.calls("flashtool") if c.get("event") != "child"]
    assert tool_pids and not any(os.path.exists(f"/proc/{pid}") for pid in tool_pids)
    state_file = daemon.state_dir / "jobs" / f"{job_id}.json"
    assert '"state": "interrupted"' in state_file.read_text().replace('":"', '": "')
    assert stopping >= 0


def test_new_job_replaces_the_queued_one_for_the_same_board(make_daemon, farm, standins, image, tmp_path):
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL, "mcu": MCU}})
    first = daemon.queue("octopus", str(image))
    second_image = tmp_path / "second" / "klipper.bin"
    second_image.parent.mkdir()
    second_image.write_bytes(make_image(mcu=MCU, version="v-second", size=4000, seed=11))
    # Either by-id name of the board selects it, even while it is not plugged in.
    result = daemon.ctl("queue", f"/dev/serial/by-id/usb-Klipper_{MCU}_{SERIAL}-if00", str(second_image))
    assert result.returncode == 0, result.stderr
    assert f"replaces job {first}" in result.stdout
    pending = daemon.ctl_json("list")
    assert len(pending) == 1 and pending[0]["image_size"] == 4000
    replaced = daemon.job(first)
    assert replaced["state"] == "cancelled" and "replaced by job" in replaced["message"]

    Printer(standins, daemon).start()
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = daemon.wait_job(pending[0]["id"], ["done", "failed"])
    assert job["state"] == "done", job["message"]
    data = second_image.read_bytes()
    assert farm.flashed_image(SERIAL, len(padded(data))) == padded(data)


def test_cancel_a_queued_job_and_its_waiter_learns_it(make_daemon):
    daemon = make_daemon()
    path = daemon.workdir / "klipper.bin"
    path.write_bytes(make_image(mcu=MCU, version="v-c", size=2000, seed=2))
    job_id = daemon.queue(SERIAL, str(path))
    waiter = daemon.ctl_popen("queue", SERIAL, str(path), "--wait")
    assert waiter.stdout is not None
    line = waiter.stdout.readline()
    while not line.startswith("job "):
        assert line, "kflashctl queue --wait printed no job line"
        line = waiter.stdout.readline()
    second = line.split()[1]
    assert daemon.job(job_id)["state"] == "cancelled"  # replaced by the waiter's job
    wait_until(lambda: daemon.job(second)["state"] == "queued", 5, "the second job")
    cancelled = daemon.ctl("cancel", second)
    assert cancelled.returncode == 0 and f"job {second} cancelled" in cancelled.stdout
    out, _ = waiter.communicate(timeout=10)
    assert waiter.returncode == 5, out
    assert "cancelled: cancelled by user" in out
    again = daemon.ctl("cancel", second)
    assert again.returncode == 2 and "already cancelled" in again.stderr
    assert daemon.ctl("cancel", "../../etc").returncode == 2


def test_daemon_reads_the_mcu_from_the_bytes_not_the_clients_word(make_daemon, farm):
    """A client that says nothing (or the wrong thing) about the MCU cannot get past the check."""
    import base64
    import hashlib

    from kflashd.control import ControlClient

    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon()
    rp = make_image(mcu="rp2040", version="v-rp", size=3000, seed=5)
    request = {"cmd": "queue", "board": SERIAL, "image": base64.b64encode(rp).decode(),
               "sha256": hashlib.sha256(rp).hexdigest()}
    with ControlClient(str(daemon.control_socket)) as client:
        silent = client.request(request)
        lying = client.request(dict(request, mcu=MCU))
    assert silent["ok"] is False and "built for rp2040 but the board is stm32f446xx" in silent["error"]
    assert lying["ok"] is False and "klipper.dict says stm32f446xx" in lying["error"]
    assert daemon.ctl_json("list") == []
