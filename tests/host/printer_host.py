"""Turn a booted ``Machine`` into a printer host laid out as KIAUH leaves one.

User ``pi`` (groups dialout and sudo, passwordless sudo as on Raspberry Pi OS), a clone of
this checkout in ``~/kflashd``, a Katapult tree (the stand-in ``flashtool.py`` that speaks
the real protocol), a Klipper tree with a built ``out/klipper.bin``, and one
``klipper.service`` per instance written the way KIAUH writes it (``User=pi``,
``EnvironmentFile=~/printer_N_data/systemd/klipper.env`` whose ``KLIPPER_ARGS`` name the
API socket with ``-a``). ``klippy.py`` in the tree is a launcher for the farm's stand-in
Klipper (``tests/farm/fake_klipper.py``), which serves the API socket and holds the ports
of the emulated boards.

The emulated boards live in a umockdev testbed owned by a farm controller that runs inside
the machine; test-only drop-ins give ``klipper*.service`` and ``kflashd.service`` its
preload. They are the only things the tests add to the installed unit.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Set, Tuple

from tests.farm.client import BoardFarm
from tests.farm.images import make_dict, make_image
from tests.host.machine import Machine

REPO = Path(__file__).resolve().parents[2]
USER = "pi"
HOME = f"/home/{USER}"
CLONE = f"{HOME}/kflashd"
OUTSIDER = "eve"  # a user outside group kflash
MCU = "stm32f446xx"
TESTBED_PARENT = "/srv/kflashd-testbed"  # not /tmp: kflashd.service has PrivateTmp=yes
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache")

KLIPPY_LAUNCHER = '''#!/usr/bin/env python3
"""Stand-in for Klipper's klippy.py: takes klippy's arguments, runs the test farm's fake Klipper."""
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("-a", dest="api_socket", required=True)
p.add_argument("-l", dest="log")
p.add_argument("-I", dest="input_tty")
args = p.parse_args()
data = os.path.dirname(os.path.dirname(args.api_socket))
fake = os.path.join(os.path.expanduser("~"), "kflashd", "tests", "farm", "fake_klipper.py")
argv = [sys.executable, fake, "--api-socket", args.api_socket, "--state-file", os.path.join(data, "printer-state.json")]
if args.log:
    argv += ["--log", args.log]
