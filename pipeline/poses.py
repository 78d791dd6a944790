"""Your own camera poses (`sfm.poses: use | refine`): a COLMAP sparse model (`sparse/0/` or `sparse/`:
cameras, images, points3D, as .bin or .txt) or a nerfstudio-style `transforms.json` (what Polycam,
Record3D and nerfstudio write) beside the photos.

The frames stage copies the pose files it finds in the input into `frames/poses/` (bounded, never
followed out of the input); the SfM stage reads them here, matches them to the kept frames by file
name, checks that they fit (every frame has a pose, the sizes and intrinsics agree with the photo),
and hands back each frame's camera at the size the frame was written:

    found = read(frames_dir / "poses")        # None when the input had no poses
    views = match(found, frames_json)          # frame file → Given (camera at the frame's size, pose)

Conventions: COLMAP's cam_from_world (OpenCV axes: x right, y down, z forward) throughout; a
transforms.json holds camera-to-world matrices in OpenGL axes (y up, z backward), turned here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .config import parse_document
from .errors import InputError

TRANSFORMS = "transforms.json"
COLMAP_FILES = ("cameras", "images", "points3D")
MAX_POSE_BYTES = 256 * 2**20  # every pose file together: an images.bin with 2D points for 5,000 photos is under this
MAX_TRANSFORMS_BYTES = 16 * 2**20  # 5,000 frames with their own intrinsics take about 4 MiB
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL camera axes (y up, z back) → OpenCV's (y down, z forward)
TRANSFORMS_MODELS = ("PINHOLE", "OPENCV")  # the camera models of a transforms.json that codsplat reads


@dataclass
class Given:
    """One photo's camera as the pose file gives it: at the photo's own size, OpenCV axes."""

    name: str  # the photo's file name (no folders)
    width: int
    height: int
    model: str  # a COLMAP camera model name
    params: list[float]  # in that model's order (fx, fy, cx, cy[, k1, k2, p1, p2] for PINHOLE and OPENCV)
    cam_from_world: np.ndarray  # [3, 4]

    def scaled(self, width: int, height: int) -> list[float]:
        """The parameters at another size of the same photo (focal lengths and principal point scale;
        distortion does not)."""
        sx, sy = width / self.width, height / self.height
        fx, fy, cx, cy, *rest = pinhole_params(self.model, self.params)
        return [fx * sx, fy * sy, cx * sx, cy * sy, *rest]


def pinhole_params(model: str, params: list[float]) -> list[float]:
    """fx, fy, cx, cy and any distortion, from the models codsplat takes."""
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        f, cx, cy, *rest = params
        return [f, f, cx, cy, *rest]
    if model in ("PINHOLE", "OPENCV"):
        return list(params)
    raise InputError(f"sfm.poses: the camera model {model} is not one codsplat reads; use PINHOLE, OPENCV, "
                     "SIMPLE_PINHOLE, SIMPLE_RADIAL or RADIAL.")


def colmap_model(model: str) -> str:
    """The COLMAP model a given camera is rebuilt as (its focal lengths split, as `scaled` returns them)."""
    return {"SIMPLE_PINHOLE": "PINHOLE", "PINHOLE": "PINHOLE", "OPENCV": "OPENCV"}.get(model, "OPENCV")


def full_params(model: str, params: list[float]) -> list[float]:
    """`scaled`'s parameters in `colmap_model`'s order: radial models become OPENCV with their k1 (k2)."""
    fx, fy, cx, cy, *rest = params
    if colmap_model(model) == "PINHOLE":
        return [fx, fy, cx, cy]
    if model == "OPENCV":
        return [fx, fy, cx, cy, *rest]
    k = (rest + [0.0, 0.0])[:2] if model == "RADIAL" else [*(rest[:1] or [0.0]), 0.0]
    return [fx, fy, cx, cy, k[0], k[1], 0.0, 0.0]


# ---------------------------------------------------------------- reading


def read(folder: Path) -> tuple[str, dict[str, Given]] | None:
    """What `folder` (frames/poses) holds: ("transforms.json" | "COLMAP model", photo name → Given)."""
    if (folder / TRANSFORMS).is_file():
        return TRANSFORMS, read_transforms(folder / TRANSFORMS)
    if any((folder / f"{n}.bin").is_file() or (folder / f"{n}.txt").is_file() for n in COLMAP_FILES):
        return "COLMAP model", read_colmap(folder)
    return None


def _number(frame: dict, top: dict, key: str, where: str, required: bool = True) -> float | None:
    value = frame.get(key, top.get(key))
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"transforms.json: {where}{key} must be a number, got {json.dumps(value)[:40]}.")
    return float(value)


def read_transforms(path: Path) -> dict[str, Given]:
    if path.stat().st_size > MAX_TRANSFORMS_BYTES:
        raise InputError(f"transforms.json is {path.stat().st_size / 2**20:.0f} MiB; at most {MAX_TRANSFORMS_BYTES // 2**20} MiB.")
    top = parse_document(path.read_bytes(), "transforms.json", max_bytes=MAX_TRANSFORMS_BYTES)  # bounded: size, depth, values
    if not isinstance(top.get("frames"), list) or not top["frames"]:
        raise InputError("transforms.json: frames must be a list of {file_path, transform_matrix, ...}, one per photo.")
    model = str(top.get("camera_model", "OPENCV"))
    if model not in TRANSFORMS_MODELS:
        raise InputError(f"transforms.json: camera_model {model!r} is not one codsplat reads; use PINHOLE or OPENCV "
                         "(fisheye and equirectangular captures: convert them first).")
    out: dict[str, Given] = {}
    for i, frame in enumerate(top["frames"]):
        where = f"frames[{i}]."
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise InputError(f"transforms.json: {where}file_path must be the photo's path, as text.")
        name = PurePosixPath(frame["file_path"].replace("\\", "/")).name
        matrix = np.asarray(frame.get("transform_matrix"), dtype=object)
        if matrix.shape not in ((4, 4), (3, 4)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and math.isfinite(v) for v in matrix.flat):
            raise InputError(f"transforms.json: {where}transform_matrix must be 4 rows of 4 numbers (camera to world).")
        c2w = np.eye(4)
        c2w[:matrix.shape[0]] = matrix.astype(float)
        width, height = _number(frame, top, "w", where), _number(frame, top, "h", where)
        params = [_number(frame, top, k, where) for k in ("fl_x", "fl_y", "cx", "cy")]
        if model == "OPENCV":
            params += [_number(frame, top, k, where, required=False) or 0.0 for k in ("k1", "k2", "p1", "p2")]
        if name in out:
            raise InputError(f"transforms.json: two frames name the photo {name}; each photo needs one pose.")
        out[name] = Given(name, int(width), int(height), model, params, world_to_camera(c2w @ GL_TO_CV, f"{where}transform_matrix"))
    return out


def read_colmap(folder: Path) -> dict[str, Given]:
    import pycolmap

    try:
        model = pycolmap.Reconstruction(str(folder))
    except Exception as exc:  # noqa: BLE001 - pycolmap raises its own kinds for every bad file
        raise InputError(f"The COLMAP model beside the photos cannot be read ({str(exc)[:160]}); it needs "
                         "cameras, images and points3D, as .bin or .txt.") from None
    out: dict[str, Given] = {}
    for image in model.images.values():
        if not image.has_pose:
            continue
        camera = model.cameras[image.camera_id]
        name = PurePosixPath(image.name).name
        out[name] = Given(name, camera.width, camera.height, camera.model.name, [float(p) for p in camera.params],
                          np.asarray(image.cam_from_world().matrix(), dtype=float))
    if not out:
        raise InputError("The COLMAP model beside the photos places no photo (no image with a pose).")
    return out


def world_to_camera(c2w: np.ndarray, where: str) -> np.ndarray:
    rotation = c2w[:3, :3]
    if abs(np.linalg.det(rotation) - 1) > 1e-3 or not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-3):
        raise InputError(f"transforms.json: {where} is not a rotation and a translation (its 3×3 part must be "
                         "orthonormal with determinant 1; scale the scene, not the cameras).")
    out = np.linalg.inv(c2w)
    return out[:3]


# ---------------------------------------------------------------- matching to the frames


def match(found: tuple[str, dict[str, Given]], frames: list[dict[str, Any]]) -> dict[str, Given]:
    """Frame file → its Given camera, after checking every kept frame against the pose file: a pose
    for each, the photo's own size, a principal point inside it, positive focal lengths, no EXIF
    rotation (poses are of the photo as stored). Every problem found is reported at once."""
    what, given = found
    problems, out = [], {}
    missing = [f["source"] for f in frames if PurePosixPath(f["source"]).name not in given]
    if missing:
        problems.append(f"{what} has no pose for {len(missing)} of the {len(frames)} photos kept "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    names = [PurePosixPath(f["source"]).name for f in frames]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"photos in different folders share the names {', '.join(twice[:5])}, so a pose cannot "
                        "tell them apart (keep one copy of each: nerfstudio's images_2/ and images_4/ are not needed)")
    for frame in frames:
        view = given.get(PurePosixPath(frame["source"]).name)
        if view is None:
            continue
        source, size = frame["source"], tuple(frame.get("original_size") or frame["size"])
        if frame.get("orientation", 1) != 1:
            problems.append(f"{source} is stored rotated (EXIF orientation {frame['orientation']}), and poses are of "
                            "the photo as stored: save it upright, or leave its pose out")
        if (view.width, view.height) != size:
            problems.append(f"{source} is {size[0]}×{size[1]} but its pose is for {view.width}×{view.height}")
        fx, fy, cx, cy, *_ = pinhole_params(view.model, view.params)
        if fx <= 0 or fy <= 0:
            problems.append(f"{source}: its focal length must be positive, got {fx:g}, {fy:g}")
        if not (0 < cx < view.width and 0 < cy < view.height):
            problems.append(f"{source}: its principal point ({cx:g}, {cy:g}) must lie inside the {view.width}×{view.height} photo")
        out[frame["file"]] = view
    if problems:
        raise InputError(f"sfm.poses: the poses do not fit the photos: {'; '.join(problems[:8])}"
                         f"{f' (and {len(problems) - 8} more)' if len(problems) > 8 else ''}.",
                         hint="Give the photos the pose file was made for, unchanged, or set sfm.poses to 'ignore' "
                              "to find the poses from the photos instead.", stage="sfm")
    return out
