#!/usr/bin/env python3
"""Stand-in for Klipper's lib/kconfiglib/olddefconfig.py: rewrite the config in place,
adding the defaults it lacks (as kconfiglib does, which is why kflashd builds from a copy)."""
import sys


def read(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key] = value
    return values


def main():
    kconfig, config = sys.argv[1], sys.argv[2]
    values = read(config)
    for key, value in read(kconfig).items():
        values.setdefault(key, value)
    with open(config, "w") as f:
        f.write("#\n# Automatically generated file; DO NOT EDIT.\n# Klipper Firmware Configuration\n#\n")
        for key, value in values.items():
            f.write(f"{key}={value}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
