"""Emulated board farm: umockdev-backed USB boards with a Katapult bootloader emulator.

The farm is test equipment, not part of kflashd: it lets end-to-end tests and the demo see
boards appear, reboot and take firmware the way real ones do, with no hardware.

- ``katapult``: the bootloader emulator (device side of Katapult's serial protocol).
- ``klipper_app``: a board running "Klipper" (1200-baud bootloader request, version query).
- ``images``: fake ``klipper.bin`` / ``klipper.dict`` builders.
- ``controller``: the process that owns the umockdev testbed (runs under umockdev-wrapper).
- ``bridge`` / ``canbus``: USB-to-CAN bridges (606f + can0) and the CAN nodes behind them.
- ``client``: ``BoardFarm``, the API tests and the demo use to drive the controller.
- ``fake_klipper``: the stand-in Klipper service (holds board ports, serves the API socket).
- ``fixtures``: pytest fixtures and helpers.
"""
