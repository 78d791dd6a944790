"""What a job costs, estimated from its stage times and the deployment's hourly prices.

GPU time is the training stage on a GPU (times the GPUs it holds); everything else is CPU time.
docs/deploy.md explains the figures; records and the console show the result.
"""

from __future__ import annotations

from typing import Any

from .settings import Settings


def estimate(stage_seconds: dict[str, float], device: str | None, gpus: int, settings: Settings) -> dict[str, Any]:
    """`gpu_seconds`, `cpu_seconds` and `estimated_cost_usd` of a finished run."""
    train = stage_seconds.get("train") or 0.0
    on_gpu = device == "cuda"
    gpu_seconds = train * max(gpus, 1) if on_gpu else 0.0
    cpu_seconds = sum(v or 0.0 for v in stage_seconds.values()) - (train if on_gpu else 0.0)
    cost = gpu_seconds / 3600 * settings.gpu_hour_usd + cpu_seconds / 3600 * settings.cpu_hour_usd
    return {"gpu_seconds": round(gpu_seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "estimated_cost_usd": round(cost, 4)}


def running(seconds: float, backend: str | None, settings: Settings) -> float:
    """A running job's cost so far: a GPU hour on Bacalhau or SageMaker, a CPU hour locally."""
    rate = settings.gpu_hour_usd if backend in ("bacalhau", "sagemaker") else settings.cpu_hour_usd
    return round(seconds / 3600 * rate, 4)
