"""The fallback backend (orchestrator/executors/sagemaker.py) on its own, against moto's Step
Functions and SageMaker: what an execution is given, that starting an attempt twice starts it once,
finding an attempt a dead daemon started, which ends of an execution mean the record was never
written, and a stop. test_fallback runs the real state machine end to end, slower."""

from __future__ import annotations

import json
import time

import boto3
import httpx
import pytest

from codsplat.orchestrator.compute import Attempt, CannotRun
from codsplat.orchestrator.executors.sagemaker import POLL_GROWTH, SageMakerExecutor, history_events
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.settings import Settings
from codsplat.pipeline.contract import OUTCOME_FILE, decode_settings

ROLE = "arn:aws:iam::123456789012:role/codsplat-sfn"


@pytest.fixture
def rig(moto_server):
    client = lambda s: boto3.client(s, endpoint_url=moto_server.url, region_name="us-east-1")  # noqa: E731
    sfn, sm = client("stepfunctions"), client("sagemaker")

    def machine(states: dict) -> str:
        name = f"m{time.time_ns() % 10**12}"
        definition = {"StartAt": next(iter(states)), "States": states}
        return sfn.create_state_machine(name=name, definition=json.dumps(definition), roleArn=ROLE)["stateMachineArn"]

    def deploy(states: dict) -> tuple[SageMakerExecutor, object, object]:
        """The backend on a state machine of `states`, with the Step Functions and SageMaker clients."""
        config = Settings(bucket="codsplat-data", table="codsplat-jobs", topic_arn="arn:aws:sns:us-east-1:123456789012:t",
                          state_machine_arn=machine(states), aws_endpoint=moto_server.url)
        return SageMakerExecutor(sfn, sm, config), sfn, sm

    return deploy


def job(job_id="fb-job", **doc):
    return parse_job({"version": 1, "id": job_id, "input": "s3://codsplat-data/uploads/clip.mp4",
                      "notify": {"email": ["u@example.com"]}, **doc}, Settings(bucket="codsplat-data").policy)


WAITS = {"Wait": {"Type": "Wait", "Seconds": 600, "End": True}}


def test_an_execution_is_given_the_whole_job_its_limits_and_where_its_outcome_goes():
    settings = Settings(bucket="codsplat-data", table="tbl", topic_arn="arn:t", fallback_poll_seconds=20, max_runtime_minutes=60,
                        fallback_quota_tries=7, fallback_quota_wait_seconds=90, fallback_follow_misses=4, record_days=30)
    document = job(compute={"max_runtime_minutes": 40, "sagemaker_instance_type": "ml.g5.2xlarge"})
    before = int(time.time())
    given = SageMakerExecutor(None, None, settings).execution_input(document, Attempt("sagemaker", "all", 1, "fb-job-sm-a1"))
    assert given["job_id"] == "fb-job" and given["training_job_name"] == "fb-job-sm-a1"
    assert given["instance_type"] == "ml.g5.2xlarge" and given["max_runtime_seconds"] == 40 * 60 * 3  # three stages in one
    assert given["input_s3_uri"] == "s3://codsplat-data/uploads/clip.mp4"
    assert given["output_s3_uri"] == "s3://codsplat-data/results/fb-job/"
    assert given["model_s3_uri"] == "s3://codsplat-data/results/fb-job/sagemaker/"
    assert given["bucket"] == "codsplat-data" and given["outcome_key"] == f"results/fb-job/{OUTCOME_FILE}"
    assert given["hyperparameters"]["stage"] == "all"
    assert decode_settings(given["hyperparameters"]["settings"], "hyperparameters")["train"]["device"] == "cuda"
    assert (given["table"], given["topic_arn"], json.loads(given["recipient"])) == ("tbl", "arn:t", ["u@example.com"])
    expires = int(given["expires_at"]) - before - 40 * 60 * 3 - 30 * 86400
    assert 0 <= expires <= 5  # the record outlives the run by record_days
    assert given["poll"] == {"wait": 20, "step": 20, "cap": 20 * POLL_GROWTH}
    assert given["quota"] == {"left": 7, "wait": 90} and given["follow"] == {"left": 4, "budget": 4}
    assert set(given["advice"]) == {"quota", "time_limit", "stopped", "start", "reused"}
    assert "ml.g5.2xlarge" in given["advice"]["quota"] and "up to" in given["advice"]["time_limit"]
    unnamed = job(notify={})
    given = SageMakerExecutor(None, None, settings).execution_input(unnamed, Attempt("sagemaker", "all", 1, "x-sm-a1"))
    assert json.loads(given["recipient"]) == ["-"]  # the state machine's message goes to no one


def test_starting_an_attempt_twice_starts_one_execution_which_a_restarted_daemon_finds(rig):
    executor, sfn, _ = rig(WAITS)
    attempt = Attempt("sagemaker", "all", 1, "fb-job-sm-a1")
    assert executor.find(job(), attempt) is False and attempt.remote_id is None
    executor.submit(job(), attempt, {})
    arn = attempt.remote_id
    assert arn.endswith(":fb-job-sm-a1") and ":execution:" in arn
    assert attempt.published == "s3://codsplat-data/results/fb-job/"
    again = Attempt("sagemaker", "all", 1, "fb-job-sm-a1")
    executor.submit(job(), again, {})  # a daemon that died after starting it, before recording so
    assert again.remote_id == arn
    assert executor.finishes_record  # the state machine writes the record's end and sends the message, not the daemon
    executions = sfn.list_executions(stateMachineArn=executor.settings.state_machine_arn)["executions"]
    assert [e["name"] for e in executions] == ["fb-job-sm-a1"]
    found = Attempt("sagemaker", "all", 1, "fb-job-sm-a1")
    assert executor.find(job(), found) is True and found.remote_id == arn
    started = json.loads(sfn.describe_execution(executionArn=arn)["input"])
    assert started == executor.execution_input(job(), attempt) | {"expires_at": started["expires_at"]}


