#!/usr/bin/env python3
"""The stand-in tree's "compiler": compile lines, then klipper.dict and klipper.bin.

Version as Klipper's scripts/buildcommands.py computes it: `git describe --always --tags
--long --dirty` when the tree has a .git, else klippy/.version; a dirty tree or one
without git gets the build time and host name appended.
"""
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import zlib


def read(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key] = value.strip('"')
    return values


def version():
    ver = ""
    if os.path.exists(".git"):
        try:
            ver = subprocess.run(["git", "describe", "--always", "--tags", "--long", "--dirty"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            ver = ""
    clean = bool(ver) and "dirty" not in ver
    if not ver:
        try:
            with open("klippy/.version") as f:
                ver = f.read().strip()
        except OSError:
            ver = "?"
    if not clean:
        ver = "%s-%s-%s" % (ver, time.strftime("%Y%m%d_%H%M%S"), socket.gethostname())
    return ver


def main():
    config_path, out = sys.argv[1], sys.argv[2]
    config = read(config_path)
    mcu = config.get("CONFIG_MCU", "")
    lines = int(config.get("CONFIG_KFLASHD_TEST_LINES", "24"))
    slow = int(config.get("CONFIG_KFLASHD_TEST_SLOW_MS", "0")) / 1000.0
    for n in range(lines):
        print(f"  Compiling {out}src/obj{n:03d}.o", flush=True)
        if slow:
            time.sleep(slow)
        if config.get("CONFIG_KFLASHD_TEST_FAIL") == "y" and n == lines // 2:
            sys.stderr.write(f"src/obj{n:03d}.c: In function 'command_config':\n"
                             f"src/obj{n:03d}.c:42:5: error: 'CONFIG_CLOCK_FREQ' undeclared\n")
            return 1
    if not mcu:
        sys.stderr.write("Kconfig: CONFIG_MCU is not set (run make menuconfig)\n")
        return 1
    ver = version()
    print(f"  Building {out}compile_time_request.o\nVersion: {ver}", flush=True)
    data = {"app": "Klipper", "build_versions": "gcc: (stand-in) 12.2.0 binutils: (stand-in) 2.40",
            "config": {"MCU": mcu, "CLOCK_FREQ": 48000000}, "commands": {}, "responses": {},
            "enumerations": {}, "output": {}, "license": "GNU GPLv3", "version": ver}
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    with open(os.path.join(out, "klipper.dict"), "w") as f:
        f.write(text)
    blob = zlib.compress(text.encode(), 9)
    rng = random.Random(text + json.dumps(config, sort_keys=True))
    size = 4096 + len(blob) + rng.randrange(1024)
    image = bytearray(rng.randbytes(size))
    # The vector table of a build linked for CONFIG_FLASH_APPLICATION_ADDRESS (Klipper's
    # Kconfig; default here: Katapult's default offset for the family): the reset handler
    # lies inside the image, 5/8 in, as in a real STM32F446 build.
    family_start = 0x10004000 if mcu.startswith("rp2") else 0x4000 if mcu.startswith("lpc") else 0x08008000
    start = int(config.get("CONFIG_FLASH_APPLICATION_ADDRESS", str(family_start)), 0)
    image[0:8] = struct.pack("<II", 0x20020000, start + (size * 5 // 8 & ~3) | 1)
    at = 64 + (size - 64 - len(blob)) // 2
    image[at:at + len(blob)] = blob
    with open(os.path.join(out, "klipper.bin"), "wb") as f:
        f.write(image)
    print(f"  Creating bin file {out}klipper.bin", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
