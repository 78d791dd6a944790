"""A coloured triangle mesh from the trained splat (`export.mesh`), on the CPU in the export stage.

Depth and colour are rendered from every registered view, fused in a truncated signed distance
volume (TSDF, the fusion 2DGS and Gaussian Opacity Fields use for their meshes), and the zero level
set is extracted with scikit-image's marching cubes; trimesh writes it as `.ply` and `.glb` (vertex
colours). The volume spans the SfM points (their 2nd to 98th percentiles, padded), so stray points and
the sky do not spread it thin.

    mesh = build(params, sh_degree, views, points, resolution=160)
    agreement(mesh, points, tolerance)  # how much of the SfM cloud lies on it, and of it near the cloud
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .raster import rasterize
from .scene import View

MIN_ALPHA = 0.5  # a pixel whose accumulated opacity is lower has no surface depth
TRUNCATION_VOXELS = 4  # the signed distance is cut at this many voxels either side of the surface


def render_depth(params: dict[str, torch.Tensor], view: View, sh_degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour [H, W, 3] and expected depth [H, W] (0 where the splat is too transparent to say)."""
    means, quats = params["means"], params["quats"]
    scales, opacities = torch.exp(params["scales"]), torch.sigmoid(params["opacities"])
    colors = torch.cat([params["sh0"], params["shN"]], dim=1)
    with torch.no_grad():
        image, alpha, _ = rasterize(means, quats, scales, opacities, colors, view.viewmat[None], view.K[None],
                                    view.width, view.height, sh_degree=sh_degree)
        z = (means @ view.viewmat[:3, :3].T + view.viewmat[:3, 3])[:, 2:3]
        depth, _, _ = rasterize(means, quats, scales, opacities, z[None], view.viewmat[None], view.K[None],
                                view.width, view.height)
    alpha = alpha[0, ..., 0].numpy()
    expected = np.where(alpha > MIN_ALPHA, depth[0, ..., 0].numpy() / np.maximum(alpha, 1e-6), 0.0)
    return image[0].clamp(0, 1).numpy(), expected


