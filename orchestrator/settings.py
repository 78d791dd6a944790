"""Deployment settings: the one home of every default the control plane uses.

Layers, each overriding the one before: the defaults below < a settings file (YAML or JSON) < SSM
parameters under `$CODSPLAT_SSM_PATH` (`/codsplat/daemon/concurrency` → `concurrency`) < environment
variables. A parameter or a variable is text, and it is read as its setting's own type: numbers,
`true`/`false` (also yes/no, on/off, 1/0), lists as comma-separated text, objects as JSON. A value
that does not read is reported with its setting's name, as a bad value in the file is.

Each setting's variable is `CODSPLAT_<NAME>`, except where the wider world has a name already:
`AWS_REGION`, and Bacalhau's own `BACALHAU_API_*` for its endpoint (`ENV` lists them all).

    bucket: codsplat-data
    image: 123456789012.dkr.ecr.eu-west-1.amazonaws.com/codsplat:1.2.0
    resources: {train: {cpu: "3", memory: 12gb, disk: 40gb}}
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from codsplat.pipeline.config import read_document
from codsplat.pipeline.errors import InputError
from codsplat.pipeline.validation import StrictModel, explain

CPU = r"^\d+(\.\d+)?m?$"
PREFIX = r"^[A-Za-z0-9._-]+/$"  # one folder at the top of the bucket
SIZE = r"^\d+(\.\d+)?(b|kb|mb|gb|tb|kib|mib|gib|tib)$"
SAGEMAKER_OVERHEAD_SECONDS = 3600  # a training job's start (instance, image) and its upload, on top of its runtime
StageName = Literal["all", "preprocess", "train", "export"]


# SageMaker GPU training instances and their GPUs (AWS's instance type pages; A10G g5, L4 g6, L40S g6e,
# T4 g4dn, A100 p4d/p4de, H100 p5). The pipeline trains on one GPU. Each family's GPU must be one the
# image's kernels are built for (GPU_COMPUTE_CAPABILITY, container/Dockerfile TORCH_CUDA_ARCH_LIST): the
# V100's p3 (7.0) is not offered, since gsplat's kernels would fail on it at the first step.
GPU_COMPUTE_CAPABILITY = {"g4dn": "7.5", "g5": "8.6", "g6": "8.9", "g6e": "8.9", "p4d": "8.0", "p4de": "8.0", "p5": "9.0"}
SAGEMAKER_GPU_INSTANCES = {
    **{f"ml.g4dn.{size}": 4 if size == "12xlarge" else 1 for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")},
    **{f"ml.{family}.{size}": {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8}.get(size, 1)
       for family in ("g5", "g6", "g6e")
       for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")},
    "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8, "ml.p5.48xlarge": 8,
}


@dataclass(frozen=True)
class Policy:
    """What a deployment lets jobs touch and ask for; derived from `Settings`, never from a job."""

    bucket: str
    input_prefixes: tuple[str, ...]
    output_prefix: str
    max_gpus: int
    max_runtime_minutes: int
    backends: tuple[str, ...] = ("auto", "bacalhau", "sagemaker")  # `local` only where the daemon's machine is the job's
    max_input_bytes: int = 20 * 1024**3
    max_input_files: int = 5000

    @property
    def sagemaker_instance_types(self) -> tuple[str, ...]:
        """The SageMaker GPU instances a job may ask for: those with at most `max_gpus` GPUs. The CDK
        stack grants CreateTrainingJob for exactly these (IAM condition sagemaker:InstanceTypes)."""
        return tuple(name for name, gpus in SAGEMAKER_GPU_INSTANCES.items() if 0 < gpus <= self.max_gpus)

    @property
    def sagemaker_max_runtime_seconds(self) -> int:
        """The longest SageMaker training job: the whole job (three stages) in one."""
        return self.max_runtime_minutes * 60 * 3


class StageResources(StrictModel):
    """What one Bacalhau task asks of its node, in Bacalhau's own notation."""

    cpu: str = Field(pattern=CPU, description="CPU units, e.g. 3 or 500m.")
    memory: str = Field(pattern=SIZE, description="e.g. 12gb")
    disk: str = Field(pattern=SIZE, description="e.g. 40gb")


