"""The CPU tile rasterizer against a dense per-pixel reference: images and gradients."""

import pytest
import torch

from codsplat.pipeline.raster import rasterize
from raster_reference import dense_render


def random_scene(n=250, seed=0, sh_coeffs=4):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([1.5, 1.2, 1.0]) + torch.tensor([0.0, 0.0, 4.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.02
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    sh = torch.randn(n, sh_coeffs, 3, generator=g) * 0.5
    return [means, quats, scales, opacities, sh]


def cameras(width, height, count=2):
    view = torch.eye(4)[None].repeat(count, 1, 1)
    if count > 1:
        view[1, :3, 3] = torch.tensor([0.2, -0.1, 0.3])
    K = torch.tensor([[width * 1.0, 0, width / 2], [0, width * 1.0, height / 2], [0, 0, 1]])[None].repeat(count, 1, 1)
    return view, K


@pytest.mark.parametrize("sh_degree,tile", [(0, 8), (1, 16), (3, 4)])
def test_matches_dense_reference_images_and_gradients(sh_degree, tile):
    params = random_scene(sh_coeffs=(sh_degree + 1) ** 2)
    for p in params:
        p.requires_grad_(True)
    view, K = cameras(41, 33)
    img, alpha, meta = rasterize(*params, view, K, 41, 33, sh_degree=sh_degree, tile_size=tile)
    ref_img, ref_alpha = dense_render(*params, view, K, 41, 33, sh_degree=sh_degree, tile_size=tile)
    assert img.shape == (2, 33, 41, 3) and alpha.shape == (2, 33, 41, 1)
    assert img.mean() > 0.05, "the scene should be visible"
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-5, rtol=0)
    weights = torch.rand_like(img)
    grads = torch.autograd.grad((img * weights).sum() + alpha.sum(), params)
    ref = torch.autograd.grad((ref_img * weights).sum() + ref_alpha.sum(), params)
    for name, got, want in zip(("means", "quats", "scales", "opacities", "sh"), grads, ref):
        scale = want.abs().max()
        assert scale > 0, name
        assert ((got - want).abs().max() / scale) < 1e-4, name


def test_meta_has_what_gsplat_strategies_read():
    params = random_scene()
    view, K = cameras(32, 24, count=1)
    _, _, meta = rasterize(*params, view, K, 32, 24, sh_degree=1)
    assert meta["means2d"].shape == (1, 250, 2) and meta["radii"].shape == (1, 250, 2)
    assert meta["width"] == 32 and meta["height"] == 24 and meta["n_cameras"] == 1
    assert (meta["radii"] > 0).any()


def test_plain_colours_and_background_fill_empty_pixels():
    means, quats, scales, opacities, _ = random_scene(n=20)
    means = means + torch.tensor([0.0, 0.0, -10.0])  # behind the camera: nothing visible
    view, K = cameras(16, 16, count=1)
    bg = torch.tensor([[0.2, 0.4, 0.6]])
    img, alpha, _ = rasterize(means, quats, scales, opacities, torch.rand(20, 3), view, K, 16, 16, backgrounds=bg)
    torch.testing.assert_close(img, bg[:, None, None, :].expand(1, 16, 16, 3))
    assert alpha.abs().max() == 0


def test_tile_size_does_not_change_the_image():
    params = random_scene(sh_coeffs=4)
    view, K = cameras(40, 40, count=1)
    a, _, _ = rasterize(*params, view, K, 40, 40, sh_degree=1, tile_size=16)
    b, _, _ = rasterize(*params, view, K, 40, 40, sh_degree=1, tile_size=8)
    assert (a - b).abs().max() < 2e-3


def test_a_view_with_nothing_visible_still_backpropagates():
    """As with gsplat's kernels, an empty view gives zero gradients (training skips nothing, crashes never)."""
    params = random_scene(n=20)
    params[0] = params[0] + torch.tensor([0.0, 0.0, -10.0])  # all behind the camera
    for p in params:
        p.requires_grad_(True)
    view, K = cameras(16, 16, count=1)
    img, alpha, meta = rasterize(*params, view, K, 16, 16, sh_degree=1)
    meta["means2d"].retain_grad()
    (img.sum() + alpha.sum()).backward()
    assert img.abs().max() == 0
    assert meta["means2d"].grad is not None and meta["means2d"].grad.abs().max() == 0
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in params)


def test_a_culled_gaussian_that_overflows_gets_zero_gradients_not_nan():
    # A Gaussian grown huge right in front of a camera overflows its 2D covariance (inf - inf = NaN)
    # and is culled. gsplat's kernels give it zero gradients; NaN ones would poison its parameters.
    params = random_scene(n=20)
    params[0][0] = torch.tensor([0.0, 0.0, 0.5])
    params[2][0] = torch.tensor([1e20, 1e20, 1e20])
    for p in params:
        p.requires_grad_(True)
    view, K = cameras(32, 24)
    img, _, meta = rasterize(*params, view, K, 32, 24, sh_degree=1)
    assert (meta["radii"][:, 0] == 0).all(), "the overflowing Gaussian is culled"
    assert img.mean() > 0.01, "the others are drawn"
    img.sum().backward()
    for p in params:
        assert torch.isfinite(p.grad).all()
    assert (params[0].grad[0] == 0).all() and (params[2].grad[0] == 0).all()
    assert params[0].grad[1:].abs().sum() > 0
