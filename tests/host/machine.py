"""A booted Debian host in a container: systemd as PID 1, real D-Bus, polkitd and journald.

``Machine`` puts a writable overlay on the cached rootfs (``rootfs.py``: the cache stays
untouched, and the overlay's upper directory is exactly what changed), boots it with
``systemd-nspawn --boot`` and runs commands inside with ``nsenter`` into the namespaces
of the container's PID 1. The test machines and CI have no systemd and no D-Bus of their
own, hence ``--register=no --keep-unit``. Every wait has a deadline; ``shutdown`` sends
SIGTERM to nspawn (a clean poweroff inside) and SIGKILL after a timeout, then unmounts.
"""
from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from tests.support.wait import wait_until

BOOT_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 20.0
COMMAND_TIMEOUT = 60.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(AssertionError):
    """A command inside the machine failed; carries its output for the test report."""


class Machine:
    """One booted container on an overlay of ``rootfs``; its files live under ``workdir``."""

    def __init__(self, rootfs: Path, workdir: Path, name: Optional[str] = None) -> None:
        self.rootfs = rootfs
        self.workdir = workdir
        # Unique: nspawn keeps per-name state in /run even with --register=no.
        self.name = name or f"kflashd-host-{secrets.token_hex(3)}"
        self.upper = workdir / "upper"
        self.root = workdir / "root"  # the merged view: the machine's "/" seen from here
        self.console_log = workdir / "console.log"
        self.nspawn: Optional[subprocess.Popen] = None
        self.leader: Optional[int] = None
        self._mounted = False

    # -- lifecycle ------------------------------------------------------------------------
    def boot(self) -> "Machine":
        for d in (self.upper, self.workdir / "overlay-work", self.root):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={self.upper},workdir={self.workdir / 'overlay-work'}",
                        str(self.root)], check=True, capture_output=True, timeout=30)
        self._mounted = True
        with open(self.console_log, "ab") as log:
            # setpriv --pdeathsig: a test run killed outright still powers the machine off.
            self.nspawn = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "--",
                 "systemd-nspawn", "--register=no", "--keep-unit", "--console=pipe", "--quiet",
                 f"--machine={self.name}", "-D", str(self.root), "--boot"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.leader = wait_until(self._find_leader, timeout=BOOT_TIMEOUT, what="the container's systemd")
        wait_until(self._booted, timeout=BOOT_TIMEOUT, what="systemctl is-system-running: running")
        return self

    def _find_leader(self) -> Optional[int]:
        """The container's PID 1 seen from here: the `systemd` that nspawn started."""
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited ({self.nspawn.returncode}):\n{self.console()}")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("PPid", "").strip() == str(self.nspawn.pid) and fields.get("Name", "").strip() == "systemd":
                return int(entry)
        return None

    def _booted(self) -> bool:
        state = self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout.strip()
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            raise AssertionError(f"the machine booted degraded:\n{failed}\n{self.console()}")
        return state == "running"

    def shutdown(self) -> None:
        """Clean poweroff (SIGTERM to nspawn), SIGKILL after a timeout, then unmount."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=10)
        if self._mounted:
            for _ in range(50):
                if subprocess.run(["umount", str(self.root)], capture_output=True, timeout=30).returncode == 0:
                    break
                time.sleep(0.1)  # a process that left the namespace a moment ago may hold it
            else:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)
            self._mounted = False
            # The overlay's upper layer holds the whole install (a venv): do not fill /tmp.
            for d in (self.upper, self.workdir / "overlay-work"):
                shutil.rmtree(d, ignore_errors=True)

    @property
    def mounted(self) -> bool:
        return self._mounted

    def console(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- commands inside ------------------------------------------------------------------
    def command(self, argv: Sequence[str], user: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                cwd: str = "/") -> List[str]:
        """The argv that runs ``argv`` inside the machine (as ``user``, with a clean environment)."""
        assert self.leader is not None, "machine not booted"
        home = "/root" if user in (None, "root") else f"/home/{user}"
        environment = {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", "USER": user or "root",
                       "LOGNAME": user or "root", **(env or {})}
        inner = ["env", "-i", *[f"{k}={v}" for k, v in environment.items()]]
        if user not in (None, "root"):
            # setpriv: the user's uid, primary group and supplementary groups, no PAM session.
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--reset-env", *inner]
        shell = f"cd {shlex.quote(cwd)} && exec " + " ".join(shlex.quote(a) for a in [*inner, *argv])
        return ["nsenter", "-t", str(self.leader), "-a", "/bin/sh", "-c", shell]

    def run(self, argv: Union[str, Sequence[str]], user: Optional[str] = None, check: bool = True,
            timeout: float = COMMAND_TIMEOUT, env: Optional[Dict[str, str]] = None, cwd: str = "/",
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a command inside; ``argv`` as a string runs through /bin/sh."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        result = subprocess.run(self.command(argv, user, env, cwd), capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise CommandError(f"{' '.join(argv)} (as {user or 'root'}) exited {result.returncode}\n"
                               f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
        return result

    def popen(self, argv: Sequence[str], user: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              cwd: str = "/", **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv, user, env, cwd), start_new_session=True, **kwargs)

    # -- files (through the overlay's merged view) ----------------------------------------
    def path(self, inside: str) -> Path:
        """A path on the overlay; not for /run, /tmp or /dev (the machine mounts its own)."""
        return self.root / inside.lstrip("/")

    def exists(self, inside: str) -> bool:
        """Asked inside, so /run and /tmp are the machine's own."""
        return self.run(["test", "-e", inside], check=False).returncode == 0

    def write(self, inside: str, text: str, mode: int = 0o644, owner: Optional[str] = None) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)
        if owner:
            self.run(["chown", f"{owner}:{owner}", inside])

    # -- systemd --------------------------------------------------------------------------
    def show(self, unit: str, prop: str) -> str:
        return self.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()

    def wait_unit(self, unit: str, state: str = "active", timeout: float = 30.0) -> str:
        def check() -> bool:
            return self.show(unit, "ActiveState") == state and (
                state != "active" or self.show(unit, "SubState") == "running")
        wait_until(check, timeout=timeout, what=f"{unit} {state}", interval=0.1)
        return self.show(unit, "MainPID")

    def journal(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", *args], check=False).stdout
