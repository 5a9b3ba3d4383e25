"""KIAUH's multi-instance layout on a booted host: ``klipper-1.service`` and
``klipper-2.service``, each with its own ``~/printer_N_data`` (see printer_host.py)."""
from __future__ import annotations

import json

import pytest

from tests.host import printer_host as ph

pytestmark = pytest.mark.host


def test_installer_finds_the_klipper_user_of_the_instances(multi_instance_host):
    m, r = multi_instance_host.machine, multi_instance_host.install
    assert r.returncode == 0, f"./install.sh --offline failed:\n{r.stdout}\n{r.stderr}"
    assert "Klipper user: pi (User= of klipper-1.service)" in r.stdout, r.stdout
    assert m.show("kflashd.service", "User") == "pi"
    assert m.show("kflashd.service", "ActiveState") == "active"


def test_daemon_finds_both_instances_and_their_sockets(multi_instance_host):
    m = multi_instance_host.machine
    config = json.loads(m.run(["kflashctl", "config", "--json"], user=ph.USER).stdout)
    text = json.dumps(config)
    for unit, data in ph.instances(2):
        assert unit in text, f"{unit} not among the daemon's Klipper services: {text}"
        assert f"{ph.HOME}/{data}/comms/klippy.sock" in text, f"{data}'s socket unknown to the daemon: {text}"
    rule = m.path("/etc/polkit-1/rules.d/50-kflashd.rules").read_text()
    assert '"klipper-1.service"' in rule and '"klipper-2.service"' in rule, rule
