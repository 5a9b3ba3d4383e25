"""The print guard fails closed, for every Klipper instance (real daemon, emulated boards).

Each test is a way a real host lets a flash interrupt a print when "no answer" is read as
"not running": a wrong socket path, a second instance, a socket the daemon may not open
(root mode without CAP_DAC_OVERRIDE). And the one case where no answer does mean "go":
the unit is stopped and only its stale socket file is left.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import List

import pytest

from tests.e2e.conftest import SERIAL, MCU, Printer, start_slow_flash
from tests.e2e.harness import REPO, wait_until
from tests.farm.fixtures import write_printer_state

pytestmark = pytest.mark.e2e

KLIPPER_UID = 65534  # "pi": the socket's owner, not root


def root_caps() -> List[str]:
    """install.sh's ROOT_CAPS, as setpriv wants them (cap_setuid,...)."""
    match = re.search(r'^ROOT_CAPS="([^"]*)"$', (REPO / "install.sh").read_text(), re.M)
    assert match, "install.sh has no ROOT_CAPS line"
    return [c.lower() for c in match.group(1).split()]


def as_root_unit(caps: List[str]) -> List[str]:
    """Run the daemon as root with only `caps`, as systemd runs root mode's unit."""
    return ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set=-all,+{',+'.join(c[4:] for c in caps)}",
            "--"]


def shows(standins) -> int:
    return len(standins.calls("systemctl", verb="show"))


def test_wrong_socket_path_while_klipper_runs_waits_and_never_stops_it(make_daemon, farm, standins, image,
                                                                        notify_socket):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon(start=False, api_socket="/run/nowhere/klippy.sock")
    printer = Printer(standins, daemon)
    printer.start()  # serving at its real path; the config names another one
    daemon.start_ready(notify_socket)

    job_id = daemon.queue(SERIAL, str(image))
    status = notify_socket.wait_for(lambda m: "Waiting for the printer" in m, timeout=10)
    assert "/run/nowhere/klippy.sock" in status and "klipper.api_socket" in status, status
    before = shows(standins)
    wait_until(lambda: shows(standins) >= before + 3, 10, "three more guard checks")
    assert daemon.job(job_id)["state"] in ("queued", "running")  # "running": being checked again
    assert "stop" not in standins.systemctl_verbs()
    assert farm.board(SERIAL)["blocks_received"] == 0
    assert printer.running


def test_second_instance_printing_holds_the_flash(make_daemon, farm, standins, image, notify_socket):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon(start=False, services=["klipper-1", "klipper-2"], api_socket=None)
    work = daemon.workdir
    # KIAUH's two instances: one passes -a in its ExecStart, the other through klipper.env.
    one = Printer(standins, daemon, "klipper-1", api_socket=work / "p1.sock")
    second_state = work / "printer-2.json"
    write_printer_state(second_state, print_stats="printing", idle_timeout="Printing")
    two = Printer(standins, daemon, "klipper-2", api_socket=work / "p2.sock", state_file=second_state,
                  extra=["--no-ports"], env_file=work / "klipper-2.env")
    one.start()
    two.start()
    daemon.start_ready(notify_socket)

    job_id = daemon.queue(SERIAL, str(image))
    status = notify_socket.wait_for(lambda m: "Waiting for the printer" in m, timeout=10)
    assert "klipper-2.service" in status and "printing" in status, status
    asked = two.guard_queries()
    wait_until(lambda: two.guard_queries() >= asked + 3, 10, "three more guard checks of klipper-2")
    assert one.guard_queries() >= 3  # the idle one is asked every time too
    assert daemon.job(job_id)["state"] in ("queued", "running")  # "running": being checked again
    assert "stop" not in standins.systemctl_verbs()
    assert farm.board(SERIAL)["blocks_received"] == 0

    write_printer_state(second_state, print_stats="complete", idle_timeout="Idle")
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "done", job["message"]
    stop = standins.calls("systemctl", verb="stop")
    assert stop and stop[0]["units"] == ["klipper-1", "klipper-2"]
    wait_until(lambda: one.running and two.running, 10, "both instances running again")
    assert job["version_confirmed"] is True, job  # asked of the instance whose config names the board
    config = daemon.ctl("config")
    assert config.returncode == 0, config.stderr
    assert f"print guard: klipper-2 = \"{work / 'p2.sock'}\"" in config.stdout, config.stdout
    assert str(work / "klipper-2.env") in config.stdout  # where that socket came from


