"""Where a job's compute runs: in a local process (the embedded default) or on Bacalhau.

An executor runs every stage of a job to the end and leaves the results under the job's output
prefix (`<output>/export/...`). It reports attempts through `Progress` so the daemon can record
them, and raises `JobFailed` (the job's own fault) or `CannotRunHere` (try another backend).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from codsplat.pipeline.errors import EXIT_CODES

from .bacalhau import BacalhauClient
from .blobs import Blobs, FolderBlobs
from .faults import crashpoint
from .job import JobDocument
from .runner import Attempt, BacalhauRunner, Cancelled, CannotRunHere, Hooks, JobFailed
from .translate import Deployment


@dataclass
class Progress:
    attempt_started: Callable[[dict], None] = lambda attempt: None  # before anything is sent
    attempt_updated: Callable[[dict], None] = lambda attempt: None
    stage: Callable[[str], None] = lambda stage: None
    cancelled: Callable[[], bool] = lambda: False


class Executor(Protocol):
    name: str

    def run(self, job: JobDocument, output_key: str, progress: Progress) -> None: ...


def _stop_orphan(pid_file: Path, work: Path) -> None:
    """A run left behind by a daemon that died (kill -9 spares children) is stopped before the job
    runs again, so two runs never share a work folder. Only our own process is touched: its command
    line must name this work folder."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return
    if str(work).encode() in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(proc: subprocess.Popen, cancelled: Callable[[], bool], poll: float = 1.0) -> str | None:
    """The run's stdout once it ends, or None when the job was cancelled first (the run is stopped:
    SIGTERM to its process group, SIGKILL if it has not gone after 10 s)."""
    while True:
        try:
            return proc.communicate(timeout=poll)[0]
        except subprocess.TimeoutExpired:
            if cancelled():
                break
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return None


@dataclass
class LocalExecutor:
    """Runs `codsplat run` as a child process. Its work folder persists per job, so a job picked up
    again after a crash resumes at the first unfinished stage instead of starting over."""

    blobs: Blobs
    cache: Path
    name: str = "local"
    extra_env: dict[str, str] = field(default_factory=dict)

    def run(self, job: JobDocument, output_key: str, progress: Progress) -> None:
        embedded = isinstance(self.blobs, FolderBlobs)
        work = Path(self.blobs.uri(output_key)) if embedded else self.cache / job.id
        work.mkdir(parents=True, exist_ok=True)
        media = self.blobs.download(job.input_uri.key, self.cache / job.id / "media")
        settings = work / ".settings.json"
        settings.write_text(json.dumps(job.pipeline_settings()))
        attempt = {"backend": self.name, "stage": "all", "number": len(list(work.glob(".attempt-*"))) + 1, "state": "Running"}
        (work / f".attempt-{attempt['number']}").touch()
        progress.attempt_started(attempt)
        crashpoint("after-attempt-record")
        progress.stage("all")
        pid_file = work / ".run.pid"
        _stop_orphan(pid_file, work)
        log = work / "logs" / f"attempt-{attempt['number']}.log"  # the pipeline's own output, for the console
        log.parent.mkdir(exist_ok=True)
        with open(log, "w+") as err:
            # start_new_session, not preexec_fn: Python code between fork and exec can deadlock in a
            # threaded process, and the daemon is one
            proc = subprocess.Popen(
                [sys.executable, "-m", "codsplat.pipeline.cli", "run", str(media), "--config", str(settings),
                 "--out", str(work), "--json"],
                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                env={**os.environ, **self.extra_env})
            pid_file.write_text(str(proc.pid))
            crashpoint("during-compute", delay=3.0)  # the crash tests: die with the child half way
            crashpoint("late-in-compute", delay=12.0)
            stdout = _wait(proc, progress.cancelled)
            pid_file.unlink(missing_ok=True)
            if stdout is None:
                attempt["state"] = "Cancelled"
                progress.attempt_updated(attempt)
                raise Cancelled("all")
            err.seek(0)
            stderr = err.read()
        if proc.returncode != 0:
            attempt.update(state="Failed", exit_code=proc.returncode)
            progress.attempt_updated(attempt)
            try:
                body = json.loads(stdout)
                message, stage = body.get("message", ""), body.get("stage") or "pipeline"
            except json.JSONDecodeError:
                message, stage = (stderr.strip().splitlines() or ["the pipeline crashed"])[-1], "pipeline"
            if proc.returncode in (2, 3, 4):
                raise JobFailed(message, stage, proc.returncode)
            raise CannotRunHere(f"local run ended with exit code {proc.returncode} "
                                f"({EXIT_CODES.get(proc.returncode, 'killed')}): {message}", stage)
        attempt["state"] = "Completed"
        progress.attempt_updated(attempt)
        if not embedded:
            self.blobs.upload_dir(work / "export", output_key + "export/")


@dataclass
class BacalhauExecutor:
    client: BacalhauClient
    deployment: Deployment
    poll_interval: float = 5.0
    name: str = "bacalhau"

    def run(self, job: JobDocument, output_key: str, progress: Progress) -> None:
        def as_dict(a: Attempt) -> dict:
            return {"backend": self.name, "stage": a.stage, "number": a.number, "name": a.name,
                    "bacalhau_id": a.bacalhau_id, "state": a.state or "Submitting", "error": a.error}

        def on_progress(a: Attempt, info) -> None:
            progress.stage(a.stage)
            if progress.cancelled():
                self.client.stop(a.bacalhau_id, "cancelled by the user")

        hooks = Hooks(before_submit=lambda a: progress.attempt_started(as_dict(a)),
                      submitted=lambda a: progress.attempt_updated(as_dict(a)),
                      progress=on_progress)
        runner = BacalhauRunner(self.client, self.deployment, self.poll_interval)
        result = runner.run(job, hooks)
        for attempt in result.attempts:
            progress.attempt_updated(as_dict(attempt))
