"""The SageMaker fallback: when Bacalhau cannot run a job, start the fallback state machine.

The state machine (`fallback.asl.json`, the same file the CDK stack deploys) creates a SageMaker
training job with the worker image, polls it, then updates the job's DynamoDB record and publishes
the notification itself, so the job finishes even if this daemon is gone. The execution name is
derived from the job id and the attempt number: starting it twice starts it once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .job import JobDocument, Policy
from .records import JobRecord, Store, change, now

ASL_PATH = Path(__file__).with_name("fallback.asl.json")


def definition(image: str, role_arn: str) -> str:
    """The ASL with the deployment's values substituted, as CDK's DefinitionSubstitutions does:
    `${TrainingImage}` (the worker image) and `${SageMakerRoleArn}` (the training job's role)."""
    return ASL_PATH.read_text().replace("${TrainingImage}", image).replace("${SageMakerRoleArn}", role_arn)


@dataclass
class SageMakerFallback:
    sfn: object  # boto3 Step Functions client
    state_machine_arn: str
    store: Store
    policy: Policy
    table: str
    topic_arn: str
    poll_seconds: int = 60

    def __call__(self, job: JobDocument, record: JobRecord, reason: str) -> None:
        number = 1 + sum(1 for a in record.attempts if a.get("backend") == "sagemaker")
        training_job = f"codsplat-{job.id}-sm{number}"[:63]
        output = str(job.output_uri(self.policy))
        execution_input = {
            "job_id": job.id, "training_job_name": training_job, "instance_type": job.compute.sagemaker_instance_type,
            "max_runtime_seconds": job.compute.max_runtime_minutes * 60 * 3,  # all three stages in one job
            "input_s3_uri": str(job.input_uri), "output_s3_uri": output, "model_s3_uri": output + "sagemaker/",
            "hyperparameters": {"stage": "all", "settings": json.dumps(job.pipeline_settings(), separators=(",", ":"))},
            "table": self.table, "topic_arn": self.topic_arn, "recipient": json.dumps(record.notify or ["-"]),
            "poll_seconds": self.poll_seconds,
        }
        try:
            arn = self.sfn.start_execution(stateMachineArn=self.state_machine_arn, name=f"{job.id}-sm{number}"[:80],
                                           input=json.dumps(execution_input))["executionArn"]
        except self.sfn.exceptions.ExecutionAlreadyExists:  # started before a crash: it is running
            arn = f"{self.state_machine_arn.replace(':stateMachine:', ':execution:')}:{job.id}-sm{number}"
        attempt = {"backend": "sagemaker", "stage": "all", "number": number, "name": training_job,
                   "execution_arn": arn, "state": "Started", "reason": reason, "started_at": now()}
        change(self.store, job.id, lambda r: r.attempts.append(attempt))
