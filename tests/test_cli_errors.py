"""Bad input ends in one clear sentence and a documented exit code, never a traceback."""

import json
import re
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from PIL import Image

from conftest import codsplat


def one_frame_video(path):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def noise_images(folder):
    folder.mkdir()
    for i in range(8):  # unrelated random views: nothing to match between them
        rng = np.random.default_rng(100 + i)
        small = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(folder / f"{i}.jpg")


CASES = {  # source (None: the sample capture), settings, exit code, the error sentence (a regular expression)
    "missing file": (lambda t: t / "nope.mp4", None, 2, r"nope\.mp4 does not exist"),
    "a name rich would read as markup": (lambda t: t / "scan[bold]1[/bold].mp4", None, 2,
                                         r"scan\[bold\]1\[/bold\]\.mp4 does not exist"),  # shown as written, not eaten
    "unreadable video": (lambda t: (t / "bad.mp4").write_bytes(b"\x00\x01junk" * 200) and t / "bad.mp4", None, 2,
                         r"bad\.mp4 is not a readable video"),
    "1-frame video": (lambda t: one_frame_video(t / "one.mp4") or t / "one.mp4", None, 2, r"has only 1 frame"),
    "images with no overlap": (lambda t: noise_images(t / "noise") or t / "noise", None, 3,
                               r"(placed none of the 8 frames in 3D|Only \d of 8 frames could be placed in 3D)"),
    "unknown config key": (lambda t: None, {"train": {"stepz": 500}}, 2, r"train\.stepz: unknown key; did you mean 'steps'\?"),
    "cuda on a CPU machine": (lambda t: None, {"train": {"device": "cuda"}}, 5,
                              r"train\.device is 'cuda' but this machine has no usable CUDA GPU"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tmp_path, sample_video):
    make, settings, code, message = CASES[case]
    if case == "cuda on a CPU machine":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
    source = make(tmp_path) or sample_video
    args = ["run", source, "--preset", "tiny", "--out", tmp_path / "out"]
    if settings:
        (tmp_path / "job.json").write_text(json.dumps(settings))
        args += ["--config", tmp_path / "job.json"]
    proc = codsplat(*args)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr  # one sentence (a hint may follow)

    proc = codsplat(*args, "--json")  # the same failure, machine-readable
    assert proc.returncode == code
    body = json.loads(proc.stdout)
    assert body["ok"] is False and body["exit_code"] == code and re.search(message, body["message"])


def test_settings_that_cannot_run_here_fail_before_any_work(tmp_path, sample_video):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    (tmp_path / "job.json").write_text(json.dumps({"train": {"device": "cuda"}}))
    proc = codsplat("run", sample_video, "--preset", "tiny", "--config", tmp_path / "job.json", "--out", tmp_path / "out")
    assert proc.returncode == 5
    assert not (tmp_path / "out" / "frames").exists()  # told at once, not after frames and SfM


def test_ctrl_c_exits_130_and_the_next_run_resumes(tmp_path, sample_video, quick_config):
    """Ctrl-C (SIGINT) during training: exit 130 with one word and no traceback; the same command
    again skips the stages that finished."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "codsplat.pipeline.cli", "run", str(sample_video), "--preset", "tiny",
            "--config", str(quick_config), "--out", str(out)]
    # SIGINT at its default in the child: a shell that starts pytest in the background ignores it, and
    # the child would inherit that and never be interrupted
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((out / "progress.json").read_text())["stage"] == "train":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr + stdout
    assert not (out / "train" / "manifest.json").exists()

    again = codsplat("run", sample_video, "--preset", "tiny", "--config", quick_config, "--out", out, "--json")
    assert again.returncode == 0, again.stderr
    skipped = {name: s["skipped"] for name, s in json.loads(again.stdout)["stages"].items()}
    assert skipped == {"frames": True, "sfm": True, "train": False, "export": False}


def test_no_overlap_names_the_sfm_stage_and_nothing_is_exported(tmp_path):
    noise_images(tmp_path / "noise")
    proc = codsplat("run", tmp_path / "noise", "--preset", "tiny", "--out", tmp_path / "out", "--json")
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["stage"] == "sfm"
    assert not (tmp_path / "out" / "export").exists()


def test_quality_gate_blocks_a_bad_splat(tmp_path, sample_video):
    (tmp_path / "strict.json").write_text(json.dumps({"train": {"steps": 100}, "export": {"min_psnr": 60}}))
    proc = codsplat("run", sample_video, "--preset", "tiny", "--config", tmp_path / "strict.json", "--out", tmp_path / "out")
    assert proc.returncode == 4
    assert "below export.min_psnr (60.0 dB), so it was not exported" in proc.stderr
    assert not list((tmp_path / "out" / "export").glob("splat.*"))


def test_exit_codes_are_documented():
    proc = codsplat("exit-codes")
    assert proc.returncode == 0
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.split()}
    assert {"0", "2", "3", "4", "5", "6", "130"} <= listed  # as the README documents them
    assert "Exit codes:" in codsplat("run", "--help").stdout


def test_a_gpu_whose_kernels_cannot_load_is_exit_5_not_a_crash_at_the_first_step(monkeypatch):
    """A PyPI gsplat on a GPU machine without nvcc: its backend imports with `_C = None`, and the first
    rasterization would crash (or, with `device: auto`, a broken GPU would go unnoticed). Here, a machine
    that reports CUDA but has no kernels (this one's gsplat has none) gets the reason and the ways out."""
    import torch

    from codsplat.pipeline.config import TrainConfig
    from codsplat.pipeline.errors import EnvironmentProblem
    from codsplat.pipeline.train import choose_device, cuda_kernels_problem

    if cuda_kernels_problem() is None:
        pytest.skip("gsplat's CUDA kernels load on this machine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("auto", "cuda"):
        with pytest.raises(EnvironmentProblem, match=r"has a CUDA GPU, but gsplat's CUDA kernels are not built") as raised:
            choose_device(TrainConfig(device=device))
        assert raised.value.exit_code == 5 and "set train.device to 'cpu'" in raised.value.hint
    assert choose_device(TrainConfig(device="cpu")).type == "cpu"  # asked for the CPU: no kernels needed
