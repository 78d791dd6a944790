"""The CPUs a process may use (affinity mask, cgroup quota), and the thread settings of torch and numba
that follow from them."""

import json
import os
import subprocess
import sys

from codsplat.pipeline.cpus import quota, usable


def test_the_cgroup_quota_is_read_in_cores_from_either_cgroup_version(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota(v1) == 0.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert quota(v1) is None
    assert quota(tmp_path / "none") is None


def test_a_quota_caps_the_cpus_a_process_sees_rounded_up_and_never_below_one(tmp_path):
    import os

    seen = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{seen * 100000 + 1} 100000\n")  # a quota above the mask changes nothing
    assert usable(tmp_path) == seen
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable(tmp_path) == seen


def test_a_pipeline_pinned_to_one_cpu_runs_torch_and_the_kernels_on_one_thread_that_sleeps_when_idle():
    """Under `taskset -c 0`, torch and numba both take one thread, and the compiled kernels run on
    the OpenMP runtime torch loaded, told before it loaded that waiting threads sleep (spinning, they
    took the core a busy neighbour needed: 2.9-11x slower than quiet, benchmarks/run.py neighbour)."""
    script = """
import json
from codsplat.pipeline import cpus
threads = cpus.configure()
import numba, torch
from codsplat.pipeline import raster
kernels = raster.cpu_kernels()
print(json.dumps({"threads": threads, "torch": torch.get_num_threads(), "numba": numba.get_num_threads(),
                  "layer": numba.threading_layer(), "kernels": kernels.name}))
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"threads": 1, "torch": 1, "numba": 1, "layer": "omp",
                                                        "kernels": "compiled"}
    # what the runtime printed of its settings as it loaded: no spinning (its default spins 300,000 times)
    # (each copy of the runtime prints: torch's own and the one numba's layer loads)
    assert proc.stderr.count("GOMP_SPINCOUNT = '0'") == 2 and "GOMP_SPINCOUNT = '3" not in proc.stderr, proc.stderr
