"""A pytest plugin for benchmarks/mutation.py's coverage map: each test's lines are recorded under its
node id, in this process (coverage's context switch) and in every subprocess it starts (coverage
hands its configuration to subprocesses in COVERAGE_PROCESS_CONFIG, serialised when it started, so
each test sets its own there, with the node id as the static context). It also writes what each test
costs run alone, so that a mutant's tests run cheapest first: its own time, plus the set-up of every
session- or module-wide fixture it uses (a whole pipeline run, for test_pipeline's `tiny_run`), which
only the first test to use it paid here."""

import copy
import json
import os
import time

import coverage
import pytest

DURATIONS: dict[str, float] = {}
SHARED: dict[str, float] = {}  # a session- or module-wide fixture: the time of the test that set it up


def shared_fixtures(item) -> list[str]:
    info = getattr(item, "_fixtureinfo", None)
    return [name for name, defs in (info.name2fixturedefs.items() if info else ()) if defs[-1].scope != "function"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    current = coverage.Coverage.current()
    if current is not None:
        current.switch_context(item.nodeid)
        config = copy.copy(current.config)
        config.context = item.nodeid
        os.environ["COVERAGE_PROCESS_CONFIG"] = config.serialize()
    shared = shared_fixtures(item)
    paid_before = sum(SHARED.get(name, 0.0) for name in shared)
    new = [name for name in shared if name not in SHARED]
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    for name in new:
        SHARED[name] = took
    DURATIONS[item.nodeid] = round(took + paid_before, 3)


def pytest_sessionfinish(session):
    path = os.environ.get("CODSPLAT_MUTATION_DURATIONS")
    if path:
        with open(path, "w") as out:
            json.dump(DURATIONS, out)
