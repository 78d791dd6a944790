"""The container entrypoint in both of its modes, run as plain processes against directory layouts
that Bacalhau and SageMaker would mount (no Docker engine runs here)."""

import json
import shutil

from conftest import QUICK, entrypoint
from test_cli_errors import one_frame_video


def test_bacalhau_three_stage_job_publishes_each_stage_once(tmp_path, sample_video):
    media, job = tmp_path / "inputs" / "media", tmp_path / "inputs" / "job"
    media.mkdir(parents=True)
    job.mkdir()
    shutil.copy(sample_video, media / "capture.mp4")
    (job / "job.json").write_text(json.dumps({"preset": "tiny", **QUICK}))
    pre, train, export = (tmp_path / "outputs" / s for s in ("preprocess", "train", "export"))

    proc = entrypoint("bacalhau", "--stage", "preprocess", "--input", media, "--config", job / "job.json", "--out", pre)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in pre.iterdir()) == ["frames", "sfm"]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"ok": True, "stages": ["frames", "sfm"]}

    proc = entrypoint("bacalhau", "--stage", "train", "--upstream", pre, "--config", job / "job.json", "--out", train)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in train.iterdir()) == ["train"]  # nothing re-published

    proc = entrypoint("bacalhau", "--stage", "export", "--upstream", pre, "--upstream", train,
                      "--config", job / "job.json", "--out", export)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in export.iterdir()) == ["export"]
    assert (export / "export" / "splat.ply").stat().st_size > 1000
    assert json.loads((export / "export" / "metrics.json").read_text())["gaussians"] > 0


def test_bacalhau_failure_leaves_error_json(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    one_frame_video(media / "clip.mp4")
    out = tmp_path / "out"
    proc = entrypoint("bacalhau", "--stage", "preprocess", "--input", media, "--out", out)
    assert proc.returncode == 2
    error = json.loads((out / "error.json").read_text())
    assert error["exit_code"] == 2 and "only 1 frame" in error["message"]


def sagemaker_layout(root, video, hyperparameters):
    (root / "input" / "data" / "media").mkdir(parents=True)
    (root / "input" / "config").mkdir(parents=True)
    (root / "model").mkdir()
    (root / "output").mkdir()
    if video is not None:
        shutil.copy(video, root / "input" / "data" / "media" / "capture.mp4")
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    return {"CODSPLAT_SAGEMAKER_ROOT": str(root)}


def test_sagemaker_training_job_writes_model_and_checkpoints(tmp_path, sample_video):
    root = tmp_path / "opt_ml"
    env = sagemaker_layout(root, sample_video, {"preset": "tiny", "settings": json.dumps(QUICK)})
    (root / "checkpoints").mkdir()
    proc = entrypoint("train", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (root / "model" / "export" / "splat.spz").is_file()
    assert (root / "checkpoints" / "sfm" / "manifest.json").is_file()  # synced by SageMaker: a restart resumes
    assert not (root / "output" / "failure").exists()


def test_sagemaker_failure_reason_file(tmp_path):
    root = tmp_path / "opt_ml"
    env = sagemaker_layout(root, None, {"preset": "tiny", "settings": json.dumps({"train": {"steps": 5}})})
    proc = entrypoint("train", env=env)
    assert proc.returncode == 2
    assert "train.steps: must be ≥ 100, got 5" in (root / "output" / "failure").read_text()
