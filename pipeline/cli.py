"""`codsplat run`: the worker's command line (the control plane's `codsplat` loads this module for
`run` alone, so that its other commands never import torch).

Exit codes (also in `codsplat run --help`, `codsplat exit-codes` and the README): see
`contract.EXIT_CODES`.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import load_pipeline_config
from .contract import EXIT_CODES, PRESETS, VIDEO_SUFFIXES
from .errors import EXIT_INTERRUPTED, PipelineError
from .report import err, fail
from .run import STAGE_CHOICES, run_pipeline

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="codsplat: video or photos in, 3D Gaussian splat out.",
    pretty_exceptions_enable=False,
)
EXIT_HELP = "Exit codes: " + "; ".join(f"{c.code} {c.meaning}" for c in EXIT_CODES.values()) + "."


@app.callback()
def worker() -> None:
    """codsplat's worker: video or photos in, 3D Gaussian splat out."""


def summary_table(summary) -> Table:
    frames, sfm, train, export = (summary.manifest(s) or {} for s in ("frames", "sfm", "train", "export"))
    table = Table(title="codsplat run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if frames:
        table.add_row("frames", f"{frames['stats']['kept']} kept of {frames['stats']['candidates']} candidates")
    if sfm:
        s = sfm["stats"]
        table.add_row("registered", f"{s['registered_images']}/{s['total_images']} images, "
                                    f"{s['points3d']:,} points, {s['mean_reprojection_error_px']:.2f} px error")
    if train:
        t = train["stats"]
        table.add_row("Gaussians", f"{t['gaussians']:,} ({t['steps']} steps on {t['device']})")
        table.add_row("held-out PSNR", f"{t['psnr']:.2f} dB (SSIM {t['ssim']:.3f}, {t['test_views']} views)")
    times = " · ".join(f"{r.stage} " + ("skipped" if r.skipped else f"{r.manifest['seconds']:.1f} s") for r in summary.results)
    table.add_row("time", times)
    if export:
        files = [summary.work / "export" / f["file"] for f in export["stats"]["files"].values()]
        table.add_row("files", "\n".join(str(f) for f in files + [summary.work / "export" / "report.html"]))
    return table


def result_json(summary) -> dict:
    return {
        "ok": True,
        "work": str(summary.work),
        "stages": {r.stage: {"skipped": r.skipped, "seconds": r.manifest["seconds"],
                             "peak_rss_mb": r.manifest["peak_rss_mb"], "stats": r.manifest["stats"]}
                   for r in summary.results},
        "metrics": str(summary.work / "export" / "metrics.json") if summary.manifest("export") else None,
    }


@app.command(epilog=EXIT_HELP)
def run(
    input: Optional[Path] = typer.Argument(None, help=f"A video ({' '.join(VIDEO_SUFFIXES)}), a folder of .jpg/.png images, or a .zip of them. Not needed for --stage train/export."),
    out: Path = typer.Option(..., "--out", "-o", help="Work directory: frames/, sfm/, train/ and export/ are written here."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Settings (JSON or YAML): frames, sfm, train, export sections, or a whole job document."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help=f"One of {', '.join(PRESETS)}; the config's own keys override it."),
    stage: str = typer.Option("all", "--stage", "-s", help=f"Run only this stage or group: {', '.join(STAGE_CHOICES)}."),
    force: bool = typer.Option(False, "--force", help="Re-run stages even when their inputs and settings are unchanged."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result on stdout instead of progress and a table."),
    mesh: bool = typer.Option(False, "--mesh", help="Also a coloured triangle mesh, export/mesh.ply and mesh.glb (export.mesh: true)."),
) -> None:
    """Turn a capture into a Gaussian splat: frames → SfM → training → export."""
    try:
        settings = load_pipeline_config(config, preset, {"export": {"mesh": True}} if mesh else None)
        if as_json:
            summary = run_pipeline(input, out, settings, stage=stage, force=force)
            print(json.dumps(result_json(summary), indent=2))
            return
        columns = (SpinnerColumn(), TextColumn("[bold]{task.description:<7}"), BarColumn(), TaskProgressColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[note]}"))
        with Progress(*columns, console=err, transient=False) as progress:
            def on_stage(name):
                task = progress.add_task(name, total=1.0, note="")
                return lambda fraction, note: progress.update(task, completed=fraction, note=note)

            summary = run_pipeline(input, out, settings, stage=stage, force=force, on_stage=on_stage)
        err.print(summary_table(summary))
    except PipelineError as exc:
        fail(exc, as_json)
    except KeyboardInterrupt:
        interrupted()
    except MemoryError:
        fail(PipelineError("Ran out of memory.", hint="Lower frames.max_side or train.max_side."), as_json)
    except Exception as exc:  # a bug: say so plainly; the traceback only when asked for
        if caused_by_ctrl_c(exc):
            interrupted()
        if os.environ.get("CODSPLAT_DEBUG"):
            traceback.print_exc()
        fail(PipelineError(f"Internal error: {exc.__class__.__name__}: {exc}",
                           hint="Set CODSPLAT_DEBUG=1 for the traceback and report it."), as_json)


def interrupted() -> None:
    err.print("[red]interrupted[/red]; run the same command again to resume")
    raise typer.Exit(EXIT_INTERRUPTED)


def caused_by_ctrl_c(exc: BaseException) -> bool:
    """Ctrl-C inside a compiled kernel surfaces as a SystemError whose cause is the KeyboardInterrupt."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def main() -> None:
    app()


if __name__ == "__main__":
    main()
