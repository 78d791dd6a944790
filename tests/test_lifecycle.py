"""The daemon's bookkeeping (orchestrator/lifecycle.py) in one process, on the embedded SQLite store
and folder, with a backend that runs nothing and ends each attempt when the test says: the slots
that bound how many jobs run at once, the bounds on what a job may fetch, a store that fails while a
document is read, a daemon that lapsed and finds its jobs ended or gone, and whose cancels a sweep
stops. The same paths run end to end, slower, in test_daemon_embedded and test_daemon_aws."""

import json
import time

import pytest

from codsplat.orchestrator.blobs import FolderBlobs
from codsplat.orchestrator.compute import Attempt, CannotRun, Ending, Result
from codsplat.orchestrator.events import JobEvent
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.lifecycle import Lifecycle
from codsplat.orchestrator.notify import FileNotifier
from codsplat.orchestrator.records import JobRecord, SQLiteStore, change, now, request_cancel
from codsplat.orchestrator.settings import Settings


class Backend:
    """Sends nothing anywhere: records what the daemon asks of it, and ends an attempt on `finish`."""

    def __init__(self, finishes_record=False):
        self.finishes_record = finishes_record
        self.sent, self.stopped, self.watching, self.resumed = [], [], {}, {}
        self.known = set()  # jobs whose attempt this backend has already (sent before a crash)

    def preflight(self, job):
        pass

    def find(self, job, attempt):
        return job.id in self.known

    def submit(self, job, attempt, upstream):
        self.sent.append(job.id)

    def watch(self, job, attempt, done, resumed=False):
        self.watching[job.id], self.resumed[job.id] = done, resumed

    def stop(self, attempt, why):
        self.stopped.append(attempt.name)

    def abandoned(self, attempt):  # the protocol: asked only of a backend that finishes the record
        assert self.finishes_record, f"asked whether {attempt.name} was abandoned, of a backend that cannot say"
        return None

    def finish(self, job_id):  # the worker refused its input (exit 2): the job fails, nothing is retried
        self.watching.pop(job_id)(Result(Ending.USER_ERROR, "Input clip.mp4 is not a readable video.", exit_code=2))


@pytest.fixture
def home(tmp_path):
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "clip.mp4").write_bytes(b"\0" * 1000)
    return tmp_path


def daemon(home, backends=None, notifier=None, schedule=None, **settings):
    """A daemon on Bacalhau (and SageMaker as its fallback when `backends` has it), whose scheduled work
    runs at once, in the caller's thread."""
    settings = Settings(**{"media_wait_seconds": 0.0, **settings})
    backends = backends or {"bacalhau": Backend()}
    lifecycle = Lifecycle(SQLiteStore(home / "db.sqlite"), FolderBlobs(home), notifier or FileNotifier(home / "sent"),
                          backends, settings, settings.policy, "bacalhau", "sagemaker" if "sagemaker" in backends else None,
                          schedule=schedule or (lambda fn, *a, delay=0.0: fn(*a)))
    return lifecycle, lifecycle.executors.get("bacalhau")


def queue(lifecycle, job_id, **doc):
    lifecycle.store.create(JobRecord(job_id=job_id, job_key=f"jobs/{job_id}.json", state="VALIDATED", owner=lifecycle.owner))
    job = parse_job({"version": 1, "id": job_id, "input": "uploads/clip.mp4", **doc}, lifecycle.policy)
    lifecycle.admit(lifecycle._flight(job, lifecycle.store.get(job_id)))


def refuse_heartbeats(lifecycle, times):
    """Other daemons are about, and the store says no to this one's next `times` heartbeat writes."""
    real = lifecycle.store.beat

    def beat(owner, at, alive=True):
        nonlocal times
        if times:
            times -= 1
            raise ConnectionError("the store did not answer")
        real(owner, at, alive)

    lifecycle.store.beat = beat
    lifecycle.others_alive = lifecycle.holds.others_alive = True


def messages(home):
    log = home / "sent" / "sent.jsonl"
    return [json.loads(line)["attributes"] for line in log.read_text().splitlines()] if log.exists() else []


def test_a_slot_freed_by_a_job_s_end_goes_to_the_job_that_waited_longest(home):
    lifecycle, backend = daemon(home, concurrency=1)
    for name in ("job-a", "job-b", "job-c"):
        queue(lifecycle, name)
    assert backend.sent == ["job-a"] and lifecycle.store.get("job-b").state in ("VALIDATED", "QUEUED")
    backend.finish("job-a")
    assert backend.sent == ["job-a", "job-b"] and lifecycle.store.get("job-a").state == "FAILED"
    attempt = lifecycle.store.get("job-a").attempts[-1]
    assert attempt["error"] == "Input clip.mp4 is not a readable video." and attempt["exit_code"] == 2
    backend.finish("job-b")
    backend.finish("job-c")
    assert backend.sent == ["job-a", "job-b", "job-c"] and lifecycle.slots.peak == 1
    assert [(m["job_id"], m["status"]) for m in messages(home)] == [(n, "FAILED") for n in ("job-a", "job-b", "job-c")]


def test_a_job_handed_to_the_fallback_frees_its_slot_once(home):
    """The fallback holds none of this daemon's slots: a handed-over job frees its slot when it is
    handed over, and its end frees nothing more (or one more job would run than the bound)."""
    class Full(Backend):
        def preflight(self, job):
            if job.id == "job-a":
                raise CannotRun("no node has a GPU free", None)

    fallback = Backend(finishes_record=True)
    lifecycle, _ = daemon(home, {"bacalhau": Full(), "sagemaker": fallback}, concurrency=1)
    for name in ("job-a", "job-b", "job-c"):
        queue(lifecycle, name)
    assert fallback.sent == ["job-a"] and lifecycle.executors["bacalhau"].sent == ["job-b"]
    assert "job-a" not in lifecycle.flights and lifecycle.slots.peak == 1
    # the record says where each runs: SageMaker runs every stage in one training job
    assert (lifecycle.store.get("job-a").stage, lifecycle.store.get("job-b").stage) == ("sagemaker", "all")