def test_stale_socket_with_klipper_stopped_goes_on(make_daemon, farm, standins, image):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon()
    Printer(standins, daemon)  # the unit exists, inactive: Klipper is not running
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(daemon.api_socket))  # what a Klipper that exited leaves behind
    dead.close()

    job = daemon.wait_job(daemon.queue(SERIAL, str(image)), ["done", "failed"])
    assert job["state"] == "done", job["message"]
    assert "klipper.service is inactive" in daemon.log() and "nothing to ask" in daemon.log()


def test_socket_the_daemon_may_not_open_holds_with_a_warning(make_daemon, farm, standins, image, notify_socket):
    # Root mode as it was: root without CAP_DAC_OVERRIDE, Klipper's socket pi's 0755.
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    old_caps = [c for c in root_caps() if c != "cap_dac_override"]
    daemon = make_daemon(start=False, wrapper=as_root_unit(old_caps))
    printer = Printer(standins, daemon, extra=["--socket-owner", str(KLIPPER_UID), "--socket-mode", "755"])
    printer.start()
    daemon.start_ready(notify_socket)

    job_id = daemon.queue(SERIAL, str(image))
    status = notify_socket.wait_for(lambda m: "WARNING: held by a configuration error" in m, timeout=10)
    assert "permission denied" in status and "CAP_DAC_OVERRIDE" in status, status
    reply = daemon.ctl("status")
    assert "WARNING: the print guard cannot ask Klipper" in reply.stdout, reply.stdout
    assert "permission denied" in reply.stdout
    # the journal entry at warning level (<4>: the stderr fallback keeps the priority)
    wait_until(lambda: any(line.startswith("<4>") and "print guard cannot ask Klipper" in line
                           and "Fix:" in line for line in daemon.log().splitlines()), 10, "a warning in the log")
    assert json.loads(daemon.ctl("status", "--json").stdout)["guard_warning"]
    assert daemon.job(job_id)["state"] in ("queued", "running")  # "running": being checked again
    assert "stop" not in standins.systemctl_verbs()
    assert printer.guard_queries() == 0  # it never got through


def test_root_mode_reaches_the_socket_and_the_version_proof(make_daemon, farm, standins, image, notify_socket):
    # Root mode as install.sh renders it now (ROOT_CAPS): the same socket, reached.
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon(start=False, wrapper=as_root_unit(root_caps()))
    printer = Printer(standins, daemon, extra=["--socket-owner", str(KLIPPER_UID), "--socket-mode", "755"])
    printer.start()
    daemon.start_ready(notify_socket)
    assert Path(daemon.api_socket).stat().st_uid == KLIPPER_UID

    job = daemon.wait_job(daemon.queue(SERIAL, str(image)), ["done", "failed"])
    assert job["state"] == "done", job["message"]
    assert printer.guard_queries() >= 1
    assert job["version_confirmed"] is True, job


def test_interrupted_write_held_by_the_guard_is_still_repeated(make_daemon, farm, standins, notify_socket):
    # SIGKILL mid-write; the restarted daemon starts Klipper, which now says "printing"
    # (or has no socket yet): the guard holds the repeat, and the write's record (which
    # board, which port) must survive the hold, or the job could never be repeated.
    daemon, printer, job_id, big = start_slow_flash(make_daemon, farm, standins, notify_socket)
    daemon.kill()
    farm.set_fault(SERIAL, None)
    daemon.set_printer(print_stats="printing", idle_timeout="Printing")
    daemon.start_ready(notify_socket)
    wait_until(lambda: printer.running, 10, "Klipper started by the restarted daemon")
    asked = printer.guard_queries()
    wait_until(lambda: printer.guard_queries() >= asked + 2, 15, "the guard holding the repeat twice")
    assert daemon.job(job_id)["state"] in ("queued", "running"), daemon.job(job_id)

    daemon.set_printer(print_stats="complete", idle_timeout="Idle")
    job = daemon.wait_job(job_id, ["done", "failed", "interrupted"], timeout=60)
    assert job["state"] == "done", job["message"]
    padded = big + b"\xff" * (-len(big) % 64)
    assert farm.flashed_image(SERIAL, len(padded)) == padded
