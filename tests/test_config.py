"""Config loading: defaults, validation errors that name the file and key, discovery."""

from __future__ import annotations

import pwd
import re

import pytest

from kflashd.config import Config, apply_discovered_defaults, describe, load_config
from kflashd.errors import ConfigError


def write(tmp_path, text: str) -> str:
    path = tmp_path / "kflashd.toml"
    path.write_text(text)
    return str(path)


def test_missing_default_file_means_all_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("KFLASHD_CONFIG", str(tmp_path / "absent.toml"))
    config = load_config()
    assert config.path is None
    assert config.timeout_flash == 60 and config.klipper_services == ["klipper"]
    assert config.control_socket == "/run/kflashd/control.sock"


def test_missing_named_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml: no such config file"):
        load_config(str(tmp_path / "absent.toml"))


def test_every_key_is_read(tmp_path):
    path = write(tmp_path, """
state_dir = "/s"
runtime_dir = "/r"
group = "g"
max_image_size = 1000
[klipper]
services = ["klipper", "klipper-2"]
dir = "/k"
api_socket = "/k.sock"
[katapult]
dir = "/kat"
baud = 115200
[timeouts]
flash = 5
service = 6
bootloader = 7
reboot = 0
guard_retry = 0.5
[boards.octopus]
serial = "3A0029000851313433383932"
mcu = "stm32f446xx"
katapult = true
[boards.ebb]
serial = "4E0030000E50533357363520"
""")
    c = load_config(path)
    assert (c.state_dir, c.runtime_dir, c.group, c.max_image_size) == ("/s", "/r", "g", 1000)
    assert c.klipper_services == ["klipper", "klipper-2"] and c.klipper_dir == "/k"
    assert (c.katapult_dir, c.katapult_baud) == ("/kat", 115200)
    assert (c.timeout_flash, c.timeout_service, c.timeout_bootloader, c.timeout_reboot) == (5, 6, 7, 0)
    assert c.board_by_name("octopus").mcu == "stm32f446xx"
    assert c.board_by_serial("3A0029000851313433383932").name == "octopus"
    assert c.board_by_name("octopus").katapult is True and c.board_by_name("ebb").katapult is False
    assert c.sources["timeouts.flash"] == path and c.sources["group"] == path


@pytest.mark.parametrize(
    "text, message",
    [
        ("state_dir = ", "TOML syntax error"),
        ("stat_dir = '/x'", "unknown key 'stat_dir'"),
        ("[klipper]\nservice = ['k']", "unknown key 'klipper.service'"),
        ("[timeouts]\nflash = 'long'", "timeouts.flash must be seconds, not 'long'"),
        ("[timeouts]\nflash = true", "timeouts.flash must be seconds"),
        ("[timeouts]\nflash = 0", "timeouts.flash must be at least 1"),
        ("[klipper]\nservices = []", "klipper.services must be a non-empty list"),
        ("[printer]\nx = 1", "unknown section [printer]"),
        ("[boards.octopus]\nmcu = 'stm32f446xx'", "boards.octopus needs serial (a USB board) or canbus_uuid"),
        ("[boards.octopus]\nserial = 'AB'\nmcuu = 'x'", "unknown key 'boards.octopus.mcuu'"),
        ("[boards.octopus]\nserial = 'AB'\nkatapult = 'yes'", "boards.octopus.katapult must be true or false"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(path + ": ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_katapult_tree_is_named(tmp_path):
    path = write(tmp_path, f"[katapult]\ndir = '{tmp_path}/nowhere'\n[klipper]\ndir = '{tmp_path}'\n")
    with pytest.raises(ConfigError, match=r"katapult.dir = .*nowhere.* has no scripts/flashtool.py"):
        load_config(path).check_paths()


def test_missing_klipper_tree_only_warns(tmp_path):
    (tmp_path / "kat/scripts").mkdir(parents=True)
    (tmp_path / "kat/scripts/flashtool.py").write_text("")
    path = write(tmp_path, f"[katapult]\ndir = '{tmp_path}/kat'\n[klipper]\ndir = '{tmp_path}/nok'\n")
    warnings = load_config(path).check_paths()
    assert len(warnings) == 1 and "make flash` fallback is disabled" in warnings[0]


def test_discovery_uses_existing_paths_only(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "klipper").mkdir(parents=True)
    units = tmp_path / "units"
    units.mkdir()
    (units / "klipper.service").write_text("[Service]\nUser=pi\n")
    monkeypatch.setattr(pwd, "getpwnam", lambda name: pwd.struct_passwd((name, "x", 1000, 1000, "", str(home), "/bin/sh")))
    config = Config()
    for key in ("klipper.dir", "katapult.dir", "klipper.api_socket"):
        config.sources[key] = "default"
    apply_discovered_defaults(config, unit_dirs=(str(units),))
    assert config.klipper_dir == str(home / "klipper")
    assert config.sources["klipper.dir"].endswith("runs as pi")
    assert config.katapult_dir == "/home/pi/katapult" and config.sources["katapult.dir"] == "default"
    rows = {key: (value, source) for key, value, source in describe(config)}
    assert rows["klipper.dir"][0] == str(home / "klipper")
    assert rows["timeouts.flash"] == (60, "default")


def test_board_keys_of_the_design(tmp_path):
    """Every [boards.NAME] key the design names is accepted and typed; CAN boards need no serial."""
    path = tmp_path / "kflashd.toml"
    path.write_text(
        '[boards.octopus]\nserial = "12345"\nport = "1-1.3"\nkatapult = true\n'
        'kconfig = "/home/pi/printer_data/config/kflashd/octopus.config"\n'
        '[boards.skr]\nserial = "12345"\nport = "1-1.4"\n'
        '[boards.ebb]\ncanbus_uuid = "0e0d81e4210c"\nmcu = "stm32g0b1xx"\n'
    )
    c = load_config(str(path))
    assert c.boards["octopus"].katapult is True and c.boards["octopus"].port == "1-1.3"
    assert c.boards["ebb"].canbus_interface == "can0" and c.boards["ebb"].serial is None
    # Two boards report 12345: the port decides, and without one neither is chosen.
    assert c.board_by_serial("12345", "1-1.4").name == "skr"
    assert c.board_by_serial("12345") is None
    assert c.timeout_resume == 3600


@pytest.mark.parametrize("table, message", [
    ('[boards.a]\nmcu = "stm32f446xx"\n', "needs serial (a USB board) or canbus_uuid"),
    ('[boards.a]\nserial = "1"\nkatapult = "yes"\n', "boards.a.katapult must be true or false"),
    ('[boards.a]\ncanbus_uuid = "0E0D81E4210C"\n', "boards.a.canbus_uuid must be a CAN bus UUID"),
    ('[boards.a]\nserial = "1"\nport = "usb3"\n', "boards.a.port must be a USB port path"),
    ('[boards.a]\nserial = "1"\ncanbus_interface = "can1"\n', "canbus_interface needs canbus_uuid"),
    ('[boards.a]\nserial = "1"\n[boards.b]\nserial = "1"\n', "boards.a and boards.b both name serial 1"),
])
def test_bad_board_tables_name_the_key(tmp_path, table, message):
    path = tmp_path / "kflashd.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(path))