@pytest.mark.parametrize("limit,counted", [
    ({"max_input_files": 2}, "(2+ files, 0.0 GB); a job may read at most 2 files and 21.5 GB."),
    ({"max_input_bytes": 500}, "(1 files, 0.0 GB); a job may read at most 5,000 files and 0.0 GB."),
    ({"max_input_bytes": 500, "max_input_files": 9}, "(1 files, 0.0 GB); a job may read at most 9 files and 0.0 GB."),
    ({"max_input_bytes": 500, "max_input_files": 3}, "(3 files, 0.0 GB); a job may read at most 3 files and 0.0 GB.")])
def test_media_too_much_to_fetch_fail_naming_the_bounds_before_anything_is_fetched(home, limit, counted):
    (home / "uploads" / "photos").mkdir()
    for i in range(3):
        (home / "uploads" / "photos" / f"{i}.jpg").write_bytes(b"\xff" * 200)
    lifecycle, backend = daemon(home, **limit)
    queue(lifecycle, "big", input="uploads/photos/" if limit.get("max_input_files") in (2, 3) else "uploads/clip.mp4")
    record = lifecycle.store.get("big")
    assert record.state == "FAILED" and not backend.sent
    assert counted in record.error["message"] and "a job may read at most" in record.error["message"]
    assert record.error["exit_code"] == 2 and record.error["kind"] == "input"


def test_a_store_that_fails_while_a_document_is_read_leaves_that_message_for_later(home):
    """A blip while reading one document: that message is not acknowledged (it comes back after its
    visibility timeout); the others in the batch are taken in, and the daemon goes on."""
    lifecycle, _ = daemon(home)
    (home / "jobs").mkdir()
    for name in ("ok", "blip"):
        (home / "jobs" / f"{name}.json").write_text(json.dumps({"version": 1, "input": "uploads/clip.mp4"}))
    real = lifecycle.intake.read

    def read(event):
        if event.key == "jobs/blip.json":
            raise ConnectionError("the store did not answer")
        return real(event)

    lifecycle.intake.read = read
    done = lifecycle.receive([JobEvent(None, "jobs/ok.json", upload="1"), JobEvent(None, "jobs/blip.json", upload="1")])
    assert done == [True, False]
    assert lifecycle.stats["created"] == 1


def test_after_a_lapse_a_daemon_lets_go_of_jobs_that_ended_vanished_or_were_taken(home):
    lifecycle, backend = daemon(home, concurrency=4)
    lifecycle.others_alive = True
    lifecycle.heartbeat()
    for name in ("mine", "ended", "vanished", "taken"):
        queue(lifecycle, name)
    change(lifecycle.store, "ended", lambda r: None, to="FAILED")
    lifecycle.store._db().execute("DELETE FROM jobs WHERE job_id = 'vanished'")
    change(lifecycle.store, "taken", lambda r: setattr(r, "owner", "another-daemon"))
    lifecycle._beat -= lifecycle.settings.claim_seconds  # paused past its holds' life
    lifecycle.heartbeat()
    assert set(lifecycle.flights) == {"mine"}


def test_a_sweep_stops_cancelled_jobs_this_daemon_runs_or_handed_over_and_no_other_daemon_s(home):
    fallback = Backend(finishes_record=True)
    lifecycle, backend = daemon(home, {"bacalhau": Backend(), "sagemaker": fallback})
    queue(lifecycle, "mine")
    for name, backend_name in (("handed", "sagemaker"), ("others", "bacalhau")):
        attempt = Attempt.new(backend_name, name, "all", 1, state="Running")
        lifecycle.store.create(JobRecord(job_id=name, job_key=f"jobs/{name}.json", state="RUNNING", backend=backend_name,
                                         attempts=[attempt.to_dict()], owner="another-daemon"))
    for name in ("mine", "handed", "others"):
        request_cancel(lifecycle.store, name)
    lifecycle.sweep()
    stopped = lifecycle.executors["bacalhau"].stopped + fallback.stopped
    assert sorted(n.split("-")[1] for n in stopped) == ["handed", "mine"]


def test_a_backend_that_refuses_the_deployment_s_credentials_fails_the_job_and_never_hands_it_over(home):
    """Misconfigured is the operator's to fix: the job fails as an internal error naming it, and is
    not handed to the fallback (a wrong key would otherwise send every job to SageMaker unseen)."""
    from codsplat.orchestrator.compute import Misconfigured

    class Refusing(Backend):
        def preflight(self, job):
            if job.id == "at-preflight":
                raise Misconfigured("Bacalhau refused the API key (401)")

        def submit(self, job, attempt, upstream):
            raise Misconfigured("Bacalhau refused the API key (401)")

    fallback = Backend(finishes_record=True)
    lifecycle, _ = daemon(home, {"bacalhau": Refusing(), "sagemaker": fallback})
    for name in ("at-preflight", "at-submit"):
        queue(lifecycle, name)
        record = lifecycle.store.get(name)
        assert record.state == "FAILED" and "refused the API key" in record.error["message"], name
        assert record.error["kind"] == "internal" and not fallback.sent


def test_after_a_restart_an_attempt_sent_before_the_crash_is_followed_not_sent_again(home):
    """The daemon died between sending an attempt and recording it: its successor finds the attempt at
    the backend and follows it, asking the backend to look at it at once (it may have ended while no
    daemon watched); a job whose attempt never left is sent."""
    lifecycle, backend = daemon(home)
    backend.known.add("job-sent")
    for name in ("job-sent", "job-new"):
        resumed(lifecycle, home, name)
    assert backend.sent == ["job-new"]
    assert backend.resumed == {"job-sent": True, "job-new": False}
    assert lifecycle.store.get("job-sent").state == "RUNNING" and lifecycle.store.get("job-sent").owner == lifecycle.owner


def test_media_exactly_at_the_bounds_are_fetched(home):
    (home / "uploads" / "photos").mkdir()
    for i in range(3):
        (home / "uploads" / "photos" / f"{i}.jpg").write_bytes(b"\xff" * 200)
    lifecycle, backend = daemon(home, max_input_files=3, max_input_bytes=600)
    queue(lifecycle, "at-bounds", input="uploads/photos/")
    assert backend.sent == ["at-bounds"] and lifecycle.store.get("at-bounds").state == "RUNNING"


