"""The Gaussian parameters, in gsplat's layout and with the activations every 3DGS tool expects.

Stored raw, as trained: `means` [N,3], `scales` [N,3] as log, `quats` [N,4] wxyz unnormalised,
`opacities` [N] as logit, `sh0` [N,1,3] and `shN` [N,K,3] SH coefficients. The exporters write these
raw values (the .ply convention) or activate them (.splat, .spz).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

SH_C0 = 0.28209479177387814
KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh0: torch.Tensor) -> torch.Tensor:
    return sh0 * SH_C0 + 0.5


def init_from_points(points: np.ndarray, colors: np.ndarray, sh_degree: int, init_opacity: float, seed: int,
                     init_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One Gaussian per SfM point: scale from the mean distance to its 3 nearest neighbours, times `init_scale`."""
    if len(points) < 4:
        raise ValueError("need at least 4 SfM points to start training")
    gen = torch.Generator().manual_seed(seed)
    dist, _ = cKDTree(points).query(points, k=4)
    mean_dist = np.sqrt((dist[:, 1:] ** 2).mean(axis=1)).clip(min=1e-7)
    n = len(points)
    scales = torch.log(torch.from_numpy(mean_dist * init_scale).float())[:, None].repeat(1, 3)
    return {
        "means": torch.from_numpy(points).float(),
        "scales": scales,
        "quats": torch.rand(n, 4, generator=gen),
        "opacities": torch.logit(torch.full((n,), init_opacity)),
        "sh0": rgb_to_sh(torch.from_numpy(colors).float())[:, None, :],
        "shN": torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3),
    }


def save(path: Path, params: dict[str, torch.Tensor], sh_degree: int) -> None:
    data = {k: params[k].detach().cpu().contiguous() for k in KEYS}
    torch.save({"params": data, "sh_degree": sh_degree, "format": "codsplat-splats-1"}, path)


def load(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["params"], int(data["sh_degree"])


def finite_mask(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gaussians whose every parameter is finite: the only ones fit to export."""
    mask = torch.ones(params["means"].shape[0], dtype=torch.bool)
    for key in KEYS:
        mask &= torch.isfinite(params[key].reshape(mask.shape[0], -1)).all(dim=1)
    return mask
