"""The contract between the worker (`codsplat run`, the container) and the control plane.

Everything both sides must agree on lives here, and only here: what each exit code means and what
the user should try next, which media a job may name, the presets, how the stages group into
jobs, the files a run leaves in its work folder, and the one way settings travel to the worker
(a Bacalhau argument, a SageMaker hyperparameter and a local run's file carry the same JSON text).

This module imports nothing heavy: the control plane reads it without loading torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import (EXIT_CANNOT_RUN, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_QUALITY, EXIT_RECONSTRUCTION,
                     EXIT_USAGE, InputError)

# ------------------------------------------------------------------ exit codes


@dataclass(frozen=True)
class ExitCode:
    code: int
    kind: str  # the advice key, and the `kind` of a record's error
    meaning: str
    advice: str  # what the user should try next
    user_error: bool = False  # the job's own fault: never retried, never handed to another backend


EXIT_CODES: dict[int, ExitCode] = {c.code: c for c in (
    ExitCode(EXIT_OK, "ok", "success", ""),
    ExitCode(EXIT_USAGE, "input", "bad command line, config or input file",
             "Check that the upload is a video (.mp4/.mov/.mkv/.webm/.m4v/.avi), a .zip of photos or a folder of "
             "photos, and that the job document is valid (`codsplat validate job.json`).", user_error=True),
    ExitCode(EXIT_RECONSTRUCTION, "reconstruction", "the capture could not be reconstructed",
             "The frames could not be placed in 3D. Capture again moving slowly around the subject, with each view "
             "overlapping the last, good light and no motion blur.", user_error=True),
    ExitCode(EXIT_QUALITY, "quality", "the trained splat failed the quality gate; nothing was exported",
             "The result was too poor to send. Train longer (train.steps), keep more frames (frames.max), or capture "
             "more views.", user_error=True),
    ExitCode(EXIT_INTERNAL, "internal", "internal error or environment problem",
             "Something went wrong on our side; the operators have the logs. Uploading the job again may help."),
    ExitCode(EXIT_CANNOT_RUN, "compute", "no backend could run the job (no matching GPU node, queue timeout, repeated failures, "
             "unreachable)", "No compute could run the job. It is safe to upload the job document again later."),
    ExitCode(EXIT_INTERRUPTED, "interrupted", "interrupted", "The run was interrupted; run it again to resume."),
)}
ADVICE = {c.kind: c.advice for c in EXIT_CODES.values() if c.advice}


def exit_code(code: int | None) -> ExitCode:
    """What a worker's exit code means; anything undocumented (a signal, a crash) is internal."""
    return EXIT_CODES.get(code) if code in EXIT_CODES else EXIT_CODES[EXIT_INTERNAL]


