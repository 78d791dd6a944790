"""The CPU rasterizer: the torch tile rasterizer against a dense per-pixel oracle, and the compiled
kernels against the torch rasterizer (their reference), images and gradients, on random scenes and
on the edge cases that break rasterizers."""

import pytest
import torch

from codsplat.pipeline.raster import TORCH, cpu_kernels, rasterize, rasterize_cpu
from raster_reference import dense_render

# Compiled vs torch: the same float32 rules, summed in another order. Images agree to a few ulps of
# 1; each gradient to 1e-4 of its largest entry (the projection's backward is analytic in float64
# in the kernels, autograd in float32 in torch).
IMAGE_ATOL = 1e-5
GRAD_RTOL = 1e-4
PARAMS = ("means", "quats", "scales", "opacities", "colors")


def random_scene(n=250, seed=0, sh_coeffs=4):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([1.5, 1.2, 1.0]) + torch.tensor([0.0, 0.0, 4.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.02
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    sh = torch.randn(n, sh_coeffs, 3, generator=g) * 0.5
    return [means, quats, scales, opacities, sh]


def cameras(width, height, count=2, turned=False):
    """`count` cameras looking down +z; the second moved, and with `turned` also rotated about all
    three axes (every entry of its view matrix then carries weight in the projection's gradient)."""
    view = torch.eye(4)[None].repeat(count, 1, 1)
    if count > 1:
        view[1, :3, 3] = torch.tensor([0.2, -0.1, 0.3])
        if turned:
            axis = torch.tensor([0.12, -0.16, 0.08])  # axis-angle, about 12 degrees
            k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]]) / axis.norm()
            angle = axis.norm()
            view[1, :3, :3] = torch.eye(3) + angle.sin() * k + (1 - angle.cos()) * k @ k
    K = torch.tensor([[width * 1.0, 0, width / 2], [0, width * 1.0, height / 2], [0, 0, 1]])[None].repeat(count, 1, 1)
    return view, K


@pytest.mark.parametrize("sh_degree,tile", [(0, 8), (1, 16), (3, 4)])
def test_torch_reference_matches_dense_oracle_images_and_gradients(sh_degree, tile):
    params = random_scene(sh_coeffs=(sh_degree + 1) ** 2)
    for p in params:
        p.requires_grad_(True)
    view, K = cameras(41, 33)
    img, alpha, meta = rasterize_cpu(*params, view, K, 41, 33, sh_degree=sh_degree, tile_size=tile, kernels=TORCH)
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


def render_both(params, view, K, width, height, tile=8, sh_degree=1, backgrounds=None):
    """Image, alpha, means2d gradient and parameter gradients from the torch reference and the
    compiled kernels, for one weighted loss."""
    out = []
    for kernels in (TORCH, cpu_kernels()):
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        bg = backgrounds.clone().requires_grad_(True) if backgrounds is not None else None
        img, alpha, meta = rasterize_cpu(*ps, view, K, width, height, sh_degree=sh_degree, tile_size=tile,
                                         backgrounds=bg, kernels=kernels)
        meta["means2d"].retain_grad()
        weights = torch.rand(img.shape, generator=torch.Generator().manual_seed(3))
        ((img * weights).sum() + 0.5 * alpha.sum()).backward()
        out.append({"image": img.detach(), "alpha": alpha.detach(), "radii": meta["radii"],
                    "means2d": meta["means2d"].grad, "background": bg.grad if bg is not None else None,
                    **{name: p.grad for name, p in zip(PARAMS, ps)}})
    return out


def assert_agree(ref, got, names=PARAMS + ("means2d",)):
    assert torch.equal(ref["radii"], got["radii"])
    torch.testing.assert_close(got["image"], ref["image"], atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(got["alpha"], ref["alpha"], atol=IMAGE_ATOL, rtol=0)
    for name in names:
        scale = ref[name].abs().max()
        assert torch.isfinite(got[name]).all(), name
        assert ((got[name] - ref[name]).abs().max() / scale.clamp_min(1e-12)) < GRAD_RTOL, name


def test_the_compiled_kernels_load_here():
    assert cpu_kernels().name == "compiled", "numba is a dependency: the compiled kernels must load"


@pytest.mark.parametrize("seed,sh_degree,tile,size", [
    (0, 0, 8, (41, 33)), (1, 1, 16, (64, 48)), (2, 3, 4, (37, 29)), (3, 2, 8, (80, 60)),
])
def test_compiled_kernels_match_the_torch_reference(seed, sh_degree, tile, size):
    params = random_scene(n=400, seed=seed, sh_coeffs=(sh_degree + 1) ** 2)
    view, K = cameras(*size, turned=seed % 2 == 1)
    background = torch.rand(2, 3, generator=torch.Generator().manual_seed(seed))
    ref, got = render_both(params, view, K, *size, tile=tile, sh_degree=sh_degree, backgrounds=background)
    assert ref["image"].mean() > 0.05 and (ref["radii"] > 0).all(-1).sum() > 100, "the scene should be visible"
    assert_agree(ref, got, PARAMS + ("means2d", "background"))


def test_plain_colours_per_camera_match():
    params = random_scene(n=300, seed=4)
    params[4] = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(4))  # [C, N, D], no SH
    view, K = cameras(40, 32)
    ref, got = render_both(params, view, K, 40, 32, sh_degree=None)
    assert_agree(ref, got)


