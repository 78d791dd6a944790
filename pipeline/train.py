"""Training: SfM points → optimised Gaussians, then held-out renders and their PSNR/SSIM.

One loop for both devices; `raster.rasterize` picks gsplat's CUDA kernels or the torch tile
rasterizer. Densification is gsplat's own (`DefaultStrategy`, or `MCMCStrategy` with a Gaussian cap
on CUDA). Learning rates and the loss (0.8·L1 + 0.2·(1 − SSIM)) follow gsplat's simple_trainer.
Held-out views (every `test_every`-th) are never seen by the optimiser.

Writes train/splats.pt, train/holdout/<view>.render.png and .photo.png, train/eval.json and
train/cameras.json (the held-out cameras).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import splats as splat_io
from .config import TrainConfig
from .errors import EnvironmentProblem, InputError, QualityError
from .metrics import psnr, ssim
from .raster import cpu_kernels, rasterize
from .scene import Scene, View, load_scene
from .stages import StageContext

BASE_LR = {"scales": 5e-3, "quats": 1e-3, "opacities": 5e-2, "sh0": 2.5e-3, "shN": 2.5e-3 / 20}
MCMC_OPACITY_REG = 0.01
BACKGROUND_ALPHA_WEIGHT = 0.1  # with masks: the background's mean opacity, added to the loss
MCMC_SCALE_REG = 0.01
CAMERAS = "cameras.json"  # the held-out cameras: a viewer opens where a photo was taken


def choose_device(cfg: TrainConfig) -> torch.device:
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise EnvironmentProblem("train.device is 'cuda' but this machine has no usable CUDA GPU.",
                                 hint="Set train.device to 'auto' or 'cpu'.")
    device = torch.device("cuda" if has_cuda and cfg.device != "cpu" else "cpu")
    if device.type == "cuda" and (problem := cuda_kernels_problem()):
        raise EnvironmentProblem(f"train.device is '{cfg.device}' and this machine has a CUDA GPU, but {problem}.",
                                 hint="Use the worker image (its kernels are compiled when it is built), install the "
                                      "CUDA toolkit so gsplat builds them (once, minutes), or set train.device to 'cpu'.")
    if cfg.strategy == "mcmc" and device.type != "cuda":
        raise InputError("train.strategy 'mcmc' needs a CUDA GPU (gsplat's relocation runs only on CUDA).",
                         hint="Use train.strategy 'default' (or a preset other than 'quality') on the CPU.")
    return device


def cuda_kernels_problem() -> str | None:
    """Why gsplat's CUDA kernels cannot run here, or None when they load. Importing its backend works
    even when they did not: with no prebuilt kernels and no CUDA toolkit to build them it sets `_C` to
    None, and the first rasterization crashes."""
    try:
        from gsplat.cuda._backend import _C
    except Exception as exc:  # noqa: BLE001 - whatever stops the import, training cannot use the GPU
        return f"gsplat's CUDA backend does not import ({exc.__class__.__name__}: {str(exc)[:200]})"
    return None if _C is not None else "gsplat's CUDA kernels are not built and no CUDA toolkit (nvcc) is here to build them"


def make_strategy(cfg: TrainConfig):
    from gsplat.strategy import DefaultStrategy, MCMCStrategy

    if cfg.strategy == "mcmc":
        return MCMCStrategy(cap_max=cfg.cap_max, refine_start_iter=cfg.refine_start,
                            refine_stop_iter=cfg.refine_stop, refine_every=cfg.refine_every)
    # gsplat 1.5.3 never resets opacities itself (`step % reset_every == 0 & step > 0` is always false:
    # `&` binds first); `reset_opacities_due` does it from our loop, and gsplat is told never to, so a
    # release with the fix cannot reset twice
    return DefaultStrategy(
        refine_start_iter=cfg.refine_start, refine_stop_iter=cfg.refine_stop, refine_every=cfg.refine_every,
        reset_every=cfg.steps + 1, grow_grad2d=cfg.grow_grad2d, verbose=False,
    )


def reset_opacities_due(cfg: TrainConfig, step: int) -> bool:
    """DefaultStrategy's opacity reset, as upstream means it: every `reset_every` steps while it refines."""
    return cfg.strategy == "default" and cfg.reset_every > 0 and 0 < step < cfg.refine_stop and step % cfg.reset_every == 0


def render(params: dict[str, torch.Tensor], view: View, sh_degree: int, **kw):
    """Render one view from raw parameters (activations applied here, in one place)."""
    colors = torch.cat([params["sh0"], params["shN"]], dim=1)
    img, alpha, meta = rasterize(
        params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
        colors, view.viewmat[None], view.K[None], view.width, view.height, sh_degree=sh_degree, **kw,
    )
    return img[0], alpha[0], meta


