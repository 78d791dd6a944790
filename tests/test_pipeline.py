"""The whole pipeline on the sample capture, as a user runs it: real pycolmap, real training,
real exports read back, resume, and splitting the stages across "machines"."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from plyfile import PlyData

from codsplat.pipeline.run import LOCK
from conftest import codsplat

STAGES = ("frames", "sfm", "train", "export")


def test_sample_run_produces_a_good_splat(tiny_run):
    work, result = tiny_run
    assert set(result["stages"]) == set(STAGES) and not any(s["skipped"] for s in result["stages"].values())
    metrics = json.loads((work / "export" / "metrics.json").read_text())
    sfm, train = metrics["sfm"], metrics["train"]
    assert sfm["registered_images"] >= 37 and sfm["total_images"] == 40
    assert sfm["mean_reprojection_error_px"] < 1.5
    # the project's floor on the sample, well under what benchmarks/run.py pipeline reports (29-30 dB):
    # GLOMAP's threads make SfM vary from run to run, and one run in about ten places two held-out
    # views worse (23.9 dB seen); a broken stage lands far below this
    assert metrics["psnr"] >= 22 and metrics["ssim"] >= 0.7
    assert train["gaussians"] > train["gaussians_initial"], "densification should have added Gaussians"
    assert metrics["gaussians"] == train["gaussians"]
    seconds = [metrics["stages"][stage]["seconds"] for stage in STAGES]
    assert all(s > 0 for s in seconds) and sum(seconds) <= result["wall_seconds"]
    assert metrics["stages"]["train"]["peak_rss_mb"] > 100
    progress = json.loads((work / "progress.json").read_text())  # what the console shows while a job runs
    assert progress["stage"] == "export" and progress["fraction"] == 1.0


def test_held_out_views_are_every_eighth_and_never_trained_on(tiny_run):
    work, result = tiny_run
    metrics = json.loads((work / "export" / "metrics.json").read_text())
    assert [v["view"] for v in metrics["views"]] == [f"frame_{i:05d}.jpg" for i in (0, 8, 16, 24, 32)]
    train = result["stages"]["train"]["stats"]
    assert train["train_views"] + train["test_views"] == metrics["sfm"]["registered_images"]
    assert train["test_views"] == 5
    # the held-out cameras travel with the export, so a viewer can open at a photo's viewpoint
    cameras = json.loads((work / "export" / "cameras.json").read_text())["views"]
    assert [c["name"] for c in cameras] == [v["view"] for v in metrics["views"]]
    pose = np.array(cameras[0]["world_to_camera"])
    assert pose.shape == (4, 4) and np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-4)
    assert cameras[0]["fx"] > 0 and cameras[0]["width"] == metrics["train"]["resolution"][0]


def test_exports_open_in_third_party_readers(tiny_run, splat_transform):
    work, _ = tiny_run
    n = json.loads((work / "export" / "metrics.json").read_text())["gaussians"]
    ply = PlyData.read(str(work / "export" / "splat.ply"))["vertex"]
    assert ply.count == n and np.isfinite(ply["x"]).all()
    assert (work / "export" / "splat.splat").stat().st_size == 32 * n
    for fmt in ("ply", "splat", "spz"):
        proc = subprocess.run([splat_transform, "-q", "-w", work / "export" / f"splat.{fmt}", work / f"{fmt}.csv"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert sum(1 for _ in open(work / f"{fmt}.csv")) == n + 1


def test_previews_and_report(tiny_run):
    work, _ = tiny_run
    metrics = json.loads((work / "export" / "metrics.json").read_text())
    report = (work / "export" / "report.html").read_text()
    assert len(metrics["previews"]) == 5
    for preview in metrics["previews"]:
        assert (work / "export" / preview).is_file() and f'src="{preview}"' in report
    assert "Held-out PSNR" in report and f"{metrics['psnr']:.2f} dB" in report


def test_rerun_skips_unchanged_stages_and_reruns_what_changed(tiny_copy, tmp_path):
    work = tiny_copy
    from conftest import SAMPLE

    proc = codsplat("run", SAMPLE, "--preset", "tiny", "--out", work, "--json")
    assert proc.returncode == 0, proc.stderr
    assert all(s["skipped"] for s in json.loads(proc.stdout)["stages"].values())

    cfg = tmp_path / "only_ply.json"
    cfg.write_text(json.dumps({"export": {"formats": ["ply"]}}))
    proc = codsplat("run", SAMPLE, "--preset", "tiny", "--config", cfg, "--out", work, "--json")
    assert proc.returncode == 0, proc.stderr
    skipped = {name: s["skipped"] for name, s in json.loads(proc.stdout)["stages"].items()}
    assert skipped == {"frames": True, "sfm": True, "train": True, "export": False}
    assert not (work / "export" / "splat.spz").exists()

    # --force runs the stages asked for again, unchanged or not
    proc = codsplat("run", SAMPLE, "--preset", "tiny", "--config", cfg, "--out", work, "--stage", "preprocess", "--json", "--force")
    assert proc.returncode == 0, proc.stderr
    assert {name: s["skipped"] for name, s in json.loads(proc.stdout)["stages"].items()} == {"frames": False, "sfm": False}
    assert [json.loads(line)["stage"] for line in open(work / "runs.jsonl")][-3:] == ["export", "frames", "sfm"]


def test_stages_split_across_machines(sample_video, quick_config, tmp_path):
    """frames+SfM on one machine, training on another, export on a third: only the folders travel."""
    cpu_node, gpu_node, export_node = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    proc = codsplat("run", sample_video, "--preset", "tiny", "--config", quick_config, "--out", cpu_node, "--stage", "preprocess")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in cpu_node.iterdir() if p.is_dir()) == ["frames", "sfm"]
    assert [json.loads(line)["stage"] for line in open(cpu_node / "runs.jsonl")] == ["frames", "sfm"]

    shutil.copytree(cpu_node, gpu_node)
    proc = codsplat("run", "--preset", "tiny", "--config", quick_config, "--out", gpu_node, "--stage", "train", "--json")
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["stages"]) == ["train"]

    shutil.copytree(gpu_node, export_node)
    shutil.rmtree(export_node / "frames" / "images")  # export needs the manifests, not the frames
    proc = codsplat("run", "--preset", "tiny", "--config", quick_config, "--out", export_node, "--stage", "export")
    assert proc.returncode == 0, proc.stderr
    # the exported splat is the one trained on the other machine, read back
    from codsplat.pipeline import splats

    trained, _ = splats.load(gpu_node / "train" / "splats.pt")
    vertex = PlyData.read(str(export_node / "export" / "splat.ply"))["vertex"]
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
    assert len(xyz) > 0 and np.allclose(xyz, trained["means"][splats.finite_mask(trained)].numpy(), atol=1e-6)


def test_a_stage_out_of_order_says_what_to_run_first(tmp_path):
    proc = codsplat("run", "--out", tmp_path / "empty", "--stage", "train")
    assert proc.returncode == 2
    assert "The sfm stage has not run" in proc.stderr and "--stage preprocess" in proc.stderr


def test_a_stage_whose_outputs_went_missing_runs_again_and_one_that_is_whole_is_skipped(tmp_path):
    """A stage is skipped only when its manifest's fingerprint matches and every output it lists is
    there: a half-copied or half-deleted stage folder is computed again."""
    from codsplat.pipeline.config import build_config
    from codsplat.pipeline.stages import StageContext, run_stage

    media = tmp_path / "clip.mp4"
    media.write_bytes(b"frames")
    runs = []

    def frames(ctx):
        runs.append(1)
        for name in ("a.png", "b.png"):
            (ctx.dir("frames") / name).write_text(name)
        return {}

    ctx = StageContext(tmp_path / "work", build_config({}, "tiny"), input=media)
    assert not run_stage("frames", frames, ctx).skipped
    assert run_stage("frames", frames, ctx).skipped and len(runs) == 1
    (ctx.dir("frames") / "b.png").unlink()
    assert not run_stage("frames", frames, ctx).skipped and len(runs) == 2
    assert (ctx.dir("frames") / "b.png").is_file()


def test_a_second_run_in_the_same_folder_waits_for_the_first(tmp_path, sample_video):
    """The lock a run holds on its folder (the kernel lets it go when the holder ends, however it ends):
    a second run says whom it waits for, writes nothing meanwhile, and runs once the first lets go."""
    work = tmp_path / "out"
    work.mkdir()
    holder = os.open(work / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"4242\n")
    second = subprocess.Popen([sys.executable, "-m", "codsplat.pipeline.cli", "run", str(sample_video), "--stage", "frames",
                               "--out", str(work)], stderr=subprocess.PIPE, text=True)
    try:
        assert second.stderr.readline().strip() == f"waiting for the run that holds {work} (pid 4242) to end"
        time.sleep(1)  # what it would have written by now, had it not waited
        assert second.poll() is None and not (work / "frames").exists()
    finally:
        os.close(holder)
    assert second.wait(timeout=300) == 0, second.stderr.read()
    assert (work / "frames" / "manifest.json").is_file()


def test_a_link_planted_as_the_folder_lock_is_refused_and_never_followed(tmp_path, sample_video):
    work, victim = tmp_path / "out", tmp_path / "victim"
    work.mkdir()
    victim.write_text("untouched")
    (work / LOCK).symlink_to(victim)
    proc = codsplat("run", sample_video, "--stage", "frames", "--out", work)
    assert proc.returncode == 2 and f"{work / LOCK} cannot be opened to lock the folder" in " ".join(proc.stderr.split())
    assert victim.read_text() == "untouched" and not (work / "frames").exists()
