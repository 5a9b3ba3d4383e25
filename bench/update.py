"""Benchmark section "update": Klipper's downtime for `kflashctl update` of N boards.

Run alone (about 70 s on a quiet machine) or as part of bench.run:

    sudo .venv/bin/python -m bench.update [--json FILE]

For N = 1, 3, 6 boards waiting in Katapult on the farm, each with a saved kconfig for the
stand-in Klipper tree (built by real make, as its owner `nobody`), it measures:

batch      `update --all`: one `systemctl stop` record to the one `systemctl start`
           record, minus the sum of the flash tools' own times (each job's
           FlashResult.elapsed_seconds). What is left is the batch's own cost while
           Klipper is down: one stop and one start, and per board the checks, the private
           image copy, waiting for the board to come back in Klipper mode (the farm's board
           boots 100 ms after COMPLETE) and the journal/state writes.
separate   The same N boards flashed as N separate `queue` jobs (one after the other, each
           with its own stop and start): the sum of their downtimes minus their tools.
stopstart  One `systemctl stop klipper` + `systemctl start klipper` by hand, nothing in
           between, measured with the same records (median of 5): what one stop/start
           costs by itself.

Each batch and separate figure is the median of REPEATS (3) runs, the samples in the JSON.
Target (issue 10): batch overhead <= stopstart + 150 ms per board.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from bench.run import MCU, BenchError, Rig, Watch, done_or_fail, first, machine, ms, queue, request, serial_for
from tests.farm.fixtures import write_printer_state
from tests.farm.images import make_image
from tests.standins.fixtures import klipper_tree_update, make_klipper_tree, write_kconfig

SIZES = (1, 3, 6)
REPEATS = 3  # each figure is the median of this many runs
PER_BOARD_MS = 150.0


def watch_batch(daemon, batch_id: str) -> Dict[str, Any]:
    from kflashd.control import ControlClient

    with ControlClient(str(daemon.control_socket), timeout=120) as client:
        first_reply = client.request({"cmd": "watch", "batch": batch_id})
        if not first_reply.get("ok"):
            raise BenchError(f"watch {batch_id}: {first_reply}")
        for event in client.events():
            if event.get("event") == "end":
                return event["batch"]
    raise BenchError("the watch connection ended without an end event")


def stop_start_by_hand(rig: Rig, daemon, repeats: int = 5) -> float:
    spans: List[float] = []
    for _ in range(repeats):
        rig.new_calls()
        rig.systemctl(daemon, "stop")
        rig.systemctl(daemon, "start")
        calls = rig.new_calls()
        stop = first(calls, "systemctl", "stop")
        spans.append(first(calls, "systemctl", "start", stop["time"])["time"] - stop["time"])
    return statistics.median(spans)


def bench_update_n(rig: Rig, tree: Path, n: int, index: int, repeats: int) -> Dict[str, Any]:
    serials = [serial_for(300 + 10 * index + i) for i in range(n)]
    boards = {}
    for i, serial in enumerate(serials):
        kconfig = write_kconfig(rig.workdir / f"u{n}-b{i}.config", MCU)
        boards[f"b{i}"] = {"serial": serial, "mcu": MCU, "kconfig": str(kconfig)}
    (rig.workdir / f"update{n}").mkdir(mode=0o755)  # the builder (nobody) reaches state_dir/builds
    daemon, _ = rig.daemon(f"update{n}", start=False, boards=boards, klipper_dir=tree)
    for serial in serials:
        rig.farm.add_board(serial, mcu=MCU, mode="katapult")
    mcus = {("mcu" if i == 0 else f"mcu b{i}"): s for i, s in enumerate(serials)}
    write_printer_state(daemon.printer_state, idle_timeout="Ready", mcus=mcus)
    rig.start(daemon, rig.daemons[-1][1])
    rig.start_klipper(daemon)
    stopstart = stop_start_by_hand(rig, daemon)

    batch_runs: List[Dict[str, float]] = []
    separate_runs: List[Dict[str, float]] = []
    for r in range(repeats):
        if r:
            for serial in serials:  # back into Katapult, as the first time
                rig.farm.reset(serial, mode="katapult")
                rig.farm.wait_for_mode(serial, "katapult")
        batch_runs.append(one_batch(rig, daemon, force=r > 0))
        separate_runs.append(separate_jobs(rig, daemon, serials, f"{n}-{r}"))
    rig.systemctl(daemon, "stop")
    daemon.stop()
    for serial in serials:
        rig.farm.unplug(serial)

    def median(runs: List[Dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    overhead = median(batch_runs, "overhead")
    target = stopstart + PER_BOARD_MS / 1000 * n
    return {
        "boards": n,
        "repeats": repeats,
        "stopstart_ms": ms(stopstart),
        "batch": {"downtime_ms": ms(median(batch_runs, "downtime")), "tools_ms": ms(median(batch_runs, "tools")),
                  "overhead_ms": ms(overhead),
                  "overhead_samples_ms": [ms(run["overhead"]) for run in batch_runs],
                  "overhead_per_board_beyond_stopstart_ms": ms((overhead - stopstart) / n)},
        "separate": {"downtime_ms": ms(median(separate_runs, "downtime")),
                     "tools_ms": ms(median(separate_runs, "tools")),
                     "overhead_ms": ms(median(separate_runs, "overhead")),
                     "overhead_samples_ms": [ms(run["overhead"]) for run in separate_runs],
                     "klipper_stops": n},
        "target_ms": ms(target),
        "met": overhead <= target,
    }


def one_batch(rig: Rig, daemon, force: bool) -> Dict[str, float]:
    """`update --all` once: Klipper's downtime and the tools' times, from the records."""
    rig.new_calls()
    batch = request(daemon, {"cmd": "update", "all": True, "force": force})["batch"]
    final = watch_batch(daemon, batch["id"])
    if final["state"] != "done" or final["klipper_stops"] != 1:
        raise BenchError(f"update ended {final['state']}: {final.get('message')}\n{daemon.log()[-4000:]}")
    calls = rig.new_calls()
    jobs = [j for j in request(daemon, {"cmd": "history", "limit": 1000})["jobs"] if j.get("batch") == batch["id"]]
    for job in jobs:
        done_or_fail(job, daemon)
    stops = [c for c in calls if c["prog"] == "systemctl" and c.get("verb") == "stop"]
    starts = [c for c in calls if c["prog"] == "systemctl" and c.get("verb") == "start"]
    if len(stops) != 1 or len(starts) != 1:
        raise BenchError(f"the batch stopped Klipper {len(stops)} times, started it {len(starts)} times")
    downtime = starts[0]["time"] - stops[0]["time"]
    tools = sum(j["results"][-1]["elapsed_seconds"] for j in jobs)
    return {"downtime": downtime, "tools": tools, "overhead": downtime - tools}


def separate_jobs(rig: Rig, daemon, serials: List[str], tag: str) -> Dict[str, float]:
    """The same boards as separate `queue` jobs, one after the other."""
    downtimes: List[float] = []
    tools: List[float] = []
    for i, serial in enumerate(serials):
        rig.farm.reset(serial, mode="katapult")
        rig.farm.wait_for_mode(serial, "katapult")
        version = f"v0.13.0-separate-{tag}-{i}"
        job_id = queue(daemon, serial, make_image(mcu=MCU, version=version, size=5000, seed=i), version)
        rig.new_calls()
        job, _ = Watch(daemon, job_id).end()
        done_or_fail(job, daemon)
        calls = rig.new_calls()
        stop = first(calls, "systemctl", "stop")
        start = first(calls, "systemctl", "start", stop["time"])
        downtimes.append(start["time"] - stop["time"])
        tools.append(job["results"][-1]["elapsed_seconds"])
    return {"downtime": sum(downtimes), "tools": sum(tools), "overhead": sum(downtimes) - sum(tools)}


def bench_update(rig: Rig, sizes: Sequence[int] = SIZES, repeats: int = REPEATS) -> Dict[str, Any]:
    tree_parent = rig.workdir / "tree"
    tree_parent.mkdir()
    os.chmod(tree_parent, 0o755)
    tree = make_klipper_tree(tree_parent)
    klipper_tree_update(tree)
    return {"per_n": [bench_update_n(rig, tree, n, i, repeats) for i, n in enumerate(sizes)]}


def table(result: Dict[str, Any]) -> str:
    rows = [("N", "batch: downtime - tools", "target (stop/start + 150 ms x N)", "", "N separate jobs: downtime - tools")]
    for r in result["per_n"]:
        rows.append((str(r["boards"]), f"{r['batch']['overhead_ms']:g} ms", f"<= {r['target_ms']:g} ms",
                     "ok" if r["met"] else "MISSED", f"{r['separate']['overhead_ms']:g} ms ({r['boards']} stops)"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.update", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the JSON document to FILE")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"runs per figure (default {REPEATS})")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.update: run it as root: sudo .venv/bin/python -m bench.update", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="kfu"))
    os.chmod(workdir, 0o755)
    rig = Rig(workdir)
    started = time.monotonic()
    try:
        result = bench_update(rig, repeats=max(1, args.repeats))
    except BaseException:
        print(f"bench.update: failed; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        rig.close()
    shutil.rmtree(workdir, ignore_errors=True)
    document = {"command": "sudo .venv/bin/python -m bench.update", "machine": machine(),
                "duration_s": round(time.monotonic() - started, 1), "update": result}
    text = json.dumps(document, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print()
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
