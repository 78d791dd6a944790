"""Bacalhau: each attempt is one Bacalhau job, followed by one shared watcher.

How a Bacalhau job ends, by upstream's semantics (`result_of`):
- Completed: the container ran and its output was published, whatever its exit code
  (pkg/compute/executor.go; PR #1545). `RunOutput.ExitCode` decides: 0 succeeded, 2/3/4 the
  job's own fault, anything else a crash. The worker's one stdout line (`contract.outcome_line`)
  says why, and Bacalhau keeps it in `RunOutput.Stdout` (the first 2 KiB of stdout).
- Failed with executions: system errors (image pull, input fetch, out-of-memory kill, a lost node,
  a timeout), each in its execution's `ComputeState.Message`. The orchestrator has already placed
  new executions itself (at most two per node: pkg/orchestrator/selection/ranking/previous_executions.go),
  and every one of them counts against `compute.retries`.
- Failed with no execution: never placed (no node fits, queue timeout): the job's `State.Message`.
- Queued or Pending, with failed executions only (`exhausted`): what upstream does once every node
  that would take the job has failed it twice; it would wait until its queue timeout. Seen on a real
  network (tests/test_bacalhau_network.py): we stop it, and it counts as its failed executions.
- Stopped: stopped (for a cancel).

The watcher follows every running job of this daemon with one list call per poll: the jobs that
carry our label, most recently modified first (`order_by=modified_at`), read until the previous
poll's high-water mark. A job that ends costs one more call, for its executions. A job the listings
have not shown for `reconcile_seconds` is described once (the server may have forgotten it), and a
job waiting for a node once every quarter of that (it may be exhausted).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from codsplat.pipeline.contract import parse_outcome

from ..bacalhau import (BacalhauClient, BacalhauError, ExecutionState, Job, JobState, Node, NotFound, Unauthorized, Unavailable,
                        gpu_label)
from ..compute import Attempt, CannotRun, Ending, Misconfigured, Result, stages_of
from ..job import JobDocument
from ..settings import Settings
from ..translate import gpus_for, publish_key, published, translate

log = logging.getLogger("codsplat.bacalhau")
LABEL = "codsplat-job"
RAN = (ExecutionState.COMPLETED, ExecutionState.FAILED)  # executions that were placed and ended
OVER = RAN + (ExecutionState.CANCELLED, ExecutionState.BID_REJECTED, ExecutionState.ASK_FOR_BID_REJECTED)
WAITING = (JobState.PENDING, JobState.QUEUED)
SLACK_NS = 5 * 10**9  # re-read what was modified this long before the previous poll's newest job
RECONCILE_SECONDS = 60.0  # a job no listing showed for this long is described on its own
NODES_SECONDS = 30.0  # the nodes a preflight judges by are at most this old (read again before a refusal)
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?i?b?)?\s*$", re.I)


# ------------------------------------------------------------------ outcomes


def result_of(job: Job) -> Result:
    """How a finished Bacalhau job ended (see the module's docstring). `job` carries its executions."""
    ran = [e for e in job.executions if e.state in RAN]
    if job.state == JobState.COMPLETED:
        last = max((e for e in ran if e.state == ExecutionState.COMPLETED), key=lambda e: e.create_time, default=None)
        if last is None:
            return Result(Ending.CRASHED, "the job completed without a completed execution", executions=len(ran))
        errors = [ln[7:] for ln in last.stderr.splitlines() if ln.startswith("error: ")]
        return Result.of_exit(last.exit_code, parse_outcome(last.stdout), errors[-1] if errors else last.stderr.strip()[:500],
                              executions=len(ran))
    if job.state == JobState.STOPPED:
        return Result(Ending.STOPPED, job.message, executions=len(ran))
    if not ran:
        return Result(Ending.CANNOT_RUN, job.message or "no node accepted the job", executions=0)
    failed = [e for e in sorted(ran, key=lambda e: e.create_time) if e.state == ExecutionState.FAILED]
    message = (failed[-1].failure if failed else "") or job.message or "the execution failed"
    return Result(Ending.CRASHED, message, executions=len(ran))


def exhausted(job: Job, allowed: int) -> bool:
    """Bacalhau will not end this job by itself, and waiting would not run it: at least `allowed`
    executions failed (a system error: the image is missing, the container was killed for memory, an
    input could not be fetched), none is live, and the job waits for a node. Bacalhau places a job
    again after a failed execution, but never on a node that ran it twice (pkg/orchestrator/selection/
    ranking/previous_executions.go), so on a network of one suitable node the job then sits Queued or
    Pending until its queue timeout, which may be hours. `job` carries its executions."""
    failed = [e for e in job.executions if e.state == ExecutionState.FAILED]
    return job.state in WAITING and len(failed) >= allowed and all(e.state in OVER for e in job.executions)


# ------------------------------------------------------------------ placement


def parse_size(text: str) -> int:
    """Bytes in a Bacalhau size (`12gb` = 12·10⁹, `12gib` = 12·2³⁰), as go-humanize reads them
    (pkg/models/resource.go ToResources)."""
    match = SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    power = "bkmgtpe".index(unit[0]) if unit[0] != "b" else 0
    return int(number * (1024 if "i" in unit else 1000) ** power)


def parse_cpu(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class Need:
    stage: str
    cpu: float
    memory: int
    disk: int
    gpus: int
    gpu_model: str | None


def needs(job: JobDocument, settings: Settings) -> list[Need]:
    out = []
    for stage in stages_of(job):
        res = settings.resources[stage]
        gpus = gpus_for(job, stage)
        out.append(Need(stage, parse_cpu(res.cpu), parse_size(res.memory), parse_size(res.disk), gpus,
                        job.compute.gpu_model if gpus else None))
    return out


def shortfall(need: Need, node: Node) -> str | None:
    """Why `node` can never hold one task of `need` (what it offers Bacalhau, its GPU labels), or None."""
    if not node.connected or not node.approved:
        return "not connected" if not node.connected else "not approved"
    short = []
    if need.cpu > node.max.cpu:
        short.append(f"{need.cpu:g} CPU asked, {node.max.cpu:g} offered")
    if need.memory > node.max.memory:
        short.append(f"{need.memory / 1e9:.1f} GB memory asked, {node.max.memory / 1e9:.1f} GB offered")
    if need.disk > node.max.disk:
        short.append(f"{need.disk / 1e9:.1f} GB disk asked, {node.max.disk / 1e9:.1f} GB offered")
    if need.gpus > node.max.gpu:
        short.append(f"{need.gpus} GPU{'s' if need.gpus > 1 else ''} asked, {node.max.gpu} offered")
    if need.gpu_model and node.labels.get("GPU-0") != gpu_label(need.gpu_model):
        short.append(f"GPU {gpu_label(need.gpu_model)} asked, GPU-0 is {node.labels.get('GPU-0') or 'none'}")
    return "; ".join(short) or None


def placement(job: JobDocument, settings: Settings, nodes: list[Node]) -> tuple[dict[str, list[str]], list[str]]:
    """For each stage, the nodes that could hold it; and, for stages no node can hold, why not
    (each node named with its shortfall)."""
    fits: dict[str, list[str]] = {}
    problems = []
    for need in needs(job, settings):
        why = {node.id: shortfall(need, node) for node in nodes}
        fits[need.stage] = [n for n, reason in why.items() if reason is None]
        if not fits[need.stage]:
            detail = "; ".join(f"node {n}: {reason}" for n, reason in why.items()) or "no compute node is connected"
            problems.append(f"no Bacalhau node can hold the {need.stage} stage ({detail})")
    return fits, problems


# ------------------------------------------------------------------ the watcher


@dataclass
class Tracked:
    on_end: Callable[[Job], None]
    allowed: int  # failed executions after which a job that waits for a node has ended (see exhausted())
    seen_at: float = field(default_factory=time.monotonic)  # when a listing (or the track) last showed it
    looked_at: float = field(default_factory=time.monotonic)  # when its executions were last read


class Watcher:
    """Follows every tracked Bacalhau job with one list call per poll (see the module's docstring)."""

    def __init__(self, client: BacalhauClient, poll_seconds: float, namespace: str | None = None,
                 reconcile_seconds: float = RECONCILE_SECONDS):
        self.client, self.poll_seconds, self.namespace = client, poll_seconds, namespace
        self.reconcile_seconds = reconcile_seconds
        self._tracked: dict[str, Tracked] = {}
        self._lock = threading.Lock()
        self._first = threading.Lock()  # the first tracks wait for one describe to set the mark
        self._mark: int | None = None  # Bacalhau's own clock: the newest ModifyTime read so far
        self._stop = threading.Event()
        self._endings = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bacalhau-end")
        self._thread: threading.Thread | None = None
        self.polls = 0

    def track(self, bacalhau_id: str, on_end: Callable[[Job], None], check_now: bool = False, allowed: int = 1) -> None:
        """Call `on_end(job)` once the job is terminal, or exhausted (`allowed` failed executions and
        waiting for a node; it is then stopped). `check_now`: it may have ended already (a job found
        again after a restart, or the first one this watcher follows): describe it once."""
        if self._mark is None:
            with self._first:
                if self._mark is None:
                    job = self.client.describe(bacalhau_id, executions=False)
                    self._mark, check_now = job.modify_time - SLACK_NS, False
                    if job.state.terminal:
                        self._endings.submit(on_end, job)
                        return
        if check_now:
            job = self.client.describe(bacalhau_id, executions=False)
            if job.state.terminal:
                self._endings.submit(on_end, job)
                return
        with self._lock:
            self._tracked[bacalhau_id] = Tracked(on_end, allowed)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bacalhau-watch", daemon=True)
            self._thread.start()

    def forget(self, bacalhau_id: str) -> None:
        with self._lock:
            self._tracked.pop(bacalhau_id, None)

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except BacalhauError as exc:  # the jobs run on without us; look again at the next poll
                log.warning("could not list Bacalhau jobs: %s", exc.message)

    def poll(self) -> None:
        with self._lock:
            if not self._tracked:
                return
            tracked = set(self._tracked)
        self.polls += 1
        mark, newest, ended, seen, waiting = self._mark or 0, self._mark or 0, [], [], []
        for job in self.client.iter_jobs(LABEL, order_by="modified_at", namespace=self.namespace):
            if job.modify_time < mark - SLACK_NS:
                break
            newest = max(newest, job.modify_time)
            if job.id in tracked:
                seen.append(job.id)
                if job.state.terminal:
                    ended.append(job)
                elif job.state in WAITING:
                    waiting.append(job.id)
        self._mark = newest
        at = time.monotonic()
        with self._lock:
            for bacalhau_id in seen:
                if bacalhau_id in self._tracked:
                    self._tracked[bacalhau_id].seen_at = at
            unseen = [i for i, t in self._tracked.items() if at - t.seen_at >= self.reconcile_seconds]
            # a waiting job's executions are read now and then: it may be exhausted (see exhausted())
            stale = [i for i in waiting if i in self._tracked and at - self._tracked[i].looked_at >= self.reconcile_seconds / 4]
        ended += self._reconcile(unseen + stale)
        for job in ended:
            with self._lock:
                entry = self._tracked.pop(job.id, None)
            if entry is not None:
                self._endings.submit(entry.on_end, job)

    def _reconcile(self, unseen: list[str]) -> list[Job]:
        """Jobs no listing showed for `reconcile_seconds`, and waiting jobs not looked at for a quarter
        of it, described one by one with their executions: one the server no longer knows (its store
        was reset) ends as a crash instead of being followed for ever, and one that is exhausted is
        stopped and ends with its executions' failure."""
        ended = []
        for bacalhau_id in unseen:
            with self._lock:
                entry = self._tracked.get(bacalhau_id)
                if entry is not None:
                    entry.seen_at = entry.looked_at = time.monotonic()
            try:
                job = self.client.describe(bacalhau_id, executions=True)
            except NotFound:
                job = Job(bacalhau_id, "", JobState.FAILED, f"Bacalhau no longer knows job {bacalhau_id}", {}, {}, 0)
            except Unavailable:
                continue
            if job.state.terminal:
                ended.append(job)
            elif entry is not None and exhausted(job, entry.allowed):
                stop_exhausted(self.client, job)
                ended.append(job)
        return ended


def stop_exhausted(client: BacalhauClient, job: Job) -> None:
    """Stop an exhausted job (it would otherwise hold its place in the queue until its timeout). Its
    result is read from `job` as described, never again: once stopped, it would read as a cancel."""
    try:
        client.stop(job.id, "codsplat: every execution failed and no node will run it again")
    except (NotFound, Unavailable) as exc:
        log.warning("could not stop exhausted job %s: %s", job.id, exc.message)


# ------------------------------------------------------------------ the executor


@dataclass
class BacalhauExecutor:
    client: BacalhauClient
    settings: Settings
    watcher: Watcher = None  # type: ignore[assignment]
    name: str = "bacalhau"
    finishes_record: bool = False

    def __post_init__(self):
        if self.watcher is None:
            self.watcher = Watcher(self.client, self.settings.bacalhau_poll_seconds, self.settings.bacalhau_namespace)
        self._nodes: tuple[float, list[Node]] = (float("-inf"), [])
        self._nodes_lock = threading.Lock()

    def nodes(self, max_age: float = NODES_SECONDS) -> tuple[list[Node], float]:
        """The network's nodes and how old that reading is, read again when older than `max_age`
        (a burst of jobs shares one call)."""
        with self._nodes_lock:
            read_at, nodes = self._nodes
            if time.monotonic() - read_at >= max_age:
                nodes = self.client.nodes()
                read_at = time.monotonic()
                self._nodes = (read_at, nodes)
            return nodes, time.monotonic() - read_at

    def preflight(self, job: JobDocument) -> None:
        """Refuse before submission a job that no connected node could ever hold. A refusal is
        judged on a fresh reading (a node may have joined since the one kept)."""
        try:
            nodes, age = self.nodes()
            _, problems = placement(job, self.settings, nodes)
            if problems and age >= self.settings.bacalhau_poll_seconds:
                _, problems = placement(job, self.settings, self.nodes(max_age=0)[0])
        except Unauthorized as exc:
            raise Misconfigured(exc.message) from None
        except BacalhauError as exc:
            raise CannotRun(f"Bacalhau is unreachable: {exc.message}") from None
        if problems:
            raise CannotRun("; ".join(problems), stage=needs(job, self.settings)[0].stage)

    def check_credentials(self) -> None:
        """At the daemon's start: a key Bacalhau refuses stops the daemon before it takes a job. An
        unreachable Bacalhau does not (jobs go to the fallback until it is back)."""
        try:
            self.nodes(max_age=0)
        except Unauthorized as exc:
            raise Misconfigured(exc.message) from None
        except Unavailable:
            log.warning("Bacalhau is unreachable at start; jobs are handed to the fallback until it answers")

    def submit(self, job: JobDocument, attempt: Attempt, upstream: dict[str, str]) -> None:
        spec = translate(job, self.settings, attempt.stage, attempt.number, upstream)
        try:
            attempt.remote_id = self.client.submit(spec).job_id
        except Unauthorized as exc:
            raise Misconfigured(exc.message) from None
        except Unavailable as exc:
            raise CannotRun(f"Bacalhau is unreachable: {exc.message}", attempt.stage) from None
        attempt.published = published(spec)

    def find(self, job: JobDocument, attempt: Attempt) -> bool:
        for found in self.client.iter_jobs(f"{LABEL}={job.id}"):
            if found.name == attempt.name:
                attempt.remote_id = found.id
                attempt.published = publish_key(job, self.settings, attempt.stage, attempt.name)
                return True
        return False

    def watch(self, job: JobDocument, attempt: Attempt, done: Callable[[Result], None], resumed: bool = False) -> None:
        def ended(summary: Job) -> None:
            done(result_of(summary if summary.executions else self._describe(summary)))

        self.watcher.track(attempt.remote_id, ended, check_now=resumed, allowed=job.compute.retries + 1)

    def _describe(self, summary: Job) -> Job:
        try:
            summary.executions = self.client.executions(summary.id)
        except NotFound:
            pass
        return summary

    def stop(self, attempt: Attempt, reason: str) -> None:
        if attempt.remote_id:
            try:
                self.client.stop(attempt.remote_id, reason)
            except NotFound:
                pass
