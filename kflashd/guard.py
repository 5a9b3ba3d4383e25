"""The print guard: ask Klipper, over its API socket, whether the printer may be touched.

Step 1 of the flash cycle. Stopping Klipper in the middle of a print ruins the print (and
may leave a hot nozzle parked on the part), so the guard is deliberately pessimistic:

- `print_stats.state` "printing" or "paused" means busy: a job is running or waiting to
  resume;
- `idle_timeout.state` "Printing" means busy too: Klipper is executing G-code (homing,
  probing, a macro) even when no print file is active, which print_stats alone misses;
- a socket file that exists but does not answer in time, refuses the connection, replies
  with an error or with something unreadable counts as busy: we cannot tell, so we wait;
- only when there is no socket file at all is Klipper taken to be not running: nothing can
  be printing, the guard had nothing to ask, and the cycle goes on (saying so).

Protocol facts (Klipper docs/API_Server.md, klippy/webhooks.py): a UNIX stream socket; every
JSON message is terminated by a 0x03 byte; a request with an "id" gets exactly one reply with
the same id, either {"result": ...} or {"error": {"error": ..., "message": ...}}. An object
that is not loaded comes back as {} (print_stats exists only with [virtual_sdcard]).

This module only reads. It never sends G-code or anything else that changes Klipper's state,
and every call is bounded by its timeout (2 s by default), so a hung Klipper can only delay
a job, never the daemon.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .errors import GuardError

DEFAULT_TIMEOUT = 2.0
ETX = b"\x03"
MAX_MESSAGE = 4 * 1024 * 1024  # a reply bigger than this is not an objects/query answer

#: What the guard asks for (the reference's recommended query).
GUARD_OBJECTS: Dict[str, List[str]] = {
    "print_stats": ["state"],
    "idle_timeout": ["state"],
    "webhooks": ["state"],
}
BUSY_PRINT_STATES = ("printing", "paused")
BUSY_IDLE_TIMEOUT_STATE = "Printing"


class ApiError(GuardError):
    """Klipper's API socket could not be queried (refused, silent, error reply, garbage)."""


class ApiSocketMissing(ApiError):
    """There is no socket file: Klipper is not running (or runs without `-a`)."""


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's answer. `reason` is one line for STATUS and the journal.

    `klipper_running` is False only when there was no API socket file at all.
    """

    busy: bool
    reason: str
    klipper_running: bool


def query_objects(api_socket: str, objects: Dict[str, Optional[List[str]]], timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
    """Run Klipper's `objects/query` and return result["status"] (object name -> fields).

    Raises ApiSocketMissing when there is no socket file, and ApiError for everything else
    that is not a proper reply within `timeout` seconds (one deadline for connect, send
    and receive together).
    """
    if not os.path.exists(api_socket):
        raise ApiSocketMissing(f"no Klipper API socket at {api_socket}")
    request_id = random.randint(1, 2**31 - 1)
    request = json.dumps(
        {"id": request_id, "method": "objects/query", "params": {"objects": objects}}
    ).encode() + ETX
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(api_socket)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(request)
            reply = _read_reply(sock, request_id, deadline)
        except socket.timeout:
            raise ApiError(f"Klipper's API socket {api_socket} does not answer within {timeout:g} s") from None
        except ConnectionRefusedError:
            raise ApiError(f"Klipper's API socket {api_socket} refuses connections (stale socket?)") from None
        except OSError as e:
            raise ApiError(f"Klipper's API socket {api_socket}: {e.strerror or e}") from None
    finally:
        sock.close()

    if "error" in reply:
        error = reply.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        raise ApiError(f"Klipper's API socket {api_socket} replied with an error: {message}")
    result = reply.get("result")
    status = result.get("status") if isinstance(result, dict) else None
    if not isinstance(status, dict):
        raise ApiError(f"Klipper's API socket {api_socket} sent a reply without a status")
    return status


def _read_reply(sock: socket.socket, request_id: int, deadline: float) -> Dict[str, Any]:
    """Read 0x03-terminated messages until the one answering `request_id`."""
    buffer = b""
    while True:
        while ETX in buffer:
            raw, buffer = buffer.split(ETX, 1)
            try:
                message = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise ApiError("Klipper's API socket sent an unreadable reply (not JSON)") from None
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
            # anything else (a message for another client id) is not ours: keep reading
        if len(buffer) > MAX_MESSAGE:
            raise ApiError("Klipper's API socket sent an oversized reply")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ApiError("Klipper's API socket closed the connection without answering")
        buffer += chunk


def _state(status: Dict[str, Any], name: str) -> Optional[str]:
    obj = status.get(name)
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ApiError(f"Klipper's API socket sent a malformed {name} object")
    state = obj.get("state")
    if state is not None and not isinstance(state, str):
        raise ApiError(f"Klipper's API socket sent a malformed {name}.state")
    return state


def check_printer_idle(api_socket: str, timeout: float = DEFAULT_TIMEOUT) -> GuardVerdict:
    """Decide whether the printer may be touched now (see the module docstring). Never raises."""
    try:
        status = query_objects(api_socket, GUARD_OBJECTS, timeout)
        print_state = _state(status, "print_stats")
        idle_state = _state(status, "idle_timeout")
        klippy_state = _state(status, "webhooks")
    except ApiSocketMissing:
        return GuardVerdict(
            busy=False,
            reason=f"no Klipper API socket at {api_socket}: Klipper is not running, nothing to ask",
            klipper_running=False,
        )
    except ApiError as e:
        return GuardVerdict(busy=True, reason=str(e), klipper_running=True)

    if print_state in BUSY_PRINT_STATES:
        return GuardVerdict(True, f"a print is {print_state} (print_stats)", True)
    if idle_state == BUSY_IDLE_TIMEOUT_STATE:
        return GuardVerdict(True, "Klipper is executing G-code: homing, probing or a macro (idle_timeout: Printing)", True)
    details = ", ".join(
        f"{name}: {value}"
        for name, value in (("print_stats", print_state), ("idle_timeout", idle_state), ("klippy", klippy_state))
        if value is not None
    )
    return GuardVerdict(False, f"printer idle ({details or 'no print objects loaded'})", True)


def query_mcu_version(api_socket: str, timeout: float = DEFAULT_TIMEOUT, mcu_object: str = "mcu") -> Optional[str]:
    """The firmware version Klipper reports for an MCU (`mcu.mcu_version`), or None.

    Proof of a successful flash: after Klipper restarts this should equal the image's
    klipper.dict `version`. None covers every way of not knowing (no socket, no answer,
    Klipper still starting and not yet connected to the MCU): callers poll until a deadline.
    `mcu_object` is "mcu" for the main MCU, "mcu <name>" for a secondary one ([mcu EBB]).
    """
    try:
        status = query_objects(api_socket, {mcu_object: ["mcu_version"]}, timeout)
    except ApiError:
        return None
    mcu = status.get(mcu_object)
    version = mcu.get("mcu_version") if isinstance(mcu, dict) else None
    if isinstance(version, str) and version:
        return version
    return None
