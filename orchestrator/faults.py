"""Fault injection for the crash tests: `CODSPLAT_CRASH_AT=<point>` makes the process die at that
point as abruptly as `kill -9` (no cleanup, no finally blocks). Unset in production: a no-op."""

import os
import time

CRASH_ENV = "CODSPLAT_CRASH_AT"


def crashpoint(name: str, delay: float = 0.0) -> None:
    if os.environ.get(CRASH_ENV) == name:
        time.sleep(delay)
        os._exit(137)
