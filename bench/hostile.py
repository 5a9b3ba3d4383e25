"""bench.run's `hostile` section: how the loop answers while a client attacks it.

One idle daemon (with the unit's watchdog) gets the worst queue request we can craft, an
8 MiB image of ~500 zlib streams that each inflate to 16 MiB (tests/farm/images.py,
bomb_image), while 60 other connections each start a 10.7 MiB request and never end it.
Meanwhile `status` is asked again and again over its own connection, as `kflashctl status`
does. Figures: the status round trip (p50, p99, max), the crafted request's reply time
(transfer, base64, sha256, the dictionary search up to its budget, staging), and the
daemon's peak memory (VmHWM). tests/e2e/test_loop.py asserts the bounds with a flash
running; this measures them.
"""

from __future__ import annotations

import base64
import hashlib
import select
import socket
import threading
import time
from typing import Any, Dict, List

from kflashd.control import ControlClient, encode
from tests.farm.images import bomb_image

MAX_IMAGE = 8 * 1024 * 1024  # the default max_image_size
FILLERS = 60


def _fill(sock: socket.socket, data: bytes, timeout: float) -> None:
    sock.setblocking(False)
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:sent + 262144])
        except BlockingIOError:
            if not select.select([], [sock], [], timeout)[1]:
                return


def _peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def bench_hostile(rig: Any, summary_ms: Any) -> Dict[str, Any]:
    daemon, _listener = rig.daemon("hostile", watchdog_usec=30_000_000)
    path = str(daemon.control_socket)
    bomb = bomb_image(MAX_IMAGE)
    line = encode({"cmd": "queue", "board": "ABCDEF0123456789", "image": base64.b64encode(bomb).decode(),
                   "sha256": hashlib.sha256(bomb).hexdigest(), "mcu": "stm32f446xx",
                   "force": False, "now": False})
    reply: Dict[str, Any] = {}
    done = threading.Event()

    def attacker() -> None:
        started = time.monotonic()
        with ControlClient(path, timeout=600) as client:
            client.sock.sendall(line)
            reply.update(client.receive())
        reply["_seconds"] = time.monotonic() - started
        done.set()

    latencies: List[float] = []

    def status() -> None:
        started = time.monotonic()
        with ControlClient(path, timeout=60) as client:
            client.request({"cmd": "status"})
        latencies.append(time.monotonic() - started)

    socks: List[socket.socket] = []
    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    partial = b'{"cmd":"queue","image":"' + b"A" * (MAX_IMAGE * 4 // 3 + 60 * 1024)
    try:
        for i in range(FILLERS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            socks.append(sock)
            _fill(sock, partial, 0.05)
            status()
        while not done.wait(0):
            status()
        for _ in range(50):
            status()
        thread.join(60)
    finally:
        for sock in socks:
            sock.close()
    peak = _peak_mb(daemon.process.pid)  # type: ignore[union-attr]
    daemon.stop()
    return {
        "status": summary_ms(latencies),
        "status_requests": len(latencies),
        "crafted_image_reply_ms": round(reply.get("_seconds", float("nan")) * 1000, 1),
        "crafted_image_ok": bool(reply.get("ok")),
        "peak_rss_mb": peak,
    }
