"""kflashd's benchmark on emulated boards: the figures behind docs/performance.md.

Run from the repository root, as root (umockdev's testbed, the stand-ins and the daemon's
files need it):

    sudo .venv/bin/python -m bench.run [--quick] [--json FILE]

It prints one JSON document (also written to FILE) and a table of the targets of issue 5.
It is not a test: it asserts nothing about times and CI does not run it (timings on a
shared runner say more about the runner than about kflashd). A full run takes about 95 s
on two cores, --quick (fewer samples, 10 s idle) about 30 s; each plus about 80 s for the
update section (bench/update.py, also runnable alone).

What runs is what the end-to-end tests run (tests/e2e/harness.py): the real daemon under
the board farm's umockdev preload, real uevents, a Katapult bootloader emulator behind
each board's PTY, the stand-in `systemctl` (which starts and stops a fake Klipper process
that holds the boards' ports and serves the API socket) and the stand-in `flashtool.py`
speaking Katapult's serial protocol. Set up as under systemd: the daemon logs to a real
journald (its own namespace), its runtime_dir is on a tmpfs (/dev/shm, as /run is) and its
PATH is the unit's (venv first), not the caller's. Every stand-in appends a record with
`time.time()` to calls.jsonl when it starts (after its own Python start-up); those records
and journald's receive timestamps of the daemon's log lines are the clock marks below.
What each figure measures, precisely:

reaction   From the moment the benchmark asks the farm to plug a board in (the farm emits
           the `add` uevents while serving that request) to the stand-in flashtool.py's
           start record. A job is queued for the board before each plug-in (fast path),
           and Klipper runs, so the span includes the print guard's query, `systemctl
           stop klipper` and the fake Klipper's exit. Also given from the farm's reply
           (after the uevents): the true figure lies between the two. Split at the
           daemon's log lines "add: katapult board", "stopping klipper" and "running
           .../flashtool.py": the daemon's own share is plug-in -> "stopping klipper".
overhead   Klipper's downtime minus flash-tool time: stand-in `systemctl stop` record to
           `systemctl start` record, minus the flash's FlashResult.elapsed_seconds from the
           job's history (the daemon's own measure of the tool: private copy, spawn, run,
           exit). What is left is the cycle's own cost while Klipper is down, including
           the wait for the board to come back in Klipper mode after the flash (the farm's
           board boots 100 ms after it acknowledged COMPLETE), split likewise.
ratio      A daemon-driven flash (plug-in uevent to the job's `end` event on a `watch`
           connection: Klipper stopped, flashed, board back, Klipper started and reporting
           the new version) divided by a direct run of the same stand-in flashtool.py on
           the same board in Katapult (spawn to exit), same 32 KiB image, medians. Also:
           the tool's run inside the daemon (FlashResult.elapsed_seconds) / the direct
           run, and the daemon-driven flash / the manual recipe (stop, tool, start).
idle       Over a fixed window after READY=1, with no boards changing: context switches
           of all the daemon's threads (/proc/PID/task/*/status, voluntary + involuntary:
           every one is a wake-up), CPU seconds (utime+stime of /proc/PID/stat) and VmRSS;
           one daemon without and one with WATCHDOG_USEC (the unit's 30 s) side by side.
ready      exec (Popen) to the READY=1 datagram on NOTIFY_SOCKET, median of 10 starts.
hostile    See bench/hostile.py: `status` round trips while a crafted 8 MiB image (the
           dictionary search's worst case) is queued and 60 connections fill their buffers;
           the crafted request's reply time; the daemon's peak memory (VmHWM).
burst      16 boards plugged and unplugged round-robin as fast as the farm can, 1,000
           tty uevents (each plug or unplug also emits 2 for the USB device and interface,
           which the daemon's netlink filter drops). "seen" is the daemon's own counter
           (`kflashctl status --json` -> udev.uevents); lost = emitted - seen. Drain: from
           the farm's last reply to the counter reaching the emitted count.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.hostile import bench_hostile
from kflashd.control import ControlClient
from tests.e2e.harness import PYTHON, REPO, STANDINS, KflashdProcess
from tests.farm.client import BoardFarm
from tests.farm.fixtures import write_klipper_unit
from tests.farm.images import make_image
from tests.standins.fixtures import FLASHTOOL, Standins
from tests.support.journald import Journald
from tests.support.notify_listener import NotifyListener
from tests.support.wait import wait_until

MCU = "stm32f446xx"
CYCLE_IMAGE_SIZE = 8 * 1024
RATIO_IMAGE_SIZE = 32 * 1024  # a Klipper build for an STM32F446 with USB is about this big
WATCHDOG_USEC = 30_000_000  # the shipped unit's WatchdogSec=30
BURST_BOARDS = 16
BURST_EVENTS = 1000
# The PATH the shipped unit gives the daemon (systemd/kflashd.service: the venv first, then
# the system's directories), with the stand-ins in front. Not the caller's PATH: a shell's
# PATH may put a version manager's shim first (pyenv's `python3` is a bash script that
# spawns a dozen processes, ~150 ms per call), which would measure the shell, not kflashd.
UNIT_PATH = os.pathsep.join([str(STANDINS / "bin"), os.path.dirname(PYTHON),
                             "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])

TARGETS: List[Tuple[str, str, str, float]] = [
    # (key, label, comparison, limit)
    ("reaction_p50_ms", "reaction p50: uevent -> flash tool starts (ms)", "<", 30),
    ("reaction_p99_ms", "reaction p99 (ms)", "<", 100),
    ("overhead_p50_ms", "overhead p50: Klipper downtime - tool time (ms)", "<", 150),
    ("ratio", "ratio: daemon-driven flash / direct tool run", "<=", 1.05),
    ("idle_wakeups_no_watchdog", "idle wake-ups in the window, no watchdog", "==", 0),
    ("idle_rss_mb", "idle RSS (MB)", "<", 25),
    ("ready_median_ms", "exec -> READY=1, median (ms)", "<", 400),
    ("burst_lost", "uevents lost in the burst", "==", 0),
]


class BenchError(RuntimeError):
    """Something in the rig did not behave: the figures would mean nothing."""


def serial_for(index: int) -> str:
    # Hex, like a real STM32 unique id, so the daemon takes it as a USB serial selector.
    return f"3A0029000851313433{index:06X}"


def percentile(values: List[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 50 samples is their maximum)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summary_ms(values: List[float]) -> Dict[str, float]:
    return {
        "n": len(values),
        "min_ms": ms(min(values)),
        "p50_ms": ms(percentile(values, 50)),
        "p90_ms": ms(percentile(values, 90)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values)),
    }


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.002) -> Any:
    """Wait for a condition (2 ms polls: the figures are in milliseconds)."""
    try:
        return wait_until(predicate, timeout, what, interval)
    except AssertionError as e:
        raise BenchError(str(e)) from None


# ------------------------------------------------------------------------ the rig ------


class Rig:
    """The farm, the stand-ins' directory and the daemons of one run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.farm = BoardFarm.start(workdir / "farm")
        standin_dir = workdir / "standins"
        standin_dir.mkdir()
        os.chmod(standin_dir, 0o777)
        self.standins = Standins(str(standin_dir))
        self.daemons: List[Tuple[KflashdProcess, NotifyListener]] = []
        self._calls_seen = 0
        self._runtime_dirs: List[Path] = []
        # The daemon logs to a real journald, as under systemd; its receive timestamps
        # also split the reaction into the daemon's share and the stand-ins' share.
        self.journal = Journald().start()

    def daemon(self, name: str, start: bool = True, **options: Any) -> Tuple[KflashdProcess, NotifyListener]:
        listener = NotifyListener()
        daemon = KflashdProcess(self.workdir / name, self.farm.env, self.standins.dir,
                                notify_socket=listener.address, journal_socket=self.journal.socket,
                                **options)
        daemon.env["PATH"] = UNIT_PATH
        self._runtime_on_tmpfs(daemon)
        self.daemons.append((daemon, listener))
        if start:
            self.start(daemon, listener)
        return daemon, listener

    def _runtime_on_tmpfs(self, daemon: KflashdProcess) -> None:
        """runtime_dir on a tmpfs, as /run/kflashd is under systemd (the cycle marker's fsync)."""
        runtime = Path(tempfile.mkdtemp(prefix="kfb", dir="/dev/shm"))
        self._runtime_dirs.append(runtime)
        old = f'runtime_dir = "{daemon.runtime_dir}"'
        text = daemon.config_path.read_text()
        if old not in text:
            raise BenchError(f"unexpected harness config (no {old!r}):\n{text}")
        daemon.config_path.write_text(text.replace(old, f'runtime_dir = "{runtime}"'))
        daemon.runtime_dir = runtime

    def keep_journal(self) -> None:
        """Restart the namespace's journald if it left: it exits after ~30 s without input."""
        if self.journal.process is not None and self.journal.process.poll() is not None:
            self.journal.start()

    def journal_entries(self, daemon: KflashdProcess) -> List[Tuple[float, str]]:
        """(journald's receive time, MESSAGE) of everything `daemon` logged, in order."""
        assert daemon.process is not None
        entries = self.journal.query(_PID=str(daemon.process.pid))
        return sorted((int(e["__REALTIME_TIMESTAMP"]) / 1e6, str(e.get("MESSAGE", ""))) for e in entries)

    def start(self, daemon: KflashdProcess, listener: NotifyListener) -> float:
        """Start `daemon`; returns the seconds from exec to its READY=1."""
        after = len(listener.messages)
        log = open(daemon.log_path, "ab")
        started = time.monotonic()
        daemon.process = subprocess.Popen(
            [PYTHON, "-m", "kflashd.daemon", "--config", str(daemon.config_path)],
            env=daemon.env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
        )
        log.close()
        try:
            listener.wait_for("READY=1", timeout=20, after=after)
        except AssertionError as e:
            raise BenchError(f"{e}\n{daemon.log()}") from None
        return time.monotonic() - started

    def start_klipper(self, daemon: KflashdProcess) -> None:
        write_klipper_unit(self.standins.dir, daemon.api_socket, daemon.printer_state,
                           log=daemon.workdir / "klipper.log")
        self.systemctl(daemon, "start")
        poll(lambda: daemon.api_socket.exists(), 20, "the fake Klipper's API socket", 0.01)

    def systemctl(self, daemon: KflashdProcess, verb: str) -> None:
        subprocess.run(["systemctl", verb, "klipper"], env=daemon.env, check=True,
                       capture_output=True, timeout=30, cwd=str(REPO))

    def new_calls(self) -> List[Dict[str, Any]]:
        """Stand-in records since the last call of this method."""
        calls = self.standins.calls()
        fresh = calls[self._calls_seen:]
        self._calls_seen = len(calls)
        return fresh

    def close(self) -> None:
        for daemon, listener in self.daemons:
            try:
                daemon.stop()
            except AssertionError:
                pass
            listener.close()
        self.standins.cleanup()
        self.farm.stop()
        self.journal.stop()
        for runtime in self._runtime_dirs:
            shutil.rmtree(runtime, ignore_errors=True)


