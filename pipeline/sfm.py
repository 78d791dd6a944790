"""Structure from motion with pycolmap: frames → camera poses, a sparse point cloud and PINHOLE images.

Writes `sfm/sparse/` (the largest model), `sfm/undistorted/{images,sparse}` (what training reads) and
`sfm/sfm.json` (registration and error statistics). A capture that registers too few frames fails
here with a clear reason instead of producing a garbage splat later.

The same frames and `sfm.seed` give the same model on every run: every random choice is seeded,
the images enter the database in name order before the SIFT threads run (their ids otherwise
follow which thread finished first, and the mappers' choices follow the ids), and matching and
mapping run on one thread (`sfm.deterministic`). With more, the CPU matcher's matches differ from
run to run (the sample, 9 runs: 2,342 to 2,402 points, held-out PSNR 29.33 to 29.49 dB; on one
thread every run gives the same database and model, for 20% more matching time on 2 cores), and
bundle adjustment's threads add up in the order they finish. A model is judged
before training sees it: one that places well fewer frames than the verified matches connect, or
that had many cameras dropped as stray, is mapped again with the other mapper, then another seed,
and the best try is kept. Each try is in `sfm.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import equirect, poses
from .cpus import usable
from .errors import InputError, ReconstructionError
from .stages import StageContext

EXHAUSTIVE_MAX = 60  # `auto` matches photo sets up to this size exhaustively (n² pairs stay cheap)
LOOP_CANDIDATES = 3
MIN_PAIR_INLIERS = 15  # a verified pair links two frames (the mappers' own `min_num_matches`)
WEAK_SHARE = 0.9  # a model placing fewer than this share of the frames the matches connect is weak
WEAK_STRAY_SHARE = 0.1  # as is one that lost more than this share of its cameras as stray
MAX_TRIES = 3  # the configured mapper, the other one, then the configured one with the next seed
MIN_POSED_POINTS = 100  # with given poses, fewer triangulated points than this is no start for training
RANDOM_POINTS = 5000  # then as many random points join them, within the cameras' bounds


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


def connected(db_path: Path) -> int:
    """The most frames that one model could place: the largest group of frames linked by verified
    pairs of at least MIN_PAIR_INLIERS inliers."""
    import pycolmap

    db = pycolmap.Database.open(str(db_path))
    try:
        parent = {image.image_id: image.image_id for image in db.read_all_images()}
        pair_ids, inliers = db.read_two_view_geometry_num_inliers()
    finally:
        db.close()

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair_id, count in zip(pair_ids, inliers):
        if count >= MIN_PAIR_INLIERS:
            a, b = pycolmap.pair_id_to_image_pair(pair_id)
            parent[root(a)] = root(b)
    sizes: dict[int, int] = {}
    for i in parent:
        sizes[root(i)] = sizes.get(root(i), 0) + 1
    return max(sizes.values(), default=0)


def map_once(db: Path, image_dir: Path, raw: Path, mapper: str, seed: int, threads: int, rig: bool = False):
    """One mapping of the matched database: its largest model (stray cameras dropped), the number
    of models found, and the names of the strays; (None, 0, []) when nothing was placed."""
    import pycolmap

    raw.mkdir(parents=True)
    if mapper == "global":
        options = pycolmap.GlobalPipelineOptions()
        m = options.mapper
        options.random_seed = m.random_seed = m.global_positioning.random_seed = seed
        m.retriangulation.random_seed = m.rotation_averaging.random_seed = seed
        options.num_threads = m.num_threads = threads
        models = pycolmap.global_mapping(db, image_dir, raw, options)
    else:
        options = pycolmap.IncrementalPipelineOptions()
        options.random_seed = options.mapper.random_seed = options.triangulation.random_seed = seed
        options.num_threads = options.mapper.num_threads = threads
        options.ba_refine_sensor_from_rig = False  # a rig's faces turn together by construction (equirect.py)
        options.ba_refine_focal_length = options.ba_refine_principal_point = not rig
        models = pycolmap.incremental_mapping(db, image_dir, raw, options)
    if not models:
        return None, 0, []
    model = max(models.values(), key=lambda m: m.num_reg_images())
    return model, len(models), drop_stray_cameras(model)


def undistort_masks(masks: Path, sparse: Path, dest: Path) -> None:
    """The masks through the same undistortion as their frames: each as an image named as its frame (COLMAP
    reads a file by its content), written beside the undistorted frames as `masks/<frame>`."""
    import tempfile

    import pycolmap

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        as_frames = Path(tmp) / "frames"
        as_frames.mkdir()
        for mask in masks.glob("*.png"):
            shutil.copyfile(mask, as_frames / mask.name.removesuffix(".png"))
        pycolmap.undistort_images(Path(tmp) / "out", sparse, as_frames, output_type="COLMAP")
        shutil.move(Path(tmp) / "out" / "images", dest)


def posed_pairs(given: dict[str, poses.Given], neighbours: int) -> list[tuple[str, str]]:
    """Each frame with its `neighbours` nearest frames that look the same way (their optical axes within
    90°), by camera centre: with the poses known, far or opposed frames need not be matched."""
    names = sorted(given)
    centres = np.array([-given[n].cam_from_world[:, :3].T @ given[n].cam_from_world[:, 3] for n in names])
    axes = np.array([given[n].cam_from_world[2, :3] for n in names])
    pairs = set()
    for i in range(len(names)):
        distance = np.linalg.norm(centres - centres[i], axis=1)
        distance[(axes @ axes[i]) <= 0] = np.inf  # facing away: nothing in common
        distance[i] = np.inf
        for j in np.argsort(distance)[:neighbours]:
            if np.isfinite(distance[j]):
                pairs.add((names[min(i, j)], names[max(i, j)]))
    return sorted(pairs)


def set_given_cameras(db: Path, image_dir: Path, given: dict[str, poses.Given]) -> None:
    """Each frame's camera as the pose file gives it, scaled to the frame's size (one camera per frame)."""
    import pycolmap

    with pycolmap.Database.open(str(db)) as database:
        for image in database.read_all_images():
            view = given[image.name]
            width, height = Image.open(image_dir / image.name).size
            camera = database.read_camera(image.camera_id)
            camera.model = pycolmap.CameraModelId(getattr(pycolmap.CameraModelId, poses.colmap_model(view.model)))
            camera.width, camera.height = width, height
            camera.params = poses.full_params(view.model, view.scaled(width, height))
            camera.has_prior_focal_length = True
            database.update_camera(camera)


def posed_model(db: Path, image_dir: Path, work: Path, given: dict[str, poses.Given], mode: str, seed: int):
    """The model with the given poses: points triangulated from the matches (COLMAP's point_triangulator),
    with `refine` the poses and points then bundle-adjusted (the intrinsics stay as given). With too few
    points to start training from (matches too sparse), random points within the cameras' bounds join them."""
    import pycolmap

    model = pycolmap.Reconstruction()
    with pycolmap.Database.open(str(db)) as database:
        for image in database.read_all_images():
            camera = database.read_camera(image.camera_id)
            model.add_camera_with_trivial_rig(camera)
            model.add_image_with_trivial_frame(pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image.image_id),
                                               pycolmap.Rigid3d(given[image.name].cam_from_world))
    work.mkdir(parents=True, exist_ok=True)
    model = pycolmap.triangulate_points(model, db, image_dir, work)
    if mode == "refine":
        options = pycolmap.BundleAdjustmentOptions()
        options.refine_focal_length = options.refine_principal_point = options.refine_extra_params = False
        pycolmap.bundle_adjustment(model, options)
    if model.num_points3D() < MIN_POSED_POINTS:
        centres = np.array([image.projection_center() for image in model.images.values()])
        lo, hi = centres.min(0), centres.max(0)
        reach = max(float(np.linalg.norm(hi - lo)), 1e-3)
        rng = np.random.default_rng(seed)
        for xyz in rng.uniform(lo - 0.5 * reach, hi + 0.5 * reach, (RANDOM_POINTS, 3)):
            model.add_point3D(xyz, pycolmap.Track(), rng.integers(0, 256, 3).astype(np.uint8))
    shutil.rmtree(work, ignore_errors=True)
    return model


