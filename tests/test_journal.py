"""kflashd.journal against a real, namespaced systemd-journald, and the catalog against journalctl."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import textwrap
import time

import pytest

from kflashd import journal
from kflashd.journal import JournalHandler, JournalSender
from tests.support.journald import Journald, journald  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unique(prefix: str = "job") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


# ---------------------------------------------------------------- encoding (no journald) ---


def test_encode_plain_and_binary_fields():
    data = journal.encode_entry([("MESSAGE", "hi"), ("TEXT", "a\nb"), ("N", 5)])
    assert data == b"MESSAGE=hi\nTEXT\n" + (3).to_bytes(8, "little") + b"a\nb\nN=5\n"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("KFLASHD_JOB", "KFLASHD_JOB"),
        ("kflashd-job", "KFLASHD_JOB"),
        ("_PID", "PID"),
        ("9LIVES", "F9LIVES"),
        ("___", None),
        ("A" * 80, "A" * 64),
    ],
)
def test_field_names_are_made_valid(name, expected):
    assert journal.field_name(name) == expected


@pytest.mark.parametrize(
    "level, priority",
    [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (25, 5), (logging.INFO, 6), (logging.DEBUG, 7)],
)
def test_level_to_priority(level, priority):
    assert journal.level_to_priority(level) == priority


# ---------------------------------------------------------------- real journald ---------


def test_send_with_custom_fields(journald):
    job = unique()
    sender = JournalSender(journald.socket)
    assert sender.send(
        "Flashing octopus via katapult",
        journal.LOG_NOTICE,
        {
            "MESSAGE_ID": journal.MSG_FLASH_STARTED,
            "KFLASHD_JOB": job,
            "KFLASHD_BOARD": "octopus",
            "KFLASHD_SERIAL": "3A0029000851313433383932",
            "KFLASHD_METHOD": "katapult",
            "KFLASHD_RESULT": None,  # None: left out
            "_PID": "1",  # a trusted field cannot be forged: becomes PID
        },
    )
    (entry,) = journald.read(KFLASHD_JOB=job)
    assert entry["MESSAGE"] == "Flashing octopus via katapult"
    assert entry["PRIORITY"] == "5"
    assert entry["SYSLOG_IDENTIFIER"] == "kflashd"
    assert entry["MESSAGE_ID"] == journal.MSG_FLASH_STARTED
    assert entry["KFLASHD_BOARD"] == "octopus"
    assert entry["KFLASHD_SERIAL"] == "3A0029000851313433383932"
    assert entry["KFLASHD_METHOD"] == "katapult"
    assert "KFLASHD_RESULT" not in entry
    assert entry["PID"] == "1"
    assert entry["_PID"] == str(os.getpid())
    assert sender.fallbacks == 0


def test_module_send_follows_environment(journald, monkeypatch):
    job = unique()
    monkeypatch.setenv("KFLASHD_JOURNAL_SOCKET", journald.socket)
    assert journal.send("staged", journal.LOG_INFO, KFLASHD_JOB=job, MESSAGE_ID=journal.MSG_JOB_STAGED)
    (entry,) = journald.read(KFLASHD_JOB=job)
    assert entry["MESSAGE_ID"] == journal.MSG_JOB_STAGED


def test_multiline_message_and_field(journald):
    job = unique()
    sender = JournalSender(journald.socket)
    message = "flashtool.py failed:\nTraceback (most recent call last):\n  FlashError: boom"
    assert sender.send(message, journal.LOG_ERR, {"KFLASHD_JOB": job, "KFLASHD_OUTPUT": "line 1\nline 2\n"})
    (entry,) = journald.read(KFLASHD_JOB=job)
    assert entry["MESSAGE"] == message
    # journald strips one trailing newline from MESSAGE only; other fields keep theirs
    assert entry["KFLASHD_OUTPUT"] == "line 1\nline 2\n"
    assert entry["PRIORITY"] == "3"


def test_oversized_entry_goes_through_memfd(journald):
    job = unique()
    sender = JournalSender(journald.socket)
    big = "x" * 400_000  # far beyond the ~208 KiB datagram limit: EMSGSIZE, then memfd
    with pytest.raises(OSError) as raised:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.sendto(b"MESSAGE=" + big.encode(), journald.socket)
        finally:
            probe.close()
    assert raised.value.errno == errno.EMSGSIZE  # the plain path really cannot carry it
    assert sender.send("big output", journal.LOG_INFO, {"KFLASHD_JOB": job, "KFLASHD_OUTPUT": big})
    (entry,) = journald.read(KFLASHD_JOB=job)
    assert entry["KFLASHD_OUTPUT"] == big
    assert sender.fallbacks == 0


def test_logging_handler_fields_code_location_and_traceback(journald):
    job = unique()
    logger = logging.getLogger(f"kflashd.test.{job}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = JournalHandler(JournalSender(journald.socket))
    logger.addHandler(handler)
    try:
        logger.warning("guard says busy", extra={"journal_fields": {"KFLASHD_JOB": job, "MESSAGE_ID": journal.MSG_PRINT_GUARD_WAIT}})
        line = sys._getframe().f_lineno - 1
        try:
            raise ValueError("bad image")
        except ValueError:
            logger.exception("cycle crashed", extra={"journal_fields": {"KFLASHD_JOB": job}})
        logger.debug("details", extra={"journal_fields": {"KFLASHD_JOB": job}})
    finally:
        logger.removeHandler(handler)
    entries = journald.read(count=3, KFLASHD_JOB=job)
    assert [e["MESSAGE"].splitlines()[0] for e in entries] == ["guard says busy", "cycle crashed", "details"]
    warning, crash, debug = entries
    assert warning["PRIORITY"] == "4"
    assert warning["MESSAGE_ID"] == journal.MSG_PRINT_GUARD_WAIT
    assert warning["CODE_FILE"] == __file__
    assert warning["CODE_LINE"] == str(line)
    assert warning["CODE_FUNC"] == "test_logging_handler_fields_code_location_and_traceback"
    assert warning["LOGGER"] == logger.name
    assert crash["PRIORITY"] == "3"
    assert "Traceback (most recent call last)" in crash["MESSAGE"]
    assert crash["MESSAGE"].rstrip().endswith("ValueError: bad image")
    assert debug["PRIORITY"] == "7"


def test_concurrent_senders_lose_nothing(journald):
    # The loop thread and the flash worker log at the same time; this machine's datagram
    # queue is only 10 deep, so bursts must wait briefly for journald instead of spilling.
    job = unique()
    sender = JournalSender(journald.socket)

    def burst(tag: str) -> None:
        for i in range(60):
            sender.send(f"{tag} {i}", journal.LOG_INFO, {"KFLASHD_JOB": job})

    threads = [threading.Thread(target=burst, args=(t,)) for t in ("loop", "worker")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    entries = journald.read(count=120, KFLASHD_JOB=job)
    assert sender.fallbacks == 0
    assert sorted(e["MESSAGE"] for e in entries) == sorted(f"{t} {i}" for t in ("loop", "worker") for i in range(60))


def test_journald_restart_is_followed():
    # journald restarts (new socket inode at the same path): the sender reconnects.
    with Journald() as first:
        sender = JournalSender(first.socket)
        job = unique()
        assert sender.send("one", fields={"KFLASHD_JOB": job})
        assert first.read(KFLASHD_JOB=job)
        namespace = first.namespace
    with Journald(namespace) as second:
        assert sender.send("two", fields={"KFLASHD_JOB": job})
        assert [e["MESSAGE"] for e in second.read(KFLASHD_JOB=job)] == ["two"]


# ---------------------------------------------------------------- stderr fallback -------


def test_fallback_to_stderr_without_socket(tmp_path):
    stream = io.StringIO()
    sender = JournalSender(str(tmp_path / "no-journal"), stream=stream)
    assert not sender.send("klipper restart failed\nsecond line", journal.LOG_CRIT, {"KFLASHD_JOB": "x"})
    assert stream.getvalue() == "<2>klipper restart failed\n<2>second line\n"
    assert sender.fallbacks == 1


def test_fallback_when_journald_is_gone(tmp_path):
    with Journald() as gone:
        sender = JournalSender(gone.socket, stream=io.StringIO())
        assert sender.send("first")
        path = gone.socket
        gone.process.terminate()
        gone.process.wait(timeout=10)
        # The socket file stays behind (journald does not unlink it): ECONNREFUSED.
        assert os.path.exists(path)
        assert not sender.send("second", journal.LOG_WARNING)
        assert sender._stream.getvalue() == "<4>second\n"


def test_full_queue_never_blocks(tmp_path):
    # A receiver that never reads: its queue fills, and the sender must drop to stderr
    # after its short wait instead of hanging the daemon.
    path = str(tmp_path / "stuck.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(path)
    try:
        stream = io.StringIO()
        sender = JournalSender(path, stream=stream, max_wait=0.2)
        started = time.monotonic()
        results = [sender.send(f"m{i}") for i in range(100)]
        elapsed = time.monotonic() - started
        assert results.count(True) >= 1
        assert sender.fallbacks == results.count(False) > 0
        # one bounded wait (0.2 s) in total, not one per message
        assert elapsed < 2.0
        assert "<6>m99\n" in stream.getvalue()
    finally:
        stuck.close()


def _journal_stream(journald: Journald, identifier: str) -> socket.socket:
    """A stream connected to journald's stdout socket the way systemd connects a service's stderr."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(journald.stdout_socket)
    # header: identifier, unit id, default priority, level_prefix, syslog, kmsg, console
    sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    sock.shutdown(socket.SHUT_RD)
    return sock


