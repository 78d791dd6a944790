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

Why numba rather than a torch C++ extension with OpenMP: nothing to build at install or in CI (the
extension needs a compiler and ninja on every user's machine and a rebuild per torch version), the
first load compiles once (about 25 s on 2 cores) and later runs read the cache, and it meets the
goals measured in `benchmarks/run.py raster` (10k Gaussians at 128 px, forward + backward: about 30 ms,
7-8x the torch reference). A C++ port was not built to compare against; if it is, the choice should
be measured again with that benchmark.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from .cpus import chunked

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


# Small matrices are tuples of scalars (row-major): no array is made per Gaussian, and no BLAS call.

@njit(cache=True)
def _mm(a, b):
    """3×3 @ 3×3."""
    return (a[0] * b[0] + a[1] * b[3] + a[2] * b[6], a[0] * b[1] + a[1] * b[4] + a[2] * b[7],
            a[0] * b[2] + a[1] * b[5] + a[2] * b[8],
            a[3] * b[0] + a[4] * b[3] + a[5] * b[6], a[3] * b[1] + a[4] * b[4] + a[5] * b[7],
            a[3] * b[2] + a[4] * b[5] + a[5] * b[8],
            a[6] * b[0] + a[7] * b[3] + a[8] * b[6], a[6] * b[1] + a[7] * b[4] + a[8] * b[7],
            a[6] * b[2] + a[7] * b[5] + a[8] * b[8])


@njit(cache=True)
def _t(a):
    return (a[0], a[3], a[6], a[1], a[4], a[7], a[2], a[5], a[8])


@njit(cache=True)
def _rotation(w, x, y, z):
    """Rotation matrix of a unit quaternion (w, x, y, z)."""
    return (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y))


@njit(cache=True)
def _covariance(q, s):
    """The normalised quaternion (w, x, y, z), its norm, R, and M = R diag(s)."""
    qn = max(math.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]), 1e-12)
    w, x, y, z = q[0] / qn, q[1] / qn, q[2] / qn, q[3] / qn
    R = _rotation(w, x, y, z)
    M = (R[0] * s[0], R[1] * s[1], R[2] * s[2], R[3] * s[0], R[4] * s[1], R[5] * s[2],
         R[6] * s[0], R[7] * s[1], R[8] * s[2])
    return (w, x, y, z), qn, R, M


@njit(cache=True)
def _jacobian(px, py, pz, fx, fy, cx, cy, width, height):
    """gsplat's perspective Jacobian (its non-zero entries J00, J02, J11, J12), with the direction
    clamped to 1.3x the field of view; also tx, ty and whether x and y were inside the clamp
    (outside it, J does not move with them)."""
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy
    rx, ry = px / pz, py / pz
    free_x, free_y = -lim_x_neg <= rx <= lim_x_pos, -lim_y_neg <= ry <= lim_y_pos
    tx = pz * min(max(rx, -lim_x_neg), lim_x_pos)
    ty = pz * min(max(ry, -lim_y_neg), lim_y_pos)
    return fx / pz, -fx * tx / (pz * pz), fy / pz, -fy * ty / (pz * pz), tx, ty, free_x, free_y


@njit(cache=True)
def _conic_parts(M, V, j00, j02, j11, j12, eps2d):
    """Σc = V (M Mᵀ) Vᵀ and the projected 2D covariance entries a, b, c (eps2d added)."""
    C = _mm(_mm(V, _mm(M, _t(M))), _t(V))
    # Σ2 = J Σc Jᵀ, J = [[j00, 0, j02], [0, j11, j12]]
    r0 = (j00 * C[0] + j02 * C[6], j00 * C[1] + j02 * C[7], j00 * C[2] + j02 * C[8])
    r1 = (j11 * C[3] + j12 * C[6], j11 * C[4] + j12 * C[7], j11 * C[5] + j12 * C[8])
    a = r0[0] * j00 + r0[2] * j02 + eps2d
    b = 0.5 * ((r0[1] * j11 + r0[2] * j12) + (r1[0] * j00 + r1[2] * j02))
    c = r1[1] * j11 + r1[2] * j12 + eps2d
    return C, a, b, c


