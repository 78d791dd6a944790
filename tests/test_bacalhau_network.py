"""Jobs on a real Bacalhau network: upstream Bacalhau at the pinned release (built from source by
tests/network/build-bacalhau.sh), an orchestrator and a compute node with the Docker executor on
127.0.0.1, configured by the functions that configure the deployed ones (the daemon an API-key user,
the node joining with a token), moto's S3 as the inputs' and the publisher's S3, and the CPU worker
image built from container/ and served by a local registry. Only upstream's own code decides here how
a job ends: what it mounts, how it publishes, what it retries, what it refuses.

Each case names what a user meets: the exit code of `codsplat submit`, or the record and the message
the daemon leaves. The node is the test machine (2 cores), so jobs ask for one CPU and no GPU."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from codsplat.pipeline.contract import ADVICE
from conftest import AWS_ENV, QUICK, aws_deployment, codsplat
from servers import start_bacalhau_network, start_registry, worker_image
from test_cli_errors import noise_images
from test_daemon_aws import mail, serve

REGISTRY_PORT = int(os.environ.get("CODSPLAT_REGISTRY_PORT", "5000"))
BUCKET = "codsplat-data"
# What one 2-core machine can hold: the node offers 80% of its CPUs (pkg/config/defaults.go).
SMALL = json.dumps({stage: {"cpu": "1", "memory": "6gb", "disk": "20gb"} for stage in ("all", "preprocess", "train", "export")})
STAGE_FOLDERS = ("frames", "sfm", "train", "export")
# A job here ends in 10-30 s: a stuck one fails its test in minutes, with the network's state, not CI's hour.
SUBMIT_TIMEOUT = 300


@pytest.fixture(scope="module")
def registry():
    server = start_registry(REGISTRY_PORT)
    yield f"127.0.0.1:{REGISTRY_PORT}"
    server.stop()


@pytest.fixture(scope="module")
def image(registry):
    return worker_image(registry)


@pytest.fixture(scope="module")
def network(tmp_path_factory, moto_server, image):
    net = start_bacalhau_network(tmp_path_factory.mktemp("bacalhau"), env=AWS_ENV)
    yield net
    net.stop()


@pytest.fixture(autouse=True)
def node_left_free(network):
    """The node holds one of these jobs at a time, so a job a failed test leaves running would starve
    every later test: each test's leftovers are stopped, and named in the failure."""
    yield
    from codsplat.orchestrator.bacalhau import BacalhauClient

    with BacalhauClient(network.url, token=network.api_key) as client:
        for job in client.list_jobs():
            if not job.state.terminal:
                client.stop(job.id, "left running by a finished test")


def network_state(network) -> str:
    """What Bacalhau and Docker say about every job, for a test that timed out waiting on one."""
    from codsplat.orchestrator.bacalhau import BacalhauClient

    lines = []
    try:
        with BacalhauClient(network.url, token=network.api_key) as client:
            for job in client.list_jobs():
                job = client.describe(job.id)
                lines.append(f"job {job.name} {job.state.value} {job.message!r}")
                lines += [f"  execution {e.id} on {e.node_id}: {e.state.value} {e.message!r} exit {e.exit_code}"
                          for e in job.executions]
            lines += [f"node {n.id}: available {n.available}" for n in client.nodes()]
    except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the failure it explains
        lines.append(f"Bacalhau could not be asked: {exc!r}")
    docker = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}} {{.Image}} {{.Status}}"],
                            capture_output=True, text=True)
    return "\n".join(lines + ["docker ps -a:", docker.stdout + docker.stderr])


def submit(network, *args, env: dict) -> subprocess.CompletedProcess:
    try:
        return codsplat("submit", *args, env=env, timeout=SUBMIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"codsplat submit did not end within {SUBMIT_TIMEOUT} s; the network:\n"
                             f"{network_state(network)}") from None


def env_for(network, moto_server, image, **extra) -> dict:
    return network.env(**{"CODSPLAT_S3_ENDPOINT": moto_server.url, "CODSPLAT_IMAGE": image, "CODSPLAT_RESOURCES": SMALL, **extra})


