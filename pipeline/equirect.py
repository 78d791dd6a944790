"""360° captures (`frames.projection: equirect`): each equirectangular frame cut into perspective views,
a rig of cube faces that turn together.

Five faces of a cube around the camera, 90° each: front, right, back, left and up. The down face is left
out: it sees the tripod, the pole or the hand that holds the camera, which moves with it and would
pull SfM onto itself. The faces are written `f<k>_<frame>.jpg`; SfM reads them as one rig (COLMAP's
rig config: the face is the sensor, the frame name after the prefix the rig frame), so each frame's
faces keep their fixed relative rotations and share one pose.

Axes are OpenCV's (x right, y down, z forward); the equirectangular image's centre column looks along
+z, longitude grows towards +x, latitude up (-y).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# cam_from_rig rotations of the faces (rows: the face camera's x, y, z axes in the rig's frame)
FACES = {
    "f0": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],  # front
    "f1": [[0, 0, -1], [0, 1, 0], [1, 0, 0]],  # right
    "f2": [[-1, 0, 0], [0, 1, 0], [0, 0, -1]],  # back
    "f3": [[0, 0, 1], [0, 1, 0], [-1, 0, 0]],  # left
    "f4": [[1, 0, 0], [0, 0, 1], [0, -1, 0]],  # up
}


def face_params(size: int) -> list[float]:
    """PINHOLE fx, fy, cx, cy of a 90° face `size` pixels square."""
    return [size / 2, size / 2, size / 2, size / 2]


def face_size(width: int, max_side: int) -> int:
    """A face as sharp as the panorama allows (a quarter of its width spans 90°), at most `max_side`."""
    return max(16, min(width // 4, max_side))


def directions(face: str, size: int) -> np.ndarray:
    """The rig-frame direction of every pixel centre of a face, [size, size, 3]."""
    f, c = size / 2, size / 2
    u, v = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    cam = np.stack([(u - c) / f, (v - c) / f, np.ones_like(u)], -1)
    return cam @ np.asarray(FACES[face], dtype=float)  # R^T d for each row vector d


def to_equirect(d: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (x, y; continuous, pixel centres at .5) where directions `d` fall in the panorama."""
    lon = np.arctan2(d[..., 0], d[..., 2])
    lat = np.arctan2(-d[..., 1], np.hypot(d[..., 0], d[..., 2]))
    return (lon / (2 * np.pi) + 0.5) * width, (0.5 - lat / np.pi) * height


def cut(panorama: Image.Image, size: int) -> dict[str, Image.Image]:
    """The faces of one equirectangular frame, bilinear, wrapping around in longitude."""
    from scipy.ndimage import map_coordinates

    rgb = np.asarray(panorama.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    wrapped = np.concatenate([rgb[:, -1:], rgb, rgb[:, :1]], axis=1)  # one column either side for the seam
    out = {}
    for face in FACES:
        x, y = to_equirect(directions(face, size), width, height)
        coords = [np.clip(y - 0.5, 0, height - 1), x - 0.5 + 1]
        channels = [map_coordinates(wrapped[..., k], coords, order=1, mode="nearest") for k in range(3)]
        out[face] = Image.fromarray(np.clip(np.stack(channels, -1) + 0.5, 0, 255).astype(np.uint8))
    return out


def import_rig(db_path, image_dir, names: list[str], size: int) -> None:
    """Import the faces into COLMAP's database as one rig: one camera per face (each face's images imported
    together, in name order), then COLMAP's rig config, which groups each frame's faces into one rig frame."""
    import pycolmap

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "PINHOLE"
    reader.camera_params = ",".join(str(p) for p in face_params(size))
    for face in FACES:
        pycolmap.import_images(db_path, image_dir, camera_mode=pycolmap.CameraMode.SINGLE, options=reader,
                               image_names=[n for n in names if n.startswith(f"{face}_")])
    with pycolmap.Database.open(str(db_path)) as database:
        pycolmap.apply_rig_config([rig_config(size)], database)


def rig_config(size: int):
    """COLMAP's rig config for the faces: face f0 the reference, the others turned from it, every face a
    90° PINHOLE camera of `size` pixels."""
    import pycolmap

    cameras = []
    for face, rotation in FACES.items():
        camera = pycolmap.RigConfigCamera()
        camera.image_prefix = f"{face}_"
        camera.ref_sensor = face == "f0"
        if face != "f0":
            camera.cam_from_rig = pycolmap.Rigid3d(np.hstack([np.asarray(rotation, float), np.zeros((3, 1))]))
        camera.camera = pycolmap.Camera(model="PINHOLE", width=size, height=size, params=face_params(size))
        cameras.append(camera)
    config = pycolmap.RigConfig()
    config.cameras = cameras
    return config