def _resources() -> dict[str, StageResources]:
    # What the CDK's default GPU node (g5.xlarge: 4 vCPU, 16 GiB, one A10G, 200 GB disk) offers Bacalhau
    # at its default 80% allocation (3.2 CPU, 12.8 GiB, 160 GB), with room to spare. GPU stages run
    # there; the CPU stages of a split job fit any small node.
    gpu = StageResources(cpu="3", memory="12gb", disk="60gb")
    return {"all": gpu, "train": gpu, "preprocess": StageResources(cpu="3", memory="8gb", disk="40gb"),
            "export": StageResources(cpu="2", memory="4gb", disk="20gb")}


class Settings(StrictModel):
    # ---------------------------------------------------------------- where jobs read and write
    bucket: str = Field("codsplat-data", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    input_prefixes: list[Annotated[str, Field(pattern=PREFIX)]] = Field(default_factory=lambda: ["uploads/", "jobs/"],
                                                                        min_length=1)
    output_prefix: str = Field("results/", pattern=PREFIX)
    jobs_prefix: str = Field("jobs/", pattern=PREFIX)
    # ---------------------------------------------------------------- AWS
    region: str | None = None
    aws_endpoint: str | None = Field(None, description="Every AWS API at one endpoint (the tests' moto server).")
    s3_endpoint: str | None = Field(None, description="A non-AWS S3 for Bacalhau's inputs and publisher (MinIO, tests).")
    queue_url: str | None = None
    table: str | None = None
    topic_arn: str | None = None
    state_machine_arn: str | None = Field(None, description="The SageMaker fallback state machine.")
    # ---------------------------------------------------------------- compute
    image: str = "codsplat:latest"
    max_gpus: int = Field(1, ge=0, le=8, description="GPUs a job may ask for; training uses one, so more only "
                          "widens the SageMaker instances allowed (each a multiple of the price).")
    max_runtime_minutes: int = Field(24 * 60, ge=5)
    max_input_bytes: int = Field(20 * 1024**3, ge=1, description="Most bytes a job's input may hold (a video, a zip, "
                                 "or a folder of photos).")
    max_input_files: int = Field(5000, ge=1, description="Most files a folder input may hold.")
    bacalhau_namespace: str = "default"
    resources: dict[StageName, StageResources] = Field(default_factory=_resources,
                                                       description="What each Bacalhau stage asks of its node.")
    # ---------------------------------------------------------------- the Bacalhau API
    bacalhau_host: str = "127.0.0.1"
    bacalhau_port: int = Field(1234, ge=1, le=65535)
    bacalhau_tls: bool = False
    bacalhau_ca_cert: str | None = Field(None, description="A CA bundle for the API's certificate.")
    bacalhau_insecure: bool = Field(False, description="Skip the certificate check (never in production).")
    bacalhau_api_key: str | None = Field(None, repr=False, description="Bearer token (an API key user).")
    bacalhau_api_key_secret: str | None = Field(None, description="A Secrets Manager secret holding the API key "
                                                "(what the CDK host stack sets); read at start.")
    bacalhau_username: str | None = None
    bacalhau_password: str | None = Field(None, repr=False)
    # ---------------------------------------------------------------- the daemon
    concurrency: int = Field(2, ge=1, le=1024, description="Jobs at a backend at once.")
    intake_workers: int = Field(8, ge=1, le=64, description="Messages read, validated and recorded at once.")
    intake_receivers: int = Field(4, ge=1, le=16, description="SQS receive calls in flight at once (each takes up to "
                                  "ten messages), so the next batch is on its way while one is recorded.")
    health_port: int | None = Field(8787, ge=0, le=65535)
    media_wait_seconds: float = Field(120.0, ge=0, description="How long a job waits for its media to finish uploading.")
    media_poll_seconds: float = Field(2.0, gt=0)
    cancel_check_seconds: float = Field(5.0, gt=0, description="How soon a running job notices a cancel.")
    recover_days: int = Field(14, ge=1, description="On start, finished records this recent are checked for a message not yet sent.")
    claim_seconds: float = Field(120.0, gt=0, description="A message claimed this long ago and not sent, or a job "
                                 "whose daemon has not renewed its hold for this long, is taken over by another daemon.")
    lookup_retry_seconds: float = Field(10.0, gt=0, description="After a restart, how soon a backend that could not say "
                                        "what it runs is asked again (nothing is sent meanwhile).")
    link_seconds: int = Field(7 * 24 * 3600 - 300, ge=60, le=7 * 24 * 3600, description="Presigned result links.")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="On SIGTERM, how long running jobs may finish.")
    queue_wait_seconds: int = Field(20, ge=0, le=20, description="SQS long-poll wait.")
    bacalhau_poll_seconds: float = Field(5.0, gt=0, description="Seconds between Bacalhau state checks.")
    fallback_poll_seconds: int = Field(60, ge=1, le=3600, description="The fallback's first interval between looks at "
                                       "a training job; it grows by this much up to five times it (fallback.asl.json).")
    fallback_quota_wait_seconds: int = Field(60, ge=1, le=3600, description="Without GPU quota, the first wait before "
                                             "asking SageMaker again; each wait doubles.")
    fallback_quota_tries: int = Field(6, ge=0, le=10, description="Waits for quota before the job fails, naming it "
                                      "(6 from 60 s: about an hour).")
    fallback_follow_misses: int = Field(10, ge=0, le=100, description="Looks in a row at a training job that may fail "
                                        "(each after three tries) before the fallback stops it rather than leave it "
                                        "unwatched; a look that works gives the whole budget back.")
    record_days: int = Field(365, ge=1, description="Finished records expire (DynamoDB TTL) this long after they end.")
    cache_dir: str = Field(str(Path.home() / ".cache" / "codsplat"), description="Work folders of local runs.")
    local_worker: list[str] = Field(default_factory=list, description="The command a local job runs in place of this "
                                    "Python's `codsplat run` (say `nice,-n,10,codsplat`, or a memory-capped `systemd-run` scope); "
                                    "`run INPUT --config FILE --out DIR --json` follow it.")
    # ---------------------------------------------------------------- prices, for the cost estimate in records
    gpu_hour_usd: float = Field(1.006, ge=0, description="An A10G (g5.xlarge) on-demand hour.")
    cpu_hour_usd: float = Field(0.10, ge=0)

    @field_validator("resources")
    @classmethod
    def _every_stage(cls, given: dict[str, StageResources]) -> dict[str, StageResources]:
        """Stages a file leaves out keep their defaults (`resources: {train: ...}` changes the one stage)."""
        return {**_resources(), **given}

    @field_validator("fallback_poll_seconds")
    @classmethod
    def _followed_to_the_end(cls, poll: int, info: ValidationInfo) -> int:
        """The fallback must be able to follow the longest job this deployment allows (three stages'
        runtime, and an hour for SageMaker's start and upload) inside Step Functions' execution history."""
        from .executors.sagemaker import longest_followed_seconds

        if "max_runtime_minutes" not in info.data:
            return poll
        needed = info.data["max_runtime_minutes"] * 60 * 3 + SAGEMAKER_OVERHEAD_SECONDS
        if longest_followed_seconds(poll) < needed:
            least = next((p for p in range(poll, 3601) if longest_followed_seconds(p) >= needed), 3600)
            raise ValueError(f"{poll} s lets the fallback follow a training job for {longest_followed_seconds(poll) / 3600:.1f} h "
                             f"inside Step Functions' 25,000-event execution history, but max_runtime_minutes "
                             f"({info.data['max_runtime_minutes']}) allows {needed / 3600:.1f} h; set it to at least {least}, "
                             "or lower max_runtime_minutes")
        return poll

    @property
    def policy(self) -> Policy:
        return Policy(bucket=self.bucket, input_prefixes=tuple(self.input_prefixes), output_prefix=self.output_prefix,
                      max_gpus=self.max_gpus, max_runtime_minutes=self.max_runtime_minutes,
                      max_input_bytes=self.max_input_bytes, max_input_files=self.max_input_files)

    @property
    def embedded_policy(self) -> Policy:
        """Embedded mode: the folder is the bucket, named `local` in s3:// keys; jobs run on this machine."""
        return Policy(bucket="local", input_prefixes=tuple(self.input_prefixes), output_prefix=self.output_prefix,
                      max_gpus=self.max_gpus, max_runtime_minutes=self.max_runtime_minutes, backends=("auto", "local"),
                      max_input_bytes=self.max_input_bytes, max_input_files=self.max_input_files)

    @property
    def bacalhau_url(self) -> str:
        return f"{'https' if self.bacalhau_tls else 'http'}://{self.bacalhau_host}:{self.bacalhau_port}"


