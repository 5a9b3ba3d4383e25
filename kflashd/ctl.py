"""kflashctl: stage firmware for a board and watch what kflashd does with it.

The client reads the image itself and sends its bytes; the daemon never opens a path a
client names. Output is for people (tables, a progress bar on a terminal) unless --json
is given, which prints the daemon's records unchanged for scripts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from . import __version__
from .config import load_config
from .control import ControlClient
from .errors import AccessDenied, ConfigError, DaemonUnreachable, KflashError
from .keepalive import CLIENT_SILENCE
from .keepalive import INTERVAL as KEEPALIVE

EXIT_OK = 0
EXIT_FLASH_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_DENIED = 4
EXIT_CANCELLED = 5

EPILOG = f"""\
BOARD is a board name from the config ([boards.NAME]), the board's USB serial number, or its
/dev/serial/by-id/ path in either mode (usb-Klipper_… or usb-katapult_…).

examples:
  kflashctl update --all --wait
      after `git pull` in ~/klipper: build every board that has a kconfig, skip those
      already running the tree's version, flash the rest in ONE stop of Klipper
  kflashctl queue octopus ~/klipper/out/klipper.bin --wait
      stage the image; it is flashed when the board enters Katapult (double-tap reset)
  kflashctl queue octopus ~/klipper/out/klipper.bin --now --wait
      ask the running board to reboot into Katapult and flash it right away
  kflashctl devices        boards connected now, in which mode, and their serials
  kflashctl status         what the daemon is doing; `journalctl -u kflashd` has the details