def test_an_execution_that_cannot_start_makes_the_backend_unable_to_run_the_job(rig, moto_server):
    executor, _, _ = rig(WAITS)
    gone = executor.settings.state_machine_arn.replace(":stateMachine:m", ":stateMachine:gone")
    broken = SageMakerExecutor(executor.sfn, executor.sagemaker, executor.settings.model_copy(update={"state_machine_arn": gone}))
    with pytest.raises(CannotRun, match="the SageMaker fallback could not be started") as caught:
        broken.submit(job(), Attempt("sagemaker", "all", 1, "fb-job-sm-a1"), {})
    assert caught.value.stage == "all"


def test_only_an_execution_that_failed_timed_out_or_was_aborted_left_its_record_unwritten(rig):
    executor, sfn, _ = rig({"Fail": {"Type": "Fail", "Error": "Codsplat.EndNotWritten", "Cause": "history limit " + "x" * 400}})
    attempt = Attempt("sagemaker", "all", 1, "failed-sm-a1")
    executor.submit(job("failed"), attempt, {})
    for _ in range(100):
        if sfn.describe_execution(executionArn=attempt.remote_id)["status"] != "RUNNING":
            break
        time.sleep(0.1)
    said = executor.abandoned(attempt)
    assert said.startswith("failed (Codsplat.EndNotWritten: history limit xxx") and len(said) == len("failed ()") + 300
    # an attempt recorded before its execution's id was (a daemon that died between the two): found by its name
    assert executor.abandoned(Attempt("sagemaker", "all", 1, "failed-sm-a1")) == said

    waiting, sfn, _ = rig(WAITS)
    attempt = Attempt("sagemaker", "all", 1, "waits-sm-a1")
    waiting.submit(job("waits"), attempt, {})
    assert waiting.abandoned(attempt) is None  # still running: it will write the record itself
    sfn.stop_execution(executionArn=attempt.remote_id)
    assert waiting.abandoned(attempt) == "aborted"
    unknown = Attempt("sagemaker", "all", 1, "never-sm-a1")  # no execution of that name: not proof of anything
    assert waiting.abandoned(unknown) is None

    done, sfn, _ = rig({"Done": {"Type": "Succeed"}})
    attempt = Attempt("sagemaker", "all", 1, "done-sm-a1")
    done.submit(job("done"), attempt, {})
    time.sleep(0.5)
    assert done.abandoned(attempt) is None  # it succeeded: it wrote the record


def test_a_stop_stops_the_training_job_and_one_not_made_yet_or_ended_is_no_error(rig, moto_server):
    executor, _, sm = rig(WAITS)
    sm.create_training_job(
        TrainingJobName="stop-sm-a1", AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
        RoleArn=ROLE, OutputDataConfig={"S3OutputPath": "s3://codsplat-data/x/"},
        ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
        StoppingCondition={"MaxRuntimeInSeconds": 60})
    # running (moto marks a job Completed at once; its launcher's control port moves it back)
    assert httpx.post(f"{moto_server.control}/training-job", json={"name": "stop-sm-a1", "status": "InProgress"}).status_code == 200
    executor.stop(Attempt("sagemaker", "all", 1, "stop-sm-a1"), "cancelled")
    assert sm.describe_training_job(TrainingJobName="stop-sm-a1")["TrainingJobStatus"] == "Stopped"
    executor.stop(Attempt("sagemaker", "all", 1, "stop-sm-a1"), "cancelled")  # ended: SageMaker refuses, nothing to do
    executor.stop(Attempt("sagemaker", "all", 1, "unmade-sm-a1"), "cancelled")


def test_each_kind_of_state_adds_to_an_execution_s_history_what_step_functions_records(rig):
    """history_events, which bounds how long the fallback can follow a job, against an execution's own
    history: a Task (an AWS SDK call, as the fallback's are), a Wait, a Choice and a Pass."""
    executor, sfn, _ = rig({
        "Pass": {"Type": "Pass", "Next": "Wait"},
        "Wait": {"Type": "Wait", "Seconds": 0, "Next": "Task"},
        # listQueues answers in strings only: moto cannot put listBuckets' dates into an execution's output
        "Task": {"Type": "Task", "Resource": "arn:aws:states:::aws-sdk:sqs:listQueues", "Parameters": {}, "Next": "Choice"},
        "Choice": {"Type": "Choice", "Choices": [{"Variable": "$.QueueUrls", "IsPresent": True, "Next": "Done"}],
                   "Default": "Done"},
        "Done": {"Type": "Succeed"}})
    arn = sfn.start_execution(stateMachineArn=executor.settings.state_machine_arn, name="count", input="{}")["executionArn"]
    for _ in range(100):
        if sfn.describe_execution(executionArn=arn)["status"] != "RUNNING":
            break
        time.sleep(0.1)
    assert sfn.describe_execution(executionArn=arn)["status"] == "SUCCEEDED"
    counted, current = {}, None
    for event in sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]:
        kind = event["type"]
        if kind.endswith("StateEntered"):
            current = kind[: -len("StateEntered")]
            counted[current] = 0
        if current:
            counted[current] += 1
        if kind.endswith("StateExited"):
            current = None
    assert counted == {kind: history_events({"Type": kind}) for kind in ("Pass", "Wait", "Task", "Choice", "Succeed")}
