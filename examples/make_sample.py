"""Render the sample capture: a short orbit video of a textured scene, made deterministically.

The scene is ray-cast in numpy (a ground plane, a sphere, two boxes and a surrounding wall, each with
its own non-repeating procedural texture), so it needs no 3D engine and the same seed gives the same
video. Repeating patterns are avoided on purpose: they break feature matching (see NOTES.md).

    python examples/make_sample.py examples/sample.mp4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

def make_texture(rng: np.random.Generator, base: tuple[float, float, float], size: int = 512) -> np.ndarray:
    """Fractal noise tinted by `base`, with random shapes on top: rich in distinct features."""
    img = np.zeros((size, size, 3), np.float32)
    for i, cells in enumerate((4, 8, 16, 32, 64)):
        noise = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        up = Image.fromarray(noise).resize((size, size), Image.BICUBIC)
        img += np.asarray(up, np.float32) / 255.0 * (0.55**i)
    img = img / img.max()
    img = 0.35 * img + 0.65 * np.asarray(base, np.float32) * (0.6 + 0.6 * img)
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(70 * (size // 512) ** 2):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(6, 34))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        elif shape == 1:
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=color)
        else:
            x2, y2 = rng.integers(0, size, 2)
            draw.line((x, y, x2, y2), fill=color, width=int(rng.integers(2, 6)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(1.2))
    return np.asarray(canvas, np.float32) / 255.0


def sample(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup with wrap-around; u, v in texture repeats."""
    size = tex.shape[0]
    u, v = np.nan_to_num(u, posinf=0, neginf=0), np.nan_to_num(v, posinf=0, neginf=0)  # rays that missed
    x = (u % 1.0) * (size - 1)
    y = (v % 1.0) * (size - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = (x0 + 1) % size, (y0 + 1) % size
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


class Scene:
    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        # floor and wall get one large texture each, never repeated across the scene
        self.ground = make_texture(rng, (0.55, 0.45, 0.35), 1024)
        self.wall = make_texture(rng, (0.35, 0.5, 0.6), 1024)
        self.ball = make_texture(rng, (0.8, 0.3, 0.25))
        self.crate = make_texture(rng, (0.3, 0.65, 0.3))
        self.sphere = (np.array([0.0, 0.8, 0.0]), 0.8)
        # boxes: (min corner, max corner)
        self.boxes = [
            (np.array([1.0, 0.0, -0.6]), np.array([1.8, 0.9, 0.4])),
            (np.array([-1.9, 0.0, 0.2]), np.array([-1.1, 1.4, 1.0])),
        ]
        self.wall_radius = 7.0
        self.light = np.array([0.4, 0.8, 0.3]) / np.linalg.norm([0.4, 0.8, 0.3])

    def render(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        n = dirs.shape[0]
        depth = np.full(n, np.inf)
        color = np.zeros((n, 3))
        normal = np.zeros((n, 3))

        def take(t, rgb, nrm):
            hit = (t > 1e-4) & (t < depth)
            depth[hit] = t[hit]
            color[hit] = rgb[hit]
            normal[hit] = nrm[hit]

        o = origin
        with np.errstate(divide="ignore", invalid="ignore"):
            # ground plane y = 0
            t = -o[1] / dirs[:, 1]
            p = o + t[:, None] * dirs
            take(t, sample(self.ground, (p[:, 0] + 7) / 14.0, (p[:, 2] + 7) / 14.0), np.tile([0, 1, 0], (n, 1)))
            # surrounding cylinder wall, seen from inside
            a = dirs[:, 0] ** 2 + dirs[:, 2] ** 2
            b = 2 * (o[0] * dirs[:, 0] + o[2] * dirs[:, 2])
            c = o[0] ** 2 + o[2] ** 2 - self.wall_radius**2
            t = (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)
            p = o + t[:, None] * dirs
            ang = np.arctan2(p[:, 2], p[:, 0])
            nrm = -np.stack([p[:, 0], np.zeros(n), p[:, 2]], 1) / self.wall_radius
            take(t, sample(self.wall, ang / (2 * np.pi) + 0.5, p[:, 1] / 5.0), nrm)
            # sphere
            ctr, rad = self.sphere
            oc = o - ctr
            b = dirs @ oc
            disc = b * b - (oc @ oc - rad * rad)
            t = -b - np.sqrt(disc)
            p = o + t[:, None] * dirs
            nrm = (p - ctr) / rad
            u = np.arctan2(nrm[:, 2], nrm[:, 0]) / (2 * np.pi)
            v = np.arccos(np.clip(nrm[:, 1], -1, 1)) / np.pi
            take(t, sample(self.ball, u, v), nrm)
            # boxes (slab test); texture by the two coordinates of the face that was hit
            for k, (lo, hi) in enumerate(self.boxes):
                t0 = (lo - o) / dirs
                t1 = (hi - o) / dirs
                tmin = np.minimum(t0, t1)
                tmax = np.maximum(t0, t1)
                tn = tmin.max(1)
                tf = tmax.min(1)
                t = np.where((tn < tf) & (tf > 0), tn, np.inf)
                axis = tmin.argmax(1)
                p = o + t[:, None] * dirs
                nrm = np.zeros((n, 3))
                nrm[np.arange(n), axis] = -np.sign(dirs[np.arange(n), axis])
                uv = np.where(axis[:, None] == 0, p[:, [2, 1]], np.where(axis[:, None] == 1, p[:, [0, 2]], p[:, [0, 1]]))
                take(t, sample(self.crate, uv[:, 0] / 2.0 + 0.37 * k, uv[:, 1] / 2.0 + 0.21 * k), nrm)
        shade = 0.55 + 0.45 * np.clip(np.abs(normal @ self.light), 0, 1)
        return np.clip(color * shade[:, None], 0, 1)


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world rotation with OpenCV axes (x right, y down, z forward)."""
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], 1)


def render_orbit(frames: int, width: int, height: int, seed: int = 7, supersample: int = 2):
    scene = Scene(seed)
    focal = 0.9 * width
    w, h = width * supersample, height * supersample
    js, is_ = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    cam_dirs = np.stack([(js - w / 2) / (focal * supersample), (is_ - h / 2) / (focal * supersample), np.ones_like(js)], -1)
    cam_dirs = cam_dirs.reshape(-1, 3)
    for i in range(frames):
        ang = 2 * np.pi * i / frames
        eye = np.array([4.2 * np.cos(ang), 1.9 + 0.3 * np.sin(2 * ang), 4.2 * np.sin(ang)])
        rot = look_at(eye, np.array([0.0, 0.6, 0.0]))
        dirs = cam_dirs @ rot.T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        img = scene.render(eye, dirs).reshape(h, w, 3)
        img = img.reshape(height, supersample, width, supersample, 3).mean((1, 3))
        yield (img * 255 + 0.5).astype(np.uint8)


def write_video(path: Path, frames, width: int, height: int, fps: int = 30) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.width, stream.height = width, height
        stream.options = {"crf": "16", "preset": "slow"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path(__file__).with_name("sample.mp4"))
    ap.add_argument("--frames", type=int, default=90)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    args = ap.parse_args()
    write_video(args.out, render_orbit(args.frames, args.width, args.height), args.width, args.height)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