ALIASES = {
    "region": "AWS_REGION", "bacalhau_host": "BACALHAU_API_HOST", "bacalhau_port": "BACALHAU_API_PORT",
    "bacalhau_tls": "BACALHAU_API_TLS_USETLS", "bacalhau_ca_cert": "BACALHAU_API_TLS_CACERT",
    "bacalhau_insecure": "BACALHAU_API_TLS_INSECURE", "bacalhau_api_key": "BACALHAU_API_KEY",
    "bacalhau_username": "BACALHAU_API_USERNAME", "bacalhau_password": "BACALHAU_API_PASSWORD",
}
ENV = {name: ALIASES.get(name, f"CODSPLAT_{name.upper()}") for name in Settings.model_fields}


def from_text(name: str, text: str) -> Any:
    """A parameter's or variable's text as its setting's type; text that does not read stays text,
    so that validation names the setting."""
    annotation = Settings.model_fields[name].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    if origin is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    if origin is dict or (isinstance(origin, type) and issubclass(origin, BaseModel)):
        try:
            return json.loads(text)
        except ValueError:
            return text
    try:
        return TypeAdapter(annotation).validate_python(text, strict=False)
    except ValidationError:
        return text


def as_text(value: Any) -> str:
    """A setting's value as the text of its SSM parameter or variable: what `from_text` reads back as
    the same value (lists comma-separated, objects as JSON, booleans as true/false)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps({k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in value.items()})
    return str(value)


def ssm_settings(path: str, client=None) -> dict[str, str]:
    """Every parameter under an SSM path (`/codsplat/prod/bucket` → `bucket`), decrypted."""
    import boto3

    client = client or boto3.client("ssm", endpoint_url=os.environ.get(ENV["aws_endpoint"]) or None)
    out = {}
    for page in client.get_paginator("get_parameters_by_path").paginate(Path=path, Recursive=True, WithDecryption=True):
        for p in page["Parameters"]:
            out[p["Name"][len(path.rstrip("/")) + 1:].replace("/", "_")] = p["Value"]
    return out


def load_settings(path: Path | None = None, env: typing.Mapping[str, str] | None = None, ssm_client=None) -> Settings:
    """File < SSM parameters (under $CODSPLAT_SSM_PATH) < environment variables."""
    env = os.environ if env is None else env
    data = read_document(path) if path else {}
    layers = [ssm_settings(env["CODSPLAT_SSM_PATH"], ssm_client)] if env.get("CODSPLAT_SSM_PATH") else []
    layers.append({name: env[var] for name, var in ENV.items() if env.get(var)})
    for layer in layers:
        for name, text in layer.items():
            data[name] = from_text(name, text) if name in Settings.model_fields else text
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise InputError("The deployment settings have problems: " + "; ".join(explain(exc, Settings)) + ".") from None
