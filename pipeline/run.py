"""Run the pipeline: the stages in order (or the ones asked for), skipping what is up to date."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from . import cpus, ingest
from .config import PipelineConfig
from .errors import InputError
from .contract import GROUPS, STAGES
from .stages import ProgressFile, RunSummary, StageContext, run_stage

# Each stage's module is imported when the stage runs: a frames or sfm stage on its own (a split job's
# first steps) never loads torch, whose import alone is half a gigabyte of resident memory.
STAGE_MODULES = {"frames": "ingest", "sfm": "sfm", "train": "train", "export": "export"}
TORCH_STAGES = ("train", "export")
STAGE_CHOICES = tuple(GROUPS) + tuple(s for s in STAGES if s not in GROUPS)


def stages_for(selection: str) -> tuple[str, ...]:
    if selection in GROUPS:
        return GROUPS[selection]
    if selection in STAGES:
        return (selection,)
    raise InputError(f"--stage must be one of {', '.join(STAGE_CHOICES)}, got '{selection}'.")


def run_pipeline(
    input_path: Path | None,
    work: Path,
    config: PipelineConfig,
    *,
    stage: str = "all",
    force: bool = False,
    on_stage: Callable[[str], Callable[[float, str], None]] = lambda name: (lambda f, n: None),
    on_done: Callable[[str, dict, bool], None] = lambda name, manifest, skipped: None,
) -> RunSummary:
    """Run `stage` (a stage or a group) in `work`. `on_stage(name)` returns that stage's progress
    callback; `on_done(name, manifest, skipped)` is told when each one ends."""
    selected = stages_for(stage)
    if "frames" in selected and input_path is None:
        raise InputError("INPUT is required for the frames stage: a video, a folder of images or a .zip of images.")
    if input_path is not None:
        ingest.input_kind(input_path)  # fail on a bad input before any work starts
    if any(name in TORCH_STAGES for name in selected):
        cpus.configure()  # threads from the CPUs this process may use, set before torch loads (cpus.py says why)
    if "train" in selected:  # and on settings this machine cannot train with (no CUDA GPU)
        importlib.import_module(".train", __package__).choose_device(config.train)
    work.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(work)
    progress_file = ProgressFile(work, selected)
    for name in selected:
        shown, recorded = on_stage(name), progress_file.reporter(name)

        def progress(fraction: float, note: str, shown=shown, recorded=recorded) -> None:
            shown(fraction, note)
            recorded(fraction, note)

        ctx = StageContext(work=work, config=config, input=input_path, progress=progress)
        module = importlib.import_module(f".{STAGE_MODULES[name]}", __package__)
        result = run_stage(name, module.run, ctx, force=force)
        summary.results.append(result)
        on_done(name, result.manifest, result.skipped)
    return summary
