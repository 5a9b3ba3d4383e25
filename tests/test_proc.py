"""proc: a tool started by a daemon that dies with SIGKILL must not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from tests.standins.fixtures import pid_alive, wait_until


def test_child_dies_with_a_sigkilled_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import threading
        from kflashd import proc
        # Started from a worker thread, as the daemon's flash cycle does.
        def work():
            proc.stream(["sh", "-c", "echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file} && exec sleep 60"], timeout=120)
        t = threading.Thread(target=work)
        t.start()
        t.join()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        wait_until(pid_file.exists, timeout=10)
        child = int(pid_file.read_text())
        assert pid_alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not pid_alive(child), timeout=5)
    finally:
        if parent.poll() is None:
            parent.kill()
