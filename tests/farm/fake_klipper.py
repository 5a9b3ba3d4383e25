"""Stand-in "Klipper service": holds the boards' ports and serves Klipper's API socket.

Started (detached, under the umockdev preload) by the stand-in ``systemctl start klipper``
and SIGTERMed by ``systemctl stop klipper``. While it runs it:

- holds open the tty of every board it sees through pyudev (USB ``1d50:614e`` Klipper and
  ``1d50:6177`` Katapult), rescanning on uevents and every 100 ms, so a flash while
  "Klipper" runs fails the way it does on a real host (flashtool.py finds the tty in
  another process's /proc/*/fd: "Serial device ... in use"); it reads only the Klipper-mode
  ones: Klipper never talks to a board that sits in its bootloader;
- asks each Klipper-mode board which firmware it runs (``tests.farm.klipper_app``'s
  identify line) and reports that as ``mcu.mcu_version``;
- serves ``objects/query``, ``objects/list`` and ``info`` on a UNIX stream socket, JSON
  messages terminated by 0x03 (docs/katapult-protocol.md, "API socket"); a request
  without ``id`` gets no reply; errors as Klipper's webhooks formats them.

The printer's state comes from a small JSON file, re-read per request, e.g.
``{"print_stats": "printing", "idle_timeout": "Printing", "hang": false}``; ``hang`` makes
the socket accept and read but never answer. SIGTERM removes the socket and exits 0.
Every objects/query that asks for print_stats (the print guard's question) is logged as
"guard query", so tests can count how often the guard asked. ``-a`` is klippy.py's
option; ``--socket-owner``/``--socket-mode`` make the socket Klipper user's (0755), and
``--no-ports`` makes it another printer's Klipper that holds none of the farm's boards.

Which MCUs "printer.cfg" configures: by default one ``[mcu]``, the Klipper-mode board with
the lowest serial that has answered, its ``serial`` its by-id link. A ``"mcus"`` key maps
Klipper object names to boards instead, as a printer with a toolhead board has them::

    "mcus": {"mcu": "3A0029000851313433383932", "mcu EBB": "E6616407E3246B29"}

A value is a board serial (the section's ``serial`` is then that board's Klipper-mode
by-id link) or a dict: ``{"serial": SN, "path": "/dev/ttyACM0"}`` (``path`` is what the
section's ``serial`` says; a board is found by ``serial``, else by ``path`` among its
links) or ``{"serial": SN, "canbus_uuid": "11aa22bb33cc"}``. Every configured MCU is an
object (``{}`` until its board runs Klipper and answered), ``configfile.settings`` holds
the sections as klippy/configfile.py does (lower-cased names), and ``webhooks`` is "ready"
only when every configured MCU answered (Klipper connects to all of them).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script path (how the stand-in systemctl starts it)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pyudev  # noqa: E402

from tests.farm.klipper_app import IDENTIFY_QUERY  # noqa: E402

KLIPPER_USB_ID = ("1d50", "614e")
KATAPULT_USB_ID = ("1d50", "6177")
RESCAN_INTERVAL = 0.1
MESSAGE_END = b"\x03"


class HeldPort:
    """One board tty this fake Klipper keeps open."""

    def __init__(self, node: str, fd: int, mode: str, serial: str, model: str = "",
                 links: Optional[List[str]] = None) -> None:
        self.node = node
        self.fd = fd
        self.mode = mode
        self.serial = serial
        self.model = model  # USB product string: the MCU, e.g. "stm32f446xx"
        self.links = links or []  # udev DEVLINKS: by-id and by-path
        self.version: Optional[str] = None
        self.buf = b""
        self.last_query = 0.0


class FakeKlipper:
    def __init__(self, api_socket: str, state_file: str, log_file: Optional[str], hold_ports: bool = True) -> None:
        self.api_socket = api_socket
        self.hold_ports = hold_ports
        self.state_file = state_file
        self.log_file = open(log_file, "a") if log_file else sys.stderr
        self.held: Dict[str, HeldPort] = {}
        self.models: Dict[str, str] = {}  # serial -> MCU name, remembered across modes
        self.clients: Dict[int, Dict[str, Any]] = {}
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context)
        self.monitor.filter_by("tty")
        self.monitor.start()
        self.stop_r, stop_w = os.pipe()
        os.set_blocking(stop_w, False)
        signal.set_wakeup_fd(stop_w)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        if os.path.exists(api_socket):
            os.unlink(api_socket)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(api_socket)
        self.server.listen(8)
        self.started = time.monotonic()

    def log(self, message: str) -> None:
        print(f"fake-klipper[{os.getpid()}]: {message}", file=self.log_file, flush=True)

    # -- board ports ---------------------------------------------------------------------
    def rescan(self) -> None:
        if not self.hold_ports:
            return
        seen: Dict[str, pyudev.Device] = {}
        for dev in self.context.list_devices(subsystem="tty"):
            usb_id = (dev.properties.get("ID_VENDOR_ID"), dev.properties.get("ID_MODEL_ID"))
            if dev.device_node and usb_id in (KLIPPER_USB_ID, KATAPULT_USB_ID):
                seen[dev.device_node] = dev
        for node in list(self.held):
            if node not in seen:
                self.release(node, "gone")
        for node, dev in seen.items():
            if node in self.held:
                continue
            try:
                fd = os.open(node, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            except OSError as exc:
                self.log(f"cannot open {node}: {exc}")
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # Klipper opens its port exclusively
            except OSError:
                pass
            mode = "klipper" if dev.properties.get("ID_MODEL_ID") == KLIPPER_USB_ID[1] else "katapult"
            port = HeldPort(node, fd, mode, dev.properties.get("ID_SERIAL_SHORT", ""),
                            dev.properties.get("ID_MODEL", ""), dev.properties.get("DEVLINKS", "").split())
            if port.model:
                self.models[port.serial] = port.model
            self.held[node] = port
            self.log(f"holding {node} ({mode}, serial {port.serial})")
        now = time.monotonic()
        for port in self.held.values():
            if port.mode == "klipper" and port.version is None and now - port.last_query > 0.3:
                port.last_query = now
                try:
                    os.write(port.fd, IDENTIFY_QUERY)
                except OSError:
                    pass

    def release(self, node: str, why: str) -> None:
        port = self.held.pop(node, None)
        if port is not None:
            os.close(port.fd)
            self.log(f"released {node} ({why})")

    def read_port(self, port: HeldPort) -> None:
        try:
            data = os.read(port.fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENXIO):
                self.release(port.node, "hangup")
                return
            raise
        if not data:
            self.release(port.node, "hangup")
            return
        port.buf += data
        while b"\n" in port.buf:
            line, port.buf = port.buf.split(b"\n", 1)
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("app") == "Klipper":
                port.version = str(reply.get("version"))
                self.log(f"{port.node}: MCU runs {port.version}")

    def main_mcu(self) -> Optional[HeldPort]:
        ports = sorted((p for p in self.held.values() if p.mode == "klipper" and p.version), key=lambda p: p.serial)
        return ports[0] if ports else None

    # -- API socket ----------------------------------------------------------------------
    def printer_state(self) -> Dict[str, Any]:
        try:
            with open(self.state_file) as f:
                state = json.load(f)
        except FileNotFoundError:
            state = {}
        except ValueError as exc:
            self.log(f"bad state file {self.state_file}: {exc}")
            state = {}
        return state if isinstance(state, dict) else {}

    def klipper_by_id(self, serial: str) -> str:
        """The board's by-id link in Klipper mode, as printer.cfg would name it."""
        return f"/dev/serial/by-id/usb-Klipper_{self.models.get(serial, 'unknown')}_{serial}-if00"

    def configured_mcus(self, state: Dict[str, Any]) -> List[Dict[str, Any]]:
        """[{name, section (configfile settings), port (running board or None)}] per MCU."""
        mapping = state.get("mcus")
        if not isinstance(mapping, dict):
            main = self.main_mcu()
            if main is None:
                return []
            return [{"name": "mcu", "section": {"serial": self.klipper_by_id(main.serial), "baud": 250000,
                                                 "restart_method": "command"}, "port": main}]
        running = [p for p in self.held.values() if p.mode == "klipper" and p.version]
        mcus = []
        for name, spec in mapping.items():
            if not isinstance(spec, dict):
                spec = {"serial": str(spec)}
            serial, path = spec.get("serial"), spec.get("path")
            if spec.get("canbus_uuid"):
                iface = spec.get("canbus_interface", "can0")
                section: Dict[str, Any] = {"canbus_uuid": spec["canbus_uuid"], "canbus_interface": iface}
                mcus.append({"name": str(name), "section": section,
                             "port": self.can_port(iface, str(spec["canbus_uuid"]))})
                continue
            else:
                section = {"serial": path or self.klipper_by_id(str(serial)), "baud": 250000,
                           "restart_method": "command"}
            if serial:
                port = next((p for p in running if p.serial == serial), None)
            else:
                port = next((p for p in running if path in p.links or path == p.node), None)
            mcus.append({"name": str(name), "section": section, "port": port})
        return mcus

    def can_port(self, iface: str, uuid: str) -> Optional[HeldPort]:
        """A CAN MCU (a toolhead, or the bridge itself) as Klipper sees it: asked over the
        farm's bus (tests/farm/canbus.py) which firmware it runs; None if it does not answer."""
        path = os.environ.get("KFLASHD_FARM_CANBUS")
        if not path:
            return None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(2.0)
                conn.connect(path)
                conn.sendall(json.dumps({"op": "identify", "iface": iface, "uuid": uuid}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            reply = json.loads(data or b"{}")
        except (OSError, ValueError):
            return None
        if not reply.get("ok"):
            return None
        port = HeldPort(f"{iface}:{uuid}", -1, "klipper", uuid)
        port.version = str(reply.get("version"))
        return port

    def objects(self, state: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        mcus = self.configured_mcus(state)
        ready = bool(mcus) and all(m["port"] is not None for m in mcus)
        objects: Dict[str, Dict[str, Any]] = {
            "print_stats": {"state": state.get("print_stats", "standby"), "filename": state.get("filename", ""),
                            "print_duration": 0.0, "total_duration": 0.0, "message": ""},
            "idle_timeout": {"state": state.get("idle_timeout", "Idle"), "printing_time": 0.0},
            "webhooks": {"state": "ready" if ready else "startup",
                         "state_message": "Printer is ready" if ready else "Printer is not ready"},
        }
        for m in mcus:
            port = m["port"]
            objects[m["name"]] = {} if port is None else {
                "mcu_version": port.version, "mcu_build_versions": "", "mcu_constants": {}, "last_stats": {}}
        objects["configfile"] = {"settings": {m["name"].lower(): m["section"] for m in mcus},
                                 "config": {}, "warnings": [], "save_config_pending": False}
        for name in state.get("unloaded", []):
            objects.pop(name, None)  # e.g. no [virtual_sdcard]: print_stats is not loaded
        return objects

    def handle_request(self, raw: bytes) -> Optional[Dict[str, Any]]:
        try:
            req = json.loads(raw)
        except ValueError:
            self.log(f"undecodable request {raw[:200]!r}")
            return None
        if not isinstance(req, dict):
            return None
        req_id = req.get("id")
        state = self.printer_state()
        method = req.get("method")
        params = req.get("params", {})

        def error(message: str) -> Dict[str, Any]:
            return {"id": req_id, "error": {"error": "WebRequestError", "message": message}}

        if method == "objects/query":
            if isinstance(params, dict) and isinstance(params.get("objects"), dict) and "print_stats" in params["objects"]:
                self.log("guard query: print_stats")  # tests count the print guard's questions
            if not isinstance(params, dict) or "objects" not in params:
                reply = error("Missing Argument [objects]")
            elif not isinstance(params["objects"], dict):
                reply = error("Invalid Argument Type [objects]")
            else:
                objects = self.objects(state)
                status: Dict[str, Any] = {}
                for name, fields in params["objects"].items():
                    obj = objects.get(name, {})
                    status[name] = {k: v for k, v in obj.items() if not fields or k in fields}
                reply = {"id": req_id, "result": {"eventtime": time.monotonic(), "status": status}}
        elif method == "objects/list":
            reply = {"id": req_id, "result": {"objects": list(self.objects(state))}}
        elif method == "info":
            ready = self.objects(state)["webhooks"]["state"] == "ready"
            reply = {"id": req_id, "result": {"state": "ready" if ready else "startup",
                                              "state_message": "Printer is ready" if ready else "Startup",
                                              "app": "Klipper", "software_version": "v0.13.0-farm"}}
        else:
            reply = error(f"webhooks: No registered callback for path '{method}'")
        return None if req_id is None else reply

    def serve_client(self, conn: socket.socket) -> None:
        client = self.clients[conn.fileno()]
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            del self.clients[conn.fileno()]
            conn.close()
            return
        client["buf"] += data
        while MESSAGE_END in client["buf"]:
            raw, client["buf"] = client["buf"].split(MESSAGE_END, 1)
            if self.printer_state().get("hang"):
                continue  # a wedged Klipper: accepts, reads, never answers
            reply = self.handle_request(raw)
            if reply is not None:
                try:
                    conn.sendall(json.dumps(reply).encode() + MESSAGE_END)
                except OSError:
                    pass

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        self.log(f"started; API socket {self.api_socket}, state file {self.state_file}")
        self.rescan()
        next_rescan = time.monotonic() + RESCAN_INTERVAL
        while True:
            readers: List[Any] = [self.stop_r, self.server, self.monitor.fileno()]
            readers += [c["sock"] for c in self.clients.values()]
            # Only Klipper-mode ports are read: Klipper talks to its MCUs by their Klipper-mode
            # path and never to a board in its bootloader (kflashd's read-only CONNECT to a
            # board in Katapult gets its own answers); a Katapult port is only held.
            port_fds = {p.fd: p for p in self.held.values() if p.mode == "klipper"}
            readers += list(port_fds)
            timeout = max(0.0, next_rescan - time.monotonic())
            readable, _, _ = select.select(readers, [], [], timeout)
            if self.stop_r in readable:
                self.log("SIGTERM: stopping")
                return
            if self.monitor.fileno() in readable:
                while self.monitor.poll(timeout=0) is not None:
                    pass
                self.rescan()
            if self.server in readable:
                conn, _ = self.server.accept()
                self.clients[conn.fileno()] = {"sock": conn, "buf": b""}
            for client in list(self.clients.values()):
                if client["sock"] in readable:
                    self.serve_client(client["sock"])
            for fd, port in port_fds.items():
                if fd in readable and port.node in self.held:
                    self.read_port(port)
            if time.monotonic() >= next_rescan:
                self.rescan()
                next_rescan = time.monotonic() + RESCAN_INTERVAL

    def close(self) -> None:
        for node in list(self.held):
            self.release(node, "stopping")
        for client in self.clients.values():
            client["sock"].close()
        self.server.close()
        try:
            os.unlink(self.api_socket)
        except FileNotFoundError:
            pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="stand-in Klipper service for kflashd tests")
    parser.add_argument("-a", "--api-socket", required=True, help="path of the API socket to serve (klippy.py's -a)")
    parser.add_argument("--socket-owner", type=int, help="chown the socket to this uid (Klipper's user)")
    parser.add_argument("--socket-mode", type=lambda v: int(v, 8), help="chmod the socket (Klipper's: 0755)")
    parser.add_argument("--no-ports", action="store_true", help="hold no board ports (another printer's Klipper)")
    parser.add_argument("--state-file", required=True, help="JSON printer state, re-read per request")
    parser.add_argument("--log", help="append diagnostics here (default stderr)")
    args = parser.parse_args(argv)
    klipper = FakeKlipper(args.api_socket, args.state_file, args.log, hold_ports=not args.no_ports)
    if args.socket_mode is not None:  # before the chown: then it is no longer ours to chmod
        os.chmod(args.api_socket, args.socket_mode)
    if args.socket_owner is not None:
        os.chown(args.api_socket, args.socket_owner, args.socket_owner)
    try:
        klipper.run()
    finally:
        klipper.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
