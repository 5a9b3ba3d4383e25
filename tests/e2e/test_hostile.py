"""Hostile input against the real daemon: a fuzzed control socket, bad images, bad selectors.

The fuzz is seeded (FUZZ_SEED), so a failure names the request that broke it and runs again
the same way. What must hold throughout: the daemon answers a ping after every batch, every
reply is one JSON object with "ok" true/false, a rejected request changes no file under the
state dir (snapshot before/after: paths, modes, mtimes, hashes), and nothing in the daemon's
log says a handler crashed. Then an ordinary queue and flash still work.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from kflashd.control import MAX_CONNECTIONS
from tests.e2e.conftest import MCU, SERIAL, Printer
from tests.e2e.harness import KflashdProcess, wait_until
from tests.farm.images import make_dict, make_image
from tests.support import public

pytestmark = pytest.mark.e2e

FUZZ_SEED = 20240511
MAX_IMAGE = 65536
MAX_REQUEST = MAX_IMAGE * 4 // 3 + 64 * 1024  # what the daemon derives from max_image_size
COMMANDS = ("ping", "queue", "list", "history", "status", "devices", "cancel", "watch")
ABSENT_SERIAL = "ABCDEF0123456789"  # hex, so a valid selector; no such board is plugged in

# Strings a hostile client would try where an id, a path or a name is expected.
NASTY_STRINGS = [
    "../../etc/passwd", "..", ".", "/", "/etc/passwd", "./", "..\\..\\x", "\x00", "abc\x00def",
    "000000000000\x00", "\n", "\r\n", "a\nb", "é", "\u202e", "\ud800", "\U0001F600" * 20, "%s%n",
    "${HOME}", "$(reboot)", "`id`", "; rm -rf /", "*", "?", "~", "~root", "-rf", "--force",
    "/dev/null", "/dev/../etc/shadow", "/dev/serial/by-id/../../../etc/passwd",
    "/dev/serial/by-id/usb-katapult_" + "x_" * 500, "/dev/" + "usb-katapult_" * 2000,
    "x" * 5000, " ", "\t", "null", "true", "0", "-1", "ABCD\n", "octopus", "OCTOPUS",
]


# ---------------------------------------------------------------- helpers ----------


def queue_request(image: bytes, board: str = ABSENT_SERIAL, **fields: Any) -> Dict[str, Any]:
    request: Dict[str, Any] = {
        "cmd": "queue", "board": board, "image": base64.b64encode(image).decode(),
        "sha256": hashlib.sha256(image).hexdigest(), "mcu": MCU, "version": "v0.13.0-fuzz",
        "force": False, "now": False,
    }
    request.update(fields)
    return request


def line_of(message: Any) -> bytes:
    return json.dumps(message).encode() + b"\n"


def connect(path: Path, timeout: float = 10) -> socket.socket:
    """Like kflashctl: a full listen backlog means wait, not fail."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(True)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            continue
        sock.settimeout(timeout)
        return sock


def read_replies(sock: socket.socket, count: int) -> Tuple[List[Dict[str, Any]], bool]:
    """Up to `count` reply lines; (replies, whether the daemon closed the connection)."""
    replies: List[Dict[str, Any]] = []
    buffer = b""
    while len(replies) < count:
        newline = buffer.find(b"\n")
        if newline >= 0:
            line, buffer = buffer[:newline], buffer[newline + 1:]
            reply = json.loads(line)
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
            replies.append(reply)
            continue
        try:
            data = sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            assert not buffer, f"connection closed mid-reply: {buffer[:200]!r}"
            return replies, True
        buffer += data
    return replies, False


def exchange(path: Path, lines: List[bytes], half_close: bool = False,
             to_eof: bool = False) -> Tuple[List[Dict[str, Any]], bool]:
    """Send `lines` on one connection while reading the replies (so neither side blocks);
    with `to_eof`, go on reading until the daemon closes the connection."""
    sock = connect(path)
    try:
        def send() -> None:
            try:
                sock.sendall(b"".join(lines))
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the daemon hung up (too large, busy): its reply says why

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return read_replies(sock, 1 << 30 if to_eof else len(lines))
        finally:
            sender.join(30)
    finally:
        sock.close()


