"""Deployment settings: a config file (YAML/JSON), overridden by environment variables.

    bucket: codsplat-data            # CODSPLAT_BUCKET
    input_prefixes: [uploads/, jobs/]
    output_prefix: results/          # CODSPLAT_OUTPUT_PREFIX
    image: 123.dkr.ecr.../codsplat:1.2.0   # CODSPLAT_IMAGE
    region: eu-west-1                # AWS_REGION
    s3_endpoint: null                # CODSPLAT_S3_ENDPOINT (MinIO, tests)
    max_gpus: 8                      # CODSPLAT_MAX_GPUS
    max_runtime_minutes: 1440        # CODSPLAT_MAX_RUNTIME_MINUTES
    bacalhau_namespace: default      # CODSPLAT_BACALHAU_NAMESPACE

The Bacalhau endpoint itself comes from BACALHAU_API_HOST / BACALHAU_API_PORT (see bacalhau.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError

from codsplat.pipeline.config import read_document
from codsplat.pipeline.errors import InputError
from codsplat.pipeline.validation import StrictModel, explain

from .job import Policy
from .translate import Deployment

ENV = {
    "bucket": "CODSPLAT_BUCKET", "output_prefix": "CODSPLAT_OUTPUT_PREFIX", "image": "CODSPLAT_IMAGE",
    "region": "AWS_REGION", "s3_endpoint": "CODSPLAT_S3_ENDPOINT", "max_gpus": "CODSPLAT_MAX_GPUS",
    "max_runtime_minutes": "CODSPLAT_MAX_RUNTIME_MINUTES", "bacalhau_namespace": "CODSPLAT_BACALHAU_NAMESPACE",
    "input_prefixes": "CODSPLAT_INPUT_PREFIXES", "queue_url": "CODSPLAT_QUEUE_URL", "table": "CODSPLAT_TABLE",
    "topic_arn": "CODSPLAT_TOPIC_ARN", "concurrency": "CODSPLAT_CONCURRENCY", "intake_workers": "CODSPLAT_INTAKE_WORKERS", "health_port": "CODSPLAT_HEALTH_PORT",
    "media_wait_seconds": "CODSPLAT_MEDIA_WAIT_SECONDS", "jobs_prefix": "CODSPLAT_JOBS_PREFIX",
    "aws_endpoint": "CODSPLAT_AWS_ENDPOINT", "cache_dir": "CODSPLAT_CACHE_DIR",
    "state_machine_arn": "CODSPLAT_STATE_MACHINE_ARN", "queue_wait_seconds": "CODSPLAT_QUEUE_WAIT_SECONDS",
    "bacalhau_poll_seconds": "CODSPLAT_BACALHAU_POLL_SECONDS", "fallback_poll_seconds": "CODSPLAT_FALLBACK_POLL_SECONDS",
}
INTEGERS = ("max_gpus", "max_runtime_minutes", "concurrency", "intake_workers", "health_port", "queue_wait_seconds", "fallback_poll_seconds")


class Settings(StrictModel):
    bucket: str = Field("codsplat-data", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    input_prefixes: list[str] = Field(default_factory=lambda: ["uploads/", "jobs/"], min_length=1)
    output_prefix: str = Field("results/", pattern=r"^[A-Za-z0-9._-]+/$")
    image: str = "codsplat:latest"
    region: str | None = None
    s3_endpoint: str | None = None
    max_gpus: int = Field(8, ge=0, le=64)
    max_runtime_minutes: int = Field(24 * 60, ge=5)
    bacalhau_namespace: str = "default"
    # the daemon
    jobs_prefix: str = Field("jobs/", pattern=r"^[A-Za-z0-9._-]+/$")
    queue_url: str | None = None
    table: str | None = None
    topic_arn: str | None = None
    aws_endpoint: str | None = None  # every AWS API at one endpoint (the tests' moto server)
    concurrency: int = Field(2, ge=1, le=256, description="Jobs at a backend at once.")
    intake_workers: int = Field(8, ge=1, le=64, description="Messages read, validated and recorded at once.")
    health_port: int | None = Field(8787, ge=0, le=65535)
    media_wait_seconds: float = Field(120.0, ge=0)
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="On SIGTERM, how long running jobs may finish.")
    state_machine_arn: str | None = Field(None, description="The SageMaker fallback state machine.")
    fallback_poll_seconds: int = Field(60, ge=1, le=3600)
    queue_wait_seconds: int = Field(20, ge=0, le=20, description="SQS long-poll wait.")
    bacalhau_poll_seconds: float = Field(5.0, gt=0, description="Seconds between Bacalhau state checks.")
    cache_dir: str = Field(str(Path.home() / ".cache" / "codsplat"), description="Work folders of local runs.")

    @property
    def policy(self) -> Policy:
        return Policy(bucket=self.bucket, input_prefixes=tuple(self.input_prefixes), output_prefix=self.output_prefix,
                      max_gpus=self.max_gpus, max_runtime_minutes=self.max_runtime_minutes)

    @property
    def deployment(self) -> Deployment:
        return Deployment(image=self.image, namespace=self.bacalhau_namespace, policy=self.policy,
                          region=self.region, s3_endpoint=self.s3_endpoint)


def ssm_settings(path: str, client=None) -> dict[str, str]:
    """Every parameter under an SSM path (`/codsplat/prod/bucket` → `bucket`), decrypted."""
    import boto3

    client = client or boto3.client("ssm", endpoint_url=os.environ.get("CODSPLAT_AWS_ENDPOINT") or None)
    out = {}
    for page in client.get_paginator("get_parameters_by_path").paginate(Path=path, Recursive=True, WithDecryption=True):
        for p in page["Parameters"]:
            out[p["Name"][len(path.rstrip("/")) + 1:].replace("/", "_")] = p["Value"]
    return out


def load_settings(path: Path | None = None, env: dict[str, str] | None = None, ssm_client=None) -> Settings:
    """File < SSM parameters (under $CODSPLAT_SSM_PATH) < environment variables."""
    env = os.environ if env is None else env
    data = read_document(path) if path else {}
    layers = [ssm_settings(env["CODSPLAT_SSM_PATH"], ssm_client)] if env.get("CODSPLAT_SSM_PATH") else []
    layers.append({key: env[var] for key, var in ENV.items() if env.get(var)})
    for layer in layers:
        for key, value in layer.items():
            data[key] = _typed(key, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise InputError("The deployment settings have problems: " + "; ".join(explain(exc, Settings)) + ".") from None


def _typed(key: str, value: str) -> object:
    """Parameters and variables are text: give numbers and lists their types (bad text stays text,
    so the model reports it with its name)."""
    if key in INTEGERS:
        return int(value) if str(value).isdigit() else value
    if key in ("media_wait_seconds", "bacalhau_poll_seconds"):
        try:
            return float(value)
        except ValueError:
            return value
    if key == "input_prefixes":
        return [p.strip() for p in str(value).split(",") if p.strip()]
    return value
