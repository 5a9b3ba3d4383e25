"""`kflashctl update`: after a Klipper update, rebuild and reflash the printer in one stop.

The printer: a stand-in Klipper tree (a git checkout owned by `nobody`, built by real GNU
make), boards on the farm in both modes, and the fake Klipper reporting each board's
firmware for its `[mcu ...]` section. What the person at the printer cares about is
asserted: the boards that needed it run the tree's new build, byte for byte; the current
one was not touched; a failure of one board did not stop the others; Klipper was stopped
exactly once and runs at the end; a print is never interrupted.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from kflashd.canbus import uuid_from_serial
from kflashd.devices import serial_from_by_id
from tests.e2e.conftest import Printer, padded, wait_for_board_facts
from tests.e2e.harness import KflashdProcess, wait_until
from tests.farm.fixtures import write_printer_state
from tests.standins.fixtures import klipper_tree_update, make_klipper_tree, write_kconfig

pytestmark = pytest.mark.e2e

OLD = "v0.12.0-7-gold0000"
# name: (serial, mcu, mode on the farm)
BOARDS = {
    "octopus": ("3A0029000851313433383932", "stm32f446xx", "katapult"),
    "spider": ("2B0030000951313433383933", "stm32f407xx", "klipper"),
    "ebb": ("E6616407E3246B29", "rp2040", "klipper"),
}


class UpdateRig:
    """A printer after `git pull`: the tree, saved kconfigs, boards, Klipper, kflashd."""

    def __init__(self, farm, standins, notify_socket, boards, journal_socket=None, timeouts=None,
                 kconfig_options=None, katapult_unknown=()) -> None:
        # The builder (`nobody`) must reach state_dir/builds: a world-traversable workdir.
        self.work = Path(tempfile.mkdtemp(prefix="kflashd-update-"))
        os.chmod(self.work, 0o755)
        self.farm, self.standins = farm, standins
        self.tree = make_klipper_tree(self.work)
        self.old_version = OLD
        config_boards = {}
        mcus = {}
        for name, (serial, mcu, mode) in boards.items():
            kconfig = write_kconfig(self.work / f"{name}.config", mcu, **(kconfig_options or {}).get(name, {}))
            key = "canbus_uuid" if mode == "can" else "serial"
            config_boards[name] = {key: serial, "mcu": mcu, "kconfig": str(kconfig)}
            if mode != "can" and name not in katapult_unknown:
                # Boards that run Klipper are sent to Katapult by the batch: known to run it.
                config_boards[name]["katapult"] = True
            # printer.cfg: a CAN toolhead and a bridge by canbus_uuid, a USB board by serial
            uuid = serial if mode == "can" else uuid_from_serial(serial) if mode == "bridge" else None
            mcus["mcu" if not mcus else f"mcu {name}"] = {"canbus_uuid": uuid} if uuid else serial
        (self.work / "d").mkdir(mode=0o755)
        self.daemon = KflashdProcess(self.work / "d", farm.env, standins.dir, notify_socket=notify_socket.address,
                                     journal_socket=journal_socket, boards=config_boards, klipper_dir=self.tree,
                                     timeouts=timeouts)
        self.version = klipper_tree_update(self.tree)  # the user pulled: boards run the old one
        for name, (serial, mcu, mode) in boards.items():
            if mode == "can":
                farm.add_can_node(serial, mcu=mcu, version=OLD)
            elif mode == "bridge":
                farm.add_bridge(serial, mcu=mcu, version=OLD)
            else:
                farm.add_board(serial=serial, mcu=mcu, mode=mode, version=OLD)
        write_printer_state(self.daemon.printer_state, idle_timeout="Ready", mcus=mcus)
        self.printer = Printer(standins, self.daemon)
        self.printer.start()
        wait_until(lambda: self.printer.running, 10, "the fake Klipper to run")
        self.daemon.start_ready(notify_socket)

    def board_runs_tree_build(self, name: str) -> bool:
        serial = BOARDS.get(name, (name,))[0]
        built = (self.daemon.state_dir / "builds" / name / "out" / "klipper.bin").read_bytes()
        return self.farm.flashed_image(serial, len(padded(built))) == padded(built)

    def close(self) -> None:
        self.daemon.stop()
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture
def rig_factory(farm, standins, notify_socket):
    rigs = []

    def make(**options) -> UpdateRig:
        rig = UpdateRig(farm, standins, notify_socket, **options)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        print(f"----- kflashd log -----\n{rig.daemon.log()}")
        rig.close()


def flash_order(standins, farm) -> list:
    """Serials in the order flashtool.py was run on them."""
    nodes = {b["device_node"]: b["serial"] for b in farm.boards()}
    order = []
    for call in standins.calls("flashtool"):
        argv = call.get("argv", [])
        if "-d" in argv:
            device = argv[argv.index("-d") + 1]
            order.append(serial_from_by_id(device) or nodes.get(device, device))
    return order


def test_update_all_rebuilds_skips_and_flashes_in_one_stop(rig_factory, farm, standins, notify_socket, journald):
    # flaky's flash fails half-way through the batch: the boards after it are still flashed.
    boards = {"octopus": BOARDS["octopus"], "flaky": ("5D0032000B50535556323422", "stm32h723xx", "katapult"),
              "spider": BOARDS["spider"], "ebb": BOARDS["ebb"],
              "broken": ("4C0031000A50535556323421", "stm32g0b1xx", "klipper"),
              "wrongmcu": ("6E0033000C50535556323423", "stm32g0b1xx", "klipper")}
    # wrongmcu's saved kconfig is for another MCU: its image gets the checks of `queue`.
    rig = rig_factory(boards=boards, journal_socket=journald.socket,
                      kconfig_options={"broken": {"kflashd_test_fail": "y"}, "wrongmcu": {"MCU": "\"stm32f103xe\""}})
    # ebb already runs what the tree builds now: it is current.
    ebb_serial = BOARDS["ebb"][0]
    # flaky's Katapult answers kflashd's read of it (its application start is remembered),
    # then falls silent: flashtool fails on it inside the batch.
    wait_for_board_facts(rig.daemon, boards["flaky"][0])
    farm.set_fault(boards["flaky"][0], "silent")
    standins.set("flashtool", {"timeout": 0.3, "tries": 2, "retry_sleep": 0})
    rig_ebb_current(rig, farm)

    result = rig.daemon.ctl("update", "--all", "--wait", timeout=120)

    assert result.returncode == 1, result.stdout + result.stderr  # one board failed, one did not build
    states = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[-len(boards):]}
    assert states == {"octopus": "done", "spider": "done", "ebb": "skipped", "broken": "build",
                      "flaky": "failed", "wrongmcu": "build"}, result.stdout
    assert "error: 'CONFIG_CLOCK_FREQ' undeclared" in result.stdout
    assert "not staged: image is built for stm32f103xe but" in result.stdout, result.stdout
    assert farm.board(boards["wrongmcu"][0])["bootloader_requests"] == 0
    # One stop of Klipper for the whole batch, and Klipper runs at the end.
    verbs = [v for v in standins.systemctl_verbs() if v in ("stop", "start")]
    assert verbs == ["start", "stop", "start"], verbs  # the first start is the rig's own boot
    assert "Klipper stopped 1 time" in result.stdout
    assert rig.printer.running
    # The boards that needed it run the tree's new build, byte for byte; the others not.
    assert rig.board_runs_tree_build("octopus") and rig.board_runs_tree_build("spider")
    for name in ("octopus", "spider"):
        assert farm.board(BOARDS[name][0])["running_version"] == rig.version
    assert farm.board(ebb_serial)["bootloader_requests"] == 0
    order = list(dict.fromkeys(flash_order(standins, farm)))  # flashtool retries: once each
    assert order == [BOARDS["octopus"][0], boards["flaky"][0], BOARDS["spider"][0]], order
    assert farm.board(BOARDS["spider"][0])["bootloader_requests"] == 1
    # Builds ran as the tree's owner, one at a time, while Klipper was running.
    builds = [c for c in standins.calls("make") if not c.get("query") and "flash" not in c.get("targets", [])]
    assert {c["uid"] for c in builds} == {65534}
    stop_time = next(c["time"] for c in standins.calls("systemctl") if c.get("verb") == "stop")
    assert all(c["time"] < stop_time for c in builds)
    # The record: history shows the batch and its jobs; each job knows its batch.
    history = rig.daemon.ctl("history")
    assert "UPDATE" in history.stdout and "octopus done" in history.stdout, history.stdout
    jobs = rig.daemon.ctl_json("history")
    batch_ids = {j["batch"] for j in jobs}
    assert len(batch_ids) == 1 and None not in batch_ids
    (batch_id,) = batch_ids
    assert {j["board_name"]: j["state"] for j in jobs} == {"octopus": "done", "spider": "done", "flaky": "failed"}
    # The journal: one story per batch, and each job's within it.
    entries = journald.read(count=8, KFLASHD_BATCH=batch_id)
    assert any("update started" in e["MESSAGE"] for e in entries), entries
    assert {e.get("KFLASHD_JOB") for e in entries if e.get("KFLASHD_JOB")} == {j["id"] for j in jobs}
    # STATUS followed the batch board by board.
    statuses = notify_socket.statuses()
    assert any(re.fullmatch(r"Updating 1/6: octopus \d+%", s) for s in statuses), statuses
    assert any(re.fullmatch(r"Updating 3/6: spider \d+%", s) for s in statuses), statuses


def rig_ebb_current(rig: UpdateRig, farm) -> None:
    """Put the tree's current build on ebb (as if flashed after the last pull) and reboot it."""
    from kflashd import build, guard

    result = build.build_board("ebb-seed", str(rig.work / "ebb.config"), str(rig.tree), str(rig.work / "seed"),
                               60, 1 << 20)
    assert result.ok, result.message
    serial = BOARDS["ebb"][0]
    farm.load_flash(serial, result.image)
    farm.reset(serial, mode="klipper")
    wait_until(lambda: farm.board(serial)["running_version"] == rig.version, 10, "ebb to run the tree's version")
    by_path = farm.board(serial).get("by_path")
    wait_until(lambda: guard.query_mcu_version_for(str(rig.daemon.api_socket), serial, by_path) == rig.version,
               10, "Klipper to report ebb's version")


