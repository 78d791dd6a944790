"""Compiled CPU kernels behind `raster.rasterize()`: projection with spherical harmonics, tile
binning and alpha compositing, each forward and backward, parallel over Gaussians or tiles (numba,
`@njit(parallel=True)`, cached on disk after the first run; nothing is compiled at install).

The kernels follow gsplat's CUDA rasterizer rule for rule, so the torch rasterizer in `raster.py` is
their reference and their fallback:

- projection (gsplat's `fully_fused_projection`, pinhole): covariance from the normalised quaternion
  and the scales, into the camera, EWA-projected with the clamped Jacobian, plus `eps2d` on the
  diagonal; radii `ceil(3.33 sigma)` per axis; culled (radius 0) behind the near plane, past the far
  plane, off the image, or where the numbers overflow. A culled Gaussian gets exactly zero gradient;
- colours: SH up to degree 3 at the direction from the camera (gradients reach the means through
  it, as in gsplat), plus 0.5, clamped at 0;
- binning: a Gaussian touches the tiles its radius box overlaps; each tile lists its Gaussians
  front to back (one global depth sort, then a counting sort by tile, so lists come out ordered);
- compositing: per pixel, `alpha = min(0.999, opacity * exp(-sigma))`, skipped when `sigma < 0` or
  `alpha < 1/255`, stopping before the Gaussian that would take the transmittance to 1e-4 or
  below. The backward pass walks each pixel back to front from where the forward pass stopped,
  recovering each transmittance by division. Each tile writes the gradients of its own
  (tile, Gaussian) pairs, so threads never share a slot; one pass then sums them per Gaussian.

`project()` and `composite()` are torch autograd functions with the same contracts as their torch
counterparts in `raster.py`; `raster.rasterize_cpu` drives either pair.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

ALPHA_MIN = np.float32(1.0 / 255.0)
ALPHA_MAX = np.float32(0.999)
T_MIN = np.float32(1e-4)


RADIUS_SIGMAS = 3.33
SH_C0 = 0.28209479177387814
SH_C1 = 0.48860251190292
SH_C2 = (1.092548430592079, 0.9461746957575601, 0.3153915652525201, 0.5462742152960395)
SH_C3 = (0.5900435899266435, 2.890611442640554, 1.445305721320277, 2.285228997322329, 0.4570457994644658,
         1.865881662950577, 1.119528997770346)


# ------------------------------------------------------------------ projection and colour

@njit(cache=True, inline="always")
def _rotation(w, x, y, z):
    """Rotation matrix of a unit quaternion (w, x, y, z)."""
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


@njit(cache=True, inline="always")
def _sh_bases(degree, x, y, z, out):
    """SH bases at the unit direction (x, y, z), in gsplat's order (Sloan's fast evaluation)."""
    out[0] = SH_C0
    if degree < 1:
        return
    out[1], out[2], out[3] = -SH_C1 * y, SH_C1 * z, -SH_C1 * x
    if degree < 2:
        return
    out[4], out[5] = SH_C2[0] * x * y, -SH_C2[0] * z * y
    out[6], out[7] = SH_C2[1] * z * z - SH_C2[2], -SH_C2[0] * z * x
    out[8] = SH_C2[3] * (x * x - y * y)
    if degree < 3:
        return
    c = -SH_C3[3] * z * z + SH_C3[4]
    out[9] = -SH_C3[0] * (3 * x * x * y - y * y * y)
    out[10], out[11] = SH_C3[1] * x * y * z, c * y
    out[12] = z * (SH_C3[5] * z * z - SH_C3[6])
    out[13], out[14] = c * x, SH_C3[2] * z * (x * x - y * y)
    out[15] = -SH_C3[0] * (x * x * x - 3 * x * y * y)


@njit(cache=True, inline="always")
def _sh_bases_grad(degree, x, y, z, out):
    """d(basis k)/d(x, y, z) at the unit direction: out [K, 3]."""
    out[:] = 0.0
    if degree < 1:
        return
    out[1, 1], out[2, 2], out[3, 0] = -SH_C1, SH_C1, -SH_C1
    if degree < 2:
        return
    b = SH_C2[0]
    out[4, 0], out[4, 1] = b * y, b * x
    out[5, 1], out[5, 2] = -b * z, -b * y
    out[6, 2] = 2 * SH_C2[1] * z
    out[7, 0], out[7, 2] = -b * z, -b * x
    out[8, 0], out[8, 1] = 2 * SH_C2[3] * x, -2 * SH_C2[3] * y
    if degree < 3:
        return
    a, e, f = SH_C3[0], SH_C3[1], SH_C3[2]
    c = -SH_C3[3] * z * z + SH_C3[4]
    out[9, 0], out[9, 1] = -a * 6 * x * y, -a * 3 * (x * x - y * y)
    out[10, 0], out[10, 1], out[10, 2] = e * y * z, e * x * z, e * x * y
    out[11, 1], out[11, 2] = c, -2 * SH_C3[3] * z * y
    out[12, 2] = 3 * SH_C3[5] * z * z - SH_C3[6]
    out[13, 0], out[13, 2] = c, -2 * SH_C3[3] * z * x
    out[14, 0], out[14, 1], out[14, 2] = 2 * f * z * x, -2 * f * z * y, f * (x * x - y * y)
    out[15, 0], out[15, 1] = -a * 3 * (x * x - y * y), a * 6 * x * y


@njit(cache=True, inline="always")
def _jacobian(p, fx, fy, cx, cy, width, height):
    """gsplat's perspective Jacobian, with the direction clamped to 1.3x the field of view; also
    whether x and y were inside the clamp (outside it, J does not move with them)."""
    z = p[2]
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy
    rx, ry = p[0] / z, p[1] / z
    free_x, free_y = -lim_x_neg <= rx <= lim_x_pos, -lim_y_neg <= ry <= lim_y_pos
    tx = z * min(max(rx, -lim_x_neg), lim_x_pos)
    ty = z * min(max(ry, -lim_y_neg), lim_y_pos)
    J = np.array([[fx / z, 0.0, -fx * tx / (z * z)], [0.0, fy / z, -fy * ty / (z * z)]])
    return J, tx, ty, free_x, free_y


@njit(cache=True, parallel=True)
def project_forward(means, quats, scales, coeffs, sh_degree, viewmat, K, width, height, eps2d, near, far):
    """Per Gaussian, for one camera: means2d [N,2], conics [N,3], depths [N], radii [N,2] and, with
    SH coefficients [N,K,3] and sh_degree >= 0, colours [N,3]."""
    n = means.shape[0]
    Rv, tv = viewmat[:3, :3].astype(np.float64), viewmat[:3, 3].astype(np.float64)
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    campos = -Rv.T @ tv
    means2d = np.zeros((n, 2), np.float32)
    conics = np.zeros((n, 3), np.float32)
    depths = np.zeros(n, np.float32)
    radii = np.zeros((n, 2), np.int32)
    colors = np.zeros((n, 3) if sh_degree >= 0 else (0, 3), np.float32)
    for g in prange(n):
        p = Rv @ means[g].astype(np.float64) + tv
        depths[g] = p[2]
        if sh_degree >= 0:
            bases = np.empty(16)
            d = means[g].astype(np.float64) - campos
            d /= max(math.sqrt(d @ d), 1e-12)
            _sh_bases(sh_degree, d[0], d[1], d[2], bases)
            for ch in range(3):
                acc = 0.0
                for k in range((sh_degree + 1) ** 2):
                    acc += bases[k] * coeffs[g, k, ch]
                colors[g, ch] = max(acc + 0.5, 0.0)
        if not (near < p[2] < far):
            continue
        q = quats[g].astype(np.float64)
        q /= max(math.sqrt(q @ q), 1e-12)
        M = _rotation(q[0], q[1], q[2], q[3]) * scales[g].astype(np.float64)
        cov_c = Rv @ (M @ M.T) @ Rv.T
        J, _, _, _, _ = _jacobian(p, fx, fy, cx, cy, width, height)
        cov2d = J @ cov_c @ J.T
        a, b, c = cov2d[0, 0] + eps2d, 0.5 * (cov2d[0, 1] + cov2d[1, 0]), cov2d[1, 1] + eps2d
        det = max(a * c - b * b, 1e-10)
        mx, my = fx * p[0] / p[2] + cx, fy * p[1] / p[2] + cy
        if not (math.isfinite(det) and math.isfinite(a) and math.isfinite(c) and math.isfinite(mx) and math.isfinite(my)):
            continue  # overflowed (a huge Gaussian right at the camera): culled, as gsplat's kernels do
        rx = math.ceil(np.float32(RADIUS_SIGMAS) * np.sqrt(np.float32(a)))  # in float32, as gsplat
        ry = math.ceil(np.float32(RADIUS_SIGMAS) * np.sqrt(np.float32(c)))
        if mx + rx <= 0 or mx - rx >= width or my + ry <= 0 or my - ry >= height:
            continue
        radii[g, 0], radii[g, 1] = rx, ry
        means2d[g, 0], means2d[g, 1] = mx, my
        conics[g, 0], conics[g, 1], conics[g, 2] = c / det, -b / det, a / det
    return means2d, conics, depths, radii, colors


@njit(cache=True, parallel=True)
def project_backward(means, quats, scales, coeffs, sh_degree, viewmat, K, width, height, eps2d,
                     radii, v_means2d, v_conics, v_colors):
    """Gradients of means, quats (unnormalised), scales and SH coefficients from those of means2d,
    conics and colours. Culled Gaussians (radius 0) get zeros."""
    n = means.shape[0]
    Rv, tv = viewmat[:3, :3].astype(np.float64), viewmat[:3, 3].astype(np.float64)
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    campos = -Rv.T @ tv
    v_means = np.zeros((n, 3), np.float32)
    v_quats = np.zeros((n, 4), np.float32)
    v_scales = np.zeros((n, 3), np.float32)
    v_coeffs = np.zeros_like(coeffs)
    for g in prange(n):
        if radii[g, 0] <= 0 or radii[g, 1] <= 0:
            continue
        mean = means[g].astype(np.float64)
        if sh_degree >= 0:  # colour = max(sum_k basis_k(dir) coeff_k + 0.5, 0), dir = normalise(mean - campos)
            nb = (sh_degree + 1) ** 2
            d = mean - campos
            length = max(math.sqrt(d @ d), 1e-12)
            u = d / length
            bases, grads = np.empty(16), np.empty((16, 3))
            _sh_bases(sh_degree, u[0], u[1], u[2], bases)
            _sh_bases_grad(sh_degree, u[0], u[1], u[2], grads)
            v_u = np.zeros(3)
            for ch in range(3):
                acc = 0.0
                for k in range(nb):
                    acc += bases[k] * coeffs[g, k, ch]
                if acc + 0.5 <= 0.0:
                    continue
                vc = float(v_colors[g, ch])
                for k in range(nb):
                    v_coeffs[g, k, ch] = bases[k] * vc
                    v_u += grads[k] * (coeffs[g, k, ch] * vc)
            v_d = (v_u - u * (u @ v_u)) / length
            for i in range(3):
                v_means[g, i] += v_d[i]
        # recompute the forward pass of this Gaussian
        p = Rv @ mean + tv
        z = p[2]
        q = quats[g].astype(np.float64)
        qn = math.sqrt(q @ q)
        w, x, y, zq = q / qn
        R = _rotation(w, x, y, zq)
        s = scales[g].astype(np.float64)
        M = R * s
        cov_c = Rv @ (M @ M.T) @ Rv.T
        J, tx, ty, free_x, free_y = _jacobian(p, fx, fy, cx, cy, width, height)
        cov2d = J @ cov_c @ J.T
        a, b, c = cov2d[0, 0] + eps2d, 0.5 * (cov2d[0, 1] + cov2d[1, 0]), cov2d[1, 1] + eps2d
        det = max(a * c - b * b, 1e-10)
        # conic = inverse(A): dL/dA = -P V P, with P = A^-1 and V the conic gradient as a symmetric matrix
        P = np.array([[c / det, -b / det], [-b / det, a / det]])
        V = np.array([[v_conics[g, 0], 0.5 * v_conics[g, 1]], [0.5 * v_conics[g, 1], v_conics[g, 2]]])
        v_cov2d = -P @ V @ P
        # cov2d = J cov_c J^T
        v_cov_c = J.T @ v_cov2d @ J
        v_J = 2.0 * v_cov2d @ J @ cov_c
        # means2d = (fx x/z + cx, fy y/z + cy), and J's dependence on the camera-space mean p
        v_p = np.zeros(3)
        v_p[0] = v_means2d[g, 0] * fx / z
        v_p[1] = v_means2d[g, 1] * fy / z
        v_p[2] = -(v_means2d[g, 0] * fx * p[0] + v_means2d[g, 1] * fy * p[1]) / (z * z)
        z2, z3 = z * z, z * z * z
        v_p[2] += -fx / z2 * v_J[0, 0] - fy / z2 * v_J[1, 1]
        # J[0,2] = -fx tx / z^2 with tx = x inside the clamp, else z * limit
        if free_x:
            v_p[0] += -fx / z2 * v_J[0, 2]
            v_p[2] += 2 * fx * tx / z3 * v_J[0, 2]
        else:
            v_p[2] += fx * tx / z3 * v_J[0, 2]
        if free_y:
            v_p[1] += -fy / z2 * v_J[1, 2]
            v_p[2] += 2 * fy * ty / z3 * v_J[1, 2]
        else:
            v_p[2] += fy * ty / z3 * v_J[1, 2]
        v_mean = Rv.T @ v_p
        for i in range(3):
            v_means[g, i] += v_mean[i]
        # cov_c = Rv cov Rv^T, cov = M M^T, M = R diag(s)
        v_cov = Rv.T @ v_cov_c @ Rv
        v_M = (v_cov + v_cov.T) @ M
        v_R = v_M * s
        for j in range(3):
            v_scales[g, j] = (v_M[:, j] * R[:, j]).sum()
        # R from the unit quaternion, then the normalisation
        v_w = 2 * (-zq * v_R[0, 1] + y * v_R[0, 2] + zq * v_R[1, 0] - x * v_R[1, 2] - y * v_R[2, 0] + x * v_R[2, 1])
        v_x = 2 * (y * v_R[0, 1] + zq * v_R[0, 2] + y * v_R[1, 0] - 2 * x * v_R[1, 1] - w * v_R[1, 2]
                   + zq * v_R[2, 0] + w * v_R[2, 1] - 2 * x * v_R[2, 2])
        v_y = 2 * (-2 * y * v_R[0, 0] + x * v_R[0, 1] + w * v_R[0, 2] + x * v_R[1, 0] + zq * v_R[1, 2]
                   - w * v_R[2, 0] + zq * v_R[2, 1] - 2 * y * v_R[2, 2])
        v_z = 2 * (-2 * zq * v_R[0, 0] - w * v_R[0, 1] + x * v_R[0, 2] + w * v_R[1, 0] - 2 * zq * v_R[1, 1]
                   + y * v_R[1, 2] + x * v_R[2, 0] + y * v_R[2, 1])
        v_qn = np.array([v_w, v_x, v_y, v_z])
        un = q / qn
        v_q = (v_qn - un * (un @ v_qn)) / qn
        for i in range(4):
            v_quats[g, i] = v_q[i]
    return v_means, v_quats, v_scales, v_coeffs


# ------------------------------------------------------------------ binning and compositing

@njit(cache=True)
def bin_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """Per-tile lists of Gaussians, front to back: (offsets [tiles + 1], Gaussian ids [pairs])."""
    n = means2d.shape[0]
    rect = np.zeros((n, 4), np.int32)
    counts = np.zeros(tiles_x * tiles_y + 1, np.int64)
    for g in range(n):
        if radii[g, 0] <= 0 or radii[g, 1] <= 0:
            continue
        x0 = min(max(int(np.floor((means2d[g, 0] - radii[g, 0]) / tile_size)), 0), tiles_x)
        x1 = min(max(int(np.ceil((means2d[g, 0] + radii[g, 0]) / tile_size)), 0), tiles_x)
        y0 = min(max(int(np.floor((means2d[g, 1] - radii[g, 1]) / tile_size)), 0), tiles_y)
        y1 = min(max(int(np.ceil((means2d[g, 1] + radii[g, 1]) / tile_size)), 0), tiles_y)
        rect[g, 0], rect[g, 1], rect[g, 2], rect[g, 3] = x0, x1, y0, y1
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                counts[ty * tiles_x + tx + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    ids = np.empty(offsets[-1], np.int32)
    for g in np.argsort(depths, kind="mergesort"):  # front to back, ties in index order
        for ty in range(rect[g, 2], rect[g, 3]):
            for tx in range(rect[g, 0], rect[g, 1]):
                t = ty * tiles_x + tx
                ids[fill[t]] = g
                fill[t] += 1
    return offsets, ids


@njit(cache=True, parallel=True)
def _gather(ids, means2d, conics, opacities, feats):
    """The parameters of every (tile, Gaussian) pair, contiguous per tile: [pairs, 6 + D]."""
    d = feats.shape[1]
    packed = np.empty((ids.shape[0], 6 + d), np.float32)
    for i in prange(ids.shape[0]):
        g = ids[i]
        packed[i, 0], packed[i, 1] = means2d[g, 0], means2d[g, 1]
        packed[i, 2], packed[i, 3], packed[i, 4] = conics[g, 0], conics[g, 1], conics[g, 2]
        packed[i, 5] = opacities[g]
        for k in range(d):
            packed[i, 6 + k] = feats[g, k]
    return packed


@njit(cache=True, parallel=True)
def forward(packed, offsets, width, height, tile_size, tiles_x, background):
    """Colour [H, W, D], final transmittance [H, W] and Gaussians walked per pixel [H, W]."""
    d = packed.shape[1] - 6
    n_tiles = offsets.shape[0] - 1
    color = np.zeros((height, width, d), np.float32)
    t_final = np.ones((height, width), np.float32)
    walked = np.zeros((height, width), np.int32)
    for t in prange(n_tiles):
        start, end = offsets[t], offsets[t + 1]
        y_first, x_first = (t // tiles_x) * tile_size, (t % tiles_x) * tile_size
        for y in range(y_first, min(y_first + tile_size, height)):
            py = np.float32(y + 0.5)
            for x in range(x_first, min(x_first + tile_size, width)):
                px = np.float32(x + 0.5)
                T = np.float32(1.0)
                count = 0
                for i in range(start, end):
                    dx, dy = packed[i, 0] - px, packed[i, 1] - py
                    sigma = np.float32(0.5) * (packed[i, 2] * dx * dx + packed[i, 4] * dy * dy) + packed[i, 3] * dx * dy
                    alpha = min(ALPHA_MAX, packed[i, 5] * np.exp(-sigma))
                    if sigma < 0 or alpha < ALPHA_MIN:
                        continue
                    next_t = T * (np.float32(1.0) - alpha)
                    if next_t <= T_MIN:
                        break
                    w = alpha * T
                    for k in range(d):
                        color[y, x, k] += w * packed[i, 6 + k]
                    T = next_t
                    count = i - start + 1
                t_final[y, x] = T
                walked[y, x] = count
                for k in range(background.shape[0]):
                    color[y, x, k] += T * background[k]
    return color, t_final, walked


@njit(cache=True, parallel=True)
def backward(packed, offsets, width, height, tile_size, tiles_x, background, t_final, walked, v_color, v_alpha):
    """Gradients of every (tile, Gaussian) pair [pairs, 6 + D] (means2d, conic, opacity, colour) and
    of the background, summed per tile [tiles, D]."""
    d = packed.shape[1] - 6
    n_tiles = offsets.shape[0] - 1
    grads = np.zeros_like(packed)
    v_background = np.zeros((n_tiles, background.shape[0]), np.float32)
    buffer = np.zeros((n_tiles, d), np.float32)  # colour of what lies behind, one row per tile (thread)
    for t in prange(n_tiles):
        start = offsets[t]
        y_first, x_first = (t // tiles_x) * tile_size, (t % tiles_x) * tile_size
        for y in range(y_first, min(y_first + tile_size, height)):
            py = np.float32(y + 0.5)
            for x in range(x_first, min(x_first + tile_size, width)):
                px = np.float32(x + 0.5)
                t_end = t_final[y, x]
                T = t_end
                v_bg_dot = np.float32(0.0)
                for k in range(background.shape[0]):
                    v_background[t, k] += t_end * v_color[y, x, k]
                    v_bg_dot += background[k] * v_color[y, x, k]
                for k in range(d):
                    buffer[t, k] = 0.0
                for i in range(start + walked[y, x] - 1, start - 1, -1):
                    dx, dy = packed[i, 0] - px, packed[i, 1] - py
                    a, b, c = packed[i, 2], packed[i, 3], packed[i, 4]
                    sigma = np.float32(0.5) * (a * dx * dx + c * dy * dy) + b * dx * dy
                    vis = np.exp(-sigma)
                    alpha = min(ALPHA_MAX, packed[i, 5] * vis)
                    if sigma < 0 or alpha < ALPHA_MIN:
                        continue
                    ra = np.float32(1.0) / (np.float32(1.0) - alpha)
                    T *= ra
                    fac = alpha * T
                    v_a = np.float32(0.0)
                    for k in range(d):
                        f = packed[i, 6 + k]
                        grads[i, 6 + k] += fac * v_color[y, x, k]
                        v_a += (f * T - buffer[t, k] * ra) * v_color[y, x, k]
                        buffer[t, k] += f * fac
                    v_a += t_end * ra * (v_alpha[y, x] - v_bg_dot)
                    if packed[i, 5] * vis <= ALPHA_MAX:  # a clamped alpha passes no gradient
                        v_sigma = -packed[i, 5] * vis * v_a
                        grads[i, 0] += v_sigma * (a * dx + b * dy)
                        grads[i, 1] += v_sigma * (b * dx + c * dy)
                        grads[i, 2] += np.float32(0.5) * v_sigma * dx * dx
                        grads[i, 3] += v_sigma * dx * dy
                        grads[i, 4] += np.float32(0.5) * v_sigma * dy * dy
                        grads[i, 5] += vis * v_a
    return grads, v_background


@njit(cache=True)
def scatter(grads, ids, n):
    """Sum the pairs' gradients per Gaussian: [n, 6 + D]."""
    out = np.zeros((n, grads.shape[1]), np.float32)
    for i in range(ids.shape[0]):
        out[ids[i]] += grads[i]
    return out


