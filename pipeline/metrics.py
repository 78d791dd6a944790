"""Image quality: PSNR and SSIM, used both as the training loss and for the held-out metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Peak signal-to-noise ratio in dB for [H, W, C] images in 0..1; with a [H, W] mask, over its pixels alone."""
    if mask is None:
        mse = F.mse_loss(pred.clamp(0, 1), target).item()
    else:
        mse = (((pred.clamp(0, 1) - target) ** 2) * mask[..., None]).sum().item() / max(mask.sum().item() * pred.shape[-1], 1.0)
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def _window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(pred: torch.Tensor, target: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity of [..., H, W, C] images in 0..1 (11×11 Gaussian window, σ = 1.5,
    valid region only, as in the 3DGS reference and gsplat's trainer). Differentiable."""
    x = pred.reshape(-1, *pred.shape[-3:]).permute(0, 3, 1, 2)
    y = target.reshape(-1, *target.shape[-3:]).permute(0, 3, 1, 2)
    channels = x.shape[1]
    size = min(size, x.shape[-1], x.shape[-2])
    w = _window(size, sigma, channels, x.device)
    mu_x = F.conv2d(x, w, groups=channels)
    mu_y = F.conv2d(y, w, groups=channels)
    sxx = F.conv2d(x * x, w, groups=channels) - mu_x**2
    syy = F.conv2d(y * y, w, groups=channels) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=channels) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean()
