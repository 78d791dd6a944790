"""Multipart uploads straight from the browser: S3's own, or the same protocol into the local folder.

The browser does the same three steps in both modes: `start` gives it one URL per part, it PUTs each
part to its URL and keeps the ETag of each answer, and `complete` joins the parts. On AWS the URLs
are S3 presigned `UploadPart` links, so large media never pass through the console. In embedded mode
they are the console's own signed, expiring links, and the parts are joined in the folder.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Protocol

from codsplat.pipeline.contract import ARCHIVE_SUFFIXES, MEDIA_SUFFIXES, VIDEO_SUFFIXES
from codsplat.pipeline.errors import InputError
from codsplat.pipeline.validation import show
from starlette.concurrency import run_in_threadpool

MIN_PART = 8 * 2**20  # S3 parts are at least 5 MiB (but the last); 8 MiB keeps the count low
MAX_PARTS = 10_000  # S3's limit
MAX_BYTES = 50 * 2**30
MAX_FILES = 5000  # photos in one upload (as Settings.max_input_files)
LINK_SECONDS = 3600
ABANDONED_SECONDS = 24 * 3600  # an upload not completed within a day is cleared away (S3: the bucket's lifecycle rule)
MEDIA = MEDIA_SUFFIXES
VIDEO_OR_ZIP = VIDEO_SUFFIXES + ARCHIVE_SUFFIXES


def part_size(size: int) -> int:
    return max(MIN_PART, math.ceil(size / MAX_PARTS))


def safe_name(name: str) -> str:
    """A file name as a key segment: no folders, no odd characters, the extension kept."""
    base = PurePosixPath(name.replace("\\", "/")).name
    stem, dot, ext = base.rpartition(".")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem if dot else base).strip("-.")[:80] or "file"
    return f"{stem}.{ext.lower()}" if dot else stem


def check_files(files: list[dict]) -> None:
    """What a job can use: one video or one .zip of images, or images (jpg/png)."""
    if len(files) > MAX_FILES:
        raise InputError(f"files: {len(files):,} files; one job reads at most {MAX_FILES:,} photos.")
    if not files:
        raise InputError(f"files: choose a video ({', '.join(s[1:] for s in VIDEO_SUFFIXES)}), a .zip of images, or images (jpg, png).")
    for f in files:
        if not isinstance(f, dict):
            raise InputError('files: each file is {"name": ..., "size": bytes}.')
        name, size = f.get("name"), f.get("size")
        if not isinstance(name, str) or not name.lower().endswith(MEDIA) or len(name) > 1000:
            raise InputError(f"files: {show(name)} is not a video, a .zip or an image; use one of {', '.join(MEDIA)}.")
        if type(size) is not int or size <= 0 or size > MAX_BYTES:  # not isinstance: true is an int to Python
            raise InputError(f"files: {show(name)} has size {show(size)}; a file must be 1 byte to {MAX_BYTES // 2**30} GiB.")
    whole = [f["name"] for f in files if f["name"].lower().endswith(VIDEO_OR_ZIP)]
    if whole and len(files) > 1:
        raise InputError(f"files: {show(whole[0])} must be uploaded alone; a job reads one video, one .zip, or a set of images.")


class Uploads(Protocol):
    def start(self, key: str, size: int) -> dict: ...
    def complete(self, key: str, upload_id: str, parts: list[dict]) -> None: ...


class S3Uploads:
    def __init__(self, client, bucket: str, link_seconds: int = LINK_SECONDS):
        self.client, self.bucket, self.link_seconds = client, bucket, link_seconds

    def start(self, key: str, size: int) -> dict:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        step = part_size(size)
        urls = [self.client.generate_presigned_url(
            "upload_part", ExpiresIn=self.link_seconds,
            Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": n})
            for n in range(1, math.ceil(size / step) + 1)]
        return {"key": key, "upload_id": upload_id, "part_size": step, "urls": urls}

    def complete(self, key: str, upload_id: str, parts: list[dict]) -> None:
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": int(p["part"]), "ETag": str(p["etag"])} for p in parts]})


class FolderUploads:
    """Parts land in `<root>/.uploads/<upload id>/`; `complete` joins them into the key's file."""

    def __init__(self, root: Path, sign_path, link_seconds: int = LINK_SECONDS):
        self.root, self.sign_path, self.link_seconds = root, sign_path, link_seconds
        self.staging = root / ".uploads"

    def start(self, key: str, size: int) -> dict:
        self.clear_abandoned()
        upload_id = secrets.token_hex(12)
        step = part_size(size)
        (self.staging / upload_id).mkdir(parents=True)
        (self.staging / upload_id / "key").write_text(key)
        (self.staging / upload_id / "parts").write_text(str(math.ceil(size / step)))
        urls = [self.sign_path(f"/api/local-upload/{upload_id}/{n}", self.link_seconds)
                for n in range(1, math.ceil(size / step) + 1)]
        return {"key": key, "upload_id": upload_id, "part_size": step, "urls": urls}

    def clear_abandoned(self, now: float | None = None) -> list[str]:
        """Remove uploads started more than ABANDONED_SECONDS ago and never completed."""
        cleared = []
        now = time.time() if now is None else now
        for folder in self.staging.iterdir() if self.staging.is_dir() else []:
            if folder.is_dir() and not folder.is_symlink() and now - folder.stat().st_mtime > ABANDONED_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
                cleared.append(folder.name)
        return cleared

    def _dir(self, upload_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{24}", upload_id) or not (self.staging / upload_id).is_dir():
            raise InputError(f"upload_id: no upload {upload_id!r} is in progress.")
        return self.staging / upload_id

    async def receive_part(self, upload_id: str, number: int, chunks) -> str:
        """Write one part as it streams in; the ETag is its MD5, as S3's is."""
        digest = hashlib.md5()
        target = self._dir(upload_id) / f"{number:05d}.part"
        fh = await run_in_threadpool(open, target.with_suffix(".tmp"), "wb")
        received = 0
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > part_size(MAX_BYTES):
                    raise InputError(f"part {number}: larger than a part may be ({part_size(MAX_BYTES)} bytes).")
                digest.update(chunk)
                await run_in_threadpool(fh.write, chunk)  # disk writes stay off the event loop
        except BaseException:
            fh.close()
            target.with_suffix(".tmp").unlink(missing_ok=True)
            raise
        fh.close()
        target.with_suffix(".tmp").replace(target)
        return f'"{digest.hexdigest()}"'

    def complete(self, key: str, upload_id: str, parts: list[dict]) -> None:
        folder = self._dir(upload_id)
        if (folder / "key").read_text() != key:
            raise InputError(f"key: upload {upload_id} was started for another key.")
        numbers = sorted(int(p["part"]) for p in parts)
        started = int((folder / "parts").read_text())
        if numbers != list(range(1, started + 1)):  # the parts it was started with, each once
            raise InputError(f"parts: upload {upload_id} has parts 1 to {started}; list each once.")
        files = [folder / f"{n:05d}.part" for n in numbers]
        missing = [n for n, f in zip(numbers, files) if not f.is_file()]
        if not numbers or missing:
            raise InputError(f"parts: part {missing[0] if missing else 1} of upload {upload_id} never arrived.")
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        with open(tmp, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(target)  # the media appear whole, never half-written
        shutil.rmtree(folder, ignore_errors=True)
