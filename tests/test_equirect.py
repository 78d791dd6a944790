"""360° captures (`frames.projection: equirect`): panoramas cut into a rig of perspective faces
(pipeline/equirect.py), checked on a panorama painted here, and end to end on a clip rendered here: a
room of Gaussians seen from a 360° camera moving through it."""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from codsplat.pipeline import equirect
from codsplat.pipeline import splats as splat_io
from codsplat.pipeline.scene import View
from codsplat.pipeline.train import render
from conftest import SAMPLE, codsplat

DOWN = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]  # the face the rig leaves out, needed to paint a whole panorama


def test_each_face_looks_where_its_name_says():
    """A panorama painted with a spot where each face's centre must look: front at its centre, right a
    quarter turn on, back at the seam, left a quarter turn back, up along the top."""
    width, height = 400, 200
    pano = np.zeros((height, width, 3), np.uint8)
    spots = {"f0": (200, 100), "f1": (300, 100), "f2": (0, 100), "f3": (100, 100)}
    for k, (x, y) in enumerate(spots.values()):
        pano[y - 8:y + 9, max(x - 8, 0):x + 9] = (60 * (k + 1), 255, 0)
        if x == 0:
            pano[y - 8:y + 9, width - 8:] = (60 * (k + 1), 255, 0)  # the seam wraps
    pano[:4, :] = (0, 0, 255)  # the zenith is the whole top row
    faces = equirect.cut(Image.fromarray(pano), 64)
    assert set(faces) == {"f0", "f1", "f2", "f3", "f4"}
    for k, face in enumerate(spots):
        centre = np.asarray(faces[face])[31:33, 31:33].reshape(-1, 3).mean(0)
        assert abs(centre[0] - 60 * (k + 1)) < 10 and centre[1] > 245, (face, centre)
    assert np.asarray(faces["f4"])[30:34, 30:34, 2].mean() > 200


def room(seed=0, per_wall=2500):
    """Gaussians in random colours over the walls, floor and ceiling of a box around the origin."""
    rng = np.random.default_rng(seed)
    half = np.array([4.0, 2.5, 4.0])
    walls = []
    for axis in range(3):
        for sign in (-1, 1):
            points = rng.uniform(-half, half, (per_wall, 3))
            points[:, axis] = sign * half[axis]
            walls.append(points)
    points = np.concatenate(walls)
    return splat_io.init_from_points(points, rng.uniform(0, 1, (len(points), 3)), 0, 0.95, seed, init_scale=1.2)


def panorama(params, position, yaw, size):
    """What a 360° camera at `position`, turned by `yaw`, records: six cube faces rendered, stitched to 2:1."""
    turn = np.array([[np.cos(yaw), 0, -np.sin(yaw)], [0, 1, 0], [np.sin(yaw), 0, np.cos(yaw)]])
    K = torch.tensor([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1.0]])
    cube = {**equirect.FACES, "f5": DOWN}
    faces = {}
    for name, rotation in cube.items():
        world = np.asarray(rotation, float) @ turn
        viewmat = np.eye(4)
        viewmat[:3, :3], viewmat[:3, 3] = world, -world @ position
        with torch.no_grad():
            image, _, _ = render(params, View(name, torch.zeros(size, size, 3), K, torch.tensor(viewmat, dtype=torch.float32)), 0)
        faces[name] = image.clamp(0, 1).numpy()
    width, height = 4 * size, 2 * size
    x, y = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    lon, lat = (x / width - 0.5) * 2 * np.pi, (0.5 - y / height) * np.pi
    d = np.stack([np.cos(lat) * np.sin(lon), -np.sin(lat), np.cos(lat) * np.cos(lon)], -1)
    out, best = np.zeros((height, width, 3)), np.full((height, width), -np.inf)
    for name, rotation in cube.items():
        c = d @ np.asarray(rotation, float).T
        z = np.where(c[..., 2] > 1e-6, c[..., 2], np.nan)
        u, v = size / 2 * c[..., 0] / z + size / 2, size / 2 * c[..., 1] / z + size / 2
        inside = (z > best) & (u >= 0) & (u < size) & (v >= 0) & (v < size)
        out[inside] = faces[name][v[inside].astype(int), u[inside].astype(int)]
        best = np.where(inside, z, best)
    return (out * 255 + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("360") / "room.mp4"
    params, size, frames = room(), 96, 12
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.options = 4 * size, 2 * size, "yuv420p", {"crf": "12"}
        for k in range(frames):
            t = k / (frames - 1)
            image = panorama(params, np.array([-1.0 + 2.0 * t, 0.2 * np.sin(3 * t), 0.5 * t]), 0.5 * t, size)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_a_360_clip_is_placed_as_a_rig_and_trains(clip, tmp_path):
    import pycolmap

    config = tmp_path / "360.json"
    config.write_text(json.dumps({"frames": {"projection": "equirect", "max": 12, "max_side": 512, "min_difference": 0},
                                  "train": {"steps": 400}}))
    out = tmp_path / "run"
    proc = codsplat("run", clip, "--preset", "tiny", "--config", config, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    sfm = json.loads((out / "sfm" / "sfm.json").read_text())
    print("360:", {k: sfm[k] for k in ("registered_images", "total_images", "points3d")},
          "psnr", json.loads(proc.stdout)["stages"]["train"]["stats"]["psnr"])
    assert sfm["total_images"] == 60 and sfm["registered_images"] >= 54 and sfm["points3d"] > 500
    model = pycolmap.Reconstruction(str(out / "sfm" / "sparse"))
    assert len(model.rigs) == 1 and len(model.cameras) == 5
    images = {i.name: i for i in model.images.values()}
    turned = [(images[name].cam_from_world().rotation.matrix() @ images["f0_" + name[3:]].cam_from_world().rotation.matrix().T,
               equirect.FACES[name[:2]]) for name in images if not name.startswith("f0_") and "f0_" + name[3:] in images]
    assert turned and max(np.abs(rel - np.asarray(face)).max() for rel, face in turned) < 1e-6  # the rig held
    assert json.loads(proc.stdout)["stages"]["train"]["stats"]["psnr"] > 22


def test_a_clip_that_is_not_equirectangular_is_refused_naming_the_setting(tmp_path):
    config = tmp_path / "360.json"
    config.write_text(json.dumps({"frames": {"projection": "equirect", "max": 4}}))
    proc = codsplat("run", SAMPLE, "--config", config, "--out", tmp_path / "run", "--stage", "frames")
    assert proc.returncode == 2 and "frames.projection" in proc.stderr and "twice as wide" in proc.stderr
    assert "Traceback" not in proc.stderr