@njit(cache=True, parallel=True)
def project_forward(means, quats, scales, coeffs, sh_degree, viewmat, K, width, height, eps2d, near, far):
    """Per Gaussian, for one camera: means2d [N,2], conics [N,3], depths [N], radii [N,2] and, with
    SH coefficients [N,K,3] and sh_degree >= 0, colours [N,3]."""
    n = means.shape[0]
    V = (float(viewmat[0, 0]), float(viewmat[0, 1]), float(viewmat[0, 2]), float(viewmat[1, 0]), float(viewmat[1, 1]),
         float(viewmat[1, 2]), float(viewmat[2, 0]), float(viewmat[2, 1]), float(viewmat[2, 2]))
    tv = (float(viewmat[0, 3]), float(viewmat[1, 3]), float(viewmat[2, 3]))
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    cam = (-(V[0] * tv[0] + V[3] * tv[1] + V[6] * tv[2]), -(V[1] * tv[0] + V[4] * tv[1] + V[7] * tv[2]),
           -(V[2] * tv[0] + V[5] * tv[1] + V[8] * tv[2]))
    means2d = np.zeros((n, 2), np.float32)
    conics = np.zeros((n, 3), np.float32)
    depths = np.zeros(n, np.float32)
    radii = np.zeros((n, 2), np.int32)
    colors = np.zeros((n, 3) if sh_degree >= 0 else (0, 3), np.float32)
    bases = np.empty((n if sh_degree >= 0 else 0, 16))
    nb = (sh_degree + 1) ** 2
    for g in prange(n):
        mx, my, mz = float(means[g, 0]), float(means[g, 1]), float(means[g, 2])
        px = V[0] * mx + V[1] * my + V[2] * mz + tv[0]
        py = V[3] * mx + V[4] * my + V[5] * mz + tv[1]
        pz = V[6] * mx + V[7] * my + V[8] * mz + tv[2]
        depths[g] = pz
        if sh_degree >= 0:
            dx, dy, dz = mx - cam[0], my - cam[1], mz - cam[2]
            length = max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
            _sh_bases(sh_degree, dx / length, dy / length, dz / length, bases[g])
            for ch in range(3):
                acc = 0.0
                for k in range(nb):
                    acc += bases[g, k] * coeffs[g, k, ch]
                colors[g, ch] = max(acc + 0.5, 0.0)
        if not (near < pz < far):
            continue
        _, _, _, M = _covariance((float(quats[g, 0]), float(quats[g, 1]), float(quats[g, 2]), float(quats[g, 3])),
                                 (float(scales[g, 0]), float(scales[g, 1]), float(scales[g, 2])))
        j00, j02, j11, j12, _, _, _, _ = _jacobian(px, py, pz, fx, fy, cx, cy, width, height)
        _, a, b, c = _conic_parts(M, V, j00, j02, j11, j12, eps2d)
        det = max(a * c - b * b, 1e-10)
        ux, uy = fx * px / pz + cx, fy * py / pz + cy
        if not (math.isfinite(det) and math.isfinite(a) and math.isfinite(c) and math.isfinite(ux) and math.isfinite(uy)):
            continue  # overflowed (a huge Gaussian right at the camera): culled, as gsplat's kernels do
        rx = math.ceil(np.float32(RADIUS_SIGMAS) * np.sqrt(np.float32(a)))  # in float32, as gsplat
        ry = math.ceil(np.float32(RADIUS_SIGMAS) * np.sqrt(np.float32(c)))
        if ux + rx <= 0 or ux - rx >= width or uy + ry <= 0 or uy - ry >= height:
            continue
        radii[g, 0], radii[g, 1] = rx, ry
        means2d[g, 0], means2d[g, 1] = ux, uy
        conics[g, 0], conics[g, 1], conics[g, 2] = c / det, -b / det, a / det
    return means2d, conics, depths, radii, colors


