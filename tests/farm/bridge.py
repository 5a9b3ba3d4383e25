"""The farm's USB-to-CAN bridges (606f + a `net` child), their buses, and boards without Katapult.

A mixin of the controller (tests/farm/controller.py), run in its main thread like the rest:
a bridge running Klipper is a umockdev USB device `1d50:606f` (manufacturer Klipper, product
the MCU, serial the chip id) with a gs_usb interface and a `net` child (type 280, operstate,
flags); its bus (tests/farm/canbus.py) exists while it runs Klipper and answers while the
link is up. The CAN reboot request for its own UUID makes it leave USB and come back as
Katapult (a tty) at the same port, or, for a board without Katapult, as the STM32 ROM
bootloader (DFU 0483:df11, no tty), where it stays.
"""
from __future__ import annotations

import base64
import re
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from tests.farm.canbus import CanNode
from tests.farm.common import MODES, PATH_PREFIX, ROM_BOOTLOADERS, RequestError, log

if TYPE_CHECKING:
    from tests.farm.controller import Board

# Klipper as a USB-to-CAN bridge (gs_usb): no tty, a `net` child (reference "USB identity").
BRIDGE_IDENTITY = {"vid": "1d50", "pid": "606f", "manufacturer": "Klipper"}
ARPHRD_CAN = 280
# A bridge's USB re-enumeration after the CAN reboot request takes this long (flashtool
# polls every 0.5 s for up to 4 s).
BRIDGE_REBOOT_DELAY = 0.6


def bridge_uuid(serial: str) -> str:
    """The canbus UUID of a bridge with this USB serial (kflashd's derivation, checked
    against Katapult's known pairs in the tests)."""
    from kflashd.canbus import uuid_from_serial

    return uuid_from_serial(serial) or ""


