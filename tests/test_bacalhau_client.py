"""The typed Bacalhau client against the stand-in node over real HTTP on loopback."""

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from codsplat.orchestrator.bacalhau import (BacalhauClient, BadRequest, ExecutionState, JobState, NotFound,
                                            Unauthorized, Unavailable, execution_state)
from codsplat.orchestrator.executors.bacalhau import result_of
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.settings import Settings, load_settings
from codsplat.orchestrator.translate import translate_all
from codsplat.pipeline.errors import InputError
from servers import free_port, start_standin

# upstream's pkg/swagger/swagger.json at the pinned release (aws/bacalhau.py), shipped with the tests
SWAGGER = Path(__file__).resolve().parent / "data" / "bacalhau-swagger-v1.9.3.json"


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
        assert client.version().tuple == (1, 9)
        [node] = client.nodes()
        assert node.connected and node.approved and node.max.gpu == 1
        assert [(g.name, g.memory_mib) for g in node.gpus] == [("NVIDIA A10G", 23028)]  # the wire's own spelling
        assert node.gpu_models == ["NVIDIA-A10G"] and node.labels["GPU-0"] == "NVIDIA-A10G"  # one normal form
        assert node.max.cpu == pytest.approx(3.2) and node.max.memory == int(16 * 2**30 * 0.8)


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
    secured = start_standin(moto_server.url, api_key="s3cret")
    try:
        with BacalhauClient(secured.url) as client:
            with pytest.raises(Unauthorized):
                client.nodes()
        env = {"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": secured.url.rsplit(":", 1)[1], "BACALHAU_API_KEY": "s3cret"}
        with BacalhauClient.from_settings(load_settings(env=env)) as client:
            assert client.base_url == secured.url and client.nodes()
    finally:
        secured.stop()
    basic = start_standin(moto_server.url, basic="ops:pa55")
    try:
        with BacalhauClient(basic.url, basic=("ops", "wrong")) as client:
            with pytest.raises(Unauthorized):
                client.nodes()
        env = {"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": basic.url.rsplit(":", 1)[1],
               "BACALHAU_API_USERNAME": "ops", "BACALHAU_API_PASSWORD": "pa55"}
        with BacalhauClient.from_settings(load_settings(env=env)) as client:
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


def test_a_non_zero_exit_is_a_completed_job_whose_exit_code_decides(standin):
    with BacalhauClient(standin.url) as client:
        info = wait(client, client.submit(python_job("import sys; sys.stderr.write('bad thing\\n'); sys.exit(7)", "f")).job_id)
        assert info.state == JobState.COMPLETED  # upstream: the container ran, so the job completed
        assert info.executions[0].exit_code == 7 and "bad thing" in info.executions[0].stderr
        result = result_of(info)
        assert result.ending.value == "crashed" and result.exit_code == 7 and "bad thing" in result.message
        ok = wait(client, client.submit(python_job('print(\'{"ok": false, "exit_code": 3, "stage": "sfm", "message": "no overlap"}\'); import sys; sys.exit(3)', "u")).job_id)
        result = result_of(ok)
        assert (result.ending.value, result.exit_code, result.stage, result.message) == ("user-error", 3, "sfm", "no overlap")


def test_tls_and_credentials_come_from_the_environment_with_one_boolean_reading():
    """BACALHAU_API_TLS_INSECURE=false used to turn certificate checks off (any text counted as true)."""
    for text, insecure in (("false", False), ("0", False), ("no", False), ("true", True), ("1", True), ("yes", True)):
        conf = load_settings(env={"BACALHAU_API_TLS_USETLS": "true", "BACALHAU_API_TLS_INSECURE": text,
                                  "BACALHAU_API_HOST": "bacalhau.internal", "BACALHAU_API_PORT": "443"})
        assert conf.bacalhau_insecure is insecure and conf.bacalhau_url == "https://bacalhau.internal:443"
        client = BacalhauClient.from_settings(conf)
        assert client._verify is (not insecure)
    import ssl

    import certifi

    conf = load_settings(env={"BACALHAU_API_TLS_CACERT": certifi.where(), "BACALHAU_API_KEY": "k"})
    client = BacalhauClient.from_settings(conf)
    assert isinstance(client._verify, ssl.SSLContext) and client._http.headers["authorization"] == "Bearer k"
    with pytest.raises(InputError, match="BACALHAU_API_TLS_CACERT.*/nowhere/ca.pem is not a readable CA bundle"):
        BacalhauClient.from_settings(load_settings(env={"BACALHAU_API_TLS_CACERT": "/nowhere/ca.pem"}))
    with pytest.raises(InputError, match='bacalhau_tls: must be true or false, got "maybe"'):
        load_settings(env={"BACALHAU_API_TLS_USETLS": "maybe"})


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

    for spec in translate_all(job, Settings()):
        assert validate(spec) == []
        assert set(spec) <= defs["models.Job"]
        task = spec["Tasks"][0]
        assert set(task) <= defs["models.Task"]
        assert set(task["Resources"]) <= defs["models.ResourcesConfig"]
        assert set(task["Timeouts"]) <= defs["models.TimeoutConfig"]
        for source in task["InputSources"]:
            assert set(source) <= defs["models.InputSource"]
    with BacalhauClient(standin.url) as client:
        standin.knobs(hold=True)  # accept, but do not run
        assert client.submit(translate_all(job, Settings())[0]).job_id.startswith("j-")


