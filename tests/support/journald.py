"""A real systemd-journald in its own namespace, for tests that check what kflashd logs.

`journald` (pytest fixture) starts `/lib/systemd/systemd-journald <namespace>` with a unique
namespace per test, waits until it really accepts datagrams, and yields a `Journald` whose
`.socket` is the native-protocol socket (give it to the code under test as
KFLASHD_JOURNAL_SOCKET, see `.environ()`) and whose `.read(**matches)` returns entries via
`journalctl --namespace=... -o json`. Afterwards it stops journald and removes the namespace's
files under /var/log/journal and /run/systemd.

Why journald runs without LD_PRELOAD/UMOCKDEV_DIR: under umockdev's preload it exits at once
("Failed to acquire cgroup root path") and leaves a dead socket file behind; that is also why
"ready" means "process alive and connect() works", not "socket file exists"
(docs/testing.md, "A real journald"). NOTIFY_SOCKET is dropped too, so journald does not send its
own READY=1 to a notify listener of the test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest

JOURNALD = "/lib/systemd/systemd-journald"
JOURNALCTL = "journalctl"
START_TIMEOUT = 15.0
READ_TIMEOUT = 5.0

# Variables journald must not inherit from the test process (see the module docstring).
_DROP_ENV = ("LD_PRELOAD", "UMOCKDEV_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
             "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _machine_id() -> str:
    with open("/etc/machine-id") as f:
        return f.read().strip()


def _decode(value: Any) -> Any:
    """journalctl -o json gives non-UTF-8 (or binary) values as a list of byte values."""
    if isinstance(value, list) and value and all(isinstance(b, int) for b in value):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class Journald:
    """One systemd-journald process serving namespace `namespace`."""

    def __init__(self, namespace: Optional[str] = None) -> None:
        self.namespace = namespace or f"kflashdtest{secrets.token_hex(6)}"
        self.runtime_dir = f"/run/systemd/journal.{self.namespace}"
        self.socket = os.path.join(self.runtime_dir, "socket")
        self.stdout_socket = os.path.join(self.runtime_dir, "stdout")
        self.log_dir = f"/var/log/journal/{_machine_id()}.{self.namespace}"
        self.process: Optional[subprocess.Popen] = None
        self._output = tempfile.TemporaryFile()

    # ------------------------------------------------------------------ lifecycle ------

    def start(self, timeout: float = START_TIMEOUT) -> "Journald":
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        self.process = subprocess.Popen(
            [JOURNALD, self.namespace],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                output = self.output()
                self.stop()
                raise RuntimeError(f"systemd-journald {self.namespace} exited with {self.process.returncode}: {output}")
            if self._accepts_datagrams():
                return self
            if time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise RuntimeError(f"systemd-journald {self.namespace} not ready after {timeout} s: {output}")
            time.sleep(0.02)

    def _accepts_datagrams(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        """Stop journald (SIGTERM, then SIGKILL to its process group) and remove its files."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self._output.close()

    def __enter__(self) -> "Journald":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def output(self) -> str:
        """What journald itself printed (for failure messages)."""
        if self._output.closed:
            return ""
        self._output.seek(0)
        return self._output.read().decode("utf-8", "replace")

    def environ(self) -> Dict[str, str]:
        """Environment entries that point kflashd's journal output at this journald."""
        return {"KFLASHD_JOURNAL_SOCKET": self.socket}

    # ------------------------------------------------------------------ reading --------

    def query(self, *args: str, **matches: Any) -> List[Dict[str, Any]]:
        """One `journalctl --namespace=NS -o json --all` call with FIELD=value matches."""
        argv = [JOURNALCTL, f"--namespace={self.namespace}", "-o", "json", "--all", "--no-pager", *args]
        argv += [f"{name}={value}" for name, value in matches.items()]
        proc = subprocess.run(argv, capture_output=True, timeout=10, text=True)
        # journalctl exits 1 with "No journal files were found" before the first entry lands.
        entries = []
        for line in proc.stdout.splitlines():
            line = line.strip()
            if line:
                entry = json.loads(line)
                entries.append({k: _decode(v) for k, v in entry.items()})
        return entries

    def read(self, count: int = 1, timeout: float = READ_TIMEOUT, **matches: Any) -> List[Dict[str, Any]]:
        """Entries matching FIELD=value `matches`, polling until at least `count` are there.

        Returns what is there at the deadline (maybe fewer, maybe none): the caller's assert
        then shows what did arrive. journald writes entries to its files without delay, but
        the datagram may still sit in its queue when we first look.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self.query(**matches)
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)


@pytest.fixture
def journald() -> Iterator[Journald]:
    """A running, namespaced systemd-journald for one test (see the module docstring)."""
    with Journald() as instance:
        yield instance
