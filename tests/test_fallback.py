"""The SageMaker fallback: the state machine (orchestrator/fallback.asl.json, the file the CDK stack
deploys) executed by moto, with SageMaker steered to every way a training job can end. Each
scenario starts from a RUNNING record, as the daemon leaves it when it hands a job over, and is
started by the daemon's own executor; all run at once, and each row of the table is its own test:
the record's end, the messages sent, the training jobs created."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import boto3
import httpx
import pytest

from codsplat.orchestrator.compute import Attempt, attempt_name
from codsplat.orchestrator.executors.sagemaker import (AROUND_THE_LOOP, ASL_PATH, HISTORY_LIMIT, POLL_GROWTH,
                                                      SageMakerExecutor, history_events, longest_followed_seconds)
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.provision import provision
from codsplat.orchestrator.records import FAILED, RUNNING, DynamoStore, JobRecord, change
from codsplat.orchestrator.settings import SAGEMAKER_OVERHEAD_SECONDS, Settings
from codsplat.pipeline.contract import ADVICE, failure_text
from conftest import AWS_ENV
from conftest import sagemaker_did_its_work


@dataclass
class Scenario:
    state: str  # the record's end
    words: str  # in the message
    training_jobs: int = 1  # created in SageMaker
    messages: int = 1  # sent by the state machine
    drive: Callable | None = None  # what happens to the training job, given (rig, name)
    before: Callable | None = None  # before the execution starts
    checks: list[Callable] = field(default_factory=list)  # (record, message) -> None
    settings: dict = field(default_factory=dict)  # the deployment's, for this job's execution


def status(rig, name, to, **extra):
    """Move a training job once it exists (the control port of tests/moto_launcher.py)."""
    for _ in range(300):
        if httpx.post(f"{rig.control}/training-job", json={"name": name, "status": to, **extra}).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} was never created")


def worker_did_its_work(rig, job_id):
    sagemaker_did_its_work(rig.s3, rig.bucket, job_id)


def cancel(rig, name, job_id, stop_to=None):
    """As a user cancels a handed-over job: once its training job exists, `codsplat jobs cancel`."""
    if stop_to:
        httpx.post(f"{rig.control}/steer", json={"stop_to": {name: stop_to}})
    created(rig, name)
    cancel_as_a_user(rig, job_id)
    if stop_to:
        time.sleep(2)  # a few polls see it Stopping
        status(rig, name, "Stopped", secondary="Stopped")


def created(rig, name):
    """Once the state machine has created the training job (a fixed wait raced a slow machine)."""
    for _ in range(600):
        if rig.sm.list_training_jobs(NameContains=name)["TrainingJobSummaries"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} was never created")


def cancel_as_a_user(rig, job_id):
    """`codsplat jobs cancel` marks the record (the CLI, in its own process, on the deployment's
    settings); then a daemon's sweep, which reads the mark, stops what runs for it."""
    done = subprocess.run([sys.executable, "-m", "codsplat.orchestrator.cli", "jobs", "cancel", job_id,
                           "--settings", str(rig.settings_file)], env={**os.environ, **AWS_ENV}, capture_output=True, text=True)
    assert done.returncode == 0 and "cancel requested" in done.stderr, done.stderr
    rig.daemon().sweep()


def succeeded_like_bacalhau(record, message):
    result = record.result
    assert result["metrics"] == {"psnr": 27.5, "ssim": 0.91, "gaussians": 48_000} and result["device"] == "cuda"
    assert result["outputs"] == [f"results/{record.job_id}/export/{f}"
                                 for f in ("splat.ply", "splat.spz", "metrics.json", "report.html", "cameras.json")]
    assert result["gpu_seconds"] == 600.0 and result["estimated_cost_usd"] > 0 and result["backend"] == "sagemaker"


def advice_of(kind):
    return lambda record, message: (record.error["advice"] == ADVICE[kind] and ADVICE[kind] in message["Message"]) or \
        pytest.fail(f"advice: {record.error}")