def test_a_handed_over_job_whose_follower_died_is_failed_stopped_and_told_once(home):
    """The fallback's state machine records the job's end; if its execution itself failed, the record
    would stay RUNNING. A sweep finds it: the training job is stopped, the record FAILED naming the
    execution's end, one message. A running execution, or a job this daemon follows, is left alone."""

    class Fallback(Backend):
        def abandoned(self, attempt):
            return "FAILED" if "dead" in attempt.name else None

    fallback = Fallback(finishes_record=True)
    lifecycle, _ = daemon(home, {"bacalhau": Backend(), "sagemaker": fallback})
    for name, backend in (("job-dead", "sagemaker"), ("job-alive", "sagemaker"), ("job-dead-here", "sagemaker"),
                          ("job-dead-elsewhere", "bacalhau")):
        attempt = Attempt.new(backend, name, "all", 1, state="Running")
        lifecycle.store.create(JobRecord(job_id=name, job_key=f"jobs/{name}.json", state="RUNNING", backend=backend,
                                         attempts=[attempt.to_dict()]))
    lifecycle._flight(parse_job({"version": 1, "id": "job-dead-here", "input": "uploads/clip.mp4"}, lifecycle.policy),
                      lifecycle.store.get("job-dead-here"))  # being handed over by this daemon right now
    for _ in range(2):
        lifecycle._looked_handed -= lifecycle.settings.claim_seconds
        lifecycle.sweep()
    dead = lifecycle.store.get("job-dead")
    assert dead.state == "FAILED" and "execution FAILED" in dead.error["message"]
    assert [n for n in fallback.stopped] == [lifecycle.store.get("job-dead").attempts[-1]["name"]]
    assert all(lifecycle.store.get(n).state == "RUNNING" for n in ("job-alive", "job-dead-here", "job-dead-elsewhere"))
    assert [(m["job_id"], m["status"]) for m in messages(home)] == [("job-dead", "FAILED")]


@pytest.mark.parametrize("claim_seconds,delays", [(120.0, [1.0, 2.0, 4.0, 8.0]), (6.0, [1.0, 2.0, 3.0, 3.0])])
def test_a_failed_send_is_tried_again_on_a_growing_interval_until_it_goes_out_once(home, claim_seconds, delays):
    """Doubling, up to half the claim's life: the claim is renewed at each try, well before it lapses."""
    class Flaky(FileNotifier):
        fails = 4

        def send(self, message):
            if Flaky.fails:
                Flaky.fails -= 1
                raise ConnectionError("SNS said no")
            super().send(message)

    waited = []
    lifecycle, _ = daemon(home, notifier=Flaky(home / "sent"), schedule=lambda fn, *a, delay=0.0: (waited.append(delay), fn(*a)),
                          claim_seconds=claim_seconds)
    lifecycle.store.create(JobRecord(job_id="told", job_key="jobs/told.json", state="FAILED", error={"message": "x"},
                                     notify_claimed_by=lifecycle.owner, notify_claimed_at=now()))
    lifecycle.send(lifecycle.store.get("told"))
    assert waited == delays
    assert lifecycle.store.get("told").notified_at and [m["job_id"] for m in messages(home)] == ["told"]


def test_announce_tells_only_an_ended_job_nobody_told(home):
    lifecycle, _ = daemon(home)
    lifecycle.announce(None)  # gone meanwhile: nothing to do, no error
    for name, state, told in (("running", "RUNNING", None), ("told", "FAILED", now()), ("untold", "FAILED", None)):
        lifecycle.store.create(JobRecord(job_id=name, job_key=f"jobs/{name}.json", state=state, notified_at=told,
                                         error={"message": "x"} if state == "FAILED" else None))
        lifecycle.announce(lifecycle.store.get(name))
    assert [m["job_id"] for m in messages(home)] == ["untold"]


def test_duplicates_and_refusals_are_counted_apart(home):
    lifecycle, _ = daemon(home)
    (home / "jobs").mkdir()
    (home / "jobs" / "once.json").write_text(json.dumps({"version": 1, "input": "uploads/clip.mp4"}))
    (home / "jobs" / "bad.json").write_text("{")
    lifecycle.receive([JobEvent(None, "jobs/once.json", upload="1")])
    lifecycle.receive([JobEvent(None, "jobs/once.json", upload="1"), JobEvent(None, "jobs/bad.json", upload="1")])
    assert (lifecycle.stats["created"], lifecycle.stats["duplicates"]) == (2, 1)


def test_media_still_uploading_are_waited_for_until_the_deadline_then_the_job_fails(home):
    """The job document may land before its media: the daemon looks again every poll until
    `media_wait_seconds` after it first looked (not after each look), then fails naming the wait."""
    waiting = []
    lifecycle, backend = daemon(home, schedule=lambda fn, *a, delay=0.0: waiting.append((fn, a)),
                                media_wait_seconds=0.4, media_poll_seconds=0.01)
    queue(lifecycle, "late", input="uploads/late.mp4")
    queue(lifecycle, "never", input="uploads/never.mp4")
    assert [a[0].job.id for _, a in waiting] == ["late", "never"] and not backend.sent  # waiting, not failed
    (home / "uploads" / "late.mp4").write_bytes(b"\0" * 10)
    started = time.monotonic()
    while waiting and time.monotonic() - started < 5:
        fn, args = waiting.pop(0)
        fn(*args)
        time.sleep(0.01)
    assert backend.sent == ["late"] and not waiting
    never = lifecycle.store.get("never")
    assert never.state == "FAILED" and "was not found (waited 0 s" in never.error["message"]
    assert 0.3 < time.monotonic() - started < 4  # failed at its deadline: not at once, not never


