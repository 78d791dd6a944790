"""Export on its own, in a second: from a work folder whose earlier stages ran (as fast stand-ins that
leave what the real ones leave, through the real `run_stage`) to the files, metrics.json, previews
and report a user gets. test_pipeline checks the same on a real run, at a minute a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pycolmap
import pytest
import torch
import trimesh
from PIL import Image

from codsplat.pipeline import export, mesh, splats
from codsplat.pipeline.config import build_config
from codsplat.pipeline.errors import QualityError
from codsplat.pipeline.stages import StageContext, run_stage
from codsplat.pipeline.train import CAMERAS

VIEWS = [{"view": "f0008.png", "psnr": 24.5, "ssim": 0.81}, {"view": "f0016.png", "psnr": 22.25, "ssim": 0.77}]
SFM = {"registered_images": 15, "total_images": 16, "mean_reprojection_error_px": 0.6543, "connected_images": 16,
       "unregistered": ["f0011.png"], "tries": [{"kept": True}]}
TRAIN = {"steps": 300, "device": "cpu", "resolution": [64, 48], "steps_per_s": 12.5}


def gaussians(n: int, sh_degree: int = 1, nonfinite: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = {"means": torch.randn(n, 3, generator=gen), "scales": torch.full((n, 3), -2.0),
              "quats": torch.randn(n, 4, generator=gen), "opacities": torch.zeros(n),
              "sh0": torch.rand(n, 1, 3, generator=gen), "shN": torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3)}
    for i in range(nonfinite):  # a Gaussian training left with a NaN or inf in one of its parameters
        key = splats.KEYS[i % len(splats.KEYS)]
        params[key][i].view(-1)[0] = math.nan if i % 2 else math.inf
    return params


def synthetic_sfm(undistorted, frames=9, points=400, size=(480, 360)) -> np.ndarray:
    """An undistorted SfM model as the sfm stage leaves it (PINHOLE cameras, grey photos), made by
    pycolmap's own synthesizer; its 3D points."""
    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs, options.num_cameras_per_rig, options.num_frames_per_rig, options.num_points3D = 1, 1, frames, points
    options.camera_width, options.camera_height = size
    options.camera_model_id = pycolmap.CameraModelId.PINHOLE
    options.camera_params = [size[0], size[0], size[0] / 2, size[1] / 2]
    model = pycolmap.synthesize_dataset(options)
    (undistorted / "sparse").mkdir(parents=True)
    (undistorted / "images").mkdir()
    model.write(str(undistorted / "sparse"))
    for image in model.images.values():
        Image.new("RGB", size, (120, 120, 120)).save(undistorted / "images" / image.name)
    return np.array([p.xyz for p in model.points3D.values()])


def trained(tmp_path, settings=None, n=40, nonfinite=0, psnr=23.375, cameras=True, scene=False) -> StageContext:
    """A work folder whose frames, sfm and train stages have run: their manifests through `run_stage`.
    With `scene`, sfm leaves a synthetic model and training one Gaussian on each of its points."""
    ctx = StageContext(tmp_path / "work", build_config({"preset": "tiny", **(settings or {})}),
                       input=tmp_path / "clip.mp4")
    ctx.input.write_bytes(b"media")

    def frames(c):
        (c.dir("frames") / "f0000.png").write_bytes(b"png")
        return {"kept": 16, "kind": "video"}

    points = []

    def sfm(c):
        (c.dir("sfm") / "sfm.json").write_text("{}")
        if scene:
            points.append(synthetic_sfm(c.dir("sfm") / "undistorted"))
        return SFM

    def train(c):
        out = c.dir("train")
        params = (splats.init_from_points(points[0], np.full_like(points[0], 0.5), 1, 0.95, 0, init_scale=1.5) if scene
                  else gaussians(n, nonfinite=nonfinite))
        splats.save(out / "splats.pt", params, 1)
        (out / "eval.json").write_text(json.dumps({"psnr": psnr, "ssim": 0.79, "views": VIEWS}))
        (out / "holdout").mkdir()
        for i, view in enumerate(VIEWS):
            stem = view["view"][:-4]
            Image.new("RGB", (64, 48), (200, 10 * i, 0)).save(out / "holdout" / f"{stem}.render.png")
            Image.new("RGB", (64, 48), (0, 10 * i, 200)).save(out / "holdout" / f"{stem}.photo.png")
        if cameras:
            (out / CAMERAS).write_text(json.dumps({"cameras": [1, 2]}))
        return TRAIN

    for name, fn in (("frames", frames), ("sfm", sfm), ("train", train)):
        run_stage(name, fn, ctx)
    return ctx


