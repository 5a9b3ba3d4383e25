"""The reliability matrix: what each injected fault did, as the fault-injection suite saw it.

Two halves:

- `record(...)`, called by the tests in `test_faults.py` at their end with the values they
  observed (and asserted) there: which fault, when it was injected, the state Klipper was
  left in, the job's state and message, and the log or journal line that tells the story.
  It appends one JSON line to `$KFLASHD_RELIABILITY_OUT/reliability.jsonl` when that
  variable is set, and does nothing otherwise: a normal CI run never writes into the repo.

- `python -m tests.e2e.reliability --run`, the generator: runs the fault suite and the
  cycle tests with that variable set and a JUnit report, and rewrites `docs/reliability.md`
  from what was recorded, plus the faults that `test_cycle.py` already covers (listed in
  `COVERED_ELSEWHERE`, their result taken from the JUnit report), the command, the date and
  the machine. A failed test shows up as FAILED in the table and makes the generator exit
  non-zero, so a broken matrix is never mistaken for a good one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional

ENV_OUT = "KFLASHD_RELIABILITY_OUT"
JSONL_NAME = "reliability.jsonl"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_DOC = REPO / "docs" / "reliability.md"
SUITE = ["tests/e2e/test_faults.py", "tests/e2e/test_crash.py", "tests/e2e/test_disk.py", "tests/e2e/test_cycle.py",
         "tests/e2e/test_loop.py", "tests/e2e/test_preflight.py"]

#: Faults whose end-to-end test lives in test_cycle.py (owned elsewhere, not duplicated in
#: test_faults.py). These tests do not record observed values, so the row shows what the test
#: asserts; the Result column (from the JUnit report of the same run) says whether it held.
COVERED_ELSEWHERE: List[Dict[str, str]] = [
    {
        "test": "tests/e2e/test_cycle.py::test_sigkill_mid_flash_restarts_klipper_then_reflashes",
        "fault": "SIGKILL to kflashd",
        "injected": "mid-flash (write phase, slow board)",
        "klipper": "asserted: started by the next kflashd's start-up recovery (cycle marker) with the board away, running at the end",
        "job": "asserted: interrupted mid-write (write record \"started\", resume deadline); the same board back in Katapult: flashed again, done, attempts 2, image byte-exact",
        "evidence": "asserted: the flash tool's process group gone within 5 s of the SIGKILL (pdeath "
                    "wrapper) and no COMPLETE sent to the half-written board; the only systemctl "
                    "verb after the restart is start, job attempts == 2",
    },
    {
        "test": "tests/e2e/test_cycle.py::test_sigterm_mid_flash_stops_tool_starts_klipper",
        "fault": "SIGTERM to kflashd",
        "injected": "mid-flash (write phase, slow board)",
        "klipper": "asserted: running (last systemctl verb is start)",
        "job": "asserted: interrupted (state file on disk)",
        "evidence": "asserted: exit 0, STOPPING=1, no flash tool pid left",
    },
    {
        "test": "tests/e2e/test_cycle.py::test_unplugged_mid_flash_fails_clearly_and_klipper_runs",
        "fault": "board unplugged (make fallback refused: no matching tree image)",
        "injected": "mid-flash (write phase, slow board)",
        "klipper": "asserted: running",
        "job": "asserted: failed, message names Katapult and make flash",
        "evidence": "asserted: job message",
    },
    {
        "test": "tests/e2e/test_cycle.py::test_katapult_failure_falls_back_to_make_flash",
        "fault": "Katapult bootloader silent (make fallback allowed)",
        "injected": "after kflashd read the board's Katapult once (application start remembered)",
        "klipper": "asserted: stopped only around make",
        "job": "asserted: done via make_flash, make run as the tree's owner (uid 65534)",
        "evidence": "asserted: history method make_flash, make's argv FLASH_DEVICE",
    },
    {
        "test": "tests/e2e/test_preflight.py::test_image_for_another_offset_is_refused_before_klipper_is_touched[64k-image-on-32k-board]",
        "fault": "image built for another bootloader offset (a 64 KiB build on a 32 KiB Katapult)",
        "injected": "queued, then the board plugged in, in Katapult",
        "klipper": "asserted: never stopped (no systemctl call), running",
        "job": "asserted: failed, message names both offsets; the next such image refused at queue time",
        "evidence": "asserted: 0 blocks written, no COMPLETE, board left in Katapult, flashtool never run",
    },
    {
        "test": "tests/e2e/test_preflight.py::test_image_for_another_offset_is_refused_before_klipper_is_touched[32k-image-on-64k-board]",
        "fault": "image built for another bootloader offset (a 32 KiB build on a 64 KiB Katapult)",
        "injected": "queued, then the board plugged in, in Katapult",
        "klipper": "asserted: never stopped (no systemctl call), running",
        "job": "asserted: failed, message names both offsets; the next such image refused at queue time",
        "evidence": "asserted: 0 blocks written, no COMPLETE, board left in Katapult, flashtool never run",
    },
    {
        "test": "tests/e2e/test_preflight.py::test_check_after_the_reboot_boots_the_old_firmware_and_starts_klipper",
        "fault": "image built for another offset, `--now` board never read before (`katapult = true`)",
        "injected": "after the reboot into Katapult",
        "klipper": "asserted: stopped once, started again",
        "job": "asserted: failed, message names both offsets",
        "evidence": "asserted: 0 blocks written, COMPLETE alone, board runs its old firmware, flash unchanged",
    },
    {
        "test": "tests/e2e/test_preflight.py::test_image_without_a_dictionary_is_refused_unless_forced",
        "fault": "image without a data dictionary (like a Katapult deployer.bin)",
        "injected": "at `kflashctl queue`",
        "klipper": "asserted: untouched",
        "job": "asserted: refused (exit 2, no job); with --force flashed",
        "evidence": "asserted: kflashctl's message names the missing dictionary and --force",
    },
    {
        "test": "tests/e2e/test_preflight.py::test_now_is_refused_for_a_board_never_seen_in_katapult",
        "fault": "`--now` for a board never seen in Katapult and not marked `katapult = true`",
        "injected": "at `kflashctl queue --now`",
        "klipper": "asserted: untouched",
        "job": "asserted: refused (exit 2), message says double-tap reset or `katapult = true`",
        "evidence": "asserted: no bootloader request; once seen in Katapult, --now works",
    },
    {
        "test": "tests/e2e/test_preflight.py::test_board_that_lands_in_its_rom_bootloader_fails_at_once[stm32_dfu-STM32 DFU-stm32f446xx]",
        "fault": "board without Katapult lands in STM32 DFU (0483:df11) after the reboot request",
        "injected": "`--now` (board wrongly marked `katapult = true`)",
        "klipper": "asserted: started again",
        "job": "asserted: failed at once (not at timeouts.bootloader = 60 s): \"in its ROM bootloader (STM32 DFU), not Katapult: power-cycle it\"",
        "evidence": "asserted: journal entry MESSAGE_ID=a75417f737b846e6b29acb1e7525504d; board no longer counted as Katapult",
    },
    {
        "test": "tests/e2e/test_preflight.py::test_board_that_lands_in_its_rom_bootloader_fails_at_once[rp2040_bootsel-RP2040 BOOTSEL-rp2040]",
        "fault": "board without Katapult lands in RP2040 BOOTSEL (2e8a:0003) after the reboot request",
        "injected": "`--now` (board wrongly marked `katapult = true`)",
        "klipper": "asserted: started again",
        "job": "asserted: failed at once: \"in its ROM bootloader (RP2040 BOOTSEL), not Katapult: power-cycle it\"",
        "evidence": "asserted: journal entry MESSAGE_ID=a75417f737b846e6b29acb1e7525504d",
    },
]


#: How much memory a client can make the daemon hold (control.py, staging.py); the figure
#: that test_loop.py asserts on the daemon's peak (VmHWM) under attack.
MEMORY_SECTION = [
    "",
    "## Memory",
    "",
    "What clients can make the daemon hold is bounded in total, not only per connection",
    "(control.py, staging.py). With the default max_image_size of 8 MiB (a queue request is at",
    "most max_request = 4/3 x 8 MiB + 64 KiB = 10.7 MiB of base64 and JSON):",
    "",
    "- each of the at most 64 connections: at most 64 KiB of request and 1 MiB of unsent",
    "  replies (a client that reads nothing is dropped past that): 64 x 1.06 MiB = 68 MiB;",
    "- one large request at a time (the large-request slot, held until its reply): its line",
    "  (10.7 MiB) and, while it is parsed and checked, its transient copies (the line, the",
    "  JSON string, the decoded image, one dictionary candidate of at most 16 MiB): about",
    "  5 x 10.7 MiB = 55 MiB. Other large requests wait unread in the kernel's socket buffer",
    "  (a waiter is told `busy` after 20 s, a holder that has not sent its line in 15 s is",
    "  cut off);",
    "- on top of the daemon's own ~25 MiB (idle RSS, docs/performance.md) and the staging",
    "  worker's thread: 200 MiB in all, with margin; the bound `test_loop.py` asserts",
    "  on the daemon's peak (VmHWM) while a crafted image and 60 filling connections hit it",
    "  (the row above gives the peak it measured). Before: 64 x ~11 MB buffers, ~700 MB.",
    "",
    "Known limit: 64 connections that each start a large request and never finish it keep",
    "the slot busy (15 s each), so a real `kflashctl queue` may be told `busy` meanwhile; the",
    "loop, `status`, the watchdog and a running flash are not affected.",
]


def record(fault: str, injected: str, klipper: str, job: str, evidence: str,
           test: Optional[str] = None) -> None:
    """Append one row of the matrix (a no-op unless $KFLASHD_RELIABILITY_OUT is set).

    Give observed values (the strings the test just asserted on), not literals: the matrix
    is worth something only because every cell was seen in a run.
    """
    out = os.environ.get(ENV_OUT)
    if not out:
        return
    if test is None:
        # "tests/e2e/test_faults.py::test_x[param] (call)" while a test runs.
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    entry = {"test": test, "fault": fault, "injected": injected, "klipper": klipper,
             "job": job, "evidence": evidence, "time": time.time()}
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / JSONL_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------- generator ------


def read_records(out_dir: Path) -> List[Dict[str, Any]]:
    path = out_dir / JSONL_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_junit(path: Path) -> Dict[str, str]:
    """test node id -> "passed" | "FAILED" | "ERROR" | "skipped", from pytest's JUnit XML."""
    results: Dict[str, str] = {}
    if not path.exists():
        return results
    for case in ET.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        module = classname.replace(".", "/") + ".py"
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "FAILED"
            elif child.tag == "error":
                outcome = "ERROR"
            elif child.tag == "skipped":
                outcome = "skipped"
        results[f"{module}::{name}"] = outcome
    return results


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.node()}: {platform.system()} {platform.release()} {platform.machine()}, "
            f"{os.cpu_count()} CPU(s){' (' + cpu + ')' if cpu else ''}, Python {platform.python_version()}")


