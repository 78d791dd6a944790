"""The Bacalhau backend's watcher and executor (orchestrator/executors/bacalhau.py) over an in-memory
orchestrator, poll by poll: how far a poll reads, which jobs it sees end, when a job is described on
its own, what a failed call costs, and what the executor makes of the network's answers. The same
watcher runs against the stand-in over HTTP in test_bacalhau_client and against upstream Bacalhau in
test_bacalhau_network; these tests are the fast ones its mutation run leans on."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codsplat.orchestrator.bacalhau import (GPU, Capacity, Execution, ExecutionState, Job, JobState, Node, NotFound,
                                            Submitted, Unauthorized, Unavailable)
from codsplat.orchestrator.compute import Attempt, CannotRun, Ending, Misconfigured
from codsplat.orchestrator.executors.bacalhau import LABEL, BacalhauExecutor, Watcher
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.settings import Settings
from codsplat.pipeline.contract import outcome_line

HOUR, SECOND = 3600 * 10**9, 10**9


class Orchestrator:
    """The calls the backend makes of a Bacalhau orchestrator, answered from memory as upstream does:
    a listing is the jobs whose labels match, most recently modified first (order_by=modified_at,
    reverse: pkg/publicapi/endpoint/orchestrator/job.go listJobs, pkg/jobstore/boltdb/store.go),
    with no executions; a describe of an unknown id is a 404 (NotFound); a stop makes the job Stopped
    (pkg/orchestrator/endpoint.go StopJob). `calls` records each call, `pulled` how many jobs each
    listing handed out before the caller stopped reading, and `fail[name]` the errors a call raises next."""

    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self.calls: list[tuple] = []
        self.pulled: list[int] = []
        self.fail: dict[str, list[Exception]] = {}
        self.node_list: list[Node] = []
        self.now = time.time_ns()

    def put(self, job_id: str, state: JobState, *executions: Execution, at: int | None = None,
            labels: dict[str, str] | None = None) -> Job:
        """The job as the server now has it (labelled as codsplat labels its jobs), modified `at` (ns;
        by default a tick after the last change)."""
        if at is None:
            self.now += 1000
        self.now, at = max(self.now, at or 0), at or self.now
        known = self.jobs.get(job_id)
        labels = labels or (known.labels if known else {LABEL: job_id})
        self.jobs[job_id] = Job(job_id, known.name if known else job_id, state, "", labels, {}, 0, at, list(executions))
        return self.jobs[job_id]

    def _call(self, *call):
        self.calls.append(call)
        if self.fail.get(call[0]):
            raise self.fail[call[0]].pop(0)

    def iter_jobs(self, selector="", order_by="created_at", limit=100, namespace=None):
        self._call("list", selector, order_by)
        key, _, value = selector.partition("=")
        self.pulled.append(0)
        for job in sorted(self.jobs.values(), key=lambda j: j.modify_time, reverse=True):
            if key and (key not in job.labels or (value and job.labels[key] != value)):
                continue
            self.pulled[-1] += 1
            yield Job(job.id, job.name, job.state, job.message, job.labels, job.meta, job.create_time, job.modify_time)

    def describe(self, job_id, executions=True, history=False):
        self._call("describe", job_id, executions)
        if job_id not in self.jobs:
            raise NotFound(404, f"job {job_id} not found")
        job = self.jobs[job_id]
        return Job(job.id, job.name, job.state, job.message, job.labels, job.meta, job.create_time, job.modify_time,
                   list(job.executions) if executions else [])

    def executions(self, job_id):
        self._call("executions", job_id)
        if job_id not in self.jobs:
            raise NotFound(404, f"job {job_id} not found")
        return list(self.jobs[job_id].executions)

    def stop(self, job_id, reason):
        self._call("stop", job_id, reason)
        if job_id not in self.jobs:
            raise NotFound(404, f"job {job_id} not found")
        self.put(job_id, JobState.STOPPED, *self.jobs[job_id].executions)

    def nodes(self):
        self._call("nodes")
        return list(self.node_list)

    def submit(self, spec):
        self._call("submit", spec["Name"])
        job_id = f"j-{len(self.jobs)}"
        self.put(job_id, JobState.QUEUED, labels=spec["Labels"])
        self.jobs[job_id].name = spec["Name"]
        return Submitted(job_id, "", [])

    def described(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "describe"]


def failed(at: int, why="the container was killed: out of memory") -> Execution:
    return Execution(f"e-{at}", "n1", ExecutionState.FAILED, message=why, create_time=at)


class Ends:
    """An on_end that remembers each job it is given, and waits for them (endings run on the
    watcher's own threads)."""

    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self.changed = threading.Condition()

    def of(self, job_id):
        def on_end(job):
            with self.changed:
                assert job_id not in self.jobs, f"{job_id} ended twice"
                self.jobs[job_id] = job
                self.changed.notify_all()
        return on_end

    def wait(self, *job_ids, seconds=5.0) -> dict[str, Job]:
        with self.changed:
            self.changed.wait_for(lambda: all(j in self.jobs for j in job_ids), timeout=seconds)
        return dict(self.jobs)

    def settle(self) -> dict[str, Job]:
        """What ended once the endings a poll handed out have run."""
        time.sleep(0.1)
        return dict(self.jobs)


@pytest.fixture
def server():
    return Orchestrator()


@pytest.fixture
def watching(server):
    """A watcher whose polls the test makes itself (its own loop waits an hour between them)."""
    made = []

    def make(reconcile_seconds=60.0):
        made.append(Watcher(server, poll_seconds=3600, reconcile_seconds=reconcile_seconds))
        return made[-1]

    yield make
    for watcher in made:
        watcher.stop()


def test_a_running_job_is_followed_until_a_listing_shows_it_ended_and_it_ends_once(server, watching):
    watcher, ends = watching(), Ends()
    server.put("a", JobState.RUNNING)
    watcher.track("a", ends.of("a"))
    watcher.poll()
    watcher.poll()
    assert ends.settle() == {}
    server.put("a", JobState.COMPLETED)
    watcher.poll()
    assert ends.wait("a")["a"].state == JobState.COMPLETED
    watcher.poll()  # forgotten once ended: Ends would fail a second ending
    assert server.described() == ["a"]  # the first track sets the mark; the listing does the rest
    assert ends.settle().keys() == {"a"}


def test_a_job_that_already_ended_when_it_is_tracked_ends_without_a_poll(server, watching):
    """The first job a watcher follows is described for the mark, and one found again after a
    restart is looked at once (check_now): either may have ended while no one watched."""
    watcher, ends = watching(), Ends()
    server.put("first", JobState.FAILED)
    server.put("found", JobState.COMPLETED)
    server.put("quiet", JobState.COMPLETED)
    watcher.track("first", ends.of("first"))
    watcher.track("found", ends.of("found"), check_now=True)
    watcher.track("quiet", ends.of("quiet"))  # not checked now: its end waits for a poll
    assert ends.wait("first", "found").keys() == {"first", "found"}
    assert server.described() == ["first", "found"]
    watcher.poll()
    assert ends.wait("quiet").keys() == {"first", "found", "quiet"}


def test_a_poll_reads_only_what_changed_since_the_last_one_even_after_one_that_found_nothing(server, watching):
    watcher, base = watching(), server.now
    for i in range(30):  # the daemon's history: ended jobs, last modified an hour ago and more
        server.put(f"old-{i}", JobState.COMPLETED, at=base - HOUR - i)
    server.put("a", JobState.RUNNING)
    watcher.track("a", Ends().of("a"))
    watcher.poll()
    watcher.poll()
    del server.jobs["a"]  # the server forgot it (its store was reset): this poll finds nothing new
    watcher.poll()
    watcher.poll()
    assert max(server.pulled) <= 2, server.pulled  # the listings were read to the first job older than the mark


def test_a_job_whose_end_is_stamped_a_little_before_the_newest_change_read_is_still_seen(server, watching):
    """Upstream stamps a change before it commits it, so a listing may show a change before one
    stamped earlier: a poll reads back a few seconds (SLACK_NS) past the newest time it read."""
    watcher, ends = watching(), Ends()
    server.put("a", JobState.RUNNING)
    server.put("b", JobState.RUNNING, at=server.now - HOUR)
    watcher.track("a", ends.of("a"))  # the mark: a's last change
    watcher.track("b", ends.of("b"))
    server.put("b", JobState.COMPLETED, at=server.jobs["a"].modify_time - 2 * SECOND)
    watcher.poll()
    assert ends.wait("b").keys() == {"b"}
    server.put("c", JobState.RUNNING, at=server.now - HOUR)
    watcher.track("c", ends.of("c"))
    server.put("a", JobState.RUNNING, at=server.jobs["a"].modify_time + HOUR)
    watcher.poll()  # the mark moves to a's newest change
    server.put("c", JobState.FAILED, at=server.jobs["a"].modify_time - 2 * SECOND)
    watcher.poll()
    assert ends.wait("c").keys() == {"b", "c"}
    assert server.described() == ["a"]


def test_a_job_listed_at_every_poll_is_never_described_and_one_no_listing_shows_is_once_a_while(server, watching):
    watcher = watching(reconcile_seconds=0.3)
    server.put("busy", JobState.RUNNING)
    server.put("still", JobState.RUNNING, at=server.now - HOUR)  # running, unchanged: no listing shows it
    watcher.track("busy", Ends().of("busy"))
    watcher.track("still", Ends().of("still"))
    started = time.monotonic()
    while time.monotonic() - started < 0.7:
        server.put("busy", JobState.RUNNING)  # its executions move on
        watcher.poll()
        time.sleep(0.05)
    described = server.described()
    assert described[0] == "busy" and "busy" not in described[1:]
    assert described[1:] == ["still"] * len(described[1:]) and 1 <= len(described[1:]) <= 2, described


def test_a_waiting_job_s_executions_are_read_every_quarter_of_reconcile_seconds_and_it_ends_once_exhausted(
        server, watching):
    """A job waiting for a node with failed executions may be one Bacalhau will never place again
    (see exhausted()): its executions are read now and then; it ends once they are used up."""
    watcher, ends = watching(reconcile_seconds=2.0), Ends()
    server.put("w", JobState.QUEUED, failed(1))
    watcher.track("w", ends.of("w"), allowed=2)
    server.put("w", JobState.QUEUED, failed(1))
    watcher.poll()  # just looked at (tracked): not read again yet
    assert server.described() == ["w"]
    time.sleep(0.55)
    server.put("w", JobState.QUEUED, failed(1))
    watcher.poll()  # a quarter of reconcile_seconds on: read, one failure of two allowed, it waits on
    assert server.described() == ["w", "w"] and ends.settle() == {} and "stop" not in [c[0] for c in server.calls]
    server.put("w", JobState.QUEUED, failed(1), failed(2))
    watcher.poll()
    assert server.described() == ["w", "w"]
    time.sleep(0.55)
    server.put("w", JobState.QUEUED, failed(1), failed(2))
    watcher.poll()
    job = ends.wait("w")["w"]
    assert [e.state for e in job.executions] == [ExecutionState.FAILED] * 2
    assert server.jobs["w"].state == JobState.STOPPED  # it no longer holds its place in the queue


@pytest.mark.parametrize("refusal", [NotFound(404, "gone"), Unavailable(503, "busy")])
def test_an_exhausted_job_ends_even_when_its_stop_is_refused(server, watching, refusal):
    watcher, ends = watching(reconcile_seconds=0.2), Ends()
    server.put("w", JobState.PENDING, failed(1))
    watcher.track("w", ends.of("w"), allowed=1)
    server.fail["stop"] = [refusal]
    time.sleep(0.25)
    server.put("w", JobState.PENDING, failed(1))
    watcher.poll()
    assert ends.wait("w")["w"].executions[0].message.endswith("out of memory")


def test_a_describe_that_fails_costs_that_job_a_poll_and_nothing_else(server, watching):
    """One poll: a job seen ending, a job the server forgot (it ends as a failure, not followed for
    ever), and one whose describe fails (looked at again at the next reconcile)."""
    watcher, ends = watching(reconcile_seconds=0.2), Ends()
    server.put("seen", JobState.RUNNING)
    for job_id in ("seen", "flaky", "forgotten"):
        watcher.track(job_id, ends.of(job_id))
    server.fail["describe"] = [Unavailable(503, "busy")]  # flaky's, the first described
    time.sleep(0.25)
    server.put("seen", JobState.COMPLETED)
    watcher.poll()
    ended = ends.wait("seen", "forgotten")
    assert ended.keys() == {"seen", "forgotten"}
    assert ended["forgotten"].state == JobState.FAILED and "no longer knows job forgotten" in ended["forgotten"].message
    time.sleep(0.25)
    watcher.poll()
    assert ends.wait("flaky").keys() == {"seen", "forgotten", "flaky"}


def test_the_watcher_s_own_loop_outlives_a_listing_that_fails(server):
    watcher, ends = Watcher(server, poll_seconds=0.02), Ends()
    server.put("a", JobState.RUNNING)
    server.fail["list"] = [Unavailable(503, "down"), Unavailable(503, "still down")]
    try:
        watcher.track("a", ends.of("a"))
        server.put("a", JobState.COMPLETED)
        assert ends.wait("a").keys() == {"a"}
    finally:
        watcher.stop()
    assert [c[0] for c in server.calls].count("list") >= 3


def test_a_daemon_that_exits_is_not_held_up_by_its_watcher():
    """The daemon stops without stopping its watcher when it is killed; the process must still end."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_bacalhau_watcher import Orchestrator;"
            "from codsplat.orchestrator.bacalhau import JobState;"
            "from codsplat.orchestrator.executors.bacalhau import Watcher;"
            "server = Orchestrator(); server.put('a', JobState.RUNNING);"
            "Watcher(server, poll_seconds=0.01).track('a', print); print('tracked')")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "tracked", run.stderr


# ------------------------------------------------------------------ the executor


def node(model="NVIDIA-A10G") -> Node:
    return Node(f"n-{model}", {"GPU-0": model}, True, True, [GPU(model.replace("-", " "), 23028, "NVIDIA")],
                Capacity(16, 64 * 10**9, 500 * 10**9, 1), Capacity())


def job_document(job_id="bac-job", **doc):
    return parse_job({"version": 1, "id": job_id, "input": "s3://codsplat-data/uploads/clip.mp4", **doc},
                     Settings().policy)


def test_a_refusal_is_judged_on_a_reading_no_older_than_a_poll(server):
    """Preflights share one reading of the nodes; a refusal is made on one at most a poll old, so a
    node that joined since is found, and a burst of refusals still costs no more calls."""
    server.node_list = [node()]
    executor = BacalhauExecutor(server, Settings(bacalhau_poll_seconds=0.5))
    h100 = job_document(compute={"gpu_model": "NVIDIA-H100"})
    for _ in range(3):
        with pytest.raises(CannotRun, match="GPU NVIDIA-H100 asked, GPU-0 is NVIDIA-A10G"):
            executor.preflight(h100)
    assert server.calls == [("nodes",)]  # the reading was fresh
    time.sleep(0.55)
    with pytest.raises(CannotRun):
        executor.preflight(h100)
    assert server.calls == [("nodes",)] * 2  # kept 0.55 s: read again before refusing
    server.node_list.append(node("NVIDIA-H100"))
    time.sleep(0.55)
    executor.preflight(h100)
    executor.preflight(job_document())
    assert server.calls == [("nodes",)] * 3


@pytest.mark.parametrize("refusal, raised, said", [
    (Unauthorized(401, "bad key"), Misconfigured, "bad key"),
    (Unavailable(503, "connection refused"), CannotRun, "Bacalhau is unreachable: connection refused"),
    (NotFound(404, "no such endpoint"), CannotRun, "Bacalhau is unreachable: no such endpoint"),
])
def test_a_preflight_the_network_does_not_answer_says_why(server, refusal, raised, said):
    server.fail["nodes"] = [refusal]
    with pytest.raises(raised, match=said):
        BacalhauExecutor(server, Settings()).preflight(job_document())


def test_at_start_a_refused_key_stops_the_daemon_and_an_unreachable_network_does_not(server, caplog):
    server.fail["nodes"] = [Unauthorized(403, "key lacks the capability")]
    with pytest.raises(Misconfigured, match="lacks the capability"):
        BacalhauExecutor(server, Settings()).check_credentials()
    server.fail["nodes"] = [Unavailable(503, "down")]
    with caplog.at_level(logging.WARNING, "codsplat.bacalhau"):
        BacalhauExecutor(server, Settings()).check_credentials()
    assert "unreachable at start" in caplog.text


@pytest.mark.parametrize("refusal, raised, said", [
    (Unauthorized(403, "the key may not submit"), Misconfigured, "the key may not submit"),
    (Unavailable(503, "connection reset"), CannotRun, "Bacalhau is unreachable: connection reset"),
])
def test_a_submission_the_network_refuses_says_why_and_names_the_stage(server, refusal, raised, said):
    """A refused key stops the daemon taking jobs; an unreachable network hands the job on."""
    document = job_document(compute={"split_stages": True})
    attempt = Attempt.new("bacalhau", document.id, "preprocess", 1)
    server.fail["submit"] = [refusal]
    with pytest.raises(raised, match=said) as caught:
        BacalhauExecutor(server, Settings()).submit(document, attempt, {})
    assert attempt.remote_id is None and attempt.published is None
    if raised is CannotRun:
        assert caught.value.stage == "preprocess"


def test_an_attempt_is_found_again_only_where_bacalhau_has_it(server):
    executor, document = BacalhauExecutor(server, Settings()), job_document()
    attempt = Attempt.new("bacalhau", document.id, "all", 1)
    assert executor.find(document, attempt) is False and attempt.remote_id is None
    executor.submit(document, attempt, {})
    again = Attempt.new("bacalhau", document.id, "all", 1)
    assert executor.find(document, again) is True and again.remote_id == attempt.remote_id
    assert again.published == attempt.published
    assert executor.find(document, Attempt.new("bacalhau", document.id, "all", 2)) is False


def test_a_job_retried_once_ends_when_its_second_execution_fails_while_it_waits(server):
    """compute.retries counts executions after the first: with 1, a job waiting for a node after one
    failed execution may still be placed; after two it never will be, and ends with their reason."""
    executor = BacalhauExecutor(server, Settings(), Watcher(server, 3600, reconcile_seconds=0.2))
    document, results = job_document(compute={"retries": 1}), []
    attempt = Attempt.new("bacalhau", document.id, "all", 1)
    executor.submit(document, attempt, {})
    try:
        executor.watch(document, attempt, results.append)
        for executions in ([], [failed(1)]):
            time.sleep(0.25)
            server.put(attempt.remote_id, JobState.QUEUED, *executions)
            executor.watcher.poll()
            time.sleep(0.1)
            assert results == [], executions
        time.sleep(0.25)
        server.put(attempt.remote_id, JobState.QUEUED, failed(1), failed(2))
        executor.watcher.poll()
        deadline = time.monotonic() + 5
        while not results and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        executor.watcher.stop()
    assert results[0].ending is Ending.CRASHED and results[0].executions == 2 and "out of memory" in results[0].message


def test_a_job_that_ends_is_judged_by_its_executions_and_one_whose_executions_are_gone_still_ends(server):
    executor = BacalhauExecutor(server, Settings(), Watcher(server, 3600))
    document, results = job_document(), {}
    try:
        for name, executions in (("said", [Execution("e1", "n1", ExecutionState.COMPLETED, exit_code=0,
                                                     stdout=outcome_line({"ok": True, "psnr": 27.5}))]),
                                 ("gone", None)):
            attempt = Attempt.new("bacalhau", f"{document.id}-{name}", "all", 1)
            executor.submit(document, attempt, {})
            executor.watch(document, attempt, lambda result, name=name: results.setdefault(name, result))
            server.put(attempt.remote_id, JobState.COMPLETED, *(executions or []))
            if executions is None:
                server.fail["executions"] = [NotFound(404, "job not found")]
        executor.watcher.poll()
        deadline = time.monotonic() + 5
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        executor.watcher.stop()
    assert results["said"].ending is Ending.SUCCEEDED and results["said"].summary["psnr"] == 27.5
    assert results["gone"].ending is Ending.CRASHED and "without a completed execution" in results["gone"].message


def test_a_stop_reaches_a_job_bacalhau_has_and_is_quiet_about_one_it_has_not(server):
    executor, document = BacalhauExecutor(server, Settings()), job_document()
    attempt = Attempt.new("bacalhau", document.id, "all", 1)
    executor.stop(attempt, "cancelled")  # never sent: nothing to stop
    executor.submit(document, attempt, {})
    executor.stop(attempt, "cancelled by the user")
    assert server.jobs[attempt.remote_id].state == JobState.STOPPED
    del server.jobs[attempt.remote_id]
    executor.stop(attempt, "cancelled again")  # the server forgot it: nothing left to stop
    assert [c for c in server.calls if c[0] == "stop"] == [("stop", attempt.remote_id, "cancelled by the user"),
                                                           ("stop", attempt.remote_id, "cancelled again")]


def test_the_daemon_records_the_end_of_a_bacalhau_job_itself(server, tmp_path):
    """Bacalhau cannot write the job's record or tell its user: the daemon follows the job to its end
    and does both (unlike the fallback, whose state machine does)."""
    from test_lifecycle import daemon, messages, queue

    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "clip.mp4").write_bytes(b"\0" * 1000)
    server.node_list = [node()]
    executor = BacalhauExecutor(server, Settings(), Watcher(server, 3600))
    lifecycle, _ = daemon(tmp_path, backends={"bacalhau": executor})
    try:
        queue(lifecycle, "told", notify={"email": ["u@example.com"]})
        (sent,) = [c for c in server.calls if c[0] == "submit"]
        remote = next(j.id for j in server.jobs.values() if j.name == sent[1])
        refused = outcome_line({"ok": False, "exit_code": 2, "stage": "frames",
                                "message": "Input clip.mp4 is not a readable video."})
        server.put(remote, JobState.COMPLETED,
                   Execution("e1", "n1", ExecutionState.COMPLETED, exit_code=2, stdout=refused))
        executor.watcher.poll()
        deadline = time.monotonic() + 5
        while lifecycle.store.get("told").state != "FAILED" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        executor.watcher.stop()
    assert lifecycle.store.get("told").state == "FAILED"
    assert [(m["job_id"], m["status"]) for m in messages(tmp_path)] == [("told", "FAILED")]
    assert "not a readable video" in lifecycle.store.get("told").error["message"]
