"""Masks (`frames.masks`): a masks/ folder beside the photos keeps SfM's features off the background,
and training ignores the background and leaves it transparent; on a scene made here whose background
no splat could explain (fresh noise in every view), and on the sample's frames through the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from codsplat.pipeline.scene import Scene, View
from codsplat.pipeline.splats import sh_to_rgb
from codsplat.pipeline.train import evaluate, render, train
from conftest import codsplat
from test_mesh import sphere_splat, views_around
from test_train import train_config


def noisy_background_scene(seed: int = 0) -> Scene:
    """A sphere in front of a background of fresh noise in each view: the subject is all a splat can
    learn, and the masks say where it is."""
    params, points = sphere_splat(n=3000, seed=seed)
    rng = torch.Generator().manual_seed(seed)
    views = []
    for view in views_around(4, side=64):
        with torch.no_grad():
            subject, alpha, _ = render(params, view, 0)
        noise = torch.rand(subject.shape, generator=rng)
        photo = subject.clamp(0, 1) + (1 - alpha) * noise
        views.append(View(view.name, photo, view.K, view.viewmat, (alpha[..., 0] > 0.5).float()))
    start = points + np.random.default_rng(seed).normal(0, 0.03, points.shape)
    colors = sh_to_rgb(params["sh0"][:, 0]).clamp(0, 1).numpy()  # SfM's points carry the photos' colours
    return Scene(train=[v for i, v in enumerate(views) if i % 6], test=views[::6], points=start, colors=colors)


def test_training_with_masks_learns_the_subject_and_leaves_the_background_clear():
    scene = noisy_background_scene()
    unmasked = Scene([View(v.name, v.image, v.K, v.viewmat) for v in scene.train], scene.test, scene.points, scene.colors)
    cfg = train_config(steps=500, refine_start=1000, refine_every=1000, reset_every=0)
    results = {}
    for name, data in (("masked", scene), ("unmasked", unmasked)):
        params, _, _ = train(data, cfg, torch.device("cpu"))
        clear = []
        for view in scene.test:
            with torch.no_grad():
                _, alpha, _ = render(params, view, 0)
            clear.append(alpha[..., 0][view.mask == 0].mean().item())
        results[name] = {"psnr": evaluate(params, scene.test, 0)["psnr"], "background_alpha": float(np.mean(clear))}
    print(results)
    assert results["masked"]["psnr"] > results["unmasked"]["psnr"] + 1, results  # on the subject, both scored alike
    assert results["masked"]["background_alpha"] < 0.5 * results["unmasked"]["background_alpha"], results


def photos_with_masks(tiny_run, folder, left_black=True):
    shutil.copytree(tiny_run[0] / "frames" / "images", folder / "images")
    (folder / "masks").mkdir()
    for photo in sorted((folder / "images").iterdir()):
        width, height = Image.open(photo).size
        mask = np.full((height, width), 255, np.uint8)
        if left_black:
            mask[:, : width // 2] = 0
        Image.fromarray(mask).save(folder / "masks" / f"{photo.stem}.png")
    return folder


def test_sfm_finds_no_features_on_the_masked_background_and_training_gets_the_masks(tiny_run, tmp_path):
    import pycolmap

    folder = photos_with_masks(tiny_run, tmp_path / "capture")
    out = tmp_path / "run"
    proc = codsplat("run", folder, "--preset", "tiny", "--out", out, "--stage", "preprocess", "--json")
    assert proc.returncode == 0, proc.stderr
    frames = json.loads((out / "frames" / "frames.json").read_text())["frames"]
    assert all(f.get("mask") for f in frames)
    model = pycolmap.Reconstruction(str(out / "sfm" / "sparse"))
    xs = [p.xy[0] for image in model.images.values() for p in image.points2D]
    width = next(iter(model.cameras.values())).width
    assert model.num_reg_images() >= 10 and min(xs) >= width / 2 - 2, (model.num_reg_images(), min(xs))
    undistorted = out / "sfm" / "undistorted"
    for image in model.images.values():
        mask = np.asarray(Image.open(undistorted / "masks" / image.name).convert("L")) >= 128
        assert not mask[:, : mask.shape[1] // 2 - 3].any() and mask[:, mask.shape[1] // 2 + 3:].all()


@pytest.mark.parametrize("damage, words", [
    ("missing", "no mask for images/frame_00003.jpg"),
    ("size", "the mask of images/frame_00003.jpg is 10×10, the photo 320×240"),
    ("black", "the mask of images/frame_00003.jpg is all black"),
])
def test_masks_that_do_not_fit_the_photos_are_refused_naming_the_photo(tiny_run, tmp_path, damage, words):
    folder = photos_with_masks(tiny_run, tmp_path / "capture", left_black=False)
    target = folder / "masks" / "frame_00003.png"
    if damage == "missing":
        target.unlink()
    else:
        Image.fromarray(np.zeros((10, 10) if damage == "size" else (240, 320), np.uint8)).save(target)
    proc = codsplat("run", folder, "--preset", "tiny", "--out", tmp_path / "run", "--stage", "frames")
    assert proc.returncode == 2 and words in proc.stderr.replace("\n", " "), proc.stderr
    assert "Traceback" not in proc.stderr
