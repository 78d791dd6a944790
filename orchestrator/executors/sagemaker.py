"""SageMaker: the fallback. An attempt is one execution of the fallback state machine, which runs
the whole job as one training job with the worker image.

The state machine (`fallback.asl.json`, the same file the CDK stack deploys) creates the training
job, follows it, then writes the job's record and sends its message itself, so the job finishes
even if this daemon is gone (`finishes_record`). The execution and the training job are named
after the attempt (`compute.attempt_name`): starting one twice starts it once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..compute import Attempt, CannotRun, Result
from ..job import JobDocument
from ..settings import Settings

ASL_PATH = Path(__file__).resolve().parents[1] / "fallback.asl.json"


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
        output = str(job.output_uri(self.settings.policy))
        return {
            "job_id": job.id, "training_job_name": attempt.name, "instance_type": job.compute.sagemaker_instance_type,
            "max_runtime_seconds": job.compute.max_runtime_minutes * 60 * 3,  # all three stages in one job
            "input_s3_uri": str(job.input_uri), "output_s3_uri": output, "model_s3_uri": output + "sagemaker/",
            "hyperparameters": {"stage": "all", "settings": job.worker_settings()},
            "table": self.settings.table, "topic_arn": self.settings.topic_arn,
            "recipient": json.dumps(job.notify.email or ["-"]), "poll_seconds": self.settings.fallback_poll_seconds,
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

    def stop(self, attempt: Attempt, reason: str) -> None:
        """Stop the training job; the state machine sees it Stopped, records CANCELLED and says so."""
        try:
            self.sagemaker.stop_training_job(TrainingJobName=attempt.name)
        except self.sagemaker.exceptions.ResourceNotFound:
            pass
