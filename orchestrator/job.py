"""The job document: what a user writes to ask for a splat, validated in one place.

    {"version": 1, "input": "s3://bucket/uploads/alice/kitchen.mp4",
     "notify": {"email": ["alice@example.com"]}, "preset": "fast",
     "train": {"steps": 10000}, "compute": {"backend": "auto", "gpu_model": "NVIDIA-A10G"}}

The pipeline sections (`frames`, `sfm`, `train`, `export`, `preset`) are exactly those of
`codsplat run --config`. Safety belongs to the model: a job reads and writes only under the prefixes
the deployment allows (`Policy`), and it has no way to name a container image, an entrypoint,
environment variables or network access, nor to ask for unbounded GPUs or time.
"""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from codsplat.jobspecs import HERE as JOBSPECS
from codsplat.pipeline.config import PipelineConfig, merge, preset_settings, read_document
from codsplat.pipeline.contract import PRESETS, SETTING_SECTIONS, encode_settings
from codsplat.pipeline.errors import InputError
from codsplat.pipeline.validation import StrictModel, explain, show

from .bacalhau import gpu_label
from .settings import SAGEMAKER_GPU_INSTANCES, Policy, Settings

SCHEMA_PATH = JOBSPECS / "job.schema.json"
JOB_ID = r"^[a-z0-9][a-z0-9-]{2,62}$"
# characters no one sees as written: what each category is called where the character has no name
UNSEEN_CATEGORIES = {"Cc": "a control character", "Cf": "a format character", "Co": "a private-use character",
                     "Cs": "a surrogate", "Cn": "an unassigned code point"}
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[A-Za-z]{2,63}")  # fullmatch: no trailing newline, RFC 5321 lengths
# Keys people try that a job may not set: say so plainly instead of "unknown key".
FORBIDDEN = {
    "image": "the deployment chooses the container image",
    "entrypoint": "the container's entrypoint is fixed",
    "command": "the container's command is fixed",
    "env": "jobs cannot set environment variables",
    "environment": "jobs cannot set environment variables",
    "network": "jobs run without network access",
}


MAX_SEGMENT_BYTES = 255


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        return self.key.endswith("/")


