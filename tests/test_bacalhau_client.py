"""The typed Bacalhau client against the stand-in node over real HTTP on loopback."""

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from codsplat.orchestrator.bacalhau import (BacalhauClient, BadRequest, ExecutionState, JobState, NotFound,
                                            Unauthorized, Unavailable, execution_state)
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.translate import Deployment, translate_all
from servers import free_port, start_standin

SWAGGER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bacalhau" / "swagger.json"


def python_job(code: str, name: str, labels=None, **task) -> dict:
    return {"Name": name, "Type": "batch", "Count": 1, "Labels": labels or {},
            "Tasks": [{"Name": "main", "Engine": {"Type": "docker", "Params": {
                "Image": "python:3.12", "Entrypoint": [sys.executable, "-c", code]}}, **task}]}


def wait(client, job_id, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.describe(job_id, history=True)
        if info.state.terminal:
            return info
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_agent_and_nodes(standin):
    with BacalhauClient(standin.url) as client:
        assert client.alive()
        assert client.version().tuple == (1, 7)
        [node] = client.nodes()
        assert node.connected and node.gpus_total == 1 and node.gpu_models == ["NVIDIA-A10G"]


def test_submit_describe_history_and_logs(standin):
    with BacalhauClient(standin.url) as client:
        submitted = client.submit(python_job("import sys; print('hello'); print('warn', file=sys.stderr)", "t1"))
        info = wait(client, submitted.job_id)
        assert info.state == JobState.COMPLETED
        [execution] = info.executions
        assert execution.state == ExecutionState.COMPLETED and execution.exit_code == 0
        assert execution.stdout.strip() == "hello" and execution.stderr.strip() == "warn"
        states = [h["JobState"]["New"] for h in info.history if "JobState" in h]
        assert states == ["Pending", "Running", "Completed"]  # strings, as the real server sends
        assert ("stdout", "hello\n") in list(client.logs(submitted.job_id))


def test_validation_errors_carry_every_server_message(standin):
    bad = python_job("pass", "bad", Timeouts={"ExecutionTimeout": 100, "QueueTimeout": 50, "TotalTimeout": 120})
    bad["Tasks"][0]["Resources"] = {"GPU": "1.5"}
    bad["Tasks"][0]["Name"] = " "
    bad["Tasks"][0]["ResultPaths"] = [{"Name": "out", "Path": "relative/out"}]
    with BacalhauClient(standin.url) as client:
        with pytest.raises(BadRequest) as info:
            client.submit(bad)
    message = info.value.message
    assert info.value.status == 400 and info.value.code == "InternalError"
    for part in ("task name cannot be blank", "invalid gpu value '1.5'", "exceeds total timeout",
                 "must be absolute", "result paths need a publisher"):
        assert part in message


def test_not_found_unauthorized_and_unreachable(moto_server, standin):
    with BacalhauClient(standin.url) as client:
        with pytest.raises(NotFound):
            client.describe("j-does-not-exist")
    secured = start_standin(moto_server.url, token="s3cret")
    try:
        with BacalhauClient(secured.url) as client:
            with pytest.raises(Unauthorized):
                client.nodes()
        with BacalhauClient(secured.url, token="s3cret") as client:
            assert client.nodes()
    finally:
        secured.stop()
    basic = start_standin(moto_server.url, token="ops:pa55")
    try:
        with BacalhauClient(basic.url, basic=("ops", "wrong")) as client:
            with pytest.raises(Unauthorized):
                client.nodes()
        env = {"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": basic.url.rsplit(":", 1)[1],
               "BACALHAU_API_USERNAME": "ops", "BACALHAU_API_PASSWORD": "pa55"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            with BacalhauClient.from_env() as client:
                assert client.base_url == basic.url and client.nodes()
    finally:
        basic.stop()
    with BacalhauClient(f"http://127.0.0.1:{free_port()}", timeout=1) as client:
        with pytest.raises(Unavailable, match="cannot reach"):
            client.nodes()
        assert client.alive() is False


def test_list_by_label_pages_and_stop(standin):
    with BacalhauClient(standin.url) as client:
        ids = [client.submit(python_job("pass", f"l{i}", labels={"codsplat-job": "abc"})).job_id for i in range(5)]
        client.submit(python_job("pass", "other", labels={"codsplat-job": "zzz"}))
        found = client.list_jobs(labels={"codsplat-job": "abc"}, limit=2)  # three pages
        assert sorted(j.id for j in found) == sorted(ids)
        slow = client.submit(python_job("import time; time.sleep(30)", "slow")).job_id
        deadline = time.monotonic() + 10
        while client.describe(slow).state != JobState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        client.stop(slow, reason="test")
        assert wait(client, slow).state == JobState.STOPPED


def test_execution_numbering_follows_the_server_version(moto_server):
    assert execution_state(7, (1, 5)) == ExecutionState.COMPLETED
    assert execution_state(7, (1, 6)) == ExecutionState.PUBLISHING
    old = start_standin(moto_server.url, "--version", "1.5.2")
    try:
        with BacalhauClient(old.url) as client:
            info = wait(client, client.submit(python_job("pass", "v15")).job_id)
            assert info.executions[0].state == ExecutionState.COMPLETED
            raw = httpx.get(f"{old.url}/api/v1/orchestrator/jobs/{info.id}/executions").json()
            assert raw["Items"][0]["ComputeState"]["StateType"] == 7  # v1.5's number for Completed
    finally:
        old.stop()


def test_failed_execution_surfaces_exit_code_and_stderr(standin):
    with BacalhauClient(standin.url) as client:
        info = wait(client, client.submit(python_job("import sys; sys.stderr.write('bad thing\\n'); sys.exit(7)", "f")).job_id)
        assert info.state == JobState.FAILED
        assert info.executions[0].exit_code == 7 and "bad thing" in info.executions[0].failure


def _swagger_keys():
    spec = json.loads(SWAGGER.read_text())["definitions"]
    return {name: set(d.get("properties", {})) for name, d in spec.items()}


def test_translated_specs_are_valid_and_use_only_api_keys(standin):
    """What `bacalhau job run` would accept: the server's validation passes, and every key is the
    API's own spelling (checked against the upstream swagger definitions)."""
    defs = _swagger_keys()
    job = parse_job({"version": 1, "input": "s3://codsplat-data/uploads/a.mp4",
                     "compute": {"split_stages": True, "gpu_model": "NVIDIA-A10G"}}, default_id="scan")
    from bacalhau_standin import validate

    for spec in translate_all(job, Deployment()):
        assert validate(spec) == []
        assert set(spec) <= defs["models.Job"]
        task = spec["Tasks"][0]
        assert set(task) <= defs["models.Task"]
        assert set(task["Resources"]) <= defs["models.ResourcesConfig"]
        assert set(task["Timeouts"]) <= defs["models.TimeoutConfig"]
        for source in task["InputSources"]:
            assert set(source) <= defs["models.InputSource"]
    with BacalhauClient(standin.url) as client:
        httpx.post(f"{standin.url}/standin/knobs", json={"hold": True})  # accept, but do not run
        assert client.submit(translate_all(job, Deployment())[0]).job_id.startswith("j-")
