"""How the Bacalhau backend judges, without a server: how a finished job ended (`result_of`), when a
job waiting for a node will never run (`exhausted`), what a node offers against what a stage asks
(sizes as Bacalhau reads them), and which stages no node can hold, named with each node's shortfall.
test_bacalhau_client and test_bacalhau_e2e run the same against the stand-in node and a real one."""

from __future__ import annotations

import pytest

from codsplat.orchestrator.bacalhau import GPU, Capacity, Execution, ExecutionState, Job, JobState, Node
from codsplat.orchestrator.compute import Ending
from codsplat.orchestrator.executors.bacalhau import (Need, exhausted, needs, parse_cpu, parse_size, placement, result_of,
                                                      shortfall)
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.settings import Settings
from codsplat.pipeline.contract import outcome_line

E = ExecutionState


def execution(state, at=0, **kw) -> Execution:
    return Execution(f"e-{at}", "n1", state, create_time=at, **kw)


def job(state, *executions, message="") -> Job:
    return Job("j-1", "codsplat-x-all-a1", state, message, {}, {}, 0, executions=list(executions))


@pytest.mark.parametrize("text, size", [
    ("12gb", 12 * 10**9), ("12gib", 12 * 2**30), ("12GiB", 12 * 2**30), ("1.5gb", 1_500_000_000), ("500mb", 500 * 10**6),
    ("500mib", 500 * 2**20), ("2kb", 2000), ("2kib", 2048), ("1tb", 10**12), ("3 g", 3 * 10**9), ("100", 100),
    ("100b", 100), (" 7 GB ", 7 * 10**9), ("1eb", 10**18), ("2pib", 2 * 2**50),
])
def test_sizes_are_read_as_bacalhau_reads_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "gb", "12 parsecs", "-1gb", "1.2.3gb", "12xb"])
def test_a_size_bacalhau_would_not_read_is_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_cpu_is_read_in_cores_or_millicores():
    assert (parse_cpu("3"), parse_cpu("0.5"), parse_cpu("500m"), parse_cpu("2500m")) == (3.0, 0.5, 0.5, 2.5)


def node(node_id="n1", cpu=3.2, memory=12.8e9, disk=160e9, gpus=1, model="NVIDIA-A10G", connected=True, approved=True):
    labels = {"GPU-0": model} if model else {}
    return Node(node_id, labels, connected, approved, [GPU(model or "", 23028, "NVIDIA")] * gpus,
                Capacity(cpu, int(memory), int(disk), gpus), Capacity())


NEED = Need("all", 3.0, 12 * 10**9, 60 * 10**9, 1, "NVIDIA A10G")


def test_a_node_that_offers_at_least_what_a_stage_asks_holds_it():
    assert shortfall(NEED, node()) is None
    assert shortfall(NEED, node(cpu=3.0, memory=12e9, disk=60e9)) is None  # exactly what is asked is enough
    assert shortfall(Need("export", 2.0, 4 * 10**9, 20 * 10**9, 0, None), node(gpus=0, model=None)) is None


@pytest.mark.parametrize("change, said", [
    ({"cpu": 2.9}, "3 CPU asked, 2.9 offered"),
    ({"memory": 11.9e9}, "12.0 GB memory asked, 11.9 GB offered"),
    ({"disk": 59e9}, "60.0 GB disk asked, 59.0 GB offered"),
    ({"gpus": 0, "model": None}, "1 GPU asked, 0 offered; GPU NVIDIA-A10G asked, GPU-0 is none"),
    ({"model": "NVIDIA-T4"}, "GPU NVIDIA-A10G asked, GPU-0 is NVIDIA-T4"),
    ({"connected": False}, "not connected"),
    ({"approved": False}, "not approved"),
    ({"connected": False, "approved": False}, "not connected"),
])
def test_a_node_that_falls_short_says_by_what(change, said):
    assert shortfall(NEED, node(**change)) == said


def test_every_shortfall_of_a_node_is_named_and_two_gpus_are_plural():
    need = Need("train", 8.0, 64 * 10**9, 500 * 10**9, 2, None)
    assert shortfall(need, node()) == ("8 CPU asked, 3.2 offered; 64.0 GB memory asked, 12.8 GB offered; "
                                       "500.0 GB disk asked, 160.0 GB offered; 2 GPUs asked, 1 offered")


def test_each_stage_of_a_split_job_is_placed_on_its_own_and_only_stages_no_node_holds_are_refused():
    settings = Settings()
    split = parse_job({"version": 1, "id": "split-1", "input": "uploads/a.mp4", "compute": {"split_stages": True}},
                      settings.policy)
    asked = {n.stage: n for n in needs(split, settings)}
    assert list(asked) == ["preprocess", "train", "export"]
    assert (asked["preprocess"].gpus, asked["train"].gpus, asked["export"].gpus) == (0, 1, 0)
    assert asked["train"].gpu_model is None and asked["export"].memory == 4 * 10**9 and asked["preprocess"].cpu == 3.0
    cpu_node = node("cpu-1", gpus=0, model=None)
    fits, problems = placement(split, settings, [cpu_node, node("gpu-1")])
    assert fits == {"preprocess": ["cpu-1", "gpu-1"], "train": ["gpu-1"], "export": ["cpu-1", "gpu-1"]} and problems == []
    fits, problems = placement(split, settings, [cpu_node])
    assert fits["train"] == [] and problems == ["no Bacalhau node can hold the train stage (node cpu-1: 1 GPU asked, 0 offered)"]
    fits, problems = placement(split, settings, [])
    assert problems == [f"no Bacalhau node can hold the {s} stage (no compute node is connected)"
                        for s in ("preprocess", "train", "export")]
    pinned = parse_job({"version": 1, "id": "pinned-1", "input": "uploads/a.mp4",
                        "compute": {"gpu_model": "NVIDIA-L4"}}, settings.policy)
    [need] = needs(pinned, settings)
    assert (need.stage, need.gpus, need.gpu_model, need.disk) == ("all", 1, "NVIDIA-L4", 60 * 10**9)
    _, problems = placement(pinned, settings, [node("a"), node("b", model="NVIDIA-L4", memory=8e9)])
    assert problems == ["no Bacalhau node can hold the all stage (node a: GPU NVIDIA-L4 asked, GPU-0 is NVIDIA-A10G; "
                        "node b: 12.0 GB memory asked, 8.0 GB offered)"]