def train(scene: Scene, cfg: TrainConfig, device: torch.device, progress=lambda f, n: None) -> tuple[dict, int, dict]:
    """Optimise Gaussians on the training views. Returns the parameters, the SH degree reached and stats."""
    from gsplat.strategy.ops import reset_opa

    torch.manual_seed(cfg.seed)
    opacity, scale = cfg.start
    init = splat_io.init_from_points(scene.points, scene.colors, cfg.sh_degree, opacity, cfg.seed, scale)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(device)) for k, v in init.items()})
    lrs = {"means": cfg.means_lr * scene.scale, **BASE_LR}
    optimizers = {k: torch.optim.Adam([{"params": params[k], "lr": lr, "name": k}], eps=1e-15) for k, lr in lrs.items()}
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizers["means"], gamma=0.01 ** (1.0 / cfg.steps))
    strategy = make_strategy(cfg)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=scene.scale) if cfg.strategy == "default" else strategy.initialize_state()

    views = [v.to(device) for v in scene.train]
    order = np.random.default_rng(cfg.seed).permutation
    queue: list[int] = []
    started = time.perf_counter()
    loss_value = float("nan")
    sh_degree = 0
    for step in range(cfg.steps):
        if not queue:
            queue = list(order(len(views)))
        view = views[queue.pop()]
        sh_degree = min(step // cfg.sh_degree_interval, cfg.sh_degree)
        image, alpha, info = render(params, view, sh_degree)
        target, clear = view.image, None
        if view.mask is not None:  # the background is not scored, only asked to be transparent
            keep = view.mask[..., None]
            image, target, clear = image * keep, view.image * keep, (alpha * (1 - keep)).mean()
        strategy.step_pre_backward(params, optimizers, state, step, info)
        l1 = F.l1_loss(image, target)
        loss = (1 - cfg.ssim_lambda) * l1 + cfg.ssim_lambda * (1 - ssim(image, target))
        if clear is not None:
            loss = loss + BACKGROUND_ALPHA_WEIGHT * clear
        if cfg.strategy == "mcmc":
            loss = loss + MCMC_OPACITY_REG * torch.sigmoid(params["opacities"]).mean()
            loss = loss + MCMC_SCALE_REG * torch.exp(params["scales"]).mean()
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        decay.step()
        if cfg.strategy == "mcmc":
            strategy.step_post_backward(params, optimizers, state, step, info, lr=decay.get_last_lr()[0])
        else:
            strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
            if reset_opacities_due(cfg, step):  # to twice the pruning threshold; their Adam moments to zero
                reset_opa(params=params, optimizers=optimizers, state=state, value=strategy.prune_opa * 2.0)
        loss_value = loss.item()
        if len(params["means"]) == 0:
            raise QualityError(f"Training pruned every Gaussian by step {step}: nothing is left to render.",
                               stage="train", hint="Lower train.grow_grad2d or raise train.init_opacity; check the SfM result.")
        if not math.isfinite(loss_value):
            raise QualityError(f"Training diverged at step {step} (loss is {loss_value}).", stage="train",
                               hint="Lower train.means_lr or check the SfM result.")
        if step % 10 == 0 or step == cfg.steps - 1:
            progress((step + 1) / cfg.steps, f"step {step + 1}/{cfg.steps} · {len(params['means'])} Gaussians · loss {loss_value:.4f}")
    seconds = time.perf_counter() - started
    trained = {k: v.detach() for k, v in params.items()}
    return trained, sh_degree, {
        "steps": cfg.steps, "seconds": round(seconds, 2), "steps_per_s": round(cfg.steps / seconds, 2),
        "final_loss": round(loss_value, 5), "gaussians_initial": len(init["means"]), "gaussians": len(trained["means"]),
    }


@torch.no_grad()
def evaluate(params: dict[str, torch.Tensor], views: list[View], sh_degree: int, out: Path | None = None) -> dict[str, Any]:
    """PSNR/SSIM of every held-out view; renders and photos saved side by side for the previews."""
    per_view = []
    for view in views:
        image, _, _ = render(params, view, sh_degree)
        image, photo = image.clamp(0, 1), view.image
        if view.mask is not None:  # scored on the subject alone, both on black
            photo = view.image * view.mask[..., None]
            image = image * view.mask[..., None]
        per_view.append({"view": view.name, "psnr": round(psnr(image, photo, view.mask), 3),
                         "ssim": round(float(ssim(image, photo)), 4), **({"masked": True} if view.mask is not None else {})})
        if out is not None:
            stem = Path(view.name).stem
            for tag, img in (("render", image), ("photo", photo)):
                Image.fromarray((img.cpu().numpy() * 255 + 0.5).astype(np.uint8)).save(out / f"{stem}.{tag}.png")
    mean = lambda key: round(float(np.mean([v[key] for v in per_view])), 4) if per_view else None  # noqa: E731
    return {"psnr": mean("psnr"), "ssim": mean("ssim"), "views": per_view}


def camera_json(view: View) -> dict[str, Any]:
    """A held-out camera as viewers need it: OpenCV axes (COLMAP's), world → camera, row-major."""
    K = view.K.cpu()
    return {"name": view.name, "width": view.width, "height": view.height,
            "fx": float(K[0, 0]), "fy": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]),
            "world_to_camera": [[round(float(x), 6) for x in row] for row in view.viewmat.cpu()]}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config.train
    device = choose_device(cfg)
    ctx.progress(0.0, f"loading views on {device.type}")
    scene = load_scene(ctx.dir("sfm") / "undistorted", cfg.max_side, cfg.test_every)
    if not scene.train or not scene.test:
        raise InputError(
            f"{len(scene.train) + len(scene.test)} registered views are too few to both train and hold out "
            f"(train.test_every={cfg.test_every}).", stage="train")
    params, sh_degree, stats = train(scene, cfg, device, ctx.progress)
    out = ctx.dir("train")
    holdout = out / "holdout"
    holdout.mkdir(exist_ok=True)
    for old in holdout.glob("*.png"):
        old.unlink()
    evaluation = evaluate(params, [v.to(device) for v in scene.test], sh_degree, holdout)
    splat_io.save(out / "splats.pt", params, sh_degree)
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2))
    (out / CAMERAS).write_text(json.dumps({"views": [camera_json(v) for v in scene.test]}, indent=2))
    return {
        **stats, "device": device.type, "rasterizer": "gsplat-cuda" if device.type == "cuda" else cpu_kernels().name,
        "sh_degree": sh_degree, "train_views": len(scene.train),
        "test_views": len(scene.test), "resolution": [scene.train[0].width, scene.train[0].height],
        "scene_scale": round(scene.scale, 4), "psnr": evaluation["psnr"], "ssim": evaluation["ssim"],
    }