def job_file(tmp_path: Path, job_id: str, key: str, **doc) -> Path:
    path = tmp_path / f"{job_id}.json"
    compute = {"gpus": 0, "retries": 0, **doc.pop("compute", {})}
    path.write_text(json.dumps({"version": 1, "id": job_id, "input": f"s3://{BUCKET}/{key}", "compute": compute, **doc}))
    return path


def files_under(s3, prefix: str, bucket: str = BUCKET) -> set[str]:
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {o["Key"][len(prefix):] for o in page.get("Contents", [])}
    return keys


def stage_files(folder: Path, stages=STAGE_FOLDERS) -> set[str]:
    return {p.relative_to(folder).as_posix() for s in stages for p in (folder / s).rglob("*") if p.is_file()}


def bacalhau_jobs(network, job_id: str):
    from codsplat.orchestrator.bacalhau import BacalhauClient

    with BacalhauClient(network.url, token=network.api_key) as client:
        return [client.describe(j.id) for j in client.list_jobs(labels={"codsplat-job": job_id})]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, sample_video, s3):
    """The same job on this machine with `codsplat run`: the files every other path must give."""
    s3.upload_file(str(sample_video), BUCKET, "uploads/net/scan.mp4")
    work = tmp_path_factory.mktemp("local") / "run"
    config = work.parent / "quick.json"
    config.write_text(json.dumps(QUICK))
    proc = codsplat("run", sample_video, "--preset", "tiny", "--config", config, "--out", work, "--json")
    assert proc.returncode == 0, proc.stderr
    return work


def test_the_sample_as_one_job_publishes_what_a_local_run_writes(tmp_path, s3, moto_server, network, image, local_run):
    proc = submit(network, job_file(tmp_path, "net-one", "uploads/net/scan.mp4", preset="tiny", **QUICK),
                    "--poll", "1", env=env_for(network, moto_server, image))
    assert proc.returncode == 0, proc.stderr
    published = files_under(s3, "results/net-one/")
    assert {"stdout", "stderr", "exitCode"} <= published  # Bacalhau's own files, beside the result paths
    assert {f for f in published if f.split("/")[0] in STAGE_FOLDERS} == stage_files(local_run)
    assert s3.get_object(Bucket=BUCKET, Key="results/net-one/exitCode")["Body"].read().strip() == b"0"
    [attempt] = json.loads(proc.stdout)["attempts"]
    assert attempt["state"] == "Completed" and attempt["exit_code"] == 0 and attempt["executions"] == 1


def test_the_sample_split_in_three_jobs_reads_what_each_stage_published(tmp_path, s3, moto_server, network, image,
                                                                          local_run):
    proc = submit(network, job_file(tmp_path, "net-split", "uploads/net/scan.mp4", preset="tiny",
                                       compute={"split_stages": True}, **QUICK),
                    "--poll", "1", env=env_for(network, moto_server, image))
    assert proc.returncode == 0, proc.stderr
    pre, train, export = json.loads(proc.stdout)["attempts"]
    assert [a["stage"] for a in (pre, train, export)] == ["preprocess", "train", "export"]
    assert {f.split("/")[0] for f in files_under(s3, pre["published"])} == {"frames", "sfm", "stdout", "stderr", "exitCode"}
    assert {f.split("/")[0] for f in files_under(s3, train["published"])} == {"train", "stdout", "stderr", "exitCode"}
    published = set()  # each stage's folders, as its job published them
    for attempt in (pre, train, export):
        published |= {f for f in files_under(s3, attempt["published"]) if f.split("/")[0] in STAGE_FOLDERS}
    assert published == stage_files(local_run)
    assert export["published"] == "results/net-split/"  # the export lands where a single job's does
    nodes = {e.node_id for j in bacalhau_jobs(network, "net-split") for e in j.executions}
    assert nodes == {network.node_id}