def test_edge_cases_match_behind_the_camera_huge_off_image_and_straddling_tiles():
    params = random_scene(n=200, seed=5, sh_coeffs=4)
    means, scales = params[0], params[2]
    means[:20, 2] = -2.0  # behind the camera
    means[20:30, 2] = 0.005  # in front of the camera but nearer than the near plane
    means[30:40, 0] = 40.0  # far off the image to the side
    scales[40:50] = 0.6  # large: they straddle many tiles
    means[50:55] = torch.tensor([0.0, 0.0, 0.5])  # right at the camera...
    scales[50:55] = 1e20  # ...and huge: the projection overflows, and the Gaussian is culled
    view, K = cameras(48, 40, count=1)
    ref, got = render_both(params, view, K, 48, 40, tile=8)
    radii = got["radii"]
    assert (radii[:, :40] == 0).all() and (radii[:, 50:55] == 0).all()
    assert (radii[:, 40:50, 0] > 16).all(), "the large ones span several tiles"
    for name in PARAMS:  # culled Gaussians: zero gradients, never NaN
        assert (got[name][:40] == 0).all() and (got[name][50:55] == 0).all(), name
    assert_agree(ref, got)


def test_an_empty_view_matches_and_backpropagates_zeros():
    params = random_scene(n=30, seed=6)
    params[0] = params[0] + torch.tensor([0.0, 0.0, -10.0])  # everything behind the camera
    view, K = cameras(16, 16, count=1)
    ref, got = render_both(params, view, K, 16, 16, backgrounds=torch.tensor([[0.2, 0.4, 0.6]]))
    torch.testing.assert_close(got["image"], torch.tensor([0.2, 0.4, 0.6]).expand(1, 16, 16, 3))
    for name in PARAMS + ("means2d",):
        assert (got[name] == 0).all() and (ref[name] == 0).all(), name
    torch.testing.assert_close(got["background"], ref["background"])


def test_gradients_agree_where_every_projection_term_matters():
    """Scenes where each term of the projection's backward carries weight: Gaussians centred outside
    the image (past the clamp of the Jacobian, 0.65 of the focal length here) whose footprint reaches
    into it, on all four sides; needles and plates (strong anisotropy) at random rotations; and
    off-centre ones near the edges. None is culled, and every parameter's gradient matches the torch
    reference (the random scenes keep every Gaussian inside the clamp)."""
    n, size = 160, (48, 40)
    params = random_scene(n=n, seed=7)
    means, scales = params[0], params[2]
    z = 4.0
    sides = torch.tensor([[0.75, 0.0], [-0.75, 0.1], [0.1, 0.78], [-0.1, -0.78]])  # x/z, y/z: just past the clamp
    for i, (rx, ry) in enumerate(sides):
        means[i * 10:(i + 1) * 10] = torch.tensor([rx * z, ry * z, z]) + torch.randn(10, 3, generator=torch.Generator().manual_seed(i)) * 0.05
        scales[i * 10:(i + 1) * 10] = 0.9  # wide enough to reach back into the image
    scales[40:80] = torch.tensor([0.5, 0.01, 0.04])  # needles and plates
    means[80:120, :2] = means[80:120, :2] * 1.3  # off-centre, towards the edges
    view, K = cameras(*size)
    ref, got = render_both(params, view, K, *size, tile=8)
    clamped = got["radii"][0, :40, 0] > 0
    assert clamped.sum() >= 30, "the Gaussians past the clamp reach into the image"
    assert_agree(ref, got)


