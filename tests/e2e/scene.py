"""The fault tests' scene: a started daemon, a running "Klipper" and a bystander job.

Shared by test_faults.py, test_crash.py and test_disk.py (the `scene` fixture that builds
one is in conftest.py), so that no test module imports another.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from tests.e2e.conftest import MCU, SERIAL, Printer
from tests.e2e.harness import KflashdProcess, wait_until
from tests.e2e.reliability import record
from tests.farm.images import make_dict, make_image

#: A second board's serial: a job is queued for it in every test, and it never shows up.
BYSTANDER = "5B0033000D51303439363932"

#: Job states a staged job may sensibly end a fault in (never lost, never stuck "running").
SENSIBLE = ("queued", "done", "failed", "interrupted")


def write_image(directory: Path, size: int = 5000, seed: int = 7, version: str = "v0.13.0-99-gfeedbee") -> Path:
    """A klipper.bin with its klipper.dict, as Klipper's build leaves them in out/."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "klipper.bin"
    path.write_bytes(make_image(mcu=MCU, version=version, size=size, seed=seed))
    (directory / "klipper.dict").write_text(make_dict(mcu=MCU, version=version))
    return path


class Scene:
    """A started daemon with a running "Klipper" and a bystander job for another board."""

    def __init__(self, daemon: KflashdProcess, printer: Printer, standins, farm) -> None:
        self.daemon = daemon
        self.printer = printer
        self.standins = standins
        self.farm = farm
        path = write_image(daemon.workdir / "bystander", seed=11, version="v-bystander")
        self.bystander_image = path.read_bytes()
        self.bystander = daemon.queue(BYSTANDER, str(path))

    # -- the three promises, each returning what it saw (for the matrix) ------------------

    def klipper_running(self) -> str:
        wait_until(lambda: self.printer.running, 15, "Klipper (the fake klippy) running again")
        return (f"running (unit {self.standins.unit_state('klipper')}, "
                f"pid {self.standins.unit_pid('klipper')} alive)")

    def nothing_lost(self, *job_ids: str) -> Dict[str, Dict[str, Any]]:
        """The bystander is queued with its image intact; every other job is in a sane state."""
        bystander = self.daemon.job(self.bystander)
        assert bystander["state"] == "queued", bystander
        staged = self.daemon.state_dir / "images" / f"{self.bystander}.bin"
        assert staged.read_bytes() == self.bystander_image, "the bystander's staged image changed"
        jobs = {}
        for job_id in job_ids:
            job = self.daemon.job(job_id)
            assert job["state"] in SENSIBLE, job
            jobs[job_id] = job
        return jobs

    def log_line(self, *needles: str, timeout: float = 10) -> str:
        """The first line of the daemon's log holding every needle (the log is its stderr)."""

        def find() -> Optional[str]:
            for line in self.daemon.log().splitlines():
                if all(n in line for n in needles):
                    return re.sub(r"^<\d>", "", line).strip()
            return None

        return wait_until(find, timeout, f"a log line with {needles!r}")

    def record(self, fault: str, injected: str, klipper: str, job: Dict[str, Any], evidence: str) -> None:
        record(fault=fault, injected=injected, klipper=klipper,
               job=f"{job['state']}: {job['message']}",
               evidence=f"{evidence}; bystander job {self.bystander} still queued, image intact")


def flashing_percent(notify_socket, at_least: int = 10, timeout: float = 20) -> int:
    """Wait until STATUS shows the write phase at `at_least` percent or more; return it."""
    pattern = re.compile(r"Flashing \S+ via katapult: (\d+)%")

    def far_enough(message: str) -> bool:
        m = pattern.search(message)
        return bool(m) and int(m.group(1)) >= at_least

    return int(pattern.search(notify_socket.wait_for(far_enough, timeout=timeout)).group(1))


def slow_flash(s: "Scene", farm, notify_socket, seed: int, version: str) -> Tuple[str, Path, int]:
    """A board in Katapult that answers slowly, a job flashing it, the write phase under way:
    (job id, image path, the percentage STATUS showed)."""
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    farm.set_fault(SERIAL, "slow", bytes_per_second=1000)
    path = write_image(s.daemon.workdir / "big", size=20000, seed=seed, version=version)
    job_id = s.daemon.queue(SERIAL, str(path))
    return job_id, path, flashing_percent(notify_socket, 2)
