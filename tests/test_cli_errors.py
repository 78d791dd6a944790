"""Bad input ends in one clear sentence and a documented exit code, never a traceback."""

import json

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


CASES = {
    "missing file": (lambda t: t / "nope.mp4", None, 2, "does not exist"),
    "unreadable video": (lambda t: (t / "bad.mp4").write_bytes(b"\x00\x01junk" * 200) and t / "bad.mp4", None, 2, "not a readable video"),
    "1-frame video": (lambda t: one_frame_video(t / "one.mp4") or t / "one.mp4", None, 2, "has only 1 frame"),
    "images with no overlap": (lambda t: noise_images(t / "noise") or t / "noise", None, 3, "frames"),
    "unknown config key": (lambda t: t / "x.mp4", {"train": {"stepz": 500}}, 2, "train.stepz: unknown key; did you mean 'steps'?"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tmp_path, sample_video):
    make, settings, code, message = CASES[case]
    source = make(tmp_path)
    if case == "unknown config key":
        source = sample_video
    args = ["run", source, "--preset", "tiny", "--out", tmp_path / "out"]
    if settings:
        (tmp_path / "job.json").write_text(json.dumps(settings))
        args += ["--config", tmp_path / "job.json"]
    proc = codsplat(*args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] + proc.stderr  # one sentence (a hint may follow)

    proc = codsplat(*args, "--json")  # the same failure, machine-readable
    assert proc.returncode == code
    body = json.loads(proc.stdout)
    assert body["ok"] is False and body["exit_code"] == code and message in body["message"] + (body["hint"] or "")


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
    for code in ("0", "2", "3", "4", "5", "130"):
        assert any(line.split()[0] == code for line in proc.stdout.splitlines())
    assert "Exit codes:" in codsplat("run", "--help").stdout
