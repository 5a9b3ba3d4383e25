"""A throwaway system group for the permission tests."""

from __future__ import annotations

import secrets
import subprocess
from typing import Iterator

import pytest


@pytest.fixture
def temp_group() -> Iterator[str]:
    """A fresh system group (nobody is not a member unless a test adds it), removed after."""
    name = f"kflt{secrets.token_hex(4)}"
    subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=30)
