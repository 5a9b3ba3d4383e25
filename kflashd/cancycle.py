"""The CAN steps of a flash cycle: bus check, toolhead preflight, bridge to Katapult.

Run in the cycle's worker thread; the order stays `FlashCycle.run()`'s. What is special:

- A CAN board's bus must exist and be up before Klipper is touched: flashtool.py cannot
  bind to a missing interface, and sends nothing on a down one. The refusal names the fix.
- A toolhead has no udev presence. Before Klipper is stopped, `flashtool.py -i IFACE -q`
  lists the nodes waiting for a node id; one sitting in Katapult is asked `-s` (connect
  only: no write, no COMPLETE) for its MCU, which must match the image's. A node running
  Klipper does not answer -s; then the configured `mcu` (boards.NAME.mcu) is the check, and
  flashtool's own klipper.bin check runs again once the node is in Katapult. The query is
  safe while Klipper runs: Klipper's canserial knows the admin commands 0x00-0x02 only
  (query, set node id, reboot to bootloader), so the query's "clear node ids" (0x12) does not
  touch its nodes, and a node Klipper has assigned does not answer the query at all.
- A bridge running Klipper (1d50:606f) is sent to Katapult over its own bus with
  `flashtool.py -i IFACE -u UUID -r` while Klipper is stopped; it comes back on USB as
  1d50:6177 and is flashed over that tty as any USB board. If it comes back as something
  else, flashtool says "Device is not Katapult, exiting..." and exits 0: that is a failure
  (the board sits in its ROM bootloader until power-cycled), never a success.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from typing import List, Optional

from . import canbus, proc
from .config import Config
from .models import MODE_BRIDGE, MODE_CAN_NODE, Board

#: `-q` listens 2 s for answers after resetting node ids (0.5 s); `-s` needs the connect.
TIMEOUT_QUERY = 15.0
TIMEOUT_REQUEST = 20.0  # -r on a bridge: jump, then up to 4 s for the USB re-enumeration

_MCU_LINE = re.compile(r"^MCU type: (\S+)\s*$", re.M)
_APP_START_LINE = re.compile(r"^Application Start: (0x[0-9A-Fa-f ]+)$", re.M)


def is_can(board: Board) -> bool:
    return board.mode in (MODE_BRIDGE, MODE_CAN_NODE)


def node_board(config: Config, job_serial: str) -> Optional[Board]:
    """The record a CAN toolhead's job runs against (no udev device: made from the config)."""
    named = canbus.can_board(config, job_serial)
    if named is None or named.canbus_uuid is None:
        return None
    iface = named.canbus_interface
    return Board(serial=named.canbus_uuid, mode=MODE_CAN_NODE, mcu=named.mcu or "", device_node=iface,
                 sys_path=f"can:{iface}:{named.canbus_uuid}", interface=iface)


def bus_refusal(board: Board) -> Optional[str]:
    """Why this CAN board cannot be reached now (its bus missing or down), or None."""
    if not is_can(board):
        return None
    if board.mode == MODE_BRIDGE and not board.interface:
        return (f"the USB-to-CAN bridge {board.serial} has no CAN interface yet: is the gs_usb "
                f"driver loaded? (`ip link show`)")
    why = canbus.down_message(canbus.read_interface(board.interface or canbus.DEFAULT_INTERFACE))
    if why and board.mode == MODE_BRIDGE:
        why += "; or double-tap the board's reset to put it in Katapult by hand"
    return why


def uuid_of(board: Board, config: Config) -> Optional[str]:
    """The UUID flashtool.py and Klipper's [mcu] know this board by (None for USB boards)."""
    if board.mode == MODE_CAN_NODE:
        return board.serial
    if board.mode == MODE_BRIDGE or canbus.carries(config, board.serial):
        return canbus.bridge_uuid(config, board.serial)
    return None


def _flashtool(config: Config, args: List[str], timeout: float, abort: Optional[threading.Event],
               log: logging.Logger) -> Optional[proc.ProcResult]:
    tool = os.path.join(os.path.expanduser(config.katapult_dir), "scripts", "flashtool.py")
    python = shutil.which("python3")
    if python is None or not os.path.isfile(tool):
        return None
    argv = [python, tool, *args]
    log.info(f"running {' '.join(argv)}")
    result = proc.run(argv, timeout, abort=abort, env=proc.child_env({"PYTHONUNBUFFERED": "1"}))
    log.info(f"flashtool.py {'succeeded' if result.ok else result.describe_failure()}; output:\n"
             f"{result.output.replace(chr(0), '')}")
    return result


def preflight_node(board: Board, config: Config, image_mcu: Optional[str], force: bool,
                   abort: threading.Event, log: logging.Logger) -> Optional[str]:
    """Refusal (or None) for a CAN toolhead, asked read-only before Klipper is stopped."""
    iface, uuid = board.interface or canbus.DEFAULT_INTERFACE, board.serial
    query = _flashtool(config, ["-i", iface, "-q"], TIMEOUT_QUERY, abort, log)
    if query is None:
        return f"flashtool.py not found under {config.katapult_dir} (check katapult.dir)"
    if not query.ok:
        return f"cannot query the CAN bus {iface}: {_last_line(query.output)}"
    if canbus.parse_query(query.stdout).get(uuid) != "Katapult":
        return None  # running Klipper (or claimed by it): the configured mcu was checked
    status = _flashtool(config, ["-i", iface, "-u", uuid, "-s"], TIMEOUT_QUERY, abort, log)
    if status is None or not status.ok:
        return (f"CAN node {uuid} on {iface} answers the query as Katapult but not a status "
                f"request: {_last_line(status.output) if status else 'flashtool.py missing'}")
    found = _MCU_LINE.search(status.stdout)
    mcu = found.group(1) if found else None
    if mcu and image_mcu and mcu.lower() != image_mcu.lower() and not force:
        return (f"image is built for {image_mcu} but the CAN node {uuid} is {mcu} (Katapult says "
                f"so): refusing to flash (queue it again with --force only if you are sure)")
    return None


def request_bridge_bootloader(board: Board, config: Config, abort: threading.Event,
                              log: logging.Logger) -> Optional[str]:
    """Ask a bridge running Klipper, over its own bus, to reboot into Katapult (-r).

    Returns the failure, or None when flashtool did its part (the caller then waits for the
    board on USB as Katapult, through udev, as after a 1200-baud request).
    """
    uuid = canbus.bridge_uuid(config, board.serial)
    if uuid is None:
        return f"the bridge's serial {board.serial!r} is not a chip id: no CAN UUID derives from it"
    iface = board.interface or canbus.DEFAULT_INTERFACE
    result = _flashtool(config, canbus.target_args(iface, uuid) + ["-r"], TIMEOUT_REQUEST, abort, log)
    if result is None:
        return f"flashtool.py not found under {config.katapult_dir} (check katapult.dir)"
    if canbus.in_rom_bootloader(result.output):
        return canbus.rom_bootloader_message(board.serial, result.output)
    if not result.ok:
        return (f"flashtool.py could not ask the bridge {board.serial} (UUID {uuid} on {iface}) to "
                f"enter Katapult: {_last_line(result.output) or result.describe_failure()}")
    if "Canbus Bridge detected" not in result.stdout:
        return (f"flashtool.py did not find the bridge {board.serial} as UUID {uuid} on {iface}; "
                f"nothing was written")
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\x00", "").splitlines() if line.strip()]
    return lines[-1] if lines else ""
