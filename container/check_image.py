"""The worker image's own check, the last step of each variant's build: fail the build, not the first job.

    python check_image.py [--source /src] [--gpu]

- `--source`: every module of the project's source folders was installed (a wheel once lacked
  `orchestrator/executors`, and only an installed copy could notice).
- every installed module imports, but the CDK app (`codsplat.aws`, which needs the `[aws]` extra no
  worker installs); pycolmap imports (its wheels need X11 client libraries that a slim base lacks);
  both commands answer; the unprivileged user the entrypoint drops to exists.
- `--gpu`: gsplat's compiled kernels load. Importing `gsplat.cuda._backend` succeeds even when they
  did not (it sets `_C = None` and would compile on first use, with no nvcc in the image), so `_C`
  itself is checked.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pwd
import subprocess
import sys
from importlib.metadata import files
from pathlib import Path

ROOTS = ("pipeline", "orchestrator", "jobspecs", "aws")
NEEDS_EXTRA = "codsplat.aws"


def module_name(relative: Path) -> str:
    return ".".join(relative.with_suffix("").parts).removesuffix(".__init__")


def installed() -> set[str]:
    return {module_name(Path(str(f))) for f in files("codsplat") or [] if f.suffix == ".py" and f.parts[0] == "codsplat"}


def in_source(src: Path) -> set[str]:
    return {module_name(Path("codsplat", root) / p.relative_to(src / root))
            for root in ROOTS for p in (src / root).rglob("*.py")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, help="the project's source, to compare with what was installed")
    parser.add_argument("--gpu", action="store_true", help="also check gsplat's CUDA kernels")
    args = parser.parse_args()
    modules = installed()
    if args.source:
        missing = sorted(in_source(args.source) - modules)
        if missing:
            sys.exit(f"not installed from {args.source}: {', '.join(missing)}")
    for name in sorted(modules):
        if name != NEEDS_EXTRA and not name.startswith(NEEDS_EXTRA + "."):
            importlib.import_module(name)
    import pycolmap  # noqa: F401

    for command in (["codsplat", "--help"], ["codsplat-entrypoint", "--help"]):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    pwd.getpwnam(os.environ["CODSPLAT_RUN_AS"])
    if args.gpu:
        from gsplat.cuda._backend import _C

        if _C is None:
            sys.exit("gsplat's CUDA kernels did not load (gsplat.cuda._backend._C is None)")
    print(f"image check: {len(modules)} modules installed and imported{', CUDA kernels loaded' if args.gpu else ''}")


if __name__ == "__main__":
    main()