def parse_s3(value: str, what: str) -> S3Uri:
    if not value.startswith("s3://"):
        raise ValueError(f"must be an s3:// URI, got {show(value)}")
    bucket, _, key = value[5:].partition("/")
    if len(key.encode()) > 1024:
        raise ValueError(f"has a key of {len(key.encode()):,} bytes; an S3 key has at most 1,024")
    if not bucket or not key:
        raise ValueError(f"must name a bucket and a key, like s3://bucket/{what}/..., got {show(value)}")
    if key.startswith("/") or "\\" in key or "//" in key:
        raise ValueError(f"has an absolute or malformed key {show(key)}")
    if any(part in ("..", ".") for part in PurePosixPath(key).parts):
        raise ValueError(f"may not contain '..' or '.' path segments, got {show(key)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"may not contain control characters (a NUL, a newline, ...), got {show(key)}")
    longest = max((len(part.encode()) for part in key.split("/")), default=0)
    if longest > MAX_SEGMENT_BYTES:  # what a file name may be on the nodes' and the embedded folder's disks
        raise ValueError(f"has a path segment of {longest:,} bytes; each may be at most {MAX_SEGMENT_BYTES}")
    return S3Uri(bucket, key)


def _policy(info: ValidationInfo) -> Policy:
    return (info.context or {}).get("policy") or Settings().policy


def _absolute(value: str, policy: Policy) -> str:
    """A bare key (`uploads/scan.mp4`) is a key in the deployment's own bucket (or folder)."""
    return value if "://" in value else f"s3://{policy.bucket}/{value}"


def _within(value: str, policy: Policy, prefixes: tuple[str, ...], what: str) -> str:
    """An s3:// URI (or a bare key) in the deployment's bucket, under one of `prefixes`."""
    value = _absolute(value, policy)
    uri = parse_s3(value, what)
    if uri.bucket != policy.bucket:
        raise ValueError(f"bucket '{uri.bucket}' is not allowed; use s3://{policy.bucket}/")
    if not uri.key.startswith(prefixes):
        raise ValueError(f"must be under {' or '.join(f's3://{policy.bucket}/{p}' for p in prefixes)}, got {show(value)}")
    return value


class Notify(StrictModel):
    email: list[str] = Field(default_factory=list, max_length=10, description="Who is emailed when the job ends.")

    @field_validator("email")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        for address in value:  # an unseen character would be mailed to, shown and logged as it is
            if unseen := next((c for c in address if unicodedata.category(c) in UNSEEN_CATEGORIES), None):
                raise ValueError(f"not an email address: it holds U+{ord(unseen):04X} "
                                 f"({unicodedata.name(unseen, UNSEEN_CATEGORIES[unicodedata.category(unseen)])}); "
                                 "write the address in plain characters")
        bad = [v for v in value if not EMAIL.fullmatch(v)]
        if bad:
            raise ValueError(f"not an email address: {', '.join(map(show, bad[:3]))}")
        return value


class Compute(StrictModel):
    backend: Literal["auto", "bacalhau", "sagemaker", "local"] = Field(
        "auto", description="auto: Bacalhau first, SageMaker when Bacalhau cannot run the job (on AWS); this "
                            "machine (embedded). local exists only in the embedded deployment."
    )
    gpus: int = Field(1, ge=0, description="GPUs for training (0 trains on the CPU).")
    gpu_model: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{1,63}$",
        description="Only nodes with this GPU model: as nvidia-smi names it (NVIDIA A10G) or as Bacalhau labels it (NVIDIA-A10G).",
    )
    sagemaker_instance_type: str = Field("ml.g5.2xlarge", pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
    max_runtime_minutes: int = Field(180, ge=5, description="Longest a stage may run.")
    queue_timeout_minutes: int = Field(30, ge=0, le=24 * 60, description="How long to wait for a free node.")
    split_stages: bool = Field(False, description="Run preprocess (CPU), train (GPU), export (CPU) as three jobs.")
    retries: int = Field(2, ge=0, le=5, description="New attempts after a failed execution.")

    @field_validator("backend")
    @classmethod
    def _offered(cls, value: str, info: ValidationInfo) -> str:
        offered = _policy(info).backends
        if value not in offered:
            where = "the embedded deployment (it would run on the orchestrator host)" if value == "local" else "AWS"
            raise ValueError(f"{show(value)} runs only in {where}; this deployment offers {', '.join(offered)}")
        return value

    @field_validator("gpu_model")
    @classmethod
    def _label_form(cls, value: str | None) -> str | None:
        return gpu_label(value) if value else value  # the form of the node's GPU-0 label: one normal form

    @field_validator("gpus", "max_runtime_minutes")
    @classmethod
    def _within_deployment_limits(cls, value: int, info: ValidationInfo) -> int:
        limit = getattr(_policy(info), {"gpus": "max_gpus", "max_runtime_minutes": "max_runtime_minutes"}[info.field_name])
        if value > limit:
            raise ValueError(f"must be ≤ {limit} (this deployment's limit), got {value}")
        return value

    @field_validator("sagemaker_instance_type")
    @classmethod
    def _instance(cls, value: str, info: ValidationInfo) -> str:
        policy = _policy(info)
        allowed = policy.sagemaker_instance_types
        if value not in allowed:
            gpus = SAGEMAKER_GPU_INSTANCES.get(value)
            why = (f"it has {gpus} GPUs and this deployment allows {policy.max_gpus}" if gpus
                   else "not a SageMaker GPU training instance")
            raise ValueError(f"must be one of this deployment's SageMaker instances ({', '.join(allowed)}); "
                             f"got {show(value)}: {why}")
        return value


class JobDocument(PipelineConfig):
    """A job: the media, where results go, who to tell, pipeline settings and compute."""

    version: Literal[1] = Field(description="Document format version.")
    id: str | None = Field(None, pattern=JOB_ID, description="Job id; defaults to the job file's name.")
    input: str = Field(description="s3:// URI (or a key in the deployment's bucket) of a video, a .zip of images, "
                                   "or a prefix ending in / of images.")
    output: str | None = Field(None, description="s3:// prefix (or key prefix) for results; defaults to <output prefix><id>/.")
    notify: Notify = Field(default_factory=Notify)
    compute: Compute = Field(default_factory=Compute)

    @field_validator("input")
    @classmethod
    def _input(cls, value: str, info: ValidationInfo) -> str:
        """Under an input prefix; a document in a user's folder (`jobs/<user>/...`) reads only that
        user's uploads (`uploads/<user>/...`); a folder of photos is one folder, never a whole prefix."""
        policy, owner = _policy(info), (info.context or {}).get("owner")
        prefixes = tuple(f"{p}{owner}/" for p in policy.input_prefixes) if owner else policy.input_prefixes
        value = _within(value, policy, prefixes, "uploads")
        key = parse_s3(value, "uploads").key
        if key.endswith("/") and key in prefixes:
            raise ValueError(f"names the whole of {show(key)}; name the folder of one capture inside it")
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Under the job's own folder of results (`results/<id>/`), never another job's."""
        if value is None:
            return value
        policy, job_id = _policy(info), info.data.get("id")
        own = f"{policy.output_prefix}{job_id}/" if job_id else policy.output_prefix
        value = _within(value if value.endswith("/") else value + "/", policy, (own,), "results")
        return value

    # ----------------------------------------------------------------- derived values

    @property
    def input_uri(self) -> S3Uri:
        return parse_s3(self.input, "uploads")

    def output_uri(self, policy: Policy) -> S3Uri:
        return parse_s3(self.output or f"s3://{policy.bucket}/{policy.output_prefix}{self.id}/", "results")

    def pipeline_settings(self) -> dict[str, Any]:
        """The sections the worker reads, as plain JSON."""
        return self.model_dump(mode="json", include=set(SETTING_SECTIONS))

    def worker_settings(self, device: str | None = None) -> str:
        """The settings text every transport hands the worker (`contract.encode_settings`); with
        `device`, training is pinned to it: `cpu` for a CPU-only stage of a split job, `cuda` on a
        SageMaker GPU instance (a worker that cannot use the GPU then stops with exit 5 instead of
        training on the CPU until its time limit)."""
        sections = self.pipeline_settings()
        if device:
            sections["train"]["device"] = device
        return encode_settings(sections)


def job_of_record(data: Any, job_id: str, policy: Policy | None = None, owner: str | None = None) -> JobDocument:
    """A stored job document as the job of the record `job_id`: after intake the record's id is the
    only id, whatever id the document asks for (intake renumbers a taken one `<id>-r2`, ...; a job
    resumed or shown under the document's own id would run in, or stop, another job's)."""
    return parse_job({**data, "id": job_id} if isinstance(data, dict) else data, policy, owner=owner)


def parse_job(data: Any, policy: Policy | None = None, default_id: str | None = None,
              owner: str | None = None) -> JobDocument:
    """Validate a job document (a dict) against the deployment's policy, with every error at once.
    `owner`: the user folder the document came from (`owner_of`), whose uploads alone it may read."""
    if not isinstance(data, dict):
        raise InputError("A job document must be an object with keys such as version, input, notify, compute.")
    preset = data.get("preset")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"The job has 1 problem: preset: must be one of {', '.join(PRESETS)}, got {json.dumps(preset)}.")
    layered = merge(preset_settings(preset), data) if isinstance(preset, str) else dict(data)
    if "id" not in layered:
        if not default_id:
            raise InputError("The job has 1 problem: id: required (or let it default to the job file's name).")
        layered["id"] = default_id
    try:
        return JobDocument.model_validate(layered, context={"policy": policy or Settings().policy, "owner": owner})
    except ValidationError as exc:
        problems = explain(exc, JobDocument, forbidden=FORBIDDEN)
        raise InputError(
            f"The job has {len(problems)} problem{'s' if len(problems) > 1 else ''}: " + "; ".join(problems) + "."
        ) from None


MAX_RENUMBER = 50  # `<id>-r2` ... `<id>-r51`: a taken id is renumbered this many times, then given a random suffix
RANDOM_TRIES = 3  # random suffixes tried after that (a 32-bit suffix is taken by chance about never)


def next_id(job_id: str, renumbered: int) -> str:
    """The id to try after `job_id` was taken: `scan` → `scan-r2` → ... → `scan-r51`, then `scan-<8 hex>`:
    ids squatted past the renumbering (someone uploading scan.json … scan-r51.json) cost no job."""
    stem = re.sub(r"-r\d+$", "", job_id) if renumbered else job_id
    if renumbered < MAX_RENUMBER:
        return f"{stem[:63 - 4]}-r{renumbered + 2}"
    return f"{stem[:63 - 9]}-{secrets.token_hex(4)}"


def owner_of(key: str, settings: Settings) -> str | None:
    """The user folder a job document sits in (`jobs/alice/scan.json` → `alice`), None at the top
    (and for a document that is not under the jobs prefix at all)."""
    if not key.startswith(settings.jobs_prefix):
        return None
    parts = PurePosixPath(key.removeprefix(settings.jobs_prefix)).parts
    return parts[0] if len(parts) > 1 else None


def valid_notify(data: Any) -> list[str]:
    """The addresses of a document that did not validate, when its `notify` part is valid on its
    own (so its author hears why); never raw values."""
    try:
        return Notify.model_validate(data.get("notify", {}) if isinstance(data, dict) else {}).email
    except ValidationError:
        return []


def job_id_from_key(key: str) -> str:
    """`jobs/alice/Kitchen Scan.json` → `kitchen-scan`: a default id that is valid and readable."""
    # undecodable bytes of a file name (surrogates) are spelled out, so `caf\xe9` is not plain `caf`
    stem = PurePosixPath(key.encode("utf-8", "backslashreplace").decode()).stem.lower()
    slug = re.sub(r"[^a-z0-9]+", "-", stem).strip("-")[:63]
    return slug if len(slug) >= 3 else f"job-{slug or 'x'}"


def load_job(path: Path, policy: Policy | None = None) -> JobDocument:
    return parse_job(read_document(path), policy, default_id=job_id_from_key(path.name))


def json_schema() -> dict[str, Any]:
    schema = JobDocument.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://codsplat.dev/schemas/job.schema.json"
    return schema


def write_schema(path: Path = SCHEMA_PATH) -> None:
    path.write_text(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":  # python -m codsplat.orchestrator.job: regenerate jobspecs/job.schema.json
    write_schema()
    print(f"wrote {SCHEMA_PATH}")