def test_a_split_job_s_next_stage_starts_fresh_and_a_crashed_stage_is_retried_saying_why(home):
    """A stage that succeeded is followed by the next, as attempt 1, its end recorded first (the next
    stage reads what it published); a crash is retried at the same stage, the retry naming the crash."""
    lifecycle, backend = daemon(home)
    queue(lifecycle, "split", compute={"split_stages": True, "retries": 1})
    backend.watching.pop("split")(Result(Ending.CRASHED, "node lost"))
    backend.watching.pop("split")(Result(Ending.SUCCEEDED))
    attempts = lifecycle.store.get("split").attempts
    assert [(a["stage"], a["number"], a["reason"]) for a in attempts] == [
        ("preprocess", 1, None), ("preprocess", 2, "attempt 1 crashed"), ("train", 1, None)]
    assert [a["ending"] for a in attempts] == ["crashed", "succeeded", None]
    assert lifecycle.store.get("split").stage == "train"
    assert "attempt 1 crashed" in [h["note"] for h in lifecycle.store.get("split").history]  # the history says why too
    # retries are counted per stage: train's first crash is retried, whatever preprocess used
    backend.watching.pop("split")(Result(Ending.CRASHED, "node lost"))
    assert [(a["stage"], a["number"]) for a in lifecycle.store.get("split").attempts][-1] == ("train", 2)


DOCUMENT = json.dumps({"version": 1, "input": "uploads/clip.mp4"})


def resumed(lifecycle, home, name, attempt=None, document=DOCUMENT):
    """A job whose daemon died, taken up by `lifecycle`: its record QUEUED, or RUNNING with `attempt`
    its last; `document` is its job file's text (None: the file is gone). Returns the record after."""
    if document is not None:
        (home / "jobs").mkdir(exist_ok=True)
        (home / "jobs" / f"{name}.json").write_text(document)
    state = {"state": "QUEUED"} if attempt is None else {
        "state": "RUNNING", "stage": attempt.stage, "backend": attempt.backend, "attempts": [attempt.to_dict()]}
    lifecycle.store.create(JobRecord(job_id=name, job_key=f"jobs/{name}.json", owner="gone:1:x",
                                     owner_seen_at="2020-01-01T00:00:00.000+00:00", **state))
    lifecycle.resume(lifecycle.store.get(name))
    return lifecycle.store.get(name)


def test_after_a_restart_a_local_run_is_run_again_and_an_ended_attempt_is_decided_not_rerun(home):
    """A local run dies with its daemon: its stage runs again as the next attempt, saying why. An
    attempt whose end was recorded, but not what followed it, is decided from that end: a refused
    input fails the job (told once), and nothing is sent again."""
    local = Backend()
    lifecycle, backend = daemon(home, {"bacalhau": Backend(), "local": local})
    record = resumed(lifecycle, home, "was-local", Attempt.new("local", "was-local", "all", 1, state="Running", remote_id="4242"))
    assert local.sent == ["was-local"] and record.state == "RUNNING"
    assert [(a["number"], a["reason"]) for a in record.attempts] == [(1, None), (2, "resumed after a restart")]
    ended = Attempt.new("bacalhau", "ended", "all", 1, state="Failed", ending="user-error", exit_code=2,
                        error="Input clip.mp4 is not a readable video.", remote_id="j-1")
    record = resumed(lifecycle, home, "ended", ended)
    assert record.state == "FAILED" and record.error["message"] == "Input clip.mp4 is not a readable video."
    assert not backend.sent and "ended" not in backend.watching
    assert [(m["job_id"], m["status"]) for m in messages(home)] == [("ended", "FAILED")]


def test_a_cancel_that_wins_the_race_with_the_start_stops_what_was_sent_quietly(home, caplog):
    """The user cancelled a queued job while its first attempt was being sent: the attempt is stopped,
    the job stays CANCELLED, and that race is not reported as an error (it is expected, not a fault)."""
    class Racing(Backend):
        def submit(self, job, attempt, upstream):
            super().submit(job, attempt, upstream)
            request_cancel(lifecycle.store, job.id)

    lifecycle, backend = daemon(home, {"bacalhau": Racing()})
    with caplog.at_level("INFO", logger="codsplat"):
        queue(lifecycle, "raced")
    assert lifecycle.store.get("raced").state == "CANCELLED" and len(backend.stopped) == 1
    assert "raced" not in lifecycle.flights
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_a_takeover_resumes_only_jobs_nobody_alive_holds(home):
    """Every `claim_seconds` a daemon resumes the jobs of daemons whose heartbeat stopped: not a job a
    live daemon holds, not one handed over to the fallback (its state machine finishes it), not its own."""
    looked = []
    lifecycle, _ = daemon(home, {"bacalhau": Backend(), "sagemaker": Backend(finishes_record=True)},
                          schedule=lambda fn, *a, delay=0.0: looked.append(a[0].job_id))
    lifecycle.others_alive = lifecycle.holds.others_alive = True
    lifecycle.store.beat("alive:1:x", now())
    old = "2020-01-01T00:00:00.000+00:00"
    for name, owner, seen, backend in (("held-elsewhere", "alive:1:x", now(), "bacalhau"),
                                       ("dead-daemon-s", "gone:1:x", old, "bacalhau"),
                                       ("handed", "gone:1:x", old, "sagemaker")):
        attempt = Attempt.new(backend, name, "all", 1, state="Running", remote_id="r")
        lifecycle.store.create(JobRecord(job_id=name, job_key=f"jobs/{name}.json", state="RUNNING", backend=backend,
                                         attempts=[attempt.to_dict()], owner=owner, owner_seen_at=seen))
    lifecycle._looked -= lifecycle.settings.claim_seconds
    lifecycle.take_over()
    assert looked == ["dead-daemon-s"]