def facing(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """How squarely each pixel's surface faces its ray, 0..1 (|cos|, from the depth map's own normals; 0
    where a neighbour has no depth). A grazing pixel's depth says little about the space beside it: it
    would pull the fused surface outwards at every silhouette, so its votes count that much less."""
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    points = rays * depth[..., None]
    du, dv = np.zeros_like(points), np.zeros_like(points)
    du[:, :-1], dv[:-1] = points[:, 1:] - points[:, :-1], points[1:] - points[:-1]
    normal = np.cross(du, dv)
    length = np.linalg.norm(normal, axis=-1) * np.linalg.norm(rays, axis=-1)
    cos = np.abs((normal * rays).sum(-1)) / np.maximum(length, 1e-12)
    known = depth > 0
    known[:, :-1] &= known[:, 1:]
    known[:-1] &= known[1:]
    known[:, -1] = known[-1] = False
    return np.where(known, cos, 0.0).astype(np.float32)


def bounds(points: np.ndarray, pad: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.percentile(points, 2, axis=0), np.percentile(points, 98, axis=0)
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def fuse(views: list[View], renders: list[tuple[np.ndarray, np.ndarray]], lo: np.ndarray, hi: np.ndarray,
         resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The TSDF [X, Y, Z], its weights and colours, and the voxel size: a running weighted mean over views
    of the truncated distance along each view's ray, where the view saw a surface behind the voxel."""
    voxel = float((hi - lo).max()) / resolution
    dims = np.maximum(np.ceil((hi - lo) / voxel).astype(int), 2)
    axes = [lo[i] + (np.arange(dims[i], dtype=np.float32) + 0.5) * voxel for i in range(3)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    tsdf = np.ones(len(centres), np.float32)
    weight = np.zeros(len(centres), np.float32)
    color = np.zeros((len(centres), 3), np.float32)
    trunc = TRUNCATION_VOXELS * voxel
    for view, (image, depth) in zip(views, renders):
        viewmat, K = view.viewmat.numpy(), view.K.numpy()
        cam = centres @ viewmat[:3, :3].T + viewmat[:3, 3]
        z = cam[:, 2]
        ahead = z > 1e-6
        u = np.full(len(z), -1, np.int64)
        v = np.full(len(z), -1, np.int64)
        u[ahead] = np.floor(K[0, 0] * cam[ahead, 0] / z[ahead] + K[0, 2]).astype(np.int64)
        v[ahead] = np.floor(K[1, 1] * cam[ahead, 1] / z[ahead] + K[1, 2]).astype(np.int64)
        seen = ahead & (u >= 0) & (u < view.width) & (v >= 0) & (v < view.height)
        index = np.flatnonzero(seen)
        d = depth[v[index], u[index]]
        sdf = d - z[index]
        vote = facing(depth, K)[v[index], u[index]]
        keep = (vote > 0) & (sdf > -trunc)  # behind the surface by more than the truncation: occluded, unknown
        index, sdf, vote = index[keep], np.minimum(sdf[keep] / trunc, 1.0), vote[keep]
        w = weight[index]
        tsdf[index] = (tsdf[index] * w + sdf * vote) / (w + vote)
        color[index] = (color[index] * w[:, None] + image[v[index], u[index]] * vote[:, None]) / (w + vote)[:, None]
        weight[index] = w + vote
    shape = tuple(dims)
    return tsdf.reshape(shape), weight.reshape(shape), color.reshape(*shape, 3), voxel


def build(params: dict[str, torch.Tensor], sh_degree: int, views: list[View], points: np.ndarray, resolution: int,
          progress=lambda f, n: None):
    """The mesh (a `trimesh.Trimesh` with vertex colours) of the splat seen from `views`, in a volume of
    `resolution` voxels along its longest side around `points`; None when no surface was seen."""
    import trimesh
    from skimage.measure import marching_cubes

    params = {k: v.detach().cpu().float() for k, v in params.items()}
    renders = []
    for k, view in enumerate(views):
        renders.append(render_depth(params, view.to(torch.device("cpu")), sh_degree))
        progress(0.6 * (k + 1) / len(views), f"rendered depth {k + 1}/{len(views)}")
    lo, hi = bounds(points)
    tsdf, weight, color, voxel = fuse(views, renders, lo, hi, resolution)
    progress(0.8, "fused")
    observed = weight > 0
    if not observed.any() or tsdf[observed].min() > 0 or tsdf[observed].max() < 0:
        return None
    verts, faces, _, _ = marching_cubes(tsdf, level=0.0, mask=observed, allow_degenerate=False)
    # a vertex lies on the edge between two voxels; one no view measured (deeper behind a surface than the
    # truncation, or never seen) holds no distance, and a crossing into it is not a surface: its faces go
    low = np.clip(np.floor(verts).astype(int), 0, np.array(tsdf.shape) - 1)
    high = np.clip(np.ceil(verts).astype(int), 0, np.array(tsdf.shape) - 1)
    valid = observed[tuple(low.T)] & observed[tuple(high.T)]
    faces = faces[valid[faces].all(axis=1)]
    if not len(faces):
        return None
    nearest = np.clip(np.rint(verts).astype(int), 0, np.array(tsdf.shape) - 1)
    rgb = color[tuple(nearest.T)]
    return trimesh.Trimesh(vertices=(verts + 0.5) * voxel + lo, faces=faces,
                           vertex_colors=np.concatenate([(rgb * 255 + 0.5).astype(np.uint8),
                                                         np.full((len(rgb), 1), 255, np.uint8)], 1), process=True)


def agreement(mesh, points: np.ndarray, tolerance: float, samples: int = 200_000, seed: int = 0) -> dict[str, Any]:
    """Both directions, within `tolerance` (1% of the scene's extent): the share of SfM points (inside the
    fused volume) that lie that close to the mesh, and the share of the mesh's surface that lies that close
    to an SfM point (low where SfM saw few features, as on plain walls)."""
    import trimesh
    from scipy.spatial import cKDTree

    lo, hi = bounds(points)
    inside = points[np.all((points >= lo) & (points <= hi), axis=1)]
    surface, _ = trimesh.sample.sample_surface(mesh, samples, seed=seed)
    to_mesh, _ = cKDTree(surface).query(inside)
    to_points, _ = cKDTree(inside).query(surface)
    return {"tolerance": round(tolerance, 6), "points_on_mesh": round(float((to_mesh <= tolerance).mean()), 4),
            "mesh_near_points": round(float((to_points <= tolerance).mean()), 4)}


def extent(points: np.ndarray) -> float:
    lo, hi = bounds(points, pad=0.0)
    return float(np.linalg.norm(hi - lo)) or 1.0
