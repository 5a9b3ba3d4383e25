"""Names the farm controller and its CAN side (bridge.py) share."""
from __future__ import annotations

import sys

# USB identity per mode (docs/katapult-protocol.md, "USB identity").
USB_IDENTITY = {
    "katapult": {"vid": "1d50", "pid": "6177", "manufacturer": "katapult"},
    "klipper": {"vid": "1d50", "pid": "614e", "manufacturer": "Klipper"},
}
MODES = tuple(USB_IDENTITY)
# A plausible host controller for ID_PATH / by-path (the fake sysfs has no PCI parent).
PATH_PREFIX = "pci-0000:00:14.0"


class RequestError(Exception):
    """A request the controller refuses; its text goes back to the client."""


def log(message: str) -> None:
    print(f"farm-controller: {message}", file=sys.stderr, flush=True)
