"""Which Klipper instances the print guard must ask, where their API sockets are, and
whether the service manager says each one runs.

The guard fails closed: an API socket that does not answer counts as "may be printing"
unless systemd says that instance's unit is inactive or failed. So for every unit in
`[klipper] services` this module finds
- its API socket: `[klipper] api_sockets` for that unit, else `[klipper] api_socket` set in
  the file (the first unit only), else the `-a` argument of the unit's own ExecStart, where
  KIAUH puts it through `EnvironmentFile=` (`KLIPPER_ARGS="... -a .../klippy.sock"` in
  printer_data/systemd/klipper.env), else the discovered or default `api_socket` (first
  unit only);
- its state, from the same `systemctl show` call (no privileges needed).

It also knows the one place a socket can hide from the daemon: the shipped unit has
`PrivateTmp=yes`, so a socket under /tmp (older installs use /tmp/klippy_uds) is not the
daemon's /tmp. Such a config is refused at start and reload (`check_visible`), and a unit
that points there later holds the job with a configuration warning; it is never taken as
"Klipper is not running".

This module only reads: `systemctl show`, the units' environment files, /proc/self/mountinfo.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import guard, proc
from .errors import ConfigError

TIMEOUT_SHOW = 5.0  # seconds for one `systemctl show`
NOT_RUNNING_STATES = ("inactive", "failed")
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp")

_log = logging.getLogger("kflashd.instances")


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


@dataclass(frozen=True)
class Instance:
    """One Klipper instance as the guard sees it."""

    service: str
    socket: Optional[str]  # None: nowhere to ask (no key, no -a in the unit)
    source: str  # where `socket` came from, for `kflashctl config` and messages
    facts: UnitFacts = field(default_factory=UnitFacts)

    @property
    def config_key(self) -> str:
        """The key that sets this instance's socket, for messages that name the fix."""
        return f'klipper.api_sockets = {{ "{self.service}" = "PATH" }}'


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


def socket_from_unit(service: str, facts: UnitFacts) -> Optional[Instance]:
    """The instance with the `-a` socket of its unit's ExecStart, or None without one."""
    env = dict(facts.environment)
    files_read = []
    for path in facts.env_files:
        try:
            env.update(read_env_file(path))
            files_read.append(path)
        except OSError as e:
            _log.warning(f"{unit_name(service)}: cannot read its EnvironmentFile {path}: {e.strerror or e}")
    for argv in facts.exec_start:
        socket = api_socket_from_argv(expand(argv, env))
        if socket is None:
            continue
        direct = api_socket_from_argv(argv) is not None
        where = (f"-a in {unit_name(service)}'s ExecStart" if direct or not files_read
                 else f"-a in {unit_name(service)}'s ExecStart, through {', '.join(files_read)}")
        return Instance(service, socket, f"found: {where}", facts)
    return None


# ---------------------------------------------------------------- resolution ----------


def _same_unit(a: str, b: str) -> bool:
    return unit_name(a) == unit_name(b)


def resolve(config, facts: Optional[Dict[str, UnitFacts]] = None) -> List[Instance]:
    """Every configured instance with its socket and where it came from (see the module
    docstring for the order). `facts` from show_units(); asked for when None."""
    services = list(config.klipper_services)
    if facts is None:
        facts = show_units(services)
    explicit_single = config.sources.get("klipper.api_socket", "default")
    instances = []
    for index, service in enumerate(services):
        unit = facts.get(service, UnitFacts())
        override = next((p for s, p in config.klipper_api_sockets.items() if _same_unit(s, service)), None)
        if override is not None:
            source = config.sources.get("klipper.api_sockets", "file")
            instances.append(Instance(service, override, f"klipper.api_sockets ({source})", unit))
            continue
        if index == 0 and explicit_single not in ("default",) and not explicit_single.startswith("discovered"):
            instances.append(Instance(service, config.klipper_api_socket, f"klipper.api_socket ({explicit_single})", unit))
            continue
        found = socket_from_unit(service, unit)
        if found is not None:
            instances.append(found)
        elif index == 0:
            instances.append(Instance(service, config.klipper_api_socket,
                                      f"klipper.api_socket ({explicit_single}; {unit_name(service)} has no -a)", unit))
        else:
            instances.append(Instance(service, None, f"none: {unit_name(service)} has no -a and klipper.api_sockets does not name it", unit))
    return instances


def api_sockets(config) -> List[str]:
    """Every instance's socket, for asking Klipper which version an MCU runs."""
    found = [i.socket for i in resolve(config) if i.socket]
    return found or [config.klipper_api_socket]


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


# ---------------------------------------------------------------- PrivateTmp ----------


