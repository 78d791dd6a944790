"""`rasterize()`: 3D Gaussians → images, on CUDA with gsplat and on the CPU with compiled kernels.

One function, one interface, so that training and evaluation are a single piece of code for both
devices. On CUDA it is `gsplat.rasterization(packed=False)`. On the CPU it is a differentiable tile
rasterizer: gsplat's own torch projection and SH helpers (`gsplat.cuda._torch_impl`, which run
anywhere), then alpha compositing by the compiled kernels of `raster_cpu` (numba, parallel over
tiles). The vectorised torch compositor here is their reference and their fallback: where the
kernels cannot load, the run says so once in its log and goes on in torch. Both follow gsplat's CUDA
kernel rule for rule:

- pixel centres at (x + 0.5, y + 0.5); tiles of `tile_size` pixels; a Gaussian touches the tiles
  its 3.33-sigma box overlaps (the same `radii` as gsplat);
- front to back in depth order; `alpha = min(0.999, opacity * exp(-sigma))`; contributions with
  `sigma < 0` or `alpha < 1/255` are skipped; a pixel stops before the Gaussian that would take its
  transmittance to 1e-4 or below;
- SH colours get +0.5 and are clamped at 0, as gsplat does.

The returned `meta` carries the keys gsplat's densification strategies read (`means2d`, `radii`,
`width`, `height`, `n_cameras`, ...), with gsplat's unpacked shapes on both devices.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

log = logging.getLogger("codsplat.raster")

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
CPU_TILE_SIZE = 8  # on the CPU, small tiles waste fewer pixel-Gaussian pairs (benchmarks/results/raster_cpu.json)
CHUNK_ELEMENTS = 1 << 22  # tiles × Gaussians-per-tile × pixels-per-tile processed at once (memory bound)


def rasterize(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz, need not be normalised
    scales: Tensor,  # [N, 3] (activated, not log)
    opacities: Tensor,  # [N] (activated, not logit)
    colors: Tensor,  # [N, K, 3] SH coefficients when sh_degree is set, else [N, D] or [C, N, D]
    viewmats: Tensor,  # [C, 4, 4] world → camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, D]
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int | None = None,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render C views. Returns colours [C, H, W, D], alphas [C, H, W, 1] and meta.

    The device of `means` decides the implementation: CUDA → gsplat's kernels, CPU → the compiled
    kernels (or the torch reference where they cannot load). `tile_size` defaults to 16 on CUDA
    (gsplat's) and 8 on the CPU; it changes speed, not the image (a Gaussian's 3.33-sigma box
    already ends where its alpha falls below 1/255).
    """
    if means.is_cuda:
        from gsplat import rasterization

        return rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            sh_degree=sh_degree, backgrounds=backgrounds, near_plane=near_plane, far_plane=far_plane,
            eps2d=eps2d, tile_size=tile_size or 16, packed=False,
        )
    return rasterize_cpu(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        sh_degree=sh_degree, backgrounds=backgrounds, near_plane=near_plane, far_plane=far_plane,
        eps2d=eps2d, tile_size=tile_size or CPU_TILE_SIZE, kernels=cpu_kernels(),
    )


@dataclass(frozen=True)
class CpuKernels:
    """What the CPU rasterizer runs: a projection (with SH colours) over every camera, and a
    compositor for one view. The compiled pair (`raster_cpu`) and the torch pair here share contracts."""

    name: str
    project: Callable  # (means, quats, scales, colors, viewmats, Ks, W, H, sh_degree, eps2d, near, far) → radii, means2d, depths, conics, feats
    composite: Callable  # (means2d, conics, opacities, feats, depths, radii, W, H, tile_size, background) → image, alpha


_LOADED: list[CpuKernels] = []


def cpu_kernels() -> CpuKernels:
    """The compiled kernels, loaded on first use (compiled by numba, or read from its on-disk cache);
    the torch reference when they cannot load, said once in the log."""
    if not _LOADED:
        try:
            from . import raster_cpu

            with torch.enable_grad():  # the warm-up runs a backward pass, whatever mode the first caller is in
                raster_cpu.warm_up()
            _LOADED.append(CpuKernels("compiled", raster_cpu.project, raster_cpu.composite))
        except Exception as exc:  # noqa: BLE001 - any failure to load means the reference path
            log.warning("the compiled CPU rasterizer could not load (%s: %s); training goes on with the "
                        "torch tile rasterizer, which is several times slower", exc.__class__.__name__, exc)
            _LOADED.append(TORCH)
    return _LOADED[0]


