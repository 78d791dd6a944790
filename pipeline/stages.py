"""Stages, their manifests, and skipping what is already done.

A run is four stages, each writing into its own folder of the work directory:

    frames/  ingest: the kept frames and why           (CPU)
    sfm/     structure from motion, undistorted images (CPU, or pycolmap's CUDA SIFT)
    train/   the trained Gaussians and held-out renders (GPU; the CPU rasterizer otherwise)
    export/  .ply/.splat/.spz, metrics.json, previews, report.html

Each folder ends with `manifest.json`: the stage's fingerprint (its settings plus the fingerprint of
what it read), its statistics, time and peak memory. A stage whose fingerprint is unchanged and whose
outputs are all present is skipped. Because a stage reads only the folders of earlier stages, a job
can be split across machines (Bacalhau's preprocess → train → export) by carrying the work directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import psutil

from .config import PipelineConfig
from .contract import GROUPS, MANIFEST, PROGRESS, RUN_LOG, STAGES
from .errors import InputError

FORMAT_VERSION = 1  # bump when a stage's outputs change meaning, so old work directories re-run

Progress = Callable[[float, str], None]  # (fraction done 0..1, short note)


@dataclass
class StageContext:
    work: Path
    config: PipelineConfig
    input: Path | None = None
    progress: Progress = lambda fraction, note: None

    def dir(self, stage: str) -> Path:
        return self.work / stage

    def manifest(self, stage: str) -> dict[str, Any]:
        """The manifest of an earlier stage that this one reads, or a clear error naming what to run."""
        path = self.dir(stage) / MANIFEST
        if not path.is_file():
            group = next(g for g, members in GROUPS.items() if stage in members and g != "all")
            raise InputError(
                f"The {stage} stage has not run in {self.work}: {path} is missing.",
                hint=f"Run `codsplat run ... --stage {group}` first, or copy that stage's folder here.",
            )
        return json.loads(path.read_text())


class StageFn(Protocol):
    def __call__(self, ctx: StageContext) -> dict[str, Any]: ...


@dataclass
class StageResult:
    stage: str
    manifest: dict[str, Any]
    skipped: bool = False


class ProgressFile:
    """Writes `progress.json` in the work folder: the stage, its fraction and the run's overall
    fraction. At most once a `every` seconds (a stage's end always), atomically."""

    def __init__(self, work: Path, stages: tuple[str, ...], every: float = 1.0):
        self.path, self.stages, self.every = work / PROGRESS, stages, every
        self._last = float("-inf")

    def reporter(self, stage: str) -> Progress:
        index = self.stages.index(stage)

        def report(fraction: float, note: str) -> None:
            if fraction < 1.0 and time.monotonic() - self._last < self.every:
                return
            self._last = time.monotonic()
            body = {"stage": stage, "stage_fraction": round(fraction, 4), "note": note,
                    "fraction": round((index + fraction) / len(self.stages), 4),
                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            tmp.replace(self.path)

        return report


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_path(path: Path) -> str:
    """Content hash of a file, or of every plain file under a folder (names as bytes, and contents;
    links are not followed: ingest does not read them either)."""
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        files = sorted(Path(folder) / name for folder, _, names in os.walk(path) for name in names
                       if not (Path(folder) / name).is_symlink() and (Path(folder) / name).is_file())
    for file in files:
        digest.update(os.fsencode(file.relative_to(path if path.is_dir() else path.parent)))
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(ctx: StageContext, stage: str) -> str:
    """What a stage's result depends on: its own settings and what it reads."""
    if stage == "frames":
        if ctx.input is None:
            raise InputError("The frames stage needs an INPUT: a video, a folder of images or a .zip of images.")
        upstream = hash_path(ctx.input)
    else:
        upstream = ctx.manifest(STAGES[STAGES.index(stage) - 1])["fingerprint"]
    return hash_json({"v": FORMAT_VERSION, "stage": stage, "settings": ctx.config.section(stage), "upstream": upstream})


def process_peak_rss() -> int:
    """This process's peak resident memory in bytes: the kernel's high-water mark of its own address
    space (VmHWM). getrusage's ru_maxrss is not that: Linux carries into it the parent's resident memory
    at the fork before exec, so a worker started by a large process (a test run, a daemon) reports the
    parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, which has /proc anyway


class PeakMemory:
    """Peak resident memory of this process while a block runs, sampled in a thread.

    getrusage's ru_maxrss is the peak of the whole process life; per-stage figures need sampling.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process(os.getpid())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _outputs_present(stage_dir: Path, manifest: dict[str, Any]) -> bool:
    return all((stage_dir / rel).is_file() for rel in manifest.get("outputs", []))


def run_stage(name: str, fn: StageFn, ctx: StageContext, force: bool = False) -> StageResult:
    """Run one stage unless its fingerprint and outputs show it is already done."""
    stage_dir = ctx.dir(name)
    fp = fingerprint(ctx, name)
    manifest_path = stage_dir / MANIFEST
    if not force and manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fp and _outputs_present(stage_dir, old):
            ctx.progress(1.0, "up to date")
            return StageResult(name, old, skipped=True)
    manifest_path.unlink(missing_ok=True)  # a stage that dies half way must not look finished
    stage_dir.mkdir(parents=True, exist_ok=True)

    gpu = _cuda()
    if gpu:
        gpu.reset_peak_memory_stats()
    started = time.perf_counter()
    with PeakMemory() as mem:
        stats = fn(ctx)
    outputs = sorted(
        str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    manifest = {
        "stage": name,
        "fingerprint": fp,
        "settings": ctx.config.section(name),
        "stats": stats,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(mem.peak / 2**20, 1),
        "peak_gpu_mb": round(gpu.max_memory_allocated() / 2**20, 1) if gpu else None,
        "process_peak_rss_mb": round(process_peak_rss() / 2**20, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outputs": outputs,
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(manifest_path)  # the manifest appears whole or not at all
    with open(ctx.work / RUN_LOG, "a") as fh:  # every completed execution of a stage, for audits
        fh.write(json.dumps({"stage": name, "fingerprint": fp, "finished_at": manifest["finished_at"],
                             "seconds": manifest["seconds"]}) + "\n")
    return StageResult(name, manifest)


def _cuda():
    """torch's CUDA module if this process has loaded torch (a stage that trains has, with its module)
    and sees a GPU; a frames or sfm stage does not load torch only to ask."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


@dataclass
class RunSummary:
    work: Path
    results: list[StageResult] = field(default_factory=list)

    def manifest(self, stage: str) -> dict[str, Any] | None:
        for result in self.results:
            if result.stage == stage:
                return result.manifest
        path = self.work / stage / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None
