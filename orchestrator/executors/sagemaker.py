"""SageMaker: the fallback. An attempt is one execution of the fallback state machine, which runs
the whole job as one training job with the worker image.

The state machine (`fallback.asl.json`, the same file the CDK stack deploys) creates the training
job, follows it, then writes the job's record and sends its message itself, so the job finishes
even if this daemon is gone (`finishes_record`). The execution and the training job are named
after the attempt (`compute.attempt_name`): starting one twice starts it once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from codsplat.pipeline.contract import OUTCOME_FILE

from ..compute import Attempt, CannotRun, Result
from ..job import JobDocument
from ..settings import Settings

POLL_GROWTH = 5  # the state machine's interval grows from fallback_poll_seconds to this many times it
HISTORY_LIMIT = 25_000  # events in one Step Functions standard execution's history; past it the execution fails
AROUND_THE_LOOP = 200  # events outside the polling loop: creating (every quota wait), the end, the record, the message


def advice(job: JobDocument, settings: Settings) -> dict[str, str]:
    """What the state machine tells the user after each end that is not the worker's own."""
    return {
        "quota": f"Ask AWS for more '{job.compute.sagemaker_instance_type} for training job "
                 "usage' in Service Quotas (Amazon SageMaker) for this region, or choose another "
                 f"compute.sagemaker_instance_type ({', '.join(settings.policy.sagemaker_instance_types[:4])}, ...).",
        "time_limit": f"Raise compute.max_runtime_minutes (this deployment allows up to {settings.max_runtime_minutes}), "
                      "or ask for less: a smaller preset, fewer train.steps or frames.",
        "stopped": "Someone stopped it from the AWS console or API; upload the job again to run it.",
        "start": "This is the deployment's problem, not the job's: the operators have the state machine's history.",
        "reused": "Upload the job again under an id of its own (its file name, or \"id\" in the document): SageMaker "
                  "keeps a training job's name for ever.",
    }

ASL_PATH = Path(__file__).resolve().parents[1] / "fallback.asl.json"


def history_events(state: dict) -> int:
    """Events a state adds to an execution's history each time it runs (Step Functions: a Task
    entered, scheduled, started, succeeded, exited; any other state entered and exited)."""
    return 5 if state["Type"] == "Task" else 2


@lru_cache(maxsize=None)
def longest_followed_seconds(poll: int) -> int:
    """The longest training job the state machine can follow, from the ASL, when its first interval is
    `poll` seconds: the interval grows by `poll` up to POLL_GROWTH times it, and every look may be the
    longer way round (a failed look after its retries, three events each). Past the 25,000-event history
    the execution fails, and the record would stay RUNNING; settings validation keeps every job inside."""
    states = json.loads(ASL_PATH.read_text())["States"]
    looked = sum(history_events(states[s]) for s in ("Wait", "DescribeTrainingJob", "Ended?", "Looked", "Slower?"))
    retries = max(r["MaxAttempts"] for r in states["DescribeTrainingJob"]["Retry"])
    missed = sum(history_events(states[s]) for s in ("Wait", "DescribeTrainingJob", "KeepFollowing?", "MissedOne"))
    per_poll = max(looked, missed + 3 * retries)
    growing = [poll * k for k in range(1, POLL_GROWTH)]  # the intervals before the cap, each one Slower more
    polls_left = (HISTORY_LIMIT - AROUND_THE_LOOP - len(growing) * (per_poll + history_events(states["Slower"]))) // per_poll
    return sum(growing) + polls_left * poll * POLL_GROWTH


def definition(image: str, role_arn: str) -> str:
    """The ASL with the deployment's values substituted, as CDK's DefinitionSubstitutions does:
    `${TrainingImage}` (the worker image) and `${SageMakerRoleArn}` (the training job's role)."""
    return ASL_PATH.read_text().replace("${TrainingImage}", image).replace("${SageMakerRoleArn}", role_arn)


