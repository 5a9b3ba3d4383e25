"""`kflashctl update`: start a printer's update and follow it as one live table.

On a terminal the table (board, state, phase, percent) is redrawn in place; otherwise one
line is printed per change of a board's state or phase (percent in steps of 25), so a log
or a CI run stays short. The summary says which board got what. `--json` prints the
daemon's record of the update unchanged (at its end with `--wait`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

from .batch_records import BOARD_FINAL
from .control import ControlClient
from .errors import DaemonUnreachable

# Exit codes as kflashctl's (ctl.py).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 5


def update(client: ControlClient, config: Any, args: argparse.Namespace) -> int:
    from .ctl import checked

    reply = checked(client.request({"cmd": "update", "boards": args.boards, "all": args.all,
                                    "force": args.force}))
    batch = reply["batch"]
    if not args.wait:
        if args.json:
            print(json.dumps(batch, indent=2))
        else:
            print(f"update {batch['id']} started: {', '.join(b['name'] for b in batch['boards'])} "
                  f"(follow it: kflashctl status, or run update with --wait)")
        return EXIT_OK
    if not args.json:
        print(f"update {batch['id']}: {', '.join(b['name'] for b in batch['boards'])}")
    final = follow(config, batch["id"], None if args.json else sys.stdout)
    if args.json:
        print(json.dumps(final, indent=2))
    else:
        print_summary(final, sys.stdout)
    return exit_code(final)


def exit_code(batch: Dict[str, Any]) -> int:
    if batch["state"] == "done":
        return EXIT_OK
    if batch["state"] == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def follow(config: Any, batch_id: str, out: Optional[TextIO]) -> Dict[str, Any]:
    """Stream the update's events to its end; returns its final record."""
    from .ctl import checked, watch_lost
    from .keepalive import CLIENT_SILENCE

    table = LiveTable(out) if out is not None else None
    # Bounded like `queue --wait`: keepalives come every 15 s, a minute of silence ends it.
    with ControlClient(config.control_socket, timeout=CLIENT_SILENCE, group=config.group) as client:
        try:
            latest = checked(client.request({"cmd": "watch", "batch": batch_id}))["batch"]
            if table is not None:
                table.show(latest)
            for event in client.events():
                if "batch" not in event:
                    continue
                latest = event["batch"]
                if table is not None:
                    table.show(latest)
                if event.get("event") == "end":
                    break
        except DaemonUnreachable as e:
            raise DaemonUnreachable(watch_lost(str(e), f"update {batch_id}")) from None
    if table is not None:
        table.close()
    return latest


def _phase(board: Dict[str, Any]) -> str:
    phase = board.get("phase") or ""
    if board.get("percent") is not None:
        phase = f"{phase} {board['percent']}%".strip()
    return phase


class LiveTable:
    """One table redrawn in place on a terminal; changed lines only, otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.last: Dict[str, Tuple[str, str]] = {}

    def show(self, batch: Dict[str, Any]) -> None:
        if self.tty:
            rows = [f"{'BOARD':<16} {'STATE':<12} PHASE"]
            rows += [f"{b['name']:<16} {b['state']:<12} {_phase(b)}" for b in batch["boards"]]
            rows.append(f"Klipper: {batch.get('message') or batch['state']}")
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")
            for row in rows:
                self.out.write(f"\x1b[2K{row}\n")
            self.drawn = len(rows)
        else:
            overall = batch.get("message") if batch["state"] in ("flashing", "waiting for printer") else ""
            if overall and self.last.get("") != (overall, ""):
                self.last[""] = (overall, "")
                self.out.write(f"update: {overall}\n")
            for b in batch["boards"]:
                percent = b.get("percent")
                phase = b.get("phase") or ""
                # "building (27 lines)" is one step: a log gets steps, not every line
                key = (b["state"], f"{phase.split(' (')[0]}{'' if percent is None else percent // 25}")
                if self.last.get(b["name"]) == key:
                    continue
                self.last[b["name"]] = key
                if b["state"] in BOARD_FINAL:
                    text = b["state"] + (f": {b['message']}" if b.get("message") else "")
                else:
                    text = _phase(b) or b["state"]
                self.out.write(f"{b['name']}: {text}\n")
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


def print_summary(batch: Dict[str, Any], out: TextIO) -> None:
    stops = batch.get("klipper_stops", 0)
    out.write(f"update {batch['id']} {batch['state']}: {batch.get('message', '')}"
              f" (Klipper stopped {stops} time{'s' if stops != 1 else ''})\n")
    for b in batch["boards"]:
        job = f" [job {b['job']}]" if b.get("job") else ""
        out.write(f"  {b['name']:<16} {b['state']:<12} {b.get('message', '')}{job}\n")
    out.flush()


def print_batches(batches: List[Dict[str, Any]]) -> None:
    print()
    print(f"{'UPDATE':<12}  {'STATE':<11}  {'CREATED':<19}  BOARDS")
    for batch in batches:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch["created"]))
        boards = ", ".join(f"{b['name']} {b['state']}" + (f" (job {b['job']})" if b.get("job") else "")
                           for b in batch["boards"])
        print(f"{batch['id']:<12}  {batch['state']:<11}  {created}  {boards}")
