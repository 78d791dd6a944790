"""gsplat's CUDA rasterizer and both CPU rasterizers (the compiled kernels and the torch reference)
agree: images and gradients.

Runs only where CUDA is present (the container, a GPU node); on a CPU-only machine gsplat's CUDA
path cannot run at all, so there is nothing to compare against.
"""

import pytest
import torch

from codsplat.pipeline.raster import TORCH, cpu_kernels, rasterize_cpu
from test_raster import cameras, random_scene

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMAGE_ATOL = 1e-4  # float32 kernels vs float32 torch, different summation order
GRAD_RTOL = 2e-3  # relative to the largest gradient of each parameter


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["torch", "compiled"])
@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_cuda_and_cpu_rasterizers_agree(sh_degree, kernels):
    from gsplat import rasterization

    params = random_scene(n=2000, sh_coeffs=(sh_degree + 1) ** 2)
    view, K = cameras(128, 96)
    cpu = [p.clone().requires_grad_(True) for p in params]
    gpu = [p.clone().cuda().requires_grad_(True) for p in params]
    chosen = TORCH if kernels == "torch" else cpu_kernels()
    assert chosen.name == kernels
    img_c, alpha_c, _ = rasterize_cpu(*cpu, view, K, 128, 96, sh_degree=sh_degree, tile_size=16, kernels=chosen)
    img_g, alpha_g, _ = rasterization(*gpu, view.cuda(), K.cuda(), 128, 96, sh_degree=sh_degree, packed=False)
    assert (img_c - img_g.cpu()).abs().max() < IMAGE_ATOL
    assert (alpha_c - alpha_g.cpu()).abs().max() < IMAGE_ATOL
    w = torch.rand_like(img_c)
    gc = torch.autograd.grad((img_c * w).sum() + alpha_c.sum(), cpu)
    gg = torch.autograd.grad((img_g * w.cuda()).sum() + alpha_g.sum(), gpu)
    for name, a, b in zip(("means", "quats", "scales", "opacities", "sh"), gc, gg):
        assert ((a - b.cpu()).abs().max() / a.abs().max()) < GRAD_RTOL, name
