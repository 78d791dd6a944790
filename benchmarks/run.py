"""Benchmarks: speed and memory, measured and written to benchmarks/results/, never asserted in tests.

    python benchmarks/run.py pipeline   # the README's sample job at the tiny preset, end to end
    python benchmarks/run.py raster     # CPU rasterizer forward+backward per step
    python benchmarks/run.py submit     # job → Bacalhau spec → submitted, against the stand-in
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


def bench_pipeline(runs: int) -> None:
    """Whole sample run (ingest → SfM → training → export → metrics) at the tiny preset."""
    import tempfile

    records = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "codsplat.pipeline.cli", "run", str(ROOT / "examples" / "sample.mp4"),
                 "--preset", "tiny", "--out", tmp, "--json"], capture_output=True, text=True)
            wall = time.perf_counter() - started
            if proc.returncode:
                raise SystemExit(proc.stderr)
            metrics = json.loads((Path(tmp) / "export" / "metrics.json").read_text())
            records.append({
                "wall_s": round(wall, 1), "psnr": metrics["psnr"], "ssim": metrics["ssim"],
                "gaussians": metrics["gaussians"], "registered": metrics["sfm"]["registered_images"],
                "stages": metrics["stages"],
                "peak_rss_mb": max(s.get("peak_rss_mb") or 0 for s in metrics["stages"].values()),
            })
            print(f"run {i + 1}: {records[-1]['wall_s']} s, {records[-1]['psnr']} dB", flush=True)
    walls = [r["wall_s"] for r in records]
    save("pipeline_cpu_tiny", {
        "goal": {"wall_s_below": 180, "psnr_at_least": 22},
        "wall_s_max": max(walls), "wall_s_min": min(walls),
        "psnr_min": min(r["psnr"] for r in records), "runs": records,
    })


def bench_raster(repeats: int) -> None:
    """Forward+backward per step: 10k Gaussians at 128×128 (tiles of 8 and 16), and against the
    dense per-pixel reference at a size the reference can hold in memory."""

    sys.path.insert(0, str(ROOT / "tests"))
    from raster_reference import dense_render
    from test_raster import cameras, random_scene

    from codsplat.pipeline.raster import rasterize

    def timed(fn, params):
        times = []
        for _ in range(repeats + 1):
            ps = [p.detach().clone().requires_grad_(True) for p in params]
            t = time.perf_counter()
            img, alpha = fn(ps)[:2]
            (img.sum() + alpha.sum()).backward()
            times.append(time.perf_counter() - t)
        return sorted(times[1:])[len(times[1:]) // 2]  # median, first call is warm-up

    out = {}
    big = random_scene(n=10_000, seed=1, sh_coeffs=4)
    big[2] = big[2] * 0.3  # smaller Gaussians, as after densification
    view, K = cameras(128, 128, count=1)
    for tile in (8, 16):
        out[f"tile{tile}_10k_128px_ms"] = round(1000 * timed(lambda p: rasterize(*p, view, K, 128, 128, sh_degree=1, tile_size=tile), big), 1)

    small = random_scene(n=2_000, seed=2, sh_coeffs=4)
    view, K = cameras(64, 64, count=1)
    ours = timed(lambda p: rasterize(*p, view, K, 64, 64, sh_degree=1), small)
    dense = timed(lambda p: dense_render(*p, view, K, 64, 64, sh_degree=1, tile_size=8), small)
    out["tile8_2k_64px_ms"] = round(1000 * ours, 1)
    out["dense_reference_2k_64px_ms"] = round(1000 * dense, 1)
    out["speedup_vs_dense_reference"] = round(dense / ours, 1)

    try:  # gsplat's own torch reference path; it calls CUDA ops, so on a CPU it cannot run
        from gsplat.rendering import _rasterization

        ps = [p.detach() for p in small]
        _rasterization(*ps, view, K, 64, 64, sh_degree=1)
        out["gsplat_torch_reference"] = "ran"
    except Exception as exc:  # noqa: BLE001 - we report why it cannot run
        out["gsplat_torch_reference"] = f"cannot run here: {exc.__class__.__name__}: {str(exc)[:120]}"
    save("raster_cpu", out)


def bench_submit(jobs: int) -> None:
    """Translation + submission overhead per job against the Bacalhau stand-in on loopback.

    The stand-in holds jobs in its queue (knob `hold`) so that only the orchestration path is timed:
    job document → Bacalhau spec → HTTP PUT → JobID.
    """
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from servers import start_standin

    from codsplat.orchestrator.bacalhau import BacalhauClient
    from codsplat.orchestrator.job import parse_job
    from codsplat.orchestrator.translate import Deployment, translate

    server = start_standin("http://127.0.0.1:9")
    try:
        httpx.post(f"{server.url}/standin/knobs", json={"hold": True})
        deployment = Deployment()
        out = {}
        with BacalhauClient(server.url) as client:
            client.version()
            for split in (False, True):
                translate_ms, total_ms = [], []
                for i in range(jobs):
                    t0 = time.perf_counter()
                    job = parse_job({"version": 1, "id": f"bench-{int(split)}-{i}", "input": "s3://codsplat-data/uploads/b/x.mp4",
                                     "preset": "fast", "compute": {"split_stages": split}})
                    spec = translate(job, deployment, "preprocess" if split else "all", 1)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", choices=("pipeline", "raster", "submit", "all"), default="all")
    ap.add_argument("--jobs", type=int, default=500, help="jobs submitted by the submit benchmark")
    ap.add_argument("--runs", type=int, default=1, help="pipeline runs")
    ap.add_argument("--repeats", type=int, default=5, help="rasterizer repeats")
    args = ap.parse_args()
    if args.which in ("raster", "all"):
        bench_raster(args.repeats)
    if args.which in ("submit", "all"):
        bench_submit(args.jobs)
    if args.which in ("pipeline", "all"):
        bench_pipeline(args.runs)


if __name__ == "__main__":
    main()
