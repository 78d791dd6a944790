"""Splat file formats: .ply and .splat through gsplat's exporter, .spz (version 3) written here.

- .ply: the 3DGS binary little-endian layout every viewer reads (x y z, f_dc_0..2, f_rest_* channel
  by channel, opacity as logit, scale_0..2 as log, rot_0..3 with w first). gsplat's `export_splats`.
- .splat: 32 bytes a Gaussian (position, linear scale as float32; RGBA and the wxyz quaternion as
  bytes), the antimatter15 viewer format. gsplat's `export_splats`.
- .spz: Niantic's gzipped, quantised format. gsplat has no writer, so this module writes version 3
  (gzip, smallest-three quaternions; the version every SPZ reader takes) byte for byte as Niantic's
  reference writer does with `PackOptions.from = RDF`: the spec stores RUB (OpenGL, three.js), so
  the trained RDF cloud (COLMAP's axes, as in the .ply) is turned over on save: y and z of positions
  and of the quaternion's vector part change sign, and so does every SH coefficient whose basis is
  odd in y xor z. A spec reader (`UnpackOptions.to = RDF`) gets the .ply's axes back. Like the
  reference writer, an opacity above 255/255 after rounding is stored as 255, which spec readers
  decode as an infinite logit (alpha 1).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

SPZ_MAGIC = 0x5053474E  # "NGSP"
SPZ_VERSION = 3
SPZ_COLOR_SCALE = 0.15
# RDF → RUB: x stays, y and z flip. The quaternion's (x, y, z) flip by (y·z, x·z, x·y); each SH basis
# above degree 0 flips by its parity in the flipped axes (gsplat's basis order, shN index 0..14).
RDF_TO_RUB = np.array([1.0, -1.0, -1.0], np.float32)
RDF_TO_RUB_QUAT_XYZ = np.array([1.0, -1.0, -1.0], np.float32)
RDF_TO_RUB_SH = np.array([-1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, 1, -1, 1], np.float32)


def write_ply_or_splat(params: dict[str, torch.Tensor], sh_degree: int, fmt: str, path: Path) -> None:
    from gsplat import export_splats

    k = (sh_degree + 1) ** 2 - 1
    export_splats(
        params["means"], params["scales"], params["quats"], params["opacities"], params["sh0"],
        params["shN"][:, :k], format=fmt, save_to=str(path),
    )


def _round(x: np.ndarray) -> np.ndarray:
    """C's round(): halves away from zero (numpy's rounds them to even), as the reference writer."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(_round(x), 0, 255).astype(np.uint8)


def _smallest_three(quats_xyzw: np.ndarray) -> np.ndarray:
    """Pack unit quaternions into 32 bits: index of the largest |component| (2 bits), then the other
    three as sign + 9-bit magnitude scaled by 1/sqrt(2), first component in the highest bits."""
    q = quats_xyzw / np.linalg.norm(quats_xyzw, axis=1, keepdims=True)
    largest = np.abs(q).argmax(axis=1)
    negate = q[np.arange(len(q)), largest] < 0
    comp = largest.astype(np.uint32)
    for i in range(4):
        use = largest != i
        neg = ((q[:, i] < 0) ^ negate).astype(np.uint32)
        mag = np.floor(np.float32(511.0) * np.abs(q[:, i]) / np.float32(np.sqrt(0.5)) + np.float32(0.5)).astype(np.uint32).clip(max=511)
        comp = np.where(use, (comp << 10) | (neg << 9) | mag, comp)
    return comp.astype("<u4").view(np.uint8).reshape(-1, 4)


def _quantize_sh(x: np.ndarray, bits: int) -> np.ndarray:
    bucket = 1 << (8 - bits)
    q = _round(x * np.float32(128.0)) + 128.0
    q = np.floor((q + bucket // 2) / bucket) * bucket
    return np.clip(q, 0, 255).astype(np.uint8)


def spz_bytes(params: dict[str, torch.Tensor], sh_degree: int) -> bytes:
    """Encode Gaussians (trained, RDF) as SPZ version 3 in RUB (before gzip: 16-byte header, then
    attribute arrays)."""
    means = params["means"].numpy().astype(np.float32) * RDF_TO_RUB
    n = len(means)
    # 24-bit fixed point: 12 fractional bits unless the scene is too large for them
    extent = float(np.abs(means).max()) if n else 0.0
    frac_bits = int(min(12, max(0, 23 - np.ceil(np.log2(extent + 1.0)) - 1)))
    fixed = _round(means * np.float32(1 << frac_bits)).astype(np.int64).clip(-(1 << 23), (1 << 23) - 1).astype("<i4")
    positions = fixed.view(np.uint8).reshape(n, 3, 4)[:, :, :3].reshape(-1)

    alphas = _u8(torch.sigmoid(params["opacities"]).numpy() * np.float32(255.0))
    colors = _u8(params["sh0"].reshape(n, 3).numpy() * np.float32(SPZ_COLOR_SCALE * 255.0) + np.float32(127.5))
    scales = _u8((params["scales"].numpy() + np.float32(10.0)) * np.float32(16.0))
    wxyz = params["quats"].numpy().astype(np.float32)
    xyzw = np.concatenate([wxyz[:, 1:] * RDF_TO_RUB_QUAT_XYZ, wxyz[:, :1]], axis=1)
    rotations = _smallest_three(xyzw)

    k = (sh_degree + 1) ** 2 - 1
    sh = params["shN"][:, :k].numpy().astype(np.float32) * RDF_TO_RUB_SH[:k, None]  # [n, k, 3]: colour fastest
    sh_bytes = np.concatenate([_quantize_sh(sh[:, :3], 5), _quantize_sh(sh[:, 3:], 4)], axis=1) if k else sh

    header = struct.pack("<IIIBBBB", SPZ_MAGIC, SPZ_VERSION, n, sh_degree, frac_bits, 0, 0)
    body = b"".join(a.tobytes() for a in (positions, alphas, colors, scales, rotations, np.ascontiguousarray(sh_bytes, np.uint8)))
    return header + body


def write_spz(params: dict[str, torch.Tensor], sh_degree: int, path: Path) -> None:
    path.write_bytes(gzip.compress(spz_bytes(params, sh_degree), compresslevel=9, mtime=0))


def write(params: dict[str, torch.Tensor], sh_degree: int, fmt: str, path: Path) -> None:
    if fmt == "spz":
        write_spz(params, sh_degree, path)
    else:
        write_ply_or_splat(params, sh_degree, fmt, path)
