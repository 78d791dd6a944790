"""Job document → Bacalhau job specs, from the YAML templates in `jobspecs/`.

A job runs either as one Bacalhau job (`all`, on a GPU node) or, with `compute.split_stages`, as
three: `preprocess` (frames + SfM, CPU) → `train` (GPU) → `export` (CPU), the next stage reading the
previous one's published prefix. Every attempt gets a unique Name (Bacalhau ≥ 1.8 would update a job
of the same name) and carries our job id in Labels and Meta, so an attempt can be found again by
label after a crash.

Published layout under the job's output prefix:
    work/<attempt name>/{frames,sfm}/   preprocess   (split only)
    work/<attempt name>/train/           train        (split only)
    frames/ sfm/ train/ export/          single job, or export/ alone for a split job
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml

from codsplat.jobspecs import HERE as TEMPLATES

from .job import JobDocument, Policy

SPLIT = ("preprocess", "train", "export")
VARIABLE = re.compile(r"\$\{([a-z_]+)\}")


@dataclass(frozen=True)
class StageResources:
    cpu: str
    memory: str
    disk: str


@dataclass(frozen=True)
class Deployment:
    """Operator settings that shape every job spec (never taken from a job document)."""

    image: str = "codsplat:latest"
    namespace: str = "default"
    policy: Policy = field(default_factory=Policy)
    region: str | None = None
    s3_endpoint: str | None = None  # a non-AWS S3 (MinIO, or the test server); None on AWS
    resources: dict[str, StageResources] = field(default_factory=lambda: {
        "all": StageResources("8", "32gb", "100gb"),
        "preprocess": StageResources("8", "16gb", "50gb"),
        "train": StageResources("8", "32gb", "50gb"),
        "export": StageResources("4", "8gb", "20gb"),
    })


def stages_of(job: JobDocument) -> tuple[str, ...]:
    return SPLIT if job.compute.split_stages else ("all",)


def attempt_name(job_id: str, stage: str, attempt: int) -> str:
    return f"codsplat-{job_id}-{stage}-a{attempt}"


def publish_key(job: JobDocument, deployment: Deployment, stage: str, name: str) -> str:
    base = job.output_uri(deployment.policy).key
    return base if stage in ("all", "export") else f"{base}work/{name}/"


@lru_cache(maxsize=None)
def template(stage: str) -> dict[str, Any]:
    name = "single" if stage == "all" else stage
    return yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text())


def _fill(node: Any, values: dict[str, Any]) -> Any:
    """Replace ${var} in string values; a value that is exactly ${var} takes the variable's type."""
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str):
        whole = VARIABLE.fullmatch(node)
        if whole:
            return values[whole.group(1)]
        return VARIABLE.sub(lambda m: str(values[m.group(1)]), node)
    return node


def translate(
    job: JobDocument,
    deployment: Deployment,
    stage: str = "all",
    attempt: int = 1,
    upstream: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Bacalhau Job (as the JSON the API takes) for one attempt of one stage.

    `upstream` maps earlier stages to the keys they published ("preprocess" → "results/x/work/...").
    """
    if stage not in ("all", *SPLIT):
        raise ValueError(f"unknown stage {stage!r}")
    upstream = upstream or {}
    name = attempt_name(job.id, stage, attempt)
    compute = job.compute
    res = deployment.resources[stage]
    gpus = compute.gpus if stage in ("all", "train") else 0
    settings = job.pipeline_settings()
    if gpus == 0:
        settings["train"]["device"] = "cpu"
    execution = compute.max_runtime_minutes * 60
    queue = compute.queue_timeout_minutes * 60
    values = {
        "name": name, "namespace": deployment.namespace, "job_id": job.id, "attempt": str(attempt),
        "image": deployment.image, "settings": json.dumps(settings, separators=(",", ":")),
        "bucket": deployment.policy.bucket, "input_key": job.input_uri.key,
        "publish_key": publish_key(job, deployment, stage, name),
        "preprocess_key": upstream.get("preprocess", ""), "train_key": upstream.get("train", ""),
        "cpu": res.cpu, "memory": res.memory, "disk": res.disk, "gpus": str(gpus),
        "execution_timeout": execution, "queue_timeout": queue, "total_timeout": execution + queue,
    }
    spec = _fill(copy.deepcopy(template(stage)), values)
    task = spec["Tasks"][0]
    if gpus == 0:
        task["Resources"].pop("GPU", None)
    if gpus and compute.gpu_model:  # nodes label their first GPU's model as GPU-0
        constraint = [{"Key": "GPU-0", "Operator": "=", "Values": [compute.gpu_model]}]
        spec = {**{k: v for k, v in spec.items() if k != "Tasks"}, "Constraints": constraint, "Tasks": spec["Tasks"]}
        task = spec["Tasks"][0]
    for params in [s["Source"]["Params"] for s in task["InputSources"]] + [task["Publisher"]["Params"]]:
        if deployment.region:
            params["Region"] = deployment.region
        if deployment.s3_endpoint:
            params["Endpoint"] = deployment.s3_endpoint
    missing = [s["Alias"] for s in task["InputSources"] if not s["Source"]["Params"]["Key"]]
    if missing:
        raise ValueError(f"stage {stage} needs the published prefix of: {', '.join(missing)}")
    return spec


def translate_all(job: JobDocument, deployment: Deployment) -> list[dict[str, Any]]:
    """Every stage's first attempt, each wired to the previous one's published prefix (for display)."""
    specs, upstream = [], {}
    for stage in stages_of(job):
        spec = translate(job, deployment, stage, 1, upstream)
        upstream[stage] = spec["Tasks"][0]["Publisher"]["Params"]["Key"]
        specs.append(spec)
    return specs
