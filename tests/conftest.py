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
# The real pipeline through Bacalhau (stand-in or upstream) on this CPU-only machine: a stage that asks for a
# GPU is pinned to CUDA (translate.py), so these jobs ask for none, as on a network of CPU nodes
CPU_ONLY = {"compute": {"gpus": 0}}
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


def photo_set(video: Path, folder: Path, count: int = 24) -> Path:
    """`count` stills of a video as a folder of JPEGs someone took around the subject; every third is
    stored on its side with the EXIF orientation that turns it upright, as phones write portraits."""
    import av
    from PIL import Image

    folder.mkdir(parents=True)
    with av.open(str(video)) as source:
        stills = [frame.to_image() for frame in source.decode(video=0)]
    for i in range(count):
        still = stills[int(i * len(stills) / count)]
        if i % 3:
            still.save(folder / f"IMG_{i:04d}.jpg", quality=92)
            continue
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to view"
        still.transpose(Image.Transpose.ROTATE_90).save(folder / f"IMG_{i:04d}.jpg", quality=92, exif=exif.tobytes())
    return folder


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


def aws_deployment(moto_server, visibility_timeout: int = 1, **settings) -> dict:
    """A deployment's AWS side provisioned in moto as the daemon's boto3 provisioning makes it (bucket,
    queue with its dead-letter queue, table, topic, state machine), a mailbox queue subscribed to the
    topic for the messages u@example.com gets, and the daemon's Settings for it (`settings` completes
    them: the Bacalhau endpoint, polls)."""
    import boto3

    from codsplat.orchestrator.provision import provision
    from codsplat.orchestrator.settings import Settings

    prefix = f"t{time.time_ns() % 10**10}"
    names = provision(boto3.Session(), prefix, endpoint=moto_server.url, max_receive_count=2,
                      visibility_timeout=visibility_timeout)
    client = lambda s: boto3.client(s, endpoint_url=moto_server.url, region_name="us-east-1")  # noqa: E731
    sqs, sns = client("sqs"), client("sns")
    mailbox = sqs.create_queue(QueueName=f"{prefix}-mailbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=mailbox, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=names["topic_arn"], Protocol="sqs", Endpoint=arn,
                  Attributes={"FilterPolicy": json.dumps({"recipient": ["u@example.com"]})})
    config = Settings(bucket=names["bucket"], queue_url=names["queue_url"], table=names["table"],
                      topic_arn=names["topic_arn"], aws_endpoint=moto_server.url, s3_endpoint=moto_server.url,
                      queue_wait_seconds=1, media_wait_seconds=2, **settings)
    return {**names, "settings": config, "s3": client("s3"), "sqs": sqs, "mailbox": mailbox}


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
