"""The farm's CAN buses: CAN nodes (toolhead boards) reachable only through a bus.

These machines have no SocketCAN (no AF_CAN, no vcan), so a bus is farm state the
controller keeps, and the stand-in flashtool.py's CAN side (and the fake Klipper) reach it
through one UNIX socket, ``$KFLASHD_FARM_CANBUS``. One connection carries one request, a
JSON line, answered by one JSON line:

- ``{"op": "jump", "iface": "can0", "uuid": "0e0d81e4210c"}``: the admin "reboot into the
  bootloader" message (Klipper's canserial admin command 0x02 + uuid). A node running
  Klipper enters Katapult; a USB-to-CAN bridge whose UUID it is re-enumerates on USB as
  Katapult (``1d50:6177``), after a short delay as a real one does.
- ``{"op": "query", "iface": ...}``: the unassigned-node query: ``{"nodes": [[uuid, app]]}``,
  app "Katapult" or "Klipper"; a node Klipper has talked to (assigned a node id) does not
  answer until it resets, as in Klipper's canserial.
- ``{"op": "connect", "iface": ..., "uuid": ...}``: talk to a node in Katapult. On
  ``{"ok": true}`` the connection becomes that node's Katapult byte stream (the same
  frames as over USB; the node also answers GET_CANBUS_ID); COMPLETE boots it into
  Klipper when an application is in flash.
- ``{"op": "identify", "iface": ..., "uuid": ...}``: what the fake Klipper learns from a
  node running Klipper: ``{"app": "Klipper", "version": ...}``.

A bus exists while its bridge runs Klipper (606f) and answers only while its interface is
up; anything else is ``{"ok": false, "error": "down" | "missing"}``, which the stand-in
turns into the real tool's failures.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, Dict, List, Optional

from tests.farm.images import find_dict
from tests.farm.katapult import Flash, KatapultEmulator


class CanNode:
    """One CAN toolhead board: uuid, MCU, mode (klipper/katapult) and flash contents."""

    def __init__(self, uuid: str, mcu: str, interface: str, mode: str, app_start: int, version: str,
                 bootloader_version: str, flash_base: int, flash_size: int, page_size: int) -> None:
        self.uuid = uuid
        self.mcu = mcu
        self.interface = interface
        self.mode = mode
        self.app_start = app_start
        self.fallback_version = version
        self.bootloader_version = bootloader_version
        self.flash = Flash(base=flash_base, size=flash_size, page_size=page_size)
        self.device: Optional[KatapultEmulator] = None
        self.sock: Optional[socket.socket] = None
        self.jumps = 0
        # Klipper assigned it a node id (the fake Klipper talked to it): until it resets,
        # it does not answer the unassigned-node query (Klipper's canserial), even after
        # Klipper stopped.
        self.claimed = False
        self.boots = 0
        self.connects = 0
        self.blocks_received = 0
        self.completes = 0

    def app_present(self) -> bool:
        word = self.flash.read(self.app_start, 4)
        return word not in (b"\x00" * 4, b"\xff" * 4)

    def image_version(self) -> Optional[str]:
        off = self.app_start - self.flash.base
        found = find_dict(bytes(self.flash.memory[off:]))
        return found.get("version") if found else None

    def running_version(self) -> Optional[str]:
        return (self.image_version() or self.fallback_version) if self.mode == "klipper" else None

    def close_session(self) -> None:
        if self.device is not None:
            self.device.stop()
            stats = self.device.stats()
            self.blocks_received += stats["blocks_received"]
            self.completes += stats["completes"]
            self.device = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def info(self) -> Dict[str, Any]:
        session = self.device.stats() if self.device is not None else {}
        return {"uuid": self.uuid, "mcu": self.mcu, "interface": self.interface, "mode": self.mode,
                "app_start": self.app_start, "image_version": self.image_version(),
                "running_version": self.running_version(), "jumps": self.jumps, "boots": self.boots,
                "claimed": self.claimed,
                "connects": self.connects + session.get("connects", 0),
                "blocks_received": self.blocks_received + session.get("blocks_received", 0),
                "completes": self.completes + session.get("completes", 0)}


class CanBusServer:
    """The socket the stand-ins reach the buses through; runs in the controller's main thread.

    ``bus_state(iface)`` says "up", "down" or "missing" (the controller knows its bridges);
    ``bridge_uuids(iface)`` maps the UUIDs of bridges on that interface to a callback that
    reboots the bridge into Katapult; ``post(kind, uuid, device)`` hands emulator events
    (a COMPLETE's boot) to the main thread.
    """

    def __init__(self, path: str, bus_state: Callable[[str], str],
                 bridge_jump: Callable[[str, str], bool],
                 bridge_version: Callable[[str, str], Optional[str]],
                 post: Callable[[str, str, Any], None]) -> None:
        self.path = path
        self.bus_state = bus_state
        self.bridge_jump = bridge_jump
        self.bridge_version = bridge_version
        self.post = post
        self.nodes: Dict[str, CanNode] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o666)
        self.listener.listen(16)

    def fileno(self) -> int:
        return self.listener.fileno()

    def add_node(self, node: CanNode) -> None:
        self.nodes[node.uuid] = node

    def node(self, uuid: str) -> Optional[CanNode]:
        return self.nodes.get(uuid)

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(2.0)  # the stand-ins write their request at once
        keep = False
        try:
            line = b""
            while not line.endswith(b"\n") and len(line) < 4096:
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            reply, session = self.handle(json.loads(line))
            conn.sendall(json.dumps(reply).encode() + b"\n")
            if session is not None:
                keep = True
                self._serve(session, conn)
        except (OSError, ValueError):
            pass
        finally:
            if not keep:
                conn.close()

    def handle(self, req: Dict[str, Any]) -> "tuple[Dict[str, Any], Optional[CanNode]]":
        op, iface, uuid = req.get("op"), str(req.get("iface", "")), str(req.get("uuid", "")).lower()
        state = self.bus_state(iface)
        if state != "up":
            return {"ok": False, "error": state}, None
        on_bus = [n for n in self.nodes.values() if n.interface == iface]
        node = next((n for n in on_bus if n.uuid == uuid), None)
        if op == "jump":
            if node is not None and node.mode == "klipper":
                node.jumps += 1
                node.mode = "katapult"
                node.claimed = False
            bridge = self.bridge_jump(iface, uuid)
            return {"ok": True, "bridge": bridge}, None
        if op == "query":
            return {"ok": True, "nodes": [[n.uuid, "Katapult" if n.mode == "katapult" else "Klipper"]
                                          for n in on_bus if not n.claimed]}, None
        if op == "identify":
            bridge_version = self.bridge_version(iface, uuid)
            if bridge_version is not None:
                return {"ok": True, "app": "Klipper", "version": bridge_version}, None
            if node is None or node.mode != "klipper":
                return {"ok": False, "error": "no answer"}, None
            node.claimed = True
            return {"ok": True, "app": "Klipper", "mcu": node.mcu, "version": node.running_version()}, None
        if op == "connect":
            if node is None or node.mode != "katapult":
                return {"ok": False, "error": "no answer"}, None
            return {"ok": True}, node
        return {"ok": False, "error": f"unknown op {op!r}"}, None

    def _serve(self, node: CanNode, conn: socket.socket) -> None:
        node.close_session()
        conn.setblocking(False)
        node.sock = conn
        node.device = KatapultEmulator(
            conn.fileno(), node.flash, mcu=node.mcu, app_start=node.app_start, version=node.bootloader_version,
            name=f"can-{node.uuid}", on_boot=lambda dev, u=node.uuid: self.post("can_boot", u, dev),
            canbus_uuid=bytes.fromhex(node.uuid))
        node.device.start()

    def on_boot(self, uuid: str, device: Any) -> None:
        """COMPLETE was acked: the node runs its application (or stays in Katapult)."""
        node = self.nodes.get(uuid)
        if node is None or node.device is not device:
            return
        node.close_session()
        node.claimed = False
        if node.app_present():
            node.boots += 1
            node.mode = "klipper"

    def close(self) -> None:
        for node in self.nodes.values():
            node.close_session()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def infos(self) -> List[Dict[str, Any]]:
        return [n.info() for n in self.nodes.values()]