@pytest.mark.parametrize("model, region, endpoint", [("NVIDIA-A10G", "eu-west-1", "http://127.0.0.1:9000"), (None, None, None)])
def test_a_spec_carries_the_job_s_limits_gpu_model_and_the_deployment_s_s3(model, region, endpoint):
    """Bacalhau takes timeouts in seconds (ExecutionTimeout for the run, QueueTimeout for placement,
    TotalTimeout both); a GPU model is a constraint on GPU stages only; every S3 source and the
    publisher name the deployment's region and endpoint where it has them, and nothing where not."""
    job = parse_job({"version": 1, "input": "s3://codsplat-data/uploads/a.mp4",
                     "compute": {"split_stages": True, "max_runtime_minutes": 90, "queue_timeout_minutes": 7,
                                 **({"gpu_model": model} if model else {})}}, default_id="limits")
    settings = Settings(region=region, s3_endpoint=endpoint)
    for spec in translate_all(job, settings):
        task, stage = spec["Tasks"][0], spec["Name"].split("-")[-2]
        assert task["Timeouts"] == {"ExecutionTimeout": 5400, "QueueTimeout": 420, "TotalTimeout": 5820}, stage
        constraints = [{"Key": "GPU-0", "Operator": "=", "Values": [model]}] if model and stage == "train" else []
        assert spec.get("Constraints", []) == constraints, stage
        for params in [source["Source"]["Params"] for source in task["InputSources"]] + [task["Publisher"]["Params"]]:
            assert (params.get("Region"), params.get("Endpoint")) == (region, endpoint), stage


@pytest.mark.parametrize("gpus, devices", [(1, ["cpu", "cuda", "cpu"]), (0, ["cpu", "cpu", "cpu"])])
def test_a_stage_that_asks_for_a_gpu_is_pinned_to_cuda_and_every_other_to_the_cpu(gpus, devices):
    """A GPU stage never falls back to training on its node's CPU for hours: the worker is told cuda,
    and stops with exit 5 when it cannot use it; a CPU stage never looks for a GPU."""
    from codsplat.pipeline.contract import decode_settings

    for split, expected in ((True, devices), (False, devices[1:2])):
        job = parse_job({"version": 1, "input": "s3://codsplat-data/uploads/a.mp4",
                         "compute": {"split_stages": split, "gpus": gpus}, "train": {"device": "auto"}}, default_id="pin")
        given = []
        for spec in translate_all(job, Settings()):
            parameters = spec["Tasks"][0]["Engine"]["Params"]["Parameters"]
            given.append(decode_settings(parameters[parameters.index("--settings") + 1], "settings")["train"]["device"])
            assert ("GPU" in spec["Tasks"][0]["Resources"]) == (given[-1] == "cuda")
        assert given == expected


def test_the_watcher_follows_jobs_by_listing_and_describes_only_one_no_listing_shows(standin):
    """A job that ends is seen in the watcher's listing (no describe of its own); a job the server
    does not know (its store was reset) is described once it has gone unseen for reconcile_seconds,
    and ends as a failure instead of being followed for ever."""
    from codsplat.orchestrator.executors.bacalhau import LABEL, Watcher

    with BacalhauClient(standin.url) as client:
        described = []
        describe = client.describe
        client.describe = lambda job_id, **kw: described.append(job_id) or describe(job_id, **kw)
        watcher = Watcher(client, poll_seconds=0.05, reconcile_seconds=1.0)
        ended: dict[str, object] = {}
        first = client.submit(python_job("import time; time.sleep(0.5)", "w1", labels={LABEL: "w1"})).job_id
        watcher.track(first, lambda job: ended.setdefault(first, job))  # the first track describes once, for the mark
        second = client.submit(python_job("import time; time.sleep(0.3)", "w2", labels={LABEL: "w2"})).job_id
        watcher.track(second, lambda job: ended.setdefault(second, job))
        watcher.track("j-forgotten", lambda job: ended.setdefault("j-forgotten", job))
        deadline = time.monotonic() + 20
        while len(ended) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.stop()
        assert ended[first].state == ended[second].state == JobState.COMPLETED
        assert ended["j-forgotten"].state == JobState.FAILED and "no longer knows" in ended["j-forgotten"].message
        assert described == [first, "j-forgotten"], described


