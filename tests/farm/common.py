"""Names the farm controller and its CAN side (bridge.py) share."""
from __future__ import annotations

import sys

# USB identity per mode (docs/katapult-protocol.md, "USB identity").
USB_IDENTITY = {
    "katapult": {"vid": "1d50", "pid": "6177", "manufacturer": "katapult"},
    "klipper": {"vid": "1d50", "pid": "614e", "manufacturer": "Klipper"},
}
MODES = tuple(USB_IDENTITY)
# A board WITHOUT Katapult that gets a bootloader request lands in its chip's ROM bootloader:
# a bare USB device with these ids on the same port, no tty (docs/design.md, "Identifying boards").
ROM_BOOTLOADERS = {
    "stm32_dfu": {"vid": "0483", "pid": "df11", "manufacturer": "STMicroelectronics",
                  "product": "STM32  BOOTLOADER"},
    "rp2040_bootsel": {"vid": "2e8a", "pid": "0003", "manufacturer": "Raspberry Pi", "product": "RP2 Boot"},
}
# Flash base and Katapult's default application start per MCU family (first 3 letters).
FAMILY_FLASH = {"stm": (0x8000000, 0x8008000), "rp2": (0x10000000, 0x10004000), "lpc": (0x0, 0x4000)}
# A plausible host controller for ID_PATH / by-path (the fake sysfs has no PCI parent).
PATH_PREFIX = "pci-0000:00:14.0"


class RequestError(Exception):
    """A request the controller refuses; its text goes back to the client."""


def log(message: str) -> None:
    print(f"farm-controller: {message}", file=sys.stderr, flush=True)