def weakness(registered: int, stray: int, supported: int) -> str | None:
    """Why a model should be mapped again, or None when it is as good as its matches allow."""
    if stray > WEAK_STRAY_SHARE * (registered + stray):
        return f"dropped {stray} of {registered + stray} cameras as stray"
    if registered < WEAK_SHARE * supported:
        return f"placed {registered} of the {supported} frames its matches connect"
    return None


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
    device, threads = _device(), usable()
    given, found = None, None
    if cfg.poses != "ignore":
        found = poses.read(ctx.dir("frames") / "poses")
        if found is None:
            raise InputError(f"sfm.poses is '{cfg.poses}' but no poses came with the photos: put a transforms.json, or "
                             "a COLMAP model in sparse/0/, beside them (in the folder or the .zip).", stage="sfm",
                             hint="Or set sfm.poses to 'ignore' to find the poses from the photos.")
        given = poses.match(found, json.loads((ctx.dir("frames") / "frames.json").read_text())["frames"])

    ctx.progress(0.05, f"SIFT on {len(names)} frames")
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.sift.max_num_features = cfg.max_features
    extraction.num_threads = threads
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = cfg.camera_model
    masks = ctx.dir("frames") / "masks"
    masks = masks if masks.is_dir() and any(masks.iterdir()) else None
    if masks is not None:  # no features on the background: <frame>.png, black where it is
        reader.mask_path = str(masks)
    single = cfg.single_camera and frames.get("same_size", True) and given is None
    camera_mode = pycolmap.CameraMode.SINGLE if single else pycolmap.CameraMode.PER_IMAGE if given else pycolmap.CameraMode.AUTO
    pycolmap.Database.open(str(db)).close()
    rig = frames.get("projection") == "equirect"
    if rig:  # each frame's faces: one rig frame, their relative rotations fixed (equirect.py)
        equirect.import_rig(db, image_dir, names, frames["face_size"])
    else:
        pycolmap.import_images(db, image_dir, camera_mode=camera_mode, image_names=names, options=reader)  # ids in name order
    pycolmap.extract_features(db, image_dir, image_names=names, camera_mode=camera_mode,
                              reader_options=reader, extraction_options=extraction, device=device)
    if given is not None:
        set_given_cameras(db, image_dir, given)

    seed = ctx.config.sfm.seed
    pycolmap.set_random_seed(seed)
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = seed
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = 1 if cfg.deterministic else threads  # the CPU matcher's threads change the matches
    matcher = cfg.matcher
    if matcher == "auto":
        matcher = "posed" if given else "exhaustive" if frames["kind"] != "video" and len(names) <= EXHAUSTIVE_MAX else "sequential"
    ctx.progress(0.3, f"{matcher} matching")
    n_loop = 0
    if matcher == "posed":  # the given poses say which frames can see the same things: match only those
        pair_file = out / "posed_pairs.txt"
        pair_file.write_text("".join(f"{a} {b}\n" for a, b in posed_pairs(given, 2 * cfg.overlap)))
        imported = pycolmap.ImportedPairingOptions()
        imported.match_list_path = str(pair_file)
        pycolmap.match_image_pairs(db, pairing_options=imported, matching_options=matching,
                                   verification_options=verification, device=device)
    elif matcher == "exhaustive":
        pycolmap.match_exhaustive(db, matching_options=matching, verification_options=verification, device=device)
    else:
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = cfg.overlap
        pairing.quadratic_overlap = True
        pairing.expand_rig_images = rig  # a frame's neighbours are matched with every face of it
        pycolmap.match_sequential(db, pairing_options=pairing, matching_options=matching,
                                  verification_options=verification, device=device)
        if cfg.loop_detection:
            pairs = loop_pairs(image_dir, names, cfg.overlap)
            n_loop = len(pairs)
            if pairs:
                pair_file = out / "loop_pairs.txt"
                pair_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
                imported = pycolmap.ImportedPairingOptions()
                imported.match_list_path = str(pair_file)
                pycolmap.match_image_pairs(db, pairing_options=imported, matching_options=matching,
                                           verification_options=verification, device=device)

    supported = connected(db)
    total = len(names)
    if given is not None:
        ctx.progress(0.6, f"triangulating with the given poses ({cfg.poses})")
        model = posed_model(db, image_dir, out / "raw", given, cfg.poses, seed)
        return finish(ctx, model, image_dir, masks, out, db, names, supported, device, threads, matcher, n_loop, seed,
                      {"mapper": f"given poses ({found[0]}, {cfg.poses})", "tries": [], "models_found": 1, "stray": [],
                       "registered": model.num_reg_images()})
    other = "incremental" if cfg.mapper == "global" else "global"
    plan = [(cfg.mapper, seed), (other, seed), (cfg.mapper, (seed + 1) % 2**31)][:MAX_TRIES]
    if rig:  # the incremental mapper keeps a rig's faces together; the global one here does not know rigs
        plan = [("incremental", seed), ("incremental", (seed + 1) % 2**31)]
    tries, best = [], None
    for number, (mapper, try_seed) in enumerate(plan, 1):
        ctx.progress(0.55 + 0.1 * (number - 1), f"{mapper} mapping" + (f" (try {number})" if number > 1 else ""))
        model, found, stray = map_once(db, image_dir, out / "raw" / f"try-{number}", mapper, try_seed,
                                       1 if cfg.deterministic else threads, rig)
        registered = model.num_reg_images() if model is not None else 0
        why = weakness(registered, len(stray), supported) if model is not None else "placed no frame"
        tries.append({"mapper": mapper, "seed": try_seed, "registered_images": registered, "models_found": found,
                      "points3d": model.num_points3D() if model is not None else 0,
                      "stray_cameras_dropped": stray, "weak": why})
        if model is not None and (best is None or (registered, model.num_points3D()) > best[1:]):
            best = (number, registered, model.num_points3D(), model, found, stray)
        if why is None:
            break
    if best is None:
        raise ReconstructionError(
            f"Structure from motion placed none of the {total} frames in 3D with either mapper: the frames do not overlap enough.",
            stage="sfm",
            hint="Move the camera slowly around a textured subject, with each view overlapping the last.",
        )
    kept, registered, _, model, found_models, stray = best
    for number, attempt in enumerate(tries, 1):
        attempt["kept"] = number == kept
    need = max(cfg.min_registered, int(np.ceil(cfg.min_registered_fraction * total)))
    if registered < need:
        raise ReconstructionError(
            f"Only {registered} of {total} frames could be placed in 3D (the matches connect {supported}; "
            f"{len(tries)} mapping tries); at least {need} are needed "
            f"(sfm.min_registered_fraction={cfg.min_registered_fraction}, sfm.min_registered={cfg.min_registered}).",
            stage="sfm",
            hint="The frames may not overlap enough or may be blurred; capture more views with steadier motion.",
        )
    return finish(ctx, model, image_dir, masks, out, db, names, supported, device, threads, matcher, n_loop, seed,
                  {"mapper": tries[kept - 1]["mapper"], "seed": tries[kept - 1]["seed"], "tries": tries,
                   "models_found": found_models, "stray": stray, "registered": registered})


