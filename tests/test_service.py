"""klipper_service_stopped(): Klipper is started again on every way out, sudo rules, stand-ins."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kflashd import flasher, service
from kflashd.errors import DiscoveryError, FlashError, ServiceError
from tests.standins.fixtures import KATAPULT_DIR, Standins, pid_alive, standins, wait_until

__all__ = ["standins"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "START_RETRY_DELAY", 0.01)


def assert_stop_then_start(standins: Standins) -> None:
    assert standins.systemctl_verbs()[:1] == ["stop"]
    assert standins.systemctl_verbs()[-1] == "start"
    stop = standins.calls("systemctl", verb="stop")[0]
    start = standins.calls("systemctl", verb="start")[-1]
    assert stop["monotonic"] < start["monotonic"]
    assert start["units"] == ["klipper"]


def test_started_after_success(standins: Standins) -> None:
    standins.set_unit_state("klipper", "active")
    with service.klipper_service_stopped():
        assert standins.unit_state() == "inactive"
    assert_stop_then_start(standins)
    assert standins.unit_state() == "active"


def test_started_after_flash_exception(standins: Standins) -> None:
    with pytest.raises(FlashError, match="boom"):
        with service.klipper_service_stopped():
            raise FlashError("boom")
    assert_stop_then_start(standins)


def test_started_after_flash_timeout(standins: Standins, tmp_path: Path) -> None:
    standins.set("flashtool", {"mode": "scripted", "hang": True})
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\x01" * 640)
    with service.klipper_service_stopped():
        result = flasher.flash_device("/dev/null", str(image), str(KATAPULT_DIR), None, timeout=1)
    assert not result.success and "timed out" in (result.error_message or "")
    assert_stop_then_start(standins)
    flash = standins.calls("flashtool")[0]
    # Started only once the 1 s flash timeout had passed. The tool's record is taken after its
    # interpreter start-up (and the pdeath wrapper's exec), so allow that much of the second.
    assert standins.calls("systemctl", verb="start")[-1]["monotonic"] > flash["monotonic"] + 0.6


def test_started_after_keyboard_interrupt(standins: Standins) -> None:
    with pytest.raises(KeyboardInterrupt):
        with service.klipper_service_stopped():
            raise KeyboardInterrupt
    assert_stop_then_start(standins)


CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from kflashd import service
    with service.klipper_service_stopped():
        open({ready!r}, "w").close()
        while True:
            time.sleep(0.05)
    """
)


@pytest.mark.parametrize(
    "signum, expected", [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "Terminated")]
)
def test_started_after_real_signal_to_child(
    standins: Standins, tmp_path: Path, signum: int, expected: str
) -> None:
    ready = tmp_path / "inside"
    code = CHILD.format(repo=str(REPO), ready=str(ready))
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=standins.env(), stderr=subprocess.PIPE
    )
    try:
        wait_until(ready.exists, timeout=15)
        assert standins.systemctl_verbs() == ["stop"]
        child.send_signal(signum)
        _, err = child.communicate(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0
    assert expected.encode() in err
    assert standins.systemctl_verbs() == ["stop", "start"]
    assert_stop_then_start(standins)


def test_stop_before_flash_and_start_after(standins: Standins, tmp_path: Path) -> None:
    standins.set("flashtool", {"mode": "scripted"})
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(3000))
    with service.klipper_service_stopped():
        result = flasher.flash_device("/dev/null", str(image), str(KATAPULT_DIR), None)
    assert result.success
    order = [c["prog"] + ":" + c.get("verb", "") for c in standins.calls()]
    assert order == ["systemctl:stop", "flashtool:", "systemctl:start"]
    times = [c["monotonic"] for c in standins.calls()]
    assert times == sorted(times)


def test_vanished_device_raises_and_klipper_restarts(standins: Standins, tmp_path: Path) -> None:
    gone = str(tmp_path / "ttyACM9")
    with pytest.raises(DiscoveryError, match="Device no longer connected"):
        with service.klipper_service_stopped():
            flasher.verify_device_path(gone)
    assert_stop_then_start(standins)


