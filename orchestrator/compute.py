"""Compute: a job's stages run as attempts on an executor, and one policy decides what follows.

A job runs as one stage (`all`, on a GPU node) or, with `compute.split_stages`, as three
(`preprocess` → `train` → `export`). Each stage runs as attempts: an `Attempt` is one submission
to an executor (a local process, a Bacalhau job, a SageMaker training job), and it ends in a
`Result`. `decide()` is the whole policy of what follows a result, shared by the daemon and
`codsplat submit`:

    succeeded          → the next stage, or the job is done
    user error (2/3/4) → the job fails with the worker's own sentence; never retried
    crashed            → a new attempt while the stage has used at most `compute.retries`
                         executions, else the job cannot run here
    cannot run         → (no node fits, a queue timeout, unreachable) the job cannot run here
    stopped            → cancelled

"Cannot run here" is what hands a job to the fallback backend (SageMaker). Attempts are counted by
executions, not submissions: one Bacalhau job may hold several executions, because Bacalhau's
orchestrator itself places a new execution after a failed one (up to twice per node).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable, Protocol

from codsplat.pipeline.contract import SPLIT, exit_code

from .job import JobDocument

SUBMITTING = "Submitting"  # recorded before anything is sent
NAME_LIMIT = 63  # SageMaker training job names (and a sane bound for Bacalhau's)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def stages_of(job: JobDocument) -> tuple[str, ...]:
    return SPLIT if job.compute.split_stages else ("all",)


def attempt_name(job_id: str, stage: str, number: int) -> str:
    """Unique per job, stage and attempt, at most 63 characters of [a-z0-9-], never ending in `-`:
    `codsplat-<id>-<stage>-a<n>`. A long id is cut and marked with a hash of the whole of it, so
    two ids that share their first 40 characters still name different jobs."""
    suffix = f"-{stage}-a{number}"
    name = f"codsplat-{job_id}"
    if len(name) + len(suffix) > NAME_LIMIT:
        mark = hashlib.sha256(job_id.encode()).hexdigest()[:8]
        name = name[: NAME_LIMIT - len(suffix) - len(mark) - 1].rstrip("-") + "-" + mark
    return name + suffix


@dataclass
class Attempt:
    """One submission of one stage to one backend, as the job record keeps it."""

    backend: str
    stage: str
    number: int
    name: str  # Bacalhau's job Name, SageMaker's training job name; unique per attempt
    remote_id: str | None = None  # Bacalhau job id, local process id, Step Functions execution ARN
    state: str = SUBMITTING  # Submitting, Running, then how it ended: Completed, Failed, Cancelled, Not placed
    ending: str | None = None  # `Ending` value once it ended
    executions: int = 0  # executions this attempt used (Bacalhau may place several in one job)
    exit_code: int | None = None
    error: str | None = None
    published: str | None = None  # where its stage folders were published: the next stage's input
    reason: str | None = None  # why this backend (a hand-over's cause)
    started_at: str = field(default_factory=now)
    updated_at: str | None = None

    @classmethod
    def new(cls, backend: str, job_id: str, stage: str, number: int, **extra: Any) -> "Attempt":
        """A SageMaker attempt runs every stage in one training job, named `...-sm-a<n>`."""
        return cls(backend, stage, number, attempt_name(job_id, "sm" if backend == "sagemaker" else stage, number), **extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Attempt":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Ending(str, Enum):
    SUCCEEDED = "succeeded"
    USER_ERROR = "user-error"  # the worker exited 2, 3 or 4: the job's own fault
    CRASHED = "crashed"  # any other exit, a lost node, an out-of-memory kill, a system error
    CANNOT_RUN = "cannot-run"  # never placed: no node fits, the queue timed out, Bacalhau unreachable
    STOPPED = "stopped"

    @property
    def state(self) -> str:
        """The attempt's state once it ended, in the words the backends use."""
        return {"succeeded": "Completed", "stopped": "Cancelled", "cannot-run": "Not placed"}.get(self.value, "Failed")


