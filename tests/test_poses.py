"""Your own poses (`sfm.poses`): a COLMAP model or a transforms.json beside the photos, used as given or
refined, checked against the photos; made here from the sample run's own model (its frames as a photo
folder), so the answer is known."""

import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from codsplat.pipeline import poses
from codsplat.pipeline.errors import InputError
from conftest import codsplat

GIVEN = {"sfm": {"poses": "use"}}


def posed_folder(tiny_run, folder, as_transforms=False):
    """The sample run's frames as a nerfstudio-style data folder (images/ and the poses beside them):
    its COLMAP model in sparse/0/, or the same cameras as a transforms.json (OpenGL camera-to-world)."""
    import pycolmap

    run = tiny_run[0]
    shutil.copytree(run / "frames" / "images", folder / "images")
    model = pycolmap.Reconstruction(str(run / "sfm" / "sparse"))
    if not as_transforms:
        (folder / "sparse" / "0").mkdir(parents=True)
        model.write(folder / "sparse" / "0")
        return folder, model
    frames = []
    for image in model.images.values():
        camera = model.cameras[image.camera_id]
        w2c = np.vstack([image.cam_from_world().matrix(), [0, 0, 0, 1]])
        f, cx, cy, k = camera.params  # SIMPLE_RADIAL
        frames.append({"file_path": f"images/{image.name}", "transform_matrix": (np.linalg.inv(w2c) @ poses.GL_TO_CV).tolist(),
                       "fl_x": f, "fl_y": f, "cx": cx, "cy": cy, "w": camera.width, "h": camera.height, "k1": k})
    (folder / "transforms.json").write_text(json.dumps({"camera_model": "OPENCV", "frames": frames}))
    return folder, model


def preprocess(source, out, tmp_path, settings):
    config = tmp_path / "poses.json"
    config.write_text(json.dumps(settings))
    return codsplat("run", source, "--preset", "tiny", "--config", config, "--out", out, "--stage", "preprocess", "--json")


def poses_by_source(out):
    import pycolmap

    frames = {f["file"]: f["source"].rsplit("/", 1)[-1] for f in json.loads((out / "frames" / "frames.json").read_text())["frames"]}
    model = pycolmap.Reconstruction(str(out / "sfm" / "sparse"))
    return {frames[i.name]: np.asarray(i.cam_from_world().matrix()) for i in model.images.values()}


@pytest.mark.parametrize("as_transforms", [False, True])
def test_given_poses_are_used_as_they_are_and_the_points_are_triangulated(tiny_run, tmp_path, as_transforms):
    folder, model = posed_folder(tiny_run, tmp_path / "capture", as_transforms)
    source = folder
    if as_transforms:  # and in a .zip with one top folder, as a phone app shares it
        source = tmp_path / "capture.zip"
        with zipfile.ZipFile(source, "w") as archive:
            for path in folder.rglob("*"):
                archive.write(path, f"capture/{path.relative_to(folder)}")
    out = tmp_path / "run"
    proc = preprocess(source, out, tmp_path, GIVEN)
    assert proc.returncode == 0, proc.stderr
    sfm = json.loads((out / "sfm" / "sfm.json").read_text())
    assert sfm["mapper"].startswith("given poses") and sfm["matcher"] == "posed"
    assert sfm["registered_images"] == model.num_reg_images() and sfm["points3d"] > 1000
    assert sfm["mean_reprojection_error_px"] < 1.5
    given = {i.name: np.asarray(i.cam_from_world().matrix()) for i in model.images.values()}
    found = poses_by_source(out)
    assert found.keys() == given.keys()
    assert max(np.abs(found[n] - given[n]).max() for n in given) < 1e-6  # exactly the poses given


def test_refine_moves_noisy_poses_back_towards_the_true_ones(tiny_run, tmp_path):
    """Poses a little off (a phone's AR tracking drifts): `refine` bundle-adjusts them from the photos."""
    import pycolmap

    folder, model = posed_folder(tiny_run, tmp_path / "capture")
    truth = {i.name: np.asarray(i.cam_from_world().matrix()) for i in model.images.values()}
    rng = np.random.default_rng(0)
    for image in model.images.values():
        pose = image.cam_from_world()
        pose.translation = pose.translation + rng.normal(0, 0.02, 3)
        model.frames[image.frame_id].rig_from_world = pose
    model.write(folder / "sparse" / "0")
    out = tmp_path / "run"
    proc = preprocess(folder, out, tmp_path, {"sfm": {"poses": "refine"}})
    assert proc.returncode == 0, proc.stderr
    found = poses_by_source(out)

    def centre_error(poses_):  # camera centres against the truth, after the best similarity (the scene's frame is free)
        a = np.array([-p[:, :3].T @ p[:, 3] for n, p in sorted(poses_.items())])
        b = np.array([-p[:, :3].T @ p[:, 3] for n, p in sorted(truth.items())])
        a, b = a - a.mean(0), b - b.mean(0)
        return float(np.sqrt(((a * (np.linalg.norm(b) / np.linalg.norm(a)) - b) ** 2).sum(1).mean()))

    noisy = {i.name: np.asarray(i.cam_from_world().matrix()) for i in pycolmap.Reconstruction(str(folder / "sparse" / "0")).images.values()}
    assert centre_error(found) < 0.5 * centre_error(noisy), (centre_error(found), centre_error(noisy))