def test_stderr_fallback_keeps_levels_in_journald(journald, tmp_path):
    # The daemon without a native socket, its stderr captured by journald as systemd does:
    # the <N> prefixes must come back as PRIORITY on every line.
    identifier = unique("kflashd-fallback-")
    stream = _journal_stream(journald, identifier)
    code = (
        "from kflashd import journal\n"
        "assert not journal.send('restart failed', journal.LOG_CRIT, KFLASHD_JOB='x')\n"
        "assert not journal.send('two\\nlines', journal.LOG_WARNING)\n"
        "assert not journal.send('fine', journal.LOG_INFO)\n"
    )
    env = dict(os.environ, KFLASHD_JOURNAL_SOCKET=str(tmp_path / "missing"))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, stderr=stream.fileno(),
            stdout=subprocess.PIPE, timeout=30,
        )
    finally:
        stream.close()
    assert proc.returncode == 0
    entries = journald.read(count=4, SYSLOG_IDENTIFIER=identifier)
    assert [(e["MESSAGE"], e["PRIORITY"]) for e in entries] == [
        ("restart failed", "2"),
        ("two", "4"),
        ("lines", "4"),
        ("fine", "6"),
    ]


def test_setup_logging_is_idempotent():
    logger = logging.getLogger(unique("kflashd.setup."))
    logger.propagate = False
    first = journal.setup_logging(logging.DEBUG, logger)
    second = journal.setup_logging(logging.INFO, logger)
    try:
        assert first is second
        assert [h for h in logger.handlers if isinstance(h, JournalHandler)] == [first]
        assert logger.level == logging.INFO
    finally:
        logger.removeHandler(first)


