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

This module only reads: the unit facts of kflashd/klipper_units.py (`systemctl show`, the
units' environment files), the sockets, /proc/self/mountinfo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from . import guard
from .errors import ConfigError
from .klipper_units import UnitFacts, api_socket_from_argv, expand, read_env_file, show_units, unit_name

PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp")

_log = logging.getLogger("kflashd.instances")


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
