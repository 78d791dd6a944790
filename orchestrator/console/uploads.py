"""Multipart uploads straight from the browser: S3's own, or the same protocol into the local folder.

The browser does the same three steps in both modes: `start` gives it one URL per part, it PUTs each
part to its URL and keeps the ETag of each answer, and `complete` joins the parts. On AWS the URLs
are S3 presigned `UploadPart` links, so large media never pass through the console. In embedded mode
they are the console's own signed, expiring links, and the parts are joined in the folder.
"""

from __future__ import annotations

import hashlib
import math
import os
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

from ..blobs import Refused, open_beneath, walk_beneath

MIN_PART = 8 * 2**20  # S3 parts are at least 5 MiB (but the last); 8 MiB keeps the count low
MAX_PARTS = 10_000  # S3's limit
MAX_BYTES = 50 * 2**30
MAX_FILES = 5000  # photos in one upload (as Settings.max_input_files)
MAX_REQUEST_PARTS = 20_000  # signed links one request may ask for: a 50 GiB video takes 6,400, 5,000 photos 5,000
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
    parts = sum(math.ceil(f["size"] / part_size(f["size"])) for f in files)
    if parts > MAX_REQUEST_PARTS:  # each part is a signed link in the answer
        raise InputError(f"files: {len(files):,} files of {sum(f['size'] for f in files) / 2**30:,.0f} GiB take {parts:,} "
                         f"upload parts; one upload takes at most {MAX_REQUEST_PARTS:,}: upload fewer or smaller files.")
    whole = [f["name"] for f in files if f["name"].lower().endswith(VIDEO_OR_ZIP)]
    if whole and len(files) > 1:
        raise InputError(f"files: {show(whole[0])} must be uploaded alone; a job reads one video, one .zip, or a set of images.")


class Uploads(Protocol):
    def clear_abandoned(self) -> list[str]: ...
    def start(self, key: str, size: int) -> dict: ...
    def complete(self, key: str, upload_id: str, parts: list[dict]) -> None: ...


class S3Uploads:
    def __init__(self, client, bucket: str, link_seconds: int = LINK_SECONDS):
        self.client, self.bucket, self.link_seconds = client, bucket, link_seconds

    def clear_abandoned(self) -> list[str]:
        return []  # the bucket's lifecycle rule aborts the multipart uploads left under uploads/ for 7 days (aws/base.py)

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


def unwritable(exc: Exception) -> InputError:
    return InputError(f"The upload cannot be written in the embedded folder: {exc}.",
                      hint="The folder's .uploads and uploads/ must be plain folders; remove the link.")


class FolderUploads:
    """Parts land in `<root>/.uploads/<upload id>/`; `complete` joins them into the key's file."""

    def __init__(self, root: Path, sign_path, link_seconds: int = LINK_SECONDS):
        self.root, self.sign_path, self.link_seconds = root, sign_path, link_seconds
        self.staging = root / ".uploads"

    def _write(self, rel: str, data: bytes) -> None:
        """A new file beneath the folder, through no link (a planted `.uploads` or `uploads/console`
        link would otherwise take the write elsewhere)."""
        with os.fdopen(self._open(rel), "wb") as fh:
            fh.write(data)

    def _open(self, rel: str) -> int:
        try:
            return open_beneath(self.root, rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        except Refused as exc:
            raise unwritable(exc) from None

    def start(self, key: str, size: int) -> dict:
        upload_id = secrets.token_hex(12)
        step = part_size(size)
        self._write(f".uploads/{upload_id}/key", key.encode())
        self._write(f".uploads/{upload_id}/parts", str(math.ceil(size / step)).encode())
        urls = [self.sign_path(f"/api/local-upload/{upload_id}/{n}", self.link_seconds)
                for n in range(1, math.ceil(size / step) + 1)]
        return {"key": key, "upload_id": upload_id, "part_size": step, "urls": urls}

    def clear_abandoned(self, now: float | None = None) -> list[str]:
        """Remove uploads started more than ABANDONED_SECONDS ago and never completed."""
        cleared = []
        now = time.time() if now is None else now
        if self.staging.is_symlink() or not self.staging.is_dir():  # never clear out where a planted link leads
            return cleared
        for folder in self.staging.iterdir():
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
        tmp = target.with_name(f"{number:05d}.{secrets.token_hex(6)}.tmp")  # its own: a part may be sent twice at once
        fh = os.fdopen(await run_in_threadpool(self._open, f".uploads/{upload_id}/{tmp.name}"), "wb")
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
            tmp.unlink(missing_ok=True)
            raise
        fh.close()
        tmp.replace(target)  # the last whole part sent wins
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
        parent, name = os.path.split(key)
        try:
            dest = walk_beneath(self.root, parent, create=True)  # no link on the way to the key's folder
        except Refused as exc:
            raise unwritable(exc) from None
        try:
            out_fd = os.open(f".{name}.part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=dest)
            with os.fdopen(out_fd, "wb") as out:
                for number, f, part in zip(numbers, files, sorted(parts, key=lambda p: int(p["part"]))):
                    digest = hashlib.md5()
                    with open(f, "rb") as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                    if str(part.get("etag", "")).strip('"') != digest.hexdigest():  # as S3 refuses a stale or wrong ETag
                        os.unlink(f".{name}.part", dir_fd=dest)
                        raise InputError(f"parts: part {number}'s ETag is not the one its upload answered with; "
                                         "send each part's ETag as the upload returned it.")
            # the media appear whole, never half-written, in the folder that was checked
            os.replace(f".{name}.part", name, src_dir_fd=dest, dst_dir_fd=dest)
        finally:
            os.close(dest)
        shutil.rmtree(folder, ignore_errors=True)
