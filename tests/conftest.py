"""Shared fixtures: the sample capture, a whole tiny run of it, and a way to call the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.mp4"
SPLAT_TRANSFORM = ROOT / "node_modules" / ".bin" / "splat-transform"
# A quick configuration for tests that exercise stages rather than quality: what a test that runs the pipeline for its plumbing (not its quality) asks for: 16 frames (SfM
# registers all of them in a few seconds) and 100 steps; test_pipeline's tiny_run keeps the preset
QUICK = {"frames": {"max": 16}, "train": {"steps": 100, "refine_start": 40, "refine_stop": 90, "refine_every": 25},
         "export": {"min_psnr": 5.0}}


def codsplat(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the command line as a user would, in a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "codsplat.orchestrator.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})},
    )


def entrypoint(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "codsplat.pipeline.entrypoint", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def sample_video() -> Path:
    assert SAMPLE.is_file(), "examples/sample.mp4 is missing: run python examples/make_sample.py"
    return SAMPLE


@pytest.fixture(scope="session")
def quick_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "quick.json"
    path.write_text(json.dumps(QUICK))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, sample_video):
    """The README's sample job: the whole pipeline on the sample at the tiny preset, once."""
    work = tmp_path_factory.mktemp("tiny") / "run"
    started = time.perf_counter()
    proc = codsplat("run", sample_video, "--preset", "tiny", "--out", work, "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return work, {**json.loads(proc.stdout), "wall_seconds": time.perf_counter() - started}


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    """A test's own copy of the sample run, for tests that change it (the session's stays as made)."""
    work = tmp_path / "run"
    shutil.copytree(tiny_run[0], work)
    return work


@pytest.fixture(scope="session")
def splat_transform() -> Path:
    assert SPLAT_TRANSFORM.exists(), "run `npm ci` at the repository root (the .ci/run script does)"
    assert shutil.which("node"), "node is needed for the third-party splat reader"
    return SPLAT_TRANSFORM


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_server():
    from servers import start_moto

    os.environ.update(AWS_ENV)  # moto accepts any key; never real credentials
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(moto_server):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1")
    client.create_bucket(Bucket="codsplat-data")
    return client


@pytest.fixture
def standin(moto_server):
    """A fresh Bacalhau stand-in for each test (its knobs and jobs start clean)."""
    from servers import start_standin

    server = start_standin(moto_server.url)
    yield server
    server.stop()


def sagemaker_did_its_work(s3, bucket: str, job_id: str) -> dict:
    """What a SageMaker run of the worker leaves in the job's output prefix (its checkpoint folder
    synced): moto runs no container, so this writes the outcome line the entrypoint writes, from a
    run's metrics. Returns those metrics."""
    from codsplat.pipeline.contract import OUTCOME_FILE, outcome_line, run_summary

    metrics = {"psnr": 27.5, "ssim": 0.91, "gaussians": 48_000, "stages": {"frames": {"seconds": 4.0},
               "sfm": {"seconds": 30.0}, "train": {"seconds": 600.0}, "export": {"seconds": 12.0}},
               "files": {"ply": {"file": "splat.ply"}, "spz": {"file": "splat.spz"}}}
    for name in ("splat.ply", "splat.spz", "metrics.json", "report.html", "cameras.json"):  # the export, as synced
        s3.put_object(Bucket=bucket, Key=f"results/{job_id}/export/{name}", Body=f"{job_id} {name}".encode())
    s3.put_object(Bucket=bucket, Key=f"results/{job_id}/{OUTCOME_FILE}", Body=outcome_line(run_summary(metrics, "cuda")))
    return metrics