def test_sudo_verified_before_any_service_operation(
    standins: Standins, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "running_as_root", lambda: False)
    with service.klipper_service_stopped():
        pass
    calls = standins.calls()
    assert calls[0]["prog"] == "sudo" and calls[0]["command"] == ["true"]
    assert calls[0]["non_interactive"]
    sudo_commands = [c["command"] for c in standins.calls("sudo")]
    assert sudo_commands == [
        ["true"],
        ["systemctl", "stop", "klipper"],
        ["systemctl", "start", "klipper"],
    ]
    assert standins.systemctl_verbs() == ["stop", "start"]


def test_missing_sudo_rule_stops_everything_before_klipper_is_touched(
    standins: Standins, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "running_as_root", lambda: False)
    standins.set("sudo", {"allow": False})
    standins.set_unit_state("klipper", "active")
    body_ran = []
    with pytest.raises(ServiceError) as info:
        with service.klipper_service_stopped():
            body_ran.append(True)
    message = str(info.value)
    assert "sudo: a password is required" in message
    assert "NOPASSWD: /usr/bin/true, /usr/bin/systemctl stop klipper" in message
    assert "/usr/bin/systemctl start klipper" in message
    assert not body_ran
    assert standins.calls("systemctl") == []
    assert [c["command"] for c in standins.calls("sudo")] == [["true"]]
    assert standins.unit_state() == "active"


def test_root_uses_no_sudo(standins: Standins, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "running_as_root", lambda: True)
    standins.set("sudo", {"allow": False})
    with service.klipper_service_stopped():
        pass
    assert standins.calls("sudo") == []
    assert standins.systemctl_verbs() == ["stop", "start"]


def test_verify_passwordless_sudo(standins: Standins) -> None:
    assert service.verify_passwordless_sudo() is True
    standins.set("sudo", {"allow": False})
    assert service.verify_passwordless_sudo() is False
    assert [c["argv"] for c in standins.calls("sudo")] == [["-n", "true"], ["-n", "true"]]


def test_failed_stop_raises_systemctl_message_and_runs_nothing(standins: Standins) -> None:
    standins.set_unit_state("klipper", "active")
    standins.set(
        "systemctl", {"stop": {"exit": 1, "stderr": "Failed to stop klipper.service: Access denied"}}
    )
    body_ran = []
    with pytest.raises(ServiceError, match="Failed to stop klipper.service: Access denied"):
        with service.klipper_service_stopped():
            body_ran.append(True)
    assert not body_ran
    # Klipper is still active, so nothing is started again.
    assert standins.systemctl_verbs() == ["stop", "is-active"]


def test_failed_stop_that_took_the_unit_down_starts_it_again(standins: Standins) -> None:
    standins.set_unit_state("klipper", "active")
    standins.set(
        "systemctl",
        {"stop": {"exit": 1, "stderr": "Job for klipper.service failed.", "state_after": "failed"}},
    )
    with pytest.raises(ServiceError, match="Job for klipper.service failed"):
        with service.klipper_service_stopped():
            pass
    assert standins.systemctl_verbs() == ["stop", "is-active", "start"]
    assert standins.unit_state() == "active"


def test_stop_timeout_is_a_service_error(standins: Standins) -> None:
    standins.set_unit_state("klipper", "active")
    standins.set("systemctl", {"stop": {"hang": True}})
    with pytest.raises(ServiceError, match="timed out"):
        with service.klipper_service_stopped(timeout=1):
            pass
    assert standins.systemctl_verbs()[:2] == ["stop", "is-active"]


def test_failing_start_is_retried(standins: Standins) -> None:
    standins.set("systemctl", {"start": {"exit": 1, "fail_times": 2}})
    reported = []
    with service.klipper_service_stopped(on_start_failed=reported.append):
        pass
    assert standins.systemctl_verbs() == ["stop", "start", "start", "start"]
    assert reported == []
    assert standins.unit_state() == "active"


