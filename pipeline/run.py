"""Run the pipeline: the stages in order (or the ones asked for), skipping what is up to date."""

from __future__ import annotations

import fcntl
import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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
LOCK = ".lock"


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
    with holding(work):
        return _run(selected, input_path, work, config, force, on_stage, on_done)


def _run(selected: tuple[str, ...], input_path: Path | None, work: Path, config: PipelineConfig, force: bool,
         on_stage: Callable, on_done: Callable) -> RunSummary:
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


@contextmanager
def holding(work: Path) -> Iterator[None]:
    """One run at a time in a work folder: an exclusive lock on `work/.lock`, held for the whole run
    and let go by the kernel when the process ends, however it ends. A second run waits for the first
    (then finds its stages up to date), where two at once would write the same files. The holder's
    pid is in the file, for the message of whoever waits."""
    try:
        fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:  # a link planted at .lock, a folder in its place, a read-only disk
        raise InputError(f"{work / LOCK} cannot be opened to lock the folder for this run ({exc.strerror}); "
                         "remove what is there, or choose another output folder.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            print(f"waiting for the run that holds {work} (pid {holder}) to end", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # lets go of the lock