# ------------------------------------------------------------------ torch autograd glue

def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().contiguous().numpy()


NO_SH = np.zeros((0, 1, 3), np.float32)


class Project(torch.autograd.Function):
    """One camera: (means, quats, scales, SH coefficients or None) → means2d, conics, depths, radii,
    colours (empty without SH)."""

    @staticmethod
    def forward(ctx, means, quats, scales, coeffs, viewmat, K, width, height, sh_degree, eps2d, near, far):
        args = (_host(means), _host(quats), _host(scales), NO_SH if coeffs is None else _host(coeffs),
                -1 if coeffs is None else sh_degree, _host(viewmat), _host(K), width, height, eps2d)
        means2d, conics, depths, radii, colors = project_forward(*args, near, far)
        ctx.args, ctx.radii, ctx.has_sh = args, radii, coeffs is not None
        depths, radii = torch.from_numpy(depths), torch.from_numpy(radii)
        ctx.mark_non_differentiable(depths, radii)
        return torch.from_numpy(means2d), torch.from_numpy(conics), depths, radii, torch.from_numpy(colors)

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, v_radii, v_colors):
        v_means, v_quats, v_scales, v_coeffs = project_backward(
            *ctx.args, ctx.radii, _host(v_means2d), _host(v_conics),
            _host(v_colors) if ctx.has_sh else np.zeros((0, 3), np.float32))
        return (torch.from_numpy(v_means), torch.from_numpy(v_quats), torch.from_numpy(v_scales),
                torch.from_numpy(v_coeffs) if ctx.has_sh else None, None, None, None, None, None, None, None, None)


