"""pytest fixtures and helpers for the emulated board farm.

``farm``: a fresh controller and testbed per test, stopped afterwards; on a failing test
the controller's log is printed (pytest shows it with the failure).

``write_klipper_unit()``: make the stand-in ``systemctl`` start ``fake_klipper`` for a unit
(``$KFLASHD_STANDIN_DIR/units/<unit>.exec`` holds the JSON argv list).
``write_printer_state()``: the "printing" switch the fake Klipper re-reads per request.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import pytest

from tests.farm.client import BoardFarm

FAKE_KLIPPER = Path(__file__).resolve().with_name("fake_klipper.py")


@pytest.fixture
def farm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BoardFarm]:
    """A running board farm (no boards yet); ``farm.env`` goes into the daemon's environment."""
    board_farm = BoardFarm.start(tmp_path / "farm")
    try:
        yield board_farm
    finally:
        board_farm.stop()
        print(f"--- farm controller log ({board_farm.log_path}) ---\n{board_farm.log_text()}")


def fake_klipper_argv(api_socket: Union[str, Path], state_file: Union[str, Path],
                      log: Optional[Union[str, Path]] = None, python: Optional[str] = None,
                      extra: Sequence[str] = ()) -> List[str]:
    """The command line that runs the fake Klipper service (`-a` as klippy.py has it)."""
    argv = [python or sys.executable, str(FAKE_KLIPPER), "-a", str(api_socket),
            "--state-file", str(state_file)]
    if log is not None:
        argv += ["--log", str(log)]
    return argv + list(extra)


def write_klipper_unit(standin_dir: Union[str, Path], api_socket: Union[str, Path],
                       state_file: Union[str, Path], unit: str = "klipper",
                       log: Optional[Union[str, Path]] = None, python: Optional[str] = None,
                       extra: Sequence[str] = (), env_file: Optional[Union[str, Path]] = None) -> Path:
    """Write ``<standin_dir>/units/<unit>.exec`` so ``systemctl start <unit>`` runs fake_klipper,
    and ``<unit>.service`` so ``systemctl show <unit>`` has its ExecStart (with ``-a``).

    With ``env_file`` the arguments go there as KIAUH writes them (``KLIPPER_ARGS="..."``,
    ``ExecStart=PYTHON $KLIPPER_ARGS``). ``unit`` may be given with or without
    ``.service``. Returns the .exec path.
    """
    name = unit[:-len(".service")] if unit.endswith(".service") else unit
    units = Path(standin_dir) / "units"
    units.mkdir(parents=True, exist_ok=True)
    path = units / f"{name}.exec"
    argv = fake_klipper_argv(api_socket, state_file, log, python, extra)
    path.write_text(json.dumps(argv) + "\n")
    if env_file is None:
        service = f"[Service]\nExecStart={' '.join(argv)}\n"
    else:
        Path(env_file).write_text(f'KLIPPER_ARGS="{" ".join(argv[1:])}"\n')
        service = f"[Service]\nEnvironmentFile={env_file}\nExecStart={argv[0]} $KLIPPER_ARGS\n"
    (units / f"{name}.service").write_text(service)
    return path


def write_printer_state(state_file: Union[str, Path], print_stats: str = "standby", idle_timeout: str = "Idle",
                        hang: bool = False, **extra: object) -> None:
    """Set what the fake Klipper reports (``print_stats="printing"``, ``hang=True``, ...)."""
    state = {"print_stats": print_stats, "idle_timeout": idle_timeout, "hang": hang, **extra}
    path = Path(state_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)  # atomic: the fake Klipper never reads half a file
