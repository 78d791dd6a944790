"""Structure from motion with pycolmap: frames → camera poses, a sparse point cloud and PINHOLE images.

Writes `sfm/sparse/` (the largest model), `sfm/undistorted/{images,sparse}` (what training reads) and
`sfm/sfm.json` (registration and error statistics). A capture that registers too few frames fails
here with a clear reason instead of producing a garbage splat later.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ReconstructionError
from .stages import StageContext

EXHAUSTIVE_MAX = 60  # `auto` matches photo sets up to this size exhaustively (n² pairs stay cheap)
LOOP_CANDIDATES = 3


def _device():
    import pycolmap
    import torch

    return pycolmap.Device.cuda if (pycolmap.has_cuda and torch.cuda.is_available()) else pycolmap.Device.cpu


def loop_pairs(image_dir: Path, names: list[str], overlap: int, k: int = LOOP_CANDIDATES, min_similarity: float = 0.4) -> list[tuple[str, str]]:
    """Pairs of frames far apart in time that look alike: where a video comes back to where it began.

    COLMAP's own loop detection needs a vocabulary tree file that is fetched at run time; a
    normalised-thumbnail similarity finds the same revisits for a single capture with no download.
    """
    thumbs = []
    for name in names:
        img = Image.open(image_dir / name).convert("L").resize((40, 30), Image.BILINEAR)
        v = np.asarray(img, np.float32).ravel()
        v -= v.mean()
        thumbs.append(v / (np.linalg.norm(v) + 1e-6))
    desc = np.stack(thumbs)
    sim = desc @ desc.T
    n = len(names)
    idx = np.arange(n)
    sim[np.abs(idx[:, None] - idx[None, :]) <= 2 * overlap] = -1  # sequential matching covers these
    pairs = set()
    for i in range(n):
        for j in np.argsort(-sim[i])[:k]:
            if sim[i, j] >= min_similarity:
                pairs.add((names[min(i, j)], names[max(i, j)]))
    return sorted(pairs)


def drop_stray_cameras(model, spread: float = 10.0, reach: float = 3.0) -> list[str]:
    """De-register cameras the mapper placed far from all the others; returns their image names.

    The global mapper now and then puts a frame tens of scene radii away with a low reprojection
    error (few observations). Training on it skews the scene scale and wastes Gaussians, so a camera
    counts as stray when its nearest neighbour is `spread` times farther than is typical AND it lies
    `reach` times farther from the median centre than the median camera does.
    """
    images = [img for img in model.images.values() if img.has_pose]
    if len(images) < 5:
        return []
    centres = np.array([img.projection_center() for img in images])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(gaps, np.inf)
    nearest = gaps.min(axis=1)
    radius = np.linalg.norm(centres - np.median(centres, axis=0), axis=1)
    stray = (nearest > spread * np.median(nearest)) & (radius > reach * np.median(radius))
    for img in (img for img, bad in zip(images, stray) if bad):
        model.deregister_frame(img.frame_id)
    return sorted(img.name for img, bad in zip(images, stray) if bad)


def run(ctx: StageContext) -> dict[str, Any]:
    import pycolmap

    # COLMAP's INFO lines drown the progress bars, and its ERROR lines repeat what our own error says
    pycolmap.logging.minloglevel = 0 if os.environ.get("CODSPLAT_VERBOSE") else 3
    cfg = ctx.config.sfm
    frames = ctx.manifest("frames")["stats"]
    image_dir = ctx.dir("frames") / "images"
    out = ctx.dir("sfm")
    for old in ("database.db", "sparse", "undistorted", "raw"):
        target = out / old
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    names = sorted(p.name for p in image_dir.glob("*.jpg"))
    db = out / "database.db"
    device = _device()

    ctx.progress(0.05, f"SIFT on {len(names)} frames")
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.sift.max_num_features = cfg.max_features
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = cfg.camera_model
    single = cfg.single_camera and frames.get("same_size", True)
    pycolmap.extract_features(
        db, image_dir, image_names=names,
        camera_mode=pycolmap.CameraMode.SINGLE if single else pycolmap.CameraMode.AUTO,
        reader_options=reader, extraction_options=extraction, device=device,
    )

    # Seeded RANSAC and mapping. COLMAP's threads still make runs differ slightly (±2% of the points).
    seed = ctx.config.sfm.seed
    pycolmap.set_random_seed(seed)
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = seed
    matcher = cfg.matcher
    if matcher == "auto":
        matcher = "exhaustive" if frames["kind"] != "video" and len(names) <= EXHAUSTIVE_MAX else "sequential"
    ctx.progress(0.3, f"{matcher} matching")
    n_loop = 0
    if matcher == "exhaustive":
        pycolmap.match_exhaustive(db, verification_options=verification, device=device)
    else:
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = cfg.overlap
        pairing.quadratic_overlap = True
        pycolmap.match_sequential(db, pairing_options=pairing, verification_options=verification, device=device)
        if cfg.loop_detection:
            pairs = loop_pairs(image_dir, names, cfg.overlap)
            n_loop = len(pairs)
            if pairs:
                pair_file = out / "loop_pairs.txt"
                pair_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
                imported = pycolmap.ImportedPairingOptions()
                imported.match_list_path = str(pair_file)
                pycolmap.match_image_pairs(db, pairing_options=imported, verification_options=verification, device=device)

    ctx.progress(0.55, f"{cfg.mapper} mapping")
    raw = out / "raw"
    raw.mkdir()
    if cfg.mapper == "global":
        options = pycolmap.GlobalPipelineOptions()
        options.random_seed = options.mapper.random_seed = seed
        models = pycolmap.global_mapping(db, image_dir, raw, options)
    else:
        options = pycolmap.IncrementalPipelineOptions()
        models = pycolmap.incremental_mapping(db, image_dir, raw, options)
    total = len(names)
    if not models:
        raise ReconstructionError(
            f"Structure from motion placed none of the {total} frames in 3D: the frames do not overlap enough.",
            stage="sfm",
            hint="Move the camera slowly around a textured subject, with each view overlapping the last.",
        )
    model = max(models.values(), key=lambda m: m.num_reg_images())
    stray = drop_stray_cameras(model)
    registered = model.num_reg_images()
    need = max(cfg.min_registered, int(np.ceil(cfg.min_registered_fraction * total)))
    if registered < need:
        raise ReconstructionError(
            f"Only {registered} of {total} frames could be placed in 3D; at least {need} are needed "
            f"(sfm.min_registered_fraction={cfg.min_registered_fraction}, sfm.min_registered={cfg.min_registered}).",
            stage="sfm",
            hint="The frames may not overlap enough or may be blurred; capture more views with steadier motion.",
        )
    sparse = out / "sparse"
    sparse.mkdir()
    model.write(sparse)
    shutil.rmtree(raw)

    ctx.progress(0.85, "undistorting")
    undistorted = out / "undistorted"
    pycolmap.undistort_images(undistorted, sparse, image_dir, output_type="COLMAP")
    # pycolmap leaves stereo helper files we do not use
    for extra in ("stereo", "run-colmap-geometric.sh", "run-colmap-photometric.sh"):
        target = undistorted / extra
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    db.unlink()  # large and only needed to match; the model holds what later stages read

    cams = [
        {"id": cid, "model": cam.model.name, "width": cam.width, "height": cam.height,
         "params": [round(float(p), 4) for p in cam.params]}
        for cid, cam in model.cameras.items()
    ]
    stats = {
        "matcher": matcher,
        "mapper": cfg.mapper,
        "device": str(device).split(".")[-1],
        "total_images": total,
        "registered_images": registered,
        "registered_fraction": round(registered / total, 3),
        "models_found": len(models),
        "points3d": model.num_points3D(),
        "mean_reprojection_error_px": round(float(model.compute_mean_reprojection_error()), 4),
        "mean_track_length": round(float(model.compute_mean_track_length()), 3),
        "loop_pairs": n_loop,
        "stray_cameras_dropped": stray,
        "cameras": cams,
        "unregistered": sorted(set(names) - {img.name for img in model.images.values() if img.has_pose}),
    }
    (out / "sfm.json").write_text(json.dumps(stats, indent=2))
    ctx.progress(1.0, f"{registered}/{total} registered")
    return stats
