"""What the hostile corpus cannot say in YAML: documents too big, too deep or not text, links, odd
file names, and hostile media (archives that unpack to far more than they hold, images that claim
billions of pixels, videos cut short). Each `make` names a function here; documents get the case
and the embedded folder, media a folder to put the capture in and return its path."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image

BASE = {"version": 1, "input": "uploads/clip.mp4"}


# ------------------------------------------------------------------ documents


def document(home: Path, case: dict) -> Path:
    """Write the case's document; returns its path."""
    path = home / case.get("file", f"jobs/{case['name']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if "make" in case:
        DOCUMENTS[case["make"]](home, path, case)
    elif "text" in case:
        path.write_text(case["text"], encoding="utf-8")
    else:
        path.write_text(json.dumps(case["json"] if case.get("raw") else {**BASE, **case["json"]}))
    return path


def _bom(home, path, case):
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(BASE).encode())


def _latin1(home, path, case):
    path.write_bytes(json.dumps({**BASE, "notify": {"email": ["x@example.com"]}}).replace("x@", "\u00e9@").encode("latin-1"))


def _deep(home, path, case):
    path.write_text("[" * 30000 + "]" * 30000)


def _deep_section(home, path, case):
    path.write_text(json.dumps({**BASE, "train": {"x": "HOLE"}}).replace('"HOLE"', "[" * 38 + "]" * 38))


def _big(home, path, case):
    path.write_bytes(b" " * (2**20 - len(json.dumps(BASE))) + json.dumps(BASE).encode())


def _long_input(home, path, case):
    path.write_text(json.dumps({**BASE, "input": "s3://local/uploads/" + "x" * 50000 + ".mp4"}))


def _media_link(home, path, case):
    (home / "uploads" / "link-out.mp4").symlink_to("/etc/hostname")
    path.write_text(json.dumps({**BASE, **case["json"]}))


def _results_link(home, path, case):
    """The job's own results folder planted as a link out of the embedded folder, before it is read."""
    (home / "results").mkdir(exist_ok=True)
    (home / "results" / case["name"]).symlink_to(home.parent / "outside", target_is_directory=True)
    path.write_text(json.dumps(BASE))


def _latin1_name(home, path, case):
    os.makedirs(home / "jobs", exist_ok=True)
    name = os.path.join(os.fsencode(home / "jobs"), b"caf\xe9.json")
    with open(name, "w") as fh:
        fh.write(json.dumps(BASE))


def _link_out(home, path, case):
    path.symlink_to("/etc/hostname")


def _link_loop(home, path, case):
    path.symlink_to(path.name)


def _folder_loop(home, path, case):
    (home / "jobs" / "loop").symlink_to(home / "jobs")


def _folder_json(home, path, case):
    (home / "jobs" / "folder.json").mkdir()


DOCUMENTS = {"bom": _bom, "latin1": _latin1, "deep": _deep, "deep-section": _deep_section, "big": _big,
             "long-input": _long_input, "media-link": _media_link, "latin1-name": _latin1_name, "link-out": _link_out,
             "link-loop": _link_loop, "folder-loop": _folder_loop, "folder-json": _folder_json,
             "results-link": _results_link}


# ------------------------------------------------------------------ media


