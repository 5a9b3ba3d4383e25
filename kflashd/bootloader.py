"""Ask a board that runs Klipper to reboot into its Katapult bootloader (`kflashctl queue --now`).

The request is the USB CDC "1200 baud touch" that Klipper's firmware watches for
(Klipper's src/generic/usb_cdc.c, check_reboot()): on every SET_LINE_CODING and
SET_CONTROL_LINE_STATE it reboots into the bootloader when the line is at 1200 baud and DTR
is low. So, exactly: open the port, raise DTR, set 1200 baud, drop DTR, close. The DTR drop
at 1200 baud is the moment the board acts (on stm32/rp2040 it jumps to Katapult when one is
installed; docs/katapult-protocol.md, "The 1200-baud request").

Why not `flashtool.py -r`: it runs these steps inside one `suppress(OSError)`, so the first
failing ioctl (ENOTTY for the DTR ioctl on a pty, which is what umockdev's emulated boards
are) silently skips the baud change as well and the board never reboots. Here a modem-line
ioctl that fails with ENOTTY or EINVAL ("this tty has no modem lines"; pyserial treats both
so when it opens a port) is skipped and the baud change still happens. Any other failure is
a DiscoveryError that names the device.

This module only sends the request. Whether the board comes back in Katapult is for the
daemon to see through udev (same USB serial number, new device node). Nothing here keeps
the port open afterwards: flashtool.py refuses a tty that any process holds.
"""

from __future__ import annotations

import errno

import serial

from .errors import DiscoveryError

REQUEST_BAUD = 1200
OPEN_BAUD = 9600  # anything but 1200: the change to 1200 is what the firmware sees

# A tty without modem control lines answers TIOCMBIS/TIOCMBIC with one of these.
_NO_MODEM_LINES = (errno.ENOTTY, errno.EINVAL)
# The board may already be resetting when DTR drops at 1200 baud (that is the point): a
# vanished device at that last step is success, not an error.
_DEVICE_LEFT = (errno.EIO, errno.ENODEV, errno.ENXIO)


def _set_dtr(port: serial.Serial, level: bool, device_node: str, gone_ok: bool = False) -> None:
    try:
        port.dtr = level
    except OSError as e:
        if e.errno in _NO_MODEM_LINES:
            return
        if gone_ok and e.errno in _DEVICE_LEFT:
            return
        state = "raise" if level else "drop"
        raise DiscoveryError(f"{device_node}: cannot {state} DTR for the bootloader request: {e.strerror or e}") from e


def request_bootloader(device_node: str) -> None:
    """Send the 1200-baud bootloader request to the Klipper-mode board at `device_node`.

    Returns once the request is sent and the port is closed; raises DiscoveryError (naming
    the device) if the port cannot be opened or its baud rate cannot be set.
    """
    port = serial.Serial()
    port.port = device_node
    port.baudrate = OPEN_BAUD
    try:
        port.open()  # pyserial raises DTR and RTS here already, skipping ENOTTY/EINVAL itself
    except (serial.SerialException, OSError, ValueError) as e:
        raise DiscoveryError(f"{device_node}: cannot open the port to request the bootloader: {e}") from e
    try:
        _set_dtr(port, True, device_node)
        try:
            port.baudrate = REQUEST_BAUD
        except (serial.SerialException, OSError, ValueError) as e:
            raise DiscoveryError(f"{device_node}: cannot set {REQUEST_BAUD} baud for the bootloader request: {e}") from e
        _set_dtr(port, False, device_node, gone_ok=True)
    finally:
        try:
            port.close()
        except OSError:
            pass  # the board is rebooting and took its tty with it
