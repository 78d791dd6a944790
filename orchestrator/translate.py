"""Job document → Bacalhau job specs, from the YAML templates in `jobspecs/`.

A job runs either as one Bacalhau job (`all`, on a GPU node) or, with `compute.split_stages`, as
three: `preprocess` (frames + SfM, CPU) → `train` (GPU) → `export` (CPU), each reading the previous
one's published prefix. Every attempt gets a unique Name (Bacalhau ≥ 1.8 would update a job of the
same name) and carries our job id in Labels and Meta, so an attempt can be found again by label
after a crash. What each stage asks of its node comes from the deployment (`Settings.resources`).

Published layout (the S3 publisher puts each ResultPath under `<Key><Name>/`, and the task's
`stdout`, `stderr` and `exitCode` beside them; pkg/publisher/s3/publisher.go):

    <output>frames/ sfm/ train/ export/ stdout stderr exitCode    a single job: a local run's layout
    <output>work/<attempt>/frames/ sfm/                            split: preprocess
    <output>work/<attempt>/train/                                  split: train
    <output>export/                                                split: export
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from typing import Any

import yaml

from codsplat.jobspecs import HERE as TEMPLATES

from .compute import attempt_name, stages_of
from .job import JobDocument
from .settings import Settings

VARIABLE = re.compile(r"\$\{([a-z_]+)\}")
GPU_STAGES = ("all", "train")


def publish_key(job: JobDocument, settings: Settings, stage: str, name: str) -> str:
    base = job.output_uri(settings.policy).key
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


def gpus_for(job: JobDocument, stage: str) -> int:
    return job.compute.gpus if stage in GPU_STAGES else 0


def translate(job: JobDocument, settings: Settings, stage: str = "all", attempt: int = 1,
              upstream: dict[str, str] | None = None) -> dict[str, Any]:
    """The Bacalhau Job (as the JSON the API takes) for one attempt of one stage.

    `upstream` maps earlier stages to the prefixes they published ("preprocess" → "results/x/work/...").
    """
    if stage not in ("all", "preprocess", "train", "export"):
        raise ValueError(f"unknown stage {stage!r}")
    upstream = upstream or {}
    name = attempt_name(job.id, stage, attempt)
    compute = job.compute
    res = settings.resources[stage]
    gpus = gpus_for(job, stage)
    execution = compute.max_runtime_minutes * 60
    queue = compute.queue_timeout_minutes * 60
    values = {
        "name": name, "namespace": settings.bacalhau_namespace, "job_id": job.id, "attempt": str(attempt),
        # pinned: a GPU stage whose container cannot use the GPU (no NVIDIA runtime, kernels that do not load)
        # stops at once with exit 5 instead of training on the node's CPU until its time limit
        "image": settings.image, "settings": job.worker_settings(device="cuda" if gpus else "cpu"),
        "bucket": settings.bucket, "input_key": job.input_uri.key,
        "publish_key": publish_key(job, settings, stage, name),
        "preprocess_key": upstream.get("preprocess", ""), "train_key": upstream.get("train", ""),
        "cpu": res.cpu, "memory": res.memory, "disk": res.disk, "gpus": str(gpus),
        "execution_timeout": execution, "queue_timeout": queue, "total_timeout": execution + queue,
    }
    spec = _fill(copy.deepcopy(template(stage)), values)
    task = spec["Tasks"][0]
    if gpus == 0:
        task["Resources"].pop("GPU", None)
    if gpus and compute.gpu_model:  # nodes label their first GPU's model as GPU-0, spaces as dashes
        spec = {**{k: v for k, v in spec.items() if k != "Tasks"},
                "Constraints": [{"Key": "GPU-0", "Operator": "=", "Values": [compute.gpu_model]}], "Tasks": spec["Tasks"]}
        task = spec["Tasks"][0]
    for params in [s["Source"]["Params"] for s in task["InputSources"]] + [task["Publisher"]["Params"]]:
        if settings.region:
            params["Region"] = settings.region
        if settings.s3_endpoint:
            params["Endpoint"] = settings.s3_endpoint
    missing = [s["Alias"] for s in task["InputSources"] if not s["Source"]["Params"]["Key"]]
    if missing:
        raise ValueError(f"stage {stage} needs the published prefix of: {', '.join(missing)}")
    return spec


def published(spec: dict[str, Any]) -> str:
    return spec["Tasks"][0]["Publisher"]["Params"]["Key"]


def translate_all(job: JobDocument, settings: Settings) -> list[dict[str, Any]]:
    """Every stage's first attempt, each wired to the previous one's published prefix (for display)."""
    specs, upstream = [], {}
    for stage in stages_of(job):
        spec = translate(job, settings, stage, 1, upstream)
        upstream[stage] = published(spec)
        specs.append(spec)
    return specs