def test_export_writes_each_format_asked_and_metrics_that_describe_the_run(tmp_path):
    ctx = trained(tmp_path, {"export": {"formats": ["ply", "splat", "spz"]}}, n=40, nonfinite=3)
    notes = []
    ctx.progress = lambda fraction, note: notes.append((fraction, note))
    result = run_stage("export", export.run, ctx)
    out = ctx.dir("export")
    metrics = json.loads((out / "metrics.json").read_text())

    assert metrics["gaussians"] == 37 and metrics["gaussians_dropped_nonfinite"] == 3 and metrics["sh_degree"] == 1
    assert (metrics["psnr"], metrics["ssim"], metrics["views"]) == (23.375, 0.79, VIEWS)
    assert metrics["frames"] == {"kept": 16, "kind": "video"} and metrics["train"] == TRAIN
    assert metrics["sfm"] == {k: v for k, v in SFM.items() if k != "unregistered"}
    assert metrics["preset"] == "tiny"
    for fmt in ("ply", "splat", "spz"):
        assert metrics["files"][fmt] == {"file": f"splat.{fmt}", "bytes": (out / f"splat.{fmt}").stat().st_size}
    assert (out / "splat.splat").stat().st_size == 37 * 32  # .splat: 32 bytes a Gaussian, the finite ones only
    assert result.manifest["stats"] == {"gaussians": 37, "psnr": 23.375, "ssim": 0.79, "files": metrics["files"]}

    stages = metrics["stages"]
    assert list(stages) == ["frames", "sfm", "train", "export"]
    for name in ("frames", "sfm", "train"):
        manifest = json.loads((ctx.dir(name) / "manifest.json").read_text())
        assert stages[name] == {"seconds": manifest["seconds"], "peak_rss_mb": manifest["peak_rss_mb"], "peak_gpu_mb": None}
    assert 0 <= stages["export"]["seconds"] < 60  # this export's own time, not a clock reading
    assert metrics["total_seconds"] == round(sum(s["seconds"] for s in stages.values()), 2)

    fractions = [f for f, _ in notes]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and notes[-1][1] == "3 files"
    assert [n for _, n in notes[:3]] == ["wrote splat.ply", "wrote splat.splat", "wrote splat.spz"]
    assert fractions[:3] == pytest.approx([0.2 + 0.5 / 3, 0.2 + 1.0 / 3, 0.7])


