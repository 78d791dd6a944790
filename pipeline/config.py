"""Pipeline settings: the `frames`, `sfm`, `train` and `export` sections of a job document.

Settings are layered: the model's defaults, then a preset (`tiny`, `fast`, `quality`), then what the
user wrote. Each stage's fingerprint covers only its own section, so changing `export` re-runs export
alone and changing `train.steps` keeps the frames and the SfM model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .contract import PRESETS
from .errors import InputError
from .validation import StrictModel, explain

PRESET_DIR = Path(__file__).with_name("presets")


class FramesConfig(StrictModel):
    """How frames are taken from a video (and how large any image may be)."""

    max: int = Field(300, ge=2, le=5000, description="Most frames to keep from a video.")
    max_side: int = Field(1600, ge=64, le=8192, description="Downscale so the long side fits this many pixels.")
    start: float | None = Field(None, ge=0, description="Seconds into the video to start sampling.")
    stop: float | None = Field(None, gt=0, description="Seconds into the video to stop sampling.")
    min_difference: float = Field(
        1.5, ge=0, le=50,
        description="Drop a frame whose thumbnail differs from the last kept one by less than this (mean absolute 0-255).",
    )

    @model_validator(mode="after")
    def _window(self):
        if self.start is not None and self.stop is not None and self.stop <= self.start:
            raise ValueError(f"frames.stop ({self.stop}) must be after frames.start ({self.start})")
        return self


class SfmConfig(StrictModel):
    """Structure from motion with pycolmap."""

    matcher: Literal["auto", "sequential", "exhaustive"] = Field(
        "auto", description="auto: sequential for video, exhaustive for up to 60 photos, else sequential."
    )
    mapper: Literal["global", "incremental"] = Field(
        "global", description="global (GLOMAP) recovers unknown focal lengths more reliably."
    )
    max_features: int = Field(8192, ge=256, le=65536, description="SIFT features per image.")
    overlap: int = Field(10, ge=1, le=100, description="Sequential matching: neighbours matched on each side.")
    loop_detection: bool = Field(True, description="Sequential matching: also match frames that look alike far apart.")
    camera_model: Literal["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"] = "SIMPLE_RADIAL"
    single_camera: bool = Field(True, description="All frames share one camera (true for a video).")
    min_registered_fraction: float = Field(
        0.5, ge=0.05, le=1.0, description="Fail unless at least this share of the frames registers."
    )
    min_registered: int = Field(5, ge=3, description="Fail unless at least this many frames register.")


class TrainConfig(StrictModel):
    """Gaussian splat training (gsplat on CUDA, the torch tile rasterizer on the CPU)."""

    steps: int = Field(30000, ge=100, le=1_000_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_side: int | None = Field(None, ge=16, description="Train at this long side (downscaled from the SfM images).")
    sh_degree: int = Field(3, ge=0, le=3)
    sh_degree_interval: int = Field(1000, ge=1, description="Steps between raising the SH degree by one.")
    strategy: Literal["default", "mcmc"] = Field("default", description="mcmc needs CUDA.")
    cap_max: int = Field(1_000_000, ge=1000, description="Most Gaussians (mcmc).")
    test_every: int = Field(8, ge=2, description="Every n-th image is held out and never trained on.")
    refine_start: int = Field(500, ge=0)
    refine_stop: int = Field(15000, ge=0)
    refine_every: int = Field(100, ge=1)
    reset_every: int = Field(3000, ge=0, description="Opacity reset period; 0 turns it off.")
    grow_grad2d: float = Field(0.0002, gt=0)
    ssim_lambda: float = Field(0.2, ge=0, le=1)
    init_opacity: float = Field(0.1, gt=0, lt=1)
    means_lr: float = Field(1.6e-4, gt=0)
    seed: int = 0


class ExportConfig(StrictModel):
    formats: list[Literal["ply", "splat", "spz"]] = Field(default_factory=lambda: ["ply", "splat", "spz"], min_length=1)
    min_psnr: float = Field(
        15.0, ge=0, description="Quality gate: a splat whose held-out PSNR is lower is not exported."
    )
    previews: bool = True


class PipelineConfig(StrictModel):
    """Everything `codsplat run` needs besides the input and the output folder."""

    preset: Literal["tiny", "fast", "quality"] | None = None
    frames: FramesConfig = Field(default_factory=FramesConfig)
    sfm: SfmConfig = Field(default_factory=SfmConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")


def preset_settings(name: str) -> dict[str, Any]:
    return json.loads((PRESET_DIR / f"{name}.json").read_text())


def merge(base: dict, over: dict) -> dict:
    """Deep-merge `over` into `base` (objects merge, everything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(settings: dict[str, Any] | None = None, preset: str | None = None) -> PipelineConfig:
    """Layer defaults < preset < settings, validate, and report every problem at once."""
    settings = dict(settings or {})
    name = preset or settings.get("preset")
    if name is not None and name not in PRESETS:
        raise InputError(f"preset: must be one of {', '.join(PRESETS)}, got {name!r}.")
    layered = merge(preset_settings(name), settings) if name else settings
    if name:
        layered["preset"] = name
    try:
        return PipelineConfig.model_validate(layered)
    except ValidationError as exc:
        problems = explain(exc, PipelineConfig)
        raise InputError(
            f"The settings have {len(problems)} problem{'s' if len(problems) > 1 else ''}: " + "; ".join(problems) + "."
        ) from None


def read_document(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML document, naming the file and the spot when it does not parse."""
    if not path.is_file():
        raise InputError(f"Config file {path} does not exist.")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}.") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold an object with keys such as frames, sfm, train, export.")
    return data


def load_pipeline_config(path: Path | None, preset: str | None = None) -> PipelineConfig:
    """Settings from a file. A full job document is accepted too: its pipeline sections are used."""
    data = read_document(path) if path else {}
    if "input" in data or "output" in data or "version" in data:  # a job document: take its pipeline part
        data = {k: v for k, v in data.items() if k in PipelineConfig.model_fields}
    return build_config(data, preset)