exit codes:
  {EXIT_OK}  done (for queue --wait: flashed and back)
  {EXIT_FLASH_FAILED}  the flash failed (Klipper was started again; see kflashctl history)
  {EXIT_BAD_INPUT}  bad input: unknown board, unreadable or wrong image, MCU mismatch, bad option
  {EXIT_UNREACHABLE}  kflashd is not reachable (not running? try: sudo systemctl start kflashd)
  {EXIT_DENIED}  permission denied (add yourself to the kflash group)
  {EXIT_CANCELLED}  the job was cancelled, replaced or interrupted before it finished
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kflashctl",
        description="Queue Klipper firmware for kflashd and follow the flash.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="config file (default /etc/kflashd/kflashd.toml)")
    parser.add_argument("--version", action="version", version=f"kflashctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    queue = sub.add_parser("queue", help="stage a firmware image for a board",
                           description="Stage FIRMWARE for BOARD. The data dictionary that Klipper's build "
                           "embeds in klipper.bin tells the MCU it was built for; an image without one, "
                           "or for another MCU, is refused unless --force, and so is an image built for "
                           "another bootloader offset than the board's Katapult uses. The "
                           "board may be plugged in later: the job waits for it.")
    queue.add_argument("board", metavar="BOARD", help="board name, USB serial or /dev/serial/by-id path")
    queue.add_argument("firmware", metavar="FIRMWARE", help="image to flash, e.g. ~/klipper/out/klipper.bin")
    queue.add_argument("--wait", action="store_true", help="follow the job live until it ends; the exit code tells the result")
    queue.add_argument("--now", action="store_true", help="reboot the board into Katapult now if it runs Klipper "
                       "(only a board kflashd has seen in Katapult, or marked katapult = true in the config)")
    queue.add_argument("--force", action="store_true", help="flash even if the image's MCU is unknown or differs "
                       "from the board's, or its bootloader offset does not match")

    update = sub.add_parser("update", help="rebuild and reflash boards after a Klipper update",
                            description="Build each board from its saved Klipper config ([boards.NAME] "
                            "kconfig) as the Klipper tree's owner, skip boards whose running firmware "
                            "already has the tree's version, and flash the rest in ONE stop of Klipper "
                            "(CAN toolheads, USB boards, the USB-to-CAN bridge last). Klipper keeps "
                            "running during the builds and is started again on every path.")
    update.add_argument("boards", metavar="BOARD", nargs="*", help="board names from the config")
    update.add_argument("--all", action="store_true", help="every board that has a kconfig")
    update.add_argument("--wait", action="store_true", help="follow the update live; the exit code tells the result")
    update.add_argument("--force", action="store_true", help="build and flash boards that already run the tree's version")
    update.add_argument("--json", action="store_true", help="print the update's record as JSON (with --wait: at its end)")

    for name, text in (("list", "jobs waiting or running"), ("status", "what kflashd is doing now"),
                       ("history", "finished jobs, newest first"), ("devices", "boards connected now")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        if name == "history":
            p.add_argument("-n", "--limit", type=int, default=20, help="how many jobs (default 20)")
    cancel = sub.add_parser("cancel", help="cancel a queued job", description="Cancel a queued job (not one being flashed).")
    cancel.add_argument("job", metavar="JOB", help="job id from kflashctl list")
    config = sub.add_parser("config", help="show the effective configuration and where each value came from")
    config.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"kflashctl: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.command == "config":
            return show_config(config, args.json)
        with ControlClient(config.control_socket, group=config.group) as client:
            if args.command == "queue":
                return queue(client, config, args)
            if args.command == "update":
                from .ctl_update import update

                return update(client, config, args)
            if args.command == "cancel":
                reply = checked(client.request({"cmd": "cancel", "job": args.job}))
                print(f"job {reply['job']['id']} cancelled")
                return EXIT_OK
            if args.command == "history":
                reply = checked(client.request({"cmd": "history", "limit": args.limit}))
                code = print_jobs(reply["jobs"], args.json, history=True)
                if not args.json and reply.get("batches"):
                    from .ctl_update import print_batches

                    print_batches(reply["batches"])
                return code
            if args.command == "list":
                return print_jobs(checked(client.request({"cmd": "list"}))["jobs"], args.json)
            if args.command == "devices":
                return print_devices(checked(client.request({"cmd": "devices"}))["boards"], args.json)
            if args.command == "status":
                return print_status(checked(client.request({"cmd": "status"})), args.json)
    except DaemonUnreachable as e:
        print(f"kflashctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except AccessDenied as e:
        print(f"kflashctl: {e}", file=sys.stderr)
        return EXIT_DENIED
    except BadInput as e:
        print(f"kflashctl: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nkflashctl: stopped watching; the job goes on (kflashctl status)", file=sys.stderr)
        return 130
    except KflashError as e:
        print(f"kflashctl: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT


class BadInput(KflashError):
    """The daemon rejected the request, or the local input is unusable (exit 2)."""


def checked(reply: Dict[str, Any]) -> Dict[str, Any]:
    if not reply.get("ok"):
        raise BadInput(reply.get("error", "kflashd refused the request"))
    return reply


def read_image(path: str, max_size: int) -> bytes:
    """Read the image the user named, with errors that say what to do."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise BadInput(f"{path} is a directory; give the image file, e.g. {os.path.join(path, 'out', 'klipper.bin')}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the type is then checked on
        # what was opened, and at most max_size + 1 bytes are read whatever the file claims.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                # A FIFO would block waiting for a writer, /dev/zero would never end.
                raise BadInput(f"{path} is not a regular file; give the firmware image, e.g. ~/klipper/out/klipper.bin")
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise BadInput(f"{path} is more than max_image_size ({max_size}) bytes: not a firmware image?")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file (build the firmware with `make` in your Klipper tree first)") from None
    except PermissionError:
        raise BadInput(f"{path}: permission denied") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read: {e.strerror}") from None
    if not data:
        raise BadInput(f"{path} is empty")
    return data


def queue(client: ControlClient, config, args: argparse.Namespace) -> int:
    import base64

    from .firmware import read_image_info

    image = read_image(args.firmware, config.max_image_size)
    info = read_image_info(os.path.expanduser(args.firmware), image)
    request = {
        "cmd": "queue",
        "board": args.board,
        "image": base64.b64encode(image).decode(),
        "sha256": hashlib.sha256(image).hexdigest(),
        "mcu": info.mcu,
        "version": info.version,
        "force": args.force,
        "now": args.now,
    }
    if info.mcu is None and args.force:
        print("note: no data dictionary inside the image: its MCU is unknown and is not checked "
              "against the board's (--force)")
    reply = checked(client.request(request))
    job = reply["job"]
    for warning in reply.get("warnings", []):
        print(f"note: {warning}")
    what = f"{job['image_size']} bytes" + (f", {info.mcu}" if info.mcu else "") + (f", {info.version}" if info.version else "")
    print(f"job {job['id']} queued for {job['board_name'] or job['serial']} ({what})")
    if not args.wait:
        return EXIT_OK
    return watch(config, job["id"])


def watch(config, job_id: str, out: TextIO = sys.stdout, silence: float = CLIENT_SILENCE) -> int:
    """Follow a job to its end; a progress bar on a terminal, one line per step otherwise.

    Never forever: the daemon says something every KEEPALIVE seconds, so `silence` seconds
    without a line, or a closed connection, end the wait with a message (exit 3)."""
    with ControlClient(config.control_socket, timeout=silence, group=config.group) as client:
        try:
            return _follow(client, job_id, out)
        except DaemonUnreachable as e:
            raise DaemonUnreachable(watch_lost(str(e), f"job {job_id}", silence)) from None


def watch_lost(why: str, what: str, silence: float = CLIENT_SILENCE) -> str:
    """What kflashctl says when a watch stream ends without its end event."""
    if "did not answer" in why:
        why = (f"kflashd has sent nothing for {silence:g} s (it says something every "
               f"{KEEPALIVE:g} s): it may be hung or overloaded (journalctl -u kflashd)")
    elif "closed the connection" in why:
        why = "kflashd closed the connection before the end (stopped or restarted?)"
    return f"{why}; stopped waiting for {what}, which may still go on: see kflashctl status and kflashctl history"


def _follow(client: ControlClient, job_id: str, out: TextIO) -> int:
    tty = out.isatty()
    bar_shown = False
    last_plain = None  # (phase, quarter) of the last plain line: a log gets steps, not every percent
    first = checked(client.request({"cmd": "watch", "job": job_id}))
    label = first["job"]["board_name"] or first["job"]["serial"]
    if first["job"]["state"] == "queued":
        out.write(f"waiting for {label} to enter Katapult (double-tap reset, or queue with --now)\n")
        out.flush()
    for event in client.events():
        if event.get("event") == "end":
            if bar_shown:
                out.write("\n")
            return report_end(event["job"], out)
        if event.get("event") != "phase":
            continue
        phase, percent = event.get("phase", ""), event.get("percent")
        message = event.get("message")
        if tty and percent is not None:
            bar = "#" * (percent * 30 // 100)
            out.write(f"\r{phase:<24} [{bar:<30}] {percent:3d}%")
            bar_shown = True
        else:
            key = (phase, None if percent is None else percent // 25)
            if key == last_plain:
                continue
            last_plain = key
            if bar_shown:
                out.write("\n")
                bar_shown = False
            text = phase + (f" {percent}%" if percent is not None else "") + (f": {message}" if message else "")
            out.write(text + "\n")
        out.flush()
    return EXIT_FLASH_FAILED


def report_end(job: Dict[str, Any], out: TextIO) -> int:
    state, message = job["state"], job.get("message", "")
    out.write(f"{state}: {message}\n")
    if job.get("version_confirmed") is True:
        out.write(f"Klipper reports firmware {job.get('mcu_version_after')}\n")
    out.flush()
    if state == "done":
        return EXIT_OK
    if state == "failed":
        return EXIT_FLASH_FAILED
    return EXIT_CANCELLED


def _age(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def print_jobs(jobs: List[Dict[str, Any]], as_json: bool, history: bool = False) -> int:
    if as_json:
        print(json.dumps(jobs, indent=2))
        return EXIT_OK
    if not jobs:
        print("no finished jobs" if history else "no jobs queued")
        return EXIT_OK
    print(f"{'JOB':<12}  {'BOARD':<24}  {'STATE':<11}  {'CREATED':<19}  {'METHOD':<10}  MESSAGE")
    for job in jobs:
        method = job["results"][-1]["method"] if job.get("results") else "-"
        board = job.get("board_name") or job["serial"]
        print(f"{job['id']:<12}  {board:<24}  {job['state']:<11}  {_age(job['created'])}  {method:<10}  {job.get('message', '')}")
    return EXIT_OK


def print_devices(boards: List[Dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps(boards, indent=2))
        return EXIT_OK
    if not boards:
        print("no Klipper or Katapult boards connected")
        return EXIT_OK
    print(f"{'DEVICE':<14}  {'MODE':<10}  {'MCU':<14}  {'SERIAL':<26}  {'PORT':<9}  {'NAME':<12}  QUEUED")
    for b in boards:
        print(f"{b['device_node']:<14}  {b['mode']:<10}  {b['mcu']:<14}  {b['serial']:<26}  "
              f"{b.get('port_path') or '-':<9}  {b.get('name') or '-':<12}  {b.get('queued_job') or '-'}")
        for link in (b.get("by_id"), b.get("by_path")):
            if link:
                print(f"{'':<14}  {link}")
        if b.get("interface_state"):
            role = "bus" if b["mode"] == "can_bridge" else "on"
            print(f"{'':<14}  {role} {b.get('interface') or 'no CAN interface'}: {b['interface_state']}, "
                  f"canbus_uuid {b.get('canbus_uuid')}")
    return EXIT_OK


def print_status(reply: Dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(reply, indent=2))
        return EXIT_OK
    print(f"kflashd {reply.get('version', '')}: {reply['status']}")
    current = reply.get("current")
    if current:
        pct = f" {current['percent']}%" if current.get("percent") is not None else ""
        print(f"  running: job {current['id']} for {current.get('board_name') or current['serial']}: {current['phase']}{pct}")
    for job in reply.get("queued", []):
        print(f"  queued:  job {job['id']} for {job.get('board_name') or job['serial']}: {job.get('message', '')}")
    for job in reply.get("interrupted", []):
        print(f"  interrupted mid-write: job {job['id']} for {job.get('board_name') or job['serial']}: {job.get('message', '')}")
    if reply.get("guard_warning"):
        print(f"  WARNING: the print guard cannot ask Klipper, jobs are held: {reply['guard_warning']}")
    if reply.get("klipper_down"):
        print(f"  KLIPPER IS NOT RUNNING: {reply['klipper_down']} (try: sudo systemctl start klipper)")
    if reply.get("state_problem"):
        print(f"  JOB RECORDS NOT SAVED: {reply['state_problem']}")
    connected = [b for b in reply.get("boards", []) if b.get("mode") != "can_node"]  # CAN nodes: configured
    print(f"  boards connected: {len(connected)} (kflashctl devices)")
    return EXIT_OK


def show_config(config, as_json: bool) -> int:
    from .config import describe

    rows = describe(config)
    # The sockets the print guard asks, one per Klipper unit, and where each came from
    # (the unit's -a needs `systemctl show`, which any user may run).
    from .instances import resolve

    for instance in resolve(config):
        rows.append((f"print guard: {instance.service}", instance.socket, instance.source))
    if as_json:
        print(json.dumps([{"key": k, "value": v, "source": s} for k, v, s in rows], indent=2))
        return EXIT_OK
    print(f"# effective configuration ({config.path or 'no config file: defaults'})")
    for key, value, source in rows:
        print(f"{key} = {json.dumps(value)}    # {source}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
