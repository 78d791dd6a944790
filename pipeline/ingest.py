"""Ingest: a video, a folder of images or a .zip of images → `frames/images/*.jpg` + `frames/frames.json`.

For a video, the time range is cut into `frames.max` equal windows and the sharpest frame of each
(variance of the Laplacian) is kept; then frames that barely differ from the one kept before them
are dropped. Every decision is recorded in frames.json with its reason.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import equirect, poses
from .config import FramesConfig
from .contract import ARCHIVE_SUFFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES
from .errors import InputError
from .stages import StageContext

JPEG_QUALITY = 95
THUMB = 64  # long side of the thumbnails compared for near-duplicates
MAX_ARCHIVE_ENTRIES = 20_000  # a .zip of photos holds hundreds
MAX_DIRECTORY_BYTES = 32 * 2**20  # a directory of 20,000 entries with long names and extras is under 8 MB
MAX_ARCHIVE_BYTES = 16 * 10**9  # what a .zip may unpack to, summed from its directory before anything is read
MAX_PHOTO_BYTES = 64 * 2**20  # one photo (a 100-megapixel JPEG is about 40 MB), read through a bounded stream
MIN_SIDE = 32  # smaller than this, no feature can be matched
MAX_PIXELS = 120 * 10**6  # after JPEG's reduced-scale decoding; beyond it a photo is skipped, not decoded
Image.MAX_IMAGE_PIXELS = None  # our own bound above replaces PIL's warning-then-error at 89/179 MP


def input_kind(path: Path) -> str:
    """'video', 'images' (a folder) or 'zip', or a clear error saying what is accepted."""
    if not path.exists():
        raise InputError(f"Input {path} does not exist.")
    if path.is_dir():
        return "images"
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in ARCHIVE_SUFFIXES:
        return "zip"
    if suffix in IMAGE_SUFFIXES:
        raise InputError(
            f"Input {path} is a single image; a reconstruction needs many views.",
            hint="Pass the folder that holds the photos, a .zip of them, or a video.",
        )
    raise InputError(
        f"Input {path} has an unsupported type '{suffix or '(none)'}'.",
        hint=f"Use a video ({' '.join(VIDEO_SUFFIXES)}), a folder of .jpg/.png images, or a .zip of them.",
    )


def sharpness(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: low for blurred frames."""
    lap = -4 * gray[1:-1, 1:-1] + gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
    return float(lap.var())


def _gray(img: Image.Image, long_side: int) -> np.ndarray:
    scale = min(1.0, long_side / max(img.size))
    small = img.convert("L").resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(small, np.float32)


