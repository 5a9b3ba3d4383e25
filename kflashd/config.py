"""The TOML configuration: defaults, validation, and where each value came from.

Every key is optional; an unknown key, a wrong type or an out-of-range number is a
ConfigError that names the file, the key and what was expected, because a typo in a
flash daemon's config must never silently fall back to a default (it could point the
daemon at the wrong Klipper tree). Loading never touches the network or a board.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/etc/kflashd/kflashd.toml"
DEFAULT_MAX_IMAGE_SIZE = 8 * 1024 * 1024  # larger than any MCU flash Klipper supports


@dataclass
class BoardConfig:
    """One `[boards.NAME]` table: how a board is recognised and what may be done to it.

    A USB board is recognised by `serial` (and `port` where serials repeat: boards built
    without the chip id all report 12345); a CAN toolhead by `canbus_uuid` on
    `canbus_interface`. `katapult` says the board is known to run Katapult, so it may be
    asked to reboot into it (`--now`); `kconfig` is its saved Klipper build config.
    """

    name: str
    serial: Optional[str] = None
    mcu: Optional[str] = None
    port: Optional[str] = None
    katapult: bool = False
    canbus_uuid: Optional[str] = None
    canbus_interface: Optional[str] = None
    kconfig: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        """The keys that were set, as the config file spells them."""
        keys = ("serial", "mcu", "port", "katapult", "canbus_uuid", "canbus_interface", "kconfig")
        return {k: getattr(self, k) for k in keys if getattr(self, k) not in (None, False)}


@dataclass
class Config:
    """Effective configuration. `sources` maps "section.key" to where the value came from."""

    path: Optional[str] = None
    state_dir: str = "/var/lib/kflashd"
    runtime_dir: str = "/run/kflashd"
    group: str = "kflash"
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    klipper_services: List[str] = field(default_factory=lambda: ["klipper"])
    klipper_dir: str = "/home/pi/klipper"
    klipper_api_socket: str = "/home/pi/printer_data/comms/klippy.sock"
    klipper_api_sockets: Dict[str, str] = field(default_factory=dict)  # service -> API socket
    katapult_dir: str = "/home/pi/katapult"
    katapult_baud: int = 0
    timeout_flash: float = 60
    timeout_service: float = 30
    timeout_bootloader: float = 15
    timeout_reboot: float = 15
    timeout_resume: float = 3600
    timeout_build: float = 900
    guard_retry: float = 10
    klipper_retry: float = 30
    boards: Dict[str, BoardConfig] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)

    @property
    def control_socket(self) -> str:
        return os.path.join(self.runtime_dir, "control.sock")

    def board_by_name(self, name: str) -> Optional[BoardConfig]:
        return self.boards.get(name)

    def board_by_serial(self, serial: str, port: Optional[str] = None) -> Optional[BoardConfig]:
        """The configured board with this USB serial; where several share it (boards built
        without the chip id), the one whose `port` is `port` (None when none matches)."""
        matches = [b for b in self.boards.values() if b.serial is not None and b.serial == serial]
        if len(matches) > 1 or (port is not None and matches and matches[0].port is not None):
            matches = [b for b in matches if b.port == port]
        return matches[0] if len(matches) == 1 else None

    def check_paths(self) -> List[str]:
        """Validate what the daemon needs on disk; return warnings for what it can live without.

        The Katapult tree is required (it is the primary flash method); a missing Klipper tree
        only disables the `make flash` fallback, which the caller logs.
        """
        warnings: List[str] = []
        flashtool = Path(self.katapult_dir) / "scripts" / "flashtool.py"
        if not flashtool.is_file():
            raise ConfigError(
                f"{self._where('katapult.dir')}: katapult.dir = {self.katapult_dir!r} has no "
                f"scripts/flashtool.py; clone Katapult there or set katapult.dir"
            )
        if not Path(self.klipper_dir).is_dir():
            warnings.append(
                f"klipper.dir = {self.klipper_dir!r} does not exist: the `make flash` fallback "
                f"is disabled"
            )
        return warnings

    def _where(self, key: str) -> str:
        return self.sources.get(key, "default")


# (section, key) -> (attribute, expected type(s), description for messages)
_SCALARS: Dict[Tuple[str, str], Tuple[str, Tuple[type, ...], str]] = {
    ("", "state_dir"): ("state_dir", (str,), "a path"),
    ("", "runtime_dir"): ("runtime_dir", (str,), "a path"),
    ("", "group"): ("group", (str,), "a group name"),
    ("", "max_image_size"): ("max_image_size", (int,), "a size in bytes"),
    ("klipper", "services"): ("klipper_services", (list,), "a list of unit names"),
    ("klipper", "dir"): ("klipper_dir", (str,), "a path"),
    ("klipper", "api_socket"): ("klipper_api_socket", (str,), "a path"),
    ("klipper", "api_sockets"): ("klipper_api_sockets", (dict,), 'a table { "SERVICE" = "PATH" }'),
    ("katapult", "dir"): ("katapult_dir", (str,), "a path"),
    ("katapult", "baud"): ("katapult_baud", (int,), "a baud rate (0 for USB)"),
    ("timeouts", "flash"): ("timeout_flash", (int, float), "seconds"),
    ("timeouts", "service"): ("timeout_service", (int, float), "seconds"),
    ("timeouts", "bootloader"): ("timeout_bootloader", (int, float), "seconds"),
    ("timeouts", "reboot"): ("timeout_reboot", (int, float), "seconds (0: don't wait)"),
    ("timeouts", "build"): ("timeout_build", (int, float), "seconds for one board's build"),
    ("timeouts", "resume"): ("timeout_resume", (int, float), "seconds after an interrupted write during which the same board may be flashed again (0: never)"),
    ("timeouts", "guard_retry"): ("guard_retry", (int, float), "seconds between print-guard checks"),
    ("timeouts", "klipper_retry"): ("klipper_retry", (int, float), "seconds between tries to start a Klipper that is down"),
}
_SECTIONS = {"klipper", "katapult", "timeouts", "boards"}
# Lower bounds; timeouts.reboot may be 0 (do not wait for the board to come back).
_MINIMUM = {
    "timeouts.flash": 1,
    "timeouts.service": 1,
    "timeouts.bootloader": 1,
    "timeouts.reboot": 0,
    "timeouts.resume": 0,
    "timeouts.build": 1,
    "timeouts.guard_retry": 0.1,
    "timeouts.klipper_retry": 0.1,
    "max_image_size": 1,
    "katapult.baud": 0,
}


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def load_config(path: Optional[str] = None) -> Config:
    """Read and validate the config at `path` (or the default path).

    A missing file is an error only when the user named it; the default path missing means
    "all defaults", so a fresh install works before anyone writes a config.
    """
    explicit = path is not None
    path = path or os.environ.get("KFLASHD_CONFIG") or DEFAULT_CONFIG_PATH
    config = Config()
    for (section, key), (attr, _, _) in _SCALARS.items():
        config.sources[_dotted(section, key)] = "default"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such config file") from None
        apply_discovered_defaults(config)
        return config
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    config.path = path
    _apply(config, data, path)
    _check_api_sockets(config, path)
    apply_discovered_defaults(config)
    return config


def _apply(config: Config, data: Mapping[str, Any], path: str) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section [{key}]")
            if key == "boards":
                _apply_boards(config, value, path)
                continue
            for subkey, subvalue in value.items():
                _set_scalar(config, key, subkey, subvalue, path)
        else:
            if key in _SECTIONS:
                raise ConfigError(f"{path}: {key} must be a table ([{key}])")
            _set_scalar(config, "", key, value, path)


def _set_scalar(config: Config, section: str, key: str, value: Any, path: str) -> None:
    name = _dotted(section, key)
    spec = _SCALARS.get((section, key))
    if spec is None:
        known = sorted(_dotted(s, k) for (s, k) in _SCALARS if s == section)
        raise ConfigError(
            f"{path}: unknown key {name!r}" + (f" (known: {', '.join(known)})" if known else "")
        )
    attr, types, description = spec
    # bool is an int in Python; `flash = true` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(f"{path}: {name} must be {description}, not {value!r}")
    if attr == "klipper_services":
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{path}: {name} must be a non-empty list of unit names")
    if attr == "klipper_api_sockets":
        for service, socket in value.items():
            if not isinstance(socket, str) or not socket.startswith("/"):
                raise ConfigError(f"{path}: {name}.{service} must be an absolute path, not {socket!r}")
        value = dict(value)
    minimum = _MINIMUM.get(name)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: {name} must be at least {minimum}, not {value!r}")
    setattr(config, attr, list(value) if isinstance(value, list) else value)
    config.sources[name] = path


def _unit(name: str) -> str:
    return name if "." in name else name + ".service"


def _check_api_sockets(config: Config, path: str) -> None:
    """api_sockets may only name units in services: a typo would leave an instance unasked."""
    services = {_unit(s) for s in config.klipper_services}
    for service in config.klipper_api_sockets:
        if _unit(service) not in services:
            raise ConfigError(
                f"{path}: klipper.api_sockets names {service!r}, which is not in klipper.services "
                f"({', '.join(config.klipper_services)})"
            )


# [boards.NAME] keys: (expected type, pattern the value must match or None, what is expected)
_BOARD_KEYS: Dict[str, Tuple[type, Optional[str], str]] = {
    "serial": (str, r"[0-9A-Za-z]{1,64}", "the board's USB serial number (`kflashctl devices`)"),
    "mcu": (str, r"[0-9A-Za-z_.-]{1,64}", "an MCU type like 'stm32f446xx'"),
    "port": (str, r"[0-9]+-[0-9]+(\.[0-9]+)*", "a USB port path like '1-1.3' (`kflashctl devices`)"),
    "katapult": (bool, None, "true or false"),
    "canbus_uuid": (str, r"[0-9a-f]{12}", "a CAN bus UUID: 12 lower-case hex digits, as in printer.cfg"),
    "canbus_interface": (str, r"[0-9A-Za-z_.-]{1,15}", "a network interface name like 'can0'"),
    "kconfig": (str, r"/.+", "an absolute path to a saved Klipper .config"),
}


def _apply_boards(config: Config, boards: Mapping[str, Any], path: str) -> None:
    import re

    for name, table in boards.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: boards.{name} must be a table ([boards.{name}])")
        unknown = set(table) - set(_BOARD_KEYS)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key 'boards.{name}.{sorted(unknown)[0]}' "
                f"(known: {', '.join(_BOARD_KEYS)})"
            )
        for key, value in table.items():
            kind, pattern, expected = _BOARD_KEYS[key]
            if not isinstance(value, kind) or (pattern and not re.fullmatch(pattern, value)):
                raise ConfigError(f"{path}: boards.{name}.{key} must be {expected}, not {value!r}")
        if "serial" not in table and "canbus_uuid" not in table:
            raise ConfigError(
                f"{path}: boards.{name} needs serial (a USB board) or canbus_uuid (a CAN board)"
            )
        if "canbus_interface" in table and "canbus_uuid" not in table:
            raise ConfigError(f"{path}: boards.{name}.canbus_interface needs canbus_uuid too")
        board = BoardConfig(name=name, **table)
        if board.canbus_uuid and not board.canbus_interface:
            board.canbus_interface = "can0"
        config.boards[name] = board
        config.sources[f"boards.{name}"] = path
    _check_board_identities(config, path)


def _check_board_identities(config: Config, path: str) -> None:
    """Two tables may not name the same board: a job for either would be ambiguous."""
    seen: Dict[Tuple[str, str, Optional[str]], str] = {}
    for board in config.boards.values():
        keys = []
        if board.serial is not None:
            keys.append(("serial", board.serial, board.port))
        if board.canbus_uuid is not None:
            keys.append(("canbus_uuid", board.canbus_uuid, None))
        for key in keys:
            other = seen.setdefault(key, board.name)
            if other != board.name:
                where = f" on port {key[2]}" if key[2] else ""
                raise ConfigError(
                    f"{path}: boards.{other} and boards.{board.name} both name {key[0]} "
                    f"{key[1]}{where}; boards that share a serial need distinct `port` keys"
                )


UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")


def discover_klipper_home(unit: str = "klipper", unit_dirs=UNIT_DIRS) -> Optional[Tuple[str, str, str]]:
    """(user, home, unit file) of the Klipper service, read from its unit's `User=`.

    Only a read of the unit file: no systemctl, no guessing from running processes. A unit
    without `User=` runs as root, whose home is never a KIAUH layout, so that is no answer.
    """
    import pwd

    name = unit if unit.endswith(".service") else unit + ".service"
    for directory in unit_dirs:
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        user = None
        for line in lines:
            key, _, value = line.strip().partition("=")
            if key.strip() == "User" and value.strip():
                user = value.strip()
        if user is None or user == "root":
            return None
        try:
            return user, pwd.getpwnam(user).pw_dir, path
        except KeyError:
            return None
    return None


def apply_discovered_defaults(config: Config, unit_dirs=UNIT_DIRS) -> None:
    """Point keys the config file left unset at the Klipper user's KIAUH layout, if it exists.

    Only paths that exist are taken, so a half-installed host keeps the plain defaults and
    their errors stay obvious.
    """
    if config.sources.get("klipper.services") == "default":
        from .klipper_units import discover_services  # KIAUH's klipper-1, klipper-2, ...

        discovered = discover_services(unit_dirs)
        if discovered is not None:
            config.klipper_services, where = discovered
            config.sources["klipper.services"] = f"discovered: KIAUH's instances in {where}"
    found = discover_klipper_home(config.klipper_services[0], unit_dirs)
    if found is None:
        return
    user, home, unit_path = found
    for key, attr, relative in (
        ("klipper.dir", "klipper_dir", "klipper"),
        ("katapult.dir", "katapult_dir", "katapult"),
        ("klipper.api_socket", "klipper_api_socket", "printer_data/comms/klippy.sock"),
    ):
        if config.sources.get(key) != "default":
            continue
        candidate = os.path.join(home, relative)
        if os.path.exists(candidate):
            setattr(config, attr, candidate)
            config.sources[key] = f"discovered: {unit_path} runs as {user}"


def describe(config: Config) -> List[Tuple[str, Any, str]]:
    """Every key with its effective value and where it came from, for `kflashctl config`."""
    rows: List[Tuple[str, Any, str]] = []
    for (section, key), (attr, _, _) in _SCALARS.items():
        name = _dotted(section, key)
        rows.append((name, getattr(config, attr), config.sources.get(name, "default")))
    for board in config.boards.values():
        value = board.as_dict()
        rows.append((f"boards.{board.name}", value, config.sources.get(f"boards.{board.name}", "")))
    return rows