def finish(ctx: StageContext, model, image_dir: Path, masks: Path | None, out: Path, db: Path, names: list[str],
           supported: int, device, threads: int, matcher: str, n_loop: int, seed: int, mapping: dict[str, Any]) -> dict[str, Any]:
    """Write the model, undistort the frames (and their masks) for training, and say how it went (sfm.json)."""
    import pycolmap

    registered, total = mapping["registered"], len(names)
    sparse = out / "sparse"
    sparse.mkdir()
    model.write(sparse)
    shutil.rmtree(out / "raw", ignore_errors=True)

    ctx.progress(0.85, "undistorting")
    undistorted = out / "undistorted"
    pycolmap.undistort_images(undistorted, sparse, image_dir, output_type="COLMAP")
    # pycolmap leaves stereo helper files we do not use
    for extra in ("stereo", "run-colmap-geometric.sh", "run-colmap-photometric.sh"):
        target = undistorted / extra
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    if masks is not None:
        undistort_masks(masks, sparse, undistorted / "masks")
    db.unlink()  # large and only needed to match; the model holds what later stages read

    cams = [
        {"id": cid, "model": cam.model.name, "width": cam.width, "height": cam.height,
         "params": [round(float(p), 4) for p in cam.params]}
        for cid, cam in model.cameras.items()
    ]
    stats = {
        "matcher": matcher,
        "mapper": mapping["mapper"],
        "seed": mapping.get("seed", seed),
        "device": str(device).split(".")[-1],
        "threads": threads,
        "total_images": total,
        "connected_images": supported,
        "registered_images": registered,
        "registered_fraction": round(registered / total, 3),
        "models_found": mapping["models_found"],
        "points3d": model.num_points3D(),
        "mean_reprojection_error_px": round(float(model.compute_mean_reprojection_error()), 4),
        "mean_track_length": round(float(model.compute_mean_track_length()), 3),
        "loop_pairs": n_loop,
        "stray_cameras_dropped": mapping["stray"],
        "tries": mapping["tries"],
        "cameras": cams,
        "unregistered": sorted(set(names) - {img.name for img in model.images.values() if img.has_pose}),
    }
    (out / "sfm.json").write_text(json.dumps(stats, indent=2))
    ctx.progress(1.0, f"{registered}/{total} registered")
    return stats
