"""The SfM result as training data: posed PINHOLE views, the held-out split and the sparse points."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class View:
    name: str
    image: torch.Tensor  # [H, W, 3] float in 0..1
    K: torch.Tensor  # [3, 3] at the image's resolution
    viewmat: torch.Tensor  # [4, 4] world → camera (OpenCV axes, as COLMAP)
    mask: torch.Tensor | None = None  # [H, W] 1 on the subject, 0 on the background (frames.masks)

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    def to(self, device) -> "View":
        return View(self.name, self.image.to(device), self.K.to(device), self.viewmat.to(device),
                    None if self.mask is None else self.mask.to(device))


@dataclass
class Scene:
    train: list[View]
    test: list[View]
    points: np.ndarray  # [P, 3]
    colors: np.ndarray  # [P, 3] in 0..1

    @property
    def scale(self) -> float:
        """Radius of the camera positions around their centre (sets the position learning rate)."""
        centres = np.stack([torch.linalg.inv(v.viewmat)[:3, 3].numpy() for v in self.train + self.test])
        return float(np.linalg.norm(centres - centres.mean(0), axis=1).max() * 1.1) or 1.0


def is_held_out(index: int, test_every: int) -> bool:
    """Every `test_every`-th image in name order is held out (index 0, n, 2n, ...), as in 3DGS papers."""
    return index % test_every == 0


def load_scene(undistorted: Path, max_side: int | None, test_every: int) -> Scene:
    """Read `sfm/undistorted` (PINHOLE cameras) and scale views so the long side fits max_side."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(undistorted / "sparse"))
    images = sorted((img for img in rec.images.values() if img.has_pose), key=lambda img: img.name)
    train, test = [], []
    for index, img in enumerate(images):
        cam = rec.cameras[img.camera_id]
        fx, fy, cx, cy = cam.params if len(cam.params) == 4 else (cam.params[0], cam.params[0], *cam.params[1:3])
        pil = Image.open(undistorted / "images" / img.name).convert("RGB")
        if max_side and max(pil.size) > max_side:
            s = max_side / max(pil.size)
            pil = pil.resize((max(1, round(pil.width * s)), max(1, round(pil.height * s))), Image.LANCZOS)
        sx, sy = pil.width / cam.width, pil.height / cam.height
        K = torch.tensor([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1]], dtype=torch.float32)
        viewmat = torch.eye(4)
        viewmat[:3, :4] = torch.tensor(img.cam_from_world().matrix(), dtype=torch.float32)
        mask_file = undistorted / "masks" / img.name
        mask = None
        if mask_file.is_file():  # scaled as its frame, then back to 0 or 1 (undistortion and JPEG blur its edge)
            grey = Image.open(mask_file).convert("L").resize(pil.size, Image.BILINEAR)
            mask = torch.from_numpy((np.asarray(grey) >= 128).astype(np.float32))
        view = View(img.name, torch.from_numpy(np.asarray(pil, np.float32) / 255.0), K, viewmat, mask)
        (test if is_held_out(index, test_every) else train).append(view)
    pts = rec.points3D.values()
    points = np.array([p.xyz for p in pts], np.float32).reshape(-1, 3)
    colors = np.array([p.color for p in pts], np.float32).reshape(-1, 3) / 255.0
    return Scene(train, test, points, colors)