SCENARIOS = {
    "completed": Scenario("SUCCEEDED", "is ready", drive=lambda rig, n, j: status(rig, n, "Completed"),
                          before=worker_did_its_work, checks=[succeeded_like_bacalhau]),
    "outputs-synced-after-completed": Scenario(  # the checkpoint sync lands a few seconds after the status reads Completed
        "SUCCEEDED", "is ready", drive=lambda rig, n, j: (status(rig, n, "Completed"), time.sleep(8), worker_did_its_work(rig, j))),
    "completed-without-outputs": Scenario("FAILED", "outputs are missing", drive=lambda rig, n, j: status(rig, n, "Completed")),
    "worker-refused-the-input": Scenario(
        "FAILED", "is not a readable video", checks=[advice_of("input"),
                                                      lambda r, m: r.error["exit_code"] == 2 or pytest.fail(r.error)],
        drive=lambda rig, n, j: status(rig, n, "Failed", reason="AlgorithmError: " + failure_text(
            "Input clip.mp4 is not a readable video (Invalid data found when processing input).", 2))),
    "out-of-memory": Scenario("FAILED", "OutOfMemory", drive=lambda rig, n, j: status(
        rig, n, "Failed", reason="OutOfMemoryError: Please use an instance type with more memory")),
    "time-limit": Scenario("FAILED", "ran past its time limit", drive=lambda rig, n, j: status(
        rig, n, "Stopped", secondary="MaxRuntimeExceeded"), checks=[lambda r, m: "max_runtime_minutes" in r.error["advice"]]),
    "cancelled": Scenario("CANCELLED", "was cancelled", drive=lambda rig, n, j: cancel(rig, n, j)),
    "cancelled-while-stopping": Scenario("CANCELLED", "was cancelled",
                                         drive=lambda rig, n, j: cancel(rig, n, j, stop_to="Stopping")),
    "stopped-elsewhere": Scenario("FAILED", "stopped outside codsplat", drive=lambda rig, n, j: (
        created(rig, n), rig.sm.stop_training_job(TrainingJobName=n))),
    "quota-then-room": Scenario("SUCCEEDED", "is ready", before=lambda rig, j: (
        worker_did_its_work(rig, j), httpx.post(f"{rig.control}/steer", json={"create_errors": {rig.name(j): 2}})),
        drive=lambda rig, n, j: status(rig, n, "Completed")),
    "cancelled-while-waiting-for-quota": Scenario(  # no training job to stop: the wait reads the record's flag
        "CANCELLED", "was cancelled", training_jobs=0, before=lambda rig, j: httpx.post(
            f"{rig.control}/steer", json={"create_errors": {rig.name(j): 9}}),
        settings={"fallback_quota_tries": 120},  # waiting for as long as it takes the user to cancel
        drive=lambda rig, n, j: (time.sleep(1.5), cancel_as_a_user(rig, j))),
    "no-quota": Scenario("FAILED", "no quota for ml.g5.2xlarge", training_jobs=0, before=lambda rig, j: httpx.post(
        f"{rig.control}/steer", json={"create_errors": {rig.name(j): 9}}),
        checks=[lambda r, m: "Service Quotas" in r.error["advice"] and "Service Quotas" in m["Message"]]),
    "reply-lost-after-create": Scenario(  # created by a try whose reply never came: ResourceInUse now, and ours
        "SUCCEEDED", "is ready", before=lambda rig, j: (worker_did_its_work(rig, j), httpx.post(
            f"{rig.control}/steer", json={"lose_create_reply": {rig.name(j): 1}})),
        drive=lambda rig, n, j: (time.sleep(2), status(rig, n, "Completed"))),
    "end-write-throttled": Scenario(  # DynamoDB says no to the end write, under a name no retrier lists: tried again
        "SUCCEEDED", "is ready", before=lambda rig, j: (worker_did_its_work(rig, j), httpx.post(
            f"{rig.control}/steer", json={"update_errors": {j: 3}})), drive=lambda rig, n, j: status(rig, n, "Completed")),
    "ended-elsewhere": Scenario(  # another writer ended the record first (the daemon's sweep, say): its end stands
        "FAILED", "", messages=0, drive=lambda rig, n, j: (
            status(rig, n, "InProgress"), change(rig.store, j, lambda r: setattr(r, "error", {"message": "ended elsewhere"}),
                                                 to=FAILED, stage="sagemaker"),
            worker_did_its_work(rig, j), status(rig, n, "Completed")),
        checks=[lambda r, m: r.error == {"message": "ended elsewhere"} and not r.result or pytest.fail(str(r.error))]),
    "id-used-again": Scenario(  # a training job of that name from an earlier job (its record expired): left alone
        "FAILED", "exists already", before=lambda rig, j: (worker_did_its_work(rig, j), rig.create_training_job(j)),
        checks=[lambda r, m: "an id of its own" in r.error["advice"] + m["Message"] or pytest.fail(str(r.error)),
                lambda r, m: not (r.result or {}).get("outputs") or pytest.fail(str(r.result))]),
    "blips-between-good-looks": Scenario(  # two failed looks (each after its retries), a good one between: not lost
        "SUCCEEDED", "is ready", before=lambda rig, j: (worker_did_its_work(rig, j), httpx.post(
            f"{rig.control}/steer", json={"describe_errors": {rig.name(j): ([True] * 4 + [False]) * 2}})),
        drive=lambda rig, n, j: (time.sleep(40), status(rig, n, "Completed"))),
    "lost-sight-of-it": Scenario("FAILED", "could not follow", training_jobs=0,  # SageMaker no longer knows it
                                 drive=lambda rig, n, j: status(rig, n, "gone")),
}