def test_the_compiled_kernels_load_when_the_first_render_is_under_no_grad():
    """A process whose first render is an evaluation (`torch.no_grad`) still gets the compiled kernels,
    not the several times slower torch path: their warm-up runs its backward pass with grad enabled."""
    import subprocess
    import sys

    code = ("import torch\nfrom codsplat.pipeline.raster import cpu_kernels\n"
            "with torch.no_grad():\n    print(cpu_kernels().name)\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "compiled"


def test_gradients_match_finite_differences_on_a_smooth_scene():
    """Both rasterizers' gradients against central differences of the image itself, so that a wrong
    term shared by the compiled kernels and their torch reference is caught too. Finite differences
    need a forward pass that is smooth in every parameter: here every Gaussian's footprint covers the
    whole tiny image with alpha above the 1/255 cut-off (no pixel enters or leaves it), depths are
    well apart (no reordering), and transmittance never reaches the early stop. Within that: an
    off-centre, strongly anisotropic set at random rotations, and one centred past the Jacobian's
    clamp (x/z 0.69 > 0.65 here), beside the image's edge. The differences are taken in float64 on the
    torch reference, exact to ~1e-9 of the largest entry."""
    W, H = 12, 10
    view, K = cameras(W, H, turned=True)
    params = [torch.tensor([[0.25, -0.1, 3.0], [-0.3, 0.2, 4.0], [0.1, 0.3, 5.0], [2.4, 0.3, 3.5]]),
              torch.tensor([[0.9, 0.2, -0.3, 0.1], [0.5, -0.5, 0.4, 0.3], [0.7, 0.1, 0.6, -0.2], [0.3, 0.8, -0.2, 0.4]]),
              torch.tensor([[1.6, 0.9, 0.5], [2.4, 1.2, 2.0], [2.6, 3.0, 1.4], [7.0, 7.0, 2.0]]),
              torch.tensor([0.35, 0.4, 0.7, 0.8]),
              torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(1)) * 0.4]
    weights = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(ps, kernels=TORCH):
        img, alpha, meta = rasterize_cpu(*ps, view.to(ps[0].dtype), K.to(ps[0].dtype), W, H, sh_degree=1,
                                         tile_size=4, kernels=kernels)
        return (img.double() * weights).sum() + 0.5 * alpha.double().sum(), meta

    exact = [p.double() for p in params]
    for i in range(4):  # the premise: each Gaussian alone is above the cut-off at every pixel
        alone = [p[i:i + 1] for p in exact]
        _, alpha, meta = rasterize_cpu(*alone, view.double(), K.double(), W, H, sh_degree=1, tile_size=4)
        assert alpha.min() > 2 / 255, f"Gaussian {i} is cut off somewhere in the image"
    eps = 1e-6
    numeric = []
    for k, p in enumerate(exact):
        grad = torch.zeros_like(p)
        for i in range(p.numel()):
            plus, minus = [q.clone() for q in exact], [q.clone() for q in exact]
            plus[k].view(-1)[i] += eps
            minus[k].view(-1)[i] -= eps
            grad.view(-1)[i] = (loss(plus)[0] - loss(minus)[0]) / (2 * eps)
        numeric.append(grad)
    for kernels, dtype, rtol in ((TORCH, torch.float64, 1e-7), (TORCH, torch.float32, 1e-4), (cpu_kernels(), torch.float32, 1e-4)):
        ps = [p.to(dtype).requires_grad_(True) for p in params]
        value, meta = loss(ps, kernels)
        assert (meta["radii"] > 0).all()
        for name, got, want in zip(PARAMS, torch.autograd.grad(value, ps), numeric):
            assert want.abs().max() > 0, name
            error = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert error < rtol, f"{kernels.name} {dtype} {name}: {error:.1e}"


def test_a_gaussian_is_skipped_where_its_sigma_is_negative_by_both_passes():
    """The compositing contract (raster.py): where a Gaussian's sigma is negative (its conic is not
    positive definite, as rounding can leave a needle's) it adds nothing to the pixel, and so takes no
    gradient there; where it is exactly 0 (a pixel centre on the mean) it counts. The compiled backward
    must skip what the compiled forward skipped, and only that."""
    from codsplat.pipeline import raster, raster_cpu

    size, depths = 16, torch.tensor([1.0, 2.0])
    radii = torch.tensor([[8, 8], [8, 8]], dtype=torch.int32)
    inputs = (torch.tensor([[8.0, 8.0], [7.5, 8.5]]),  # the second on the centre of pixel (7, 8): sigma 0 there
              torch.tensor([[0.05, 0.12, 0.05], [0.02, 0.0, 0.02]]),  # the front one's conic is indefinite
              torch.tensor([0.6, 0.8]), torch.tensor([[1.0, 0.2, 0.1], [0.1, 0.3, 0.9]]))
    px = torch.arange(size) + 0.5 - 8.0
    dx, dy = px[None, :], px[:, None]
    a, b, c = inputs[1][0].tolist()
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    assert (sigma < 0).sum() > 20 and (sigma >= 0).sum() > 20, "it is skipped on one diagonal, drawn on the other"
    weights = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(9))
    out = []
    for composite in (raster.composite, raster_cpu.composite):
        leaves = [t.clone().requires_grad_() for t in inputs]
        image, alpha = composite(*leaves, depths, radii, size, size, 8)
        ((image * weights).sum() + alpha.sum()).backward()
        out.append((image.detach(), [leaf.grad for leaf in leaves]))
    (ref_image, ref_grads), (image, grads) = out
    torch.testing.assert_close(image, ref_image, atol=IMAGE_ATOL, rtol=0)
    for name, r, g in zip(("means2d", "conics", "opacities", "colors"), ref_grads, grads):
        torch.testing.assert_close(g, r, atol=GRAD_RTOL * float(r.abs().max()), rtol=0, msg=name)
