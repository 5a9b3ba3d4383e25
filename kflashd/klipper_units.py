"""What systemd says about Klipper's units: their state, their command line (where
klippy's `-a` names the API socket) and, on a KIAUH multi-instance host, which they are.

Only reads: one `systemctl show` for all units (no privileges needed), the units'
EnvironmentFiles, and unit files on disk for discovery. kflashd/instances.py turns these
facts into the sockets the print guard asks and the verdict.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import proc

TIMEOUT_SHOW = 5.0  # seconds for one `systemctl show`
NOT_RUNNING_STATES = ("inactive", "failed")

_log = logging.getLogger("kflashd.klipper_units")


@dataclass(frozen=True)
class UnitFacts:
    """What `systemctl show` said about one unit. `active_state` None: it could not say."""

    active_state: Optional[str] = None
    exec_start: List[List[str]] = field(default_factory=list)  # argv per ExecStart=, $VARS unexpanded
    env_files: List[str] = field(default_factory=list)
    environment: Dict[str, str] = field(default_factory=dict)
    # "exited" with main pid 0: KIAUH's units have RemainAfterExit=yes, so a klippy that
    # exited leaves them "active" with no process at all.
    sub_state: Optional[str] = None
    main_pid: Optional[int] = None

    @property
    def not_running(self) -> Optional[str]:
        """Why systemd says nothing of this instance runs, or None (it may run)."""
        if self.active_state in NOT_RUNNING_STATES:
            return self.active_state
        if self.active_state == "active" and self.sub_state == "exited" and self.main_pid == 0:
            return "active but exited (no process: RemainAfterExit=yes)"
        return None


def unit_name(service: str) -> str:
    return service if "." in service else service + ".service"


# ---------------------------------------------------------------- systemctl show ----------

_EXEC_ARGV = re.compile(r"argv\[\]=(.*?) ; ")


def parse_show(text: str, count: int) -> List[UnitFacts]:
    """Split `systemctl show UNIT...` output (blocks separated by blank lines) into facts."""
    blocks: List[Dict[str, List[str]]] = []
    current: Dict[str, List[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    if current:
        blocks.append(current)
    if len(blocks) != count:
        raise ValueError(f"expected {count} unit(s), got {len(blocks)}")
    facts = []
    for block in blocks:
        argvs = []
        for value in block.get("ExecStart", []):
            match = _EXEC_ARGV.search(value)
            if match:
                argvs.append(match.group(1).split())
        env_files = []
        for value in block.get("EnvironmentFiles", []):
            path = re.sub(r" \(ignore_errors=\w+\)$", "", value)
            if path:
                env_files.append(path)
        environment: Dict[str, str] = {}
        for value in block.get("Environment", []):
            for word in value.split():
                name, eq, val = word.partition("=")
                if eq:
                    environment[name] = val
        state = (block.get("ActiveState") or [""])[-1] or None
        sub = (block.get("SubState") or [""])[-1] or None
        pid = (block.get("MainPID") or [""])[-1]
        facts.append(UnitFacts(state, argvs, env_files, environment, sub, int(pid) if pid.isdigit() else None))
    return facts


def show_units(services: Sequence[str], timeout: float = TIMEOUT_SHOW) -> Dict[str, UnitFacts]:
    """One `systemctl show` for all units; a unit systemctl could not tell about gets
    UnitFacts() (state unknown), which the guard treats as "may be running"."""
    units = [unit_name(s) for s in services]
    argv = ["systemctl", "show", "-p", "ActiveState,SubState,MainPID,ExecStart,EnvironmentFiles,Environment", *units]
    unknown = {s: UnitFacts() for s in services}
    try:
        result = proc.run(argv, timeout)
    except OSError as e:
        _log.warning(f"systemctl show could not be run: {e}")
        return unknown
    if not result.ok:
        _log.warning(f"systemctl show {' '.join(units)}: {result.describe_failure()}: {result.stderr.strip()}")
        return unknown
    try:
        facts = parse_show(result.stdout, len(units))
    except ValueError as e:
        _log.warning(f"systemctl show {' '.join(units)}: unreadable answer ({e})")
        return unknown
    return dict(zip(services, facts))


# ---------------------------------------------------------------- the -a argument ----------


def read_env_file(path: str) -> Dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (comments, quotes, `\\` continuations)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    env: Dict[str, str] = {}
    text = re.sub(r"\\\n", "", text)
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def expand(argv: Sequence[str], env: Dict[str, str]) -> List[str]:
    """systemd's ExecStart expansion: a word `$VAR` becomes the value split at whitespace,
    `${VAR}` inside a word is replaced as it is (systemd.service(5), "Command lines")."""
    out: List[str] = []
    for word in argv:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out += env.get(whole.group(1), "").split()
            continue
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return out


def api_socket_from_argv(argv: Sequence[str]) -> Optional[str]:
    """klippy.py's API socket option: `-a PATH`, `-aPATH`, `--api-server[=]PATH`."""
    for i, word in enumerate(argv):
        if word in ("-a", "--api-server") and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--api-server="):
            return word.split("=", 1)[1]
        if word.startswith("-a") and not word.startswith("--") and len(word) > 2:
            return word[2:]
    return None


# ---------------------------------------------------------------- KIAUH's instances ----------

#: KIAUH names a second, third... Klipper `klipper-<name>.service`; Klipper's own Linux
#: host MCU unit is `klipper-mcu.service` (scripts/klipper-mcu.service), which has no API
#: socket: a unit counts only if it runs klippy (its ExecStart or KLIPPER_ARGS says so).
_INSTANCE_UNIT = re.compile(r"klipper-[A-Za-z0-9_.@-]+\.service")


def discover_services(unit_dirs: Sequence[str]) -> Optional[Tuple[List[str], str]]:
    """(KIAUH's instance units, where they were found) when there is no klipper.service.

    Only a read of the unit files (no systemctl): a host with `klipper.service` keeps the
    default; one with only `klipper-1.service`, `klipper-2.service` (KIAUH's multi-instance
    layout) gets them all, in name order, so every instance is stopped and asked.
    """
    names: Dict[str, str] = {}
    for directory in unit_dirs:
        if os.path.exists(os.path.join(directory, "klipper.service")):
            return None
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            if not _INSTANCE_UNIT.fullmatch(entry) or entry in names:
                continue
            try:
                with open(os.path.join(directory, entry), encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if "klippy" in text or "KLIPPER_ARGS" in text:
                names[entry] = directory
    if not names:
        return None
    units = sorted(names, key=_natural)
    return [u[: -len(".service")] for u in units], ", ".join(sorted(set(names.values())))


def _natural(name: str) -> List[Any]:
    """klipper-2 before klipper-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