def request(daemon: KflashdProcess, message: Dict[str, Any]) -> Dict[str, Any]:
    with ControlClient(str(daemon.control_socket), timeout=30) as client:
        reply = client.request(message)
    if not reply.get("ok"):
        raise BenchError(f"kflashd refused {message.get('cmd')}: {reply}")
    return reply


def queue(daemon: KflashdProcess, serial: str, image: bytes, version: str) -> str:
    """What `kflashctl queue SERIAL klipper.bin` sends; returns the job id."""
    reply = request(daemon, {
        "cmd": "queue", "board": serial, "image": base64.b64encode(image).decode(),
        "sha256": hashlib.sha256(image).hexdigest(), "mcu": MCU, "version": version,
        "force": False, "now": False,
    })
    return reply["job"]["id"]


class Watch:
    """A `watch` connection: its `end` event is the moment the daemon finished the job."""

    def __init__(self, daemon: KflashdProcess, job_id: str) -> None:
        self.client = ControlClient(str(daemon.control_socket), timeout=60)
        first = self.client.request({"cmd": "watch", "job": job_id})
        if not first.get("ok"):
            raise BenchError(f"watch {job_id}: {first}")

    def end(self) -> Tuple[Dict[str, Any], float]:
        try:
            for event in self.client.events():
                if event.get("event") == "end":
                    return event["job"], time.time()
        finally:
            self.client.close()
        raise BenchError("the watch connection ended without an end event")


