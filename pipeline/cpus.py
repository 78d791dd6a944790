"""How many CPUs this process may really use, and the thread settings that follow from it.

`os.cpu_count()` is the machine's count. A container, a Bacalhau task or `taskset` gives a process
less: an affinity mask, or a cgroup CPU quota (a Docker `--cpus`, a Bacalhau `cpu` resource) that
lets it run that many cores' worth of time however many it sees. torch and numba both start one
thread per core they see; with more threads than the quota, or a neighbour busy on one of the
cores, every parallel loop waits for its slowest thread.

`configure()` runs once per process, before torch is first imported (`run_pipeline` calls it before
it loads a stage that trains). It sets both libraries' thread counts from `usable()`, and it makes the
threads that wait for work sleep: torch and numba's `omp` layer each load GNU OpenMP (torch its own
copy), whose waiting threads spin for a while before they sleep, on a core a neighbour may need.
OMP_WAIT_POLICY=PASSIVE, which each copy reads as it loads, makes them sleep at once. The compiled kernels then hand each loop's chunks
(`chunked()`) to whichever thread is free, so a thread that shares its core takes fewer chunks.
`benchmarks/run.py neighbour` weighs it (10k Gaussians at 128 px, 2-core VM): with one core busy
the kernels ran 1.57x their quiet time, where before (OpenMP spinning, one even split) they ran 2.07x
here and 8-11x on the machine issue 27 measured; quiet, 1.23x before's time. The sleeping threads do
most of that: with them, an even split did as well as chunks on this VM, whose neighbour takes half a
core evenly; chunks are for loops whose iterations differ in cost (tiles where the subject is, or
sky). numba's `workqueue` layer, which never spins either, ran 1.38x, but 1.21x slower quiet.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
CHUNKS_PER_THREAD = 4  # enough chunks that a slowed thread's share moves to the other threads; each costs a wake-up


def quota(root: Path = CGROUP) -> float | None:
    """The cgroup CPU quota in cores (v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`);
    None when there is none."""
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        limit = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return limit / period if limit > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable(root: Path = CGROUP) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up:
    1.5 cores' worth of time keeps two threads busy most of the time); at least 1."""
    try:
        seen = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        seen = os.cpu_count() or 1
    cap = quota(root)
    return max(1, min(seen, math.ceil(cap)) if cap else seen)


def configure(threads: int | None = None) -> int:
    """Set torch's and numba's thread counts to `threads` (default: `usable()`); returns it."""
    threads = threads or usable()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads the OpenMP runtime; a user's own is kept
    import torch

    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:
        return threads
    if numba.config.THREADING_LAYER == "default":  # a layer the user chose (NUMBA_THREADING_LAYER) is kept
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]  # torch's runtime; tbb only if asked
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


@contextmanager
def chunked(iterations: int):
    """Parallel loops over `iterations` launched in this block hand out chunks as threads free up
    (numba's `parallel_chunksize`), instead of one equal share per thread."""
    import numba

    old = numba.set_parallel_chunksize(max(1, iterations // (numba.get_num_threads() * CHUNKS_PER_THREAD)))
    try:
        yield
    finally:
        numba.set_parallel_chunksize(old)