def project(means, quats, scales, colors, viewmats, Ks, width, height, sh_degree, eps2d, near_plane, far_plane):
    """Every camera: radii [C,N,2], means2d [C,N,2], depths [C,N], conics [C,N,3], colours [C,N,D].
    Same contract as `raster.project_torch`."""
    views = [Project.apply(means, quats, scales, colors if sh_degree is not None else None, viewmats[c], Ks[c],
                           width, height, sh_degree, eps2d, near_plane, far_plane) for c in range(viewmats.shape[0])]
    means2d, conics, depths, radii, feats = (torch.stack(parts) for parts in zip(*views))
    if sh_degree is None:  # plain colours, per Gaussian or per camera and Gaussian
        feats = colors if colors.dim() == 3 else colors[None].expand(viewmats.shape[0], *colors.shape)
    return radii, means2d, depths, conics, feats


class Composite(torch.autograd.Function):
    """One view: (means2d [N,2], conics [N,3], opacities [N], colours [N,D], background [D] or None)
    → (image [H,W,D], alpha [H,W,1])."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, background, radii, depths, width, height, tile_size):
        tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
        offsets, ids = bin_tiles(_host(means2d), _host(radii.int()), _host(depths), tile_size, tiles_x, tiles_y)
        packed = _gather(ids, _host(means2d), _host(conics), _host(opacities), _host(feats))
        bg = _host(background) if background is not None else np.zeros(0, np.float32)
        color, t_final, walked = forward(packed, offsets, width, height, tile_size, tiles_x, bg)
        ctx.state = (packed, offsets, ids, bg, t_final, walked, width, height, tile_size, tiles_x, means2d.shape[0])
        ctx.has_background = background is not None
        return torch.from_numpy(color), torch.from_numpy(1.0 - t_final)[..., None]

    @staticmethod
    def backward(ctx, v_image, v_alpha):
        packed, offsets, ids, bg, t_final, walked, width, height, tile_size, tiles_x, n = ctx.state
        grads, v_bg = backward(packed, offsets, width, height, tile_size, tiles_x, bg, t_final, walked,
                               _host(v_image), _host(v_alpha[..., 0]))
        per_gaussian = torch.from_numpy(scatter(grads, ids, n))
        v_background = torch.from_numpy(v_bg.sum(axis=0)) if ctx.has_background else None
        return (per_gaussian[:, 0:2], per_gaussian[:, 2:5], per_gaussian[:, 5], per_gaussian[:, 6:], v_background,
                None, None, None, None, None)


def composite(means2d, conics, opacities, feats, depths, radii, width, height, tile_size, background=None):
    """Alpha-composite one view. Same contract as `raster.composite`."""
    return Composite.apply(means2d, conics, opacities, feats, background, radii, depths, width, height, tile_size)


def warm_up() -> None:
    """Compile every kernel (or load it from numba's on-disk cache) on a tiny scene, forward and back,
    so that a failure shows here, once, and not in the middle of training."""
    means = torch.tensor([[0.0, 0.0, 3.0], [0.2, -0.1, 3.5]], requires_grad=True)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.2, 0.3]], requires_grad=True)
    scales = torch.full((2, 3), 0.2, requires_grad=True)
    opacities = torch.tensor([0.8, 0.5], requires_grad=True)
    coeffs = torch.rand(2, 4, 3, requires_grad=True)
    viewmats, Ks = torch.eye(4)[None], torch.tensor([[[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]])
    radii, means2d, depths, conics, feats = project(means, quats, scales, coeffs, viewmats, Ks, 8, 8, 1, 0.3, 0.01, 1e10)
    image, alpha = composite(means2d[0], conics[0], opacities, feats[0], depths[0], radii[0], 8, 8, 8, torch.zeros(3))
    (image.sum() + alpha.sum()).backward()
    if not (image.sum() > 0 and all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                                    for p in (means, quats, scales, opacities, coeffs))):
        raise RuntimeError("the compiled kernels gave a wrong result on a test scene")
