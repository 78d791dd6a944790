"""Ingest: sharpest frame per window, start/stop, near-duplicates, images, zips, EXIF, bad input."""

import json
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageFilter

from codsplat.pipeline import ingest
from codsplat.pipeline.config import build_config
from codsplat.pipeline.contract import VIDEO_SUFFIXES
from codsplat.pipeline.errors import InputError
from codsplat.pipeline.stages import StageContext


def texture(seed, w=160, h=120):
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))


def write_video(path: Path, frames, fps=10, codec="libx264"):
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"crf": "10"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def run_ingest(tmp_path, source, **frames):
    ctx = StageContext(work=tmp_path / "work", config=build_config({"frames": frames}), input=source)
    ctx.dir("frames").mkdir(parents=True)
    stats = ingest.run(ctx)
    return stats, json.loads((ctx.dir("frames") / "frames.json").read_text())


def test_keeps_the_sharpest_frame_of_each_window(tmp_path):
    base = texture(1)
    frames = []
    for i in range(20):  # windows of 4 frames; the sharp one is the 3rd of each
        img = np.roll(base, 3 * i, axis=1)
        if i % 4 != 2:
            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2.5)))
        frames.append(img)
    video = tmp_path / "v.mp4"
    write_video(video, frames)
    stats, record = run_ingest(tmp_path, video, max=5, min_difference=0.0)
    assert stats["kept"] == 5 and stats["decoded_frames"] == 20
    times = [round(f["time_s"], 1) for f in record["frames"]]
    assert times == [0.2, 0.6, 1.0, 1.4, 1.8]
    assert all("sharpest frame of window" in f["reason"] for f in record["frames"])


def test_start_stop_and_downscale(tmp_path):
    video = tmp_path / "v.mp4"
    write_video(video, [np.roll(texture(2), 4 * i, axis=1) for i in range(30)])
    stats, record = run_ingest(tmp_path, video, max=4, start=1.0, stop=2.0, max_side=80, min_difference=0.0)
    assert len(record["frames"]) == 4 and all(1.0 <= f["time_s"] < 2.0 for f in record["frames"])
    assert record["frames"][0]["size"] == [80, 60]


def test_near_duplicates_are_dropped_with_a_reason(tmp_path):
    a, b = texture(3), texture(4)
    video = tmp_path / "v.mp4"
    write_video(video, [a] * 6 + [b] * 6)
    stats, record = run_ingest(tmp_path, video, max=12)
    assert stats["kept"] == 2
    assert any("near-duplicate" in r["reason"] for r in record["rejected"])


def test_images_folder_applies_exif_orientation(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        img = Image.fromarray(texture(10 + i, 160, 120))
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to view": a portrait phone photo
        img.save(folder / f"IMG_{i}.jpg", exif=exif.tobytes())
    (folder / "notes.txt").write_text("not an image")
    stats, record = run_ingest(tmp_path, folder)
    assert stats["kind"] == "images" and stats["kept"] == 3
    assert record["frames"][0]["size"] == [120, 160]  # upright: portrait


def test_zip_of_images_skips_unreadable_members(tmp_path):
    archive = tmp_path / "shots.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            path = tmp_path / f"{i}.png"
            Image.fromarray(texture(20 + i)).save(path)
            zf.write(path, f"set/{i}.png")
        zf.writestr("set/broken.jpg", b"not a jpeg")
        zf.writestr("__MACOSX/set/._0.png", b"junk")
    stats, record = run_ingest(tmp_path, archive)
    assert stats["kind"] == "zip" and stats["kept"] == 3
    assert [r["source"] for r in record["rejected"]] == ["set/broken.jpg"]


@pytest.mark.parametrize("suffix", VIDEO_SUFFIXES)
def test_every_video_suffix_we_accept_opens(tmp_path, suffix):
    """Videos open only with the demuxers `ingest.DEMUXERS` lets in: each suffix we accept must be one."""
    video = tmp_path / f"clip{suffix}"
    write_video(video, [np.roll(texture(8), 4 * i, axis=1) for i in range(6)],
                codec="libvpx-vp9" if suffix == ".webm" else "libx264")
    stats, _ = run_ingest(tmp_path, video, max=3, min_difference=0.0)
    assert stats["decoded_frames"] == 6


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"\x00garbage" * 100), "is not a readable video"),
    (lambda p: write_video(p, [texture(5)]), "has only 1 frame"),
    (lambda p: write_video(p, [texture(6)] * 8), "gave 1 usable frame"),
])
def test_bad_videos_fail_with_one_clear_sentence(tmp_path, make, message):
    video = tmp_path / "clip.mp4"
    make(video)
    with pytest.raises(InputError, match=message):
        run_ingest(tmp_path, video)


def test_unsupported_and_single_image_inputs(tmp_path):
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(InputError, match="unsupported type '.gif'"):
        ingest.input_kind(tmp_path / "a.gif")
    Image.fromarray(texture(7)).save(tmp_path / "one.jpg")
    with pytest.raises(InputError, match="single image"):
        ingest.input_kind(tmp_path / "one.jpg")
