"""The print guard: ask Klipper, over its API socket, whether the printer may be touched.

Step 1 of the flash cycle. Stopping Klipper in the middle of a print ruins the print (and
may leave a hot nozzle parked on the part), so the guard is deliberately pessimistic:

- `print_stats.state` "printing" or "paused" means busy: a job is running or waiting to
  resume;
- `idle_timeout.state` "Printing" means busy too: Klipper is executing G-code (homing,
  probing, a macro) even when no print file is active, which print_stats alone misses;
- a socket that does not answer in time, replies with an error or with something
  unreadable counts as busy: something listens there and we cannot tell, so we wait;
- no socket file, or one nobody listens on (connection refused), is "no answer" and counts
  as busy too: this module alone never says "go" without an answer. Only the caller that
  knows the instance's unit (kflashd/instances.py) may decide that an instance whose unit
  is inactive or failed is not printing;
- a socket the daemon may not open (EACCES) is a configuration error, not a print: busy,
  with `warning` set so that it is reported loudly, with the fix.

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

#: What the guard asks for (docs/katapult-protocol.md, "API socket").
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


class ApiSocketStale(ApiSocketMissing):
    """The socket file is there but nothing listens on it: Klipper exited."""


class ApiAccessDenied(ApiError):
    """The daemon may not open the socket (EACCES): a configuration error, not a print."""


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's answer. `reason` is one line for STATUS and the journal.

    `klipper_running` is False only when the service manager said the instance's unit is
    inactive or failed. `answered` is False when nothing is there to answer (no socket
    file, nobody listening) or the daemon may not ask (access denied); a listener that
    stays silent or talks nonsense is there, so it counts as answered, and busy.
    `warning`: a configuration error holds the job.
    """

    busy: bool
    reason: str
    klipper_running: bool
    answered: bool = True
    warning: bool = False