RUNTIME = 10  # minutes a stage may run: the rig polls every second, which follows a job for about 1.7 h


class Rig:
    def __init__(self, moto_server):
        self.control = moto_server.control
        prefix = f"fb{time.time_ns() % 10**9}"
        names = provision(boto3.Session(), prefix, endpoint=moto_server.url)
        client = lambda s: boto3.client(s, endpoint_url=moto_server.url, region_name="us-east-1")  # noqa: E731
        self.s3, self.sm, self.sqs, self.sfn = client("s3"), client("sagemaker"), client("sqs"), client("stepfunctions")
        self.bucket = names["bucket"]
        self.mailbox = self.sqs.create_queue(QueueName=f"{prefix}-mail")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.mailbox, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        client("sns").subscribe(TopicArn=names["topic_arn"], Protocol="sqs", Endpoint=arn)
        self.settings = Settings(bucket=names["bucket"], table=names["table"], topic_arn=names["topic_arn"],
                                 state_machine_arn=names["state_machine_arn"], aws_endpoint=moto_server.url,
                                 fallback_poll_seconds=1, fallback_quota_wait_seconds=1, fallback_quota_tries=3,
                                 fallback_follow_misses=1, max_runtime_minutes=RUNTIME)  # a 1 s poll follows ~1.7 h
        self.store = DynamoStore(names["table"], client("dynamodb"), self.settings)
        self.executor = SageMakerExecutor(self.sfn, self.sm, self.settings)
        self.jobs = {}
        self.home = Path(tempfile.mkdtemp(prefix="codsplat-fallback-"))
        self.settings_file = self.home / "settings.json"
        self.settings_file.write_text(json.dumps({k: getattr(self.settings, k) for k in (
            "bucket", "table", "topic_arn", "state_machine_arn", "aws_endpoint")}))

    def daemon(self):
        """A daemon of this deployment, as far as its sweep goes (nothing of it runs by itself)."""
        from codsplat.orchestrator.blobs import FolderBlobs
        from codsplat.orchestrator.lifecycle import Lifecycle
        from codsplat.orchestrator.notify import FileNotifier

        return Lifecycle(self.store, FolderBlobs(self.home), FileNotifier(self.home / "sent"), {"sagemaker": self.executor},
                         self.settings, self.settings.policy, "bacalhau", "sagemaker", schedule=lambda fn, *a, delay=0.0: None)

    def name(self, job_id):
        return attempt_name(job_id, "sm", 1)

    def create_training_job(self, job_id):
        self.sm.create_training_job(
            TrainingJobName=self.name(job_id), AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
            RoleArn="arn:aws:iam::123456789012:role/x", OutputDataConfig={"S3OutputPath": f"s3://{self.bucket}/x/"},
            ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
            StoppingCondition={"MaxRuntimeInSeconds": 60},
            Environment={"CODSPLAT_EXECUTION_STARTED": "2025-01-01T00:00:00.000Z"})  # an earlier execution's

    def start(self, job_id, **settings):
        job = parse_job({"version": 1, "id": job_id, "input": f"s3://{self.bucket}/uploads/{job_id}.mp4",
                         "compute": {"max_runtime_minutes": RUNTIME}, "notify": {"email": [f"{job_id}@example.com"]}},
                        self.settings.policy)
        attempt = Attempt(backend="sagemaker", stage="all", number=1, name=self.name(job_id))
        record = JobRecord(job_id, f"jobs/{job_id}.json", state=RUNNING, backend="sagemaker", attempts=[attempt.to_dict()],
                           output=str(job.output_uri(self.settings.policy)), notify=job.notify.email)
        assert self.store.create(record)
        executor = SageMakerExecutor(self.sfn, self.sm, self.settings.model_copy(update=settings)) if settings else self.executor
        executor.submit(job, attempt, {})
        self.jobs[job_id] = attempt.remote_id

    def ended(self):
        return all(self.sfn.describe_execution(executionArn=a)["status"] != "RUNNING" for a in self.jobs.values())

    def mail(self):
        out = {}
        while got := self.sqs.receive_message(QueueUrl=self.mailbox, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages"):
            for m in got:
                body = json.loads(m["Body"])
                out.setdefault(body["MessageAttributes"]["job_id"]["Value"], []).append(body)
                self.sqs.delete_message(QueueUrl=self.mailbox, ReceiptHandle=m["ReceiptHandle"])
        return out


@pytest.fixture(scope="module")
def ended(moto_server):
    rig = Rig(moto_server)
    httpx.post(f"{rig.control}/steer", json={"initial_status": "InProgress"})
    try:
        for job_id, scenario in SCENARIOS.items():
            if scenario.before:
                scenario.before(rig, job_id)
        drivers = [threading.Thread(target=s.drive, args=(rig, rig.name(j), j), daemon=True)
                   for j, s in SCENARIOS.items() if s.drive]
        for job_id, scenario in SCENARIOS.items():
            rig.start(job_id, **scenario.settings)
        for driver in drivers:
            driver.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not rig.ended():
            time.sleep(1)
    finally:
        httpx.post(f"{rig.control}/steer", json={"initial_status": "Completed"})
    mail = rig.mail()
    created = {j: len(rig.sm.list_training_jobs(NameContains=rig.name(j))["TrainingJobSummaries"]) for j in SCENARIOS}
    return rig, mail, created


@pytest.mark.parametrize("job_id", list(SCENARIOS))
def test_every_end_is_recorded_and_told_once(ended, job_id):
    rig, mail, created = ended
    scenario = SCENARIOS[job_id]
    execution = rig.sfn.describe_execution(executionArn=rig.jobs[job_id])
    assert execution["status"] == "SUCCEEDED", execution.get("error") or execution
    record = rig.store.get(job_id)
    assert record.state == scenario.state, record.error
    assert created[job_id] == scenario.training_jobs
    assert len(mail.get(job_id, [])) == scenario.messages
    if not scenario.messages:
        for check in scenario.checks:
            check(record, None)
        return
    [message] = mail[job_id]
    assert (record.state, message["MessageAttributes"]["status"]["Value"]) == (scenario.state, scenario.state)
    assert scenario.words in message["Message"], message["Message"]
    assert record.notified_at and record.notify_claimed_by == "fallback" and record.stage == "sagemaker"
    item = rig.store.client.get_item(TableName=rig.store.table, Key={"job_id": {"S": job_id}})["Item"]
    assert int(item["expires_at"]["N"]) > time.time() + 364 * 86400  # the record's TTL, as the daemon sets it
    if scenario.state == "FAILED":
        assert record.error["message"] and record.error["advice"] and scenario.words in record.error["message"] + message["Message"]
    for check in scenario.checks:
        check(record, message)


def test_training_jobs_run_isolated_from_the_network_under_the_job_s_time_limit(ended):
    rig, _, _ = ended
    described = rig.sm.describe_training_job(TrainingJobName=rig.name("completed"))
    assert described["EnableNetworkIsolation"] is True
    assert described["StoppingCondition"]["MaxRuntimeInSeconds"] == RUNTIME * 60 * 3
    assert described["CheckpointConfig"]["S3Uri"] == f"s3://{rig.bucket}/results/completed/"


def events_to_follow(poll: dict, seconds: float) -> tuple[int, float]:
    """Walk the polling loop of the ASL as an execution would, from its first interval `poll` (wait,
    step, cap), every look the longer way round, until `seconds` have passed: (events, seconds passed)."""
    states = json.loads(ASL_PATH.read_text())["States"]
    assert states["Wait"]["Next"] == "DescribeTrainingJob" and states["DescribeTrainingJob"]["Next"] == "Ended?"
    assert states["Ended?"]["Default"] == "Looked" and states["Looked"]["Next"] == "Slower?"
    assert states["Slower?"]["Default"] == "Wait" and states["MissedOne"]["Next"] == "Wait"
    # a look that failed after its retries (three events each) takes the other way round, and any look may
    look = max(sum(history_events(states[s]) for s in ("Wait", "DescribeTrainingJob", "Ended?", "Looked", "Slower?")),
               sum(history_events(states[s]) for s in ("Wait", "DescribeTrainingJob", "KeepFollowing?", "MissedOne"))
               + 3 * states["DescribeTrainingJob"]["Retry"][0]["MaxAttempts"])
    poll, elapsed, events = dict(poll), 0, AROUND_THE_LOOP
    while elapsed < seconds:
        elapsed, events = elapsed + poll["wait"], events + look
        if poll["wait"] < poll["cap"]:  # Slower
            poll["wait"], events = poll["wait"] + poll["step"], events + history_events(states["Slower"])
    return events, elapsed


def test_the_longest_allowed_job_stays_inside_the_execution_history_limit():
    """The longest job the default settings allow plus SageMaker's hour, followed with the intervals the
    daemon hands the execution (execution_input's poll: read, not assumed): under 25,000 events."""
    longest_followed_seconds.cache_clear()  # computed here, not remembered from another test
    settings = Settings(bucket="codsplat-data", state_machine_arn="arn:aws:states:us-east-1:1:stateMachine:m")
    job = parse_job({"version": 1, "id": "long", "input": "s3://codsplat-data/uploads/a.mp4",
                     "compute": {"max_runtime_minutes": settings.max_runtime_minutes}}, settings.policy)
    given = SageMakerExecutor(None, None, settings).execution_input(job, Attempt("sagemaker", "all", 1, "long-sm-1"))
    events, elapsed = events_to_follow(given["poll"], given["max_runtime_seconds"] + SAGEMAKER_OVERHEAD_SECONDS)
    print(f"{events} events for {elapsed / 3600:.0f} h; the code's bound: {longest_followed_seconds(settings.fallback_poll_seconds) / 3600:.0f} h")
    assert events <= HISTORY_LIMIT
    assert longest_followed_seconds(settings.fallback_poll_seconds) >= elapsed - given["poll"]["cap"]


@pytest.mark.parametrize("poll", [1, 7, 20, 60, 300])
def test_the_longest_job_the_fallback_says_it_can_follow_fits_the_history_and_a_little_longer_would_not(poll):
    """The bound settings validation trusts, against a walk of the ASL: following a job that long stays
    inside the 25,000 events, and following it one longest interval longer does not."""
    longest_followed_seconds.cache_clear()
    longest = longest_followed_seconds(poll)
    intervals = {"wait": poll, "step": poll, "cap": poll * POLL_GROWTH}
    assert events_to_follow(intervals, longest)[0] <= HISTORY_LIMIT
    assert events_to_follow(intervals, longest + poll * POLL_GROWTH)[0] > HISTORY_LIMIT


@pytest.mark.parametrize("minutes", [10, 24 * 60, 3 * 24 * 60])
def test_a_poll_interval_that_cannot_follow_the_longest_job_is_refused_naming_the_least_that_can(minutes):
    """Too short a first interval for the deployment's longest job would end the execution at the history
    limit and leave the record RUNNING: the settings are refused, naming the least interval that fits."""
    from codsplat.orchestrator.settings import load_settings
    from codsplat.pipeline.errors import InputError

    longest_followed_seconds.cache_clear()
    needed = minutes * 60 * 3 + SAGEMAKER_OVERHEAD_SECONDS
    least = next(p for p in range(1, 3601) if longest_followed_seconds(p) >= needed)
    env = {"CODSPLAT_MAX_RUNTIME_MINUTES": str(minutes)}
    assert load_settings(env={**env, "CODSPLAT_FALLBACK_POLL_SECONDS": str(least)}).fallback_poll_seconds == least
    if least > 1:
        with pytest.raises(InputError, match=rf"fallback_poll_seconds: {least - 1} s lets .* at least {least}\b"):
            load_settings(env={**env, "CODSPLAT_FALLBACK_POLL_SECONDS": str(least - 1)})
    assert longest_followed_seconds(least) >= needed > longest_followed_seconds(max(least - 1, 1)) or least == 1


def test_attempt_names_are_unique_and_valid_for_every_id():
    import re

    pattern = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's TrainingJobName
    for job_id in ("abc", "a" * 63, "a-" * 31 + "b", "x" * 50 + "-" + "y" * 12):
        names = {attempt_name(job_id, "sm", n) for n in range(1, 8)}
        assert len(names) == 7 and all(pattern.match(n) for n in names), names


def test_a_sagemaker_job_is_pinned_to_the_gpu_it_pays_for():
    """On a GPU instance, `device: auto` would train on the CPU until the time limit when the GPU cannot
    be used; pinned to cuda, the worker stops at once with exit 5 and its reason."""
    from codsplat.pipeline.contract import decode_settings

    settings = Settings(bucket="codsplat-data", state_machine_arn="arn:aws:states:us-east-1:1:stateMachine:m")
    job = parse_job({"version": 1, "id": "pin", "input": "s3://codsplat-data/uploads/a.mp4", "train": {"device": "auto"}},
                    settings.policy)
    given = SageMakerExecutor(None, None, settings).execution_input(job, Attempt("sagemaker", "all", 1, "pin-sm-1"))
    assert decode_settings(given["hyperparameters"]["settings"], "settings")["train"]["device"] == "cuda"