def test_previews_put_each_held_out_render_beside_its_photo_and_the_report_shows_them(tmp_path):
    ctx = trained(tmp_path)
    run_stage("export", export.run, ctx)
    out = ctx.dir("export")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["previews"] == ["previews/f0008.png", "previews/f0016.png"]
    for i, name in enumerate(metrics["previews"]):
        image = Image.open(out / name)
        assert image.size == (64 * 5 * 2 + 8, 48 * 5 + 22)  # scaled up to PREVIEW_MIN_HEIGHT, then side by side
        for y in (22, 100, 48 * 5 + 21):  # each fills its half below the 22-px caption band, to the last row
            assert image.getpixel((10, y)) == (200, 10 * i, 0) and image.getpixel((64 * 5 + 8 + 10, y)) == (0, 10 * i, 200)
        assert image.getpixel((10, 21)) == image.getpixel((64 * 5 + 8 + 10, 21)) == (255, 255, 255)
        row = [image.getpixel((x, 100)) for x in range(image.width)]  # render | 8-px white gutter | photo, edge to edge
        assert row[0] == row[64 * 5 - 1] == (200, 10 * i, 0) and row[64 * 5: 64 * 5 + 8] == [(255, 255, 255)] * 8
        assert row[64 * 5 + 8] == row[-1] == (0, 10 * i, 200)
        inked = [x for x in range(image.width) if any(image.getpixel((x, y)) != (255, 255, 255) for y in range(22))]
        assert inked[0] < 10 and not [x for x in inked if 64 * 5 - 4 <= x < 64 * 5 + 8]  # each caption over its own half
        assert [x for x in inked if 64 * 5 + 8 <= x < 64 * 5 + 20]
    assert json.loads((out / CAMERAS).read_text()) == {"cameras": [1, 2]}  # a viewer opens at a photo's viewpoint

    report = (out / "report.html").read_text()
    for shown in ("23.38 dB", "0.790", ">40<", "16 (video)", "15/16", "0.654 px", "300 steps on cpu at 64×48, 12.5 steps/s",
                  '<img src="previews/f0008.png" alt="f0008.png">', "f0016.png: 22.25 dB, SSIM 0.770",
                  f'<a href="splat.ply">splat.ply</a> ({metrics["files"]["ply"]["bytes"]:,} bytes)',
                  f"{metrics['total_seconds']:.1f} s"):
        assert shown in report, shown
    assert report.count("<figure>") == 2 and report.count("<tr><td>") == 4  # a row a stage


def test_a_report_escapes_what_came_from_the_capture():
    metrics = {"psnr": 20.0, "ssim": 0.5, "gaussians": 1234567, "total_seconds": 3.0, "previews": ["previews/a.png"],
               "frames": {"kept": 3, "kind": "<b>photos</b>"}, "sfm": {**SFM, "unregistered": None},
               "train": {**TRAIN, "device": "cuda<script>"}, "stages": {"export": {"seconds": 1.0}},
               "files": {"ply": {"file": "splat.ply", "bytes": 2048}},
               "views": [{"view": '"><script>alert(1)</script>.png', "psnr": 20.0, "ssim": 0.5}]}
    report = export.report_html(metrics)
    assert "<script>" not in report and "&lt;script&gt;" in report and "&lt;b&gt;photos" in report
    assert "1,234,567" in report and "2,048 bytes" in report and "<td>1.0 s</td><td>– MB</td>" in report


def test_without_previews_or_cameras_export_writes_neither(tmp_path):
    ctx = trained(tmp_path, {"export": {"previews": False}}, cameras=False)
    run_stage("export", export.run, ctx)
    out = ctx.dir("export")
    assert json.loads((out / "metrics.json").read_text())["previews"] == []
    assert not (out / "previews").exists() and not (out / CAMERAS).exists()


def test_a_second_export_leaves_no_splat_file_of_a_format_no_longer_asked_for(tmp_path):
    ctx = trained(tmp_path, {"export": {"formats": ["ply", "spz"]}})
    run_stage("export", export.run, ctx)
    assert (ctx.dir("export") / "splat.spz").is_file()
    ctx.config = build_config({"preset": "tiny", "export": {"formats": ["ply"]}})
    run_stage("export", export.run, ctx)
    assert sorted(p.name for p in ctx.dir("export").glob("splat.*")) == ["splat.ply"]
    assert list(json.loads((ctx.dir("export") / "metrics.json").read_text())["files"]) == ["ply"]


@pytest.mark.parametrize("case, says", [
    ({"psnr": 5.0}, "below export.min_psnr"),
    ({"psnr": None}, "no PSNR"),
    ({"n": 2, "nonfinite": 2}, "no Gaussians"),  # every one of them had a NaN or inf: none is usable
])
def test_a_splat_the_gate_stops_leaves_no_file_behind(tmp_path, case, says):
    ctx = trained(tmp_path, **case)
    with pytest.raises(QualityError, match=says):
        run_stage("export", export.run, ctx)
    assert list(ctx.dir("export").iterdir()) == []  # nothing that looks like a result, no manifest


