"""The daemon in its embedded default (a folder, SQLite, file notifications, local processes):
the whole flow, duplicates, bad jobs, and kill -9 at many points of a job's life."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codsplat.orchestrator.backends import build_daemon
from codsplat.orchestrator.events import Delivery, JobEvent
from codsplat.orchestrator.records import SQLiteStore, request_cancel
from codsplat.orchestrator.settings import Settings
from conftest import QUICK
from test_cli_errors import one_frame_video

QUICK_JOB = {"version": 1, "input": "uploads/sample.mp4", "preset": "tiny", "notify": {"email": ["u@example.com"]}, **QUICK}
STAGES = ["frames", "sfm", "train", "export"]


@pytest.fixture
def home(tmp_path, sample_video):
    (tmp_path / "uploads").mkdir()
    (tmp_path / "jobs").mkdir()
    shutil.copy(sample_video, tmp_path / "uploads" / "sample.mp4")
    return tmp_path


def write_job(home: Path, name: str, doc) -> str:
    path = home / "jobs" / f"{name}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return f"jobs/{name}.json"


def sent(home: Path) -> list[dict]:
    log = home / "notifications" / "sent.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def stage_runs(home: Path, job_id: str) -> list[str]:
    log = home / "results" / job_id / "runs.jsonl"
    return [json.loads(line)["stage"] for line in log.read_text().splitlines()] if log.exists() else []


def wait_for(predicate, timeout=300, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    raise AssertionError("timed out")


def run_daemon(home, **settings):
    daemon = build_daemon(Settings(media_wait_seconds=1.0, **settings), home)
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    return daemon, thread


def stop(daemon, thread):
    daemon.stop()
    thread.join(timeout=600)


def test_embedded_flow_from_upload_to_notification(home):
    daemon, thread = run_daemon(home)
    try:
        write_job(home, "kitchen", QUICK_JOB)
        wait_for(lambda: any(m["attributes"]["job_id"] == "kitchen" for m in sent(home)))
    finally:
        stop(daemon, thread)
    record = SQLiteStore(home / "codsplat.db").get("kitchen")
    assert record.state == "SUCCEEDED" and record.notified_at
    assert [h["state"] for h in record.history] == ["RECEIVED", "VALIDATED", "QUEUED", "RUNNING", "SUCCEEDED"]
    result = record.result
    assert result["metrics"]["gaussians"] > 0 and result["device"] == "cpu"
    # docs/deploy.md: GPU-seconds × gpu_hour_usd + CPU-seconds × cpu_hour_usd; on the CPU every stage is CPU time
    stages = result["stage_seconds"]
    assert set(stages) == set(STAGES) and all(s > 0 for s in stages.values())
    assert sum(stages.values()) <= result["wall_seconds"] + 0.1
    assert result["gpu_seconds"] == 0 and result["cpu_seconds"] == pytest.approx(sum(stages.values()), abs=0.1)
    rates = Settings()
    expected = result["gpu_seconds"] / 3600 * rates.gpu_hour_usd + result["cpu_seconds"] / 3600 * rates.cpu_hour_usd
    assert result["estimated_cost_usd"] == pytest.approx(expected, abs=1e-4) and result["estimated_cost_usd"] > 0
    assert "results/kitchen/export/splat.ply" in record.result["outputs"]
    [message] = sent(home)
    assert message["attributes"] == {"job_id": "kitchen", "status": "SUCCEEDED", "recipient": ["u@example.com"]}
    assert "splat.ply: file://" in message["body"] and "PSNR" in message["body"]
    assert stage_runs(home, "kitchen") == STAGES


def test_duplicate_events_run_once_and_notify_once(home):
    daemon = build_daemon(Settings(media_wait_seconds=1.0), home)
    a, b = write_job(home, "twice", QUICK_JOB), write_job(home, "tentimes", QUICK_JOB)
    threads = [threading.Thread(target=daemon.handle, args=([Delivery([JobEvent(None, key)])],))
               for key in [a] * 2 + [b] * 10]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = SQLiteStore(home / "codsplat.db")
    wait_for(lambda: all(store.get(j) and store.get(j).notified_at for j in ("twice", "tentimes")))
    assert daemon.stats["created"] == 2 and daemon.stats["duplicates"] == 10
    for job_id in ("twice", "tentimes"):
        assert store.get(job_id).state == "SUCCEEDED"
        assert stage_runs(home, job_id) == STAGES  # each stage computed once
        assert [m["attributes"]["job_id"] for m in sent(home)].count(job_id) == 1


@pytest.mark.parametrize("name,make,expect", [
    ("notjson", lambda h: "{not json", "jobs/notjson.json is not valid JSON"),
    ("badkey", lambda h: {**QUICK_JOB, "train": {"stepz": 100}}, "train.stepz: unknown key; did you mean 'steps'?"),
    ("nomedia", lambda h: {**QUICK_JOB, "input": "uploads/missing.mp4"}, "was not found (waited 1 s"),
    ("oneframe", lambda h: one_frame_video(h / "uploads" / "one.mp4") or {**QUICK_JOB, "input": "uploads/one.mp4"},
     "has only 1 frame"),
])
def test_bad_jobs_end_failed_with_a_reason_and_the_daemon_lives_on(home, name, make, expect):
    daemon, thread = run_daemon(home)
    try:
        write_job(home, name, make(home))
        wait_for(lambda: sent(home))
        assert thread.is_alive()
    finally:
        stop(daemon, thread)
    record = SQLiteStore(home / "codsplat.db").get(name)
    assert record.state == "FAILED" and expect in record.error["message"]
    assert record.error["advice"] and len(sent(home)) == 1
    assert "What to try next:" in sent(home)[0]["body"]


def test_cancelling_a_running_job_stops_its_run_and_ends_it_cancelled(home):
    daemon, thread = run_daemon(home)
    store = SQLiteStore(home / "codsplat.db")
    try:
        write_job(home, "stopme", {**QUICK_JOB, "train": {"steps": 5000}})
        pid_file = home / "results" / "stopme" / ".run.pid"
        wait_for(lambda: pid_file.is_file() and (home / "results" / "stopme" / "progress.json").is_file())
        pid = int(pid_file.read_text())
        request_cancel(store, "stopme")
        wait_for(lambda: store.get("stopme").terminal, timeout=60)
        wait_for(lambda: sent(home))
    finally:
        stop(daemon, thread)
    record = store.get("stopme")
    assert record.state == "CANCELLED" and record.error is None
    assert record.attempts[-1]["state"] == "Cancelled" and record.attempts[-1]["ending"] == "stopped"
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    [message] = sent(home)
    assert message["attributes"]["status"] == "CANCELLED"


# Points of a job's life where the daemon dies as with kill -9: (point, which job). The bookkeeping
# points run on a stub worker (tests/stub_worker.py) that writes a run's outputs in milliseconds;
# the points inside compute run the real pipeline, and the daemon dies once the run is inside a stage.
BOOKKEEPING = [
    ("before-create", "good"), ("after-create", "good"), ("before-ack", "good"), ("before-media-check", "good"),
    ("before-queue", "good"), ("before-submit", "good"), ("after-attempt-record", "good"), ("after-submit", "good"),
    ("after-running", "good"), ("after-compute", "good"), ("before-succeed", "good"), ("after-succeed", "good"),
    ("before-notify", "good"), ("after-notify", "good"),
    ("after-create", "invalid"), ("before-notify", "invalid"), ("before-fail", "bad-media"), ("after-fail", "bad-media"),
]
IN_COMPUTE = [("during-compute", "sfm"), ("late-in-compute", "train")]
STUB = f"{sys.executable},{Path(__file__).with_name('stub_worker.py')}"


def daemon_process(home, env=None):
    log = open(home / f"daemon-{time.monotonic_ns()}.log", "w")  # a file, not a pipe: a full pipe would block it
    return subprocess.Popen([sys.executable, "-m", "codsplat.orchestrator.cli", "daemon", "--embedded", str(home),
                             "--health-port", "0"], env={**os.environ, "CODSPLAT_MEDIA_WAIT_SECONDS": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True)


def daemon_logs(home) -> str:
    return "\n".join(p.read_text() for p in sorted(home.glob("daemon-*.log")))


def crash_then_restart(home, point, env):
    """The daemon dies at `point`; a restarted one finishes the job. Returns the record."""
    first = daemon_process(home, {**env, "CODSPLAT_CRASH_AT": point})
    try:
        code = first.wait(timeout=300)
    except subprocess.TimeoutExpired:  # it never reached the point: say why instead of hanging
        os.killpg(first.pid, signal.SIGKILL)
        record = SQLiteStore(home / "codsplat.db").get("crash")
        raise AssertionError(f"the daemon never reached {point}: record {record and record.to_json()}\n{daemon_logs(home)}")
    assert code == 137, daemon_logs(home)
    progress = home / "results" / "crash" / "progress.json"
    at_crash = json.loads(progress.read_text()) if progress.exists() else None
    for _ in range(2):  # the second restart comes after the end: its recovery must not tell anyone again
        started = daemon_logs(home).count("unfinished jobs picked up")
        daemon = daemon_process(home, env)
        try:
            wait_for(lambda: sent(home) and SQLiteStore(home / "codsplat.db").get("crash").notified_at
                     and daemon_logs(home).count("unfinished jobs picked up") > started)
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)  # its shutdown first finishes whatever it had scheduled
            assert daemon.wait(timeout=60) == 0, daemon_logs(home)
    return SQLiteStore(home / "codsplat.db").get("crash"), at_crash


@pytest.mark.parametrize("point,kind", BOOKKEEPING, ids=[f"{p}-{k}" for p, k in BOOKKEEPING])
def test_killed_at_any_point_the_job_finishes_once(home, point, kind):
    """The daemon dies at `point` of a job's bookkeeping; a restarted daemon finishes the job with
    each stage computed once and exactly one message."""
    if kind == "bad-media":
        (home / "uploads" / "one.mp4").write_bytes(b"stub")
    job = {"good": QUICK_JOB, "invalid": {**QUICK_JOB, "train": {"stepz": 1}},
           "bad-media": {**QUICK_JOB, "input": "uploads/one.mp4"}}[kind]
    write_job(home, "crash", job)
    record, _ = crash_then_restart(home, point, {"CODSPLAT_LOCAL_WORKER": STUB})
    assert [m["attributes"]["job_id"] for m in sent(home)] == ["crash"]
    if kind == "good":
        assert record.state == "SUCCEEDED", record.to_json()
        assert sorted(stage_runs(home, "crash")) == sorted(STAGES)  # no stage computed twice
    else:
        assert record.state == "FAILED" and sent(home)[0]["attributes"]["status"] == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("point,stage", IN_COMPUTE)
def test_killed_inside_compute_the_run_resumes_and_each_stage_runs_once(home, point, stage):
    """The daemon dies while its run is inside `stage` (the run goes on as an orphan); the restarted
    daemon stops the orphan and resumes: every stage completes exactly once, and one message goes out."""
    write_job(home, "crash", QUICK_JOB)
    record, at_crash = crash_then_restart(home, point, {})
    assert at_crash is not None and at_crash["stage"] == stage, at_crash  # the crash fell inside the stage
    assert record.state == "SUCCEEDED" and [m["attributes"]["job_id"] for m in sent(home)] == ["crash"]
    assert sorted(stage_runs(home, "crash")) == sorted(STAGES)


def test_a_renumbered_job_killed_mid_run_resumes_under_its_own_id(home):
    """Two documents ask for the id `twin`: the second runs as `twin-r2`. The daemon is killed while
    both are under way; the next one resumes each under its record's id (not the document's), in its own
    results folder, and each ends with one message (issue 25: `twin-r2` resumed as `twin`)."""
    write_job(home, "a", {**QUICK_JOB, "id": "twin"})
    write_job(home, "b", {**QUICK_JOB, "id": "twin"})
    slow = {"CODSPLAT_LOCAL_WORKER": f"{sys.executable},{Path(__file__).with_name('slow_worker.py')}"}
    first = daemon_process(home, slow)
    store = SQLiteStore(home / "codsplat.db")
    try:
        wait_for(lambda: (r := store.get("twin-r2")) is not None and r.state in ("QUEUED", "RUNNING")
                 and store.get("twin").state in ("QUEUED", "RUNNING"), timeout=60)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    second = daemon_process(home, {"CODSPLAT_LOCAL_WORKER": STUB})
    try:
        wait_for(lambda: all(store.get(i).notified_at for i in ("twin", "twin-r2")), timeout=90)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=60)
    assert [store.get(i).state for i in ("twin", "twin-r2")] == ["SUCCEEDED", "SUCCEEDED"], daemon_logs(home)
    assert sorted(m["attributes"]["job_id"] for m in sent(home)) == ["twin", "twin-r2"]
    assert store.get("twin-r2").output.rstrip("/").endswith("results/twin-r2")
    assert sorted(stage_runs(home, "twin-r2")) == sorted(STAGES)  # its own folder, every stage once


def test_sigterm_while_a_job_runs_gives_it_the_grace_then_leaves_it_to_the_next_start(home):
    """shutdown_grace_seconds: on SIGTERM the daemon stops taking jobs, gives a running local job the
    grace, and exits; the job stays RUNNING and the next start finishes it, with one message."""
    write_job(home, "graceful", QUICK_JOB)
    env = {"CODSPLAT_SHUTDOWN_GRACE_SECONDS": "1", "CODSPLAT_LOCAL_WORKER": f"{sys.executable},{Path(__file__).with_name('slow_worker.py')}"}
    first = daemon_process(home, env)
    store = SQLiteStore(home / "codsplat.db")
    wait_for(lambda: (r := store.get("graceful")) is not None and r.state == "RUNNING", timeout=60)
    started = time.monotonic()
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert 0.9 <= time.monotonic() - started < 15, "it waited for the grace, then went"  # the env variable is read
    assert store.get("graceful").state == "RUNNING" and not sent(home)
    second = daemon_process(home, {"CODSPLAT_LOCAL_WORKER": STUB})
    try:
        wait_for(lambda: store.get("graceful").notified_at, timeout=60)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=60)
    assert store.get("graceful").state == "SUCCEEDED" and len(sent(home)) == 1


def test_a_run_that_cannot_start_or_whose_folder_goes_ends_failed_and_told(home):
    """A file where the job's results folder goes (the OS refuses the run's start), and a run that
    removes its own logs folder (its wait cannot read them): each job still ends FAILED with a
    sentence and is told, instead of staying VALIDATED or RUNNING with no message."""
    (home / "results").mkdir()
    (home / "results" / "blocked").write_text("a file where the results folder goes")
    vanish = "import shutil, sys; shutil.rmtree(sys.argv[sys.argv.index('--out') + 1] + '/logs')"
    daemon, thread = run_daemon(home, local_worker=[sys.executable, "-c", vanish])
    try:
        write_job(home, "blocked", QUICK_JOB)
        write_job(home, "vanishing", QUICK_JOB)
        wait_for(lambda: {m["attributes"]["job_id"] for m in sent(home)} == {"blocked", "vanishing"}, timeout=120)
    finally:
        stop(daemon, thread)
    store = SQLiteStore(home / "codsplat.db")
    blocked, vanishing = store.get("blocked"), store.get("vanishing")
    assert blocked.state == "FAILED" and "its run could not start" in blocked.error["message"], blocked.error
    assert "results/blocked" in blocked.error["message"]
    assert vanishing.state == "FAILED" and "could not be read after it ended" in vanishing.error["message"], vanishing.error
