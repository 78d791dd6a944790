"""Job JSON + media in S3 → translated → submitted to the stand-in → the real pipeline runs in each
stage → results in S3. And the faults that hand a job over to the fallback."""

import io
import json

import httpx
import pytest
from plyfile import PlyData

from codsplat.orchestrator.bacalhau import BacalhauClient
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.runner import BacalhauRunner, Cancelled, CannotRunHere, Hooks, JobFailed
from codsplat.orchestrator.translate import Deployment
from conftest import QUICK
from test_cli_errors import one_frame_video


def make_job(s3, moto_server, sample_video, job_id, **compute):
    key = f"uploads/tests/{job_id}.mp4"
    s3.upload_file(str(sample_video), "codsplat-data", key)
    doc = {"version": 1, "id": job_id, "input": f"s3://codsplat-data/{key}", "preset": "tiny", **QUICK,
           "compute": {"gpus": 1, **compute}}
    return parse_job(doc), Deployment(s3_endpoint=moto_server.url)


def keys(s3, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="codsplat-data", Prefix=prefix).get("Contents", []))


def test_split_job_runs_three_stages_and_lands_a_valid_ply(s3, moto_server, standin, sample_video):
    job, deployment = make_job(s3, moto_server, sample_video, "e2e-split", split_stages=True)
    seen = []
    hooks = Hooks(before_submit=lambda a: seen.append(("before", a.name)), submitted=lambda a: seen.append(("after", a.name)))
    with BacalhauClient(standin.url) as client:
        result = BacalhauRunner(client, deployment, poll_interval=0.2).run(job, hooks)
        assert [a.stage for a in result.attempts] == ["preprocess", "train", "export"]
        assert all(a.state == "Completed" for a in result.attempts)
        assert seen[:2] == [("before", "codsplat-e2e-split-preprocess-a1"), ("after", "codsplat-e2e-split-preprocess-a1")]
        labels = {j.labels["codsplat-stage"] for j in client.list_jobs(labels={"codsplat-job": "e2e-split"})}
        assert labels == {"preprocess", "train", "export"}

    pre = keys(s3, result.attempts[0].published_key)
    assert any("/frames/images/" in k for k in pre) and any(k.endswith("sfm/manifest.json") for k in pre)
    assert not any("/train/" in k for k in pre)
    trained = keys(s3, result.attempts[1].published_key)
    assert trained and all("/train/" in k for k in trained)  # the train stage published only its folder
    body = s3.get_object(Bucket="codsplat-data", Key="results/e2e-split/export/splat.ply")["Body"].read()
    ply = PlyData.read(io.BytesIO(body))
    metrics = json.loads(s3.get_object(Bucket="codsplat-data", Key="results/e2e-split/export/metrics.json")["Body"].read())
    assert ply["vertex"].count == metrics["gaussians"] > 1000


def test_failed_execution_is_retried_under_a_new_name(s3, moto_server, standin, sample_video):
    job, deployment = make_job(s3, moto_server, sample_video, "e2e-retry", retries=2)
    httpx.post(f"{standin.url}/standin/knobs", json={"fail_next": 1})
    with BacalhauClient(standin.url) as client:
        result = BacalhauRunner(client, deployment, poll_interval=0.2).run(job)
        [attempt] = result.attempts
        assert attempt.number == 2 and attempt.name == "codsplat-e2e-retry-all-a2"
        names = sorted(j.name for j in client.list_jobs(labels={"codsplat-job": "e2e-retry"}))
        assert names == ["codsplat-e2e-retry-all-a1", "codsplat-e2e-retry-all-a2"]
    assert "results/e2e-retry/export/splat.spz" in keys(s3, "results/e2e-retry/")


@pytest.mark.parametrize("knobs,compute,reason", [
    ({"gpu_nodes": 0}, {}, "no Bacalhau node has 1 GPU"),
    ({}, {"gpu_model": "NVIDIA-H100"}, "no Bacalhau node has 1 NVIDIA-H100 GPU"),
    ({"fail_next": 3}, {"retries": 2}, "all failed 3 times; last error: exit status 1\nboom: injected failure"),
    ({"vanish_next": 2}, {"retries": 1}, "disconnected: execution lost"),
])
def test_cannot_run_here(s3, moto_server, standin, sample_video, knobs, compute, reason):
    job, deployment = make_job(s3, moto_server, sample_video, "e2e-fault", **compute)
    httpx.post(f"{standin.url}/standin/knobs", json=knobs)
    with BacalhauClient(standin.url) as client:
        with pytest.raises(CannotRunHere) as info:
            BacalhauRunner(client, deployment, poll_interval=0.1).run(job)
    assert reason in info.value.reason


