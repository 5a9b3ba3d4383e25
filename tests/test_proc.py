"""proc: a tool started by a daemon that dies with SIGKILL must not outlive it, nor must
anything the tool started (its process group); and no preexec_fn does it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kflashd import proc

from tests.standins.fixtures import pid_alive, wait_until


def test_child_dies_with_a_sigkilled_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    grandchild_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import threading
        from kflashd import proc
        # Started from a worker thread, as the daemon's flash cycle does; the tool starts a
        # helper of its own (in its process group), as make does.
        def work():
            proc.stream(["sh", "-c", "sleep 60 & echo $! > {grandchild_file}; "
                         "echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file} && exec sleep 60"], timeout=120)
        t = threading.Thread(target=work)
        t.start()
        t.join()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        wait_until(pid_file.exists, timeout=10)
        child = int(pid_file.read_text())
        grandchild = int(grandchild_file.read_text())
        assert pid_alive(child) and pid_alive(grandchild)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not pid_alive(child) and not pid_alive(grandchild), timeout=5,
                   what="the tool and its helper to die with the daemon")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_no_preexec_fn_in_the_daemon():
    """preexec_fn may deadlock in a threaded process: the package must not use it."""
    package = Path(proc.__file__).parent
    users = [p.name for p in package.glob("*.py") if "preexec_fn=" in p.read_text()]
    assert users == []


def test_exit_status_and_signals_come_through_the_wrapper(tmp_path):
    assert proc.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10).returncode == 3
    killed = proc.run(["sh", "-c", "kill -9 $$"], timeout=10)
    assert killed.returncode == -signal.SIGKILL and killed.describe_failure() == "killed by SIGKILL"
    ok = proc.run(["sh", "-c", "echo hi"], timeout=10)
    assert ok.ok and ok.stdout == "hi\n" and ok.argv == ["sh", "-c", "echo hi"]
    with pytest.raises(FileNotFoundError):
        proc.run([str(tmp_path / "no-such-tool")], timeout=10)