def test_a_sweep_lets_go_of_a_queued_job_the_user_cancelled_and_tells_them_once(home):
    """A job waiting for a slot is cancelled from outside the daemon (`codsplat jobs cancel`): the
    next sweep drops it from the queue and tells its user; the slot then goes to nobody else's
    cancelled job, and a second sweep tells nobody again."""
    lifecycle, backend = daemon(home, concurrency=1)
    queue(lifecycle, "running")
    queue(lifecycle, "waiting")
    assert backend.sent == ["running"] and "waiting" in lifecycle.flights
    request_cancel(lifecycle.store, "waiting")
    lifecycle.sweep()
    assert "waiting" not in lifecycle.flights
    assert [(m["job_id"], m["status"]) for m in messages(home)] == [("waiting", "CANCELLED")]
    backend.finish("running")
    lifecycle.sweep()
    assert backend.sent == ["running"]
    assert [(m["job_id"], m["status"]) for m in messages(home)] == [("waiting", "CANCELLED"), ("running", "FAILED")]


@pytest.mark.parametrize("summary,state,told", [
    (None, "FAILED", None), ({"psnr": 27.5}, "FAILED", None),
    ({"files": ["splat.ply"], "psnr": 27.5, "ssim": 0.91, "gaussians": 48_000}, "SUCCEEDED",
     "Held-out quality: 27.50 dB PSNR, SSIM 0.910\nGaussians: 48,000\n"),
    ({"files": ["splat.ply"], "psnr": 27.5}, "SUCCEEDED", "Held-out quality: 27.50 dB PSNR\n\n")])
def test_a_run_that_says_it_succeeded_without_its_outputs_fails(home, summary, state, told):
    """Success is what the worker exported (its summary lists the files), not an exit code alone."""
    lifecycle, backend = daemon(home)
    queue(lifecycle, "ended")
    backend.watching.pop("ended")(Result(Ending.SUCCEEDED, summary=summary))
    record = lifecycle.store.get("ended")
    assert record.state == state
    if state == "FAILED":
        assert "outputs are missing" in record.error["message"] and record.error["kind"] == "internal"
    else:  # told, with the figures the run reported (one it did not is left out, not a message that fails)
        assert record.result["outputs"][0].endswith("export/splat.ply") and record.notified_at
        body = json.loads((home / "sent" / "ended.json").read_text())["body"]
        assert told in body
        # links to what a user opens: the splat, the report and the metrics, not the cameras file
        linked = [line.split(":")[0] for line in body.splitlines() if ": " in line and "/" in line]
        assert linked == ["splat.ply", "metrics.json", "report.html"], body


def test_after_a_restart_a_sent_attempt_is_followed_even_where_the_backend_has_no_room_now(home):
    """The attempt sent before the crash may be what fills the node now: the lookup comes before the
    check for room, or the job would be handed to the fallback and run twice."""
    class Busy(Backend):
        def preflight(self, job):
            raise CannotRun("no node has a GPU free", None)

    busy, fallback = Busy(), Backend(finishes_record=True)
    busy.known.add("job-sent")
    lifecycle, _ = daemon(home, {"bacalhau": busy, "sagemaker": fallback})
    resumed(lifecycle, home, "job-sent")
    assert not fallback.sent and busy.resumed == {"job-sent": True}
    assert lifecycle.store.get("job-sent").backend == "bacalhau"


def test_after_a_restart_a_lookup_that_fails_sends_nothing_and_looks_again(home):
    """The backend cannot say whether the attempt was sent (an API blip): nothing is sent, which could
    run the job twice; the lookup is tried again later, and then finds it."""
    class Blip(Backend):
        blips = 2  # down for a while: the next lookup fails too

        def find(self, job, attempt):
            if Blip.blips:
                Blip.blips -= 1
                raise ConnectionError("Bacalhau did not answer")
            return super().find(job, attempt)

    later = []
    blip = Blip()
    blip.known.add("job-sent")
    lifecycle, _ = daemon(home, {"bacalhau": blip}, schedule=lambda fn, *a, delay=0.0: later.append((fn, a, delay)))
    resumed(lifecycle, home, "job-sent")
    for _ in range(2):
        assert not blip.sent and [delay for *_, delay in later] == [lifecycle.settings.lookup_retry_seconds]
        fn, args, _ = later.pop()
        fn(*args)
    assert not blip.sent and not later and blip.resumed == {"job-sent": True} and lifecycle.store.get("job-sent").state == "RUNNING"


def test_after_a_restart_a_remote_run_is_watched_again_and_looked_at_at_once(home):
    """A Bacalhau job outlives its daemon: the successor follows it (asking the backend to look at
    once: it may have ended unwatched), and sends nothing."""
    lifecycle, backend = daemon(home)
    record = resumed(lifecycle, home, "remote", Attempt.new("bacalhau", "remote", "all", 1, state="Running", remote_id="j-9"))
    assert record.state == "RUNNING" and not backend.sent and backend.resumed == {"remote": True}


def test_a_sweep_stops_every_cancelled_job_whatever_runs_beside_it(home):
    """Cancels are looked for in every running record, newest first: a running job nobody cancelled,
    or one of another daemon, listed before a cancelled one does not hide it."""
    lifecycle, backend = daemon(home, concurrency=3)
    queue(lifecycle, "cancelled")
    request_cancel(lifecycle.store, "cancelled")
    time.sleep(0.01)  # listed after the two below (newest first, by the millisecond)
    queue(lifecycle, "running")
    time.sleep(0.01)
    attempt = Attempt.new("bacalhau", "others", "all", 1, state="Running")
    lifecycle.store.create(JobRecord(job_id="others", job_key="jobs/others.json", state="RUNNING", backend="bacalhau",
                                     attempts=[attempt.to_dict()], owner="another-daemon", cancel_requested=True))
    assert [r.job_id for r in lifecycle.store.list("RUNNING")] == ["others", "running", "cancelled"]  # the premise
    lifecycle.sweep()
    assert [n.split("-")[1] for n in backend.stopped] == ["cancelled"]


def test_a_slot_is_taken_once_per_job_and_a_resumed_job_takes_one_even_when_all_are_held(home):
    """A job asking again keeps its slot (not a second one, not a place in the queue); a job found
    running after a restart takes one whatever the bound: it runs already."""
    from codsplat.orchestrator.lifecycle import Slots

    slots = Slots(1)
    assert slots.take("a") and slots.take("a") and slots.held == {"a"} and not slots.waiting
    assert not slots.take("b") and list(slots.waiting) == ["b"]
    assert slots.take("resumed", force=True) and slots.held == {"a", "resumed"} and slots.peak == 2
    assert slots.take("resumed") and not slots.take("c")
    # over the bound (a forced resume): a freed slot goes to nobody until the bound is kept again
    assert slots.give_back("a") is None and slots.held == {"resumed"}
    assert slots.give_back("resumed") == "b" and slots.held == {"b"}


