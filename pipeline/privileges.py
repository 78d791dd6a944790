"""Run the worker as an unprivileged user inside the image.

The image starts as root on purpose: Bacalhau's docker executor bind-mounts each result folder from a
directory it creates on the node as the Bacalhau user (root on our nodes) with mode 0755
(pkg/executor/docker/executor.go makeContainerMounts), and sets no container user; SageMaker mounts
/opt/ml/model, /opt/ml/output and a synced /opt/ml/checkpoints root-owned too. An image whose USER were
unprivileged could not write its results. So the entrypoint, while still root, hands the folders it
writes to the user named by CODSPLAT_RUN_AS (the image sets `codsplat`, uid 1000), then drops root
for good (groups, gid, uid) before reading any input. Outside the image (no CODSPLAT_RUN_AS, or not
root) nothing changes.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path

from .errors import CannotRun

RUN_AS_ENV = "CODSPLAT_RUN_AS"


def drop_privileges(writable: Iterable[Path]) -> None:
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