class CanFarm:
    """The controller's CAN side (expects its testbed, boards, links, canbus, timers)."""

    def _bridge_text(self, b: Board) -> str:
        vid, pid, mfr = BRIDGE_IDENTITY["vid"], BRIDGE_IDENTITY["pid"], BRIDGE_IDENTITY["manufacturer"]
        up = self.links.get(b.can_interface or "", True)
        usb_path = f"{PATH_PREFIX}-usb-0:1.{b.port}"
        usb = [
            f"P: {b.usb_syspath[len('/sys'):]}", "E: SUBSYSTEM=usb", "E: DEVTYPE=usb_device", "E: DRIVER=usb",
            f"E: PRODUCT={vid}/{pid}/100", f"E: BUSNUM={b.busnum:03d}", f"E: DEVNUM={b.devnum:03d}",
            f"E: ID_VENDOR={mfr}", f"E: ID_VENDOR_ID={vid}", f"E: ID_MODEL={b.mcu}", f"E: ID_MODEL_ID={pid}",
            f"E: ID_SERIAL={mfr}_{b.mcu}_{b.serial}", f"E: ID_SERIAL_SHORT={b.serial}", f"E: ID_PATH={usb_path}",
            f"A: idVendor={vid}", f"A: idProduct={pid}", f"A: manufacturer={mfr}", f"A: product={b.mcu}",
            f"A: serial={b.serial}", f"A: busnum={b.busnum}", f"A: devnum={b.devnum}",
            "A: bcdDevice=0100", "A: bDeviceClass=00", "A: bNumInterfaces= 1", "A: speed=12",
        ]
        iface = [
            f"P: {b.iface_syspath[len('/sys'):]}", "E: SUBSYSTEM=usb", "E: DEVTYPE=usb_interface",
            "E: DRIVER=gs_usb", f"E: PRODUCT={vid}/{pid}/100", "E: INTERFACE=255/255/255",
            "A: bInterfaceNumber=00", "A: bInterfaceClass=ff",
        ]
        net = [
            f"P: {b.net_syspath[len('/sys'):]}", "E: SUBSYSTEM=net", f"E: INTERFACE={b.can_interface}",
            f"E: IFINDEX={b.ifindex}", f"E: ID_PATH={b.id_path}", f"A: type={ARPHRD_CAN}",
            f"A: ifindex={b.ifindex}", f"A: operstate={'up' if up else 'down'}",
            f"A: flags={'0x40081' if up else '0x80'}", "A: mtu=16",
        ]
        return "\n\n".join("\n".join(block) for block in (usb, iface, net)) + "\n"

    def _enumerate_bridge(self, b: Board) -> None:
        """A bridge running Klipper appears: USB 606f, a gs_usb interface, its net child."""
        b.tty_name = None
        b.devnum = self.next_devnum
        self.next_devnum += 1
        b.ifindex = 3 + b.devnum
        self.testbed.add_from_string(self._bridge_text(b))
        b.device = None
        b.running_version = b.image_version() or b.fallback_version
        b.present = True
        b.enumerations += 1
        b.history.append(f"bridge:{b.can_interface}")
        log(f"{b.serial}: plugged in as a USB-to-CAN bridge (606f) with {b.can_interface}")

    def _disconnect_bridge(self, b: Board) -> None:
        for path in (b.net_syspath, b.iface_syspath, b.usb_syspath):
            if self.send_remove_uevents:
                self.testbed.uevent(path, "remove")
            self.testbed.remove_device(path)
        b.present = False
        log(f"{b.serial}: unplugged (USB-to-CAN bridge, {b.can_interface} gone)")

    # -- CAN buses ----------------------------------------------------------------------
    def bus_state(self, iface: str) -> str:
        """"up", "down" or "missing": a bus exists while its bridge runs Klipper."""
        bridge = next((b for b in self.boards.values() if b.can_interface == iface and b.present
                       and b.is_bridge_app), None)
        if bridge is None:
            return "missing"
        return "up" if self.links.get(iface, True) else "down"

    def bridge_jump(self, iface: str, uuid: str) -> bool:
        """The CAN reboot request reached a bridge whose UUID it names: back as Katapult USB."""
        for b in self.boards.values():
            if b.can_interface == iface and b.present and b.is_bridge_app and bridge_uuid(b.serial) == uuid:
                b.bootloader_requests += 1
                log(f"{b.serial}: CAN reboot request -> re-enumerating as Katapult")
                self._disconnect_bridge(b)
                back = self._enumerate_dfu if b.no_katapult else lambda b: self.enumerate(b, "katapult")
                self.timers.append((time.monotonic() + BRIDGE_REBOOT_DELAY, lambda b=b: back(b)))
                return True
        return False

    def bridge_version(self, iface: str, uuid: str) -> Optional[str]:
        """What the bridge whose UUID this is runs, when it runs Klipper on ``iface``."""
        for b in self.boards.values():
            if b.can_interface == iface and b.present and b.is_bridge_app and bridge_uuid(b.serial) == uuid:
                return b.running_version
        return None

    def _enumerate_dfu(self, b: Board) -> None:
        """No Katapult: the request lands in the chip's ROM bootloader (STM32 USB DFU
        0483:df11, RP2040 BOOTSEL 2e8a:0003; no tty) on the same USB port, where the board
        stays until it is power-cycled."""
        rom = ROM_BOOTLOADERS[b.rom_bootloader or "stm32_dfu"]
        b.devnum = self.next_devnum
        self.next_devnum += 1
        self.testbed.add_from_string("\n".join([
            f"P: {b.usb_syspath[len('/sys'):]}", "E: SUBSYSTEM=usb", "E: DEVTYPE=usb_device",
            f"E: PRODUCT={rom['vid'].lstrip('0')}/{rom['pid']}/2200", f"E: BUSNUM={b.busnum:03d}",
            f"E: DEVNUM={b.devnum:03d}", f"A: idVendor={rom['vid']}", f"A: idProduct={rom['pid']}",
            f"A: manufacturer={rom['manufacturer']}", f"A: product={rom['product']}", f"A: serial={b.serial}",
            f"A: busnum={b.busnum}", f"A: devnum={b.devnum}", "A: bDeviceClass=00", "A: bNumInterfaces= 1",
        ]) + "\n")
        b.present, b.in_dfu, b.mode = True, True, "katapult"
        b.history.append("dfu")
        log(f"{b.serial}: no Katapult: in the ROM bootloader ({rom['vid']}:{rom['pid']})")

    def op_set_link(self, iface: str, up: bool) -> Dict[str, Any]:
        """`ip link set IFACE up/down`: the attributes change and a "change" uevent is sent."""
        self.links[iface] = bool(up)
        for b in self.boards.values():
            if b.can_interface == iface and b.present and b.is_bridge_app:
                self.testbed.set_attribute(b.net_syspath, "operstate", "up" if up else "down")
                self.testbed.set_attribute(b.net_syspath, "flags", "0x40081" if up else "0x80")
                self.testbed.uevent(b.net_syspath, "change")
        return {"iface": iface, "state": self.bus_state(iface)}

    def op_add_can_node(self, uuid: str, mcu: str = "stm32g0b1xx", interface: str = "can0",
                        mode: str = "klipper", app_start: int = 0x8002000, version: str = "v0.12.0-farm",
                        bootloader_version: str = "v0.0.1-110-gb0bf421", flash_base: int = 0x8000000,
                        flash_size: int = 128 * 1024, page_size: int = 2048,
                        old_image: Optional[str] = None) -> Dict[str, Any]:
        uuid = str(uuid).lower()
        if not re.fullmatch(r"[0-9a-f]{12}", uuid):
            raise RequestError(f"bad uuid {uuid!r}: 12 hex digits")
        if mode not in MODES:
            raise RequestError(f"bad mode {mode!r}: one of {', '.join(MODES)}")
        node = CanNode(uuid, mcu, interface, mode, int(app_start), version, bootloader_version,
                       int(flash_base), int(flash_size), int(page_size))
        if old_image is not None:
            node.flash.load(node.app_start, base64.b64decode(old_image))
        self.canbus.add_node(node)
        return node.info()

    def can_node(self, uuid: Any) -> CanNode:
        node = self.canbus.node(str(uuid).lower())
        if node is None:
            raise RequestError(f"no CAN node {uuid!r}")
        return node

    def op_can_node(self, uuid: str) -> Dict[str, Any]:
        return self.can_node(uuid).info()

    def op_can_flashed_image(self, uuid: str, length: int) -> str:
        node = self.can_node(uuid)
        return base64.b64encode(node.flash.read(node.app_start, int(length))).decode()