def test_update_order_and_sigterm_leave_klipper_running_and_the_rest_queued(rig_factory, farm, standins):
    boards = {name: BOARDS[name] for name in ("octopus", "spider")}
    rig = rig_factory(boards=boards)
    farm.set_fault(BOARDS["octopus"][0], "slow", bytes_per_second=2000)
    proc = rig.daemon.ctl_popen("update", "octopus", "spider", "--wait")
    wait_until(lambda: standins.calls("flashtool"), 60, "the first flash")

    rig.daemon.stop(signal.SIGTERM)

    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 5, out
    verbs = [v for v in standins.systemctl_verbs() if v in ("stop", "start")]
    assert verbs == ["start", "stop", "start"], verbs
    assert rig.printer.running
    assert flash_order(standins, farm) == [BOARDS["octopus"][0]]  # spider's never started
    assert farm.board(BOARDS["spider"][0])["bootloader_requests"] == 0
    # The next kflashd re-flashes octopus, cut off mid-write and waiting in Katapult; spider's
    # job stays queued until its board waits in Katapult (or the next update).
    rig.daemon.start()
    pending = {j["board_name"]: j for j in rig.daemon.ctl_json("list")}
    assert set(pending) <= {"octopus", "spider"} and pending["spider"]["state"] == "queued", pending
    octopus = next(j for j in rig.daemon.ctl_json("list") + rig.daemon.ctl_json("history")
                   if j["board_name"] == "octopus")
    rig.daemon.wait_job(octopus["id"], ["done"], timeout=60)
    assert [(j["board_name"], j["state"]) for j in rig.daemon.ctl_json("list")] == [("spider", "queued")]
    assert rig.board_runs_tree_build("octopus")