def private_tmp(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether this process runs with systemd's PrivateTmp= (its /tmp is a bind mount of
    /tmp/systemd-private-<boot id>-<unit>-<random>/tmp, or of that directory on a tmpfs)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[4] in PRIVATE_TMP_DIRS and "/systemd-private-" in fields[3]:
            return True
    return False


def hidden_by_private_tmp(socket: str) -> bool:
    return any(socket == d or socket.startswith(d + "/") for d in PRIVATE_TMP_DIRS)


def hidden_socket_fix(instance: Instance) -> str:
    return (
        f"Klipper's API socket {instance.socket} for {unit_name(instance.service)} ({instance.source}) "
        f"is under /tmp, which kflashd's unit makes private (PrivateTmp=yes): kflashd cannot see it. "
        f"Fix: start Klipper with -a ~/printer_data/comms/klippy.sock (KIAUH's layout: "
        f"KLIPPER_ARGS in printer_data/systemd/klipper.env) and point {instance.config_key} "
        f"or klipper.api_socket there, or give kflashd.service a drop-in with PrivateTmp=no"
    )


def access_fix(instance: Instance) -> str:
    """What to do when the daemon may not connect to an instance's socket."""
    return (
        f"Fix: run kflashd as the user Klipper runs as (sudo ./install.sh picks it from "
        f"{unit_name(instance.service)}'s User=), or in --root mode reinstall with this "
        f"version's install.sh (its unit keeps CAP_DAC_OVERRIDE to reach the socket); "
        f"or point {instance.config_key} at the right socket (now {instance.source})"
    )


def check_visible(config, is_private: Optional[Callable[[], bool]] = None) -> List[Instance]:
    """Refuse (ConfigError) a config whose guard would ask a socket hidden by PrivateTmp.

    Called at start and on reload. Returns the resolved instances (for the log).
    """
    instances = resolve(config)
    if not (is_private or private_tmp)():
        return instances
    for instance in instances:
        if instance.socket and hidden_by_private_tmp(instance.socket):
            raise ConfigError(hidden_socket_fix(instance))
    return instances


# ---------------------------------------------------------------- the guard ----------


def check_all(config, timeout: float = guard.DEFAULT_TIMEOUT,
              is_private: Optional[Callable[[], bool]] = None) -> "tuple[guard.GuardVerdict, List[Instance]]":
    """Ask every instance; the first that holds the job decides the verdict.

    Order of severity: a print (or a socket that may belong to one) on any instance holds
    the job; a configuration error (EACCES, a socket hidden by PrivateTmp) holds it with
    a warning. Only instances whose socket did not answer AND whose unit is inactive or
    failed count as not running.
    """
    instances = resolve(config)
    private = (is_private or private_tmp)()
    held: List[guard.GuardVerdict] = []
    notes: List[str] = []
    running = False
    for instance in instances:
        verdict = _check_one(instance, timeout, private)
        if verdict.busy:
            held.append(verdict)
        elif verdict.klipper_running:
            running = True
            notes.append(verdict.reason)
        else:
            notes.append(verdict.reason)
    if held:
        # A print outranks a configuration warning: say the strongest reason first.
        held.sort(key=lambda v: v.warning)
        return held[0], instances
    return guard.GuardVerdict(False, "; ".join(notes), running), instances


def _check_one(instance: Instance, timeout: float, private: bool) -> guard.GuardVerdict:
    unit = unit_name(instance.service)
    name = f"{unit} ({instance.socket})"
    if instance.socket is None:
        verdict = guard.GuardVerdict(True, f"no API socket known for {unit}", True, answered=False)
    elif private and hidden_by_private_tmp(instance.socket):
        return guard.GuardVerdict(True, f"configuration error: {hidden_socket_fix(instance)}", True,
                                  answered=False, warning=True)
    else:
        verdict = guard.check_printer_idle(instance.socket, timeout)
    if verdict.answered:
        return guard.GuardVerdict(verdict.busy, f"{name}: {verdict.reason}", True)
    if verdict.warning:  # EACCES: a configuration error, whatever the unit's state
        return guard.GuardVerdict(True, f"configuration error: {verdict.reason}. {access_fix(instance)}",
                                  True, answered=False, warning=True)
    state = instance.facts.active_state
    stopped = instance.facts.not_running
    if stopped:
        return guard.GuardVerdict(False, f"{unit} is {stopped} ({verdict.reason}): nothing to ask", False,
                                  answered=False)
    said = f"its unit is {state}" if state else "systemctl could not tell whether its unit runs"
    return guard.GuardVerdict(
        True,
        f"{unit} may be printing: {verdict.reason}, and {said}. If Klipper's socket is elsewhere, "
        f"set {instance.config_key} (now {instance.source}; `kflashctl config` shows it)",
        True, answered=False,
    )
