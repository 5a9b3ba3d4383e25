"""recovery.py's decisions on plain records: which board an interrupted write may be
repeated on, and until when (the end-to-end kills are in tests/e2e/test_crash.py)."""

from __future__ import annotations

import time

from kflashd.models import MODE_KATAPULT, MODE_KLIPPER, Board, FlashResult, Job
from kflashd.recovery import can_node_advice, no_resume_reason, same_board, settled_after_write

SERIAL = "3A0029000851313433383932"


def job(**fields) -> Job:
    now = time.time()
    base = dict(id="0123456789ab", selector=SERIAL, serial=SERIAL, board_name=None,
                image_sha256="0" * 64, image_size=10, created=now - 100, state="interrupted",
                write="started", write_started=now - 10, write_port="1-1.2", resume_until=now + 50)
    base.update(fields)
    return Job(**base)


def board(serial: str = SERIAL, mode: str = MODE_KATAPULT, port: str = "1-1.2") -> Board:
    return Board(serial=serial, mode=mode, mcu="stm32f446xx", device_node="/dev/ttyACM0",
                 sys_path="/sys/x", port_path=port)


def test_only_the_same_board_in_katapult():
    assert same_board(job(), board())
    assert not same_board(job(), board(port="1-1.3")), "same serial on another USB port"
    assert not same_board(job(), board(serial="12345")), "another serial on the same port"
    assert not same_board(job(), board(mode=MODE_KLIPPER)), "the board runs Klipper"
    assert not same_board(job(write_port=None), board(port=None)), "no port recorded: unprovable"


def test_resume_deadline_clock_and_newer_jobs():
    now = time.time()
    assert no_resume_reason(job(), [], now, 60) is None
    assert "timeouts.resume (60 s)" in no_resume_reason(job(resume_until=now - 1), [], now, 60)
    assert "clock" in no_resume_reason(job(write_started=now + 30), [], now, 60)
    assert "port" in no_resume_reason(job(write_port=None), [], now, 60)
    newer = job(id="ba9876543210", created=now - 5, state="done")
    assert "ba9876543210 was queued for this board since" in no_resume_reason(job(), [newer], now, 60)
    older = job(id="ba9876543210", created=now - 500, state="done")
    assert no_resume_reason(job(), [older], now, 60) is None


def test_can_node_write_is_never_resumed_and_says_to_queue_again_with_now():
    advice = can_node_advice(job(write_port=None, write_device="can0"), "kflashd was stopped")
    assert "CAN node" in advice and "can0" in advice and "--now" in advice
    assert "USB port" not in advice


def test_interrupted_can_node_write_gets_the_can_advice(tmp_path):
    """The daemon's decision for a write to a configured CAN toolhead (uuid as the job's
    serial, no USB port recorded) is the CAN advice, not "the USB port ... is not known"."""
    from types import SimpleNamespace

    from kflashd.config import load_config
    from kflashd.recovery import Recovery

    path = tmp_path / "kflashd.toml"
    path.write_text('[boards.ebb]\ncanbus_uuid = "0e0d81e4210c"\nmcu = "stm32g0b1xx"\n')
    daemon = SimpleNamespace(config=load_config(str(path)),
                             reactor=SimpleNamespace(register_timer=lambda callback: object()))
    recovery = Recovery(daemon)  # type: ignore[arg-type]
    state, message = recovery.after_interruption(
        job(serial="0e0d81e4210c", selector="ebb", write_port=None, write_device="can0"), "stopped")
    assert state == "interrupted" and "CAN node 0e0d81e4210c on can0" in message and "--now" in message
    state, message = recovery.after_interruption(job(write_port=None), "stopped")
    assert "USB port it was written through is not known" in message  # a USB board keeps its reason


def test_written_is_final():
    done = job(write="written", results=[FlashResult(True, "katapult", 2.5)])
    state, message = settled_after_write(done, "a previous kflashd died during the cycle")
    assert state == "done" and "unconfirmed" in message and "2.5 s" in message
    failed = job(write="written", results=[FlashResult(False, "katapult", 1.0, "Error sending command")])
    state, message = settled_after_write(failed, "a previous kflashd died during the cycle")
    assert state == "failed" and message.startswith("Error sending command")