@njit(cache=True, parallel=True)
def project_backward(means, quats, scales, coeffs, sh_degree, viewmat, K, width, height, eps2d,
                     radii, v_means2d, v_conics, v_colors):
    """Gradients of means, quats (unnormalised), scales and SH coefficients from those of means2d,
    conics and colours. Culled Gaussians (radius 0) get zeros."""
    n = means.shape[0]
    V = (float(viewmat[0, 0]), float(viewmat[0, 1]), float(viewmat[0, 2]), float(viewmat[1, 0]), float(viewmat[1, 1]),
         float(viewmat[1, 2]), float(viewmat[2, 0]), float(viewmat[2, 1]), float(viewmat[2, 2]))
    tv = (float(viewmat[0, 3]), float(viewmat[1, 3]), float(viewmat[2, 3]))
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    cam = (-(V[0] * tv[0] + V[3] * tv[1] + V[6] * tv[2]), -(V[1] * tv[0] + V[4] * tv[1] + V[7] * tv[2]),
           -(V[2] * tv[0] + V[5] * tv[1] + V[8] * tv[2]))
    v_means = np.zeros((n, 3), np.float32)
    v_quats = np.zeros((n, 4), np.float32)
    v_scales = np.zeros((n, 3), np.float32)
    v_coeffs = np.zeros_like(coeffs)
    scratch = np.empty((n if sh_degree >= 0 else 0, 16, 4))  # per Gaussian: SH basis and its gradient
    nb = (sh_degree + 1) ** 2
    for g in prange(n):
        if radii[g, 0] <= 0 or radii[g, 1] <= 0:
            continue
        mx, my, mz = float(means[g, 0]), float(means[g, 1]), float(means[g, 2])
        vmx = vmy = vmz = 0.0
        if sh_degree >= 0:  # colour = max(sum_k basis_k(dir) coeff_k + 0.5, 0), dir = normalise(mean - campos)
            dx, dy, dz = mx - cam[0], my - cam[1], mz - cam[2]
            length = max(math.sqrt(dx * dx + dy * dy + dz * dz), 1e-12)
            ux, uy, uz = dx / length, dy / length, dz / length
            _sh_bases(sh_degree, ux, uy, uz, scratch[g, :, 0])
            _sh_bases_grad(sh_degree, ux, uy, uz, scratch[g, :, 1:])
            vux = vuy = vuz = 0.0
            for ch in range(3):
                acc = 0.0
                for k in range(nb):
                    acc += scratch[g, k, 0] * coeffs[g, k, ch]
                if acc + 0.5 <= 0.0:
                    continue
                vc = float(v_colors[g, ch])
                for k in range(nb):
                    v_coeffs[g, k, ch] = scratch[g, k, 0] * vc
                    f = coeffs[g, k, ch] * vc
                    vux += scratch[g, k, 1] * f
                    vuy += scratch[g, k, 2] * f
                    vuz += scratch[g, k, 3] * f
            dot = ux * vux + uy * vuy + uz * vuz
            vmx, vmy, vmz = (vux - ux * dot) / length, (vuy - uy * dot) / length, (vuz - uz * dot) / length
        # the forward pass of this Gaussian, again
        px = V[0] * mx + V[1] * my + V[2] * mz + tv[0]
        py = V[3] * mx + V[4] * my + V[5] * mz + tv[1]
        z = V[6] * mx + V[7] * my + V[8] * mz + tv[2]
        s = (float(scales[g, 0]), float(scales[g, 1]), float(scales[g, 2]))
        qt, qn, R, M = _covariance((float(quats[g, 0]), float(quats[g, 1]), float(quats[g, 2]), float(quats[g, 3])), s)
        w, x, y, zq = qt[0], qt[1], qt[2], qt[3]
        j00, j02, j11, j12, tx, ty, free_x, free_y = _jacobian(px, py, z, fx, fy, cx, cy, width, height)
        C, a, b, c = _conic_parts(M, V, j00, j02, j11, j12, eps2d)
        det = max(a * c - b * b, 1e-10)
        # conic = inverse(A): dL/dA = -P Vc P, with P = A^-1 and Vc the conic gradient as a symmetric matrix
        p00, p01, p11 = c / det, -b / det, a / det
        v00, v01, v11 = float(v_conics[g, 0]), 0.5 * float(v_conics[g, 1]), float(v_conics[g, 2])
        pv00, pv01 = p00 * v00 + p01 * v01, p00 * v01 + p01 * v11
        pv10, pv11 = p01 * v00 + p11 * v01, p01 * v01 + p11 * v11
        g00 = -(pv00 * p00 + pv01 * p01)
        g01 = -(pv00 * p01 + pv01 * p11)
        g11 = -(pv10 * p01 + pv11 * p11)
        # Σ2 = J Σc Jᵀ: dΣc = Jᵀ G J (symmetric), dJ = 2 G J Σc
        jr0, jr1 = (j00, 0.0, j02), (0.0, j11, j12)
        gj0 = (g00 * jr0[0] + g01 * jr1[0], g00 * jr0[1] + g01 * jr1[1], g00 * jr0[2] + g01 * jr1[2])
        gj1 = (g01 * jr0[0] + g11 * jr1[0], g01 * jr0[1] + g11 * jr1[1], g01 * jr0[2] + g11 * jr1[2])
        vC = (jr0[0] * gj0[0] + jr1[0] * gj1[0], jr0[0] * gj0[1] + jr1[0] * gj1[1], jr0[0] * gj0[2] + jr1[0] * gj1[2],
              jr0[1] * gj0[0] + jr1[1] * gj1[0], jr0[1] * gj0[1] + jr1[1] * gj1[1], jr0[1] * gj0[2] + jr1[1] * gj1[2],
              jr0[2] * gj0[0] + jr1[2] * gj1[0], jr0[2] * gj0[1] + jr1[2] * gj1[1], jr0[2] * gj0[2] + jr1[2] * gj1[2])
        vj00 = 2.0 * (gj0[0] * C[0] + gj0[1] * C[3] + gj0[2] * C[6])
        vj02 = 2.0 * (gj0[0] * C[2] + gj0[1] * C[5] + gj0[2] * C[8])
        vj11 = 2.0 * (gj1[0] * C[1] + gj1[1] * C[4] + gj1[2] * C[7])
        vj12 = 2.0 * (gj1[0] * C[2] + gj1[1] * C[5] + gj1[2] * C[8])
        # means2d = (fx x/z + cx, fy y/z + cy), and J's dependence on the camera-space mean p
        z2, z3 = z * z, z * z * z
        vpx = float(v_means2d[g, 0]) * fx / z
        vpy = float(v_means2d[g, 1]) * fy / z
        vpz = -(float(v_means2d[g, 0]) * fx * px + float(v_means2d[g, 1]) * fy * py) / z2
        vpz += -fx / z2 * vj00 - fy / z2 * vj11
        if free_x:  # J02 = -fx tx / z^2 with tx = x inside the clamp, else z * limit
            vpx += -fx / z2 * vj02
            vpz += 2 * fx * tx / z3 * vj02
        else:
            vpz += fx * tx / z3 * vj02
        if free_y:
            vpy += -fy / z2 * vj12
            vpz += 2 * fy * ty / z3 * vj12
        else:
            vpz += fy * ty / z3 * vj12
        v_means[g, 0] = vmx + V[0] * vpx + V[3] * vpy + V[6] * vpz
        v_means[g, 1] = vmy + V[1] * vpx + V[4] * vpy + V[7] * vpz
        v_means[g, 2] = vmz + V[2] * vpx + V[5] * vpy + V[8] * vpz
        # Σc = V Σ Vᵀ, Σ = M Mᵀ, M = R diag(s): dΣ = Vᵀ dΣc V (symmetric), dM = 2 dΣ M
        vS = _mm(_mm(_t(V), vC), V)
        vM = _mm(vS, M)
        vM = (2 * vM[0], 2 * vM[1], 2 * vM[2], 2 * vM[3], 2 * vM[4], 2 * vM[5], 2 * vM[6], 2 * vM[7], 2 * vM[8])
        v_scales[g, 0] = vM[0] * R[0] + vM[3] * R[3] + vM[6] * R[6]
        v_scales[g, 1] = vM[1] * R[1] + vM[4] * R[4] + vM[7] * R[7]
        v_scales[g, 2] = vM[2] * R[2] + vM[5] * R[5] + vM[8] * R[8]
        vR = (vM[0] * s[0], vM[1] * s[1], vM[2] * s[2], vM[3] * s[0], vM[4] * s[1], vM[5] * s[2],
              vM[6] * s[0], vM[7] * s[1], vM[8] * s[2])
        # R from the unit quaternion, then the normalisation
        v_w = 2 * (-zq * vR[1] + y * vR[2] + zq * vR[3] - x * vR[5] - y * vR[6] + x * vR[7])
        v_x = 2 * (y * vR[1] + zq * vR[2] + y * vR[3] - 2 * x * vR[4] - w * vR[5]
                   + zq * vR[6] + w * vR[7] - 2 * x * vR[8])
        v_y = 2 * (-2 * y * vR[0] + x * vR[1] + w * vR[2] + x * vR[3] + zq * vR[5]
                   - w * vR[6] + zq * vR[7] - 2 * y * vR[8])
        v_z = 2 * (-2 * zq * vR[0] - w * vR[1] + x * vR[2] + w * vR[3] - 2 * zq * vR[4]
                   + y * vR[5] + x * vR[6] + y * vR[7])
        dot = w * v_w + x * v_x + y * v_y + zq * v_z
        v_quats[g, 0] = (v_w - w * dot) / qn
        v_quats[g, 1] = (v_x - x * dot) / qn
        v_quats[g, 2] = (v_y - y * dot) / qn
        v_quats[g, 3] = (v_z - zq * dot) / qn
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
    """The parameters of every (tile, Gaussian) pair, contiguous per tile: [pairs, 6 + D]; and each
    pair's cut, the sigma past which its alpha is surely under ALPHA_MIN (so most pixels of a tile
    skip a Gaussian without an exp; the exact test still decides at the edge)."""
    d = feats.shape[1]
    packed = np.empty((ids.shape[0], 6 + d), np.float32)
    cuts = np.empty(ids.shape[0], np.float32)
    for i in prange(ids.shape[0]):
        g = ids[i]
        packed[i, 0], packed[i, 1] = means2d[g, 0], means2d[g, 1]
        packed[i, 2], packed[i, 3], packed[i, 4] = conics[g, 0], conics[g, 1], conics[g, 2]
        packed[i, 5] = opacities[g]
        cuts[i] = math.log(max(opacities[g] / ALPHA_MIN, 1e-30)) + 1e-3 if opacities[g] > 0 else -1.0
        for k in range(d):
            packed[i, 6 + k] = feats[g, k]
    return packed, cuts


