"""Fault injection for the crash tests: `CODSPLAT_CRASH_AT=<point>` makes the process die at that
point as abruptly as `kill -9` (no cleanup, no finally blocks). Unset in production: a no-op."""

import os
import time
from typing import Callable

CRASH_ENV = "CODSPLAT_CRASH_AT"


def crashpoint(name: str, delay: float = 0.0, until: Callable[[], bool] | None = None, timeout: float = 600.0) -> None:
    """Die here when this is the point named. `until`: first wait (polling) for a condition, so that
    the crash falls where the test wants it (inside a stage of a run, say)."""
    if os.environ.get(CRASH_ENV) != name:
        return
    time.sleep(delay)
    deadline = time.monotonic() + timeout
    while until is not None and not until() and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(137)