# ---------------------------------------------------------------- catalog ----------------

_ENTRY_RE = re.compile(r"^-- ([0-9a-f]{32})$")


def _parse_catalog(path: str):
    entries = {}
    current = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            match = _ENTRY_RE.match(line)
            if line.startswith("-- "):
                assert match, f"bad catalog header: {line!r}"
                assert match.group(1) not in entries, f"duplicate entry {match.group(1)}"
                current = entries[match.group(1)] = {"headers": {}, "body": []}
            elif current is not None:
                if not current["body"] and ":" in line and not line.startswith(" ") and line.split(":")[0].istitle():
                    key, value = line.split(":", 1)
                    current["headers"][key] = value.strip()
                else:
                    current["body"].append(line)
    return entries


def test_catalog_has_an_entry_for_every_message_id():
    entries = _parse_catalog(journal.CATALOG_PATH)
    constants = {name: value for name, value in vars(journal).items() if name.startswith("MSG_")}
    assert constants == journal.MESSAGE_IDS
    assert set(entries) == set(constants.values())
    for message_id, entry in entries.items():
        headers = entry["headers"]
        assert headers.get("Defined-By") == "kflashd", message_id
        assert headers.get("Subject"), message_id
        assert headers.get("Support"), message_id
        body = "\n".join(entry["body"]).strip()
        assert body, message_id
        # every @FIELD@ is one that kflashd actually sends
        for field in re.findall(r"@([A-Z0-9_]+)@", headers["Subject"] + body):
            assert field in {"KFLASHD_JOB", "KFLASHD_BOARD", "KFLASHD_SERIAL", "KFLASHD_METHOD", "KFLASHD_RESULT"}


