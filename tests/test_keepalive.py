"""`kflashctl --wait` never waits forever (issue 13.1): the client's bound on silence and a
closed connection, against a real socket; the daemon's keepalive tick on real records."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import types
import hashlib
from pathlib import Path
from typing import List

import pytest

from kflashd import ctl
from kflashd.errors import DaemonUnreachable
from kflashd.keepalive import Keepalive
from kflashd.models import JOB_DONE, Job
from kflashd.reactor import NEVER, Reactor
from kflashd.store import JobStore

QUEUED = {"id": "0123456789ab", "board_name": "octopus", "serial": "3A00", "state": "queued"}


def fake_daemon(path: Path, then: str) -> threading.Thread:
    """Answers one watch request, then goes silent ("silent") or hangs up ("close")."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(json.dumps({"ok": True, "job": QUEUED}).encode() + b"\n")
        if then == "close":
            conn.close()
        else:
            time.sleep(5)  # silent (longer than the bound under test), then gone
            conn.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("then", ["silent", "close"])
def test_watch_ends_on_silence_or_a_closed_connection(tmp_path, then):
    sock = tmp_path / "control.sock"
    fake_daemon(sock, then)
    config = types.SimpleNamespace(control_socket=str(sock), group="kflash")
    started = time.monotonic()
    with pytest.raises(DaemonUnreachable) as raised:
        ctl.watch(config, QUEUED["id"], out=io.StringIO(), silence=0.5)
    took = time.monotonic() - started
    message = str(raised.value)
    assert took < 3, took
    if then == "silent":
        assert "has sent nothing for 0.5 s" in message and "hung" in message, message
    else:
        assert "closed the connection before the end" in message, message
    assert "kflashctl status" in message, message


class FakeConn:
    def __init__(self, watching: str) -> None:
        self.watching = watching
        self.closed = False
        self.sent: List[dict] = []
        self.finished = False

    def send(self, message: dict) -> None:
        self.sent.append(message)

    def finish(self) -> None:
        self.finished = True


def test_keepalive_tick_sends_keepalives_and_repairs_a_missed_end(tmp_path):
    store = JobStore(str(tmp_path / "state"))
    store.load()
    jobs = []
    for n in range(2):
        image = bytes([n]) * 100


        job = Job(id=store.new_id(), selector="s", serial=f"SER{n}", board_name=None,
                  image_sha256=hashlib.sha256(image).hexdigest(), image_size=len(image), created=time.time())
        store.stage(job, image)
        jobs.append(job)
    store.finish(store.get(jobs[1].id), JOB_DONE, "done long ago")  # its end was lost
    waiting, over, batch = FakeConn(jobs[0].id), FakeConn(jobs[1].id), FakeConn("batch:abc")
    reactor = Reactor()
    daemon = types.SimpleNamespace(reactor=reactor, store=store,
                                   control=types.SimpleNamespace(connections={1: waiting, 2: over, 3: batch}))
    keepalive = Keepalive(daemon, interval=0.2)  # type: ignore[arg-type]

    keepalive.arm()
    assert keepalive._timer.waketime != NEVER
    assert keepalive._tick(100.0) == 100.2
    assert waiting.sent == [{"event": "keepalive"}] and not waiting.finished
    assert batch.sent == [{"event": "keepalive"}]
    assert over.sent[0]["event"] == "end" and over.sent[0]["job"]["state"] == "done" and over.finished
    # Nobody watching: the timer stops (an idle daemon has no periodic wake-up).
    daemon.control.connections = {}
    assert keepalive._tick(101.0) == NEVER
    reactor.close()
