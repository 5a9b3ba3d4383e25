"""The print guard against a small Klipper API server (a real UNIX stream socket, 0x03 framing)."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import tempfile
import threading
import time
from typing import Callable, List, Optional

import pytest

from kflashd.guard import (
    ApiError,
    GuardVerdict,
    check_printer_idle,
    list_objects,
    mcu_section_is_board,
    pick_mcu_object,
    query_mcu_version,
    query_mcu_version_for,
    query_objects,
)

# What the handler returns: a reply dict (answered with the request's id), raw bytes (sent
# as they are), HANG (say nothing, keep the connection open) or CLOSE (hang up).
HANG = object()
CLOSE = object()


class FakeKlippyApi:
    """Klipper's API socket as docs/API_Server.md describes it, served by threads.

    `handler(request) -> reply` decides each answer; every request received is recorded.
    """

    def __init__(self, handler: Callable[[dict], object], piece_size: int = 0, piece_delay: float = 0.0) -> None:
        self.handler = handler
        self.piece_size = piece_size  # >0: send replies in pieces of this size (a slow peer)
        self.piece_delay = piece_delay
        self.dir = tempfile.mkdtemp(prefix="kfg")
        self.path = os.path.join(self.dir, "klippy.sock")
        self.requests: List[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(8)
        self._stop_r, self._stop_w = os.pipe()
        self._conns: List[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _accept_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self.server, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            conn, _ = self.server.accept()
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            ready, _, _ = select.select([conn, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                chunk = conn.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\x03" in buffer:
                raw, buffer = buffer.split(b"\x03", 1)
                self.requests.append(raw)
                request = json.loads(raw)
                reply = self.handler(request)
                if reply is HANG:
                    continue
                if reply is CLOSE:
                    conn.close()
                    return
                if not isinstance(reply, bytes):
                    reply = json.dumps(dict(reply, id=request["id"])).encode() + b"\x03"
                if not self.piece_size:
                    conn.sendall(reply)
                    continue
                for i in range(0, len(reply), self.piece_size):
                    conn.sendall(reply[i:i + self.piece_size])
                    time.sleep(self.piece_delay)  # simulating a slow peer, not waiting for anything

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        for t in self._threads:
            t.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self.server.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def klippy():
    servers = []

    def start(handler, **options):
        server = FakeKlippyApi(handler, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def status_reply(status: dict) -> dict:
    return {"result": {"eventtime": 1234.5, "status": status}}


def states(print_stats: Optional[str], idle_timeout: Optional[str], klippy: str = "ready"):
    """A handler answering objects/query like Klipper with these states."""

    def handler(request):
        assert request["method"] == "objects/query"
        status = {
            "print_stats": {"state": print_stats} if print_stats is not None else {},
            "idle_timeout": {"state": idle_timeout} if idle_timeout is not None else {},
            "webhooks": {"state": klippy},
        }
        return status_reply({k: v for k, v in status.items() if k in request["params"]["objects"]})

    return handler


# ---------------------------------------------------------------- printer states --------


@pytest.mark.parametrize(
    "print_stats, idle_timeout, busy, words",
    [
        ("standby", "Ready", False, "print_stats: standby"),
        ("complete", "Idle", False, "idle_timeout: Idle"),
        ("cancelled", "Ready", False, "cancelled"),
        ("error", "Ready", False, "error"),
        (None, "Idle", False, "idle_timeout: Idle"),  # no [virtual_sdcard]: print_stats is {}
        ("printing", "Printing", True, "printing"),
        ("paused", "Ready", True, "paused"),
        ("standby", "Printing", True, "idle_timeout: Printing"),  # homing/probing/macro
        (None, "Printing", True, "idle_timeout: Printing"),
    ],
)
def test_printer_states(klippy, print_stats, idle_timeout, busy, words):
    server = klippy(states(print_stats, idle_timeout))
    verdict = check_printer_idle(server.path)
    assert isinstance(verdict, GuardVerdict)
    assert verdict.busy is busy
    assert verdict.klipper_running is True
    assert words in verdict.reason


def test_request_is_what_klipper_expects(klippy):
    server = klippy(states("standby", "Ready"))
    check_printer_idle(server.path)
    (raw,) = server.requests
    request = json.loads(raw)
    assert isinstance(request["id"], int)
    assert request["method"] == "objects/query"
    assert request["params"]["objects"] == {"print_stats": ["state"], "idle_timeout": ["state"], "webhooks": ["state"]}


def test_missing_socket_is_no_answer_and_busy(tmp_path):
    # On its own the guard never says "go" without an answer: only the unit's state may
    # (kflashd/instances.py, tests/test_instances.py).
    path = str(tmp_path / "klippy.sock")
    verdict = check_printer_idle(path)
    assert verdict == GuardVerdict(busy=True, reason=verdict.reason, klipper_running=True, answered=False)
    assert path in verdict.reason


def test_unsearchable_directory_is_access_denied_not_missing(tmp_path):
    # os.path.exists() says False when stat() fails with EACCES: that is no "missing".
    # Asked with the effective uid of nobody (root passes every permission check).
    comms = tmp_path / "comms"
    comms.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(comms / "klippy.sock"))
    dead.close()
    os.seteuid(65534)
    try:
        verdict = check_printer_idle(str(comms / "klippy.sock"))
    finally:
        os.seteuid(0)
    assert (verdict.busy, verdict.answered, verdict.warning) == (True, False, True), verdict
    assert "permission denied" in verdict.reason and "uid 65534" in verdict.reason


def test_socket_of_another_user_is_access_denied(tmp_path):
    # Klipper's socket is pi:pi 0755: another user (and root without CAP_DAC_OVERRIDE)
    # may not connect. A configuration error, reported as such, never "not running".
    directory = tempfile.mkdtemp(prefix="kfg")  # searchable by all (pytest's tmp_path is not)
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "klippy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    os.chmod(path, 0o755)
    try:
        os.seteuid(65534)
        try:
            assert os.stat(path).st_mode & 0o777 == 0o755  # the file is visible: connect() refuses
            verdict = check_printer_idle(path, timeout=0.5)
        finally:
            os.seteuid(0)
    finally:
        server.close()
        shutil.rmtree(directory)
    assert (verdict.busy, verdict.answered, verdict.warning) == (True, False, True), verdict
    assert "permission denied" in verdict.reason and "mode 0755" in verdict.reason


# ---------------------------------------------------------------- a Klipper that misbehaves --


def assert_busy_quickly(path: str, words: str, timeout: float = 0.3) -> GuardVerdict:
    started = time.monotonic()
    verdict = check_printer_idle(path, timeout=timeout)
    elapsed = time.monotonic() - started
    assert verdict.busy is True
    assert verdict.klipper_running is True
    assert words in verdict.reason
    assert elapsed < timeout + 1.0
    return verdict


def test_hanging_klipper_is_busy(klippy):
    server = klippy(lambda request: HANG)
    verdict = assert_busy_quickly(server.path, "does not answer within 0.3 s")
    assert server.requests  # it did ask


def test_never_accepting_listener_is_busy(tmp_path):
    # Klipper's reactor blocked: the kernel queues the connection but nobody reads.
    path = str(tmp_path / "klippy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        assert_busy_quickly(path, "does not answer")
    finally:
        listener.close()


def test_stale_socket_file_is_no_answer(tmp_path):
    # Klipper exited and left its socket file (it unlinks it only before its next bind):
    # connection refused, nobody listens. Whether that means "not running" is the unit's
    # state's to say; here it is an unanswered, busy verdict, told at once.
    path = str(tmp_path / "klippy.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    started = time.monotonic()
    verdict = check_printer_idle(path, timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert verdict.busy is True and verdict.answered is False, verdict
    assert "no listener" in verdict.reason


def test_garbage_reply_is_busy(klippy):
    server = klippy(lambda request: b"\xff\xfenot json at all\x03")
    assert_busy_quickly(server.path, "unreadable")


def test_error_reply_is_busy(klippy):
    server = klippy(lambda request: {"error": {"error": "WebRequestError", "message": "Klippy Disconnected"}})
    assert_busy_quickly(server.path, "Klippy Disconnected")


def test_reply_without_status_is_busy(klippy):
    server = klippy(lambda request: {"result": {"eventtime": 1.0}})
    assert_busy_quickly(server.path, "without a status")


def test_malformed_state_is_busy(klippy):
    server = klippy(lambda request: status_reply({"print_stats": "printing"}))
    assert_busy_quickly(server.path, "malformed print_stats")


def test_hang_up_without_answer_is_busy(klippy):
    server = klippy(lambda request: CLOSE)
    assert_busy_quickly(server.path, "closed the connection")


def test_unterminated_reply_is_busy(klippy):
    # a reply that never gets its 0x03 is as good as none
    server = klippy(lambda request: json.dumps(dict(status_reply({}), id=request["id"])).encode())
    assert_busy_quickly(server.path, "does not answer")


def test_other_ids_are_skipped_and_fragments_joined(klippy):
    def handler(request):
        other = json.dumps({"id": request["id"] + 1, "result": {"status": {"print_stats": {"state": "standby"}}}})
        mine = json.dumps(dict(status_reply({"print_stats": {"state": "printing"}}), id=request["id"]))
        return (other + "\x03" + mine + "\x03").encode()

    server = klippy(handler)
    verdict = check_printer_idle(server.path)
    assert verdict.busy and "printing" in verdict.reason


def test_reply_in_pieces_within_the_deadline(klippy):
    # A slow Klipper: the reply trickles in, 7 bytes every 10 ms; it still counts.
    server = klippy(states("paused", "Ready"), piece_size=7, piece_delay=0.01)
    verdict = check_printer_idle(server.path, timeout=10)
    assert verdict.busy and "paused" in verdict.reason


# ---------------------------------------------------------------- mcu version ------------


def test_query_mcu_version(klippy):
    server = klippy(lambda request: status_reply({"mcu": {"mcu_version": "v0.13.0-42-gdeadbee"}}))
    assert query_mcu_version(server.path) == "v0.13.0-42-gdeadbee"
    assert json.loads(server.requests[0])["params"]["objects"] == {"mcu": ["mcu_version"]}


def test_query_secondary_mcu_version(klippy):
    server = klippy(lambda request: status_reply({"mcu EBB": {"mcu_version": "v0.12.0"}}))
    assert query_mcu_version(server.path, mcu_object="mcu EBB") == "v0.12.0"
    assert json.loads(server.requests[0])["params"]["objects"] == {"mcu EBB": ["mcu_version"]}


@pytest.mark.parametrize(
    "reply",
    [
        HANG,
        {"error": {"error": "WebRequestError", "message": "Klippy not ready"}},
        status_reply({"mcu": {}}),  # Klipper starting, not connected to the MCU yet
        status_reply({"mcu": {"mcu_version": ""}}),
    ],
)
def test_query_mcu_version_unknown(klippy, reply):
    server = klippy(lambda request: reply)
    assert query_mcu_version(server.path, timeout=0.3) is None


def test_query_mcu_version_without_socket(tmp_path):
    assert query_mcu_version(str(tmp_path / "nope.sock")) is None


def test_query_objects_raises_api_error(klippy):
    server = klippy(lambda request: {"error": {"error": "WebRequestError", "message": "nope"}})
    with pytest.raises(ApiError, match="nope"):
        query_objects(server.path, {"toolhead": None})


# ---------------------------------------------------------------- mcu version of one board --

MAIN_SN = "3A0029000851313433383932"
EBB_SN = "E6616407E3246B29"
MAIN_BY_ID = f"/dev/serial/by-id/usb-Klipper_stm32f446xx_{MAIN_SN}-if00"
EBB_BY_ID = f"/dev/serial/by-id/usb-Klipper_rp2040_{EBB_SN}-if00"
EBB_BY_PATH = "/dev/serial/by-path/platform-xhci-hcd.0-usb-0:1.3:1.0"


def printer(mcus: dict, versions: dict, extra_objects=("webhooks", "toolhead")):
    """A handler answering objects/list and objects/query like a Klipper with these MCUs.

    `mcus`: object name (as in printer.cfg, e.g. "mcu EBB") -> its settings section;
    `versions`: object name -> mcu_version (absent: not connected yet, status {}).
    Shapes as klippy/webhooks.py and klippy/configfile.py produce them.
    """

    def handler(request):
        if request["method"] == "objects/list":
            return {"result": {"objects": list(extra_objects) + ["configfile"] + list(mcus)}}
        assert request["method"] == "objects/query"
        objects = {"configfile": {"settings": {name.lower(): dict(section) for name, section in mcus.items()},
                                  "config": {}, "warnings": []}}
        for name in mcus:
            objects[name] = {"mcu_version": versions[name], "mcu_build_versions": ""} if name in versions else {}
        status = {}
        for name, fields in request["params"]["objects"].items():
            obj = objects.get(name, {})
            status[name] = {k: v for k, v in obj.items() if not fields or k in fields}
        return status_reply(status)

    return handler


TWO_MCUS = {"mcu": {"serial": MAIN_BY_ID, "baud": 250000},
            "mcu EBB": {"serial": EBB_BY_ID, "restart_method": "command"}}
TWO_VERSIONS = {"mcu": "v0.13.0-1-gmain", "mcu EBB": "v0.13.0-2-gebb"}


def test_toolhead_board_is_asked_by_its_own_mcu_object(klippy):
    server = klippy(printer(TWO_MCUS, TWO_VERSIONS))
    assert query_mcu_version_for(server.path, EBB_SN) == "v0.13.0-2-gebb"
    assert query_mcu_version_for(server.path, MAIN_SN) == "v0.13.0-1-gmain"
    # what it asked: the object list, then configfile settings and every MCU in one query
    first, second = (json.loads(raw) for raw in server.requests[:2])
    assert first["method"] == "objects/list"
    assert second["method"] == "objects/query"
    assert second["params"]["objects"] == {"configfile": ["settings"], "mcu": ["mcu_version"],
                                           "mcu EBB": ["mcu_version"]}


def test_unconnected_toolhead_is_not_answered_with_the_main_version(klippy):
    # Klipper up, main MCU connected, the toolhead not yet: no answer, never the main's.
    server = klippy(printer(TWO_MCUS, {"mcu": "v0.13.0-1-gmain"}))
    assert query_mcu_version_for(server.path, EBB_SN) is None
    assert query_mcu_version_for(server.path, MAIN_SN) == "v0.13.0-1-gmain"


def test_board_no_mcu_names_gets_no_version(klippy):
    server = klippy(printer(TWO_MCUS, TWO_VERSIONS))
    assert query_mcu_version_for(server.path, "0123456789ABCDEF") is None


def test_serial_must_be_the_whole_serial_of_the_by_id_name(klippy):
    server = klippy(printer({"mcu": {"serial": "/dev/serial/by-id/usb-Klipper_stm32f103xe_012345-if00"}},
                            {"mcu": "v1"}))
    assert query_mcu_version_for(server.path, "12345") is None  # lone MCU, but certainly another board
    assert query_mcu_version_for(server.path, "012345") == "v1"


def test_by_path_serial_matches_the_boards_port(klippy):
    mcus = {"mcu": {"serial": MAIN_BY_ID}, "mcu EBB": {"serial": EBB_BY_PATH}}
    server = klippy(printer(mcus, TWO_VERSIONS))
    assert query_mcu_version_for(server.path, EBB_SN, by_path=EBB_BY_PATH) == "v0.13.0-2-gebb"
    assert query_mcu_version_for(server.path, EBB_SN, by_path=EBB_BY_PATH.replace("1.3", "1.4")) is None
    assert query_mcu_version_for(server.path, EBB_SN) is None  # port unknown: cannot tell


def test_single_mcu_on_a_plain_tty_is_the_fallback(klippy):
    server = klippy(printer({"mcu": {"serial": "/dev/ttyACM0"}}, {"mcu": "v0.13.0-7"}))
    assert query_mcu_version_for(server.path, MAIN_SN) == "v0.13.0-7"


def test_plain_tty_with_two_mcus_is_not_guessed(klippy):
    mcus = {"mcu": {"serial": "/dev/ttyACM0"}, "mcu EBB": {"serial": "/dev/ttyACM1"}}
    server = klippy(printer(mcus, TWO_VERSIONS))
    assert query_mcu_version_for(server.path, EBB_SN) is None
    assert query_mcu_version_for(server.path, MAIN_SN) is None


def test_klipper_still_loading_has_no_version(klippy):
    server = klippy(printer({}, {}))  # objects/list without any mcu yet
    assert query_mcu_version_for(server.path, MAIN_SN) is None
    assert len(server.requests) == 1  # nothing more to ask


@pytest.mark.parametrize("reply", [HANG, {"error": {"error": "WebRequestError", "message": "Klippy Disconnected"}},
                                   {"result": {"nope": 1}}, {"result": {"objects": "mcu"}}])
def test_unanswered_object_list_means_no_version(klippy, reply):
    server = klippy(lambda request: reply)
    assert query_mcu_version_for(server.path, MAIN_SN, timeout=0.3) is None


def test_query_mcu_version_for_without_socket(tmp_path):
    assert query_mcu_version_for(str(tmp_path / "nope.sock"), MAIN_SN) is None


def test_one_deadline_for_both_requests(klippy):
    def handler(request):
        if request["method"] == "objects/list":
            time.sleep(0.25)  # a slow Klipper (simulated), not a wait for a condition
            return {"result": {"objects": ["mcu"]}}
        return HANG

    server = klippy(handler)
    started = time.monotonic()
    assert query_mcu_version_for(server.path, MAIN_SN, timeout=0.4) is None
    assert time.monotonic() - started < 0.4 + 0.3


def test_list_objects(klippy):
    server = klippy(lambda request: {"result": {"objects": ["webhooks", "mcu", "mcu EBB"]}})
    assert list_objects(server.path) == ["webhooks", "mcu", "mcu EBB"]
    assert json.loads(server.requests[0])["method"] == "objects/list"
    bad = klippy(lambda request: {"result": {"objects": [1, 2]}})
    with pytest.raises(ApiError, match="without an object list"):
        list_objects(bad.path)


@pytest.mark.parametrize(
    "section, by_path, verdict",
    [
        ({"serial": MAIN_BY_ID}, None, True),
        ({"serial": EBB_BY_ID}, None, False),
        ({"serial": EBB_BY_PATH}, EBB_BY_PATH, True),
        ({"serial": EBB_BY_PATH}, "/dev/serial/by-path/platform-xhci-hcd.0-usb-0:1.4:1.0", False),
        ({"serial": EBB_BY_PATH}, None, None),
        ({"serial": "/dev/ttyACM0"}, None, None),
        ({"serial": "/dev/printer-main"}, None, None),  # a custom udev link: cannot tell by name
        ({"serial": "/tmp/klipper_host_mcu"}, None, False),
        ({"serial": "/dev/rpmsg_0"}, None, False),
        ({"canbus_uuid": "11aa22bb33cc", "canbus_interface": "can0"}, None, False),
        ({}, None, None),
        (None, None, None),
        ({"serial": 5}, None, None),
    ],
)
def test_mcu_section_is_board(section, by_path, verdict):
    assert mcu_section_is_board(section, MAIN_SN, by_path) is verdict


def test_pick_mcu_object_rules():
    settings = {"mcu": {"serial": MAIN_BY_ID}, "mcu ebb": {"serial": EBB_BY_ID},
                "mcu rpi": {"serial": "/tmp/klipper_host_mcu"}}
    names = ["webhooks", "mcu", "mcu EBB", "mcu rpi", "mcu_temperature x"]
    assert pick_mcu_object(names, settings, EBB_SN) == "mcu EBB"  # the name keeps printer.cfg's case
    assert pick_mcu_object(names, settings, MAIN_SN) == "mcu"
    # the same serial in two sections: a misconfiguration, not guessed between
    twice = dict(settings, **{"mcu ebb": {"serial": MAIN_BY_ID}})
    assert pick_mcu_object(names, twice, MAIN_SN) is None
    # no settings yet: only a lone main MCU is taken
    assert pick_mcu_object(["mcu"], None, MAIN_SN) == "mcu"
    assert pick_mcu_object(["mcu", "mcu EBB"], {}, MAIN_SN) is None
    # a lone MCU that is certainly another board is not taken
    assert pick_mcu_object(["mcu"], {"mcu": {"serial": EBB_BY_ID}}, MAIN_SN) is None
    assert pick_mcu_object(["webhooks"], settings, MAIN_SN) is None