def test_catalog_is_accepted_by_journalctl():
    with tempfile.TemporaryDirectory() as root:
        catalog_dir = os.path.join(root, "usr", "lib", "systemd", "catalog")
        os.makedirs(catalog_dir)
        with open(journal.CATALOG_PATH, "rb") as src, open(os.path.join(catalog_dir, "kflashd.catalog"), "wb") as dst:
            dst.write(src.read())
        update = subprocess.run(
            ["journalctl", f"--root={root}", "--update-catalog"], capture_output=True, text=True, timeout=30
        )
        assert update.returncode == 0, update.stderr
        assert "failed" not in update.stderr.lower(), update.stderr
        listed = subprocess.run(
            ["journalctl", f"--root={root}", "--list-catalog"], capture_output=True, text=True, timeout=30
        )
        assert listed.returncode == 0, listed.stderr
        ids = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
        assert ids == set(journal.MESSAGE_IDS.values())
        for line in listed.stdout.splitlines():
            assert line.split()[1] == "kflashd:", line  # Defined-By was understood
        dumped = subprocess.run(
            ["journalctl", f"--root={root}", "--dump-catalog", journal.MSG_FLASH_FAILED],
            capture_output=True, text=True, timeout=30,
        )
        assert "Subject: Flashing board @KFLASHD_BOARD@ failed" in dumped.stdout


def test_stderr_fallback_never_blocks_on_a_full_pipe(tmp_path):
    """stderr is a pipe nobody reads (journald's stream stuck): the fallback drops and
    counts instead of waiting, and says how many were dropped once stderr drains."""
    code = textwrap.dedent(f"""
        import sys, time
        from kflashd.journal import JournalSender
        sender = JournalSender({str(tmp_path / "no-journal")!r})
        started = time.monotonic()
        for i in range(5000):
            sender.send("x" * 200 + f" {{i}}", 4)
        print(f"{{time.monotonic() - started:.3f}} {{sender.dropped}}", flush=True)
        sys.stdin.read()  # the test drains stderr now
        sender.send("after the drain", 4)
    """)
    r_fd, w_fd = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=w_fd, text=True)
    os.close(w_fd)
    try:
        # 1 MB into a 64 KiB pipe: a blocking write would hang the child right here.
        assert select.select([child.stdout], [], [], 20)[0], "the fallback blocked on a full stderr"
        elapsed, dropped = child.stdout.readline().split()
        assert float(elapsed) < 5.0 and int(dropped) > 0
        child.stdin.close()
        received = b""
        while not received.endswith(b"after the drain\n"):
            chunk = os.read(r_fd, 1 << 20)
            assert chunk, received[-300:]
            received += chunk
        notice = re.search(rb"<4>kflashd: (\d+) log entries dropped: stderr was full\n<4>after the drain", received)
        assert notice and int(notice.group(1)) >= int(dropped) - 1, received[-300:]
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.close(r_fd)