def test_a_job_whose_document_went_bad_or_away_fails_at_its_resume_naming_it(home):
    """After a restart the job is read again from its document: gone, or no longer valid, the job
    cannot go on; it fails saying which, and its user is told."""
    lifecycle, backend = daemon(home)
    resumed(lifecycle, home, "gone", document=None)
    resumed(lifecycle, home, "bad", document=json.dumps({"version": 1, "input": "uploads/clip.mp4", "frames": "many"}))
    gone, bad = lifecycle.store.get("gone"), lifecycle.store.get("bad")
    assert gone.state == bad.state == "FAILED" and not backend.sent
    assert gone.error["message"] == "Its job document jobs/gone.json can no longer be read (FileNotFoundError)."
    assert "frames" in bad.error["message"] and "can no longer be read" not in bad.error["message"]
    assert sorted(m["job_id"] for m in messages(home)) == ["bad", "gone"]


def test_a_heartbeat_the_store_refuses_is_written_again_at_the_next_sweep(home):
    lifecycle, _ = daemon(home)
    refuse_heartbeats(lifecycle, times=1)
    lifecycle.heartbeat()  # refused: logged, not raised, and not counted as written
    assert lifecycle.store.seen(lifecycle.owner) is None and lifecycle.stats.get("beats", 0) == 0
    lifecycle.heartbeat()
    assert lifecycle.store.seen(lifecycle.owner).alive and lifecycle.stats["beats"] == 1


def test_a_message_another_daemon_holds_is_looked_at_again_only_while_it_is_untold(home):
    """Another live daemon claimed the message: this one looks again after claim_seconds, in case
    that daemon dies; if the message went out meanwhile, there is nothing to look at again."""
    later = []
    lifecycle, _ = daemon(home, schedule=lambda fn, *a, delay=0.0: later.append(delay))
    lifecycle.others_alive = lifecycle.holds.others_alive = True
    lifecycle.store.beat("alive:1:x", now())
    for name in ("untold", "told-meanwhile"):
        lifecycle.store.create(JobRecord(job_id=name, job_key=f"jobs/{name}.json", state="FAILED", error={"message": "x"},
                                         notify_claimed_by="alive:1:x", notify_claimed_at=now()))
    stale = lifecycle.store.get("told-meanwhile")
    change(lifecycle.store, "told-meanwhile", lambda r: setattr(r, "notified_at", now()))
    lifecycle.announce(lifecycle.store.get("untold"))
    assert later == [lifecycle.settings.claim_seconds]
    lifecycle.announce(stale)
    assert later == [lifecycle.settings.claim_seconds] and not messages(home)


def test_a_job_that_keeps_crashing_is_handed_over_as_the_fallback_s_first_attempt(home):
    """Past its retries a crashing job goes to the fallback, as that backend's attempt 1 (its name
    is how a restarted daemon finds it again), saying why."""
    fallback = Backend(finishes_record=True)
    lifecycle, backend = daemon(home, {"bacalhau": Backend(), "sagemaker": fallback})
    queue(lifecycle, "crashing", compute={"retries": 0})
    backend.watching.pop("crashing")(Result(Ending.CRASHED, "node lost", executions=1))
    record = lifecycle.store.get("crashing")
    assert fallback.sent == ["crashing"] and record.backend == "sagemaker"
    handed = record.attempts[-1]
    assert (handed["backend"], handed["number"], handed["name"]) == ("sagemaker", 1, "codsplat-crashing-sm-a1")
    assert handed["reason"] == "bacalhau cannot run it: all failed 1 time; last error: node lost"


def test_a_job_resumed_after_a_restart_holds_a_slot_and_gives_it_back_when_it_ends(home):
    lifecycle, backend = daemon(home, concurrency=1)
    resumed(lifecycle, home, "remote", Attempt.new("bacalhau", "remote", "all", 1, state="Running", remote_id="j-9"))
    queue(lifecycle, "next")
    assert backend.sent == []  # the resumed job holds the one slot
    backend.finish("remote")
    assert backend.sent == ["next"] and lifecycle.store.get("remote").state == "FAILED"


def test_handed_over_jobs_are_looked_up_once_per_claim_seconds_not_at_every_sweep(home):
    """Each look asks the fallback's API about every handed-over job: once per claim_seconds."""
    class Fallback(Backend):
        asked = 0

        def abandoned(self, attempt):
            Fallback.asked += 1
            return None

    lifecycle, _ = daemon(home, {"bacalhau": Backend(), "sagemaker": Fallback(finishes_record=True)})
    attempt = Attempt.new("sagemaker", "handed", "all", 1, state="Running")
    lifecycle.store.create(JobRecord(job_id="handed", job_key="jobs/handed.json", state="RUNNING", backend="sagemaker",
                                     attempts=[attempt.to_dict()]))
    lifecycle._looked_handed -= lifecycle.settings.claim_seconds
    for _ in range(3):
        lifecycle.sweep()
    assert Fallback.asked == 1
    lifecycle._looked_handed -= lifecycle.settings.claim_seconds
    lifecycle.sweep()
    assert Fallback.asked == 2


def test_crashes_are_counted_across_attempts_and_past_the_retries_the_job_stops_retrying(home):
    lifecycle, backend = daemon(home)
    queue(lifecycle, "crashing", compute={"retries": 1, "backend": "bacalhau"})
    for _ in range(2):
        backend.watching.pop("crashing")(Result(Ending.CRASHED, "node lost", executions=1))
    record = lifecycle.store.get("crashing")
    assert backend.sent == ["crashing", "crashing"] and record.state == "FAILED"
    assert "all failed 2 times; last error: node lost" in record.error["message"]


