"""Export: the quality gate, the splat files, metrics.json, previews and report.html, and with
`export.mesh` a coloured triangle mesh (mesh.py).

Runs on a CPU node: it reads the trained Gaussians and the held-out renders that training made on
its own device, so nothing here needs a GPU. A splat below `export.min_psnr` on the held-out views,
or with no usable Gaussians, stops here and no file goes out.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from . import formats, mesh
from . import splats as splat_io
from .contract import STAGES
from .errors import QualityError
from .scene import load_scene
from .stages import StageContext
from .train import CAMERAS

PREVIEW_MIN_HEIGHT = 240
MESH_SIDE = 400  # the long side of the views the mesh's depth is rendered at


def sfm_weakness(sfm: dict[str, Any] | None) -> str | None:
    """What is weak about the SfM model training started from, in its own statistics; None when nothing is."""
    if not sfm:
        return None
    registered, total = sfm.get("registered_images", 0), sfm.get("total_images", 0)
    connected, stray = sfm.get("connected_images", total), len(sfm.get("stray_cameras_dropped") or [])
    kept = next((t for t in sfm.get("tries", []) if t.get("kept")), None)
    if registered >= 0.9 * total and not stray and not (kept and kept.get("weak")):
        return None
    tries = len(sfm.get("tries", [])) or 1
    return (f"the SfM model is the weak part: it placed {registered} of {total} frames (the verified matches connect "
            f"{connected}), dropped {stray} cameras as stray, after {tries} mapping {'try' if tries == 1 else 'tries'} "
            f"(sfm/sfm.json)")


def quality_gate(evaluation: dict[str, Any], params, min_psnr: float, sfm: dict[str, Any] | None = None) -> None:
    n = len(params["means"])
    if n == 0:
        raise QualityError("Training produced no Gaussians; there is nothing to export.", stage="export")
    psnr = evaluation["psnr"]
    if psnr is None or math.isnan(psnr):  # a score that is not one never passes the gate
        raise QualityError("The splat could not be scored on held-out views (no PSNR), so it was not exported.",
                           stage="export", hint="Keep more frames (frames.max) so that train.test_every holds some out.")
    if psnr < min_psnr:
        raise QualityError(
            f"The splat reaches {evaluation['psnr']} dB PSNR on the held-out views, below export.min_psnr "
            f"({min_psnr} dB), so it was not exported.",
            stage="export",
            hint=(f"Training is not what fell short: {weak}. Capture more views that overlap, or set sfm.mapper "
                  "or sfm.seed to map again." if (weak := sfm_weakness(sfm)) else
                  "Train longer (train.steps), use more frames, or check the SfM statistics in sfm/sfm.json."),
        )


def side_by_side(render: Path, photo: Path, out: Path) -> None:
    a, b = Image.open(render).convert("RGB"), Image.open(photo).convert("RGB")
    scale = max(1, -(-PREVIEW_MIN_HEIGHT // a.height))
    a = a.resize((a.width * scale, a.height * scale), Image.LANCZOS)
    b = b.resize(a.size, Image.LANCZOS)
    canvas = Image.new("RGB", (a.width * 2 + 8, a.height + 22), "white")
    canvas.paste(a, (0, 22))
    canvas.paste(b, (a.width + 8, 22))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 5), "splat (held-out view)", fill="black")
    draw.text((a.width + 12, 5), "photo", fill="black")
    canvas.save(out)


def run(ctx: StageContext) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = ctx.config.export
    train_dir, out = ctx.dir("train"), ctx.dir("export")
    manifests = {stage: ctx.manifest(stage) for stage in STAGES[:-1]}
    evaluation = json.loads((train_dir / "eval.json").read_text())
    params, sh_degree = splat_io.load(train_dir / "splats.pt")
    finite = splat_io.finite_mask(params)
    params = {k: v[finite] for k, v in params.items()}
    quality_gate(evaluation, params, cfg.min_psnr, manifests["sfm"].get("stats"))

    for old in out.glob("splat.*"):
        old.unlink()
    files = {}
    for fmt in cfg.formats:
        path = out / f"splat.{fmt}"
        formats.write(params, sh_degree, fmt, path)
        files[fmt] = {"file": path.name, "bytes": path.stat().st_size}
        ctx.progress(0.2 + 0.5 * len(files) / len(cfg.formats), f"wrote {path.name}")

    mesh_stats = None
    if cfg.mesh:
        mesh_stats = write_mesh(ctx, params, sh_degree, out, files)
    if (train_dir / CAMERAS).is_file():  # so a viewer can open at a photo's viewpoint
        shutil.copyfile(train_dir / CAMERAS, out / CAMERAS)
    previews = []
    if cfg.previews:
        (out / "previews").mkdir(exist_ok=True)
        for view in evaluation["views"]:
            stem = Path(view["view"]).stem
            target = out / "previews" / f"{stem}.png"
            side_by_side(train_dir / "holdout" / f"{stem}.render.png", train_dir / "holdout" / f"{stem}.photo.png", target)
            previews.append(f"previews/{stem}.png")

    stages = {name: {"seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"], "peak_gpu_mb": m.get("peak_gpu_mb")}
              for name, m in manifests.items()}
    stages["export"] = {"seconds": round(time.perf_counter() - started, 3)}
    metrics = {
        "psnr": evaluation["psnr"],
        "ssim": evaluation["ssim"],
        "views": evaluation["views"],
        "gaussians": len(params["means"]),
        "gaussians_dropped_nonfinite": int((~finite).sum()),
        "sh_degree": sh_degree,
        "frames": manifests["frames"]["stats"],
        "sfm": {k: v for k, v in manifests["sfm"]["stats"].items() if k != "unregistered"},
        "train": manifests["train"]["stats"],
        "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages.values()), 2),
        "files": files,
        "previews": previews,
        "preset": ctx.config.preset,
        **({"mesh": mesh_stats} if mesh_stats else {}),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.html").write_text(report_html(metrics))
    ctx.progress(1.0, f"{len(files)} files")
    return {"gaussians": metrics["gaussians"], "psnr": metrics["psnr"], "ssim": metrics["ssim"], "files": files}


def write_mesh(ctx: StageContext, params: dict, sh_degree: int, out: Path, files: dict) -> dict[str, Any]:
    """mesh.ply and mesh.glb from every registered view (held-out ones too: the mesh is not scored on
    them), at the training resolution (at most MESH_SIDE), and how well it agrees with the SfM points."""
    started = time.perf_counter()
    cfg = ctx.config
    side = min(cfg.train.max_side or MESH_SIDE, MESH_SIDE)
    scene = load_scene(ctx.dir("sfm") / "undistorted", side, cfg.train.test_every)
    progress = lambda f, note: ctx.progress(0.7 + 0.2 * f, f"mesh: {note}")  # noqa: E731
    for old in out.glob("mesh.*"):
        old.unlink()
    built = mesh.build(params, sh_degree, scene.train + scene.test, scene.points, cfg.export.mesh_resolution, progress)
    if built is None:
        raise QualityError("export.mesh: no surface could be fused from the splat's rendered depth.", stage="export",
                           hint="Train longer or on more views, or leave export.mesh off for this capture.")
    for fmt in ("ply", "glb"):
        path = out / f"mesh.{fmt}"
        built.export(path)
        files[f"mesh_{fmt}"] = {"file": path.name, "bytes": path.stat().st_size}
    tolerance = 0.01 * mesh.extent(scene.points)
    return {"vertices": len(built.vertices), "faces": len(built.faces), "resolution": cfg.export.mesh_resolution,
            "views": len(scene.train) + len(scene.test), **mesh.agreement(built, scene.points, tolerance),
            "seconds": round(time.perf_counter() - started, 2)}


def report_html(m: dict[str, Any]) -> str:
    """A page a person opens to judge the result: the numbers, then every held-out view."""
    e = html.escape
    sfm, train, frames = m["sfm"], m["train"], m["frames"]
    rows = [
        ("Held-out PSNR", f"{m['psnr']:.2f} dB"), ("Held-out SSIM", f"{m['ssim']:.3f}"),
        ("Gaussians", f"{m['gaussians']:,}"), ("Frames kept", f"{frames['kept']} ({frames['kind']})"),
        ("Registered", f"{sfm['registered_images']}/{sfm['total_images']}"),
        ("Reprojection error", f"{sfm['mean_reprojection_error_px']:.3f} px"),
        ("Training", f"{train['steps']} steps on {train['device']} at {train['resolution'][0]}×{train['resolution'][1]}, "
                     f"{train['steps_per_s']} steps/s"),
        ("Total time", f"{m['total_seconds']:.1f} s"),
    ]
    summary = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    stages = "".join(
        f"<tr><td>{e(n)}</td><td>{s['seconds']:.1f} s</td><td>{s.get('peak_rss_mb') or '–'} MB</td></tr>"
        for n, s in m["stages"].items()
    )
    files = "".join(f'<li><a href="{e(f["file"])}">{e(f["file"])}</a> ({f["bytes"]:,} bytes)</li>' for f in m["files"].values())
    views = "".join(
        f'<figure><img src="{e(p)}" alt="{e(v["view"])}"><figcaption>{e(v["view"])}: '
        f'{v["psnr"]:.2f} dB, SSIM {v["ssim"]:.3f}</figcaption></figure>'
        for p, v in zip(m["previews"], m["views"])
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>codsplat report</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }} th, td {{ padding: .25rem .8rem; border-bottom: 1px solid #ddd; text-align: left; }}
figure {{ display: inline-block; margin: 0 1rem 1rem 0; }} img {{ max-width: 100%; image-rendering: pixelated; }}
</style></head><body>
<h1>codsplat report</h1>
<table>{summary}</table>
<h2>Files</h2><ul>{files}</ul>
<h2>Stages</h2><table><tr><th>stage</th><th>time</th><th>peak memory</th></tr>{stages}</table>
<h2>Held-out views (never trained on): render beside photo</h2>{views}
</body></html>
"""
