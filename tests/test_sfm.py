"""Structure from motion: pose sanity after mapping (a camera placed far from every other one is dropped
before training), the seed each fingerprint covers, and a photo set through both mappers."""

import json
from dataclasses import dataclass

import numpy as np
import pytest

from codsplat.pipeline.sfm import drop_stray_cameras


@dataclass
class FakeImage:
    name: str
    frame_id: int
    centre: np.ndarray
    has_pose: bool = True

    def projection_center(self):
        return self.centre


class FakeModel:
    """The two calls drop_stray_cameras makes on a pycolmap.Reconstruction."""

    def __init__(self, centres):
        self.images = {i: FakeImage(f"frame_{i:05d}.jpg", i, np.asarray(c, float)) for i, c in enumerate(centres)}

    def deregister_frame(self, frame_id):
        self.images[frame_id].has_pose = False


def orbit(n=30, radius=3.7):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([radius * np.cos(t), 0.3 * np.sin(3 * t), radius * np.sin(t)], axis=1)


def test_a_camera_placed_far_away_is_dropped():
    centres = orbit()
    centres[12] = [35.0, 1.0, -2.0]  # what the global mapper once did to one frame of the sample
    model = FakeModel(centres)
    assert drop_stray_cameras(model) == ["frame_00012.jpg"]
    assert sum(img.has_pose for img in model.images.values()) == 29


def test_a_sound_orbit_and_a_wide_photo_set_keep_every_camera():
    assert drop_stray_cameras(FakeModel(orbit())) == []
    rng = np.random.default_rng(0)
    scattered = rng.normal(size=(20, 3)) * 5  # photos from all around: gaps vary, none is stray
    assert drop_stray_cameras(FakeModel(scattered)) == []


def test_each_stage_fingerprint_covers_the_seed_it_uses(tmp_path):
    """SfM seeds RANSAC and its mapper from `sfm.seed`, which its fingerprint covers: changing it
    re-runs SfM (and what follows); changing `train.seed` re-runs training alone."""
    import inspect

    from codsplat.pipeline import sfm
    from codsplat.pipeline.config import build_config
    from codsplat.pipeline.stages import StageContext, fingerprint

    assert "config.sfm.seed" in inspect.getsource(sfm) and "config.train" not in inspect.getsource(sfm)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "manifest.json").write_text(json.dumps({"fingerprint": "frames-v1"}))

    def prints(settings):
        ctx = StageContext(tmp_path, build_config(settings))
        first = fingerprint(ctx, "sfm")
        (tmp_path / "sfm").mkdir(exist_ok=True)
        (tmp_path / "sfm" / "manifest.json").write_text(json.dumps({"fingerprint": first}))
        return first, fingerprint(ctx, "train")

    base = prints({})
    by_sfm_seed, by_train_seed = prints({"sfm": {"seed": 7}}), prints({"train": {"seed": 7}})
    assert by_sfm_seed[0] != base[0] and by_sfm_seed[1] != base[1]
    assert by_train_seed[0] == base[0] and by_train_seed[1] != base[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_video):
    """A photo set: 24 stills of the sample, as a folder of JPEGs someone took around the subject."""
    import av

    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    with av.open(str(sample_video)) as video:
        stills = [frame.to_image() for frame in video.decode(video=0)]
    step = len(stills) / 24
    for i in range(24):
        stills[int(i * step)].save(folder / f"IMG_{i:04d}.jpg", quality=92)
    return folder


@pytest.mark.parametrize("mapper", ["global", "incremental"])
def test_a_photo_set_is_matched_exhaustively_and_placed_by_either_mapper(photos, tmp_path, mapper):
    from conftest import codsplat

    config = tmp_path / "sfm.json"
    config.write_text(json.dumps({"sfm": {"mapper": mapper}}))
    out = tmp_path / "out"
    proc = codsplat("run", photos, "--preset", "tiny", "--config", config, "--out", out, "--stage", "preprocess")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "sfm" / "sfm.json").read_text())
    assert stats["matcher"] == "exhaustive" and stats["mapper"] == mapper  # auto: a photo set is matched all to all
    assert stats["total_images"] == 24 and stats["registered_images"] >= 22, stats["unregistered"]
    assert stats["mean_reprojection_error_px"] < 1.5 and stats["points3d"] > 500