def project(means, quats, scales, viewmats, Ks, width, height, *, eps2d=0.3, near_plane=0.01, far_plane=1e10):
    """gsplat's torch projection: radii [C,N,2] (0 = culled), means2d [C,N,2], depths [C,N], conics [C,N,3]."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane
    )
    return radii, means2d, depths, conics


def project_visible(means, quats, scales, viewmats, Ks, width, height, **kw):
    """`project`, with gradients only through the Gaussians some camera sees, as gsplat's kernels do.

    A culled Gaussian can overflow in the projection (a huge scale close to a camera: inf - inf in
    its 2D covariance). Its zero gradient times that inf is NaN, which Adam would write into its
    parameters. So visibility is found first without gradients, and only the visible Gaussians are
    projected again on the graph; the culled ones get zeros that depend on nothing.
    """
    C, N = viewmats.shape[0], means.shape[0]
    with torch.no_grad():
        radii, _, _, _ = project(means, quats, scales, viewmats, Ks, width, height, **kw)
        ids = torch.nonzero((radii > 0).all(dim=-1).any(dim=0)).squeeze(1)
    r, m2d, d, con = project(means[ids], quats[ids], scales[ids], viewmats, Ks, width, height, **kw)
    radii = radii.new_zeros(C, N, 2).index_copy(1, ids, r)
    means2d = means.new_zeros(C, N, 2).index_copy(1, ids, m2d)
    depths = means.new_zeros(C, N).index_copy(1, ids, d)
    conics = means.new_zeros(C, N, 3).index_copy(1, ids, con)
    return radii, means2d, depths, conics


def project_torch(means, quats, scales, colors, viewmats, Ks, width, height, sh_degree, eps2d, near_plane, far_plane):
    """Every camera: radii [C,N,2], means2d [C,N,2], depths [C,N], conics [C,N,3], colours [C,N,D]."""
    radii, means2d, depths, conics = project_visible(
        means, quats, scales, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane)
    if sh_degree is not None:
        feats = sh_to_rgb(means, colors, viewmats, sh_degree)
    else:
        feats = colors if colors.dim() == 3 else colors[None].expand(viewmats.shape[0], *colors.shape)
    return radii, means2d, depths, conics, feats


def sh_to_rgb(means: Tensor, coeffs: Tensor, viewmats: Tensor, sh_degree: int) -> Tensor:
    """View-dependent colour per camera [C, N, 3] from SH coefficients [N, K, 3]."""
    from gsplat.cuda._torch_impl import _spherical_harmonics

    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = means[None, :, :] - campos[:, None, :]  # [C, N, 3]
    coeffs = coeffs[None].expand(viewmats.shape[0], *coeffs.shape)
    return torch.clamp_min(_spherical_harmonics(sh_degree, dirs, coeffs) + 0.5, 0.0)


def rasterize_cpu(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
    sh_degree=None, backgrounds=None, near_plane=0.01, far_plane=1e10, eps2d=0.3, tile_size=CPU_TILE_SIZE,
    kernels: CpuKernels | None = None,
):
    """The CPU rasterizer over a pair of kernels; with `TORCH` (the default) it is the reference."""
    kernels = kernels or TORCH
    C, N = viewmats.shape[0], means.shape[0]
    radii, means2d, depths, conics, feats = kernels.project(
        means, quats, scales, colors, viewmats, Ks, width, height, sh_degree, eps2d, near_plane, far_plane)
    images, alphas = [], []
    for c in range(C):
        bg = backgrounds[c] if backgrounds is not None else None
        img, alpha = kernels.composite(means2d[c], conics[c], opacities, feats[c], depths[c], radii[c], width, height,
                                       tile_size, bg)
        images.append(img)
        alphas.append(alpha)
    meta = {
        "radii": radii, "means2d": means2d, "depths": depths, "conics": conics,
        "opacities": opacities[None].expand(C, N), "width": width, "height": height, "n_cameras": C,
        "n_batches": 1, "tile_size": tile_size, "camera_ids": None, "gaussian_ids": None,
    }
    return torch.stack(images), torch.stack(alphas), meta


def tile_intersections(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """Every (tile, Gaussian) pair, sorted by tile then depth, and the count of Gaussians per tile."""
    with torch.no_grad():
        visible = (radii > 0).all(dim=-1)
        ids = torch.nonzero(visible).squeeze(1)
        if ids.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(tiles_x * tiles_y, dtype=torch.long)
        mu, r = means2d[ids].detach(), radii[ids].float()
        x0 = torch.floor((mu[:, 0] - r[:, 0]) / tile_size).clamp(0, tiles_x).long()
        x1 = torch.ceil((mu[:, 0] + r[:, 0]) / tile_size).clamp(0, tiles_x).long()
        y0 = torch.floor((mu[:, 1] - r[:, 1]) / tile_size).clamp(0, tiles_y).long()
        y1 = torch.ceil((mu[:, 1] + r[:, 1]) / tile_size).clamp(0, tiles_y).long()
        w = x1 - x0
        counts = w * (y1 - y0)
        keep = counts > 0
        ids, x0, y0, w, counts = ids[keep], x0[keep], y0[keep], w[keep], counts[keep]
        owner = torch.repeat_interleave(torch.arange(ids.numel()), counts)
        local = torch.arange(owner.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        tile = (y0[owner] + local // w[owner]) * tiles_x + x0[owner] + local % w[owner]
        N = means2d.shape[0]
        depth_rank = torch.empty(N, dtype=torch.long)
        depth_rank[torch.argsort(depths.detach())] = torch.arange(N)
        order = torch.argsort(tile * N + depth_rank[ids[owner]])
        tile, gauss = tile[order], ids[owner][order]
        per_tile = torch.bincount(tile, minlength=tiles_x * tiles_y)
    return tile, gauss, per_tile


def composite(means2d, conics, opacities, feats, depths, radii, width, height, tile_size=16, background=None):
    """Alpha-composite one view front to back, tile by tile. Returns [H, W, D] and [H, W, 1]."""
    D = feats.shape[-1]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles, P = tiles_x * tiles_y, tile_size * tile_size
    _, gauss, per_tile = tile_intersections(means2d, radii, depths, tile_size, tiles_x, tiles_y)
    starts = torch.cumsum(per_tile, 0) - per_tile

    # pixel centres of every tile [n_tiles, P, 2]
    ly, lx = torch.meshgrid(torch.arange(tile_size), torch.arange(tile_size), indexing="ij")
    t = torch.arange(n_tiles)
    px = ((t % tiles_x)[:, None] * tile_size + lx.reshape(1, -1)).float() + 0.5
    py = ((t // tiles_x)[:, None] * tile_size + ly.reshape(1, -1)).float() + 0.5

    color_tiles = feats.new_zeros(n_tiles, P, D)
    trans_tiles = feats.new_ones(n_tiles, P)
    busy = torch.nonzero(per_tile).squeeze(1)
    busy = busy[torch.argsort(per_tile[busy], descending=True)]  # similar depths share a chunk: less padding
    i = 0
    while i < busy.numel():
        k_max = int(per_tile[busy[i]])
        n = max(1, min(busy.numel() - i, CHUNK_ELEMENTS // (k_max * P)))
        tl = busy[i : i + n]
        i += n
        slot = torch.arange(k_max)
        valid = slot[None, :] < per_tile[tl][:, None]  # [n, K]
        idx = gauss[(starts[tl][:, None] + slot[None, :]).clamp(max=max(gauss.numel() - 1, 0))]
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        color, trans = _blend_tiles(
            px[tl], py[tl], means2d[idx], conics[idx], opacities[idx], feats[idx], valid
        )
        color_tiles = color_tiles.index_copy(0, tl, color)
        trans_tiles = trans_tiles.index_copy(0, tl, trans)

    def to_image(tiles, channels):
        img = tiles.reshape(tiles_y, tiles_x, tile_size, tile_size, channels).permute(0, 2, 1, 3, 4)
        return img.reshape(tiles_y * tile_size, tiles_x * tile_size, channels)[:height, :width]

    # A view where nothing is visible is constant; keep it in the graph (empty sums) so that backward()
    # yields zero gradients, as gsplat's kernels do, instead of failing.
    anchor = means2d[:0].sum() + conics[:0].sum() + opacities[:0].sum() + feats[:0].sum()
    image = to_image(color_tiles, D) + anchor
    trans = to_image(trans_tiles[..., None], 1)
    if background is not None:
        image = image + trans * background
    return image, 1.0 - trans


def _blend_tiles(px, py, mu, conic, opacity, feat, valid):
    """Front-to-back blending of K depth-sorted Gaussians over the P pixels of n tiles.

    px, py [n, P]; mu [n, K, 2]; conic [n, K, 3]; opacity [n, K]; feat [n, K, D]; valid [n, K].
    Returns colour [n, P, D] and final transmittance [n, P].
    """
    dx = px[:, None, :] - mu[..., 0:1]  # [n, K, P]
    dy = py[:, None, :] - mu[..., 1:2]
    a, b, c = conic[..., 0:1], conic[..., 1:2], conic[..., 2:3]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    # sigma < 0 is masked out below; clamping first keeps exp finite, so its backward never makes 0·inf = NaN
    alpha = torch.clamp_max(opacity[..., None] * torch.exp(-sigma.clamp_min(0)), ALPHA_MAX)
    alpha = alpha * ((sigma >= 0) & (alpha >= ALPHA_MIN) & valid[..., None])
    with torch.no_grad():  # gsplat stops a pixel before the Gaussian that would take T to T_MIN or below
        keep = torch.cumprod(1.0 - alpha, dim=1) > T_MIN
    alpha = alpha * keep
    t_incl = torch.cumprod(1.0 - alpha, dim=1)
    t_excl = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], dim=1)
    weights = alpha * t_excl  # [n, K, P]
    color = torch.einsum("nkp,nkd->npd", weights, feat)
    return color, t_incl[:, -1]


TORCH = CpuKernels("torch", project_torch, composite)