@dataclass(frozen=True)
class Result:
    """How an attempt ended, in the worker's own terms where it said any."""

    ending: Ending
    message: str = ""
    exit_code: int | None = None
    executions: int = 1
    stage: str | None = None  # the pipeline stage that failed (frames, sfm, train, export)
    summary: dict[str, Any] | None = None  # the run's summary when it exported (contract.run_summary)

    @classmethod
    def of_exit(cls, code: int | None, outcome: dict[str, Any] | None, fallback_message: str = "",
                executions: int = 1) -> "Result":
        """The result of a worker process that exited with `code` and printed `outcome`."""
        outcome = outcome or {}
        if code == 0:
            return cls(Ending.SUCCEEDED, exit_code=0, executions=executions, summary=outcome if outcome.get("ok") else None)
        meaning = exit_code(code)
        message = outcome.get("message") or fallback_message or f"the worker exited with code {code} ({meaning.meaning})"
        ending = Ending.USER_ERROR if meaning.user_error and code == meaning.code else Ending.CRASHED
        return cls(ending, message, code, executions, outcome.get("stage"))


class CannotRun(Exception):
    """This backend cannot run the job (no node fits, queue timeout, repeated crashes, unreachable)."""

    def __init__(self, reason: str, stage: str | None = None):
        super().__init__(reason)
        self.reason, self.stage = reason, stage


class Misconfigured(Exception):
    """The backend refused this deployment's credentials: the operator's to fix, never the job's fault,
    and never a reason to hand the job to another backend (a wrong key would send every job to
    SageMaker without a word)."""


class Executor(Protocol):
    """A backend. Bacalhau, SageMaker and local processes are executors alike."""

    name: str
    finishes_record: bool  # the backend itself records the job's end and sends its message (SageMaker)

    def preflight(self, job: JobDocument) -> None:
        """Raise CannotRun when the job could never run here (before anything is sent)."""

    def submit(self, job: JobDocument, attempt: Attempt, upstream: dict[str, str]) -> None:
        """Send the attempt; set its remote_id (and where it will publish). Raise CannotRun when the
        backend cannot be reached."""

    def find(self, job: JobDocument, attempt: Attempt) -> bool:
        """After a restart: was this attempt sent? If so, set its remote_id and return True."""

    def watch(self, job: JobDocument, attempt: Attempt, done: Callable[[Result], None], resumed: bool = False) -> None:
        """Call `done` once, from any thread, when the attempt ends. `resumed`: found again after a
        restart, so it may have ended meanwhile."""

    def stop(self, attempt: Attempt, reason: str) -> None:
        """Stop a running attempt; its watch then reports STOPPED."""

    def abandoned(self, attempt: Attempt) -> str | None:
        """Asked only of a backend that finishes the record: why the attempt ended without recording the
        job's end (its state machine failed), or None while it runs, once it recorded it, or if unsure."""


# ------------------------------------------------------------------ the policy


@dataclass(frozen=True)
class Submit:
    stage: str
    number: int


@dataclass(frozen=True)
class Done:
    summary: dict[str, Any] | None


@dataclass(frozen=True)
class Fail:
    exit_code: int
    message: str
    stage: str | None


@dataclass(frozen=True)
class HandOver:
    reason: str
    stage: str | None


@dataclass(frozen=True)
class Stopped:
    stage: str


Decision = Submit | Done | Fail | HandOver | Stopped


def first_step(job: JobDocument) -> Submit:
    return Submit(stages_of(job)[0], 1)


def decide(job: JobDocument, attempts: list[Attempt], attempt: Attempt, result: Result) -> Decision:
    """What follows `result` of `attempt`, given every attempt of the job so far (this one included)."""
    stage = attempt.stage
    if result.ending is Ending.SUCCEEDED:
        stages = stages_of(job)
        following = stages.index(stage) + 1
        return Submit(stages[following], 1) if following < len(stages) else Done(result.summary)
    if result.ending is Ending.USER_ERROR:
        return Fail(result.exit_code or 2, result.message, result.stage or stage)
    if result.ending is Ending.STOPPED:
        return Stopped(stage)
    if result.ending is Ending.CANNOT_RUN:
        return HandOver(result.message, stage)
    used = sum(a.executions for a in attempts if a.stage == stage and a.backend == attempt.backend)
    if used <= job.compute.retries:
        return Submit(stage, attempt.number + 1)
    return HandOver(f"{stage} failed {used} time{'s' if used > 1 else ''}; last error: {result.message}", stage)


def upstream_of(attempts: list[Attempt]) -> dict[str, str]:
    """Each finished stage's published prefix, for the stages after it."""
    return {a.stage: a.published for a in attempts if a.ending == Ending.SUCCEEDED.value and a.published}
