"""The no-hardware demo: one emulated board, the real daemon, the whole cycle live.

Run it with `./scripts/demo` (no root needed once scripts/setup has its Debian packages).
Nothing on this machine is stopped or flashed: the board is a umockdev device with a Katapult
bootloader emulator behind its tty, "Klipper" is a stand-in service process that holds the
board's port, and systemctl/make are the test suite's stand-ins. Everything lives in a
temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.harness import REPO, KflashdProcess
from tests.farm.client import BoardFarm
from tests.farm.fixtures import write_klipper_unit
from tests.farm.images import make_dict, make_image
from tests.standins.fixtures import Standins

SERIAL = "3A0029000851313433383932"
MCU = "stm32f446xx"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def run_ctl(daemon: KflashdProcess, *args: str) -> None:
    print(f"$ kflashctl {' '.join(args)}", flush=True)
    result = daemon.ctl(*args)
    sys.stdout.write(result.stdout + result.stderr)
    sys.stdout.flush()


def show_log(path: Path) -> None:
    """The daemon's log as `journalctl -u kflashd` would show it; the tool's own output folded.

    Paths inside the checkout are shown relative to it (`./.venv/bin/python3`): the demo is
    run from there, and the output (pasted into the README) then names no one's directory.
    """
    print("$ journalctl -u kflashd   # here: the daemon's stderr, which systemd sends to the journal")
    folded = 0
    for raw in path.read_text(errors="replace").splitlines():
        line = raw[3:] if raw[:1] == "<" and raw[2:3] == ">" else raw
        if folded or line.endswith("succeeded; output:") or line.endswith("failed; output:"):
            folded += 1
            if line == "Programming Complete" or line.startswith("flashed "):
                print(f"   ({folded - 1} lines of flashtool.py output)")
                folded = 0
                if line == "Programming Complete":
                    continue
            else:
                continue
        print(f"kflashd: {line.replace(f'{REPO}/', './')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kflashd-demo-"))
    os.chmod(workdir, 0o755)
    standin_dir = workdir / "standins"
    standin_dir.mkdir()
    os.chmod(standin_dir, 0o777)
    standins = Standins(str(standin_dir))
    farm = daemon = None
    try:
        say("Starting an emulated board farm (umockdev: fake /sys, /dev and udev events)")
        farm = BoardFarm.start(workdir / "farm")
        daemon = KflashdProcess(workdir, farm.env, standin_dir,
                                boards={"octopus": {"serial": SERIAL, "mcu": MCU}})
        write_klipper_unit(standin_dir, daemon.api_socket, daemon.printer_state, log=workdir / "klipper.log")
        env = {k: v for k, v in daemon.env.items() if k != "NOTIFY_SOCKET"}
        subprocess.run(["systemctl", "start", "klipper"], env=env, check=True, timeout=30)
        print(f"   a stand-in \"klipper\" service is running; config: {daemon.config_path}")

        say("Starting kflashd (the same daemon systemd runs)")
        daemon.start()
        run_ctl(daemon, "devices")

        say("Building firmware (a stand-in klipper.bin and klipper.dict for stm32f446xx)")
        out = workdir / "klipper" / "out"
        out.mkdir(parents=True, exist_ok=True)
        image = make_image(mcu=MCU, version="v0.13.0-142-gc0ffee1", size=24000, seed=1)
        (out / "klipper.bin").write_bytes(image)
        (out / "klipper.dict").write_text(make_dict(mcu=MCU, version="v0.13.0-142-gc0ffee1"))
        print(f"   {out / 'klipper.bin'}: {len(image)} bytes")

        say("Queueing it for the board named octopus, and following the job")
        argv = ["queue", "octopus", str(out / "klipper.bin"), "--wait"]
        print(f"$ kflashctl {' '.join(argv)}", flush=True)
        queue = daemon.ctl_popen(*argv)
        assert queue.stdout is not None
        plugged = False
        for line in queue.stdout:
            print(line.rstrip(), flush=True)
            if line.startswith("waiting for") and not plugged:
                plugged = True
                time.sleep(1.0)  # let the reader see the job wait
                say("Double-tapping reset: the board enumerates as 1d50:6177 (Katapult)")
                farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
                farm.set_fault(SERIAL, "slow", bytes_per_second=12000)  # let the progress show
        code = queue.wait(30)

        say("Afterwards")
        run_ctl(daemon, "history")
        run_ctl(daemon, "status")
        board = farm.board(SERIAL)
        flashed = farm.flashed_image(SERIAL, len(image))
        print(f"\n   the board is back in {board['mode']} mode on {board['device_node']}, running "
              f"{board['running_version']}; flash holds the image byte for byte: {flashed == image}")
        klipper_pid = standins.unit_pid("klipper")
        print(f"   the stand-in klipper service is {standins.unit_state('klipper')} (pid {klipper_pid})")
        say("What the daemon logged")
        show_log(daemon.log_path)
        return code
    finally:
        if daemon is not None:
            daemon.stop()
        standins.cleanup()
        if farm is not None:
            farm.stop()
        if args.keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
