"""The container's entrypoint: one image for Bacalhau jobs and SageMaker training jobs.

Bacalhau (`codsplat-entrypoint bacalhau ...`): inputs are mounted where the job spec puts them and
each stage folder is written under `--out`, where one ResultPath per stage (`/outputs/frames`, ...)
hands it to the S3 publisher. A split job passes the previous stages' published prefixes as
`--upstream` mounts; a stage folder is found in a mount however the publisher laid it out
(`<mount>/sfm/` or `<mount>/<result name>/sfm/`). Only the stages run here are written to `--out`,
so each stage publishes its own folder and nothing twice:

    codsplat-entrypoint bacalhau --stage preprocess --input /inputs/media --settings '{...}' --out /outputs
    codsplat-entrypoint bacalhau --stage train  --upstream /inputs/preprocess --settings '{...}' --out /outputs
    codsplat-entrypoint bacalhau --stage export --upstream /inputs/preprocess --upstream /inputs/train --settings '{...}' --out /outputs

Its stdout is one JSON line, the run's outcome (`contract.run_summary` on success, the error on
failure), because Bacalhau keeps only the first 2 KiB of stdout in the execution's RunOutput. Everything
else the process prints, ours or a native library's, goes to stderr: file descriptor 1 is pointed at
stderr for the run, and the outcome is written to the real stdout.

SageMaker (`codsplat-entrypoint train`, which is how SageMaker starts an image): the media channel is
`/opt/ml/input/data/media`, settings come from `/opt/ml/input/config/hyperparameters.json` (string
values: `preset`, `stage`, and `settings`: the same JSON text as Bacalhau's `--settings`). The work
directory is `/opt/ml/checkpoints` when SageMaker syncs one (so a restarted job resumes finished
stages, and the job's output prefix gets a local run's layout), else `/opt/ml/model`; the exports are
copied to `/opt/ml/model`, and the outcome line is written to `outcome.json` beside the stage folders
for the fallback state machine to record. On failure the reason, with `[exit N]`, goes to
`/opt/ml/output/failure`, which SageMaker shows as the job's FailureReason.

Every failure also leaves `error.json` with the stage, message and exit code: in Bacalhau mode in the
folder of the failed stage (or the first stage run here), since only stage folders are published.
In the image the work runs as the unprivileged `codsplat` user (pipeline/privileges.py says why the
image starts as root and how it stops being root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from .config import build_config, load_pipeline_config
from .contract import (ARCHIVE_SUFFIXES, ERROR_FILE, IMAGE_SUFFIXES, METRICS, OUTCOME_FILE, STAGES, VIDEO_SUFFIXES,
                       decode_settings, failure_text, outcome_line, run_summary)
from .errors import EXIT_INTERNAL, InputError, PipelineError
from .privileges import drop_privileges
from .run import STAGE_CHOICES, run_pipeline, stages_for

SM_ROOT_ENV = "CODSPLAT_SAGEMAKER_ROOT"  # lets tests point SageMaker mode at a folder of their own


def resolve_media(path: Path) -> Path:
    """A mounted input is a file, or a folder holding one video/zip, or a folder of images."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"Input mount {path} does not exist.")
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    single = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES + ARCHIVE_SUFFIXES]
    if len(single) == 1:
        return single[0]
    if len(single) > 1:
        raise InputError(f"Input mount {path} holds {len(single)} videos or archives; a job takes one.")
    images = {p.parent for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    if len(images) == 1:
        return images.pop()
    raise InputError(f"Input mount {path} holds no video, .zip or folder of images.")


def find_stage(mount: Path, stage: str) -> Path | None:
    """A finished stage folder (it has its manifest) in an upstream mount: `<mount>/<stage>/`, or
    one level down when the publisher put each result path under its name."""
    for candidate in [mount / stage, *sorted(p / stage for p in mount.iterdir() if p.is_dir())]:
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def assemble_work(scratch: Path, upstream: list[Path], out: Path, stages: tuple[str, ...]) -> Path:
    """A work directory whose earlier stages link to the read-only upstream mounts and whose
    stages to run link into `out`, so that only they are published."""
    work = scratch / "work"
    work.mkdir(parents=True, exist_ok=True)
    for mount in upstream:
        if not mount.is_dir():
            raise InputError(f"Upstream mount {mount} does not exist.")
        for stage in STAGES:
            found = find_stage(mount, stage) if stage not in stages and not (work / stage).exists() else None
            if found is not None:
                (work / stage).symlink_to(found.resolve(), target_is_directory=True)
    for stage in stages:
        (out / stage).mkdir(parents=True, exist_ok=True)
        link = work / stage
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(out.resolve() / stage, target_is_directory=True)
    return work


def _write_error(folder: Path, exc: PipelineError) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR_FILE).write_text(json.dumps(exc.to_dict(), indent=2))