@dataclass
class SageMakerExecutor:
    sfn: object  # boto3 Step Functions client
    sagemaker: object  # boto3 SageMaker client (to stop a training job on cancel)
    settings: Settings
    name: str = "sagemaker"
    finishes_record: bool = True

    def preflight(self, job: JobDocument) -> None:
        pass

    def execution_input(self, job: JobDocument, attempt: Attempt) -> dict:
        settings = self.settings
        output = job.output_uri(settings.policy)
        runtime = job.compute.max_runtime_minutes * 60 * 3  # all three stages in one job
        poll = settings.fallback_poll_seconds
        return {
            "job_id": job.id, "training_job_name": attempt.name, "instance_type": job.compute.sagemaker_instance_type,
            "max_runtime_seconds": runtime,
            "input_s3_uri": str(job.input_uri), "output_s3_uri": str(output), "model_s3_uri": f"{output}sagemaker/",
            "bucket": output.bucket, "outcome_key": output.key + OUTCOME_FILE,
            # a GPU instance: pinned, so a GPU the worker cannot use is a clear exit 5, never hours on its CPU
            "hyperparameters": {"stage": "all", "settings": job.worker_settings(device="cuda")},
            "table": settings.table, "topic_arn": settings.topic_arn, "recipient": json.dumps(job.notify.email or ["-"]),
            "expires_at": str(int(time.time()) + runtime + settings.record_days * 86400),
            "poll": {"wait": poll, "step": poll, "cap": poll * POLL_GROWTH},
            "quota": {"left": settings.fallback_quota_tries, "wait": settings.fallback_quota_wait_seconds},
            "follow": {"left": settings.fallback_follow_misses, "budget": settings.fallback_follow_misses},
            "advice": advice(job, settings),
        }

    def submit(self, job: JobDocument, attempt: Attempt, upstream: dict[str, str]) -> None:
        from botocore.exceptions import ClientError, EndpointConnectionError

        try:
            attempt.remote_id = self.sfn.start_execution(
                stateMachineArn=self.settings.state_machine_arn, name=attempt.name,
                input=json.dumps(self.execution_input(job, attempt)))["executionArn"]
        except self.sfn.exceptions.ExecutionAlreadyExists:  # started before a crash: it is running
            attempt.remote_id = self._arn(attempt)
        except (ClientError, EndpointConnectionError) as exc:
            raise CannotRun(f"the SageMaker fallback could not be started: {exc}", attempt.stage) from None
        attempt.published = str(job.output_uri(self.settings.policy))

    def _arn(self, attempt: Attempt) -> str:
        return f"{self.settings.state_machine_arn.replace(':stateMachine:', ':execution:')}:{attempt.name}"

    def find(self, job: JobDocument, attempt: Attempt) -> bool:
        try:
            self.sfn.describe_execution(executionArn=self._arn(attempt))
        except self.sfn.exceptions.ExecutionDoesNotExist:
            return False
        attempt.remote_id = self._arn(attempt)
        return True

    def watch(self, job: JobDocument, attempt: Attempt, done: Callable[[Result], None], resumed: bool = False) -> None:
        pass  # the state machine records the end itself

    def abandoned(self, attempt: Attempt) -> str | None:
        """An execution that failed, timed out or was aborted never writes the record (the history limit,
        a States.Runtime error, an end write that failed for good); one that succeeded wrote it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            described = self.sfn.describe_execution(executionArn=attempt.remote_id or self._arn(attempt))
        except (ClientError, BotoCoreError):  # gone or unreachable: not proof of anything; asked again later
            return None
        if described["status"] not in ("FAILED", "TIMED_OUT", "ABORTED"):
            return None
        why = ": ".join(str(described[k]) for k in ("error", "cause") if described.get(k))
        return f"{described['status'].lower().replace('_', ' ')}{f' ({why[:300]})' if why else ''}"

    def stop(self, attempt: Attempt, reason: str) -> None:
        """Stop the training job; the state machine sees it Stopped, records CANCELLED and says so."""
        from botocore.exceptions import ClientError

        try:
            self.sagemaker.stop_training_job(TrainingJobName=attempt.name)
        except ClientError as exc:  # not created yet, or ended already: the state machine records whichever end
            if exc.response["Error"]["Code"] not in ("ResourceNotFound", "ValidationException"):
                raise
