"""The Bacalhau stand-in behaves as upstream Bacalhau does, scenario by scenario.

Each test names the upstream file it mirrors (bacalhau-project/bacalhau, v1.5–v1.9) and checks the
stand-in over raw HTTP and S3, never through our client: a stand-in that merely agreed with our
client would prove nothing. The facts are in shared/reference/bacalhau/NOTES.md, "What happens on
the compute node", and were checked against those files.
"""

import json
import os
import sys
import time

import httpx
import pytest

from servers import start_standin

BUCKET = "codsplat-data"


def job(code: str, name: str, *, args=(), results=(), publish_key=None, resources=None, constraints=None,
        image="python:3.12", queue_timeout=0, inputs=(), labels=None) -> dict:
    """A task running `python -c code args...`. The stand-in has no mount namespace: it maps the
    container paths in the arguments (/outputs/..., /inputs/...) to its scratch folders, so the
    code takes its paths from sys.argv."""
    entrypoint = [sys.executable, "-c", code, *args]
    task = {"Name": "main", "Engine": {"Type": "docker", "Params": {"Image": image, "Entrypoint": entrypoint}},
            "Timeouts": {"QueueTimeout": queue_timeout, "ExecutionTimeout": 120, "TotalTimeout": 120 + queue_timeout}}
    if results:
        task["ResultPaths"] = [{"Name": n, "Path": f"/outputs/{n}"} for n in results]
        task["Publisher"] = {"Type": "s3", "Params": {"Bucket": BUCKET, "Key": publish_key, "Encoding": "plain"}}
    if resources:
        task["Resources"] = resources
    if inputs:
        task["InputSources"] = list(inputs)
    spec = {"Name": name, "Type": "batch", "Count": 1, "Labels": labels or {}, "Tasks": [task]}
    if constraints:
        spec["Constraints"] = constraints
    return spec


