"""Benchmarks: speed and memory, measured and written to benchmarks/results/, never asserted in tests.

    python benchmarks/run.py pipeline   # the README's sample job at the tiny preset, end to end
    python benchmarks/run.py raster     # CPU rasterizer forward+backward per step: compiled vs torch
    python benchmarks/run.py neighbour  # the compiled kernels quiet and beside a process busy on one core
    python benchmarks/run.py sfm        # 10 whole tiny runs each of the sample and a photo set: the same model?
    python benchmarks/run.py pipeline --neighbour  # the sample end to end, quiet and beside a busy process
    python benchmarks/run.py killloop   # 24 tiny jobs through the embedded daemon, SIGKILLed 8 times meanwhile
    python benchmarks/run.py submit     # job → Bacalhau spec → submitted, against the stand-in
    python benchmarks/run.py load       # 1,000 jobs through S3 → SQS → the daemon → the stand-in
    python benchmarks/run.py tradeoff   # held-out PSNR against training steps and resolution, on the sample
    python benchmarks/run.py mesh       # export.mesh on the sample and a photo set, at three resolutions
    python benchmarks/run.py            # both

Each result file records the machine (cores, torch threads) and the figures; ratios are taken
within one run because shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    print(json.dumps(data, indent=2))
    print(f"wrote {path}")


def bench_pipeline(runs: int, neighbour: bool = False) -> None:
    """Whole sample run (ingest → SfM → training → export → metrics) at the tiny preset; with
    `neighbour`, each run also beside a process busy on one core (result file pipeline_cpu_tiny_shared)."""
    import tempfile

    records = []
    for i in range(runs):
        for busy in (False, True) if neighbour else (False,):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                proc = beside_a_neighbour([sys.executable, "-m", "codsplat.pipeline.cli", "run", str(ROOT / "examples" / "sample.mp4"),
                                           "--preset", "tiny", "--out", tmp, "--json"], busy)
                wall = time.perf_counter() - started
                if proc.returncode:
                    raise SystemExit(proc.stderr)
                metrics = json.loads((Path(tmp) / "export" / "metrics.json").read_text())
                records.append({
                    "neighbour": busy, "wall_s": round(wall, 1), "psnr": metrics["psnr"], "ssim": metrics["ssim"],
                    "gaussians": metrics["gaussians"], "registered": metrics["sfm"]["registered_images"],
                    "stages": metrics["stages"],
                    "peak_rss_mb": max(s.get("peak_rss_mb") or 0 for s in metrics["stages"].values()),
                })
                print(f"run {i + 1}{' beside a busy neighbour' if busy else ''}: {records[-1]['wall_s']} s, "
                      f"{records[-1]['psnr']} dB", flush=True)
    quiet = [r["wall_s"] for r in records if not r["neighbour"]]
    shared = [r["wall_s"] for r in records if r["neighbour"]]
    save("pipeline_cpu_tiny_shared" if neighbour else "pipeline_cpu_tiny", {
        "goal": {"wall_s_below": 60, "psnr_at_least": 26},
        "wall_s_max": max(quiet), "wall_s_min": min(quiet),
        **({"shared_wall_s_max": max(shared), "shared_over_quiet": round(max(shared) / max(quiet), 2)} if shared else {}),
        "psnr_min": min(r["psnr"] for r in records), "runs": records,
    })


def bench_tradeoff(steps_list: list[int], sides: list[int]) -> None:
    """How held-out quality grows with training steps and resolution on the sample, on this CPU:
    frames and SfM run once (the tiny preset's), then each (steps, train.max_side) trains from them
    and exports. End to end = the shared frames + SfM time + that row's train and export."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        proc = subprocess.run([sys.executable, "-m", "codsplat.pipeline.cli", "run", str(ROOT / "examples" / "sample.mp4"),
                               "--preset", "tiny", "--out", str(base), "--stage", "preprocess", "--json"],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        shared = {s: json.loads((base / s / "manifest.json").read_text())["seconds"] for s in ("frames", "sfm")}
        rows = []
        for side in sides:
            for steps in steps_list:
                work = Path(tmp) / f"s{side}-{steps}"
                shutil.copytree(base, work)
                config = Path(tmp) / f"c{side}-{steps}.json"
                refine_stop = int(steps * 0.8)
                config.write_text(json.dumps({"train": {"steps": steps, "max_side": side, "refine_stop": refine_stop,
                                                        "sh_degree_interval": max(100, steps // 3)}}))
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "codsplat.pipeline.cli", "run", str(ROOT / "examples" / "sample.mp4"),
                                       "--preset", "tiny", "--config", str(config), "--out", str(work), "--json"],
                                      capture_output=True, text=True)
                wall = time.perf_counter() - started
                if proc.returncode not in (0, 4):
                    raise SystemExit(proc.stderr)
                train = json.loads((work / "train" / "manifest.json").read_text())
                metrics = train.get("stats", {})
                row = {"max_side": side, "steps": steps, "psnr": metrics.get("psnr"), "ssim": metrics.get("ssim"),
                       "gaussians": metrics.get("gaussians"), "train_s": round(train["seconds"], 1),
                       "end_to_end_s": round(sum(shared.values()) + wall, 1)}
                rows.append(row)
                print(row, flush=True)
    save("tiny_tradeoff", {"frames_and_sfm_s": {k: round(v, 1) for k, v in shared.items()}, "rows": rows})


def bench_raster(repeats: int) -> None:
    """Forward+backward per step on the CPU: the compiled kernels against the torch reference in the
    same run (10k Gaussians at 128×128, 100k at 256×256; tiles of 8 and 16), their first-load time
    (numba compiling, or reading its cache), and the torch reference against the dense per-pixel
    oracle at a size the oracle can hold in memory."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from raster_reference import dense_render
    from test_raster import cameras, random_scene

    from codsplat.pipeline import raster

    started = time.perf_counter()
    compiled = raster.cpu_kernels()
    out: dict = {"compiled_kernels": compiled.name, "first_load_s": round(time.perf_counter() - started, 2),
                 "goal": {"speedup_at_least": 5, "compiled_10k_128px_ms_at_most": 50}}

    def timed(fn, params, reps):
        times = []
        for _ in range(reps + 1):
            ps = [p.detach().clone().requires_grad_(True) for p in params]
            t = time.perf_counter()
            img, alpha = fn(ps)[:2]
            (img.sum() + alpha.sum()).backward()
            times.append(time.perf_counter() - t)
        return 1000 * sorted(times[1:])[len(times[1:]) // 2]  # median ms; the first call is a warm-up

    for n, size, shrink in ((10_000, 128, 0.3), (100_000, 256, 0.1)):
        scene = random_scene(n=n, seed=1, sh_coeffs=4)
        scene[2] = scene[2] * shrink  # small Gaussians, as after densification
        view, K = cameras(size, size, count=1)
        for tile in (8, 16):
            row = {}
            for kernels in (compiled, raster.TORCH):
                render = lambda p, k=kernels: raster.rasterize_cpu(*p, view, K, size, size, sh_degree=1, tile_size=tile, kernels=k)  # noqa: E731
                row[f"{kernels.name}_ms"] = round(timed(render, scene, repeats if kernels is compiled else max(1, repeats // 3)), 1)
            row["speedup"] = round(row["torch_ms"] / row["compiled_ms"], 1)
            out[f"{n // 1000}k_{size}px_tile{tile}"] = row
            print(f"{n} Gaussians {size}px tile {tile}: {row}", flush=True)

    small = random_scene(n=2_000, seed=2, sh_coeffs=4)
    view, K = cameras(64, 64, count=1)
    ours = timed(lambda p: raster.rasterize_cpu(*p, view, K, 64, 64, sh_degree=1, kernels=raster.TORCH), small, repeats)
    dense = timed(lambda p: dense_render(*p, view, K, 64, 64, sh_degree=1, tile_size=8), small, 1)
    out["torch_reference_2k_64px_ms"] = round(ours, 1)
    out["dense_oracle_2k_64px_ms"] = round(dense, 1)
    out["torch_reference_speedup_vs_dense_oracle"] = round(dense / ours, 1)
    out["torch_threads"] = torch.get_num_threads()
    save("raster_cpu", out)


NEIGHBOUR = [sys.executable, "-c", "while True: pass"]  # a process busy on one core, as another job or test is

KERNELS_TIMED = """
import json, sys, time
sys.path.insert(0, {tests!r})
from codsplat.pipeline import cpus
setup = {setup!r}
if setup == "before":  # as before issue 27: numba's OpenMP layer spinning as it does by default, each loop split once, evenly
    import contextlib, numba
    from codsplat.pipeline import raster_cpu
    numba.config.THREADING_LAYER = "omp"
    raster_cpu.chunked = lambda iterations: contextlib.nullcontext()
else:  # as the pipeline does it, before torch loads; "workqueue": the layer that never spins, the other candidate
    import numba
    if setup == "workqueue":
        numba.config.THREADING_LAYER = "workqueue"
    cpus.configure()
from codsplat.pipeline import raster
from test_raster import cameras, random_scene
kernels = raster.cpu_kernels() if {compiled!r} else raster.TORCH
scene = random_scene(n=10_000, seed=1, sh_coeffs=4)
scene[2] = scene[2] * 0.3
view, K = cameras(128, 128, count=1)
times = []
for _ in range({repeats} + 1):
    ps = [p.detach().clone().requires_grad_(True) for p in scene]
    t = time.perf_counter()
    img, alpha = raster.rasterize_cpu(*ps, view, K, 128, 128, sh_degree=1, tile_size=16, kernels=kernels)[:2]
    (img.sum() + alpha.sum()).backward()
    times.append(time.perf_counter() - t)
times = sorted(times[1:])
import numba, torch
print(json.dumps({{"ms": round(1000 * times[len(times) // 2], 1), "layer": numba.threading_layer() if {compiled!r} else None,
                  "threads": torch.get_num_threads()}}))
"""


def beside_a_neighbour(command: list[str], busy: bool, **kwargs) -> subprocess.CompletedProcess:
    """Run `command`, alone or while NEIGHBOUR spins on a core."""
    neighbour = subprocess.Popen(NEIGHBOUR) if busy else None
    try:
        time.sleep(0.3 if busy else 0)
        return subprocess.run(command, capture_output=True, text=True, **kwargs)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def bench_neighbour(repeats: int, rounds: int) -> None:
    """The compiled kernels (10k Gaussians, 128 px, tile 16, forward + backward) quiet and beside a
    process busy on one core: as configured now (threads from the usable CPUs, OpenMP's waiting
    threads asleep, chunks handed out as threads free up), as before (OpenMP spinning, one even split)
    and on numba's workqueue layer (never spins, chunks as now), each in its own process, interleaved
    over `rounds`; and the torch reference, quiet."""
    def timed(setup: str, busy: bool, compiled: bool = True) -> dict:
        code = KERNELS_TIMED.format(tests=str(ROOT / "tests"), setup=setup, compiled=compiled, repeats=repeats)
        proc = beside_a_neighbour([sys.executable, "-c", code], busy)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        return json.loads(proc.stdout.splitlines()[-1])

    rows: dict[str, list[float]] = {}
    for _ in range(rounds):
        for setup in ("now", "before", "workqueue"):
            for busy in (False, True):
                row = timed(setup, busy)
                rows.setdefault(f"{setup}_{'busy' if busy else 'quiet'}_ms", []).append(row["ms"])
                print(setup, "busy" if busy else "quiet", row, flush=True)
    torch_ms = timed("now", False, compiled=False)["ms"]
    median = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    save("raster_neighbour", {
        "goal": {"busy_over_quiet_at_most": 2.5, "speedup_over_torch_quiet_at_least": 5},
        "scene": "10k Gaussians, 128x128, tile 16, sh_degree 1, forward + backward; median of each run, median of runs",
        "neighbour": " ".join(NEIGHBOUR), "runs": rows, "median_ms": median, "torch_reference_quiet_ms": torch_ms,
        "now_busy_over_quiet": round(median["now_busy_ms"] / median["now_quiet_ms"], 2),
        "before_busy_over_quiet": round(median["before_busy_ms"] / median["before_quiet_ms"], 2),
        "workqueue_busy_over_quiet": round(median["workqueue_busy_ms"] / median["workqueue_quiet_ms"], 2),
        "now_quiet_over_before_quiet": round(median["now_quiet_ms"] / median["before_quiet_ms"], 2),
        "workqueue_quiet_over_now_quiet": round(median["workqueue_quiet_ms"] / median["now_quiet_ms"], 2),
        "now_speedup_over_torch_quiet": round(torch_ms / median["now_quiet_ms"], 1),
    })


def bench_sfm(runs: int) -> None:
    """The same capture, `runs` times each: the sample video and a photo set made as the tests make it
    (24 stills, some stored on their side with an EXIF orientation), whole tiny runs. The registered
    count, the mapping tries, the held-out PSNR and the exit code of every run."""
    import statistics
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import photo_set

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {"sample": ROOT / "examples" / "sample.mp4", "photos": photo_set(ROOT / "examples" / "sample.mp4", Path(tmp) / "photos")}
        for name, source in inputs.items():
            rows = []
            for i in range(runs):
                work = Path(tmp) / f"{name}-{i}"
                proc = subprocess.run([sys.executable, "-m", "codsplat.pipeline.cli", "run", str(source), "--preset", "tiny",
                                       "--out", str(work), "--json"], capture_output=True, text=True)
                sfm_file, eval_file = work / "sfm" / "sfm.json", work / "train" / "eval.json"
                sfm = json.loads(sfm_file.read_text()) if sfm_file.is_file() else {}
                rows.append({"exit": proc.returncode, "registered": sfm.get("registered_images"),
                             "points3d": sfm.get("points3d"), "stray": len(sfm.get("stray_cameras_dropped", [])),
                             "tries": [(t["mapper"], t["registered_images"]) for t in sfm.get("tries", [])],
                             "psnr": json.loads(eval_file.read_text())["psnr"] if eval_file.is_file() else None})
                print(name, i + 1, rows[-1], flush=True)
            registered = [r["registered"] or 0 for r in rows]
            psnrs = [r["psnr"] for r in rows if r["psnr"] is not None]
            out[name] = {"runs": rows, "exit_codes": sorted({r["exit"] for r in rows}),
                         "registered": {"min": min(registered), "median": statistics.median(registered), "max": max(registered)},
                         "points3d_distinct": sorted({r["points3d"] for r in rows if r["points3d"]}),
                         "psnr": {"min": min(psnrs, default=None), "median": statistics.median(psnrs) if psnrs else None}}
    save("sfm_repeat", {"goal": "the same registered count on every run; no exit 4 from a weak model", **out})


def bench_mesh(resolutions: list[int]) -> None:
    """export.mesh on the sample and on the photo set the tests make: one tiny run each, then the export
    stage again with the mesh at each resolution (`--mesh`; only export runs). Faces, seconds, and the
    agreement with the SfM points within 1% of the scene's extent, both ways."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import photo_set

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {"sample": ROOT / "examples" / "sample.mp4", "photos": photo_set(ROOT / "examples" / "sample.mp4", Path(tmp) / "photos")}
        for name, source in inputs.items():
            work = Path(tmp) / name
            base = [sys.executable, "-m", "codsplat.pipeline.cli", "run", str(source), "--preset", "tiny", "--out", str(work), "--json"]
            subprocess.run(base, capture_output=True, text=True, check=True)
            rows = []
            for resolution in resolutions:
                cfg = Path(tmp) / f"mesh-{resolution}.json"
                cfg.write_text(json.dumps({"export": {"mesh_resolution": resolution}}))
                proc = subprocess.run(base + ["--config", str(cfg), "--mesh"], capture_output=True, text=True)
                metrics = json.loads((work / "export" / "metrics.json").read_text()) if proc.returncode == 0 else {}
                rows.append({"resolution": resolution, "exit": proc.returncode, **metrics.get("mesh", {})})
                print(name, rows[-1], flush=True)
            out[name] = rows
    save("mesh", {"what": "export.mesh after a tiny run: faces, seconds, SfM points on the mesh and mesh near SfM points "
                          "(within 1% of the scene's extent)", **out})


def bench_kill_loop(jobs: int, cycles: int, seed: int = 0) -> None:
    """The embedded daemon killed with SIGKILL `cycles` times, at random moments, while `jobs` real tiny
    jobs (16 frames, 100 steps) go through it; then a last daemon finishes them. Per job: its end, the
    messages sent, each stage's completed computations, the runs started, and whether two of its runs
    ever computed at once (two stage computations of one job whose times overlap)."""
    import random
    import shutil
    import signal
    import statistics
    import tempfile
    from datetime import datetime

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import QUICK

    from codsplat.orchestrator.records import TERMINAL, SQLiteStore

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "uploads").mkdir()
        (home / "jobs").mkdir()
        shutil.copy(ROOT / "examples" / "sample.mp4", home / "uploads" / "sample.mp4")
        ids = [f"k{i:02d}" for i in range(jobs)]
        for job_id in ids:
            (home / "jobs" / f"{job_id}.json").write_text(json.dumps(
                {"version": 1, "input": "uploads/sample.mp4", "preset": "tiny", "notify": {"email": ["u@example.com"]}, **QUICK}))

        def daemon() -> subprocess.Popen:
            log = open(home / f"daemon-{time.monotonic_ns()}.log", "w")
            return subprocess.Popen([sys.executable, "-m", "codsplat.orchestrator.cli", "daemon", "--embedded", str(home),
                                     "--health-port", "0"], env={**os.environ, "CODSPLAT_MEDIA_WAIT_SECONDS": "1"},
                                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

        started = time.monotonic()
        kills = []
        for _ in range(cycles):  # each daemon dies at a random moment; its runs go on as orphans until the next starts
            proc = daemon()
            wait = rng.uniform(3, 12)
            time.sleep(wait)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(round(wait, 1))
        store = SQLiteStore(home / "codsplat.db")
        last = daemon()
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            records = [store.get(i) for i in ids]
            if all(r and r.state in TERMINAL and r.notified_at for r in records):
                break
            time.sleep(1)
        time.sleep(3)  # a repeated message or run would have time to show
        os.killpg(last.pid, signal.SIGTERM)
        last.wait(timeout=120)
        sent_log = home / "notifications" / "sent.jsonl"
        sent = [json.loads(line)["attributes"]["job_id"] for line in sent_log.read_text().splitlines()] if sent_log.exists() else []
        rows = {}
        for job_id in ids:
            record = store.get(job_id)
            log = home / "results" / job_id / "runs.jsonl"
            computed = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            spans = sorted((datetime.fromisoformat(c["finished_at"]).timestamp() - c["seconds"],
                            datetime.fromisoformat(c["finished_at"]).timestamp()) for c in computed)
            overlaps = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 1)  # finished_at is to the second
            rows[job_id] = {"state": record.state if record else None, "messages": sent.count(job_id),
                            "runs_started": len(record.attempts) if record else 0,
                            "computed": {s: [c["stage"] for c in computed].count(s) for s in ("frames", "sfm", "train", "export")},
                            "overlapping_runs": overlaps}
        runs = [r["runs_started"] for r in rows.values()]
        save("kill_loop", {
            "goal": "every job ends and is told once; no stage computed twice; never two runs of one job at once",
            "jobs": jobs, "cycles": cycles, "killed_after_s": kills, "seconds": round(time.monotonic() - started, 1),
            "states": {s: [r["state"] for r in rows.values()].count(s) for s in {r["state"] for r in rows.values()}},
            "messages_per_job": sorted({r["messages"] for r in rows.values()}),
            "stage_computations_per_job_max": max(max(r["computed"].values()) for r in rows.values()),
            "stage_computations_per_job_min": min(min(r["computed"].values()) for r in rows.values()),
            "runs_started_per_job": {"min": min(runs), "median": statistics.median(runs), "max": max(runs)},
            "jobs_with_overlapping_runs": sum(1 for r in rows.values() if r["overlapping_runs"]),
            "per_job": rows,
        })


def bench_submit(jobs: int) -> None:
    """Translation + submission overhead per job against the Bacalhau stand-in on loopback.

    The stand-in holds jobs in its queue (knob `hold`) so that only the orchestration path is timed:
    job document → Bacalhau spec → HTTP PUT → JobID.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import start_standin

    from codsplat.orchestrator.bacalhau import BacalhauClient
    from codsplat.orchestrator.job import parse_job
    from codsplat.orchestrator.settings import Settings
    from codsplat.orchestrator.translate import translate

    server = start_standin("http://127.0.0.1:9")
    try:
        server.knobs(hold=True)
        settings = Settings()
        out = {}
        with BacalhauClient(server.url) as client:
            client.version()
            for split in (False, True):
                translate_ms, total_ms = [], []
                for i in range(jobs):
                    t0 = time.perf_counter()
                    job = parse_job({"version": 1, "id": f"bench-{int(split)}-{i}", "input": "s3://codsplat-data/uploads/b/x.mp4",
                                     "preset": "fast", "compute": {"split_stages": split}})
                    spec = translate(job, settings, "preprocess" if split else "all", 1)
                    t1 = time.perf_counter()
                    client.submit(spec)
                    t2 = time.perf_counter()
                    translate_ms.append((t1 - t0) * 1000)
                    total_ms.append((t2 - t0) * 1000)
                pct = lambda xs, q: round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 2)  # noqa: E731
                out["split_first_stage" if split else "single_stage"] = {
                    "jobs": jobs, "translate_p50_ms": pct(translate_ms, 0.5), "translate_p99_ms": pct(translate_ms, 0.99),
                    "total_p50_ms": pct(total_ms, 0.5), "total_p99_ms": pct(total_ms, 0.99),
                }
        save("bacalhau_submit", {"goal": {"single_stage_total_p99_ms_below": 50}, **out})
    finally:
        server.stop()


def bench_load(jobs: int, concurrency: int, intake_workers: int = 8, poll: float = 0.5, backlog: bool = False) -> None:
    """`jobs` job documents uploaded at once → S3 event → SNS → SQS → `codsplat daemon` → the Bacalhau
    stand-in running fast jobs (benchmarks/fast_image) → results in S3 → one SNS message per job.

    moto serves S3, SNS, SQS and DynamoDB on loopback; the daemon is its own process (RSS sampled
    every 0.5 s). Figures: intake jobs/s (first S3 event → last record created), S3 event → Bacalhau
    submit (the stand-in's CreateTime) p50/p99, end-to-end jobs/s, peak executions on the node against
    the concurrency bound, submissions and messages per job, RSS after the first tenth vs at the end,
    the requests the daemon sent per job (its /health counts), and what this rig's moto serves at
    most (S3 HEADs from 8 threads, measured first): requests per job against that ceiling bound
    any jobs/s figure here. The daemon's CPU at intake is its own count (`/health` cpu_seconds);
    moto's CPU while the jobs came in says whether the rig was the bound.

    `backlog`: the daemon starts only once every upload's message waits in the queue, so moto serves
    the daemon alone (in a burst it also serves the uploads and their S3 → SNS → SQS events); intake
    is then the drain rate, first record to last (results/daemon_backlog.json).
    """
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime

    import boto3
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from servers import free_port, start_moto, start_standin

    from codsplat.orchestrator.bacalhau import BacalhauClient
    from codsplat.orchestrator.provision import provision
    from codsplat.orchestrator.records import TERMINAL, DynamoStore

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    moto = start_moto()
    standin = start_standin(moto.url)
    daemon = None
    try:
        client = lambda name: boto3.client(name, endpoint_url=moto.url, region_name="us-east-1")  # noqa: E731
        names = provision(boto3.Session(), "load", endpoint=moto.url, visibility_timeout=60)
        s3, sqs, sns = client("s3"), client("sqs"), client("sns")
        mailbox = sqs.create_queue(QueueName="load-mailbox")["QueueUrl"]
        mailbox_arn = sqs.get_queue_attributes(QueueUrl=mailbox, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=names["topic_arn"], Protocol="sqs", Endpoint=mailbox_arn)
        image = "codsplat-fast:bench"
        # one node that holds the fast image and room for `concurrency` tasks of the default resources
        standin.knobs(nodes=[{"id": "n-load", "cpu": 4 * concurrency, "memory_gib": 16 * concurrency,
                              "disk_gb": 100 * concurrency, "images": {image: str(ROOT / "benchmarks" / "fast_image")},
                              "gpus": [{"name": "NVIDIA A10G", "memory_mib": 23028}] * concurrency}])
        s3.put_object(Bucket=names["bucket"], Key="uploads/load/clip.mp4", Body=b"\0" * 1024)
        moto_per_s = 0.0  # the rig's ceiling: moto's requests/s with nothing else running, the best of three rounds
        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                probe = time.monotonic()
                list(pool.map(lambda _: s3.head_object(Bucket=names["bucket"], Key="uploads/load/clip.mp4"), range(400)))
                moto_per_s = max(moto_per_s, 400 / (time.monotonic() - probe))
        health = free_port()
        env = {**os.environ, "CODSPLAT_BUCKET": names["bucket"], "CODSPLAT_QUEUE_URL": names["queue_url"],
               "CODSPLAT_TABLE": names["table"], "CODSPLAT_TOPIC_ARN": names["topic_arn"],
               "CODSPLAT_AWS_ENDPOINT": moto.url, "CODSPLAT_S3_ENDPOINT": moto.url, "CODSPLAT_IMAGE": image,
               "CODSPLAT_CONCURRENCY": str(concurrency), "CODSPLAT_INTAKE_WORKERS": str(intake_workers),
               "CODSPLAT_QUEUE_WAIT_SECONDS": "1",
               "CODSPLAT_BACALHAU_POLL_SECONDS": str(poll), "CODSPLAT_HEALTH_PORT": str(health),
               "BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": standin.url.rsplit(":", 1)[1]}
        (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
        log = open(ROOT / "benchmarks" / "out" / f"daemon_{'backlog' if backlog else 'load'}.log", "w")
        rss: list[tuple[float, int]] = []
        cpu: list[tuple[float, float]] = []  # (epoch, the daemon's user + system CPU seconds so far)
        moto_cpu: list[tuple[float, float]] = []  # the same for moto: how busy the rig is
        sampling = threading.Event()
        tick = os.sysconf("SC_CLK_TCK")

        def cpu_seconds(pid: int) -> float:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

        def sample() -> None:
            while not sampling.is_set():
                try:
                    kb = next(int(line.split()[1]) for line in open(f"/proc/{daemon.pid}/status") if line.startswith("VmRSS"))
                    rss.append((time.monotonic(), kb))
                    cpu.append((time.time(), cpu_seconds(daemon.pid)))
                    moto_cpu.append((time.time(), cpu_seconds(moto.pid)))
                except (FileNotFoundError, StopIteration):
                    pass
                sampling.wait(0.25)

        def start_daemon() -> subprocess.Popen:
            process = subprocess.Popen([sys.executable, "-m", "codsplat.orchestrator.cli", "daemon"], env=env,
                                       stdout=log, stderr=log)
            while True:  # serving: its start-up (imports, settings) is not intake
                try:
                    httpx.get(f"http://127.0.0.1:{health}/health")
                    return process
                except httpx.TransportError:
                    time.sleep(0.05)

        job = {"version": 1, "input": "uploads/load/clip.mp4", "preset": "tiny", "notify": {"email": ["load@example.com"]}}

        def upload() -> None:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: s3.put_object(Bucket=names["bucket"], Key=f"jobs/load/job-{i:04d}.json",
                                                       Body=json.dumps({**job, "id": f"job-{i:04d}"})), range(jobs)))

        def queued() -> int:
            attributes = sqs.get_queue_attributes(QueueUrl=names["queue_url"], AttributeNames=["ApproximateNumberOfMessages"])
            return int(attributes["Attributes"]["ApproximateNumberOfMessages"])

        if not backlog:
            daemon = start_daemon()
            threading.Thread(target=sample, daemon=True).start()
            time.sleep(3)  # the daemon has started and is long-polling
        started = time.monotonic()
        upload()
        uploaded = time.monotonic() - started
        if backlog:
            while queued() < jobs:
                time.sleep(0.5)
            daemon = start_daemon()
            threading.Thread(target=sample, daemon=True).start()
        while not cpu:
            time.sleep(0.05)
        cpu_at_start = cpu[-1][1]
        store = DynamoStore(names["table"], client("dynamodb"))
        while time.monotonic() - started < 1800:  # every job ends with its message (cheaper to count than records)
            count = sqs.get_queue_attributes(QueueUrl=mailbox, AttributeNames=["ApproximateNumberOfMessages"])
            if int(count["Attributes"]["ApproximateNumberOfMessages"]) >= jobs:
                break
            time.sleep(1)
        records = store.list(limit=10 * jobs)
        assert all(r.state in TERMINAL and r.notified_at for r in records), "a job has not finished"
        finished = time.monotonic() - started
        tenth = next((kb for t, kb in rss if t - started > finished / 10), rss[0][1])
        end_rss = rss[-1][1]
        cpu_at_end = cpu[-1][1]
        health_now = httpx.get(f"http://127.0.0.1:{health}/health").json()
        calls, operations = health_now["calls"], health_now["operations"]
        intake_cpu_own = health_now["cpu_seconds"]["intake"]  # the daemon's own count: its receive and intake threads
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        sampling.set()

        messages: dict[str, int] = {}
        while True:
            got = sqs.receive_message(QueueUrl=mailbox, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                      MessageAttributeNames=["All"]).get("Messages", [])
            if not got:
                break
            for m in got:
                job_id = json.loads(m["Body"])["MessageAttributes"]["job_id"]["Value"]
                messages[job_id] = messages.get(job_id, 0) + 1
                sqs.delete_message(QueueUrl=mailbox, ReceiptHandle=m["ReceiptHandle"])
        with BacalhauClient(standin.url) as bacalhau:
            submitted = bacalhau.list_jobs(limit=1000)
        knobs = standin.knobs()

        at = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()  # noqa: E731
        by_job = {r.job_id: r for r in records}
        submits: dict[str, list[float]] = {}
        for b in submitted:
            submits.setdefault(b.labels.get("codsplat-job", ""), []).append(b.create_time / 1e9)
        latency_ms = sorted((min(submits[j]) - at(r.event_at)) * 1000 for j, r in by_job.items() if j in submits and r.event_at)
        recorded_ms = sorted((at(r.created_at) - at(r.event_at)) * 1000 for r in records if r.event_at)
        events = [at(r.event_at) for r in records if r.event_at]
        created = [at(r.created_at) for r in records]
        pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None  # noqa: E731
        cpu_when = lambda epoch, samples=cpu: next((c for t, c in samples if t >= epoch), samples[-1][1])  # noqa: E731
        intake_cpu = cpu_when(max(created)) - cpu_at_start  # the daemon's CPU while the jobs came in
        intake_from = min(created) if backlog else min(events)
        intake_rate = len(created) / (max(created) - intake_from)
        moto_busy = (cpu_when(max(created), moto_cpu) - cpu_when(intake_from, moto_cpu)) / (max(created) - intake_from)
        aws_per_job = sum(v for k, v in calls.items() if k != "bacalhau") / jobs
        states: dict[str, int] = {}
        for r in records:
            states[r.state] = states.get(r.state, 0) + 1
        save("daemon_backlog" if backlog else "daemon_load", {
            "mode": "backlog: the daemon started once every message waited in the queue" if backlog
            else "burst: the daemon ran while the uploads came in",
            "goal": {"aws_requests_per_job_at_most": 8, "bacalhau_requests_per_job_at_most": 3,
                     "daemon_cpu_ms_per_job_at_intake_at_most": 5, "intake_share_of_ceiling_at_least": 0.8},
            "jobs": jobs, "concurrency": concurrency, "intake_workers": intake_workers, "bacalhau_poll_seconds": poll,
            "upload_seconds": round(uploaded, 2),
            "intake_jobs_per_s": round(intake_rate, 1),
            # what moto's ceiling allows at the requests a job costs, and how much of it intake reached
            "intake_ceiling_jobs_per_s": round(moto_per_s / aws_per_job, 1),
            "intake_share_of_ceiling": round(intake_rate / (moto_per_s / aws_per_job), 2),
            # moto's CPU while the jobs came in (1.0: one core, all a Python server can use): the rig's bound
            "rig_moto_busy_during_intake": round(moto_busy, 2),
            # intake: the CPU of receiving, reading, recording and acknowledging, as the daemon counts it
            # per thread; until_the_last_record: the whole process while jobs came in, which includes
            # the submissions, polls and messages of the jobs that were taken in first
            "daemon_cpu_ms_per_job": {"intake": round(1000 * intake_cpu_own / jobs, 2),
                                      "until_the_last_record": round(1000 * intake_cpu / jobs, 2),
                                      "whole_life": round(1000 * (cpu_at_end - cpu_at_start) / jobs, 2)},
            "end_to_end_jobs_per_s": round(jobs / finished, 1),
            "all_terminal_seconds": round(finished, 1),
            "states": states,
            "event_to_record_ms": {"p50": pct(recorded_ms, 0.5), "p99": pct(recorded_ms, 0.99)},
            "event_to_submit_ms": {"p50": pct(latency_ms, 0.5), "p90": pct(latency_ms, 0.9),
                                   "p99": pct(latency_ms, 0.99), "max": pct(latency_ms, 1.0)},
            "peak_executions_on_node": knobs["peak_running"],
            "bound_held": knobs["peak_running"] <= concurrency,
            "jobs_submitted_more_than_once": sum(1 for v in submits.values() if len(v) > 1),
            "jobs_without_exactly_one_message": sum(1 for j in by_job if messages.get(j) != 1),
            "requests_per_job": {k: round(v / jobs, 2) for k, v in sorted(calls.items())},
            "requests_per_job_by_operation": {k: round(v / jobs, 3) for k, v in sorted(operations.items())},
            "aws_requests_per_job": round(aws_per_job, 1),
            "rig_moto_requests_per_s": round(moto_per_s),
            "daemon_rss_mb": {"after_first_tenth": round(tenth / 1024, 1), "end": round(end_rss / 1024, 1),
                              "max": round(max(kb for _, kb in rss) / 1024, 1)},
        })
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        standin.stop()
        moto.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", choices=("pipeline", "raster", "neighbour", "sfm", "killloop", "submit", "load", "tradeoff",
                                                 "mesh", "all"),
                    default="all")
    ap.add_argument("--jobs", type=int, default=None, help="jobs (submit: 500, load: 1000, killloop: 24)")
    ap.add_argument("--concurrency", type=int, default=64, help="the daemon's bound in the load benchmark")
    ap.add_argument("--intake-workers", type=int, default=8, help="the daemon's intake threads in the load benchmark")
    ap.add_argument("--backlog", action="store_true", help="load: start the daemon once every job waits in the queue")
    ap.add_argument("--runs", type=int, default=1, help="pipeline runs")
    ap.add_argument("--repeats", type=int, default=5, help="rasterizer repeats")
    ap.add_argument("--cycles", type=int, default=8, help="killloop: daemons killed with SIGKILL before the last one")
    ap.add_argument("--rounds", type=int, default=3, help="neighbour: interleaved rounds of each setup")
    ap.add_argument("--neighbour", action="store_true", help="pipeline: each run also beside a process busy on one core")
    args = ap.parse_args()
    if args.which in ("raster", "all"):
        bench_raster(args.repeats)
    if args.which in ("neighbour", "all"):
        bench_neighbour(max(args.repeats, 10), args.rounds)
    if args.which in ("sfm", "all"):
        bench_sfm(max(args.runs, 10))
    if args.which in ("killloop", "all"):
        bench_kill_loop(args.jobs or 24, args.cycles)
    if args.which in ("submit", "all"):
        bench_submit(args.jobs or 500)
    if args.which in ("load", "all"):
        bench_load(args.jobs or 1000, args.concurrency, args.intake_workers, backlog=args.backlog)
    if args.which in ("pipeline", "all"):
        bench_pipeline(args.runs, args.neighbour)
    if args.which in ("tradeoff", "all"):
        bench_tradeoff([300, 600, 1200, 2400], [80, 120, 160])
    if args.which in ("mesh", "all"):
        bench_mesh([96, 160, 256])


if __name__ == "__main__":
    main()
