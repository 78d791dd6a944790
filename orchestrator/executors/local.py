"""Local processes: `codsplat run` as a child process (the embedded default).

The work folder persists per job (embedded: the job's output folder itself), so an attempt after a
crash resumes at the first unfinished stage instead of starting over. A run left behind by a daemon
that died (kill -9 spares children) is stopped before the job runs again, so two runs never share
a work folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from codsplat.pipeline.contract import METRICS, parse_outcome, run_summary

from ..blobs import Blobs, Refused
from ..compute import Attempt, CannotRun, Ending, Result
from ..faults import crashpoint
from ..job import JobDocument
from ..settings import Policy

log = logging.getLogger("codsplat.local")
STOP_GRACE_SECONDS = 10.0


def _stop_orphan(pid_file: Path, work: Path) -> None:
    """Stop a run a dead daemon left behind. Only our own process is touched: its command line must
    name this work folder."""
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


@dataclass
class LocalExecutor:
    blobs: Blobs
    policy: Policy
    cache: Path  # work folders of jobs whose output is not a local folder
    worker: list[str] = field(default_factory=lambda: [sys.executable, "-m", "codsplat.pipeline.cli"])
    extra_env: dict[str, str] = field(default_factory=dict)
    name: str = "local"
    finishes_record: bool = False

    def __post_init__(self):
        self._runs: dict[str, subprocess.Popen] = {}  # attempt name → its process
        self._stopping: set[str] = set()
        self._lock = threading.Lock()

    def active(self) -> int:
        with self._lock:
            return len(self._runs)

    def _work(self, job: JobDocument) -> Path:
        return self.blobs.local_path(job.output_uri(self.policy).key) or self.cache / job.id

    def preflight(self, job: JobDocument) -> None:
        pass

    def submit(self, job: JobDocument, attempt: Attempt, upstream: dict[str, str]) -> None:
        try:
            self._start(job, attempt)
        except OSError as exc:  # a folder in the way, a name the disk refuses, no process to start: the job ends
            where = f" ({exc.filename})" if exc.filename else ""
            raise CannotRun(f"its run could not start: {exc.strerror or exc}{where}") from None
        except Refused as exc:  # its folder became a link out of the embedded folder after it was checked
            raise CannotRun(f"its run could not start: {exc}") from None

    def _start(self, job: JobDocument, attempt: Attempt) -> None:
        work = self._work(job)
        work.mkdir(parents=True, exist_ok=True)
        media = self.blobs.local_path(job.input_uri.key) or self.blobs.download(job.input_uri.key, self.cache / job.id / "media")
        settings = work / ".settings.json"
        settings.write_text(job.worker_settings())
        crashpoint("after-attempt-record")
        pid_file = work / ".run.pid"
        _stop_orphan(pid_file, work)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        # the pipeline's stderr is the run's log (the console shows it); stdout its --json outcome
        with open(logs / f"attempt-{attempt.number}.log", "w") as err, open(logs / f"attempt-{attempt.number}.out", "w") as out:
            # start_new_session, not preexec_fn: Python code between fork and exec can deadlock in a
            # threaded process, and the daemon is one
            proc = subprocess.Popen(
                [*self.worker, "run", str(media), "--config", str(settings), "--out", str(work), "--json"],
                stdout=out, stderr=err, start_new_session=True, env={**os.environ, **self.extra_env})
        pid_file.write_text(str(proc.pid))
        attempt.remote_id, attempt.published = str(proc.pid), str(work)
        with self._lock:
            self._runs[attempt.name] = proc
        # the crash tests: die while the run is inside a stage (the run writes progress.json as it goes)
        crashpoint("during-compute", until=lambda: _at_stage(work, "sfm"))
        crashpoint("late-in-compute", until=lambda: _at_stage(work, "train"))

    def find(self, job: JobDocument, attempt: Attempt) -> bool:
        return False  # a run of a dead daemon is stopped at the next submit; the stages it finished are kept

    def watch(self, job: JobDocument, attempt: Attempt, done: Callable[[Result], None], resumed: bool = False) -> None:
        with self._lock:
            proc = self._runs[attempt.name]

        def wait() -> None:
            code = proc.wait()
            with self._lock:
                self._runs.pop(attempt.name, None)
                stopped = attempt.name in self._stopping
                self._stopping.discard(attempt.name)
            if stopped:
                return done(Result(Ending.STOPPED))
            try:
                result = self._result(attempt, code)
            except Exception as exc:  # noqa: BLE001 - the run ended, whatever became of its folder: it is told
                result = Result.of_exit(code or 1, None, f"the run's folder could not be read after it ended ({exc})"[:500])
            done(result)

        threading.Thread(target=wait, name=f"local-{attempt.name}", daemon=True).start()

    @staticmethod
    def _result(attempt: Attempt, code: int) -> Result:
        work = Path(attempt.published)
        (work / ".run.pid").unlink(missing_ok=True)
        stdout = (work / "logs" / f"attempt-{attempt.number}.out").read_text(errors="replace")
        outcome = run_outcome(work / METRICS) if code == 0 else parse_outcome(stdout)
        tail = (work / "logs" / f"attempt-{attempt.number}.log").read_text(errors="replace").strip().splitlines()
        return Result.of_exit(code, outcome, tail[-1] if tail else "")

    def stop(self, attempt: Attempt, reason: str) -> None:
        """SIGTERM to the run's process group, SIGKILL if it has not gone after 10 s."""
        with self._lock:
            proc = self._runs.get(attempt.name)
            if proc is None:
                return
            self._stopping.add(attempt.name)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        threading.Timer(STOP_GRACE_SECONDS, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL)).start()


def _at_stage(work: Path, stage: str) -> bool:
    try:
        return json.loads((work / "progress.json").read_text())["stage"] == stage
    except (OSError, ValueError, KeyError):
        return False


def run_outcome(metrics: Path) -> dict | None:
    """A finished local run's summary, from its export/metrics.json (what a Bacalhau worker prints)."""
    try:
        data = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return None  # no export: the lifecycle says the outputs are missing
    return run_summary(data, (data.get("train") or {}).get("device"))
