"""A Debian bookworm root file system for the booted-host tests, built once and cached.

Why a real Debian: the unit, the polkit rule, the install script and the watchdog can only
be proven by systemd as PID 1 with a real polkitd, D-Bus and journald. mmdebstrap builds
the tree from Debian's packages in about half a minute; it is cached under
``/var/cache/kflashd-tests/`` keyed by the package list (and the suite, architecture), so
a second run reuses it. The cached tree is never modified: each boot puts an overlay on
top of it (see ``machine.py``).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CACHE_DIR = Path(os.environ.get("KFLASHD_TEST_CACHE", "/var/cache/kflashd-tests"))
SUITE = "bookworm"
# systemd as PID 1, D-Bus and polkit (the daemon's way to stop/start Klipper), sudo (the
# README's install command), udev (udevadm test), python3-venv (install.sh's venv),
# umockdev + python3-gi (the emulated board inside the host), python3-pyudev (the stand-in
# Klipper), and the Debian python3 packages install.sh --offline would use, so the rootfs
# serves both install modes. ca-certificates: the trust store pip needs.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "polkitd", "pkexec", "sudo", "udev", "ca-certificates",
    "python3", "python3-venv", "python3-gi", "gir1.2-umockdev-1.0", "umockdev",
    "python3-pyudev", "python3-serial", "python3-setuptools", "python3-wheel",
)
BUILD_TIMEOUT = 600


def cache_key() -> str:
    text = "\n".join([SUITE, os.uname().machine, "minbase", *sorted(PACKAGES)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rootfs_path() -> Path:
    return CACHE_DIR / f"rootfs-{SUITE}-{cache_key()}"


def ensure_rootfs() -> Path:
    """The cached rootfs, built now if missing (under a lock: parallel runs build it once)."""
    path = rootfs_path()
    done = path / ".kflashd-rootfs-complete"
    if done.exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return path
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        argv = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE, str(partial)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed ({result.returncode}): {' '.join(argv)}\n"
                               f"{result.stderr[-4000:]}")
        # Older trees of another package list are no longer used: drop them.
        for old in CACHE_DIR.glob(f"rootfs-{SUITE}-*"):
            if old.name != path.name and not old.name.endswith(".partial"):
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        done.touch()
    return path