def fit(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale (never upscale) so the long side fits max_side."""
    if max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)


@dataclass
class Candidate:
    """A frame kept so far, held as the JPEG it will be written as (at `frames.max_side`), with the
    thumbnail near-duplicates are judged on: a thousand kept frames cost megabytes, not gigabytes."""

    jpeg: bytes
    size: tuple[int, int]
    thumb: np.ndarray
    source: str
    time: float | None
    sharpness: float
    reason: str
    original: dict[str, Any] | None = None  # a photo's size as stored and its EXIF orientation (poses are of that)

    @classmethod
    def of(cls, img: Image.Image, max_side: int, source: str, time: float | None, sharpness: float, reason: str,
           original: dict[str, Any] | None = None) -> "Candidate":
        img = fit(img, max_side)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=JPEG_QUALITY)
        return cls(out.getvalue(), img.size, _gray(img, THUMB), source, time, sharpness, reason, original)


# ---------------------------------------------------------------- video


# FFmpeg guesses a format from a file's bytes, among hundreds of demuxers. Only the containers of
# VIDEO_SUFFIXES are let in: random bytes then cannot pass for a raw H.263 stream or LRC lyrics (17
# in 3,000 did), and a text file named .mp4 cannot be an ffconcat list that reads other files.
DEMUXERS = {"format_whitelist": "mov,matroska,avi", "protocol_whitelist": "file"}


def _open_video(path: Path):
    import av

    try:
        container = av.open(str(path), options=DEMUXERS)
    except (av.error.InvalidDataError, av.error.FFmpegError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"Input {path} is not a readable video ({reason}).",
                         hint=f"codsplat reads videos in these containers: {' '.join(VIDEO_SUFFIXES)}.") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"Input {path} has no video stream.")
    width, height = container.streams.video[0].codec_context.width, container.streams.video[0].codec_context.height
    if width * height > MAX_PIXELS:  # the photo cap: each decoded frame is held whole while it is scored
        container.close()
        raise InputError(f"Input {path} has {width}×{height} frames, over {MAX_PIXELS // 10**6} megapixels.",
                         hint="Scale the video down (8K is 33 megapixels) before uploading it.")
    return container


def _decode(path: Path, max_side: int | None = None) -> Iterator[tuple[float, Image.Image]]:
    """Each frame's time and picture, scaled by FFmpeg to fit `max_side` (a 4K frame never becomes a
    whole RGB picture in Python)."""
    import av

    container = _open_video(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate or 30)
    width, height = stream.codec_context.width, stream.codec_context.height
    scale = min(1.0, max_side / max(width, height, 1)) if max_side else 1.0
    size = {"width": max(1, round(width * scale)), "height": max(1, round(height * scale)),
            "interpolation": "LANCZOS"} if scale < 1 else {}
    index = 0
    try:
        for index, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else index / rate
            yield t, frame.to_image(**size)
    except av.error.FFmpegError as exc:
        raise InputError(f"Input {path} could not be decoded past {index} frames ({exc}).") from None
    finally:
        container.close()


def _duration(path: Path) -> float | None:
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / 1e6
        return None
    finally:
        container.close()


def sample_video(path: Path, cfg: FramesConfig, progress) -> tuple[list[Candidate], dict[str, Any]]:
    """The sharpest frame in each of `cfg.max` equal windows of [start, stop)."""
    duration = _duration(path)
    if duration is None:  # some containers do not say: count by decoding once
        duration = max((t for t, _ in _decode(path)), default=0.0) + 1e-3
    start = cfg.start or 0.0
    stop = min(cfg.stop, duration) if cfg.stop is not None else duration
    if start >= duration:
        raise InputError(f"frames.start ({start} s) is past the end of {path} ({duration:.2f} s long).")
    span = max(stop - start, 1e-6)
    windows = cfg.max
    picked: list[Candidate] = []
    best = None  # (window, score, t, frame shrunk to max_side): the current window's sharpest so far
    decoded = 0

    def close(best) -> None:  # frames arrive in time order: a window's best is final once the next one starts
        window, score, t, img = best
        picked.append(Candidate.of(img, cfg.max_side, f"{path.name}@{t:.3f}s", t, score,
                                   f"sharpest frame of window {window + 1}/{windows}"))

    for t, img in _decode(path, cfg.max_side):
        decoded += 1
        if t < start or t >= stop:
            continue
        window = min(int((t - start) / span * windows), windows - 1)
        score = sharpness(_gray(img, 512))
        if best is not None and window != best[0]:
            close(best)
            best = None
        if best is None or score > best[1]:
            best = (window, score, t, img)
        if decoded % 10 == 0:
            progress(min(0.95, (t - start) / span), f"decoding {t:.1f}/{stop:.1f} s")
    if best is not None:
        close(best)
    if decoded == 0:
        raise InputError(f"Input {path} holds no decodable video frames.")
    if decoded == 1:
        raise InputError(
            f"Input {path} has only 1 frame; a reconstruction needs the camera to move through many views.",
            hint="Record a few seconds while walking around the subject.",
        )
    return picked, {"decoded_frames": decoded, "duration_s": round(duration, 3), "windows": windows,
                    "start_s": start, "stop_s": round(stop, 3)}


# ---------------------------------------------------------------- images


def _image_sources(path: Path, kind: str) -> list[tuple[str, Callable[[], bytes]]]:
    """Each photo's name and a reader for its bytes; nothing is read until a photo is kept. A zip's
    entries are counted and their sizes summed from its directory before any is decompressed, and
    each is read through a bounded stream (a directory can lie)."""
    if kind == "images":
        photos = lambda folder: sorted(p for p in folder.iterdir()  # noqa: E731
                                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.is_symlink())
        files = photos(path)
        nested = path / "images"  # a nerfstudio or COLMAP data folder: the photos in images/, the poses beside them
        if not files and nested.is_dir() and not nested.is_symlink():
            files = photos(nested)
        return [(_printable(str(f.relative_to(path))), lambda f=f: _bounded(f.open("rb"), f.name)) for f in files]
    try:
        count, directory_bytes = _zip_directory(path)
        if count > MAX_ARCHIVE_ENTRIES or directory_bytes > MAX_DIRECTORY_BYTES:  # before the directory is parsed
            raise InputError(f"Input {path.name} holds {count:,} entries in a {directory_bytes / 2**20:,.0f} MiB "
                             f"directory; a .zip may hold at most {MAX_ARCHIVE_ENTRIES:,} (in {MAX_DIRECTORY_BYTES // 2**20} MiB).")
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, struct.error) as exc:
        raise InputError(f"Input {path.name} is not a readable .zip archive ({exc.__class__.__name__}).") from None
    entries = [i for i in archive.infolist() if not i.is_dir()]
    if len(entries) > MAX_ARCHIVE_ENTRIES:  # the end record undercounted: the directory is read, but no further
        raise InputError(f"Input {path.name} holds {len(entries):,} entries; a .zip may hold at most {MAX_ARCHIVE_ENTRIES:,}.")
    total = sum(i.file_size for i in entries)
    if total > MAX_ARCHIVE_BYTES:
        raise InputError(f"Input {path.name} unpacks to {total / 1e9:.1f} GB; a .zip may unpack to at most "
                         f"{MAX_ARCHIVE_BYTES / 1e9:.0f} GB.")
    photos = sorted(i.filename for i in entries if Path(i.filename).suffix.lower() in IMAGE_SUFFIXES
                    and not i.filename.startswith("__MACOSX/") and not Path(i.filename).name.startswith("."))
    # names are only read, never used as paths: no zip-slip
    return [(name, lambda name=name: _bounded(archive.open(name), name)) for name in photos]


EOCD = struct.Struct("<4s4H2LH")  # end of central directory: ..., entries, directory size, offset, comment length
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # just before it in a ZIP64 archive: where the ZIP64 end record is
ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries on this disk, entries, directory size, offset


def _zip_directory(path: Path) -> tuple[int, int]:
    """A zip's entry count and directory size, from its end records alone: opening it with zipfile
    parses the whole directory first (300,000 entries: 200 MB of Python objects)."""
    with path.open("rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - EOCD.size - 0xFFFF))  # the record, then a comment of at most 64 KiB
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + EOCD.size > len(tail):
            raise zipfile.BadZipFile("no end of central directory record")
        count, directory_bytes = EOCD.unpack_from(tail, at)[4:6]
        locator = at - ZIP64_LOCATOR.size
        if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":  # the 16/32-bit fields say 0xFFFF.. here
            fh.seek(ZIP64_LOCATOR.unpack_from(tail, locator)[2])
            record = fh.read(ZIP64_EOCD.size)
            if len(record) < ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
                raise zipfile.BadZipFile("a ZIP64 locator that points at no ZIP64 end record")
            count, directory_bytes = ZIP64_EOCD.unpack(record)[7:9]
    return count, directory_bytes


def _printable(name: str) -> str:
    """A file name of undecodable bytes, shown with escapes (it is only ever shown and recorded)."""
    return name.encode("utf-8", "backslashreplace").decode()


def _bounded(stream, name: str, limit: int = MAX_PHOTO_BYTES) -> bytes:
    """At most `limit` bytes, read a chunk at a time (one `read(n)` would allocate n bytes up front)."""
    chunks, total = [], 0
    with stream:
        while chunk := stream.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise ValueError(f"over {limit // 2**20} MiB")
            chunks.append(chunk)
    return b"".join(chunks)


def _zip_root(names: list[str]) -> str:
    """The one folder a zip holds everything in (`capture/`, as a folder zipped whole), or ''."""
    tops = {n.split("/", 1)[0] for n in names}
    return f"{next(iter(tops))}/" if len(tops) == 1 and all("/" in n for n in names) else ""


def _open_photo(data: bytes, max_side: int) -> tuple[Image.Image, dict[str, Any]]:
    """A photo, decoded no larger than it needs to be: a JPEG is decoded at a reduced scale
    (`draft`), and anything still over MAX_PIXELS is refused rather than decoded. With it, its size as
    stored and its EXIF orientation."""
    img = Image.open(io.BytesIO(data))
    stored = list(img.size)
    if img.format == "JPEG":
        img.draft("RGB", (max_side, max_side))
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"{img.width}×{img.height} pixels, over {MAX_PIXELS // 10**6} megapixels")
    if min(img.size) < MIN_SIDE:
        raise ValueError(f"{img.width}×{img.height} pixels; a photo needs {MIN_SIDE} on each side to be matched")
    original = {"original_size": stored, "orientation": int(img.getexif().get(0x0112, 1) or 1)}  # after the bounds
    img = ImageOps.exif_transpose(img)  # phones store portrait shots rotated, with an EXIF flag
    return fit(img.convert("RGB"), max_side), original  # kept photos are held until written: at the size written


def load_images(path: Path, kind: str, cfg: FramesConfig, progress) -> tuple[list[Candidate], dict[str, Any]]:
    sources = _image_sources(path, kind)
    if not sources:
        raise InputError(f"Input {path.name} holds no .jpg or .png images.")
    skipped = []
    picked: list[Candidate] = []
    # More photos than frames.max: keep an even spread, in name order.
    keep = set(np.linspace(0, len(sources) - 1, num=min(cfg.max, len(sources))).round().astype(int).tolist())
    for i, (name, read) in enumerate(sources):
        if i not in keep:
            skipped.append({"source": name, "kept": False, "reason": f"over frames.max ({cfg.max}): evenly thinned"})
            continue
        try:
            img, original = _open_photo(read(), cfg.max_side)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                zipfile.BadZipFile, EOFError) as exc:
            skipped.append({"source": name, "kept": False, "reason": f"unreadable image ({str(exc)[:200]})"})
            continue
        picked.append(Candidate.of(img, cfg.max_side, name, None, sharpness(_gray(img, 512)), "photo", original))
        progress(0.9 * (i + 1) / len(sources), f"reading {name}")
    return picked, {"files": len(sources), "skipped": skipped}


# ---------------------------------------------------------------- 360° frames


def write_faces(kept: list[Candidate], cfg: FramesConfig, out: Path, progress) -> list[dict[str, Any]]:
    """Each kept equirectangular frame as its rig of perspective faces (`equirect.py`), `f<k>_frame_<i>.jpg`."""
    records = []
    for i, cand in enumerate(kept):
        panorama = Image.open(io.BytesIO(cand.jpeg))
        width, height = panorama.size
        if abs(width - 2 * height) > 0.02 * width:
            raise InputError(f"frames.projection is 'equirect' but {cand.source} is {width}×{height}; an "
                             "equirectangular frame is twice as wide as it is high.",
                             hint="Export the 360° video as equirectangular (2:1), or set frames.projection to 'perspective'.")
        size = equirect.face_size(width, cfg.max_side)
        for face, image in equirect.cut(panorama, size).items():
            name = f"{face}_frame_{i:05d}.jpg"
            image.save(out / name, "JPEG", quality=JPEG_QUALITY)
            records.append({"file": name, "source": cand.source, "face": face, "time_s": cand.time, "kept": True,
                            "sharpness": round(cand.sharpness, 2), "reason": cand.reason, "size": [size, size]})
        progress(0.9 + 0.1 * (i + 1) / len(kept), f"cutting frame {i + 1}/{len(kept)} into views")
    return records


# ---------------------------------------------------------------- masks given with the photos

MASK_SUFFIXES = (".png", ".jpg", ".jpeg")
T = Image.Transpose
EXIF_TURNS = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
              7: T.TRANSVERSE, 8: T.ROTATE_90}  # what ImageOps.exif_transpose does for each EXIF orientation


def _mask_sources(path: Path, kind: str) -> dict[str, Callable[[], bytes]]:
    """The masks in a masks/ folder beside the photos (at the top of the input, or of its one folder),
    by the names they may match: a photo's stem (`IMG_1` for IMG_1.jpg) or its whole name (COLMAP's
    IMG_1.jpg.png)."""
    if kind == "images":
        folder = path / "masks"
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()) \
            if folder.is_dir() and not folder.is_symlink() else []
        found = {f.name: (lambda f=f: _bounded(f.open("rb"), f.name)) for f in files}
    else:
        archive = zipfile.ZipFile(path)
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        root = _zip_root(names)
        found = {n[len(root) + len("masks/"):]: (lambda n=n: _bounded(archive.open(n), n)) for n in names
                 if n.startswith(f"{root}masks/") and "/" not in n[len(root) + len("masks/"):]}
    return {name.rsplit(".", 1)[0]: read for name, read in found.items() if Path(name).suffix.lower() in MASK_SUFFIXES}


def write_masks(path: Path, kind: str, kept: list[Candidate], records: list[dict], dest: Path) -> int:
    """Each kept photo's mask, turned and scaled as the photo was, as `dest/<frame>.png` (COLMAP's name for
    a frame's mask: 255 where features may be found). Every photo needs one once any mask is given."""
    if dest.exists():
        for old in dest.iterdir():
            old.unlink()
    masks = _mask_sources(path, kind) if kind != "video" else {}
    if not masks:
        return 0
    problems = []
    dest.mkdir(parents=True, exist_ok=True)
    for cand, record in zip(kept, records):
        name = Path(cand.source).name
        read = masks.get(name) or masks.get(name.rsplit(".", 1)[0])
        if read is None:
            problems.append(f"no mask for {cand.source}")
            continue
        try:
            mask = Image.open(io.BytesIO(read()))
            if mask.width * mask.height > MAX_PIXELS:
                raise ValueError(f"{mask.width}×{mask.height} pixels, over {MAX_PIXELS // 10**6} megapixels")
            mask = mask.convert("L")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
            problems.append(f"the mask of {cand.source} is not a readable image ({str(exc)[:100]})")
            continue
        orientation = record.get("orientation", 1)
        stored = tuple(record.get("original_size") or cand.size)
        upright = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
        if mask.size == stored:  # drawn on the photo as stored (as COLMAP and most tools read it): turned as it was
            mask = mask.transpose(EXIF_TURNS[orientation]) if orientation in EXIF_TURNS else mask
        elif mask.size != upright:
            problems.append(f"the mask of {cand.source} is {mask.width}×{mask.height}, the photo {upright[0]}×{upright[1]}")
            continue
        mask = mask.resize(cand.size, Image.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
        if not mask.getbbox():
            problems.append(f"the mask of {cand.source} is all black (nothing to keep)")
            continue
        mask.save(dest / f"{record['file']}.png")
        record["mask"] = True
    if problems:
        raise InputError(f"The masks beside the photos do not fit them: {'; '.join(problems[:6])}"
                         f"{f' (and {len(problems) - 6} more)' if len(problems) > 6 else ''}.",
                         hint="Give every photo a mask of its own size in masks/, named as the photo (IMG_1.png for "
                              "IMG_1.jpg): white on the subject, black on the background. Or set frames.masks to false.")
    return len(kept)


# ---------------------------------------------------------------- poses given with the photos


def _pose_entries(names: list[str]) -> dict[str, str] | None:
    """Among an input's file names (posix, relative), the pose files to copy (their name in frames/poses →
    their name in the input): a transforms.json, else a COLMAP model in sparse/0/ or sparse/, at the top
    or in the one folder that holds everything."""
    roots = ["", _zip_root(names)] if _zip_root(names) else [""]
    present = set(names)
    for root in roots:
        if f"{root}{poses.TRANSFORMS}" in present:
            return {poses.TRANSFORMS: f"{root}{poses.TRANSFORMS}"}
        for folder in (f"{root}sparse/0/", f"{root}sparse/"):
            found = {f"{n}{ext}": f"{folder}{n}{ext}" for n in poses.COLMAP_FILES for ext in (".bin", ".txt")
                     if f"{folder}{n}{ext}" in present}
            if len({k.rsplit(".", 1)[0] for k in found}) == len(poses.COLMAP_FILES):
                return found
    return None


def copy_pose_files(path: Path, kind: str, dest: Path) -> dict[str, Any] | None:
    """Copy the poses given beside the photos into `dest` (read through bounded streams, never through a
    link, at most MAX_POSE_BYTES together). Returns what was found, for frames.json."""
    if dest.exists():
        for old in dest.iterdir():
            old.unlink()
    if kind == "images":  # only the places pose files may be: no walk of the folder, nothing through a link
        inside = path.resolve()
        places = [poses.TRANSFORMS] + [f"{folder}{n}{ext}" for folder in ("sparse/0/", "sparse/")
                                       for n in poses.COLMAP_FILES for ext in (".bin", ".txt")]
        names = [name for name in places if (path / name).is_file() and not (path / name).is_symlink()
                 and (path / name).resolve().is_relative_to(inside)]
        read = lambda name: (path / name).open("rb")  # noqa: E731
    else:
        archive = zipfile.ZipFile(path)
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        read = archive.open
    entries = _pose_entries(names)
    if entries is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    left = poses.MAX_POSE_BYTES  # for all of them together
    for local, name in entries.items():
        try:
            data = _bounded(read(name), name, limit=left)
        except ValueError:
            raise InputError(f"The pose files beside the photos hold over {poses.MAX_POSE_BYTES // 2**20} MiB; "
                             "at most that much is read.") from None
        left -= len(data)
        (dest / local).write_bytes(data)
    return {"files": sorted(entries.values())}


# ---------------------------------------------------------------- stage


def drop_near_duplicates(frames: list[Candidate], min_difference: float) -> tuple[list[Candidate], list[dict]]:
    kept: list[Candidate] = []
    dropped = []
    last = None
    for cand in frames:
        thumb = cand.thumb
        if last is not None and thumb.shape == last.shape:
            diff = float(np.abs(thumb - last).mean())
            if diff < min_difference:
                dropped.append({"source": cand.source, "kept": False, "sharpness": round(cand.sharpness, 2),
                                "reason": f"near-duplicate of {kept[-1].source} (difference {diff:.2f} < {min_difference})"})
                continue
        kept.append(cand)
        last = thumb
    return kept, dropped


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config.frames
    path = ctx.input
    kind = input_kind(path)
    if kind == "video":
        candidates, info = sample_video(path, cfg, ctx.progress)
        rejected = []
    else:
        candidates, info = load_images(path, kind, cfg, ctx.progress)
        rejected = info.pop("skipped")
    kept, dupes = drop_near_duplicates(candidates, cfg.min_difference)
    rejected += dupes
    if len(kept) < 2:
        raise InputError(
            f"Input {path} gave {len(kept)} usable frame{'s' if len(kept) != 1 else ''}; at least 2 distinct views are needed.",
            hint="Use a capture where the camera moves around the subject.",
        )

    out = ctx.dir("frames") / "images"
    if out.exists():
        for old in out.iterdir():
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.projection == "equirect":
        records = write_faces(kept, cfg, out, ctx.progress)
        (ctx.dir("frames") / "frames.json").write_text(
            json.dumps({"input": str(path), "kind": kind, **info, "frames": records, "rejected": rejected}, indent=2))
        ctx.progress(1.0, f"{len(kept)} frames, {len(records)} views")
        return {"kind": kind, "kept": len(kept), "rejected": len(rejected), "candidates": len(candidates), "masked": 0,
                "projection": "equirect", "views": len(records), "face_size": records[0]["size"][0], "same_size": True,
                **{k: v for k, v in info.items() if k != "files"}}
    records = []
    sizes = set()
    for i, cand in enumerate(kept):
        name = f"frame_{i:05d}.jpg"
        (out / name).write_bytes(cand.jpeg)
        sizes.add(cand.size)
        records.append({"file": name, "source": cand.source, "time_s": cand.time, "kept": True,
                        "sharpness": round(cand.sharpness, 2), "reason": cand.reason, "size": list(cand.size),
                        **(cand.original or {})})
    poses = copy_pose_files(path, kind, ctx.dir("frames") / "poses") if kind != "video" else None
    masked = write_masks(path, kind, kept, records, ctx.dir("frames") / "masks") if cfg.masks else 0
    (ctx.dir("frames") / "frames.json").write_text(
        json.dumps({"input": str(path), "kind": kind, **info, "frames": records, "rejected": rejected, "poses": poses}, indent=2)
    )
    ctx.progress(1.0, f"{len(kept)} frames")
    return {"kind": kind, "kept": len(kept), "rejected": len(rejected), "candidates": len(candidates), "masked": masked,
            "same_size": len(sizes) == 1, **{k: v for k, v in info.items() if k != "files"}}