def test_failed_start_is_loud_and_never_masks_the_original_error(
    standins: Standins, caplog: pytest.LogCaptureFixture
) -> None:
    standins.set(
        "systemctl",
        {"start": {"exit": 1, "stderr": "Job for klipper.service failed because of a bug."}},
    )
    reported = []
    with caplog.at_level(logging.WARNING):
        with pytest.raises(FlashError, match="the original"):
            with service.klipper_service_stopped(on_start_failed=reported.append):
                raise FlashError("the original")
    assert standins.systemctl_verbs() == ["stop"] + ["start"] * service.START_TRIES
    assert len(reported) == 1 and "Job for klipper.service failed because of a bug." in reported[0]
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical and "KLIPPER IS NOT RUNNING" in critical[0].getMessage()


def test_failed_start_after_success_does_not_raise(standins: Standins) -> None:
    standins.set("systemctl", {"start": {"exit": 1}})
    reported = []
    with service.klipper_service_stopped(on_start_failed=reported.append):
        pass
    assert len(reported) == 1


def test_several_units(standins: Standins) -> None:
    with service.klipper_service_stopped(services=("klipper", "moonraker")):
        pass
    assert [c["units"] for c in standins.calls("systemctl")] == [
        ["klipper", "moonraker"],
        ["klipper", "moonraker"],
    ]


def test_public_start_and_stop_helpers(standins: Standins) -> None:
    service.stop_services(("klipper",))
    assert standins.unit_state() == "inactive"
    service.start_services(("klipper",))
    assert standins.unit_state() == "active"
    standins.set("systemctl", {"start": {"exit": 1, "stderr": "Unit klipper.service not found."}})
    with pytest.raises(ServiceError, match="Unit klipper.service not found"):
        service.start_services(("klipper",), tries=2, retry_delay=0)
    assert standins.systemctl_verbs() == ["stop", "start", "start", "start"]


def test_children_do_not_inherit_notify_env(
    standins: Standins, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/nowhere")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with service.klipper_service_stopped():
        pass
    assert all(c["notify_env"] == [] for c in standins.calls())


def test_sigterm_handler_is_restored(standins: Standins) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with service.klipper_service_stopped():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_worker_thread_leaves_signals_alone(standins: Standins) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def worker() -> None:
        with service.klipper_service_stopped():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert seen == [before]
    assert standins.systemctl_verbs() == ["stop", "start"]


def test_unit_exec_hook_stop_waits_for_the_process(standins: Standins, tmp_path: Path) -> None:
    """The board farm's "Klipper" is a real process: stop returns only once it is gone."""
    standins.set_unit_exec("klipper", [sys.executable, "-c", "import time; time.sleep(600)"])
    service.start_services(("klipper",))
    pid = wait_until(lambda: standins.unit_pid("klipper"))
    assert pid_alive(pid)
    service.stop_services(("klipper",))
    assert not pid_alive(pid)
    assert standins.unit_state() == "inactive"


def test_no_new_privileges_uses_polkit_not_sudo(
    standins: Standins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped unit: the Klipper user, NoNewPrivileges=yes, a polkit rule; sudo can't work."""
    monkeypatch.setattr(service, "running_as_root", lambda: False)
    monkeypatch.setattr(service, "no_new_privileges", lambda: True)
    with service.klipper_service_stopped():
        pass
    assert standins.calls("sudo") == []
    argvs = [c["argv"] for c in standins.calls("systemctl") if c.get("verb") in ("stop", "start")]
    assert argvs == [["--no-ask-password", "stop", "klipper"], ["--no-ask-password", "start", "klipper"]]


def test_missing_polkit_rule_names_the_fix(standins: Standins, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "running_as_root", lambda: False)
    monkeypatch.setattr(service, "no_new_privileges", lambda: True)
    standins.set("systemctl", {"stop": {"exit": 1, "stderr": "Failed to stop klipper.service: Access denied"}})
    with pytest.raises(ServiceError, match="Access denied; .*install its polkit rule"):
        with service.klipper_service_stopped():
            pass


def test_no_new_privileges_reads_proc_status() -> None:
    # pytest does not run under NoNewPrivileges; a child started with it does.
    assert service.no_new_privileges() is False
    out = subprocess.run(
        ["setpriv", "--no-new-privs", sys.executable, "-c",
         "from kflashd import service; print(service.no_new_privileges())"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.stdout.strip() == "True", out.stderr