# ------------------------------------------------------------------ media, presets, stages

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".m4v", ".avi")
ARCHIVE_SUFFIXES = (".zip",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MEDIA_SUFFIXES = VIDEO_SUFFIXES + ARCHIVE_SUFFIXES + IMAGE_SUFFIXES

PRESETS = ("tiny", "fast", "quality")

STAGES = ("frames", "sfm", "train", "export")
# The groups that run as one job each: frames + SfM on a CPU node, training on a GPU node, export on a
# CPU node; or all four on one GPU node.
GROUPS = {"preprocess": ("frames", "sfm"), "train": ("train",), "export": ("export",), "all": STAGES}
SPLIT = ("preprocess", "train", "export")

# ------------------------------------------------------------------ the work folder

MANIFEST = "manifest.json"  # in each stage folder: fingerprint, statistics, time, memory
PROGRESS = "progress.json"  # where a run is now (the console shows it)
RUN_LOG = "runs.jsonl"  # one line per stage execution that completed
ERROR_FILE = "error.json"  # a failed run's stage, message and exit code
OUTCOME_FILE = "outcome.json"  # SageMaker mode: the outcome line, beside the stage folders (the fallback reads it)
METRICS = "export/metrics.json"

# ------------------------------------------------------------------ settings hand-off

SETTING_SECTIONS = ("preset", "frames", "sfm", "train", "export")
MAX_SETTINGS_BYTES = 64 * 1024  # a job's pipeline settings are a few hundred bytes


def encode_settings(sections: dict[str, Any]) -> str:
    """The pipeline sections of a job as the JSON text every transport carries."""
    return json.dumps({k: v for k, v in sections.items() if k in SETTING_SECTIONS}, separators=(",", ":"))


def decode_settings(text: str, origin: str) -> dict[str, Any]:
    """The JSON text back to sections, or an InputError naming where the text came from."""
    if len(text.encode()) > MAX_SETTINGS_BYTES:
        raise InputError(f"{origin} is {len(text.encode()):,} bytes; settings are at most {MAX_SETTINGS_BYTES:,}.")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{origin} is not valid JSON: {getattr(exc, 'msg', 'nested too deeply')}.") from None
    if not isinstance(data, dict):
        raise InputError(f"{origin} must be a JSON object with keys among {', '.join(SETTING_SECTIONS)}.")
    return data


# ------------------------------------------------------------------ the run's outcome

MAX_OUTCOME_CHARS = 2000  # Bacalhau keeps the first 2 KiB of stdout in an execution's RunOutput
MAX_MESSAGE_CHARS = 1200


def run_summary(metrics: dict[str, Any], device: str | None) -> dict[str, Any]:
    """What the control plane records of a finished run, from its export/metrics.json."""
    stages = {name: round(s.get("seconds") or 0.0, 1) for name, s in (metrics.get("stages") or {}).items()}
    return {"ok": True, "psnr": metrics.get("psnr"), "ssim": metrics.get("ssim"), "gaussians": metrics.get("gaussians"),
            "device": device, "stages": stages, "files": sorted(f["file"] for f in (metrics.get("files") or {}).values())}


def outcome_line(outcome: dict[str, Any]) -> str:
    """The worker's last stdout line: a run summary, or `{"ok": false, ...}` with the error. It is
    always whole JSON within Bacalhau's 2 KiB: the message is cut first, then the list of files, and
    the text itself never (a cut line would not parse, and the outcome would be lost)."""
    message = outcome.get("message")
    limit = MAX_MESSAGE_CHARS
    while True:
        if isinstance(message, str):
            outcome = {**outcome, "message": message[:limit]}
        line = json.dumps(outcome, separators=(",", ":"))
        if len(line) <= MAX_OUTCOME_CHARS:
            return line
        if "files" in outcome:
            outcome = {k: v for k, v in outcome.items() if k != "files"}
        elif isinstance(message, str) and limit > 0:
            limit //= 2
        else:
            return json.dumps({k: outcome[k] for k in ("ok", "exit_code", "stage") if k in outcome}, separators=(",", ":"))


def parse_outcome(stdout: str) -> dict[str, Any] | None:
    """The outcome line in a worker's stdout (its last JSON object line), or None."""
    for line in reversed(stdout.strip().splitlines()[-50:]):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(value, dict) and "ok" in value:
                return value
    return None


# ------------------------------------------------------------------ SageMaker's failure reason

MAX_FAILURE_CHARS = 1024  # SageMaker keeps the first 1 KiB of /opt/ml/output/failure as FailureReason
_NEXT = " What to try next: "
_FAILURE = re.compile(r"^(?:AlgorithmError:\s*)?(?P<message>.*?)(?:" + _NEXT.strip() + r" (?P<advice>.*?))?\s*\[exit (?P<code>\d+)\]\s*$", re.S)


def failure_text(message: str, code: int) -> str:
    """What the worker writes to /opt/ml/output/failure: its sentence, the advice its exit code
    carries, and the code, within 1 KiB (the message is what gets cut)."""
    tail = (_NEXT + exit_code(code).advice if exit_code(code).advice else "") + f" [exit {code}]"
    return message[:MAX_FAILURE_CHARS - len(tail)] + tail


def parse_failure(reason: str) -> tuple[str, str | None, int | None]:
    """A FailureReason back into the worker's sentence, advice and exit code; SageMaker's own
    reasons (no `[exit N]`) come back whole, with no advice or code."""
    found = _FAILURE.match(reason or "")
    if not found:
        return reason, None, None
    return found["message"].strip(), found["advice"], int(found["code"])