def test_poses_for_photos_without_matches_start_training_from_random_points(tmp_path):
    """Noise photos share no feature: with their poses given, SfM has nothing to triangulate, and the
    Gaussians start from random points within the cameras' bounds instead of failing."""
    folder = tmp_path / "noise"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    frames = []
    for k in range(6):
        name = f"n{k}.png"
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(folder / "images" / name)
        angle = 2 * np.pi * k / 6
        c2w = np.eye(4)
        c2w[:3, 3] = [3 * np.sin(angle), 0, 3 * np.cos(angle)]  # on a circle, looking at the origin (OpenGL: -z forward)
        c2w[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
        frames.append({"file_path": f"images/{name}", "transform_matrix": c2w.tolist()})
    (folder / "transforms.json").write_text(json.dumps({"camera_model": "PINHOLE", "fl_x": 100, "fl_y": 100, "cx": 64,
                                                        "cy": 48, "w": 128, "h": 96, "frames": frames}))
    out = tmp_path / "run"
    proc = preprocess(folder, out, tmp_path, {**GIVEN, "frames": {"min_difference": 0}})
    assert proc.returncode == 0, proc.stderr
    sfm = json.loads((out / "sfm" / "sfm.json").read_text())
    assert sfm["registered_images"] == 6 and sfm["points3d"] >= 5000


def test_use_without_poses_beside_the_photos_names_the_setting(tmp_path, tiny_run):
    shutil.copytree(tiny_run[0] / "frames" / "images", tmp_path / "photos")
    proc = preprocess(tmp_path / "photos", tmp_path / "run", tmp_path, GIVEN)
    assert proc.returncode == 2 and "sfm.poses" in proc.stderr and "transforms.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def given(name="a.jpg", width=640, height=480, params=(500.0, 500.0, 320.0, 240.0)):
    return poses.Given(name, width, height, "PINHOLE", list(params), np.eye(4)[:3])


@pytest.mark.parametrize("frame, view, words", [
    ({"source": "b.jpg", "size": [640, 480]}, given(), "no pose for 1 of the 1 photos kept (b.jpg)"),
    ({"source": "a.jpg", "size": [320, 240], "original_size": [800, 600]}, given(), "a.jpg is 800×600 but its pose is for 640×480"),
    ({"source": "a.jpg", "size": [640, 480]}, given(params=(500, 500, 700, 240)), "principal point (700, 240) must lie inside"),
    ({"source": "a.jpg", "size": [640, 480]}, given(params=(-5, 500, 320, 240)), "focal length must be positive"),
    ({"source": "a.jpg", "size": [480, 640], "original_size": [640, 480], "orientation": 6}, given(), "EXIF orientation 6"),
])
def test_poses_that_do_not_fit_the_photos_are_refused_naming_the_photo(frame, view, words):
    with pytest.raises(InputError, match="sfm.poses") as refused:
        poses.match(("transforms.json", {view.name: view}), [{"file": "frame_00000.jpg", **frame}])
    assert words in refused.value.message


@pytest.mark.parametrize("document, words", [
    ("not json", "transforms.json is not valid JSON"),
    ("[" * 5000 + "]" * 5000, "nests 5000 levels deep"),
    ({"frames": []}, "frames must be a list"),
    ({"camera_model": "OPENCV_FISHEYE", "frames": [{}]}, "camera_model 'OPENCV_FISHEYE'"),
    ({"frames": [{"file_path": "a.jpg", "transform_matrix": [[1, 0], [0, 1]]}]}, "frames[0].transform_matrix must be 4 rows"),
    ({"fl_x": 1, "fl_y": 1, "cx": 1, "cy": 1, "w": 4, "h": 4,
      "frames": [{"file_path": "a.jpg", "transform_matrix": (2 * np.eye(4)).tolist()}]}, "is not a rotation"),
    ({"fl_x": 1, "fl_y": 1, "cx": 1, "w": 4, "h": 4, "frames": [{"file_path": "a.jpg", "transform_matrix": np.eye(4).tolist()}]},
     "frames[0].cy must be a number"),
    ({"fl_x": 1, "fl_y": 1, "cx": 1, "cy": 1, "w": 4, "h": 4, "frames": [
        {"file_path": "x/a.jpg", "transform_matrix": np.eye(4).tolist()},
        {"file_path": "y/a.jpg", "transform_matrix": np.eye(4).tolist()}]}, "two frames name the photo a.jpg"),
])
def test_a_transforms_json_that_cannot_be_read_is_refused_naming_the_field(tmp_path, document, words):
    path = tmp_path / "transforms.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(InputError) as refused:
        poses.read_transforms(path)
    assert words in refused.value.message


def test_a_pose_file_that_is_a_link_is_never_followed(tiny_run, tmp_path):
    """A transforms.json planted as a link to a file outside the input is not read: the poses are missing."""
    folder, _ = posed_folder(tiny_run, tmp_path / "capture", as_transforms=True)
    outside = tmp_path / "elsewhere.json"
    (folder / "transforms.json").rename(outside)
    (folder / "transforms.json").symlink_to(outside)
    proc = preprocess(folder, tmp_path / "run", tmp_path, GIVEN)
    assert proc.returncode == 2 and "no poses came with the photos" in proc.stderr
    assert not (tmp_path / "run" / "frames" / "poses").exists()


def test_pose_files_are_read_within_their_byte_budget(tmp_path, monkeypatch):
    """All pose files together are read through one bounded budget; past it the input is refused, naming it."""
    from codsplat.pipeline import ingest

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "transforms.json").write_bytes(b" " * 5000)
    monkeypatch.setattr(poses, "MAX_POSE_BYTES", 4096)
    with pytest.raises(InputError, match="pose files beside the photos hold over"):
        ingest.copy_pose_files(tmp_path / "in", "images", tmp_path / "poses")
    monkeypatch.setattr(poses, "MAX_POSE_BYTES", 8192)
    assert ingest.copy_pose_files(tmp_path / "in", "images", tmp_path / "poses") == {"files": ["transforms.json"]}
    assert (tmp_path / "poses" / "transforms.json").stat().st_size == 5000
