"""Run a job on Bacalhau: submit each stage, follow it to the end, retry, or decide it cannot run here.

Outcomes of a stage attempt, and what happens next:
- Completed: the stage published its folder; the next stage reads that prefix.
- Failed with the container's user-error exit code (2 bad input, 3 not reconstructable, 4 quality
  gate): the job fails with the container's own sentence; retrying or another backend would not help.
- Failed otherwise (a crash, a lost node, a timeout): a new attempt with a new Name, up to
  `compute.retries`; then `CannotRunHere`.
- Queued until QueueTimeout, or no connected node with the GPUs the job needs: `CannotRunHere`.
`CannotRunHere` is what hands a job over to the SageMaker fallback.

Each attempt is announced to `hooks.before_submit` before it is sent and `hooks.submitted` after, so
a caller can record it; `find_attempt` finds an attempt again by its labels after a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .bacalhau import BacalhauClient, Job, JobState, Unavailable
from .job import JobDocument
from .translate import Deployment, attempt_name, stages_of, translate

USER_ERROR_EXIT_CODES = {2: "bad input", 3: "not reconstructable", 4: "quality gate"}


class CannotRunHere(Exception):
    """Bacalhau cannot run this job (no matching GPU node, queue timeout, repeated failures, down)."""

    def __init__(self, reason: str, stage: str | None = None):
        super().__init__(reason)
        self.reason, self.stage = reason, stage


class JobFailed(Exception):
    """The job itself failed (the input or the settings); the message is for the user."""

    def __init__(self, message: str, stage: str, exit_code: int | None = None):
        super().__init__(message)
        self.message, self.stage, self.exit_code = message, stage, exit_code


class Cancelled(Exception):
    """The job was stopped because its user cancelled it (not a failure)."""

    def __init__(self, stage: str):
        super().__init__(f"cancelled during {stage}")
        self.stage = stage


@dataclass
class Attempt:
    stage: str
    number: int
    name: str
    bacalhau_id: str | None = None
    state: str | None = None
    published_key: str | None = None
    error: str | None = None


@dataclass
class Hooks:
    before_submit: Callable[[Attempt], None] = lambda attempt: None
    submitted: Callable[[Attempt], None] = lambda attempt: None
    progress: Callable[[Attempt, Job], None] = lambda attempt, job: None


@dataclass
class RunResult:
    attempts: list[Attempt] = field(default_factory=list)
    output_key: str = ""


def user_error(job: Job) -> tuple[int, str] | None:
    """The container's exit code and its 'error: ...' sentence, if it ended on a user error."""
    for execution in reversed(job.executions):
        if execution.exit_code in USER_ERROR_EXIT_CODES:
            lines = [ln for ln in execution.stderr.splitlines() if ln.startswith("error: ")]
            return execution.exit_code, (lines[-1][7:] if lines else execution.failure)
    return None


class BacalhauRunner:
    def __init__(self, client: BacalhauClient, deployment: Deployment, poll_interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.client, self.deployment = client, deployment
        self.poll_interval, self.clock, self.sleep = poll_interval, clock, sleep

    def preflight(self, job: JobDocument) -> None:
        """Fail fast when no connected node could ever take the GPU stage."""
        try:
            nodes = self.client.nodes()
        except Unavailable as exc:
            raise CannotRunHere(f"Bacalhau is unreachable: {exc.message}") from None
        need = job.compute.gpus
        if need == 0:
            return
        fit = [n for n in nodes if n.connected and n.gpus_total >= need
               and (job.compute.gpu_model is None or job.compute.gpu_model in n.gpu_models)]
        if not fit:
            model = f" {job.compute.gpu_model}" if job.compute.gpu_model else ""
            raise CannotRunHere(f"no Bacalhau node has {need}{model} GPU{'s' if need > 1 else ''}", stage="train")

    def find_attempt(self, job: JobDocument, name: str) -> Job | None:
        """An attempt submitted before a crash, found by our labels and its unique Name."""
        for found in self.client.list_jobs(labels={"codsplat-job": job.id}):
            if found.name == name:
                return found
        return None

    def follow(self, bacalhau_id: str, attempt: Attempt, hooks: Hooks) -> Job:
        while True:
            try:
                info = self.client.describe(bacalhau_id)
            except Unavailable:
                self.sleep(self.poll_interval)  # a blip: keep following; the job runs on without us
                continue
            attempt.state = info.state.value
            hooks.progress(attempt, info)
            if info.state.terminal:
                return info
            self.sleep(self.poll_interval)

    def run_stage(self, job: JobDocument, stage: str, upstream: dict[str, str], hooks: Hooks,
                  first_attempt: int = 1) -> Attempt:
        last_error = ""
        for number in range(first_attempt, first_attempt + job.compute.retries + 1):
            attempt = Attempt(stage, number, attempt_name(job.id, stage, number))
            spec = translate(job, self.deployment, stage, number, upstream)
            existing = self.find_attempt(job, attempt.name)  # sent before a crash: follow it, never resend
            if existing is not None:
                attempt.bacalhau_id = existing.id
            else:
                hooks.before_submit(attempt)
                try:
                    attempt.bacalhau_id = self.client.submit(spec).job_id
                except Unavailable as exc:
                    raise CannotRunHere(f"Bacalhau is unreachable: {exc.message}", stage) from None
            hooks.submitted(attempt)
            info = self.follow(attempt.bacalhau_id, attempt, hooks)
            if info.state == JobState.COMPLETED:
                attempt.published_key = spec["Tasks"][0]["Publisher"]["Params"]["Key"]
                return attempt
            if info.state == JobState.STOPPED:
                raise Cancelled(stage)
            if not info.executions:  # never got a node: queue timeout or no match
                raise CannotRunHere(info.message or "no node accepted the job", stage)
            failed = user_error(info)
            if failed:
                raise JobFailed(failed[1], stage, failed[0])
            last_error = info.executions[-1].failure or info.message
            attempt.error = last_error
        raise CannotRunHere(f"{stage} failed {job.compute.retries + 1} times; last error: {last_error}", stage)

    def run(self, job: JobDocument, hooks: Hooks | None = None) -> RunResult:
        hooks = hooks or Hooks()
        self.preflight(job)
        result = RunResult(output_key=job.output_uri(self.deployment.policy).key)
        upstream: dict[str, str] = {}
        for stage in stages_of(job):
            attempt = self.run_stage(job, stage, upstream, hooks)
            result.attempts.append(attempt)
            upstream[stage] = attempt.published_key
        return result
