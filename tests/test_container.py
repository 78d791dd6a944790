"""The worker image, checked without a Docker engine: hadolint on the Dockerfile, and the build's
install step replayed. Its COPY lines are copied into a folder as Docker would (the context filtered
by .dockerignore) and the project there is pip-installed without dependencies; it must install every
package pyproject.toml declares, with its data files and both commands."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "container" / "Dockerfile"
HADOLINT = ROOT / ".venv-checks" / "bin" / "hadolint"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def ignored(patterns: list[str]):
    """.dockerignore as Docker reads it: each pattern from the context root, `**` any number of
    folders, `*` and `?` within one name; a matched folder excludes all it holds."""
    assert not any(p.startswith("!") for p in patterns), "exceptions are not replayed here"

    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return re.compile(f"^{out}(?:/.*)?$")

    compiled = [regex(p) for p in patterns]
    return lambda relative: any(r.match(relative) for r in compiled)


def replay_copies(stage: str, stage_end: str | None, fs: Path) -> None:
    """Every COPY into the build stage `stage` up to its RUN line containing `stage_end` (None: the
    whole stage), into `fs` as the image root: from the context, or, for `COPY --from=<a stage of
    ours> /src /src`, that stage's own COPYs."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    excluded = ignored(rules)
    current = None
    for name, args in instructions(DOCKERFILE.read_text()):
        if name == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else None
        if current != stage:
            continue
        if name == "RUN" and stage_end is not None and stage_end in args:
            return
        if name == "COPY" and args.startswith("--from="):
            source_stage, *paths = args.removeprefix("--from=").split()
            if paths == ["/src", "/src"]:  # one of the source stages; other copies between stages are not source
                replay_copies(source_stage, None, fs)
            continue
        if name != "COPY":
            continue
        *sources, dest = shlex.split(args)
        for source in sources:
            assert not excluded(source), f"COPY {source}: .dockerignore excludes it"
            origin, target = ROOT / source, fs / dest.lstrip("/")
            if origin.is_dir():
                target = target if not dest.endswith("/") else target / origin.name
                for path in sorted(origin.rglob("*")):
                    relative = path.relative_to(ROOT).as_posix()
                    if path.is_file() and not excluded(relative):
                        (target / path.relative_to(origin)).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, target / path.relative_to(origin))
            else:
                assert origin.is_file(), f"COPY {source}: not in the build context"
                target = target / origin.name if dest.endswith("/") else target
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    if stage_end is not None:
        raise AssertionError(f"no RUN line with {stage_end!r} in stage {stage}")


def test_hadolint_finds_nothing():
    assert HADOLINT.exists(), "install aws/requirements-checks.txt into .venv-checks (README)"
    proc = subprocess.run([HADOLINT, "--no-color", DOCKERFILE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", ["cpu", "build"])
def test_the_build_context_holds_what_the_install_step_needs(tmp_path, stage):
    """Both variants' install (the CPU image and the CUDA image's build stage) from what they copy."""
    fs, site = tmp_path / "fs", tmp_path / "site"
    replay_copies(stage, "install.sh project", fs)
    assert (fs / "src" / "container" / "install.sh").is_file() and (fs / "src" / "container" / "check_image.py").is_file()
    assert stage != "build" or (fs / "tmp" / "build-requirements.txt").is_file()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", site, fs / "src"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = {Path("codsplat", p.relative_to(ROOT)) for root in ("pipeline", "orchestrator", "jobspecs", "aws")
               for p in (ROOT / root).rglob("*.py")}
    missing = sorted(str(p) for p in sources if not (site / p).is_file())
    assert not missing, f"not installed: {missing}"  # every module, found without a hand-kept list
    for package, globs in project["tool"]["setuptools"]["package-data"].items():
        for pattern in globs:
            if "dist" not in pattern:  # the console's bundle is built by npm, not shipped in the worker image
                assert list((site / package.replace(".", "/")).glob(pattern)), f"{package}: {pattern}"
    assert {"codsplat", "codsplat-entrypoint"} <= {p.name for p in (site / "bin").iterdir()}
    # the installed copy, not this checkout, answers: the worker's entrypoint and the control plane
    probe = ("import codsplat.pipeline.entrypoint as e, codsplat.orchestrator.cli, codsplat.jobspecs; "
             "print(e.__file__)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0 and proc.stdout.strip().startswith(str(site)), proc.stderr[-2000:]