def test_queue_timeout_hands_over(s3, moto_server, standin, sample_video):
    """A busy network queues the job; when QueueTimeout passes with no node, it cannot run here."""
    job, deployment = make_job(s3, moto_server, sample_video, "e2e-queue", queue_timeout_minutes=0)
    httpx.post(f"{standin.url}/standin/knobs", json={"hold": True})
    with BacalhauClient(standin.url) as client:
        runner = BacalhauRunner(client, deployment, poll_interval=0.1)
        with pytest.raises(CannotRunHere, match="not enough nodes"):
            runner.run_stage(job, "all", {}, Hooks())
        spec = {"Name": "q", "Type": "batch", "Count": 1, "Tasks": [{"Name": "m", "Engine": {"Type": "docker", "Params": {"Image": "x"}},
                "Timeouts": {"QueueTimeout": 1, "ExecutionTimeout": 10, "TotalTimeout": 11}}]}
        queued = client.submit(spec).job_id
        info = runner.follow(queued, __import__("codsplat.orchestrator.runner", fromlist=["Attempt"]).Attempt("all", 1, "q"), Hooks())
        assert info.state.value == "Failed" and "queue timeout" in info.message and not info.executions
        assert "Queued" in [h["JobState"]["New"] for h in client.history(queued) if "JobState" in h]


def test_a_job_stopped_for_a_cancel_ends_cancelled_and_is_not_retried(s3, moto_server, standin, sample_video):
    job, deployment = make_job(s3, moto_server, sample_video, "e2e-cancel", retries=2)
    httpx.post(f"{standin.url}/standin/knobs", json={"hold": True})  # queued: still running when we cancel
    with BacalhauClient(standin.url) as client:
        hooks = Hooks(progress=lambda attempt, info: client.stop(attempt.bacalhau_id, "cancelled by the user"))
        with pytest.raises(Cancelled) as info:
            BacalhauRunner(client, deployment, poll_interval=0.1).run(job, hooks)
        assert len(client.list_jobs(labels={"codsplat-job": "e2e-cancel"})) == 1
    assert info.value.stage == "all"


def test_bad_media_fails_the_job_without_retries(s3, moto_server, standin, tmp_path):
    one_frame_video(tmp_path / "one.mp4")
    s3.upload_file(str(tmp_path / "one.mp4"), "codsplat-data", "uploads/tests/one.mp4")
    job = parse_job({"version": 1, "id": "e2e-bad", "input": "s3://codsplat-data/uploads/tests/one.mp4",
                     "preset": "tiny", "compute": {"retries": 2}})
    with BacalhauClient(standin.url) as client:
        with pytest.raises(JobFailed) as info:
            BacalhauRunner(client, Deployment(s3_endpoint=moto_server.url), poll_interval=0.1).run(job)
        assert len(client.list_jobs(labels={"codsplat-job": "e2e-bad"})) == 1
    assert info.value.exit_code == 2 and "has only 1 frame" in info.value.message


def test_a_crash_between_submit_and_record_does_not_submit_twice(s3, moto_server, standin, sample_video):
    """The daemon died after sending attempt 1 and before recording it: on restart the attempt is
    found by label and followed, not sent again."""
    job, deployment = make_job(s3, moto_server, sample_video, "e2e-crash")
    httpx.post(f"{standin.url}/standin/knobs", json={"fail_next": 1})  # make the first attempt quick to finish
    with BacalhauClient(standin.url) as client:
        from codsplat.orchestrator.translate import translate

        client.submit(translate(job, deployment, "all", 1))  # ...and then the daemon died
        sent = []
        runner = BacalhauRunner(client, deployment, poll_interval=0.1)
        attempt = runner.run_stage(job, "all", {}, Hooks(before_submit=lambda a: sent.append(a.name)))
        assert sent == ["codsplat-e2e-crash-all-a2"]  # attempt 1 was found and followed, never resent
        assert attempt.number == 2