def test_a_capture_that_cannot_be_reconstructed_exits_3_with_advice_and_no_retry(tmp_path, s3, moto_server, network, image):
    noise_images(tmp_path / "noise")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((tmp_path / "noise").iterdir()):
            z.write(path, path.name)
    s3.put_object(Bucket=BUCKET, Key="uploads/net/noise.zip", Body=archive.getvalue())
    proc = submit(network, job_file(tmp_path, "net-noise", "uploads/net/noise.zip", preset="tiny"),
                    "--poll", "1", env=env_for(network, moto_server, image))
    assert proc.returncode == 3, proc.stderr
    assert "(stage sfm)" in proc.stderr and ADVICE["reconstruction"][:60] in " ".join(proc.stderr.split())
    [job] = bacalhau_jobs(network, "net-noise")
    assert job.state.value == "Completed" and [e.exit_code for e in job.executions] == [3]
    error = json.loads(s3.get_object(Bucket=BUCKET, Key="results/net-noise/sfm/error.json")["Body"].read())
    assert error["exit_code"] == 3 and error["stage"] == "sfm"


def test_an_image_the_node_does_not_hold_cannot_run_and_says_so(tmp_path, s3, moto_server, network, image, registry):
    s3.put_object(Bucket=BUCKET, Key="uploads/net/clip.mp4", Body=b"\0")
    absent = f"{registry}/codsplat-worker:never-built"
    proc = submit(network, job_file(tmp_path, "net-noimage", "uploads/net/clip.mp4"), "--poll", "1",
                    env=env_for(network, moto_server, image, CODSPLAT_IMAGE=absent))
    assert proc.returncode == 6, proc.stderr
    assert "cannot run on Bacalhau" in proc.stderr and "never-built" in proc.stderr


def test_a_job_no_node_can_hold_is_refused_and_nodes_says_why(tmp_path, moto_server, network, image):
    big = json.dumps({"all": {"cpu": "8", "memory": "6gb", "disk": "20gb"}})
    path = job_file(tmp_path, "net-big", "uploads/net/scan.mp4")
    env = env_for(network, moto_server, image, CODSPLAT_RESOURCES=big)
    proc = submit(network, path, env=env)
    assert proc.returncode == 6 and not bacalhau_jobs(network, "net-big")
    assert re.search(rf"node {network.node_id}: 8 CPU asked, [0-9.]+ offered", proc.stderr), proc.stderr  # 80% of its CPUs
    proc = codsplat("nodes", "--job", path, env=env)
    assert proc.returncode == 6 and "no node fits" in proc.stderr and network.node_id in proc.stdout


def test_a_wrong_api_key_is_a_clear_error_not_a_fallback(tmp_path, moto_server, network, image):
    env = env_for(network, moto_server, image, BACALHAU_API_KEY="not-the-key")
    proc = submit(network, job_file(tmp_path, "net-key", "uploads/net/scan.mp4"), env=env)
    assert proc.returncode == 5, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "Bacalhau refused this deployment's credentials (401" in text and "BACALHAU_API_KEY" in text
    assert "Traceback" not in proc.stderr and not bacalhau_jobs(network, "net-key")


# ------------------------------------------------------------------ the daemon in AWS mode

@pytest.fixture
def aws(moto_server, network, image):
    host, port = network.url.removeprefix("http://").rsplit(":", 1)
    return aws_deployment(moto_server, visibility_timeout=5, bacalhau_host=host, bacalhau_port=int(port),
                          bacalhau_api_key=network.api_key, image=image, resources=json.loads(SMALL),
                          bacalhau_poll_seconds=1, cancel_check_seconds=1)