def submit(url, spec, headers=None) -> str:
    reply = httpx.put(f"{url}/api/v1/orchestrator/jobs", json={"Job": spec, "Force": False}, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["JobID"]


def finished(url, job_id, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/api/v1/orchestrator/jobs/{job_id}", params={"include": "executions,history"}).json()
        if body["Job"]["State"]["StateType"] in ("Completed", "Failed", "Stopped"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def keys(s3, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_results_layout_is_result_path_names_plus_stdout_stderr_and_exit_code(standin, s3):
    """pkg/executor/docker/executor.go makeContainerMounts (<results>/<Name> mounted at Path),
    pkg/executor/results.go WriteJobResults (stdout, stderr, exitCode beside them; RunOutput keeps
    the first 2 KiB), pkg/publisher/s3/publisher.go (plain: every file under Key)."""
    code = ("import pathlib, sys; a, b = map(pathlib.Path, sys.argv[1:]); (a / 'x.txt').write_text('ax'); "
            "(b / 'y').mkdir(); (b / 'y' / 'z.txt').write_text('bz'); print('first line'); print('x' * 5000)")
    job_id = submit(standin.url, job(code, "layout", args=("/outputs/a", "/outputs/b"), results=("a", "b"),
                                     publish_key="conf/layout/"))
    body = finished(standin.url, job_id)
    assert keys(s3, "conf/layout/") == ["conf/layout/a/x.txt", "conf/layout/b/y/z.txt", "conf/layout/exitCode",
                                        "conf/layout/stderr", "conf/layout/stdout"]
    assert s3.get_object(Bucket=BUCKET, Key="conf/layout/exitCode")["Body"].read() == b"0"
    [execution] = body["Executions"]["Items"]
    out = execution["RunOutput"]
    assert out["Stdout"].startswith("first line\n") and len(out["Stdout"]) == 2048 and out["StdoutTruncated"] is True
    assert len(s3.get_object(Bucket=BUCKET, Key="conf/layout/stdout")["Body"].read()) > 5000  # the file keeps it all


def test_a_non_zero_exit_completes_the_job_with_its_exit_code(standin, s3):
    """pkg/compute/executor.go (PR #1545): a container that exits non-zero is published and its
    execution and job end Completed; RunOutput.ExitCode carries the code; no retry."""
    code = "import pathlib, sys; (pathlib.Path(sys.argv[1]) / 'f').write_text('partial'); print('error: bad input', file=sys.stderr); sys.exit(3)"
    body = finished(standin.url, submit(standin.url, job(code, "exit3", args=("/outputs/o",), results=("o",),
                                                         publish_key="conf/exit3/")))
    assert body["Job"]["State"]["StateType"] == "Completed"
    [execution] = body["Executions"]["Items"]
    assert execution["ComputeState"]["StateType"] == 9  # Completed, v1.6+ numbering
    assert execution["RunOutput"]["ExitCode"] == 3 and "error: bad input" in execution["RunOutput"]["stderr"]
    assert "conf/exit3/o/f" in keys(s3, "conf/exit3/")


def test_a_task_sees_the_specs_variables_and_never_the_nodes_credentials(standin):
    """pkg/executor/docker/executor.go: the container's environment is the image's ENV and the spec's
    EnvironmentVariables and Env; the node's own (its S3 credentials) never reach it."""
    assert os.environ.get("AWS_SECRET_ACCESS_KEY")  # what the node (here the test process) holds
    code = "import json, os; print(json.dumps(sorted(os.environ)))"
    spec = job(code, "env")
    spec["Tasks"][0]["Engine"]["Params"]["EnvironmentVariables"] = ["FROM_SPEC=1"]
    spec["Tasks"][0]["Env"] = {"FROM_TASK": "2"}
    body = finished(standin.url, submit(standin.url, spec))
    seen = httpx.get(f"{standin.url}/api/v1/orchestrator/jobs/{body['Job']['ID']}/executions").json()["Items"][0]
    names = set(json.loads(seen["RunOutput"]["Stdout"]))
    assert {"FROM_SPEC", "FROM_TASK"} <= names and not {n for n in names if n.startswith(("AWS_", "CODSPLAT_"))}


def test_a_system_error_fails_the_execution_and_the_orchestrator_places_it_again(standin):
    """pkg/compute/executor.go + pkg/executor/docker/handler.go: an ErrorMsg (an out-of-memory kill)
    fails the execution with ComputeState.Message, unpublished, without RunOutput.
    pkg/node/requester.go (FixedStrategy ShouldRetry) + ranking/previous_executions.go: the
    orchestrator places it again; a node that ran the job twice is unsuitable, so with one node the
    second failure fails the job (QueueTimeout 0)."""
    standin.knobs(oom_next=1)
    body = finished(standin.url, submit(standin.url, job("print('ok')", "oom-once")))
    first, second = body["Executions"]["Items"]
    assert first["ComputeState"]["StateType"] == 10 and first["ComputeState"]["Message"] == "memory limit exceeded"
    assert first["RunOutput"] is None and not first["PublishedResult"]
    assert second["NodeID"] == first["NodeID"] and second["RunOutput"]["ExitCode"] == 0
    assert body["Job"]["State"]["StateType"] == "Completed"

    standin.knobs(crash_next=2)
    body = finished(standin.url, submit(standin.url, job("print('ok')", "crash-twice")))
    assert [e["ComputeState"]["StateType"] for e in body["Executions"]["Items"]] == [10, 10]
    assert body["Job"]["State"]["StateType"] == "Failed"
    assert "job already executed on this node more than once" in body["Job"]["State"]["Message"]


def test_an_image_the_node_does_not_hold_is_pulled_only_without_a_private_registry(standin):
    """pkg/docker/docker.go PullImage (a held image is never pulled) and getAuthToken (credentials
    only from DOCKER_USERNAME/PASSWORD, only for names with fewer than two slashes): a private
    registry image the node does not hold fails to pull, a system error."""
    standin.knobs(nodes=[{"images": {"codsplat:held": None}}])
    ok = finished(standin.url, submit(standin.url, job("print('hi')", "held", image="codsplat:held")))
    assert ok["Job"]["State"]["StateType"] == "Completed"
    body = finished(standin.url, submit(standin.url, job("print('hi')", "private",
                                                         image="123456789012.dkr.ecr.us-east-1.amazonaws.com/codsplat:1")))
    assert body["Job"]["State"]["StateType"] == "Failed"
    assert all("authentication required" in e["ComputeState"]["Message"] for e in body["Executions"]["Items"])


def test_nodes_carry_pascal_case_gpus_automatic_labels_and_an_allocated_share(standin):
    """pkg/models/node_state.go, node_info.go, resource.go (models.GPU has no json tags);
    pkg/compute/capacity/labels.go (GPU-0 is the model with dashes, GPU-0-Memory "<MiB>-MiB");
    pkg/config/defaults.go (a node offers 80% of CPU, memory and disk, all its GPUs)."""
    [node] = httpx.get(f"{standin.url}/api/v1/orchestrator/nodes").json()["Nodes"]
    info = node["Info"]
    assert info["Labels"]["GPU-0"] == "NVIDIA-A10G" and info["Labels"]["GPU-0-Memory"] == "23028-MiB"
    [gpu] = info["ComputeNodeInfo"]["MaxCapacity"]["GPUs"]
    assert set(gpu) == {"Index", "Name", "Vendor", "Memory", "PCIAddress"} and gpu["Name"] == "NVIDIA A10G"
    capacity = info["ComputeNodeInfo"]["MaxCapacity"]
    assert capacity["CPU"] == pytest.approx(3.2) and capacity["Memory"] == int(16 * 2**30 * 0.8) and capacity["GPU"] == 1
    assert node["ConnectionState"]["Status"] == "CONNECTED" and node["Membership"] == "APPROVED"


def test_a_task_that_fits_no_node_waits_until_its_queue_timeout(standin):
    """ranking/max_usage.go (the task must fit MaxJobRequirements, the node's allocated share:
    pkg/node/compute.go) and scheduler/batch_service_job.go (no node: fail at once when QueueTimeout
    is 0, else wait Queued until the timeout counted from the job's creation, then fail)."""
    big = {"CPU": "8", "Memory": "4gb"}
    body = finished(standin.url, submit(standin.url, job("print(1)", "big-now", resources=big)))
    assert body["Job"]["State"]["StateType"] == "Failed" and not body["Executions"]["Items"]
    assert "not enough nodes" in body["Job"]["State"]["Message"]
    started = time.monotonic()
    body = finished(standin.url, submit(standin.url, job("print(1)", "big-wait", resources=big, queue_timeout=2)))
    assert body["Job"]["State"]["StateType"] == "Failed" and time.monotonic() - started >= 1.8
    assert "Queued" in [h["JobState"]["New"] for h in body["History"]["Items"] if "JobState" in h]
    # a node that can hold it joins before the timeout: the job is placed there and runs
    job_id = submit(standin.url, job("print(1)", "big-join", resources=big, queue_timeout=30))
    time.sleep(0.5)
    standin.knobs(nodes=[{}, {"id": "n-big", "cpu": 16, "memory_gib": 64, "gpus": []}])
    body = finished(standin.url, job_id)
    assert body["Job"]["State"]["StateType"] == "Completed" and body["Executions"]["Items"][0]["NodeID"] == "n-big"


def test_constraints_match_node_labels(standin):
    """ranking/labels.go: a job's Constraints must match the node's labels (GPU-0 = the model)."""
    h100 = [{"Key": "GPU-0", "Operator": "=", "Values": ["NVIDIA-H100"]}]
    a10g = [{"Key": "GPU-0", "Operator": "=", "Values": ["NVIDIA-A10G"]}]
    assert finished(standin.url, submit(standin.url, job("1", "h100", constraints=h100)))["Job"]["State"]["StateType"] == "Failed"
    assert finished(standin.url, submit(standin.url, job("1", "a10g", constraints=a10g)))["Job"]["State"]["StateType"] == "Completed"


def test_s3_inputs_land_relative_to_their_prefix_and_filters_see_the_relative_key(standin, s3):
    """pkg/storage/s3/storage.go: a key is downloaded to its base name; a prefix to paths relative
    to it; Filter is matched against the key without the prefix."""
    for key in ("conf/in/a/manifest.json", "conf/in/a/big.bin", "conf/in/b/manifest.json", "conf/one/clip.mp4"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    code = ("import os, sys; print(sorted(name + '/' + os.path.relpath(os.path.join(d, f), root) "
            "for name, root in zip('pk', sys.argv[1:]) for d, _, fs in os.walk(root) for f in fs))")
    sources = [{"Alias": "p", "Target": "/inputs/p", "Source": {"Type": "s3", "Params": {"Bucket": BUCKET, "Key": "conf/in/",
                                                                                      "Filter": r"manifest\.json$"}}},
               {"Alias": "k", "Target": "/inputs/k", "Source": {"Type": "s3", "Params": {"Bucket": BUCKET, "Key": "conf/one/clip.mp4"}}}]
    body = finished(standin.url, submit(standin.url, job(code, "inputs", args=("/inputs/p", "/inputs/k"), inputs=sources)))
    listed = body["Executions"]["Items"][0]["RunOutput"]["Stdout"]
    assert eval(listed) == ["k/clip.mp4", "p/a/manifest.json", "p/b/manifest.json"]  # noqa: S307 - our own print


def test_an_api_key_needs_the_capability_of_the_route(moto_server):
    """pkg/authz/api_key_authorizer.go + capabilities.go + pkg/publicapi/middleware/authz.go:
    no or an unknown key is 401; a known key without the route's capability is 403."""
    server = start_standin(moto_server.url, api_key="reader-key:read:job,read:node")
    try:
        url = server.url
        assert httpx.get(f"{url}/api/v1/orchestrator/jobs").status_code == 401
        assert httpx.get(f"{url}/api/v1/orchestrator/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        reader = {"Authorization": "Bearer reader-key"}
        assert httpx.get(f"{url}/api/v1/orchestrator/nodes", headers=reader).status_code == 200
        denied = httpx.put(f"{url}/api/v1/orchestrator/jobs", json={"Job": job("1", "x")}, headers=reader)
        assert denied.status_code == 403 and denied.json()["Code"] == "Forbidden"
        assert httpx.get(f"{url}/api/v1/agent/alive").status_code == 200  # an open route
    finally:
        server.stop()


def test_execution_states_are_numbered_as_the_server_version_numbers_them(moto_server):
    """pkg/models/execution.go: v1.6 inserted Running and Publishing, so Completed is 9 from
    v1.6 on and 7 before."""
    old = start_standin(moto_server.url, "--version", "1.5.2")
    try:
        body = finished(old.url, submit(old.url, job("print(1)", "v15")))
        assert body["Executions"]["Items"][0]["ComputeState"]["StateType"] == 7
    finally:
        old.stop()


def test_jobs_list_by_label_selector_newest_modified_first(standin):
    """pkg/publicapi/endpoint/orchestrator/job.go listJobs (labels as a k8s selector, order_by
    modified_at, reverse, next_token) and pkg/jobstore/boltdb/store.go (the orders it supports)."""
    ids = [submit(standin.url, job("print(1)", f"sel{i}", labels={"codsplat-job": f"j{i}"})) for i in range(3)]
    other = submit(standin.url, job("print(1)", "nolabel"))
    for job_id in (*ids, other):
        finished(standin.url, job_id)
    params = {"labels": "codsplat-job", "order_by": "modified_at", "reverse": "true", "limit": 2}
    first = httpx.get(f"{standin.url}/api/v1/orchestrator/jobs", params=params).json()
    rest = httpx.get(f"{standin.url}/api/v1/orchestrator/jobs", params={**params, "next_token": first["NextToken"]}).json()
    listed = first["Items"] + rest["Items"]
    assert sorted(j["ID"] for j in listed) == sorted(ids) and not rest["NextToken"]
    times = [j["ModifyTime"] for j in listed]
    assert times == sorted(times, reverse=True)
    one = httpx.get(f"{standin.url}/api/v1/orchestrator/jobs", params={"labels": "codsplat-job in (j1,j9)"}).json()["Items"]
    assert [j["ID"] for j in one] == [ids[1]]
    assert httpx.get(f"{standin.url}/api/v1/orchestrator/jobs", params={"order_by": "name"}).status_code == 400