def query_objects(api_socket: str, objects: Dict[str, Optional[List[str]]], timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
    """Run Klipper's `objects/query` and return result["status"] (object name -> fields).

    Raises ApiSocketMissing when there is no socket file, and ApiError for everything else
    that is not a proper reply within `timeout` seconds (one deadline for connect, send
    and receive together).
    """
    result = _request(api_socket, "objects/query", {"objects": objects}, timeout)
    status = result.get("status")
    if not isinstance(status, dict):
        raise ApiError(f"Klipper's API socket {api_socket} sent a reply without a status")
    return status


def list_objects(api_socket: str, timeout: float = DEFAULT_TIMEOUT) -> List[str]:
    """Klipper's `objects/list`: the names of the loaded objects that have a status.

    Needed because object names keep the case of printer.cfg's section ("mcu EBB") while
    configfile's settings are lower-cased ("mcu ebb"), and objects/query matches names
    exactly (klippy/webhooks.py QueryStatusHelper._handle_list lists
    printer.lookup_objects(); klippy/mcu.py add_printer_objects() adds s.section as is).
    """
    result = _request(api_socket, "objects/list", {}, timeout)
    names = result.get("objects")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ApiError(f"Klipper's API socket {api_socket} sent a reply without an object list")
    return names


def _request(api_socket: str, method: str, params: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Send one request and return its "result" (a dict); errors as query_objects says."""
    try:
        os.stat(api_socket)
    except FileNotFoundError:
        raise ApiSocketMissing(f"no Klipper API socket at {api_socket}") from None
    except PermissionError:  # os.path.exists() would call this "missing": it is not
        raise ApiAccessDenied(_denied(api_socket)) from None
    except OSError as e:
        raise ApiSocketMissing(f"no Klipper API socket at {api_socket} ({e.strerror or e})") from None
    request_id = random.randint(1, 2**31 - 1)
    request = json.dumps({"id": request_id, "method": method, "params": params}).encode() + ETX
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
            # Nobody listens on the file: Klipper leaves its socket behind when it exits
            # (KL klippy/webhooks.py unlinks it only before the next bind), so a refused
            # connect means Klipper is not running, not that it is busy.
            raise ApiSocketStale(f"Klipper's API socket {api_socket} has no listener") from None
        except PermissionError:
            raise ApiAccessDenied(_denied(api_socket)) from None
        except OSError as e:
            raise ApiError(f"Klipper's API socket {api_socket}: {e.strerror or e}") from None
    finally:
        sock.close()

    if "error" in reply:
        error = reply.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        raise ApiError(f"Klipper's API socket {api_socket} replied with an error: {message}")
    result = reply.get("result")
    if not isinstance(result, dict):
        raise ApiError(f"Klipper's API socket {api_socket} sent a reply without a result")
    return result


def _denied(api_socket: str) -> str:
    """Why the socket may not be opened, with its owner and mode (the facts for the fix)."""
    try:
        st = os.stat(api_socket)
        owner = f"owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}"
    except OSError:
        owner = "its directory cannot be searched"
    return (f"kflashd (uid {os.geteuid()}) may not open Klipper's API socket {api_socket} "
            f"({owner}): permission denied")


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
    """Ask one API socket whether the printer may be touched now. Never raises.

    Fails closed on its own: without an answer the verdict is busy (`answered` False);
    instances.check_all() combines it with the unit's state.
    """
    try:
        status = query_objects(api_socket, GUARD_OBJECTS, timeout)
        print_state = _state(status, "print_stats")
        idle_state = _state(status, "idle_timeout")
        klippy_state = _state(status, "webhooks")
    except ApiSocketMissing as e:  # no file, or nobody listening: no answer
        return GuardVerdict(busy=True, reason=str(e), klipper_running=True, answered=False)
    except ApiAccessDenied as e:
        return GuardVerdict(busy=True, reason=str(e), klipper_running=True, answered=False, warning=True)
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


# ---------------------------------------------------------------- which MCU is the board --
#
# Klipper facts this relies on (Klipper3d/klipper, master of 2026-08):
# - klippy/mcu.py add_printer_objects(): the object for [mcu] is "mcu", every [mcu NAME]
#   section becomes an object named exactly like the section ("mcu EBB"); MCU.get_status()
#   returns MCUStatsHelper's _get_status_info, where _mcu_identify() sets "mcu_version"
#   once the MCU is connected (before that the object's status is {}).
# - klippy/mcu.py MCUConnectHelper.__init__(): config.get('canbus_uuid', None), and only
#   without it config.get('serial'): a CAN node has no serial path.
# - klippy/configfile.py ConfigValidate._build_status_settings() / get_status(): the
#   configfile object's "settings" maps the lower-cased section name to {lower-cased option:
#   parsed value} for every option Klipper read (e.g. settings["mcu ebb"]["serial"]).
# - klippy/webhooks.py QueryStatusHelper._handle_list(): objects/list answers
#   {"objects": [names of the objects with a get_status]}.

#: Serial paths that cannot be a USB board kflashd flashes: the Linux host MCU process and
#: the remoteproc channel (klippy/mcu.py treats both specially when reading `serial`).
_NOT_USB_SERIAL_PREFIXES = ("/tmp/klipper_host_", "/dev/rpmsg_")
_BY_ID_DIR = "/dev/serial/by-id/"
_BY_PATH_DIR = "/dev/serial/by-path/"


def _is_mcu_object(name: str) -> bool:
    return name == "mcu" or name.startswith("mcu ")


def mcu_section_is_board(section: Any, serial: str, by_path: Optional[str] = None) -> Optional[bool]:
    """Is the MCU configured by this configfile settings section the board `serial`?

    True: its serial path names the board (a by-id name carrying the USB serial, or the
    board's by-path link). False: it certainly is something else (a by-id name of another
    serial, another USB port's by-path, a CAN node, the host MCU). None: cannot tell
    (/dev/ttyACM0, a custom udev link, no settings yet). Only True may be used to read a
    version: a wrong answer would "confirm" a flash from another board running the same
    Klipper build, which is the common case on a printer with a toolhead board.
    """
    if not isinstance(section, dict):
        return None
    if section.get("canbus_uuid"):
        return False  # a CAN node's identity is its UUID; kflashd flashes USB boards
    path = section.get("serial")
    if not isinstance(path, str) or not path:
        return None
    if path.startswith(_NOT_USB_SERIAL_PREFIXES):
        return False
    if path.startswith(_BY_ID_DIR):
        # udev's by-id name is usb-<vendor>_<product>_<serial>-if<NN>: the serial ends
        # right before "-if". Matching that whole piece keeps "12345" from matching "012345".
        name = path[len(_BY_ID_DIR):]
        return bool(serial) and f"_{serial}-if" in name
    if path.startswith(_BY_PATH_DIR):
        if not by_path:
            return None
        return path == by_path
    return None


def pick_mcu_object(names: List[str], settings: Any, serial: str, by_path: Optional[str] = None,
                    lone_mcu: bool = True) -> Optional[str]:
    """The Klipper object ("mcu" or "mcu NAME") for the board `serial`, or None.

    `names` is objects/list's answer, `settings` configfile's settings. Exactly one MCU
    section must name the board; two naming it (a copy-pasted serial) is not guessed
    between. When no section names it, the main "mcu" is taken only if it is the only MCU
    configured and its serial path says nothing either way (e.g. /dev/ttyACM0): that is
    the single-board printer, where there is nothing else to mistake it for; `lone_mcu`
    False turns that off (several Klipper instances: each has its own lone "mcu").
    """
    mcus = [n for n in names if _is_mcu_object(n)]
    if not isinstance(settings, dict):
        settings = {}
    verdicts = {n: mcu_section_is_board(settings.get(n.lower()), serial, by_path) for n in mcus}
    matches = [n for n, verdict in verdicts.items() if verdict]
    if len(matches) == 1:
        return matches[0]
    if lone_mcu and not matches and mcus == ["mcu"] and verdicts["mcu"] is None:
        return "mcu"
    return None


def query_mcu_version_for(api_socket: str, serial: str, by_path: Optional[str] = None,
                          timeout: float = DEFAULT_TIMEOUT, lone_mcu: bool = True) -> Optional[str]:
    """The firmware version Klipper reports for the MCU that is the board `serial`, or None.

    Two requests within one `timeout`: objects/list for the MCU objects' exact names, then
    one objects/query for configfile's settings and every MCU's mcu_version together (so
    the mapping and the versions come from the same moment). None covers every way of not
    knowing, including "this board is not one Klipper's config names" (see pick_mcu_object):
    callers poll until a deadline and never get another board's version.
    """
    deadline = time.monotonic() + timeout
    try:
        mcus = [n for n in list_objects(api_socket, timeout) if _is_mcu_object(n)]
        if not mcus:
            return None  # Klipper still loading its config
        query: Dict[str, Optional[List[str]]] = {"configfile": ["settings"]}
        query.update({n: ["mcu_version"] for n in mcus})
        status = query_objects(api_socket, query, max(deadline - time.monotonic(), 0.001))
    except ApiError:
        return None
    configfile = status.get("configfile")
    settings = configfile.get("settings") if isinstance(configfile, dict) else None
    name = pick_mcu_object(mcus, settings, serial, by_path, lone_mcu)
    if name is None:
        return None
    mcu = status.get(name)
    version = mcu.get("mcu_version") if isinstance(mcu, dict) else None
    if isinstance(version, str) and version:
        return version
    return None