@njit(cache=True, parallel=True)
def forward(packed, cuts, offsets, width, height, tile_size, tiles_x, background):
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
                    if sigma < 0 or sigma > cuts[i]:
                        continue
                    alpha = min(ALPHA_MAX, packed[i, 5] * np.exp(-sigma))
                    if alpha < ALPHA_MIN:
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
def backward(packed, cuts, offsets, width, height, tile_size, tiles_x, background, t_final, walked, v_color, v_alpha):
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
                    if sigma < 0 or sigma > cuts[i]:
                        continue
                    vis = np.exp(-sigma)
                    alpha = min(ALPHA_MAX, packed[i, 5] * vis)
                    if alpha < ALPHA_MIN:
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
        with chunked(len(args[0])):
            means2d, conics, depths, radii, colors = project_forward(*args, near, far)
        ctx.args, ctx.radii, ctx.has_sh = args, radii, coeffs is not None
        depths, radii = torch.from_numpy(depths), torch.from_numpy(radii)
        ctx.mark_non_differentiable(depths, radii)
        return torch.from_numpy(means2d), torch.from_numpy(conics), depths, radii, torch.from_numpy(colors)

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, v_radii, v_colors):
        with chunked(len(ctx.radii)):
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
        with chunked(len(ids)):
            packed, cuts = _gather(ids, _host(means2d), _host(conics), _host(opacities), _host(feats))
        bg = _host(background) if background is not None else np.zeros(0, np.float32)
        with chunked(tiles_x * tiles_y):  # tiles differ most in cost: where the subject is, or empty sky
            color, t_final, walked = forward(packed, cuts, offsets, width, height, tile_size, tiles_x, bg)
        ctx.state = (packed, cuts, offsets, ids, bg, t_final, walked, width, height, tile_size, tiles_x, means2d.shape[0])
        ctx.has_background = background is not None
        return torch.from_numpy(color), torch.from_numpy(1.0 - t_final)[..., None]

    @staticmethod
    def backward(ctx, v_image, v_alpha):
        packed, cuts, offsets, ids, bg, t_final, walked, width, height, tile_size, tiles_x, n = ctx.state
        with chunked(len(offsets) - 1):
            grads, v_bg = backward(packed, cuts, offsets, width, height, tile_size, tiles_x, bg, t_final, walked,
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