def test_a_completed_job_ends_as_its_last_completed_execution_s_exit_says():
    failed_first = execution(E.FAILED, 1, message="node lost")
    ok = execution(E.COMPLETED, 3, exit_code=0, stdout=outcome_line({"ok": True, "psnr": 25.0}))
    older = execution(E.COMPLETED, 2, exit_code=1, stderr="crashed")
    result = result_of(job(JobState.COMPLETED, failed_first, ok, older))
    assert result.ending is Ending.SUCCEEDED and result.summary == {"ok": True, "psnr": 25.0} and result.executions == 3

    refused = execution(E.COMPLETED, 1, exit_code=2, stdout=outcome_line(
        {"ok": False, "exit_code": 2, "stage": "frames", "message": "Input a.mp4 has only 1 frame"}))
    result = result_of(job(JobState.COMPLETED, refused))
    assert (result.ending, result.exit_code, result.stage, result.message) == (
        Ending.USER_ERROR, 2, "frames", "Input a.mp4 has only 1 frame")

    said = execution(E.COMPLETED, 1, exit_code=139, stderr="loading\nerror: CUDA out of memory\nerror: retrying on the CPU\nerror: gave up\ntrailing")
    result = result_of(job(JobState.COMPLETED, said))
    assert result.ending is Ending.CRASHED and result.message == "gave up"  # the last `error: ` line of its stderr
    quiet = execution(E.COMPLETED, 1, exit_code=137, stderr="  " + "x" * 600 + "  ")
    assert result_of(job(JobState.COMPLETED, quiet)).message == "x" * 500  # otherwise its stderr, cut

    result = result_of(job(JobState.COMPLETED, execution(E.FAILED, 1), execution(E.CANCELLED, 2)))
    assert result.ending is Ending.CRASHED and "without a completed execution" in result.message and result.executions == 1


def test_a_job_that_failed_ends_as_its_last_failed_execution_or_as_never_placed():
    first, last = execution(E.FAILED, 5, message="image pull failed"), execution(E.FAILED, 9, message="OOM killed")
    result = result_of(job(JobState.FAILED, last, first, execution(E.CANCELLED, 7), message="job failed"))
    assert (result.ending, result.message, result.executions) == (Ending.CRASHED, "OOM killed", 2)
    result = result_of(job(JobState.FAILED, execution(E.FAILED, 1), message="retries exhausted"))
    assert result.message == "retries exhausted"  # an execution that says nothing: the job's own message
    assert result_of(job(JobState.FAILED, execution(E.FAILED, 1))).message == "the execution failed"
    result = result_of(job(JobState.FAILED, execution(E.BID_REJECTED, 1), message="no node matched the constraints"))
    assert (result.ending, result.message, result.executions) == (Ending.CANNOT_RUN, "no node matched the constraints", 0)
    assert result_of(job(JobState.FAILED)).message == "no node accepted the job"
    stopped = result_of(job(JobState.STOPPED, execution(E.CANCELLED, 1), message="cancelled by the user"))
    assert (stopped.ending, stopped.message, stopped.executions) == (Ending.STOPPED, "cancelled by the user", 0)


@pytest.mark.parametrize("state, executions, allowed, ended", [
    (JobState.QUEUED, [E.FAILED, E.FAILED], 2, True),  # every node that would take it failed it: it waits for ever
    (JobState.PENDING, [E.FAILED, E.FAILED, E.CANCELLED], 2, True),
    (JobState.QUEUED, [E.FAILED], 2, False),  # a retry is still allowed
    (JobState.QUEUED, [E.FAILED, E.FAILED, E.RUNNING], 2, False),  # one still runs
    (JobState.QUEUED, [E.FAILED, E.FAILED, E.BID_ACCEPTED], 2, False),
    (JobState.RUNNING, [E.FAILED, E.FAILED], 2, False),  # not waiting for a node
    (JobState.QUEUED, [E.FAILED, E.FAILED, E.ASK_FOR_BID_REJECTED, E.BID_REJECTED, E.COMPLETED], 2, True),
    (JobState.QUEUED, [], 1, False),
])
def test_a_waiting_job_is_exhausted_only_when_its_failures_are_used_up_and_nothing_runs(state, executions, allowed, ended):
    assert exhausted(job(state, *(execution(s, i) for i, s in enumerate(executions))), allowed) is ended
