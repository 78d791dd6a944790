"""Pose sanity after mapping: a camera placed far from every other one is dropped before training."""

from dataclasses import dataclass

import numpy as np

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
