"""Where media, job documents and results live: an S3 bucket, or a local folder (embedded mode).

Keys are the same in both (`uploads/...`, `jobs/...`, `results/<id>/...`), so the daemon's logic
does not care which one it talks to.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import Protocol

MAX_LINK_SECONDS = 7 * 24 * 3600  # S3 presigned URLs cannot outlive 7 days with SigV4


class Refused(ValueError):
    """A key that names something we will not read or write: outside the folder, a link that leads
    out or loops, not a plain file."""


def inside(root: Path, path: Path) -> Path:
    """`path` resolved, if it stays inside `root` (links followed); Refused otherwise."""
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError, ValueError) as exc:  # a link loop, a NUL in the name
        raise Refused(f"{path.name[:200]!r} cannot be resolved ({exc.__class__.__name__})") from None
    if resolved != root and root not in resolved.parents:
        raise Refused(f"{path.name} leads outside {root}")
    return resolved


def walk_beneath(root: Path, rel: str, create: bool = False) -> int:
    """A descriptor of the folder `rel` beneath `root`, reached one name at a time from `root`'s own
    descriptor without following any link (`O_NOFOLLOW`), so a link planted on the way, or swapped
    in after a check, cannot lead elsewhere; `create` makes the missing folders. Refused otherwise."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in PurePosixPath(rel).parts if rel not in ("", ".") else ():
            if name in ("..", "/"):
                raise Refused(f"{rel[:200]} is not a path beneath {root}")
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                step = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:  # a link (ELOOP, or ENOTDIR for a link to a folder), or a file where a folder goes
                link = exc.errno == errno.ELOOP or stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                raise Refused(f"{rel[:200]}: {name[:100]} is {'a link' if link else 'not a folder'}") from None
            os.close(fd)
            fd = step
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_beneath(root: Path, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """Open the file `rel` beneath `root` with no link followed on the way or at the end (see
    `walk_beneath`); with `os.O_CREAT` in `flags`, its folders are made."""
    parent, name = os.path.split(rel)
    if not name or name in (".", ".."):
        raise Refused(f"{rel[:200]} is not a file name")
    folder = walk_beneath(root, parent, create=bool(flags & os.O_CREAT))
    try:
        return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(f"{rel[:200]} is a link") from None
        raise
    finally:
        os.close(folder)


class Blobs(Protocol):
    def exists(self, key: str) -> bool: ...
    def exists_prefix(self, prefix: str) -> bool: ...
    def size(self, key: str) -> int | None:
        """Bytes of the object, None when there is none; Refused for what may not be read."""
    def usage(self, prefix: str, most: int) -> tuple[int, int]:
        """(objects, bytes) under a prefix, counting at most `most` + 1 objects."""
    def read(self, key: str, limit: int | None = None) -> bytes: ...
    def head(self, key: str, limit: int) -> tuple[bytes, int] | None:
        """At most the first `limit` bytes and the whole size, in one request; None when there is none."""
    def write(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool:
        """Write only if nothing is there yet; False when something was."""
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

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def usage(self, prefix: str, most: int) -> tuple[int, int]:
        count = total = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                count, total = count + 1, total + obj["Size"]
                if count > most:
                    return count, total
        return count, total

    def read(self, key: str, limit: int | None = None) -> bytes:
        extra = {"Range": f"bytes=0-{limit - 1}"} if limit else {}
        return self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()

    def head(self, key: str, limit: int) -> tuple[bytes, int] | None:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{limit - 1}")
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code == "InvalidRange":  # an empty object has no byte 0
                return b"", 0
            raise
        total = reply.get("ContentRange", "").rpartition("/")[2]
        return reply["Body"].read(limit), int(total) if total.isdigit() else reply["ContentLength"]

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:  # S3's conditional write: refused with 412 when the key exists
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

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
        root = dest.resolve()
        for key in self.list(key_or_prefix):
            target = root / key[len(key_or_prefix):]
            if ".." in PurePosixPath(key).parts or root not in target.resolve().parents:
                raise Refused(f"object {key[:200]!r} would be written outside {dest}")
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
        return inside(self.root, self.root / key)

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except (Refused, OSError):  # a name the disk refuses (over 255 bytes) names nothing here
            return False

    def size(self, key: str) -> int | None:
        path = self._path(key)
        if not path.exists():
            return None
        if not path.is_file():
            raise Refused(f"{key[:200]} is not a plain file")
        return path.stat().st_size

    def usage(self, prefix: str, most: int) -> tuple[int, int]:
        count = total = 0
        for folder, _, files in os.walk(self._path(prefix)):  # links to folders are not followed
            for name in files:
                path = Path(folder) / name
                if path.is_symlink():
                    continue
                count, total = count + 1, total + path.stat().st_size
                if count > most:
                    return count, total
        return count, total

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as fh:
                fh.write(data)
            return True
        except FileExistsError:
            return False

    def exists_prefix(self, prefix: str) -> bool:
        try:
            return self.usage(prefix, 0)[0] > 0
        except Refused:
            return False

    def read(self, key: str, limit: int | None = None) -> bytes:
        with open(self._path(key), "rb") as fh:
            return fh.read(limit if limit else -1)

    def head(self, key: str, limit: int) -> tuple[bytes, int] | None:
        size = self.size(key)
        return None if size is None else (self.read(key, min(limit, size)) if size else b"", size)

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
        found = []
        for folder, _, files in os.walk(base):  # links to folders are not followed (a loop ends nothing)
            found += [str((Path(folder) / f).relative_to(self.root)) for f in files if not (Path(folder) / f).is_symlink()]
        return sorted(found)

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
