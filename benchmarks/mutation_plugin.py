"""A pytest plugin for benchmarks/mutation.py's coverage map: each test's lines are recorded under its
node id, in this process (coverage's context switch) and in every subprocess it starts (coverage
hands its configuration to subprocesses in COVERAGE_PROCESS_CONFIG, serialised when it started, so
each test sets its own there, with the node id as the static context). It also writes each test's
duration, so that a mutant's tests run fastest first."""

import copy
import json
import os
import time

import coverage
import pytest

DURATIONS: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    current = coverage.Coverage.current()
    if current is not None:
        current.switch_context(item.nodeid)
        config = copy.copy(current.config)
        config.context = item.nodeid
        os.environ["COVERAGE_PROCESS_CONFIG"] = config.serialize()
    started = time.monotonic()
    yield
    DURATIONS[item.nodeid] = round(time.monotonic() - started, 3)


def pytest_sessionfinish(session):
    path = os.environ.get("CODSPLAT_MUTATION_DURATIONS")
    if path:
        with open(path, "w") as out:
            json.dump(DURATIONS, out)