@pytest.mark.parametrize("tries, said", [([], "after 1 mapping try"), ([{"kept": False}, {"kept": False}, {"kept": True}],
                                                                        "after 3 mapping tries")])
def test_a_weak_sfm_model_is_named_with_the_mapping_tries_it_took(tries, said):
    weak = export.sfm_weakness({"registered_images": 5, "total_images": 10, "tries": tries})
    assert said in weak and "placed 5 of 10 frames (the verified matches connect 10)" in weak


def test_with_mesh_export_adds_a_mesh_rendered_at_the_training_resolution_and_says_how_it_fits(tmp_path, monkeypatch):
    ctx = trained(tmp_path, {"train": {"max_side": 80}, "export": {"mesh": True, "mesh_resolution": 32}}, scene=True)
    seen = []
    real = mesh.build

    def build(params, sh_degree, views, points, resolution, progress):
        seen.append([tuple(v.image.shape[:2]) for v in views])
        return real(params, sh_degree, views, points, resolution, progress)

    monkeypatch.setattr(mesh, "build", build)
    notes = []
    ctx.progress = lambda fraction, note: notes.append((fraction, note))
    run_stage("export", export.run, ctx)
    fractions = [f for f, _ in notes]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] == 1.0  # the mesh's notes in order too
    assert any(note.startswith("mesh: ") and 0.7 <= f <= 0.9 for f, note in notes)
    out = ctx.dir("export")
    metrics = json.loads((out / "metrics.json").read_text())
    assert seen == [[(60, 80)] * 9]  # every view, held-out ones too, at the training side (80), not the photos' 480
    stats = metrics["mesh"]
    loaded = trimesh.load(out / "mesh.ply", force="mesh")
    assert (stats["vertices"], stats["faces"]) == (len(loaded.vertices), len(loaded.faces)) and stats["faces"] > 100
    assert stats["resolution"] == 32 and stats["views"] == 9 and 0 <= stats["seconds"] < 300
    points = np.array([p.xyz for p in pycolmap.Reconstruction(str(ctx.dir("sfm") / "undistorted" / "sparse")).points3D.values()])
    assert stats["tolerance"] == pytest.approx(0.01 * mesh.extent(points), rel=1e-3)
    assert 0 < stats["points_on_mesh"] <= 1 and 0 < stats["mesh_near_points"] <= 1
    for fmt in ("ply", "glb"):
        assert metrics["files"][f"mesh_{fmt}"] == {"file": f"mesh.{fmt}", "bytes": (out / f"mesh.{fmt}").stat().st_size}

    monkeypatch.setattr(mesh, "build", lambda *args: None)  # this time no surface is seen
    ctx.config = build_config({"preset": "tiny", "train": {"max_side": 80}, "export": {"mesh": True, "mesh_resolution": 33}})
    with pytest.raises(QualityError, match="no surface could be fused"):
        run_stage("export", export.run, ctx)
    assert not list(out.glob("mesh.*"))  # the last run's mesh is not left to pass for this one's


@pytest.mark.parametrize("max_side, rendered", [(None, (300, 400)), (2000, (300, 400))])
def test_the_mesh_s_views_are_never_rendered_larger_than_mesh_side(tmp_path, monkeypatch, max_side, rendered):
    ctx = trained(tmp_path, {"train": {"max_side": max_side}, "export": {"mesh": True}}, scene=True)
    seen = []
    monkeypatch.setattr(mesh, "build", lambda params, sh, views, *rest: seen.append({tuple(v.image.shape[:2]) for v in views}))
    with pytest.raises(QualityError):  # the spy builds nothing
        run_stage("export", export.run, ctx)
    assert seen == [{rendered}] and max(rendered) == export.MESH_SIDE  # the 480×360 photos, at 400 px at most