@pytest.mark.parametrize("pinned", ["bacalhau", "sagemaker"])
def test_a_job_that_cannot_run_where_it_must_fails_and_is_never_moved(home, pinned):
    """A job pinned to a backend (or already on the fallback) that cannot run there fails, naming why:
    it is not moved to the other backend, nor handed to the fallback it is on."""
    class Full(Backend):
        def preflight(self, job):
            raise CannotRun("no node has a GPU free", None)

    backends = {"bacalhau": Full(), "sagemaker": Full(finishes_record=True)}
    lifecycle, _ = daemon(home, backends)
    queue(lifecycle, "pinned", compute={"backend": pinned})
    record = lifecycle.store.get("pinned")
    assert record.state == "FAILED" and "No backend could run the job: no node has a GPU free" in record.error["message"]
    assert not backends["bacalhau"].sent and not backends["sagemaker"].sent


def test_an_attempt_that_ends_after_the_job_ended_elsewhere_changes_nothing(home):
    """Another writer ended the job while its attempt ran (a second daemon's follower, the hand-over
    check): the late end is dropped quietly, the slot is freed, and that ending's message stands."""
    lifecycle, backend = daemon(home, concurrency=1, schedule=lambda fn, *a, delay=0.0: None if delay else fn(*a))
    lifecycle.others_alive = lifecycle.holds.others_alive = True
    lifecycle.store.beat("alive:1:x", now())
    queue(lifecycle, "ended-elsewhere")
    queue(lifecycle, "next")
    change(lifecycle.store, "ended-elsewhere", lambda r: (setattr(r, "error", {"message": "failed elsewhere"}),
                                                          setattr(r, "notify_claimed_by", "alive:1:x"),
                                                          setattr(r, "notify_claimed_at", now())), to="FAILED")
    backend.finish("ended-elsewhere")
    record = lifecycle.store.get("ended-elsewhere")
    assert record.state == "FAILED" and record.error == {"message": "failed elsewhere"}
    assert backend.sent == ["ended-elsewhere", "next"]
    assert not messages(home)  # the daemon that ended it tells its user, not this one


def test_after_a_restart_the_next_stage_sent_before_the_crash_is_followed_not_sent_again(home):
    """The daemon died after the first stage's end was recorded and the next stage sent, before that
    was recorded: its successor decides again from the recorded end, finds the sent stage, follows it."""
    lifecycle, backend = daemon(home)
    backend.known.add("split")
    done = Attempt.new("bacalhau", "split", "preprocess", 1, state="Completed", ending="succeeded", remote_id="j-1",
                       published="results/split/work/a1/")
    record = resumed(lifecycle, home, "split", done, document=json.dumps(
        {"version": 1, "input": "uploads/clip.mp4", "compute": {"split_stages": True}}))
    assert not backend.sent and backend.resumed == {"split": True}
    assert [(a["stage"], a["number"], a["state"]) for a in record.attempts] == [
        ("preprocess", 1, "Completed"), ("train", 1, "Running")]


def test_after_a_restart_a_job_handed_to_the_fallback_is_left_to_it(home):
    """Its state machine follows it and records its end: the daemon takes no slot for it and watches nothing."""
    fallback = Backend(finishes_record=True)
    lifecycle, _ = daemon(home, {"bacalhau": Backend(), "sagemaker": fallback}, concurrency=1)
    record = resumed(lifecycle, home, "handed", Attempt.new("sagemaker", "handed", "all", 1, state="Running",
                                                             remote_id="arn:execution"))
    assert record.state == "RUNNING" and not fallback.watching and not fallback.sent
    assert not lifecycle.slots.held and "handed" not in lifecycle.flights or not lifecycle.flights["handed"].holds_slot


def test_a_message_sent_meanwhile_by_a_daemon_since_gone_is_not_sent_again(home):
    """Announced from a stale copy: the claim's conditional put fails, the record is read again, and
    a message already sent is never sent again, whoever's claim it was."""
    lifecycle, _ = daemon(home)
    lifecycle.others_alive = lifecycle.holds.others_alive = True
    lifecycle.store.create(JobRecord(job_id="told", job_key="jobs/told.json", state="FAILED", error={"message": "x"},
                                     notify_claimed_by="gone:1:x", notify_claimed_at="2020-01-01T00:00:00.000+00:00"))
    stale = lifecycle.store.get("told")
    change(lifecycle.store, "told", lambda r: setattr(r, "notified_at", now()))
    lifecycle.announce(stale)
    assert not messages(home)


def test_after_a_restart_a_job_sent_to_a_backend_this_daemon_lacks_starts_afresh_here(home):
    """The record's last attempt ran on a backend this deployment no longer has (a local run, taken
    up by a daemon on Bacalhau): the job starts again on this daemon's backend."""
    lifecycle, backend = daemon(home)
    record = resumed(lifecycle, home, "moved", Attempt.new("local", "moved", "all", 1, state="Running", remote_id="77"))
    assert backend.sent == ["moved"] and record.attempts[-1]["backend"] == "bacalhau"


def test_a_job_document_is_read_whole_at_a_resume_up_to_the_size_bound_and_refused_past_it(home):
    from codsplat.pipeline.config import MAX_DOCUMENT_BYTES

    lifecycle, backend = daemon(home)
    head = '{"version": 1, "input": "uploads/clip.mp4"'
    for name, size in (("full", MAX_DOCUMENT_BYTES), ("over", MAX_DOCUMENT_BYTES + 1)):
        resumed(lifecycle, home, name, document=head + " " * (size - len(head) - 1) + "}")  # its last byte matters
    assert backend.sent == ["full"]
    assert "a document may be at most 64 KiB" in lifecycle.store.get("over").error["message"]


