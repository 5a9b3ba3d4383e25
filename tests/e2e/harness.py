"""Run the real kflashd as a black box against the emulated board farm.

Everything the daemon needs comes through its config and environment, as under systemd:
a state dir and runtime dir of its own, NOTIFY_SOCKET, the farm's umockdev preload, the
stand-in `systemctl`/`sudo`/`make` first on PATH, and the stand-in Katapult tree. Used by
the end-to-end tests and by the no-hardware demo (scripts/demo), so it must not import
pytest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from tests.support import public
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
# The stand-ins as the other users who run them can reach them (make runs as nobody).
STANDINS = public.root() / "standins"
PYTHON = sys.executable


class KflashdProcess:
    """One daemon under test, its files, and helpers to drive it like a user would."""

    def __init__(
        self,
        workdir: Path,
        farm_env: Dict[str, str],
        standin_dir: Path,
        notify_socket: Optional[str] = None,
        journal_socket: Optional[str] = None,
        config_extra: str = "",
        timeouts: Optional[Dict[str, float]] = None,
        boards: Optional[Dict[str, Dict[str, Any]]] = None,
        watchdog_usec: Optional[int] = None,
        katapult_dir: Optional[Path] = None,
        klipper_dir: Optional[Path] = None,
        services: Optional[List[str]] = None,
        api_socket: Any = True,
        klipper_extra: str = "",
        wrapper: Optional[List[str]] = None,
    ) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.runtime_dir = workdir / "run"
        self.api_socket = workdir / "klippy.sock"
        self.printer_state = workdir / "printer.json"
        self.config_path = workdir / "kflashd.toml"
        self.log_path = workdir / "kflashd.log"
        self.standin_dir = standin_dir
        self.katapult_dir = katapult_dir or STANDINS / "katapult"
        self.klipper_dir = klipper_dir or workdir / "klipper"
        self.klipper_dir.mkdir(parents=True, exist_ok=True)
        self.process: Optional[subprocess.Popen] = None
        self.wrapper = list(wrapper or [])  # e.g. setpriv with root mode's capabilities
        t = {"flash": 30, "service": 10, "bootloader": 10, "reboot": 10, "guard_retry": 0.3}
        t.update(timeouts or {})
        lines = [
            f'state_dir = "{self.state_dir}"',
            f'runtime_dir = "{self.runtime_dir}"',
            f'group = "{_test_group()}"',
            config_extra,
            "[klipper]",
            "services = " + json.dumps(services or ["klipper"]),
            f'dir = "{self.klipper_dir}"',
            # True: the fake Klipper's socket; a path: that one; None: not set (from the unit)
            f'api_socket = "{self.api_socket if api_socket is True else api_socket}"' if api_socket else "",
            klipper_extra,
            "[katapult]",
            f'dir = "{self.katapult_dir}"',
            "baud = 115200",  # umockdev PTYs reject custom bauds such as 250000
            "[timeouts]",
        ] + [f"{key} = {value}" for key, value in t.items()]
        for name, table in (boards or {}).items():
            lines.append(f"[boards.{name}]")
            lines += [f"{key} = {str(value).lower()}" if isinstance(value, bool) else f'{key} = "{value}"'
                      for key, value in table.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.printer_state.write_text(json.dumps({"print_stats": "standby", "idle_timeout": "Ready"}))
        env = dict(os.environ)
        env.update(farm_env)
        # As under the unit: the stand-ins first (they play systemctl, sudo and make), then
        # the venv (its python3 runs flashtool.py), then the system; no pyenv shims, which
        # cost ~150 ms per python3 call and would distort every timing.
        env["PATH"] = os.pathsep.join(
            [str(STANDINS / "bin"), os.path.dirname(PYTHON), "/usr/local/sbin", "/usr/local/bin",
             "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        env["KFLASHD_STANDIN_DIR"] = str(standin_dir)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        if notify_socket:
            env["NOTIFY_SOCKET"] = notify_socket
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        env["KFLASHD_JOURNAL_SOCKET"] = journal_socket or str(workdir / "no-journal")
        self.env = env

    # -- the daemon ------------------------------------------------------------------

    def start(self, wait_ready: Optional[Callable[[], Any]] = None) -> "KflashdProcess":
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.wrapper + [PYTHON, "-m", "kflashd.daemon", "--config", str(self.config_path)],
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        if wait_ready is not None:
            wait_until(lambda: wait_ready() or self._died(), 20, "READY=1 from kflashd")
        else:
            wait_until(lambda: self.control_socket.exists() or self._died(), 20, "kflashd's control socket")
        self._check_alive()
        return self

    def start_ready(self, notify: Any) -> "KflashdProcess":
        """Start and wait for a READY=1 sent after this start (not by an earlier daemon)."""
        after = len(notify.messages)
        return self.start(wait_ready=lambda: any(m.startswith("READY=1") for m in notify.messages[after:]))

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _check_alive(self) -> None:
        if self._died():
            raise AssertionError(f"kflashd exited with {self.process.returncode}:\n{self.log()}")

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"kflashd did not stop within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- kflashctl -------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60, user: Optional[str] = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in self.env.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR", "NOTIFY_SOCKET")}
        # As another user: that user's own group and no supplementary ones (not root's).
        as_user = {} if user is None else {"user": user, "group": _primary_group(user), "extra_groups": []}
        return subprocess.run(
            [PYTHON, "-m", "kflashd.ctl", "--config", str(self.config_path), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(REPO),
            **as_user,
        )

    def _ctl_env(self) -> Dict[str, str]:
        return {k: v for k, v in self.env.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR", "NOTIFY_SOCKET")}

    def ctl_popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [PYTHON, "-m", "kflashd.ctl", "--config", str(self.config_path), *args],
            env=self._ctl_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
        )

    def ctl_on_terminal(self, *args: str, cwd: Optional[Path] = None, timeout: float = 30) -> "tuple[int, str]":
        """kflashctl ARGS with a terminal (a PTY) as stdin/stdout/stderr, as a person runs it:
        (exit status, everything it drew on the screen)."""
        import pty

        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "kflashd.ctl", "--config", str(self.config_path), *args],
                                stdin=slave, stdout=slave, stderr=slave, env=self._ctl_env(),
                                cwd=str(cwd or self.workdir))
        os.close(slave)
        screen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            screen += chunk
        os.close(master)
        return proc.wait(timeout), screen.decode(errors="replace")

    def queue(self, *args: str) -> str:
        """`kflashctl queue ARGS` that must succeed; returns the new job's id."""
        result = self.ctl("queue", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        match = re.search(r"^job ([0-9a-f]{12}) queued", result.stdout, re.M)
        assert match, result.stdout
        return match.group(1)

    def ctl_json(self, *args: str) -> Any:
        result = self.ctl(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def job(self, job_id: str) -> Dict[str, Any]:
        # list first: a job that finishes between the two calls is then in history.
        for job in self.ctl_json("list") + self.ctl_json("history", "--limit", "500"):
            if job["id"] == job_id:
                return job
        raise AssertionError(f"job {job_id} not found")

    def wait_job(self, job_id: str, states: List[str], timeout: float = 30) -> Dict[str, Any]:
        def done() -> Optional[Dict[str, Any]]:
            self._check_alive()
            job = self.job(job_id)
            return job if job["state"] in states else None

        return wait_until(done, timeout, f"job {job_id} to reach {states}", interval=0.1)

    def set_printer(self, print_stats: str = "standby", idle_timeout: str = "Ready", hang: bool = False) -> None:
        self.printer_state.write_text(
            json.dumps({"print_stats": print_stats, "idle_timeout": idle_timeout, "hang": hang})
        )


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _test_group() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name