os.execv(sys.executable, argv)
'''

KLIPPER_UNIT = """[Unit]
Description=Klipper 3D Printer Firmware SV1
Documentation=https://www.klipper3d.org/
After=network-online.target
Wants=udev.target

[Install]
WantedBy=multi-user.target

[Service]
Type=simple
User={user}
RemainAfterExit=yes
WorkingDirectory={home}/klipper
EnvironmentFile={home}/{data}/systemd/klipper.env
ExecStart=/usr/bin/python3 $KLIPPER_ARGS
Restart=always
RestartSec=10
"""

MOONRAKER_UNIT = """[Unit]
Description=stand-in for another service of the Klipper user (the daemon may not touch it)

[Service]
User=pi
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""


def instances(count: int) -> List[Tuple[str, str]]:
    """(unit, printer data dir) as KIAUH names them: one plain instance, or klipper-N."""
    if count == 1:
        return [("klipper", "printer_data")]
    return [(f"klipper-{n}", f"printer_{n}_data") for n in range(1, count + 1)]


def provision(machine: Machine, count: int = 1, firmware_version: str = "v0.13.0-7-gc0ffee1") -> None:
    """Users, trees, Klipper units (not started), the clone; and a sudo that works."""
    m = machine
    m.run(f"useradd -m -s /bin/bash -G dialout,sudo {USER} && useradd -m -s /bin/bash {OUTSIDER}")
    m.write(f"/etc/sudoers.d/010_{USER}-nopasswd", f"{USER} ALL=(ALL) NOPASSWD: ALL\n", mode=0o440)
    # The host's trust store: what lets pip inside reach the package index from here.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", m.path("/etc/ssl/certs/ca-certificates.crt"))
    shutil.copytree(REPO, m.path(CLONE), ignore=COPY_IGNORE)
    shutil.copytree(REPO / "tests" / "standins" / "katapult", m.path(f"{HOME}/katapult"), ignore=COPY_IGNORE)
    out = m.path(f"{HOME}/klipper/out")
    out.mkdir(parents=True)
    (out / "klipper.bin").write_bytes(make_image(mcu=MCU, version=firmware_version, size=6000, seed=12))
    (out / "klipper.dict").write_text(make_dict(mcu=MCU, version=firmware_version))
    m.write(f"{HOME}/klipper/klippy/klippy.py", KLIPPY_LAUNCHER, mode=0o755)
    for unit, data in instances(count):
        base = f"{HOME}/{data}"
        for sub in ("comms", "config", "logs", "systemd"):
            m.path(f"{base}/{sub}").mkdir(parents=True, exist_ok=True)
        m.write(f"{base}/config/printer.cfg", "[mcu]\nserial: /dev/serial/by-id/usb-Klipper_stm32f446xx\n")
        m.write(f"{base}/printer-state.json", json.dumps({"print_stats": "standby", "idle_timeout": "Ready"}))
        m.write(f"{base}/systemd/klipper.env",
                f'KLIPPER_ARGS="{HOME}/klipper/klippy/klippy.py {base}/config/printer.cfg '
                f'-I {base}/comms/klippy.serial -l {base}/logs/klippy.log -a {base}/comms/klippy.sock"\n')
        m.write(f"/etc/systemd/system/{unit}.service", KLIPPER_UNIT.format(user=USER, home=HOME, data=data))
    # Another service of pi's that the daemon must never touch.
    m.write("/etc/systemd/system/moonraker.service", MOONRAKER_UNIT)
    m.run(f"chown -R {USER}:{USER} {HOME} && chmod 0755 {HOME}")
    m.run('echo "127.0.1.1 $(hostname)" >> /etc/hosts')  # sudo resolves the host name
    # The boards' ttys: root:dialout 0660 as udev makes them (the farm's are PTYs).
    m.run("mount -o remount,gid=$(getent group dialout | cut -d: -f3),mode=0660 /dev/pts")
    m.run(["sudo", "-n", "true"], user=USER)  # sudo's first-use files exist before any snapshot


def start_farm(machine: Machine, workdir: Path) -> BoardFarm:
    """A farm controller inside the machine; its testbed where the sandboxed daemon can bind."""
    machine.run(["mkdir", "-p", "-m", "0755", TESTBED_PARENT])
    log_path = workdir / "farm-controller.log"
    with open(log_path, "ab") as log:
        # umask 0: the testbed's sockets (uevents, tty ioctls) must admit pi's processes too.
        proc = machine.popen(
            ["/bin/sh", "-c", 'umask 0 && exec "$@"', "farm",
             "umockdev-wrapper", "/usr/bin/python3", "-m", "tests.farm.controller"],
            env={"PYTHONPATH": CLONE, "TMPDIR": TESTBED_PARENT, "PYTHONUNBUFFERED": "1",
                 "PYTHONDONTWRITEBYTECODE": "1"},
            cwd=CLONE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    farm = BoardFarm.attach(proc, log_path)
    # The daemon (user pi) binds its uevent socket in the testbed directory.
    machine.run(["chmod", "0777", farm.root_dir])
    return farm


def preload_dropin(farm: BoardFarm, writable: bool = False) -> str:
    """A test-only drop-in: the unit's processes see the emulated boards."""
    lines = ["# test only: the umockdev-emulated boards (tests/host)", "[Service]",
             f"Environment=LD_PRELOAD={farm.ld_preload}", f"Environment=UMOCKDEV_DIR={farm.root_dir}"]
    if writable:
        lines.append(f"ReadWritePaths={farm.root_dir}")
    return "\n".join(lines) + "\n"


def install_dropins(machine: Machine, farm: BoardFarm, units: List[str]) -> None:
    for unit in units:
        path = f"/etc/systemd/system/{unit}.service.d/50-test-umockdev.conf"
        machine.write(path, preload_dropin(farm, writable=unit == "kflashd"))
    machine.run(["systemctl", "daemon-reload"])


def board_config(serial: str, name: str = "octopus", extra: Optional[str] = None) -> str:
    """The config an admin writes after the install (the example file has every key commented)."""
    return (f"[katapult]\n# umockdev's PTYs refuse 250000 baud\nbaud = 115200\n{extra or ''}\n"
            f"[boards.{name}]\nserial = \"{serial}\"\nmcu = \"{MCU}\"\n")


# What changes on any running host and is nobody's install: logs, caches, runtime state of
# systemd and the test equipment itself.
NOISE = ("/proc", "/sys", "/dev", "/tmp", "/var/tmp", "/var/log", "/var/cache", "/var/lib/systemd",
         "/run/systemd", "/run/user", "/run/log", "/run/dbus", "/run/udev", "/run/sudo", "/run/mount",
         "/run/lock", "/run/utmp", "/run/host", "/run/credentials", "/run/nologin",
         "/var/lib/polkit-1", "/etc/.pwd.lock", "/etc/group-", "/etc/gshadow-", TESTBED_PARENT,
         f"{HOME}/printer_data/logs")


def file_list(machine: Machine) -> Set[str]:
    """Every path on the machine's own file systems and /run, minus NOISE and byte-code."""
    out = machine.run("find / /run -xdev 2>/dev/null; true", timeout=60).stdout.splitlines()
    return {path for path in out
            if "/__pycache__" not in path and not any(path == n or path.startswith(n + "/") for n in NOISE)}
