"""End-to-end fixtures: a daemon under test, wired to the farm, the stand-ins and systemd bits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, List

import pytest

from tests.e2e.harness import REPO, KflashdProcess, wait_until
from tests.support import public
from tests.farm.fixtures import write_klipper_unit
from tests.farm.images import make_dict, make_image

SERIAL = "3A0029000851313433383932"
MCU = "stm32f446xx"


def padded(data: bytes, block: int = 64) -> bytes:
    """The image as the board holds it: padded with 0xFF to whole blocks."""
    return data + b"\xff" * (-len(data) % block)


class Printer:
    """The "Klipper service" the stand-in systemctl runs: a fake klippy holding the ports."""

    def __init__(self, standins, daemon: KflashdProcess, unit: str = "klipper", **options) -> None:
        """`options`: api_socket, state_file (default: the daemon's), and write_klipper_unit's
        extra (fake_klipper options) and env_file (KIAUH's klipper.env layout)."""
        self.standins = standins
        self.daemon = daemon
        self.unit = unit
        self.api_socket = options.pop("api_socket", daemon.api_socket)
        self.state_file = options.pop("state_file", daemon.printer_state)
        self.log_path = daemon.workdir / f"{unit}.log"
        write_klipper_unit(standins.dir, self.api_socket, self.state_file, unit=unit,
                           log=self.log_path, **options)

    def start(self) -> None:
        """Start "Klipper" the way the host would at boot (not recorded as the daemon's doing)."""
        import subprocess

        env = {k: v for k, v in self.daemon.env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        subprocess.run(["systemctl", "start", self.unit], env=env, check=True,
                       capture_output=True, timeout=30, cwd=str(REPO))

    def guard_queries(self) -> int:
        """How often the print guard has asked this Klipper (fake_klipper logs each question)."""
        try:
            return self.log_path.read_text(errors="replace").count("guard query")
        except FileNotFoundError:
            return 0

    @property
    def running(self) -> bool:
        from tests.standins.fixtures import pid_alive

        pid = self.standins.unit_pid(self.unit)
        return self.standins.unit_state(self.unit) == "active" and pid is not None and pid_alive(pid)


@pytest.fixture
def make_daemon(tmp_path, farm, standins, notify_socket) -> Iterator:
    """Factory: make_daemon(**KflashdProcess options) -> started daemon (READY=1 seen)."""
    started: List[KflashdProcess] = []

    def factory(start: bool = True, **options) -> KflashdProcess:
        options.setdefault("notify_socket", notify_socket.address)
        daemon = KflashdProcess(tmp_path / f"d{len(started)}" if started else tmp_path, farm.env,
                                standins.dir, **options)
        started.append(daemon)
        if start:
            daemon.start_ready(notify_socket)
        return daemon

    yield factory
    for daemon in started:
        try:
            daemon.stop()
        except AssertionError:
            pass
        # Shown by pytest only when the test failed: the daemon's own words.
        print(f"----- kflashd log ({daemon.workdir}) -----\n{daemon.log()}")


def start_slow_flash(make_daemon, farm, standins, notify_socket):
    """A board writing slowly (1000 bytes/s) with a 30 KB image, Klipper stopped, the flash
    past 0 %: the moment the crash and interruption tests cut in.
    Returns (daemon, printer, job id, image bytes)."""
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=1000)
    daemon = make_daemon()
    printer = Printer(standins, daemon)
    printer.start()
    big = make_image(mcu=MCU, version="v-big", size=30000, seed=4)
    path = daemon.workdir / "big.bin"
    path.write_bytes(big)
    job_id = daemon.queue(SERIAL, str(path))
    notify_socket.wait_for(lambda m: "Flashing" in m and "%" in m and not m.endswith(": 0%"), timeout=20)
    return daemon, printer, job_id, big


def wait_for_board_facts(daemon: KflashdProcess, serial: str = SERIAL) -> dict:
    """Wait until the daemon has read the board's Katapult (state_dir/boards.json); its entry."""
    import json

    from tests.support.wait import wait_until

    path = daemon.state_dir / "boards.json"

    def entry():
        if not path.exists():
            return None
        found = json.loads(path.read_text())["boards"].get(serial) or {}
        return found if found.get("app_start") is not None else None

    return wait_until(entry, 10, f"the daemon to read board {serial}'s Katapult")


@pytest.fixture
def image(tmp_path):
    """A klipper.bin for the default board, with its klipper.dict beside it."""
    out = tmp_path / "out"
    out.mkdir()
    data = make_image(mcu=MCU, version="v0.13.0-99-gfeedbee", size=5000, seed=7)
    (out / "klipper.bin").write_bytes(data)
    (out / "klipper.dict").write_text(make_dict(mcu=MCU, version="v0.13.0-99-gfeedbee"))
    return out / "klipper.bin"


@pytest.fixture
def scene(make_daemon, farm, standins) -> Iterator:
    """Factory: scene(**make_daemon options) -> Scene with Klipper running and a bystander job."""

    from tests.e2e.scene import Scene

    def factory(**options: Any) -> Scene:
        daemon = make_daemon(**options)
        printer = Printer(standins, daemon)
        printer.start()
        wait_until(lambda: printer.running, 10, "the fake Klipper to run")
        return Scene(daemon, printer, standins, farm)

    yield factory


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A workdir nobody may enter (pytest's tmp_path is root-only) but not write."""
    yield from public.open_dir("kflashd-hostile-")