def until(network, check, timeout: float = SUBMIT_TIMEOUT, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s; the network:\n{network_state(network)}")


def upload_job(aws, sample_video, job_id: str, **doc) -> None:
    aws["s3"].upload_file(str(sample_video), aws["bucket"], f"uploads/u/{job_id}.mp4")
    body = {"version": 1, "id": job_id, "input": f"uploads/u/{job_id}.mp4", "preset": "tiny",
            "notify": {"email": ["u@example.com"]}, **QUICK, **doc, "compute": {"gpus": 0, **doc.get("compute", {})}}
    aws["s3"].put_object(Bucket=aws["bucket"], Key=f"jobs/u/{job_id}.json", Body=json.dumps(body))


def test_the_daemon_runs_an_upload_on_the_network_and_tells_the_user_once(aws, sample_video, network, local_run):
    daemon, thread = serve(aws["settings"])
    try:
        upload_job(aws, sample_video, "net-daemon")
        until(network, lambda: (r := daemon.store.get("net-daemon")) and r.notified_at)
        calls = daemon.stats
    finally:
        daemon.stop()
        thread.join(timeout=120)
    record = daemon.store.get("net-daemon")
    assert record.state == "SUCCEEDED" and record.backend == "bacalhau", record.error
    assert record.result["metrics"]["psnr"] > 5 and record.result["device"] == "cpu"
    published = files_under(aws["s3"], "results/net-daemon/", aws["bucket"])
    assert {f for f in published if f.split("/")[0] in STAGE_FOLDERS} == stage_files(local_run)  # as `codsplat run` writes
    [job] = bacalhau_jobs(network, "net-daemon")
    assert job.id == record.attempts[0]["remote_id"] and [e.exit_code for e in job.executions] == [0]
    [message] = mail(aws)
    assert message["MessageAttributes"]["status"]["Value"] == "SUCCEEDED"
    assert calls["created"] == 1


def test_a_cancel_during_training_stops_the_bacalhau_job_and_ends_the_record_cancelled(aws, sample_video, network):
    daemon, thread = serve(aws["settings"])
    try:
        upload_job(aws, sample_video, "net-cancel", compute={"split_stages": True}, train={**QUICK["train"], "steps": 3000})
        until(network, lambda: (r := daemon.store.get("net-cancel")) and r.attempts and r.attempts[-1]["stage"] == "train")
        train = until(network, lambda: [j for j in bacalhau_jobs(network, "net-cancel")
                               if j.labels.get("codsplat-stage") == "train" and j.state.value == "Running"])
        proc = codsplat("jobs", "cancel", "net-cancel", env={"CODSPLAT_TABLE": aws["table"],
                                                             "CODSPLAT_AWS_ENDPOINT": aws["settings"].aws_endpoint})
        assert proc.returncode == 0, proc.stderr
        until(network, lambda: daemon.store.get("net-cancel").notified_at)
    finally:
        daemon.stop()
        thread.join(timeout=120)
    record = daemon.store.get("net-cancel")
    assert record.state == "CANCELLED" and record.attempts[-1]["stage"] == "train"
    jobs = {j.labels["codsplat-stage"]: j for j in bacalhau_jobs(network, "net-cancel")}
    assert set(jobs) == {"preprocess", "train"} and jobs["train"].id == train[0].id
    assert jobs["train"].state.value == "Stopped"
    messages = mail(aws)
    assert [m["MessageAttributes"]["status"]["Value"] for m in messages] == ["CANCELLED"], messages


def test_a_worker_killed_for_memory_is_a_crash_that_ends_the_job_with_its_reason(aws, sample_video, network):
    """A container the kernel kills (here: over its memory limit) is a failed execution on Bacalhau,
    not a Completed one with an exit code; after `compute.retries` the job cannot run there, and a job
    pinned to Bacalhau is failed, not handed to SageMaker. The limit is far under what the worker's
    imports take (torch alone is more), so the kernel kills it at once rather than letting it crawl,
    evicting its own code pages, just under the limit."""
    tight = aws["settings"].model_copy(update={"resources": {**aws["settings"].resources,
                                                             "all": aws["settings"].resources["all"].model_copy(
                                                                 update={"memory": "100mb"})}})
    daemon, thread = serve(tight)
    try:
        upload_job(aws, sample_video, "net-oom", compute={"backend": "bacalhau", "retries": 0})
        until(network, lambda: (r := daemon.store.get("net-oom")) and r.notified_at)
    finally:
        daemon.stop()
        thread.join(timeout=120)
    record = daemon.store.get("net-oom")
    assert record.state == "FAILED" and record.backend == "bacalhau" and record.error["kind"] == "compute"
    [job] = bacalhau_jobs(network, "net-oom")
    assert job.executions and all(e.state.value == "Failed" for e in job.executions)
    assert "memory" in record.error["message"].lower(), record.error
    [message] = mail(aws)
    assert message["MessageAttributes"]["status"]["Value"] == "FAILED"


def test_a_daemon_whose_key_bacalhau_refuses_does_not_start(aws):
    from codsplat.orchestrator.backends import build_daemon
    from codsplat.pipeline.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match=r"refused this deployment's credentials \(401"):
        build_daemon(aws["settings"].model_copy(update={"bacalhau_api_key": "not-the-key"}))
