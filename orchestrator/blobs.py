"""Where media, job documents and results live: an S3 bucket, or a local folder (embedded mode).

Keys are the same in both (`uploads/...`, `jobs/...`, `results/<id>/...`), so the daemon's logic
does not care which one it talks to.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath
from typing import Protocol

MAX_LINK_SECONDS = 7 * 24 * 3600  # S3 presigned URLs cannot outlive 7 days with SigV4


class Blobs(Protocol):
    def exists(self, key: str) -> bool: ...
    def exists_prefix(self, prefix: str) -> bool: ...
    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def copy_prefix(self, src: str, dst: str) -> list[str]: ...
    def download(self, key_or_prefix: str, dest: Path) -> Path: ...
    def upload_dir(self, src: Path, prefix: str) -> list[str]: ...
    def link(self, key: str, seconds: int) -> str: ...
    def uri(self, key: str) -> str: ...
    def local_path(self, key: str) -> Path | None:
        """The key as a file or folder on this machine (embedded mode), or None (S3)."""


class S3Blobs:
    def __init__(self, client, bucket: str):
        self.client, self.bucket = client, bucket

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def exists_prefix(self, prefix: str) -> bool:
        return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def copy_prefix(self, src: str, dst: str) -> list[str]:
        keys = []
        for key in self.list(src):
            target = dst + key[len(src):]
            self.client.copy_object(Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": key})
            keys.append(target)
        return keys

    def list(self, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def download(self, key_or_prefix: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        if not key_or_prefix.endswith("/"):
            target = dest / PurePosixPath(key_or_prefix).name
            self.client.download_file(self.bucket, key_or_prefix, str(target))
            return target
        for key in self.list(key_or_prefix):
            target = dest / key[len(key_or_prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, key, str(target))
        return dest

    def upload_dir(self, src: Path, prefix: str) -> list[str]:
        keys = []
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            key = prefix + str(file.relative_to(src))
            self.client.upload_file(str(file), self.bucket, key)
            keys.append(key)
        return keys

    def link(self, key: str, seconds: int) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=min(seconds, MAX_LINK_SECONDS))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def local_path(self, key: str) -> Path | None:
        return None


class FolderBlobs:
    def __init__(self, root: Path):
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise ValueError(f"{key!r} is outside {self.root}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def exists_prefix(self, prefix: str) -> bool:
        path = self._path(prefix)
        return path.is_dir() and any(p.is_file() for p in path.rglob("*"))

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")  # watchers see the whole file or none of it
        tmp.write_bytes(data)
        tmp.replace(path)

    def copy_prefix(self, src: str, dst: str) -> list[str]:
        source = self._path(src)
        if source.is_dir():
            shutil.copytree(source, self._path(dst), dirs_exist_ok=True)
        return self.list(dst)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []

    def download(self, key_or_prefix: str, dest: Path) -> Path:
        return self._path(key_or_prefix)  # already local: read in place

    def upload_dir(self, src: Path, prefix: str) -> list[str]:
        target = self._path(prefix)
        if src.resolve() != target:
            shutil.copytree(src, target, dirs_exist_ok=True)
        return self.list(prefix)

    def link(self, key: str, seconds: int) -> str:
        return self._path(key).as_uri()

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)