def test_a_heartbeat_on_time_reads_no_job_and_one_after_a_lapse_reads_each(home):
    """Every claim_seconds / 3 a daemon writes one heartbeat; only after a lapse (two thirds of the
    claim's life) does it read each of its jobs again, to let go of any another daemon took."""
    lifecycle, backend = daemon(home, concurrency=4)
    lifecycle.others_alive = lifecycle.holds.others_alive = True
    for name in ("job-a", "job-b"):
        queue(lifecycle, name)
    reads, real = [], lifecycle.store.get
    lifecycle.store.get = lambda job_id: (reads.append(job_id), real(job_id))[1]
    claim = lifecycle.settings.claim_seconds
    for since, read in ((claim * 0.4, []), (claim * 0.7, ["job-a", "job-b"])):
        lifecycle._beat = time.monotonic() - since
        reads.clear()
        lifecycle.heartbeat()
        assert sorted(reads) == read, since


def test_a_daemon_that_cannot_mark_its_stop_still_stops(home):
    """On shutdown the daemon marks its heartbeat stopped, so others take its jobs at once; if the
    store says no, its holds lapse by themselves after claim_seconds and the shutdown goes on."""
    lifecycle, _ = daemon(home)
    refuse_heartbeats(lifecycle, times=1)
    lifecycle.let_go()  # logged, not raised
    assert lifecycle.stats.get("beats", 0) == 0


def test_media_that_lead_out_of_the_folder_fail_the_job_naming_them(home):
    """A link planted where the media should be is never followed: the job fails naming the media."""
    (home / "uploads" / "planted.mp4").symlink_to("/etc/passwd")
    lifecycle, backend = daemon(home)
    queue(lifecycle, "planted", input="uploads/planted.mp4")
    record = lifecycle.store.get("planted")
    assert record.state == "FAILED" and not backend.sent
    assert "uploads/planted.mp4 cannot be read: planted.mp4 leads outside" in record.error["message"]
    assert record.error["kind"] == "input" and record.error["exit_code"] == 2


def test_a_job_resumed_over_the_bound_is_never_started_again_when_a_slot_frees(home):
    """A job found running after a restart takes a slot even when all are held: it runs already. Its
    slot is held, not waited for: when another job frees one, it is not started a second time."""
    lifecycle, backend = daemon(home, concurrency=1)
    queue(lifecycle, "first")
    resumed(lifecycle, home, "remote", Attempt.new("bacalhau", "remote", "all", 1, state="Running", remote_id="j-9"))
    assert lifecycle.slots.held == {"first", "remote"} and not lifecycle.slots.waiting
    backend.finish("first")
    assert backend.sent == ["first"]


@pytest.mark.parametrize("code,ending", [(0, Ending.SUCCEEDED), (2, Ending.USER_ERROR), (3, Ending.USER_ERROR),
                                         (4, Ending.USER_ERROR), (1, Ending.CRASHED), (5, Ending.CRASHED),
                                         (137, Ending.CRASHED), (None, Ending.CRASHED)])
def test_a_worker_s_exit_code_says_whether_the_job_is_at_fault_or_the_run_crashed(code, ending):
    """2, 3 and 4 are the job's own fault (not retried); anything else is a crash (retried), even a
    code the worker does not define."""
    assert Result.of_exit(code, None).ending is ending


def test_a_job_s_fault_is_recorded_with_the_worker_s_code_and_stage(home):
    lifecycle, backend = daemon(home)
    queue(lifecycle, "bad-scene")
    backend.watching.pop("bad-scene")(Result(Ending.USER_ERROR, "Only 3 of 40 frames were placed.", exit_code=3, stage="sfm"))
    error = lifecycle.store.get("bad-scene").error
    assert (error["exit_code"], error["stage"], error["message"]) == (3, "sfm", "Only 3 of 40 frames were placed.")


def test_an_attempt_name_is_a_valid_unique_bacalhau_name_however_long_the_job_id():
    """At most 63 characters of [a-z0-9-], never ending in '-'; a long id is cut and marked with a
    hash of the whole of it, so ids that share their first 40 characters still name different jobs."""
    import re

    from codsplat.orchestrator.compute import attempt_name

    assert attempt_name("short-id", "train", 2) == "codsplat-short-id-train-a2"
    assert attempt_name("x" * 47, "all", 1) == f"codsplat-{'x' * 47}-all-a1"  # exactly 63: kept whole
    names = set()
    for job_id in ("a" * 62, "a" * 61 + "b", "a" * 39 + "-" + "c" * 22, "a" * 39 + "-" + "d" * 22):
        for stage in ("all", "preprocess", "sm"):
            name = attempt_name(job_id, stage, 12)
            assert len(name) == 63 and re.fullmatch(r"[a-z0-9-]*[a-z0-9]", name) and name.endswith(f"-{stage}-a12"), name
            assert "--" not in name and name.startswith("codsplat-aaaa"), name
            names.add(name)
    assert len(names) == 12


def test_a_stage_reads_what_the_last_successful_attempt_of_each_earlier_stage_published():
    """A crashed attempt may have published part of its folders: only a success's prefix is read."""
    from codsplat.orchestrator.compute import upstream_of

    attempts = [Attempt.new("bacalhau", "up", "preprocess", 1, ending="crashed", published="results/up/work/p1/"),
                Attempt.new("bacalhau", "up", "preprocess", 2, ending="succeeded", published="results/up/work/p2/"),
                Attempt.new("bacalhau", "up", "train", 1, ending="crashed", published="results/up/work/t1/"),
                Attempt.new("bacalhau", "up", "train", 2, ending="succeeded", published=None)]
    assert upstream_of(attempts) == {"preprocess": "results/up/work/p2/"}


def test_an_attempt_stopped_while_running_ends_the_job_cancelled_and_tells_its_user_once(home):
    lifecycle, backend = daemon(home)
    queue(lifecycle, "stopped")
    request_cancel(lifecycle.store, "stopped")
    lifecycle.sweep()
    backend.watching.pop("stopped")(Result(Ending.STOPPED, "stopped by the user"))
    record = lifecycle.store.get("stopped")
    assert record.state == "CANCELLED" and record.attempts[-1]["ending"] == "stopped" and len(backend.stopped) == 1
    assert "stopped while running" in [h["note"] for h in record.history]
    assert [(m["job_id"], m["status"]) for m in messages(home)] == [("stopped", "CANCELLED")]