def media(folder: Path, make: str, sample_video: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return MEDIA[make](folder, sample_video)


def _photo(size=(64, 48), seed=0) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height, with almost no pixel data: decoding it would
    allocate width × height × 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _zip(folder: Path, entries: dict[str, bytes], name="photos.zip") -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for entry, data in entries.items():
            z.writestr(entry, data)
    return path


def zip_of_zeros(folder: Path, sample_video: Path) -> Path:
    """Three kept photos and one entry that unpacks 100 MB of zeros from 100 kB: read through a
    bounded stream, it is skipped, never held whole."""
    entries = {f"p{i}.jpg": _photo(seed=i) for i in range(3)}
    entries["bomb.jpg"] = b"\0" * (100 * 2**20)
    return _zip(folder, entries)


def zip_of_many_entries(folder: Path, sample_video: Path) -> Path:
    return _zip(folder, {f"e{i}.jpg": b"" for i in range(20_001)})


def zip_whose_end_record_claims_65000_entries(folder: Path, sample_video: Path) -> Path:
    """Three photos, and an end record that counts 65,000 entries: refused from that record, before
    a directory is parsed (parsing it would fail on the missing entries, or take 200 MB for real ones)."""
    path = _zip(folder, {f"p{i}.jpg": _photo(seed=i) for i in range(3)})
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    data[at + 8:at + 12] = struct.pack("<2H", 65_000, 65_000)  # entries on this disk, entries
    path.write_bytes(bytes(data))
    return path


def zip64_of_70000_entries(folder: Path, sample_video: Path) -> Path:
    """Past 65,535 entries a zip counts them in its ZIP64 end record (the 16-bit field says 0xFFFF)."""
    return _zip(folder, {f"e{i}.jpg": b"" for i in range(70_000)})


def zip_that_claims_terabytes(folder: Path, sample_video: Path) -> Path:
    """A small zip whose directory says each entry unpacks to 4 GB: refused from the directory."""
    path = _zip(folder, {f"p{i}.jpg": _photo(seed=i) for i in range(5)})
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:  # central directory records: uncompressed size at offset 24
        data[at + 24:at + 28] = struct.pack("<I", 0xFFFFFFF0)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    return path


def zip_with_traversal_names(folder: Path, sample_video: Path) -> Path:
    return _zip(folder, {"../../escaped.jpg": _photo(seed=1), "/abs/escaped.jpg": _photo(seed=2), "ok.jpg": _photo(seed=3)})


def zip_of_mac_droppings(folder: Path, sample_video: Path) -> Path:
    return _zip(folder, {"__MACOSX/._a.jpg": b"junk", ".hidden.jpg": _photo()})


def zip_with_undecodable_names(folder: Path, sample_video: Path) -> Path:
    path = folder / "names.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(3):
            info = zipfile.ZipInfo(f"caf\u00e9-{i}-\u2603.jpg")
            z.writestr(info, _photo(seed=i))
    return path


def not_a_zip(folder: Path, sample_video: Path) -> Path:
    path = folder / "fake.zip"
    path.write_bytes(random.Random(1).randbytes(4096))
    return path


def truncated_video(folder: Path, sample_video: Path) -> Path:
    data = sample_video.read_bytes()
    path = folder / "cut.mp4"
    path.write_bytes(data[: len(data) // 3])
    return path


def empty_video(folder: Path, sample_video: Path) -> Path:
    path = folder / "empty.mp4"
    path.write_bytes(b"")
    return path


def noise_video(folder: Path, sample_video: Path) -> Path:
    path = folder / "noise.mov"
    path.write_bytes(random.Random(0).randbytes(64 * 1024))
    return path


def raw_h263_named_mov(folder: Path, sample_video: Path) -> Path:
    """What 7 in 3,000 noise files used to be probed as: an elementary stream, no container."""
    return _encode(folder / "raw.mov", "h263", frames=5, container="h263", size=(128, 96))


def ffconcat_named_mp4(folder: Path, sample_video: Path) -> Path:
    """A text list that FFmpeg would follow to read other files beside it."""
    (folder / "other.mp4").write_bytes(sample_video.read_bytes())
    path = folder / "list.mp4"
    path.write_text("ffconcat version 1.0\nfile other.mp4\nfile other.mp4\n")
    return path


def one_frame_video(folder: Path, sample_video: Path) -> Path:
    return _encode(folder / "one.mp4", "mpeg4", frames=1)


def video_of_4096_square_frames(folder: Path, sample_video: Path) -> Path:
    """40 frames of 4096×4096 that compress to about 1 MB: each frame decodes to 48 MiB of RGB, and
    a stage that kept every window's candidate whole held 2.9 GB."""
    return _encode(folder / "huge.mp4", "mpeg4", frames=40, size=(4096, 4096))


def _encode(path: Path, codec: str, frames: int, container: str | None = None, size=(64, 48)) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=1)
        (stream.width, stream.height), stream.pix_fmt = size, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 40 * i % 256, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def tiny_images(folder: Path, sample_video: Path) -> Path:
    for i in range(3):
        Image.new("RGB", (1, 1), (i, i, i)).save(folder / f"dot{i}.png")
    return folder


def gigapixel_claims(folder: Path, sample_video: Path) -> Path:
    """Two 20,000 × 20,000 PNG headers among three real photos: skipped unread, never decoded."""
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(_photo(seed=i))
    for i in range(2):
        (folder / f"huge{i}.png").write_bytes(_png_claiming(20_000, 20_000))
    return folder


def photos_with_a_link_out(folder: Path, sample_video: Path) -> Path:
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(_photo(seed=i))
    (folder / "secret.jpg").symlink_to("/etc/hostname")
    return folder


def photos_with_undecodable_names(folder: Path, sample_video: Path) -> Path:
    for i in range(3):
        with open(os.path.join(os.fsencode(folder), b"caf\xe9-%d.jpg" % i), "wb") as fh:
            fh.write(_photo(seed=i))
    return folder


def no_photos(folder: Path, sample_video: Path) -> Path:
    (folder / "notes.txt").write_text("no photos here")
    return folder


def truncated_photos(folder: Path, sample_video: Path) -> Path:
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(_photo(seed=i)[:200])
    return folder


MEDIA = {f.__name__: f for f in (
    zip_of_zeros, zip_of_many_entries, zip_whose_end_record_claims_65000_entries, zip64_of_70000_entries,
    zip_that_claims_terabytes, zip_with_traversal_names, zip_of_mac_droppings,
    zip_with_undecodable_names, not_a_zip, truncated_video, empty_video, noise_video, raw_h263_named_mov,
    ffconcat_named_mp4, one_frame_video, video_of_4096_square_frames, tiny_images,
    gigapixel_claims, photos_with_a_link_out, photos_with_undecodable_names, no_photos, truncated_photos)}