def ping(path: Path) -> None:
    replies, _ = exchange(path, [line_of({"cmd": "ping"})])
    assert replies and replies[0]["ok"] is True and "version" in replies[0], replies


def snapshot(directory: Path) -> Dict[str, Tuple[Any, ...]]:
    """Every path under `directory`, with mode, mtime and (for files) size and sha256."""
    result: Dict[str, Tuple[Any, ...]] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            digest = None
            if name in files and os.path.isfile(path):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            result[os.path.relpath(path, directory)] = (st.st_mode, st.st_mtime_ns, st.st_size, digest)
    st = os.lstat(directory)
    result["."] = (st.st_mode, st.st_mtime_ns)
    return result


def assert_no_crash_logged(daemon: KflashdProcess) -> None:
    text = daemon.log()
    assert "Traceback" not in text and "internal error" not in text, text[-5000:]


# ---------------------------------------------------------------- request makers ---


class Fuzz:
    """Seeded makers of rejected requests; each returns (line, kind).

    kind: "reject" (ok false, the connection goes on), "read" (a read-only command: ok
    may be true, nothing is written), "close" (too large: ok false, then the daemon hangs
    up, so it travels alone).
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # A real Klipper-shaped image (data dictionary inside): a request with one field wrong
        # must be refused for that field, not because the image has no dictionary.
        self.image = make_image(mcu=MCU, size=2048, seed=seed)
        self.counts: Dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def nasty(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(NASTY_STRINGS)
        return "".join(chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x3000),
                                        rng.randrange(0xD800, 0xE000), rng.randrange(0x10000, 0x10FFFF)]))
                       for _ in range(rng.randrange(1, 40)))

    def wrong_value(self) -> Any:
        rng = self.rng
        return rng.choice([
            None, True, False, 0, -1, 1, 2 ** 64, -(2 ** 63), 1e308, 0.5, float("nan"), "", [], [1, "a"], {},
            {"$ne": None}, [[[[[]]]]], self.nasty(), "x" * rng.randrange(1, 3000),
        ])

    def random_bytes(self) -> Tuple[bytes, str]:
        self.count("random bytes")
        data = self.rng.randbytes(self.rng.randrange(0, 400))
        return data.replace(b"\n", b" ") + b"\n", "reject"

    def bad_json(self) -> Tuple[bytes, str]:
        self.count("bad JSON")
        text = json.dumps(queue_request(self.image))
        rng = self.rng
        choice = rng.randrange(6)
        if choice == 0:
            text = text[: rng.randrange(1, len(text) - 1)]  # truncated
        elif choice == 1:
            text = "{" * rng.randrange(1, 50000)
        elif choice == 2:
            text = "[" * rng.randrange(2000, 60000)  # deeper than the decoder's recursion limit
        elif choice == 3:
            text = "{'cmd': 'ping'}"  # Python, not JSON
        elif choice == 4:
            text = '{"cmd": "ping",}'
        else:
            text = text.replace('"', "", rng.randrange(1, 5))
        return text.encode(errors="surrogatepass") + b"\n", "reject"

    def not_an_object(self) -> Tuple[bytes, str]:
        self.count("JSON that is not an object with a string cmd")
        rng = self.rng
        value = rng.choice([
            self.wrong_value(), [{"cmd": "ping"}], {"command": "ping"}, {"CMD": "ping"},
            {"cmd": self.rng.choice([None, 1, True, [], {}, ["ping"], {"ping": 1}, 1.5])},
        ])
        if value is None or (isinstance(value, str) and value):
            value = [value]
        return line_of(value), "reject"

    def unknown_command(self) -> Tuple[bytes, str]:
        self.count("unknown command")
        rng = self.rng
        cmd = rng.choice([
            self.nasty(), "PING", "ping ", " ping", "Queue", "queue\x00", "_cmd_ping", "__init__",
            "__class__", "run", "stop", "_schedule", "_handle_request", "shutdown", "reload", "exec",
            rng.choice(COMMANDS) + rng.choice(["x", "_", "\x00", "\n", "/"]),
        ])
        if cmd in COMMANDS:
            cmd += "?"
        return line_of({"cmd": cmd, "job": self.nasty(), "board": self.nasty()}), "reject"

    def queue_wrong_field(self) -> Tuple[bytes, str]:
        """A valid queue request with exactly one field wrong (or missing)."""
        self.count("queue: one field wrong")
        rng = self.rng
        request = queue_request(self.image)
        field = rng.choice(["board", "image", "sha256", "force", "now", "mcu", "version"])
        if rng.random() < 0.1 and field in ("board", "image", "sha256"):
            del request[field]
        elif field == "board":
            request["board"] = rng.choice([
                self.wrong_value(), self.wrong_value(), rng.choice(NASTY_STRINGS), "octopus",
                "/dev/ttyACM0", "/dev/serial/by-id/not-a-board", "ABC", "A" * 65, "G1234",
            ])
            if isinstance(request["board"], str) and _would_resolve(request["board"]):
                request["board"] = "not a serial"
        elif field == "image":
            request["image"] = rng.choice([
                self.wrong_value(), "!!!!", "abc", "YWJj=", "YW Jj", base64.b64encode(b"x").decode() + "\n",
                base64.b64encode(self.image).decode()[:-4], base64.b64encode(self.image[:-1]).decode(),
                base64.urlsafe_b64encode(b"\xfb\xff" * 600).decode(), "é" * 8, "====",
            ])
        elif field == "sha256":
            request["sha256"] = rng.choice([
                self.wrong_value(), hashlib.sha256(b"other").hexdigest(), "0" * 64,
                hashlib.sha256(self.image).hexdigest()[:-1], hashlib.sha1(self.image).hexdigest(),
                hashlib.sha256(self.image).hexdigest() + "0", "../../etc/passwd",
            ])
        elif field in ("force", "now"):
            request[field] = rng.choice(["yes", "no", "true", "false", "", 1, 0, -1, [], [True], {}, 1.0, "\x00"])
        else:
            request[field] = rng.choice([1, 0, True, False, [], ["stm32"], {}, 1.5, {"a": "b"}])
        return line_of(request), "reject"

    def huge_image(self) -> Tuple[bytes, str]:
        """Bigger than max_image_size with a correct sha256: refused by size, not by parsing."""
        self.count("queue: image over max_image_size")
        data = self.rng.randbytes(self.rng.randrange(MAX_IMAGE + 1, MAX_IMAGE + 40000))
        return line_of(queue_request(data)), "reject"

    def empty_image(self) -> Tuple[bytes, str]:
        self.count("queue: empty image")
        return line_of(dict(queue_request(b""), image="")), "reject"

    def history(self) -> Tuple[bytes, str]:
        self.count("history: bad limit")
        limit = self.rng.choice([-1, 0, 10001, 2 ** 31, 10 ** 40, -(10 ** 40), True, False, None, "5", "",
                                 1.5, 1e3, float("inf"), [], [5], {}, self.nasty()])
        return line_of({"cmd": "history", "limit": limit}), "reject"

    def job_command(self) -> Tuple[bytes, str]:
        self.count("cancel/watch: bad or unknown job id")
        rng = self.rng
        token = f"{rng.getrandbits(48):012x}"  # a well-formed id that no job has
        job = rng.choice([
            self.nasty(), rng.choice(NASTY_STRINGS), self.wrong_value(), token, token.upper(), token + "\n",
            token[:11], "../" + token, token + "/../" + token, "../jobs/" + token, "images/../" + token,
            "0" * 12, token + ".json", "../images/" + token + ".bin", "\x00" + token[1:],
        ])
        request = {"cmd": rng.choice(["cancel", "watch"])}
        if rng.random() > 0.05:
            request["job"] = job
        return line_of(request), "reject"

    def read_only(self) -> Tuple[bytes, str]:
        self.count("read-only command with junk fields")
        rng = self.rng
        request: Dict[str, Any] = {"cmd": rng.choice(["ping", "list", "status", "devices", "history"])}
        for _ in range(rng.randrange(0, 4)):
            request[self.nasty()[:20]] = self.wrong_value()
        request.pop("limit", None)
        return line_of(request), "read"

    def too_large(self) -> Tuple[bytes, str]:
        self.count("too large")
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:  # no newline at all, past max_request
            return b"z" * (MAX_REQUEST + rng.randrange(1, 100000)), "close"
        if choice == 1:  # an ordinary command padded past 64 KiB
            return line_of({"cmd": rng.choice(["status", "ping", "cancel"]), "pad": "p" * (70 * 1024)}), "close"
        if choice == 2:  # an unknown command the size of an image
            return line_of({"cmd": "q" * (70 * 1024)}), "close"
        data = rng.randbytes(MAX_REQUEST)  # its base64 is far past max_request
        return line_of(queue_request(data)), "close"

    def any_rejected(self) -> Tuple[bytes, str]:
        maker = self.rng.choices(
            [self.random_bytes, self.bad_json, self.not_an_object, self.unknown_command, self.queue_wrong_field,
             self.huge_image, self.empty_image, self.history, self.job_command, self.read_only],
            weights=[12, 8, 10, 10, 30, 1, 1, 8, 12, 8],
        )[0]
        return maker()


def _would_resolve(selector: str) -> bool:
    """Whether the daemon would accept this selector for a board that is not plugged in."""
    import re

    from kflashd.devices import serial_from_by_id

    return bool(re.fullmatch(r"[0-9A-Fa-f]{4,64}", selector)) or (
        selector.startswith("/dev/") and serial_from_by_id(selector) is not None)


def check_batch(lines: List[Tuple[bytes, str]], replies: List[Dict[str, Any]], closed: bool,
                daemon: Optional[KflashdProcess] = None) -> None:
    if daemon is not None and daemon.process is not None and daemon.process.poll() is not None:
        raise AssertionError(f"kflashd died (exit {daemon.process.returncode}):\n{daemon.log()[-4000:]}")
    assert len(replies) == len(lines), (len(replies), len(lines), closed, replies[-3:])
    for (line, kind), reply in zip(lines, replies):
        if kind != "read":
            assert reply["ok"] is False, (line[:300], reply)
            assert reply.get("code") in ("bad_request", "rejected", "too_large"), (line[:300], reply)
            assert isinstance(reply.get("error"), str) and reply["error"], reply
        else:
            assert reply["ok"] is True, (line[:300], reply)


# ---------------------------------------------------------------- the fuzz ---------


def test_fuzzed_control_socket_keeps_serving_and_rejects_without_writing(make_daemon, farm, standins, image):
    daemon = make_daemon(config_extra=f"max_image_size = {MAX_IMAGE}")
    started = time.monotonic()
    sock_path = daemon.control_socket
    ping(sock_path)
    fuzz = Fuzz(FUZZ_SEED)
    before = snapshot(daemon.state_dir)
    sent = 0

    # 0. A selector crafted to make a by-id regex backtrack (quadratic before the fix):
    #    answered at once, and the loop (watchdog, other clients) never stalls on it.
    crafted = queue_request(fuzz.image, board="/dev/" + "usb-katapult_" * 11000)
    assert len(line_of(crafted)) < MAX_REQUEST
    t0 = time.monotonic()
    replies, _ = exchange(sock_path, [line_of(crafted)])
    assert replies[0]["ok"] is False and "unknown board" in replies[0]["error"], replies
    assert time.monotonic() - t0 < 2.0, f"the crafted selector took {time.monotonic() - t0:.1f} s"
    sent += 1

    # 1. Batches of rejected and read-only requests, some half-closed after sending.
    for batch_no in range(60):
        lines = [fuzz.any_rejected() for _ in range(100)]
        replies, closed = exchange(sock_path, [line for line, _ in lines], half_close=batch_no % 3 == 0)
        check_batch(lines, replies, closed, daemon)
        sent += len(lines)
        ping(sock_path)

    # 2. Too large: each alone on its connection, which the daemon closes after its reply.
    for _ in range(40):
        line, kind = fuzz.too_large()
        replies, closed = exchange(sock_path, [line], to_eof=True)
        assert replies == [{"ok": False, "code": "too_large", "error": "request too large"}], replies
        assert closed
        sent += 1
    ping(sock_path)

    # 3. Half-closed connections: mid-line, empty, and right after a request.
    for data in (b'{"cmd":"status"', b"", b'{"cmd":"queue","board":', b"\n", b'{"cmd":"watch","job":"0000'):
        sock = connect(sock_path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        replies, closed = read_replies(sock, 10)
        sock.close()
        assert closed and len(replies) <= 1 and all(r["ok"] is False for r in replies), replies
        fuzz.count("half-closed mid-request")
        sent += 1
    ping(sock_path)

    # 4. Many concurrent clients (more than MAX_CONNECTIONS): each thread runs rejected batches.
    failures: List[str] = []
    busy = [0]
    counts_lock = threading.Lock()
    concurrent_sent = [0]

    def client(seed: int) -> None:
        own = Fuzz(seed)
        try:
            for _ in range(4):
                lines = [own.any_rejected() for _ in range(25)]
                replies, closed = exchange(sock_path, [line for line, _ in lines])
                if replies and replies[0].get("code") == "busy":
                    with counts_lock:
                        busy[0] += 1
                    continue
                check_batch(lines, replies, closed, daemon)
                with counts_lock:
                    concurrent_sent[0] += len(lines)
        except BaseException as e:  # collected with the seed, to replay it
            failures.append(f"client seed {seed}: {e!r}"[:2000])

    threads = [threading.Thread(target=client, args=(FUZZ_SEED + 1 + t,)) for t in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]
    sent += concurrent_sent[0]
    fuzz.counts["concurrent clients (80 threads)"] = concurrent_sent[0]
    ping(sock_path)

    # 4b. A burst that holds more connections open than MAX_CONNECTIONS at once.
    held = [connect(sock_path) for _ in range(MAX_CONNECTIONS + 36)]
    served = refused = 0
    try:
        for sock in held:
            try:
                sock.sendall(line_of({"cmd": "history", "limit": -1}))
            except OSError:
                pass  # already told busy and closed: the reply is waiting
        for sock in held:
            replies, _ = read_replies(sock, 1)
            assert len(replies) == 1 and replies[0]["ok"] is False, replies
            if replies[0]["code"] == "busy":
                refused += 1
            else:
                assert replies[0]["code"] == "bad_request", replies
                served += 1
    finally:
        for sock in held:
            sock.close()
    assert refused >= 36 and served >= MAX_CONNECTIONS - 4, (served, refused)
    fuzz.counts["burst of held connections (busy past the limit)"] = len(held)
    sent += len(held)
    ping(sock_path)

    assert snapshot(daemon.state_dir) == before, "a rejected request touched the state dir"
    rejected_phase = sent

    # 5. Byte flips of valid requests: some still parse and are accepted (a flip in the
    #    board selector, a key the daemon ignores); a batch with no acceptance changes nothing.
    rng = random.Random(FUZZ_SEED ^ 0xF11F)
    small = rng.randbytes(48)  # a short image: more flips land in the other fields
    accepted_jobs: List[Dict[str, Any]] = []
    mutations = 0
    for batch_no in range(60):
        state = snapshot(daemon.state_dir)
        lines = []
        for _ in range(50):
            base = rng.choice([
                queue_request(small, board=rng.choice([ABSENT_SERIAL, "0123456789AB"])),
                queue_request(fuzz.image, board=ABSENT_SERIAL, force=True),
                {"cmd": "history", "limit": 5}, {"cmd": "cancel", "job": "0123456789ab"}, {"cmd": "status"},
            ])
            data = bytearray(json.dumps(base).encode())
            for _ in range(rng.randrange(1, 4)):
                position = rng.randrange(len(data))
                how = rng.randrange(3)
                if how == 0:
                    data[position] ^= rng.randrange(1, 256)  # any byte, often not UTF-8
                elif how == 1:
                    data[position] ^= 1 << rng.randrange(7)  # one bit: stays ASCII
                else:
                    data[position] = rng.randrange(0x20, 0x7F)  # a printable character
                if data[position] == 0x0A:
                    data[position] = 0x20
            lines.append(bytes(data) + b"\n")
        mutations += len(lines)
        replies, closed = exchange(sock_path, lines)
        assert len(replies) == len(lines) and not closed, replies[-3:]
        accepted = [r for r in replies if r["ok"] and "job" in r]
        accepted_jobs += [r["job"] for r in accepted]
        if not any(r["ok"] and ("job" in r) for r in replies):
            assert snapshot(daemon.state_dir) == state, f"batch {batch_no}: a rejected mutation wrote state"
        sent += len(lines)
        ping(sock_path)
    fuzz.counts["byte-flipped valid requests"] = mutations
    fuzz.counts["of which accepted as jobs"] = len(accepted_jobs)

    # Every accepted mutation is a real job the daemon knows about.
    # (History keeps the newest 200 finished jobs: check the newest accepted ones.)
    known = {j["id"] for j in daemon.ctl_json("list") + daemon.ctl_json("history", "--limit", "10000")}
    assert {j["id"] for j in accepted_jobs[-150:]} <= known

    # 6. After all that: an ordinary queue and flash.
    assert_no_crash_logged(daemon)
    fuzz_seconds = time.monotonic() - started
    Printer(standins, daemon).start()
    job_id = daemon.queue(SERIAL, str(image))
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    job = daemon.wait_job(job_id, ["done", "failed"])
    assert job["state"] == "done", job["message"]
    data = image.read_bytes()
    assert farm.flashed_image(SERIAL, len(data)) == data
    assert_no_crash_logged(daemon)

    print(f"\nfuzz seed {FUZZ_SEED}: {sent} requests ({rejected_phase} in the rejected-only phase, "
          f"{busy[0]} concurrent batches and {refused} held connections told busy) in {fuzz_seconds:.1f} s")
    for what, count in sorted(fuzz.counts.items()):
        print(f"  {count:6d}  {what}")
    assert sent >= 10000


# ---------------------------------------------------------------- who may connect --


def ctl_as(daemon: KflashdProcess, user: str, group: str, *args: str,
           extra_groups: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """kflashctl as another user with exactly these groups (as after that user's login)."""
    env = {k: v for k, v in daemon.env.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR", "NOTIFY_SOCKET")}
    env.update(HOME="/nonexistent", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [public.python(), "-m", "kflashd.ctl", "--config", str(daemon.config_path), *args],
        env=env, capture_output=True, text=True, timeout=30, cwd=str(public.root()),
        user=user, group=group, extra_groups=extra_groups or [],
    )


def test_user_outside_the_group_is_refused(farm, standins, temp_group, open_workdir):
    daemon = KflashdProcess(open_workdir, farm.env, standins.dir)
    config = daemon.config_path.read_text()
    daemon.config_path.write_text(config.replace(f'group = "{grp.getgrgid(os.getgid()).gr_name}"',
                                                 f'group = "{temp_group}"', 1))
    assert f'group = "{temp_group}"' in daemon.config_path.read_text()
    daemon.start()
    try:
        wait_until(lambda: daemon.ctl("status").returncode == 0, 20, "kflashd to answer root")
        st = os.stat(daemon.control_socket)
        assert oct(st.st_mode & 0o777) == oct(0o660) and st.st_gid == grp.getgrnam(temp_group).gr_gid

        # 0660 and not in the group: the kernel refuses connect(); kflashctl names the fix.
        result = ctl_as(daemon, "nobody", "nogroup", "status")
        assert result.returncode == 4, result.stdout + result.stderr
        assert f"permission denied on {daemon.control_socket}" in result.stderr
        assert f"sudo usermod -aG {temp_group} $USER" in result.stderr

        # A misconfigured 0666: SO_PEERCRED still refuses, and the daemon names the group.
        os.chmod(daemon.control_socket, 0o666)
        result = ctl_as(daemon, "nobody", "nogroup", "status")
        assert result.returncode == 4, result.stdout + result.stderr
        assert "user nobody may not use kflashd" in result.stderr
        assert f"add it to group '{temp_group}' (sudo usermod -aG {temp_group} nobody)" in result.stderr
        firmware = open_workdir / "klipper.bin"
        firmware.write_bytes(make_image(mcu=MCU, size=3000, seed=8))
        result = ctl_as(daemon, "nobody", "nogroup", "queue", ABSENT_SERIAL, str(firmware))
        assert result.returncode == 4 and "may not use kflashd" in result.stderr, result.stderr
        assert daemon.ctl_json("list") == []

        # Once nobody is a member, the same call works (0660 again, group given at login).
        os.chmod(daemon.control_socket, 0o660)
        subprocess.run(["gpasswd", "-a", "nobody", temp_group], check=True, capture_output=True, timeout=30)
        result = ctl_as(daemon, "nobody", "nogroup", "status", extra_groups=[temp_group])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "kflashd" in result.stdout
    finally:
        daemon.stop()


# ---------------------------------------------------------------- images via kflashctl


def test_bad_images_are_refused_by_kflashctl(make_daemon, tmp_path):
    daemon = make_daemon(config_extra=f"max_image_size = {MAX_IMAGE}")
    cases = {}
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    cases["empty"] = (empty, "is empty")
    big = tmp_path / "big.bin"
    big.write_bytes(make_image(mcu=MCU, size=MAX_IMAGE + 1, seed=2))
    cases["too big"] = (big, f"more than max_image_size ({MAX_IMAGE})")
    cases["missing"] = (tmp_path / "nope" / "klipper.bin", "no such file")
    cases["directory"] = (tmp_path, "is a directory")
    for what, (path, message) in cases.items():
        result = daemon.ctl("queue", ABSENT_SERIAL, str(path), timeout=20)
        assert result.returncode == 2, (what, result.stdout, result.stderr)
        assert message in result.stderr, (what, result.stderr)
    assert daemon.ctl_json("list") == []


def test_a_fifo_or_device_as_image_fails_at_once(make_daemon, tmp_path):
    """kflashctl must not wait for a FIFO's writer, nor read /dev/zero until memory runs out."""
    daemon = make_daemon()
    fifo = tmp_path / "klipper.bin"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        try:
            result = daemon.ctl("queue", ABSENT_SERIAL, str(path), timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"kflashctl hangs on {path}") from None
        assert result.returncode == 2, (path, result.stdout, result.stderr)
        assert "not a regular file" in result.stderr, result.stderr
    assert daemon.ctl_json("list") == []


def test_mcu_mismatch_is_refused_with_exit_2(make_daemon, farm, tmp_path):
    farm.add_board(serial=SERIAL, mcu=MCU, mode="katapult")
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL}})
    out = tmp_path / "rp" / "out"
    out.mkdir(parents=True)
    (out / "klipper.bin").write_bytes(make_image(mcu="rp2040", version="v-rp", size=3000, seed=3))
    (out / "klipper.dict").write_text(make_dict(mcu="rp2040", version="v-rp"))
    result = daemon.ctl("queue", "octopus", str(out / "klipper.bin"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "built for rp2040 but the board is stm32f446xx: refusing to flash" in result.stderr
    # No dictionary inside the image: a klipper.dict beside it is only a neighbour and proves
    # nothing about these bytes, so the image's MCU counts as unknown and it is refused.
    (out / "klipper.bin").write_bytes(b"\x00\x20\x00\x20" + bytes(range(256)) * 8)
    result = daemon.ctl("queue", "octopus", str(out / "klipper.bin"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no Klipper data dictionary" in result.stderr
    assert daemon.ctl_json("list") == []


# ---------------------------------------------------------------- board selectors --


def test_board_selectors(make_daemon, image):
    daemon = make_daemon(boards={"octopus": {"serial": SERIAL}, "ebb36": {"serial": "4E0030000E50533357363520"}})

    result = daemon.ctl("queue", "nosuchboard", str(image))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown board 'nosuchboard'" in result.stderr
    assert "(known: ebb36, octopus)" in result.stderr

    for bad in ("../../etc/passwd", "/dev/serial/by-id/usb-FTDI_FT232R_A1B2-if00", "ABCD EF", "/dev/ttyACM9"):
        result = daemon.ctl("queue", bad, str(image))
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert "unknown board" in result.stderr, (bad, result.stderr)

    # A by-id path of either mode for a board that is not plugged in: its serial is in the name.
    for link, serial in (("/dev/serial/by-id/usb-katapult_stm32h723xx_1D0023000F51313236343430-if00",
                          "1D0023000F51313236343430"),
                         ("/dev/serial/by-id/usb-Klipper_rp2040_E66138935F5F3C2B-if00", "E66138935F5F3C2B")):
        result = daemon.ctl("queue", link, str(image))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"no board with serial {serial} is connected now" in result.stdout
        job = [j for j in daemon.ctl_json("list") if j["selector"] == link]
        assert len(job) == 1 and job[0]["serial"] == serial, job
    assert daemon.ctl_json("list")[0]["state"] == "queued"


def queue_in_process(daemon: Any, request: Dict[str, Any]) -> Dict[str, Any]:
    """A queue request through the daemon's handler without the socket: the image is
    checked in the staging worker, the reply comes back through the loop's call queue."""
    from kflashd.control import PENDING

    replies: List[Dict[str, Any]] = []

    class Conn:
        closed = False

        def reply(self, message: Dict[str, Any]) -> None:
            replies.append(message)

    reply = daemon.commands.handle(Conn(), request)
    if reply is not PENDING:
        return reply

    def answered() -> bool:
        daemon.reactor._run_calls()  # one turn of the loop's work from other threads
        return bool(replies)

    wait_until(answered, 10, "the staging worker's answer")
    return replies[0]


def test_ambiguous_serial_is_refused(tmp_path):
    """Two connected boards reporting serial 12345 (built without CHIPID): which one is meant?

    The emulated farm keys boards by serial, so this one drives the daemon's request handler
    in-process with a board table holding two such boards on two USB ports.
    """
    from kflashd.config import load_config
    from kflashd.daemon import Daemon
    from kflashd.models import Board

    config_path = tmp_path / "kflashd.toml"
    config_path.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    daemon = Daemon(load_config(str(config_path)))

    class Boards:
        boards = {
            f"/sys/tty{n}": Board(serial="12345", mode="katapult", mcu=MCU, device_node=f"/dev/ttyACM{n}",
                                  sys_path=f"/sys/tty{n}", port_path=f"1-1.{n + 2}",
                                  by_id=f"/dev/serial/by-id/usb-katapult_{MCU}_12345-if00")
            for n in (0, 1)
        }

        def find(self, serial: str, mode: Optional[str] = None) -> List[Board]:
            return [b for b in self.boards.values() if b.serial == serial and mode in (None, b.mode)]

        def serial_is_shared(self, serial: str) -> bool:
            return len({b.port_path for b in self.find(serial)}) > 1

    daemon.monitor = Boards()  # type: ignore[assignment]
    try:
        data = make_image(mcu=MCU, size=3000, seed=1)
        for selector in ("12345", f"/dev/serial/by-id/usb-katapult_{MCU}_12345-if00"):
            reply = queue_in_process(daemon, queue_request(data, board=selector))
            assert reply is not None and reply["ok"] is False, reply
            assert f"ambiguous board {selector!r}: more than one board reports serial 12345" in reply["error"]
            assert "/dev/ttyACM0 on port 1-1.2" in reply["error"] and "/dev/ttyACM1 on port 1-1.3" in reply["error"]
            assert "by-path" in reply["error"]  # says how to name the board
        # Not even by its device node: a job follows its board by serial (the node changes
        # when the board reboots into Katapult), and two boards report this one.
        reply = queue_in_process(daemon, queue_request(data, board="/dev/ttyACM1"))
        assert reply is not None and reply["ok"] is False and "ambiguous" in reply["error"], reply
        assert not (tmp_path / "state" / "jobs").exists() or not os.listdir(tmp_path / "state" / "jobs")
    finally:
        daemon.reactor.close()