def test_a_print_started_during_the_builds_is_never_interrupted(rig_factory, farm, standins):
    boards = {name: BOARDS[name] for name in ("octopus",)}
    rig = rig_factory(boards=boards, timeouts={"guard_retry": 0.2},
                      kconfig_options={"octopus": {"kflashd_test_slow_ms": "100"}})
    refused = rig.daemon.ctl("update", "nosuch")
    assert refused.returncode == 2 and "unknown board 'nosuch'" in refused.stderr, refused.stderr
    proc = rig.daemon.ctl_popen("update", "octopus", "--wait", "--json")
    wait_until(lambda: [c for c in standins.calls("make") if c.get("targets") == []], 30, "the build")
    rig.daemon.set_printer(print_stats="printing", idle_timeout="Printing")

    wait_until(lambda: "waiting for printer" in rig.daemon.ctl("status").stdout, 30, "the update to wait")
    assert "stop" not in standins.systemctl_verbs()
    rig.daemon.set_printer()  # the print ends

    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    final = json.loads(out)  # --json: the update's record, for scripts
    assert final["state"] == "done" and final["klipper_stops"] == 1, final
    assert [(b["name"], b["state"]) for b in final["boards"]] == [("octopus", "done")]
    assert [v for v in standins.systemctl_verbs() if v in ("stop", "start")] == ["start", "stop", "start"]
    assert rig.board_runs_tree_build("octopus")
    assert rig.printer.running


