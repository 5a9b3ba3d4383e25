"""The one way tests wait: poll a condition with a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something true and return that.

    At the deadline raise AssertionError naming `what` and the last value, so a failing
    test says what it was waiting for. Exceptions from the predicate propagate at once: a
    broken check must not look like a slow one.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)