#: pytest's per-test temp dirs, shortened in the table (they differ on every run).
_TMP_DIR = re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+")


def _cell(text: Any, limit: int = 260) -> str:
    text = _TMP_DIR.sub("$TMP", " ".join(str(text).split()))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _short(test: str) -> str:
    return test.replace("tests/e2e/", "")


def render(records: List[Dict[str, Any]], results: Dict[str, str], command: str,
           started: datetime.datetime, seconds: float, summary: str) -> str:
    lines = [
        "# Reliability matrix",
        "",
        "Generated by the fault-injection suite (issue 5); do not edit by hand. Each row is one",
        "fault injected on its own into the real daemon running against emulated boards (umockdev",
        "board farm, Katapult bootloader emulator, stand-in `systemctl`/`make`, a real",
        "journald where the row says so). Every test ends by asserting: Klipper running (or, where",
        "it cannot be started, reported DOWN), no staged job lost (a bystander job queued for",
        "another board stays queued with its image intact), and a clear record (job state and",
        "message naming the cause, and the log or journal line). The cells below are the values",
        "the tests observed and asserted in this run (pytest's temp dirs shortened to `$TMP`, long",
        "cells cut with …).",
        "",
        f"- Command: `{command}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- Machine: {machine()}",
        f"- Result: {summary} in {seconds:.0f} s",
        "",
        "| Fault | Injected | Klipper after | Job after | Evidence (log / journal) | Test | Result |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in records:
        seen.add(r["test"])
        lines.append("| " + " | ".join([
            _cell(r["fault"]), _cell(r["injected"]), _cell(r["klipper"]), _cell(r["job"]),
            _cell(r["evidence"]), f"`{_short(r['test'])}`", results.get(r["test"], "not run"),
        ]) + " |")
    missing = [t for t, outcome in results.items()
               if t.startswith(("tests/e2e/test_faults.py", "tests/e2e/test_loop.py", "tests/e2e/test_crash.py", "tests/e2e/test_disk.py")) and t not in seen]
    for test in missing:
        lines.append(f"| (no record) | | | | | `{_short(test)}` | {results[test]} |")
    lines += MEMORY_SECTION
    lines += [
        "",
        "## Covered by `test_cycle.py` and `test_preflight.py`",
        "",
        "These faults have their end-to-end test in `tests/e2e/test_cycle.py` or",
        "`tests/e2e/test_preflight.py`; they are not repeated in `test_faults.py`. The cells say",
        "what the test asserts; Result is from this run.",
        "",
        "What kflashd refuses before anything is touched, and why: an image whose MCU cannot be",
        "read (no data dictionary) or differs from the board's (both overridable with `--force`);",
        "an image whose Cortex-M reset vector would not lie inside the image once written at the",
        "application start the board's Katapult reports (it was built for another bootloader",
        "offset and would never boot); a `--now` reboot request to a board not known to run",
        "Katapult (it would land in its ROM bootloader, unreachable until power-cycled). A board",
        "that lands in its ROM bootloader anyway ends its job at once, with Klipper started.",
        "A job that names only a serial two boards report (boards built without the chip id say",
        "12345) is refused as ambiguous, at queue time or when the second board appears: such a",
        "board is named by its USB port (`tests/e2e/test_identity.py`). The flash tools get the",
        "board's by-id (or by-path) link only while it leads to the node udev reported. A job",
        "waits, Klipper untouched, while any Klipper instance prints, or gives no answer while",
        "its unit runs (a wrong socket path, a socket the daemon may not open: that one also",
        "warns), and a socket hidden by the unit's PrivateTmp= is refused when the config loads",
        "(`tests/e2e/test_guard_instances.py`); a CAN job waits while its bus is down or missing",
        "(`tests/e2e/test_can.py`).",
        "",
        "| Fault | Injected | Klipper after | Job after | Evidence | Test | Result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in COVERED_ELSEWHERE:
        lines.append("| " + " | ".join([
            _cell(r["fault"]), _cell(r["injected"]), _cell(r["klipper"]), _cell(r["job"]),
            _cell(r["evidence"]), f"`{_short(r['test'])}`", results.get(r["test"], "not run"),
        ]) + " |")
    lines.append("")
    return "\n".join(lines)


def run(output: Path, python: str = sys.executable, extra: Optional[List[str]] = None) -> int:
    with tempfile.TemporaryDirectory(prefix="kflashd-reliability-") as tmp:
        junit = Path(tmp) / "junit.xml"
        argv = [python, "-m", "pytest", *SUITE, "-q", "-p", "no:cacheprovider",
                f"--junitxml={junit}", *(extra or [])]
        env = dict(os.environ)
        env[ENV_OUT] = tmp
        started = datetime.datetime.now(datetime.timezone.utc)
        t0 = time.monotonic()
        proc = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        sys.stdout.write(proc.stdout[-4000:])
        sys.stderr.write(proc.stderr[-4000:])
        results = read_junit(junit)
        records = read_records(Path(tmp))
    counts: Dict[str, int] = {}
    for outcome in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no tests ran"
    command = "python -m pytest " + " ".join(SUITE) + f" -q   (with {ENV_OUT} set)"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(records, results, command, started, seconds, summary), encoding="utf-8")
    print(f"wrote {output}: {len(records)} recorded rows, {summary}")
    return proc.returncode


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.e2e.reliability",
        description="Run the fault-injection suite and rewrite docs/reliability.md from what it observed.",
    )
    parser.add_argument("--run", action="store_true", help="run the suite and write the matrix")
    parser.add_argument("--output", type=Path, default=DEFAULT_DOC, help="where to write (default docs/reliability.md)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if not args.run:
        parser.error("nothing to do: give --run")
    return run(args.output, extra=args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
