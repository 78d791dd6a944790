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
    start: float | None = Field(None, ge=0, le=86_400, description="Seconds into the video to start sampling.")
    stop: float | None = Field(None, gt=0, le=86_400, description="Seconds into the video to stop sampling.")
    min_difference: float = Field(
        1.5, ge=0, le=50,
        description="Drop a frame whose thumbnail differs from the last kept one by less than this (mean absolute 0-255).",
    )
    projection: Literal["perspective", "equirect"] = Field(
        "perspective", description="equirect: a 360° capture (2:1 equirectangular frames), each frame cut into five "
        "90° views (front, right, back, left, up) that SfM places as one rig.")
    masks: bool = Field(True, description="Use the masks in a masks/ folder beside the photos (white: the subject, "
                        "black: background), matched by file name: SfM finds no features on the background, training "
                        "ignores it and leaves it transparent.")

    @model_validator(mode="after")
    def _window(self):
        if self.start is not None and self.stop is not None and self.stop <= self.start:
            raise ValueError(f"frames.stop ({self.stop}) must be after frames.start ({self.start})")
        return self


class SfmConfig(StrictModel):
    """Structure from motion with pycolmap."""

    matcher: Literal["auto", "sequential", "exhaustive"] = Field(
        "auto", description="auto: with sfm.poses use or refine, the frames the poses say look at the same things; "
        "else sequential for video, exhaustive for up to 60 photos, else sequential."
    )
    mapper: Literal["global", "incremental"] = Field(
        "global", description="global (GLOMAP) recovers unknown focal lengths more reliably."
    )
    max_features: int = Field(8192, ge=256, le=65536, description="SIFT features per image.")
    overlap: int = Field(10, ge=1, le=100, description="Sequential matching: neighbours matched on each side.")
    loop_detection: bool = Field(True, description="Sequential matching: also match frames that look alike far apart.")
    camera_model: Literal["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"] = "SIMPLE_RADIAL"
    poses: Literal["ignore", "use", "refine"] = Field(
        "ignore", description="Camera poses given with the photos (a transforms.json, or a COLMAP model in sparse/0/, "
        "beside them): use them as given (points are triangulated, no mapping), refine them (bundle adjustment "
        "from them), or ignore them and find the poses from the photos.")
    single_camera: bool = Field(True, description="All frames share one camera (true for a video).")
    min_registered_fraction: float = Field(
        0.5, ge=0.05, le=1.0, description="Fail unless at least this share of the frames registers."
    )
    min_registered: int = Field(5, ge=3, le=5000, description="Fail unless at least this many frames register.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="RANSAC and mapper seed (its own: a stage's fingerprint "
                      "covers only its own section).")
    deterministic: bool = Field(True, description="Match and map on one thread, so the same frames give the same "
                                "model: with more, the CPU matcher's matches differ between runs, and bundle adjustment's "
                                "threads add up in the order they finish. false uses every CPU (faster on large captures; "
                                "points may then differ by about 2% between runs).")


# Where each strategy starts the Gaussians (opacity, scale factor), as gsplat's simple_trainer does: MCMC
# starts them opaque and small, and its relocation and noise grow what the images ask for
STRATEGY_START = {"default": (0.1, 1.0), "mcmc": (0.5, 0.1)}


class TrainConfig(StrictModel):
    """Gaussian splat training (gsplat on CUDA, the torch tile rasterizer on the CPU)."""

    steps: int = Field(30000, ge=100, le=1_000_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_side: int | None = Field(None, ge=16, le=8192, description="Train at this long side (downscaled from the SfM images).")
    sh_degree: int = Field(3, ge=0, le=3)
    sh_degree_interval: int = Field(1000, ge=1, le=1_000_000, description="Steps between raising the SH degree by one.")
    strategy: Literal["default", "mcmc"] = Field("default", description="mcmc needs CUDA.")
    cap_max: int = Field(1_000_000, ge=1000, le=20_000_000, description="Most Gaussians (mcmc).")
    test_every: int = Field(8, ge=2, le=1000, description="Every n-th image is held out and never trained on.")
    refine_start: int = Field(500, ge=0, le=1_000_000)
    refine_stop: int = Field(15000, ge=0, le=1_000_000)
    refine_every: int = Field(100, ge=1, le=1_000_000)
    reset_every: int = Field(3000, ge=0, le=1_000_000, description="Opacity reset period; 0 turns it off.")
    grow_grad2d: float = Field(0.0002, gt=0, le=1)
    ssim_lambda: float = Field(0.2, ge=0, le=1)
    init_opacity: float | None = Field(None, gt=0, lt=1, description="Opacity the Gaussians start at; by default "
                                       "the strategy's, as gsplat's simple_trainer: 0.1 (default), 0.5 (mcmc).")
    init_scale: float | None = Field(None, gt=0, le=10, description="Their starting size, times the distance to the "
                                     "nearest SfM points; by default the strategy's: 1.0 (default), 0.1 (mcmc).")
    means_lr: float = Field(1.6e-4, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Random seed (numpy and torch take 32 bits).")


    @property
    def start(self) -> tuple[float, float]:
        """The Gaussians' starting opacity and scale factor: as given, or the strategy's own."""
        opacity, scale = STRATEGY_START[self.strategy]
        return (opacity if self.init_opacity is None else self.init_opacity,
                scale if self.init_scale is None else self.init_scale)


class ExportConfig(StrictModel):
    formats: list[Literal["ply", "splat", "spz"]] = Field(default_factory=lambda: ["ply", "splat", "spz"], min_length=1)
    min_psnr: float = Field(
        15.0, ge=0, le=100, description="Quality gate: a splat whose held-out PSNR is lower is not exported."
    )
    previews: bool = True
    mesh: bool = Field(False, description="Also a coloured triangle mesh (mesh.ply, mesh.glb): depth rendered from "
                       "every view, fused in a TSDF volume, extracted with marching cubes, on the CPU.")
    mesh_resolution: int = Field(160, ge=32, le=256, description="Voxels along the mesh volume's longest side: detail "
                                 "against time and memory, both cubic in it (the export process peaks near 1.2 GB at "
                                 "160 and 2.4 GB at 256, within the export stage's 4 GB).")


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


MAX_DOCUMENT_BYTES = 64 * 1024  # a job document is a few hundred bytes; settings a few kB
MAX_DEPTH = 16  # the deepest a valid document nests is 3
MAX_NODES = 10_000  # values in a parsed document (YAML aliases count each time they are used)


def parse_document(raw: bytes, origin: str, yaml_ok: bool = False, max_bytes: int = MAX_DOCUMENT_BYTES) -> dict[str, Any]:
    """A JSON (or YAML) document from untrusted bytes, bounded before it is parsed: its size, its
    nesting and the values it expands to. Every refusal names `origin` and what would be valid."""
    if len(raw) > max_bytes:
        raise InputError(f"{origin} is {len(raw):,} bytes; a document may be at most {max_bytes // 1024} KiB.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{origin} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON.") from None
    depth = _nesting(text)
    if depth > MAX_DEPTH:
        raise InputError(f"{origin} nests {depth} levels deep; a document nests at most {MAX_DEPTH}.")
    try:
        data = yaml.safe_load(text) if yaml_ok else json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{origin} is not valid YAML: {str(exc)[:200]}.") from None
    except RecursionError:
        raise InputError(f"{origin} nests too deeply; a document nests at most {MAX_DEPTH} levels.") from None
    limit = max(MAX_NODES, max_bytes // 16)  # a larger document (transforms.json) may hold more
    if _count(data, limit) > limit:
        raise InputError(f"{origin} expands to more than {limit:,} values; a job or settings document holds a few dozen.")
    if not isinstance(data, dict):
        raise InputError(f"{origin} must hold an object with keys such as frames, sfm, train, export.")
    return data


def _nesting(text: str) -> int:
    """The deepest bracket nesting outside strings (JSON's [ and {, YAML's flow style; YAML's block
    style nests by indentation, which the node count bounds)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _count(value: Any, limit: int, budget: list[int] | None = None) -> int:
    """Values in a parsed document, stopping once past `limit` (shared YAML aliases count each use)."""
    budget = budget if budget is not None else [0]
    budget[0] += 1
    if budget[0] <= limit and isinstance(value, (dict, list)):
        for item in (value.values() if isinstance(value, dict) else value):
            if budget[0] > limit:
                break
            _count(item, limit, budget)
    return budget[0]


def read_document(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML file, bounded as any untrusted document (`parse_document`)."""
    if not path.is_file():
        raise InputError(f"Config file {path} does not exist.")
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        raise InputError(f"{path} is {size:,} bytes; a document may be at most {MAX_DOCUMENT_BYTES // 1024} KiB.")
    return parse_document(path.read_bytes(), str(path), yaml_ok=path.suffix.lower() in (".yaml", ".yml"))


def load_pipeline_config(path: Path | None, preset: str | None = None, flags: dict[str, Any] | None = None) -> PipelineConfig:
    """Settings from a file. A full job document is accepted too: its pipeline sections are used.
    `flags` (what command-line switches set) override the file."""
    data = read_document(path) if path else {}
    if "input" in data or "output" in data or "version" in data:  # a job document: take its pipeline part
        data = {k: v for k, v in data.items() if k in PipelineConfig.model_fields}
    return build_config(merge(data, flags) if flags else data, preset)