def test_the_watcher_stops_and_ends_a_job_whose_executions_all_failed_while_it_waits_for_a_node(standin):
    """Seen on the real network (tests/test_bacalhau_network.py): a container killed for memory fails
    its execution, Bacalhau places it once more on the same node, then the job waits Queued until its
    queue timeout ("job already executed on this node more than once"). The watcher reads a waiting
    job's executions; one that used its allowed executions is stopped and ends with their reason."""
    from codsplat.orchestrator.bacalhau import ExecutionState
    from codsplat.orchestrator.executors.bacalhau import LABEL, Watcher, result_of

    standin.knobs(oom_next=2)
    with BacalhauClient(standin.url) as client:
        watcher = Watcher(client, poll_seconds=0.05, reconcile_seconds=0.4)
        ended: dict[str, object] = {}
        spec = python_job("print('ran')", "w-oom", labels={LABEL: "w-oom"}, Timeouts={"QueueTimeout": 600})
        job_id = client.submit(spec).job_id
        watcher.track(job_id, lambda job: ended.setdefault(job_id, job), allowed=2)
        deadline = time.monotonic() + 20
        while not ended and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.stop()
        job = ended[job_id]
        assert [e.state for e in job.executions] == [ExecutionState.FAILED] * 2
        result = result_of(job)
        assert result.ending.value == "crashed" and result.executions == 2 and "memory" in result.message.lower()
        assert client.describe(job_id).state == JobState.STOPPED  # no longer holds its place in the queue


def test_a_preflight_shares_one_node_reading_and_reads_again_before_it_refuses(standin):
    """Preflights share one node listing (a burst of jobs costs one call). A job that reading would
    refuse is judged again on a fresh one, so a node that joined since is found."""
    from codsplat.orchestrator.compute import CannotRun
    from codsplat.orchestrator.executors.bacalhau import BacalhauExecutor

    listings = []
    with BacalhauClient(standin.url) as client:
        nodes = client.nodes
        client.nodes = lambda: listings.append(1) or nodes()
        executor = BacalhauExecutor(client, Settings(bacalhau_poll_seconds=0.1))
        a10g = parse_job({"version": 1, "input": "s3://codsplat-data/uploads/a.mp4", "compute": {"gpu_model": "NVIDIA-A10G"}}, default_id="a10g")
        h100 = parse_job({"version": 1, "input": "s3://codsplat-data/uploads/a.mp4", "compute": {"gpu_model": "NVIDIA-H100"}}, default_id="h100")
        for _ in range(5):
            executor.preflight(a10g)
        assert len(listings) == 1
        time.sleep(0.15)
        with pytest.raises(CannotRun, match="GPU NVIDIA-H100 asked, GPU-0 is NVIDIA-A10G"):
            executor.preflight(h100)  # refused only after a fresh reading
        assert len(listings) == 2
        standin.knobs(nodes=[{"id": "n-h100", "gpus": [{"name": "NVIDIA H100", "memory_mib": 81559}]}])
        time.sleep(0.15)
        executor.preflight(h100)  # the kept reading would refuse it; the fresh one holds the new node
        assert len(listings) == 3


def test_an_attempt_sent_or_found_again_after_a_restart_knows_where_it_publishes(standin):
    """The next stage of a split job reads what this one published: an attempt found again by its
    labels (a daemon died between sending and recording) must name the same prefix as when it was sent."""
    from codsplat.orchestrator.compute import Attempt
    from codsplat.orchestrator.executors.bacalhau import BacalhauExecutor

    job = parse_job({"version": 1, "id": "pub", "input": "s3://codsplat-data/uploads/a.mp4",
                     "compute": {"split_stages": True}}, default_id="pub")
    standin.knobs(hold=True)  # accepted, never run
    with BacalhauClient(standin.url) as client:
        executor = BacalhauExecutor(client, Settings())
        sent = Attempt.new("bacalhau", job.id, "preprocess", 1)
        executor.submit(job, sent, {})
        found = Attempt.new("bacalhau", job.id, "preprocess", 1)
        assert executor.find(job, found) and found.remote_id == sent.remote_id
    assert sent.published == found.published == "results/pub/work/codsplat-pub-preprocess-a1/"
