"""A stand-in for `codsplat run` that takes a minute and does nothing: a job still running when its
daemon is told to stop (tests/test_daemon_embedded.py)."""

import time

time.sleep(60)