def done_or_fail(job: Dict[str, Any], daemon: KflashdProcess) -> None:
    if job["state"] != "done":
        raise BenchError(f"job {job['id']} ended {job['state']}: {job.get('message')}\n{daemon.log()[-4000:]}")
    if not job.get("version_confirmed"):
        # The job then waited out max(timeout_reboot, 2 s) for the proof: the times would
        # measure that wait. (The fake Klipper reports one board as "mcu": keep one plugged.)
        raise BenchError(f"job {job['id']}: Klipper did not confirm the new version "
                         f"(reported {job.get('mcu_version_after')!r}, not {job.get('image_version')!r})")


def first(calls: List[Dict[str, Any]], prog: str, verb: Optional[str] = None, after: float = 0.0) -> Dict[str, Any]:
    for call in calls:
        if call["prog"] == prog and call.get("event") is None and call["time"] >= after \
                and (verb is None or call.get("verb") == verb):
            return call
    raise BenchError(f"no {prog} {verb or ''} call recorded (calls: {[c['prog'] for c in calls]})")


# ------------------------------------------------------------------- the sections ------


def bench_cycles(rig: Rig, plugins: int) -> Dict[str, Any]:
    """Reaction and overhead: one flash per plug-in, a job queued before each."""
    daemon, _ = rig.daemon("cycles")
    rig.start_klipper(daemon)
    serial = serial_for(0)
    cycles: List[Dict[str, Any]] = []
    rig.new_calls()
    for i in range(plugins):
        version = f"v0.13.0-bench-{i}"
        image = make_image(mcu=MCU, version=version, size=CYCLE_IMAGE_SIZE, seed=i)
        if i > 0:
            rig.farm.unplug(serial)  # it came back in Klipper mode after the last flash
        job_id = queue(daemon, serial, image, version)
        watch = Watch(daemon, job_id)
        rig.new_calls()
        t_send = time.time()
        if i == 0:
            rig.farm.add_board(serial, mcu=MCU, mode="katapult")
        else:
            rig.farm.plug(serial, mode="katapult")
        t_reply = time.time()
        job, t_end = watch.end()
        done_or_fail(job, daemon)
        cycles.append({"send": t_send, "reply": t_reply, "end": t_end, "job": job, "calls": rig.new_calls()})
    journal = rig.journal_entries(daemon)
    memory = proc_sample(daemon.process.pid)  # type: ignore[union-attr]
    rig.systemctl(daemon, "stop")
    daemon.stop()
    rig.farm.unplug(serial)  # the fake Klipper's "mcu" must be the next section's board

    samples: List[Dict[str, float]] = []
    for c in cycles:
        calls, t_send = c["calls"], c["send"]
        stop = first(calls, "systemctl", "stop", t_send)
        tool = first(calls, "flashtool", after=t_send)
        start = first(calls, "systemctl", "start", tool["time"])
        tool_s = c["job"]["results"][-1]["elapsed_seconds"]
        logged = JournalMarks(journal, t_send, c["end"], serial)
        samples.append({
            "reaction": tool["time"] - t_send,
            "reaction_from_reply": tool["time"] - c["reply"],
            "farm_request": c["reply"] - t_send,
            "downtime": start["time"] - stop["time"],
            "tool": tool_s,
            "overhead": start["time"] - stop["time"] - tool_s,
            "after_start": c["end"] - start["time"],
            "total": c["end"] - t_send,
            # the reaction, split at the daemon's own log lines
            "r_uevent": logged.at("add: katapult board") - t_send,
            "r_daemon": logged.at("stopping klipper") - logged.at("add: katapult board"),
            "r_stop": logged.at("running ") - logged.at("stopping klipper"),
            "r_tool_start": tool["time"] - logged.at("running "),
            # the downtime, split likewise
            "d_stop": logged.at("running ") - stop["time"],
            "d_reboot": logged.at("add: klipper board", after=logged.at("via katapult in")) - logged.at("via katapult in"),
            "d_start": start["time"] - logged.at("add: klipper board", after=logged.at("via katapult in")),
        })
    column = lambda key: [s[key] for s in samples]  # noqa: E731
    p50 = lambda key: ms(statistics.median(column(key)))  # noqa: E731
    return {
        "plugins": plugins,
        "image_bytes": CYCLE_IMAGE_SIZE,
        "reaction": summary_ms(column("reaction")),
        "reaction_from_farm_reply": summary_ms(column("reaction_from_reply")),
        "farm_plug_request": summary_ms(column("farm_request")),
        "reaction_split_p50_ms": {
            "plug_request_to_daemon_logs_add": p50("r_uevent"),
            "add_to_daemon_logs_stopping_klipper": p50("r_daemon"),
            "stopping_klipper_to_daemon_logs_running_flashtool": p50("r_stop"),
            "running_flashtool_to_its_start_record": p50("r_tool_start"),
        },
        "daemon_share": summary_ms([s["r_uevent"] + s["r_daemon"] for s in samples]),
        "klipper_downtime": summary_ms(column("downtime")),
        "tool_elapsed": summary_ms(column("tool")),
        "overhead": summary_ms(column("overhead")),
        "downtime_split_p50_ms": {
            "systemctl_stop_record_to_running_flashtool": p50("d_stop"),
            "flashed_to_board_back_in_klipper_mode": p50("d_reboot"),
            "board_back_to_systemctl_start_record": p50("d_start"),
        },
        "systemctl_start_to_job_end": summary_ms(column("after_start")),
        "plug_to_job_end": summary_ms(column("total")),
        "rss_after_mb": round(memory["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(memory["VmHWM"] / 1024, 1),
    }


class JournalMarks:
    """When the daemon logged what, within one cycle's time window."""

    def __init__(self, journal: List[Tuple[float, str]], since: float, until: float, serial: str) -> None:
        self.entries = [(t, m) for t, m in journal if since <= t <= until + 1.0]
        self.serial = serial

    def at(self, text: str, after: float = 0.0) -> float:
        for t, message in self.entries:
            if t >= after and text in message and (not text.startswith("add:") or self.serial in message):
                return t
        raise BenchError(f"the daemon did not log {text!r} in this cycle: {[m[:60] for _, m in self.entries]}")


def run_flashtool(rig: Rig, daemon: KflashdProcess, device: str, image_path: Path) -> float:
    """The stand-in flashtool.py run by hand, as the README's manual recipe does; seconds."""
    argv = ["python3", str(FLASHTOOL), "-d", device, "-f", str(image_path), "-b", "115200"]
    for _attempt in range(3):
        started = time.monotonic()
        result = subprocess.run(argv, env=daemon.env, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        if result.returncode == 0:
            return elapsed
        # The stand-in looks for other holders of the tty by name too, so a test suite
        # running its own farm at the same time can hold "our" /dev/ttyACMn: try again.
        if "in use by another program" not in result.stdout:
            break
        time.sleep(0.5)
    raise BenchError(f"direct flashtool.py failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def bench_ratio(rig: Rig, repeats: int) -> Dict[str, Any]:
    """The same image onto the same board: by the daemon, and by flashtool.py alone."""
    daemon, _ = rig.daemon("ratio")
    serial = serial_for(1)
    rig.farm.add_board(serial, mcu=MCU, mode="klipper")
    rig.start_klipper(daemon)
    direct: List[float] = []
    by_hand: List[float] = []
    driven: List[float] = []
    tool_in_daemon: List[float] = []
    to_start: List[float] = []  # plug-in -> the daemon's `systemctl start klipper`
    for r in range(repeats):
        version = f"v0.13.0-ratio-{r}"
        image = make_image(mcu=MCU, version=version, size=RATIO_IMAGE_SIZE, seed=100 + r)
        out = daemon.workdir / f"out{r}"
        out.mkdir()
        (out / "klipper.bin").write_bytes(image)

        # By hand: stop Klipper, double-tap reset, flashtool.py, start Klipper.
        t0 = time.monotonic()
        rig.systemctl(daemon, "stop")
        t1 = time.monotonic()
        rig.farm.reset(serial, mode="katapult")
        device = rig.farm.wait_for_mode(serial, "katapult")["device_node"]
        tool_s = run_flashtool(rig, daemon, device, out / "klipper.bin")
        t2 = time.monotonic()
        rig.systemctl(daemon, "start")
        t3 = time.monotonic()
        direct.append(tool_s)
        by_hand.append((t1 - t0) + tool_s + (t3 - t2))
        rig.farm.wait_for_mode(serial, "klipper")
        if rig.farm.board(serial)["image_version"] != version:
            raise BenchError("the direct flashtool.py run did not write the image")

        # By the daemon: queue, then the same double-tap.
        version_d = version + "-d"
        image_d = make_image(mcu=MCU, version=version_d, size=RATIO_IMAGE_SIZE, seed=200 + r)
        job_id = queue(daemon, serial, image_d, version_d)
        watch = Watch(daemon, job_id)
        rig.new_calls()
        t_send = time.time()
        rig.farm.reset(serial, mode="katapult")
        job, t_end = watch.end()
        done_or_fail(job, daemon)
        driven.append(t_end - t_send)
        to_start.append(first(rig.new_calls(), "systemctl", "start", t_send)["time"] - t_send)
        tool_in_daemon.append(job["results"][-1]["elapsed_seconds"])
    rig.systemctl(daemon, "stop")
    daemon.stop()
    med = statistics.median
    return {
        "repeats": repeats,
        "image_bytes": RATIO_IMAGE_SIZE,
        "direct_tool_ms": ms(med(direct)),
        "daemon_total_ms": ms(med(driven)),
        "ratio": round(med(driven) / med(direct), 3),
        "tool_under_daemon_ms": ms(med(tool_in_daemon)),
        "tool_ratio": round(med(tool_in_daemon) / med(direct), 3),
        "by_hand_stop_tool_start_ms": ms(med(by_hand)),
        "ratio_vs_by_hand": round(med(driven) / med(by_hand), 3),
        "daemon_to_klipper_start_ms": ms(med(to_start)),
        "ratio_to_klipper_start_vs_by_hand": round(med(to_start) / med(by_hand), 3),
        "samples_ms": {"direct_tool": [ms(v) for v in direct], "daemon_total": [ms(v) for v in driven],
                       "tool_under_daemon": [ms(v) for v in tool_in_daemon]},
    }


def proc_sample(pid: int) -> Dict[str, float]:
    """Wake-ups (context switches of every thread), CPU seconds, RSS of one process."""
    switches = 0
    threads = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        switches += int(line.split()[1])
            threads += 1
        except FileNotFoundError:
            pass  # a thread that just ended
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    memory = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                memory[key] = int(line.split()[1])
    return {"switches": switches, "cpu": cpu, "threads": threads, **memory}


def bench_idle(rig: Rig, seconds: float) -> Dict[str, Any]:
    """Two idle daemons side by side, one with the unit's watchdog."""
    plain, _ = rig.daemon("idle")
    watched, listener = rig.daemon("idle-watchdog", watchdog_usec=WATCHDOG_USEC)
    time.sleep(1.0)  # let start-up settle (first STATUS, the loop's first turns)
    pids = {"no_watchdog": plain.process.pid, "watchdog": watched.process.pid}
    before = {k: proc_sample(p) for k, p in pids.items()}
    pings_before = listener.count("WATCHDOG=1")
    time.sleep(seconds)
    after = {k: proc_sample(p) for k, p in pids.items()}
    pings = listener.count("WATCHDOG=1") - pings_before
    out: Dict[str, Any] = {"window_s": seconds, "watchdog_usec": WATCHDOG_USEC}
    for key in pids:
        a, b = before[key], after[key]
        out[key] = {
            "wakeups": b["switches"] - a["switches"],
            "cpu_s": round(b["cpu"] - a["cpu"], 3),
            "rss_mb": round(b["VmRSS"] / 1024, 1),
            "rss_anon_mb": round(b["RssAnon"] / 1024, 1),
            "rss_file_mb": round(b["RssFile"] / 1024, 1),
            "peak_rss_mb": round(b["VmHWM"] / 1024, 1),
            "threads": b["threads"],
        }
    out["watchdog"]["pings_received"] = pings
    plain.stop()
    watched.stop()
    return out


def bench_ready(rig: Rig, starts: int) -> Dict[str, Any]:
    daemon, listener = rig.daemon("ready", start=False)
    times = []
    for _ in range(starts):
        times.append(rig.start(daemon, listener))
        daemon.stop()
    boards = sum(1 for b in rig.farm.boards() if b["present"])
    return dict(summary_ms(times), boards_present=boards)


def bench_burst(rig: Rig, boards: int, events: int) -> Dict[str, Any]:
    daemon, _ = rig.daemon("burst")
    serials = [serial_for(0x100 + i) for i in range(boards)]
    for serial in serials:
        rig.farm.add_board(serial, mcu=MCU, mode="katapult", plugged=False)
    udev_before = request(daemon, {"cmd": "status"})["udev"]
    cpu_before = proc_sample(daemon.process.pid)["cpu"]  # type: ignore[union-attr]
    plugged = {s: False for s in serials}
    emitted = 0
    t0 = time.monotonic()
    while emitted < events:
        for serial in serials:
            if emitted >= events:
                break
            if plugged[serial]:
                rig.farm.unplug(serial)
            else:
                rig.farm.plug(serial, mode="katapult")
            plugged[serial] = not plugged[serial]
            emitted += 1
    t_emitted = time.monotonic()

    def seen() -> int:
        return request(daemon, {"cmd": "status"})["udev"]["uevents"] - udev_before["uevents"]

    try:
        poll(lambda: seen() >= emitted, 30, f"the daemon to count {emitted} uevents", 0.002)
        t_drained = time.monotonic()
    except BenchError:
        t_drained = float("nan")
    cpu = proc_sample(daemon.process.pid)["cpu"] - cpu_before  # type: ignore[union-attr]
    udev = request(daemon, {"cmd": "status"})["udev"]
    present = {b["serial"] for b in request(daemon, {"cmd": "devices"})["boards"] if b["serial"] in plugged}
    expected = {s for s, p in plugged.items() if p}
    daemon.stop()
    seen_count = udev["uevents"] - udev_before["uevents"]
    return {
        "boards": boards,
        "uevents_emitted": emitted,
        "raw_uevents_emitted": emitted * 3,
        "uevents_seen": seen_count,
        "board_events_seen": udev["board_events"] - udev_before["board_events"],
        "overflows": udev["overflows"] - udev_before["overflows"],
        "lost": emitted - seen_count,
        "emit_s": round(t_emitted - t0, 3),
        "emit_rate_per_s": round(emitted / (t_emitted - t0)),
        "drain_ms": ms(t_drained - t_emitted),
        "cpu_ms_per_event": round(cpu * 1000 / emitted, 2),
        "final_table_matches": present == expected,
    }


def bench_standin_startup(rig: Rig, runs: int) -> Dict[str, Any]:
    """What the stand-ins' own Python start-up costs (a real systemctl is a C program)."""
    env = rig.standins.env(dict(os.environ, PATH=UNIT_PATH))
    out: Dict[str, List[float]] = {"systemctl": [], "flashtool": []}
    for _ in range(runs):
        for prog, argv in (("systemctl", ["systemctl", "is-active", "bench-none"]),
                           ("flashtool", ["python3", str(FLASHTOOL), "-s"])):
            rig.new_calls()
            started = time.time()
            subprocess.run(argv, env=env, capture_output=True, timeout=30)
            out[prog].append(first(rig.new_calls(), prog)["time"] - started)
    return {f"{prog}_exec_to_record_p50_ms": ms(statistics.median(v)) for prog, v in out.items()}


# ------------------------------------------------------------------------ report ------


def machine() -> Dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=str(REPO),
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
    }


def headline(results: Dict[str, Any]) -> Dict[str, float]:
    return {
        "reaction_p50_ms": results["cycles"]["reaction"]["p50_ms"],
        "reaction_p99_ms": results["cycles"]["reaction"]["p99_ms"],
        "overhead_p50_ms": results["cycles"]["overhead"]["p50_ms"],
        "ratio": results["ratio"]["ratio"],
        "idle_wakeups_no_watchdog": results["idle"]["no_watchdog"]["wakeups"],
        "idle_rss_mb": max(results["idle"]["no_watchdog"]["rss_mb"], results["idle"]["watchdog"]["rss_mb"]),
        "ready_median_ms": results["ready"]["p50_ms"],
        "burst_lost": results["burst"]["lost"],
    }


def met(value: float, comparison: str, limit: float) -> bool:
    return {"<": value < limit, "<=": value <= limit, "==": value == limit}[comparison]


def table(results: Dict[str, Any], figures: Dict[str, float]) -> str:
    """The human view: each target, then the figures that explain it (all ms unless said)."""
    c, r, i, b, st, h = (results[k] for k in ("cycles", "ratio", "idle", "burst", "standins", "hostile"))
    rs, ds = c["reaction_split_p50_ms"], c["downtime_split_p50_ms"]
    verdict = {key: (f"{figures[key]:g}", f"{cmp} {limit:g}", "ok" if met(figures[key], cmp, limit) else "MISSED")
               for key, _label, cmp, limit in TARGETS}
    labels = {key: label for key, label, _cmp, _limit in TARGETS}

    def target(key: str) -> Tuple[str, str, str, str]:
        return (labels[key],) + verdict[key]

    def note(label: str, value: str) -> Tuple[str, str, str, str]:
        return ("  " + label, value, "", "")

    rows = [
        ("figure", "measured", "target", ""),
        target("reaction_p50_ms"),
        target("reaction_p99_ms"),
        note("same, from the farm's reply (p50 / p99)",
             f"{c['reaction_from_farm_reply']['p50_ms']:g} / {c['reaction_from_farm_reply']['p99_ms']:g}"),
        note("daemon's own share: uevent -> 'stopping klipper' (p50 / p99)",
             f"{c['daemon_share']['p50_ms']:g} / {c['daemon_share']['p99_ms']:g}"),
        note("split p50: uevent / daemon / systemctl stop / tool start-up",
             f"{rs['plug_request_to_daemon_logs_add']:g} / {rs['add_to_daemon_logs_stopping_klipper']:g} / "
             f"{rs['stopping_klipper_to_daemon_logs_running_flashtool']:g} / {rs['running_flashtool_to_its_start_record']:g}"),
        note("stand-ins' interpreter start-up: systemctl / flashtool",
             f"{st['systemctl_exec_to_record_p50_ms']:g} / {st['flashtool_exec_to_record_p50_ms']:g}"),
        target("overhead_p50_ms"),
        note("overhead p99; Klipper downtime p50; tool p50",
             f"{c['overhead']['p99_ms']:g}; {c['klipper_downtime']['p50_ms']:g}; {c['tool_elapsed']['p50_ms']:g}"),
        note("downtime split p50: stop / board reboot / start",
             f"{ds['systemctl_stop_record_to_running_flashtool']:g} / "
             f"{ds['flashed_to_board_back_in_klipper_mode']:g} (reboot) / {ds['board_back_to_systemctl_start_record']:g}"),
        target("ratio"),
        note("direct tool run / daemon-driven flash", f"{r['direct_tool_ms']:g} / {r['daemon_total_ms']:g}"),
        note("tool under the daemon / the same tool run directly", f"{r['tool_ratio']:g}"),
        note("daemon-driven / by hand (stop + tool + start)", f"{r['ratio_vs_by_hand']:g}"),
        note("same, daemon only up to its `systemctl start`", f"{r['ratio_to_klipper_start_vs_by_hand']:g}"),
        target("idle_wakeups_no_watchdog"),
        note("with the watchdog: wake-ups (WATCHDOG=1 received)",
             f"{i['watchdog']['wakeups']} ({i['watchdog']['pings_received']})"),
        note(f"CPU s in {i['window_s']:g} s: no watchdog / watchdog",
             f"{i['no_watchdog']['cpu_s']:g} / {i['watchdog']['cpu_s']:g}"),
        target("idle_rss_mb"),
        note("anonymous / file-backed; after the flashes", f"{i['no_watchdog']['rss_anon_mb']:g} / "
             f"{i['no_watchdog']['rss_file_mb']:g}; {c['rss_after_mb']:g}"),
        target("ready_median_ms"),
        note("max of the starts", f"{results['ready']['max_ms']:g}"),
        target("burst_lost"),
        note("seen / emitted; rate /s; drain; daemon CPU per event",
             f"{b['uevents_seen']} / {b['uevents_emitted']}; {b['emit_rate_per_s']}; {b['drain_ms']:g}; "
             f"{b['cpu_ms_per_event']:g}"),
        ("status under a crafted image + 60 full buffers: p50 / p99 / max", f"{h['status']['p50_ms']:g} / "
         f"{h['status']['p99_ms']:g} / {h['status']['max_ms']:g}", "< 1000 (test_loop)", ""),
        note("crafted image answered in; daemon peak memory (VmHWM) MiB",
             f"{h['crafted_image_reply_ms']:g} ms; {h['peak_rss_mb']:g}"),
    ]
    widths = [max(len(row[k]) for row in rows) for k in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def bench_update(rig: Rig) -> Dict[str, Any]:
    from bench.update import bench_update as run

    return run(rig)


def update_table(result: Dict[str, Any]) -> str:
    from bench.update import table as render

    return render(result)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and a 10 s idle window")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON document to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon logs)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.run: run it as root: sudo .venv/bin/python -m bench.run", file=sys.stderr)
        return 2
    plugins, repeats, idle_s, starts, stand = (20, 3, 10.0, 10, 5) if args.quick else (60, 7, 60.0, 10, 10)
    workdir = Path(tempfile.mkdtemp(prefix="kfb"))  # short: Unix socket paths live under it
    os.chmod(workdir, 0o755)
    rig = Rig(workdir)
    started = time.monotonic()
    results: Dict[str, Any] = {}
    try:
        for name, step in (
            ("idle", lambda: bench_idle(rig, idle_s)),
            ("ready", lambda: bench_ready(rig, starts)),
            ("cycles", lambda: bench_cycles(rig, plugins)),
            ("ratio", lambda: bench_ratio(rig, repeats)),
            ("burst", lambda: bench_burst(rig, BURST_BOARDS, BURST_EVENTS)),
            ("standins", lambda: bench_standin_startup(rig, stand)),
            ("update", lambda: bench_update(rig)),  # bench/update.py: kflashctl update, N boards
            ("hostile", lambda: bench_hostile(rig, summary_ms)),
        ):
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            rig.keep_journal()
            results[name] = step()
    except BaseException:
        print(f"bench: failed; daemon logs kept in {workdir}", file=sys.stderr)
        args.keep = True
        raise
    finally:
        rig.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    figures = headline(results)
    document = {
        "command": "sudo .venv/bin/python -m bench.run" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "duration_s": round(time.monotonic() - started, 1),
        "figures": figures,
        "targets": {key: {"target": f"{cmp} {limit:g}", "met": met(figures[key], cmp, limit)}
                    for key, _label, cmp, limit in TARGETS},
        "results": results,
    }
    text = json.dumps(document, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print()
    print(table(results, figures))
    print()
    print(update_table(results["update"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
