"""Which Klipper instances the print guard asks, and when "no answer" may mean "not running".

Real sockets, the stand-in `systemctl` (its `show` renders the unit files the tests write,
in systemd's own format), real KIAUH-style klipper.env files.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import List

import pytest

from kflashd import instances
from kflashd.config import load_config
from kflashd.errors import ConfigError
from kflashd.instances import Instance, check_all, check_visible, private_tmp, resolve
from kflashd.klipper_units import UnitFacts, api_socket_from_argv, expand, parse_show, read_env_file

# What systemd 252 prints for `systemctl show -p ActiveState,ExecStart,EnvironmentFiles,
# Environment klipper-1.service klipper-2.service` on a KIAUH host (two instances).
SHOW_TWO = """ActiveState=active
ExecStart={ path=/home/pi/klippy-env/bin/python ; argv[]=/home/pi/klippy-env/bin/python $KLIPPER_ARGS ; ignore_errors=no ; start_time=[Mon 2026-11-30 10:00:01 UTC] ; stop_time=[n/a] ; pid=612 ; code=(null) ; status=0/0 }
EnvironmentFiles=/home/pi/printer_1_data/systemd/klipper.env (ignore_errors=no)

ActiveState=failed
ExecStart={ path=/home/pi/klippy-env/bin/python ; argv[]=/home/pi/klippy-env/bin/python /home/pi/klipper/klippy/klippy.py /home/pi/printer_2_data/config/printer.cfg -a /home/pi/printer_2_data/comms/klippy.sock ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }
Environment=LANG=C.UTF-8 PYTHONUNBUFFERED=1
"""

KIAUH_ENV = ('KLIPPER_ARGS="/home/pi/klipper/klippy/klippy.py /home/pi/printer_1_data/config/printer.cfg '
             '-I /home/pi/printer_1_data/comms/klippy.serial -l /home/pi/printer_1_data/logs/klippy.log '
             '-a /home/pi/printer_1_data/comms/klippy.sock"\n')


def test_parse_show_reads_each_units_block():
    one, two = parse_show(SHOW_TWO, 2)
    assert one.active_state == "active" and two.active_state == "failed"
    assert one.exec_start == [["/home/pi/klippy-env/bin/python", "$KLIPPER_ARGS"]]
    assert one.env_files == ["/home/pi/printer_1_data/systemd/klipper.env"]
    assert two.environment == {"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    with pytest.raises(ValueError):
        parse_show(SHOW_TWO, 3)  # an answer for fewer units than asked is not guessed at


def test_kiauh_env_file_gives_the_socket(tmp_path):
    env_file = tmp_path / "klipper.env"
    env_file.write_text("# written by KIAUH\n" + KIAUH_ENV)
    env = read_env_file(str(env_file))
    argv = expand(["/home/pi/klippy-env/bin/python", "$KLIPPER_ARGS"], env)
    assert argv[1] == "/home/pi/klipper/klippy/klippy.py"
    assert api_socket_from_argv(argv) == "/home/pi/printer_1_data/comms/klippy.sock"
    # ${VAR} inside a word is one word (systemd.service(5))
    assert expand(["-a", "${DATA}/comms/klippy.sock"], {"DATA": "/srv/p"}) == ["-a", "/srv/p/comms/klippy.sock"]


@pytest.mark.parametrize("argv, socket_path", [
    (["klippy.py", "printer.cfg", "-a", "/run/k.sock"], "/run/k.sock"),
    (["klippy.py", "printer.cfg", "-a/run/k.sock"], "/run/k.sock"),
    (["klippy.py", "--api-server", "/run/k.sock"], "/run/k.sock"),
    (["klippy.py", "--api-server=/run/k.sock"], "/run/k.sock"),
    (["klippy.py", "printer.cfg", "-l", "/tmp/klippy.log"], None),  # started without -a
])
def test_api_socket_option_forms(argv, socket_path):
    assert api_socket_from_argv(argv) == socket_path


def config(tmp_path, klipper: str):
    path = tmp_path / "kflashd.toml"
    path.write_text("[klipper]\n" + klipper)
    return load_config(str(path))


def test_where_each_socket_comes_from(tmp_path):
    env_file = tmp_path / "klipper.env"
    env_file.write_text(KIAUH_ENV)
    facts = {
        "klipper-1": UnitFacts("active", [["python", "$KLIPPER_ARGS"]], [str(env_file)]),
        "klipper-2": UnitFacts("active", [["python", "klippy.py", "-a", "/run/two.sock"]]),
        "klipper-3": UnitFacts("active", [["python", "klippy.py"]]),
    }
    c = config(tmp_path, 'services = ["klipper-1", "klipper-2", "klipper-3"]\n')
    found = resolve(c, facts)
    assert [i.socket for i in found] == ["/home/pi/printer_1_data/comms/klippy.sock", "/run/two.sock", None]
    assert str(env_file) in found[0].source and "klipper-1.service" in found[0].source
    assert "ExecStart" in found[1].source
    assert "klipper.api_sockets" in found[2].source  # says which key is missing
    # api_sockets overrides the unit; api_socket set in the file is the first unit's
    c = config(tmp_path, 'services = ["klipper-1", "klipper-2"]\napi_socket = "/srv/one.sock"\n'
                         'api_sockets = { "klipper-2.service" = "/srv/two.sock" }\n')
    found = resolve(c, facts)
    assert [i.socket for i in found] == ["/srv/one.sock", "/srv/two.sock"]
    assert found[0].source.startswith("klipper.api_socket (") and found[1].source.startswith("klipper.api_sockets (")


def test_api_sockets_must_name_a_configured_service(tmp_path):
    with pytest.raises(ConfigError, match="api_sockets names 'klipper-9'"):
        config(tmp_path, 'services = ["klipper"]\napi_sockets = { "klipper-9" = "/k.sock" }\n')
    with pytest.raises(ConfigError, match="absolute path"):
        config(tmp_path, 'api_sockets = { "klipper" = "klippy.sock" }\n')


# ---------------------------------------------------------------- PrivateTmp ----------

# /proc/self/mountinfo of a process in a unit with PrivateTmp=yes: /tmp on the root fs ...
MOUNTINFO_ROOTFS = """23 1 179:2 / / rw,noatime shared:1 - ext4 /dev/root rw
310 23 179:2 /tmp/systemd-private-6f0c0d3c1a3d4b1e8b3c-kflashd.service-Hq1UeQ/tmp /tmp rw,nosuid,nodev shared:341 - ext4 /dev/root rw
311 23 179:2 /var/tmp/systemd-private-6f0c0d3c1a3d4b1e8b3c-kflashd.service-b2Tn9x/tmp /var/tmp rw,nosuid,nodev shared:342 - ext4 /dev/root rw
"""
# ... and on a tmpfs (Raspberry Pi OS with tmp.mount)
MOUNTINFO_TMPFS = """23 1 179:2 / / rw,noatime shared:1 - ext4 /dev/root rw
312 23 0:40 /systemd-private-6f0c0d3c1a3d4b1e8b3c-kflashd.service-Hq1UeQ/tmp /tmp rw,nosuid,nodev shared:343 - tmpfs tmpfs rw
"""
MOUNTINFO_PLAIN = """23 1 179:2 / / rw,noatime shared:1 - ext4 /dev/root rw
40 23 0:40 / /tmp rw,nosuid,nodev shared:20 - tmpfs tmpfs rw
"""


@pytest.mark.parametrize("text, private", [(MOUNTINFO_ROOTFS, True), (MOUNTINFO_TMPFS, True), (MOUNTINFO_PLAIN, False)])
def test_private_tmp_is_read_from_mountinfo(tmp_path, text, private):
    path = tmp_path / "mountinfo"
    path.write_text(text)
    assert private_tmp(str(path)) is private


def test_socket_under_private_tmp_is_refused_at_load(tmp_path, standins):
    c = config(tmp_path, 'api_socket = "/tmp/klippy_uds"\n')
    with pytest.raises(ConfigError) as e:
        check_visible(c, is_private=lambda: True)
    for words in ("/tmp/klippy_uds", "PrivateTmp=yes", "klipper.api_socket", "printer_data/comms/klippy.sock"):
        assert words in str(e.value)
    assert check_visible(c, is_private=lambda: False)[0].socket == "/tmp/klippy_uds"  # started by hand: fine


def test_socket_under_private_tmp_found_in_the_unit_holds_the_job(tmp_path, standins):
    # The unit changed after kflashd started: not "not running", a configuration warning.
    standins.set_unit_file("klipper", "[Service]\nExecStart=/usr/bin/python3 klippy.py -a /tmp/klippy_uds\n")
    c = config(tmp_path, "")
    verdict, _ = check_all(c, is_private=lambda: True)
    assert verdict.busy and verdict.warning
    assert "/tmp/klippy_uds" in verdict.reason and "PrivateTmp" in verdict.reason


def test_check_visible_refuses_a_hidden_socket_for_real(tmp_path):
    """The daemon under a bind-mounted private temporary directory, as systemd sets it up,
    refuses at start. The bind goes over /var/tmp (PrivateTmp= gives both): over /tmp it
    would also hide a checkout or a CI copy that lives under /tmp."""
    private = tmp_path / "systemd-private-0123abcd-kflashd.service-XyZ" / "tmp"
    private.mkdir(parents=True)
    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "kflashd.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[klipper]\nservices = ["klipper"]\napi_socket = "/var/tmp/klippy_uds"\n'
        f'[katapult]\ndir = "{repo / "tests" / "standins" / "katapult"}"\n')
    import subprocess
    import sys

    script = 'mount --bind "$1" /var/tmp && exec "$2" -m kflashd.daemon --config "$3"'
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                          str(private), sys.executable, str(config)],
                         capture_output=True, text=True, timeout=30, cwd=str(repo),
                         env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    assert out.returncode == 78, out.stdout + out.stderr
    assert "/var/tmp/klippy_uds" in out.stderr and "PrivateTmp=yes" in out.stderr


# ---------------------------------------------------------------- the verdicts ----------


class Listener:
    """A Klipper API socket answering objects/query with a print state."""

    def __init__(self, path: str, print_state: str) -> None:
        self.path = path
        self.state = print_state
        self.queries = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\x03" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if b"\x03" not in data:
                    continue
                self.queries += 1
                request = json.loads(data.split(b"\x03")[0])
                status = {"print_stats": {"state": self.state}, "idle_timeout": {"state": "Idle"},
                          "webhooks": {"state": "ready"}}
                conn.sendall(json.dumps({"id": request["id"], "result": {"status": status}}).encode() + b"\x03")

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def listeners():
    made: List[Listener] = []

    def make(path, state):
        made.append(Listener(str(path), state))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def stale(path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()


def test_wrong_socket_path_while_the_unit_runs_is_busy(tmp_path, standins):
    standins.set_unit_state("klipper", "active")
    c = config(tmp_path, f'api_socket = "{tmp_path}/wrong.sock"\n')
    verdict, _ = check_all(c)
    assert verdict.busy and not verdict.warning
    assert f"{tmp_path}/wrong.sock" in verdict.reason  # the path it tried
    assert "klipper.api_socket" in verdict.reason and "api_sockets" in verdict.reason  # the keys to fix
    assert "active" in verdict.reason


@pytest.mark.parametrize("state", ["inactive", "failed"])
def test_stale_socket_with_the_unit_stopped_goes_on(tmp_path, standins, state):
    standins.set_unit_state("klipper", state)
    stale(tmp_path / "klippy.sock")
    c = config(tmp_path, f'api_socket = "{tmp_path}/klippy.sock"\n')
    verdict, _ = check_all(c)
    assert not verdict.busy and verdict.klipper_running is False, verdict
    assert f"is {state}" in verdict.reason and "nothing to ask" in verdict.reason


@pytest.mark.parametrize("state", ["active", "activating", "deactivating", "reloading"])
def test_stale_socket_with_the_unit_not_stopped_is_busy(tmp_path, standins, state):
    standins.set_unit_state("klipper", state)
    stale(tmp_path / "klippy.sock")
    verdict, _ = check_all(config(tmp_path, f'api_socket = "{tmp_path}/klippy.sock"\n'))
    assert verdict.busy and "no listener" in verdict.reason


def test_systemctl_that_cannot_tell_is_busy(tmp_path, standins):
    standins.set("systemctl", {"show": {"exit": 1, "stderr": "Failed to connect to bus: No such file or directory"}})
    verdict, _ = check_all(config(tmp_path, f'api_socket = "{tmp_path}/klippy.sock"\n'))
    assert verdict.busy and "systemctl could not tell" in verdict.reason


def test_second_instance_printing_holds(tmp_path, standins, listeners):
    one = listeners(tmp_path / "one.sock", "standby")
    two = listeners(tmp_path / "two.sock", "printing")
    standins.set_unit_file("klipper-1", f"[Service]\nExecStart=/usr/bin/python3 klippy.py -a {one.path}\n")
    env_file = tmp_path / "klipper.env"
    env_file.write_text(f'KLIPPER_ARGS="klippy.py printer.cfg -a {two.path}"\n')
    standins.set_unit_file("klipper-2", f"[Service]\nEnvironmentFile={env_file}\n"
                                        "ExecStart=/usr/bin/python3 $KLIPPER_ARGS\n")
    for unit in ("klipper-1", "klipper-2"):
        standins.set_unit_state(unit, "active")
    c = config(tmp_path, 'services = ["klipper-1", "klipper-2"]\n')
    verdict, asked = check_all(c)
    assert verdict.busy and "klipper-2.service" in verdict.reason and "printing" in verdict.reason
    assert (one.queries, two.queries) == (1, 1)  # every instance asked
    two.state = "complete"
    verdict, asked = check_all(c)
    assert not verdict.busy and verdict.klipper_running, verdict
    assert [i.socket for i in asked] == [one.path, two.path]


def test_instance_without_a_known_socket_holds_while_it_runs(tmp_path, standins, listeners):
    one = listeners(tmp_path / "one.sock", "standby")
    standins.set_unit_file("klipper-2", "[Service]\nExecStart=/usr/bin/python3 klippy.py printer.cfg\n")
    standins.set_unit_state("klipper-2", "active")
    c = config(tmp_path, f'services = ["klipper", "klipper-2"]\napi_socket = "{one.path}"\n')
    verdict, _ = check_all(c)
    assert verdict.busy and 'klipper.api_sockets = { "klipper-2" = "PATH" }' in verdict.reason
    standins.set_unit_state("klipper-2", "inactive")
    assert not check_all(c)[0].busy


# ---------------------------------------------------------------- KIAUH's instances ----------

KIAUH_UNIT = ("[Service]\nType=simple\nUser=pi\nRemainAfterExit=yes\nWorkingDirectory=/home/pi/klipper\n"
              "EnvironmentFile=/home/pi/{data}/systemd/klipper.env\n"
              "ExecStart=/home/pi/klippy-env/bin/python $KLIPPER_ARGS\nRestart=always\nRestartSec=10\n")


def test_kiauh_instances_become_the_services(tmp_path):
    from kflashd.config import Config, apply_discovered_defaults

    units = tmp_path / "units"
    units.mkdir()
    for name in ("klipper-1", "klipper-2", "klipper-10"):
        (units / f"{name}.service").write_text(KIAUH_UNIT.format(data=f"printer_{name[8:]}_data"))
    # Klipper's own Linux-host MCU unit has no API socket: never an instance
    (units / "klipper-mcu.service").write_text("[Service]\nExecStart=/usr/local/bin/klipper_mcu -r\n")
    config = Config()
    config.sources["klipper.services"] = "default"
    apply_discovered_defaults(config, unit_dirs=(str(units),))
    assert config.klipper_services == ["klipper-1", "klipper-2", "klipper-10"]
    assert config.sources["klipper.services"] == f"discovered: KIAUH's instances in {units}"
    # a host with klipper.service keeps the default; a services key in the file wins
    (units / "klipper.service").write_text(KIAUH_UNIT.format(data="printer_data"))
    config = Config()
    config.sources["klipper.services"] = "default"
    apply_discovered_defaults(config, unit_dirs=(str(units),))
    assert config.klipper_services == ["klipper"]
    (units / "klipper.service").unlink()
    config = Config(klipper_services=["klipper-2"])
    config.sources["klipper.services"] = "/etc/kflashd/kflashd.toml"
    apply_discovered_defaults(config, unit_dirs=(str(units),))
    assert config.klipper_services == ["klipper-2"]


def test_kiauh_unit_whose_klippy_exited_is_not_running(tmp_path):
    # RemainAfterExit=yes: klippy gone, the unit still "active" (SubState exited, MainPID 0)
    block = "ActiveState=active\nSubState=exited\nMainPID=0\n"
    (facts,) = parse_show(block, 1)
    assert facts.not_running and "exited" in facts.not_running
    stale(tmp_path / "klippy.sock")
    instance = Instance("klipper", str(tmp_path / "klippy.sock"), "test", facts)
    assert not instances._check_one(instance, 0.5, False).busy
    running = parse_show("ActiveState=active\nSubState=running\nMainPID=612\n", 1)[0]
    assert running.not_running is None
    assert instances._check_one(Instance("klipper", str(tmp_path / "klippy.sock"), "test", running), 0.5, False).busy