@contextmanager
def stdout_for_outcome() -> Iterator[Callable[[str], None]]:
    """Point file descriptor 1 at stderr while the run goes on, and hand back a writer to the real
    stdout, so that nothing printed during the run can push the outcome line out of the first 2 KiB."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            yield lambda line: os.write(saved, (line + "\n").encode())
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def bacalhau(args: argparse.Namespace) -> int:
    with stdout_for_outcome() as say:
        return _bacalhau(args, say)


def _bacalhau(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    out = Path(args.out)
    stages = stages_for(args.stage)
    try:
        drop_privileges([out], readable=[Path(p) for p in [args.input, *args.upstream] if p])
        if args.settings is not None:
            config = build_config(decode_settings(args.settings, "--settings"), args.preset)
        else:
            config = load_pipeline_config(Path(args.config) if args.config else None, args.preset)
        media = resolve_media(Path(args.input)) if args.input else None
        with tempfile.TemporaryDirectory(prefix="codsplat-") as scratch:
            work = assemble_work(Path(scratch), [Path(u) for u in args.upstream], out, stages)
            summary = run_pipeline(media, work, config, stage=args.stage,
                                   on_done=lambda name, m, skipped: print(json.dumps(
                                       {"stage": name, "skipped": skipped, "seconds": m["seconds"],
                                        "stats": m["stats"]}), file=sys.stderr, flush=True))
            device = (summary.manifest("train") or {}).get("stats", {}).get("device")
            outcome = (run_summary(json.loads((work / METRICS).read_text()), device) if "export" in stages
                       else {"ok": True, "stages": [r.stage for r in summary.results]})
        say(outcome_line(outcome))
        return 0
    except PipelineError as exc:  # in the failed stage's folder: only stage folders are result paths
        _write_error(out / (exc.stage if exc.stage in stages else stages[0]), exc)
        say(outcome_line({"ok": False, **exc.to_dict()}))
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def sagemaker(root: Path) -> int:
    failure = root / "output" / "failure"
    model = root / "model"
    try:
        drop_privileges([model, failure.parent, root / "checkpoints"], readable=[root / "input"])
        hp_path = root / "input" / "config" / "hyperparameters.json"
        hp = json.loads(hp_path.read_text()) if hp_path.is_file() else {}
        unknown = set(hp) - {"preset", "stage", "settings"}
        if unknown:
            raise InputError(f"Unknown hyperparameters {sorted(unknown)}; valid: preset, stage, settings.")
        if not isinstance(hp.get("settings", "{}"), str):
            raise InputError("Hyperparameter 'settings' must be JSON text (SageMaker passes hyperparameters as strings).")
        config = build_config(decode_settings(hp.get("settings", "{}"), "Hyperparameter 'settings'"), hp.get("preset"))
        stage = hp.get("stage", "all")
        stages_for(stage)
        media_dir = root / "input" / "data" / "media"
        media = resolve_media(media_dir) if "frames" in stages_for(stage) else None
        checkpoints = root / "checkpoints"
        work = checkpoints if checkpoints.is_dir() else model
        summary = run_pipeline(media, work, config, stage=stage)
        if (work / METRICS).is_file():  # what the fallback records, as the daemon does from Bacalhau's stdout
            device = (summary.manifest("train") or {}).get("stats", {}).get("device")
            (work / OUTCOME_FILE).write_text(outcome_line(run_summary(json.loads((work / METRICS).read_text()), device)))
        if work != model and (work / "export").is_dir():
            shutil.copytree(work / "export", model / "export", dirs_exist_ok=True)
        if work != model and (work / OUTCOME_FILE).is_file():  # also in model.tar.gz: the record of a run whose sync failed
            shutil.copy2(work / OUTCOME_FILE, model / OUTCOME_FILE)
        return 0
    except PipelineError as exc:
        code = exc.exit_code
        message = str(exc)
    except Exception as exc:  # SageMaker needs the reason in the failure file, whatever it is
        code = EXIT_INTERNAL
        message = f"Internal error: {exc.__class__.__name__}: {exc}"
    failure.parent.mkdir(parents=True, exist_ok=True)
    failure.write_text(failure_text(message, code))
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # SageMaker runs `docker run IMAGE train`
        sys.exit(sagemaker(Path(os.environ.get(SM_ROOT_ENV, "/opt/ml"))))
    if argv[:1] != ["bacalhau"]:
        from .cli import main as cli_main  # anything else is the ordinary command line

        sys.argv = ["codsplat", *argv]
        cli_main()
        return
    parser = argparse.ArgumentParser(prog="codsplat-entrypoint bacalhau")
    parser.add_argument("--stage", default="all", choices=STAGE_CHOICES)
    parser.add_argument("--input", help="mounted media: a file, or a folder with one video/zip or with images")
    parser.add_argument("--upstream", action="append", default=[], help="a mounted folder of earlier stages' outputs")
    parser.add_argument("--config", help="the job document (JSON or YAML)")
    parser.add_argument("--settings", help="pipeline settings as JSON text (what the job specs pass)")
    parser.add_argument("--preset", choices=("tiny", "fast", "quality"))
    parser.add_argument("--out", required=True, help="the result path the publisher uploads")
    args = parser.parse_args(argv[1:])
    sys.exit(bacalhau(args))


if __name__ == "__main__":
    main()
