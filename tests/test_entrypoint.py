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


def test_bacalhau_failure_leaves_error_json_where_bacalhau_publishes_it(tmp_path):
    """Only the job spec's result paths leave the container, so the error file must be inside one."""
    from pathlib import PurePosixPath

    from codsplat.orchestrator.translate import template

    media = tmp_path / "media"
    media.mkdir()
    one_frame_video(media / "clip.mp4")
    out = tmp_path / "out"
    proc = entrypoint("bacalhau", "--stage", "preprocess", "--input", media, "--out", out)
    assert proc.returncode == 2
    [found] = list(out.rglob("error.json"))
    published = [PurePosixPath(r["Path"]).relative_to("/outputs") for r in template("preprocess")["Tasks"][0]["ResultPaths"]]
    assert any(PurePosixPath(found.relative_to(out).as_posix()).is_relative_to(p) for p in published), found
    error = json.loads(found.read_text())
    assert error["exit_code"] == 2 and "only 1 frame" in error["message"]
    assert json.loads(proc.stdout) == {**error, "ok": False}


def test_the_outcome_line_is_all_of_stdout_whatever_the_run_prints(tmp_path):
    """Bacalhau keeps the first 2 KiB of stdout: a library that prints (Python, or C through fd 1)
    must not push the outcome out of it."""
    import subprocess
    import sys

    media = tmp_path / "media.mp4"
    media.write_bytes(b"\0")
    script = f"""
import os
from codsplat.pipeline import entrypoint as ep
def noisy(*args, **kwargs):
    print("x" * 5000)
    os.write(1, b"y" * 5000 + b"\\n")
    raise ep.InputError("the capture is empty")
ep.run_pipeline = noisy
ep.main(["bacalhau", "--input", {str(media)!r}, "--settings", "{{}}", "--out", {str(tmp_path / "out")!r}])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["message"] == "the capture is empty"  # the whole of stdout: one line
    assert "x" * 5000 in proc.stderr and "y" * 5000 in proc.stderr


def test_an_outcome_line_is_whole_json_within_2_kib_however_long_its_parts():
    from codsplat.pipeline.contract import outcome_line

    long = outcome_line({"ok": False, "exit_code": 3, "stage": "sfm", "message": "é∂" * 3000})
    short = outcome_line({"ok": True, "psnr": 27.1, "files": [f"previews/view_{i:04d}.png" for i in range(500)]})
    for line in (long, short):
        assert len(line.encode()) <= 2000 and json.loads(line)
    assert json.loads(long)["exit_code"] == 3 and json.loads(long)["message"].startswith("é∂")
    assert json.loads(short)["psnr"] == 27.1


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
    # what the fallback records: the outcome line, read back into the same result a Bacalhau run gets
    from codsplat.orchestrator.records import success_result
    from codsplat.orchestrator.settings import Settings
    from codsplat.pipeline.contract import parse_outcome

    metrics = json.loads((root / "checkpoints" / "export" / "metrics.json").read_text())
    summary = parse_outcome((root / "checkpoints" / "outcome.json").read_text())
    result = success_result(summary, "results/x/export/", "2026-01-01T00:00:00+00:00", "2026-01-01T00:10:00+00:00", 1, Settings())
    assert summary["ok"] and result["metrics"] == {k: metrics[k] for k in ("psnr", "ssim", "gaussians")}
    for key in result["outputs"]:  # every output the record will link exists in the export the job synced
        assert (root / "checkpoints" / "export" / key.removeprefix("results/x/export/")).is_file(), key
    assert (root / "model" / "export" / "splat.spz").read_bytes() == (root / "checkpoints" / "export" / "splat.spz").read_bytes()
    assert (root / "model" / "outcome.json").read_text() == (root / "checkpoints" / "outcome.json").read_text()  # in model.tar.gz too


def test_sagemaker_failure_reason_file(tmp_path):
    root = tmp_path / "opt_ml"
    env = sagemaker_layout(root, None, {"preset": "tiny", "settings": json.dumps({"train": {"steps": 5}})})
    proc = entrypoint("train", env=env)
    assert proc.returncode == 2
    from codsplat.pipeline.contract import ADVICE, parse_failure

    message, advice, code = parse_failure("AlgorithmError: " + (root / "output" / "failure").read_text())
    assert "train.steps: must be ≥ 100, got 5" in message and (advice, code) == (ADVICE["input"], 2)


def test_the_worker_hands_its_output_folders_to_the_image_user_and_drops_root(monkeypatch):
    """As the image starts (root, CODSPLAT_RUN_AS set), in a forked child: the platform's root-owned
    result folder and a checkpoint synced in as root become the user's, a planted link is not
    followed, and afterwards the process holds no root: not its uid, gid or groups, and a root-owned
    file cannot be written. Not root (a developer's machine): nothing changes."""
    import os
    import pwd
    import tempfile
    from pathlib import Path

    from codsplat.pipeline.privileges import RUN_AS_ENV, drop_privileges

    user = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="codsplat-drop-"))  # pytest's own is 0700: the user could not reach it
    monkeypatch.chdir(tmp_path)
    out, checkpoints, outside = tmp_path / "outputs", tmp_path / "checkpoints", tmp_path / "outside"
    media = tmp_path / "s3-input-123"  # as Bacalhau downloads an input: a 0700 root folder, 0644 files in 0755 folders
    for folder in (out, checkpoints / "sfm", outside, media / "sub"):
        folder.mkdir(parents=True)
    (media / "sub" / "clip.mp4").write_text("frames")
    (media / "link").symlink_to(outside / "secret")
    os.chmod(media, 0o700)
    (checkpoints / "sfm" / "manifest.json").write_text("{}")
    (outside / "secret").write_text("root's")
    os.chmod(outside / "secret", 0o600)
    (checkpoints / "link").symlink_to(outside / "secret")
    monkeypatch.setenv(RUN_AS_ENV, "nobody")
    if os.geteuid() != 0:
        drop_privileges([out])
        assert os.getuid() != user.pw_uid and out.stat().st_uid == os.getuid()
        return
    os.chmod(tmp_path, 0o755)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports what it saw through the pipe
        try:
            os.setgroups([0, 4])  # a container's root holds groups besides its own
            drop_privileges([out, checkpoints, tmp_path / "absent"], readable=[media])
            assert (media / "sub" / "clip.mp4").read_text() == "frames"
            (out / "result").write_text("ok")
            try:
                (outside / "secret").write_text("changed")
                seen = "wrote a root-owned file"
            except PermissionError:
                seen = repr((os.getuid(), os.getgid(), os.getgroups()))
        except BaseException as exc:  # noqa: BLE001
            seen = repr(exc)
        finally:
            os.write(write, seen.encode())
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 4096).decode() == repr((user.pw_uid, user.pw_gid, []))
    assert (out / "result").stat().st_uid == user.pw_uid and out.stat().st_uid == user.pw_uid
    assert (checkpoints / "sfm" / "manifest.json").stat().st_uid == user.pw_uid
    assert (checkpoints / "link").lstat().st_uid == user.pw_uid and (outside / "secret").stat().st_uid == 0
    assert (outside / "secret").read_text() == "root's"
    assert (outside / "secret").stat().st_mode & 0o777 == 0o600 and media.stat().st_uid == 0  # read, not taken; links not followed
    shutil.rmtree(tmp_path)


def test_both_modes_drop_root_before_reading_anything(tmp_path, monkeypatch):
    """The entrypoint names the folders it writes, and does so first: a failure to drop ends the run."""
    from codsplat.pipeline import entrypoint as ep
    from codsplat.pipeline.errors import CannotRun

    asked = []

    def refuse(folders, readable=()):
        asked.append((list(folders), list(readable)))
        raise CannotRun("no such user")

    monkeypatch.setattr(ep, "drop_privileges", refuse)
    out = tmp_path / "outputs"
    out.mkdir()
    args = type("Args", (), {"out": str(out), "stage": "all", "settings": None, "config": None, "preset": None,
                             "input": str(tmp_path / "nothing-here"), "upstream": []})()
    assert ep.bacalhau(args) == 6 and json.loads((out / "frames" / "error.json").read_text())["message"] == "no such user"
    root = tmp_path / "opt_ml"
    assert ep.sagemaker(root) == 6 and (root / "output" / "failure").read_text().startswith("no such user What to try")
    assert asked == [([out], [tmp_path / "nothing-here"]),
                     ([root / "model", root / "output", root / "checkpoints"], [root / "input"])]
