"""A stand-in for `codsplat run` that leaves in its work folder what a real run leaves, in
milliseconds: stage folders with manifests, runs.jsonl, progress.json, export/metrics.json and the
splat files. The daemon's crash tests run their bookkeeping points on it (the points inside compute
run the real pipeline). Like the real run it skips a stage whose manifest is there, and media whose
name starts with `one` fail as a 1-frame video does (exit 2).

    python tests/stub_worker.py run MEDIA --config SETTINGS --out WORK --json
"""

import json
import sys
import time
from pathlib import Path

STAGES = ("frames", "sfm", "train", "export")


def progress(work: Path, stage: str, fraction: float) -> None:
    tmp = work / "progress.tmp"  # whole or not at all, as the pipeline writes it
    tmp.write_text(json.dumps({"stage": stage, "fraction": fraction}))
    tmp.replace(work / "progress.json")


def main() -> int:
    args = sys.argv[1:]
    media, work = Path(args[1]), Path(args[args.index("--out") + 1])
    work.mkdir(parents=True, exist_ok=True)
    if media.name.startswith("one"):
        print(json.dumps({"ok": False, "error": "InputError", "stage": "frames", "exit_code": 2, "hint": None,
                          "message": f"Input {media} has only 1 frame; a reconstruction needs the camera to move through many views."}))
        return 2
    for index, stage in enumerate(STAGES):
        folder = work / stage
        if (folder / "manifest.json").is_file():
            continue
        progress(work, stage, index / 4)
        folder.mkdir(parents=True, exist_ok=True)
        if stage == "export":
            for fmt in ("ply", "splat", "spz"):
                (folder / f"splat.{fmt}").write_bytes(b"\0" * 64)
            (folder / "report.html").write_text("<html></html>")
            (folder / "cameras.json").write_text('{"views": []}')
            (folder / "metrics.json").write_text(json.dumps({
                "psnr": 25.0, "ssim": 0.8, "gaussians": 1000, "train": {"device": "cpu"},
                "stages": {s: {"seconds": 0.01} for s in STAGES},
                "files": {fmt: {"file": f"splat.{fmt}", "bytes": 64} for fmt in ("ply", "splat", "spz")}}))
        (folder / "manifest.json").write_text(json.dumps({"stage": stage, "seconds": 0.01}))
        with open(work / "runs.jsonl", "a") as runs:
            runs.write(json.dumps({"stage": stage, "finished_at": time.time()}) + "\n")
    progress(work, "export", 1.0)
    print(json.dumps({"ok": True, "work": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
