"""Fixtures of the booted-host tests: a printer host booted once per module.

``printer_host``: one Debian host (systemd PID 1) with a KIAUH layout, the emulated board
farm inside, Klipper running, and kflashd installed by the README's own command,
``sudo ./install.sh`` run by pi in the clone. The tests of ``test_host.py`` share it and
run in file order (install, use, crash, uninstall), as an admin would on one host.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
import subprocess
from typing import Iterator, Optional, Set

import pytest

from tests.farm.client import BoardFarm
from tests.host import printer_host as ph
from tests.host.machine import Machine
from tests.host.rootfs import ensure_rootfs

INSTALL_TIMEOUT = 300.0


@dataclass
class Host:
    machine: Machine
    farm: BoardFarm
    workdir: Path
    before_install: Set[str]
    groups_before: str
    install: subprocess.CompletedProcess
    install_seconds: float

    def ctl(self, *args: str, user: str = ph.USER, check: bool = True, timeout: float = 60.0):
        return self.machine.run(["kflashctl", *args], user=user, check=check, timeout=timeout)


def boot_printer_host(workdir: Path, count: int, with_farm: bool = True) -> tuple:
    machine = Machine(ensure_rootfs(), workdir).boot()
    try:
        ph.provision(machine, count=count)
        farm = ph.start_farm(machine, workdir) if with_farm else None
    except BaseException:
        machine.shutdown()
        raise
    return machine, farm


def teardown(machine: Machine, farm: Optional[BoardFarm]) -> None:
    try:
        if farm is not None:
            farm.stop()
    finally:
        machine.shutdown()
        print(f"--- console ({machine.console_log}) ---\n{machine.console()}")
        if farm is not None:
            print(f"--- farm controller log ---\n{farm.log_text()[-3000:]}")
        if not machine.mounted:
            shutil.rmtree(machine.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def printer_host() -> Iterator[Host]:
    workdir = Path(tempfile.mkdtemp(prefix="kflashd-host-"))
    machine, farm = boot_printer_host(workdir, count=1)
    try:
        ph.install_dropins(machine, farm, ["klipper", "kflashd"])
        machine.run(["systemctl", "enable", "--now", "klipper.service"])
        machine.wait_unit("klipper.service")
        machine.run(["systemctl", "enable", "--now", "moonraker.service"])
        before = ph.file_list(machine)
        groups = machine.run(["getent", "group"]).stdout
        started = time.monotonic()
        result = machine.run(["sudo", "./install.sh"], user=ph.USER, cwd=ph.CLONE, check=False,
                             timeout=INSTALL_TIMEOUT)
        host = Host(machine, farm, workdir, before, groups, result, time.monotonic() - started)
        yield host
    finally:
        if machine.leader:
            print(f"--- journalctl -u kflashd -u klipper ---\n"
                  f"{machine.journal('-u', 'kflashd', '-u', 'klipper', '-n', '120')}")
            klippy_log = machine.run("tail -n 40 ~pi/printer_data/logs/klippy.log", check=False).stdout
            print(f"--- klippy.log ---\n{klippy_log}")
        teardown(machine, farm)


@dataclass
class MultiInstanceHost:
    machine: Machine
    install: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def multi_instance_host() -> Iterator[MultiInstanceHost]:
    """KIAUH's multi-instance layout: klipper-1 and klipper-2, each with printer_N_data, both
    running; kflashd installed by root itself (no sudo, so no SUDO_USER to fall back on)."""
    workdir = Path(tempfile.mkdtemp(prefix="kflashd-multi-"))
    machine, _ = boot_printer_host(workdir, count=2, with_farm=False)
    try:
        for unit, _data in ph.instances(2):
            machine.run(["systemctl", "enable", "--now", f"{unit}.service"])
            machine.wait_unit(f"{unit}.service")
        result = machine.run(["./install.sh", "--offline"], cwd=ph.CLONE, check=False, timeout=INSTALL_TIMEOUT)
        yield MultiInstanceHost(machine, result)
    finally:
        if machine.leader:
            print(f"--- journalctl -u kflashd ---\n{machine.journal('-u', 'kflashd', '-n', '60')}")
        teardown(machine, None)
