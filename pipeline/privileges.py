"""Run the worker as an unprivileged user inside the image.

The image starts as root on purpose: Bacalhau's docker executor bind-mounts each result folder from a
directory it creates on the node as the Bacalhau user (root on our nodes) with mode 0755
(pkg/executor/docker/executor.go makeContainerMounts), and sets no container user; SageMaker mounts
/opt/ml/model, /opt/ml/output and a synced /opt/ml/checkpoints root-owned too. An image whose USER were
unprivileged could not write its results. Inputs are no better: each S3 input source is downloaded
into a folder made with `os.MkdirTemp`, mode 0700 and owned by root (pkg/storage/s3/storage.go; the
files and folders inside are 0644 and 0755), and bind-mounted writable. So the entrypoint, while still
root, hands the folders it writes to the user named by CODSPLAT_RUN_AS (the image sets `codsplat`, uid
1000), lets that user read and enter the folders it reads (it reads nothing in them as root), then
drops root for good (groups, gid, uid). Outside the image (no CODSPLAT_RUN_AS, or not root) nothing
changes.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import CannotRun

RUN_AS_ENV = "CODSPLAT_RUN_AS"


def drop_privileges(writable: Iterable[Path], readable: Iterable[Path] = ()) -> None:
    name = os.environ.get(RUN_AS_ENV)
    if not name or os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise CannotRun(f"{RUN_AS_ENV}={name!r} names no user in this image; set it to an existing user "
                        "(the image's is 'codsplat') or unset it to run as root.") from None
    for folder in writable:
        if folder.exists() and not folder.is_symlink():
            _give(folder, user.pw_uid, user.pw_gid)
    for folder in readable:
        if folder.exists() and not folder.is_symlink():
            _let_read(folder)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    os.environ["HOME"] = user.pw_dir


def _give(folder: Path, uid: int, gid: int) -> None:
    """The folder and what it holds already (a SageMaker checkpoint synced in as root). Links are
    changed themselves, never followed: a planted link must not hand over anything outside."""
    os.lchown(folder, uid, gid)
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            os.lchown(os.path.join(parent, name), uid, gid)


def _let_read(top: Path) -> None:
    """Others may read every file and enter every folder under `top` (a mount whose top folder is
    0700 root). Links are left alone, neither followed nor changed. A mount that cannot be changed
    (read-only) is fine if the user can already read it, else the run cannot go on."""
    entries = [(top, True)]
    for parent, dirs, files in os.walk(top):
        entries += [(Path(parent, d), True) for d in dirs] + [(Path(parent, f), False) for f in files]
    for path, is_dir in entries:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            continue
        wanted = stat.S_IROTH | (stat.S_IXOTH if is_dir else 0)
        if info.st_mode & wanted != wanted:
            try:
                os.chmod(path, stat.S_IMODE(info.st_mode) | wanted)
            except OSError as exc:
                raise CannotRun(f"Input {path} is not readable by the user {os.environ[RUN_AS_ENV]!r} and cannot be "
                                f"made so ({exc.strerror}); mount it readable by others (mode 0755 folders, 0644 "
                                f"files), or unset {RUN_AS_ENV} to run as root.") from None