def test_can_toolhead_first_the_bridge_carrying_its_bus_last(rig_factory, farm, standins):
    # A CAN printer: the mainboard is the USB-to-CAN bridge, the toolhead rides on can0,
    # and a USB board besides. Flashing the bridge takes can0 down: it goes last.
    boards = {"octopus": ("3A0029000851313433383932", "stm32f446xx", "bridge"),
              "spider": BOARDS["spider"],
              "ebb": ("0e0d81e4210c", "stm32g0b1xx", "can")}
    rig = rig_factory(boards=boards)

    result = rig.daemon.ctl("update", "--all", "--wait", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert [v for v in standins.systemctl_verbs() if v in ("stop", "start")] == ["start", "stop", "start"]
    # Order of the flash tool's runs: the toolhead over can0, the USB board, the bridge.
    targets = []
    for call in standins.calls("flashtool"):
        argv = call.get("argv", [])
        if call.get("firmware_sha256") or "-f" in argv:
            target = argv[argv.index("-u") + 1] if "-u" in argv else serial_from_by_id(argv[argv.index("-d") + 1])
            if target not in targets:
                targets.append(target)
    assert targets == ["0e0d81e4210c", BOARDS["spider"][0], boards["octopus"][0]], targets
    ebb = (rig.daemon.state_dir / "builds" / "ebb" / "out" / "klipper.bin").read_bytes()
    assert farm.can_flashed_image("0e0d81e4210c", len(padded(ebb))) == padded(ebb)
    assert farm.can_node("0e0d81e4210c")["running_version"] == rig.version
    assert rig.board_runs_tree_build("octopus") and rig.board_runs_tree_build("spider")
    assert rig.printer.running


def test_sigkill_mid_update_klipper_started_by_the_next_kflashd(rig_factory, farm, standins):
    boards = {name: BOARDS[name] for name in ("octopus", "spider")}
    rig = rig_factory(boards=boards)
    farm.set_fault(BOARDS["octopus"][0], "slow", bytes_per_second=2000)
    proc = rig.daemon.ctl_popen("update", "octopus", "spider", "--wait")
    wait_until(lambda: standins.calls("flashtool"), 60, "the first flash")

    rig.daemon.kill()  # SIGKILL: no finally runs; the crash marker says who stopped Klipper
    proc.communicate(timeout=30)
    assert not rig.printer.running

    before = len(standins.systemctl_verbs())
    rig.daemon.start()
    wait_until(lambda: rig.printer.running, 30, "the next kflashd to start Klipper")
    # Started at start-up, before anything else (not by a later cycle's stop and start).
    assert standins.systemctl_verbs()[before:][:1] == ["start"], standins.systemctl_verbs()
    history = rig.daemon.ctl("history")
    assert "interrupted" in history.stdout.split("UPDATE", 1)[1], history.stdout
    pending = {j["board_name"]: j["state"] for j in rig.daemon.ctl_json("list")}
    assert pending.get("spider") == "queued", pending


def test_update_wait_is_one_live_table_on_a_terminal(rig_factory, farm, standins):
    """On a terminal `update --wait` redraws one table (board, state, phase, percent) in place."""
    boards = {name: BOARDS[name] for name in ("octopus", "spider")}
    rig = rig_factory(boards=boards)
    farm.set_fault(BOARDS["octopus"][0], "slow", bytes_per_second=8000)
    returncode, text = rig.daemon.ctl_on_terminal("update", "--all", "--wait", cwd=rig.work)
    assert returncode == 0, text
    redraws = text.count("\x1b[4F")  # the header, two boards and Klipper's line, redrawn
    assert redraws >= 5, text
    rows = re.findall(r"octopus\s+flashing\s+(?:flashing|verifying) (\d+)%", text)
    assert len(rows) >= 3, text
    assert "update " in text and "done: 2 done (Klipper stopped 1 time)" in text, text


def test_a_board_not_known_to_run_katapult_is_not_sent_to_it(rig_factory, farm, standins):
    # spider runs Klipper, kflashd has never seen it in Katapult and its table does not say
    # `katapult = true`: a reboot request could leave it in its ROM bootloader. It is refused
    # before the stop; octopus is still flashed in the one stop.
    boards = {name: BOARDS[name] for name in ("octopus", "spider")}
    rig = rig_factory(boards=boards, katapult_unknown=("spider",))

    result = rig.daemon.ctl("update", "--all", "--wait", timeout=120)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "never seen board spider in Katapult" in result.stdout, result.stdout
    assert farm.board(BOARDS["spider"][0])["bootloader_requests"] == 0
    assert rig.board_runs_tree_build("octopus")
    assert [v for v in standins.systemctl_verbs() if v in ("stop", "start")] == ["start", "stop", "start"]
    assert rig.printer.running
