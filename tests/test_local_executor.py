"""The embedded backend (orchestrator/executors/local.py) on its own: a real child process per
attempt (tests/stub_worker.py, or a few lines of Python standing for a worker that crashes, hangs or
ignores SIGTERM), how each run's end is told, a stop, and the run a dead daemon left behind. The
daemon tests run the same executor end to end, slower."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codsplat.orchestrator.blobs import FolderBlobs, S3Blobs
from codsplat.orchestrator.compute import Attempt, CannotRun, Ending, Result
from codsplat.orchestrator.executors import local
from codsplat.orchestrator.executors.local import LocalExecutor, _at_stage, run_outcome
from codsplat.orchestrator.job import parse_job
from codsplat.orchestrator.settings import Settings

STUB = [sys.executable, str(Path(__file__).with_name("stub_worker.py"))]
POLICY = Settings().policy


def python(code: str) -> list[str]:
    """A worker that runs `code` (the run's arguments follow it, as `sys.argv[1:]`)."""
    return [sys.executable, "-c", code]


@pytest.fixture
def home(tmp_path):
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "clip.mp4").write_bytes(b"\0" * 100)
    (tmp_path / "uploads" / "one.mp4").write_bytes(b"\0" * 100)
    return tmp_path


def job(media="clip.mp4", job_id="job-1", **doc):
    return parse_job({"version": 1, "id": job_id, "input": f"uploads/{media}", **doc}, POLICY)


def run(executor, document, number=1):
    """Submit an attempt and wait for how it ends."""
    attempt = Attempt("local", "all", number, f"{document.id}-a{number}")
    executor.submit(document, attempt, {})
    ended: queue.Queue[Result] = queue.Queue()
    executor.watch(document, attempt, ended.put)
    return attempt, ended


def test_a_run_that_exports_ends_succeeded_with_its_summary(home):
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=STUB)
    document = job(train={"steps": 300})
    attempt, ended = run(executor, document)
    work = home / "results" / "job-1"
    assert attempt.published == str(work) and attempt.remote_id.isdigit() and executor.active() == 1
    result = ended.get(timeout=60)
    assert result.ending is Ending.SUCCEEDED and result.exit_code == 0
    assert result.summary == {"ok": True, "psnr": 25.0, "ssim": 0.8, "gaussians": 1000, "device": "cpu",
                              "stages": {s: 0.0 for s in ("frames", "sfm", "train", "export")},
                              "files": ["splat.ply", "splat.splat", "splat.spz"]}
    assert executor.active() == 0 and not (work / ".run.pid").exists()
    assert json.loads((work / ".settings.json").read_text()) == json.loads(document.worker_settings())
    assert (work / "logs" / "attempt-1.out").read_text().strip() == json.dumps({"ok": True, "work": str(work)})
    assert not (home / "cache").exists()  # the embedded folder holds the work; nothing is copied


def test_a_run_that_refuses_its_input_ends_as_the_job_s_own_error(home):
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=STUB)
    _, ended = run(executor, job("one.mp4"))
    result = ended.get(timeout=60)
    assert result.ending is Ending.USER_ERROR and result.exit_code == 2 and result.stage == "frames"
    assert "has only 1 frame" in result.message


def test_a_crash_is_told_in_the_run_s_last_log_line_and_the_next_attempt_keeps_its_own_logs(home):
    crash = python("import sys; print('loading', file=sys.stderr); print('Segmentation fault in sfm', file=sys.stderr); "
                   "sys.exit(139)")
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=crash)
    _, ended = run(executor, job(), number=2)
    result = ended.get(timeout=60)
    assert result.ending is Ending.CRASHED and result.exit_code == 139 and result.message == "Segmentation fault in sfm"
    executor.worker = python("import sys; sys.exit(1)")
    _, ended = run(executor, job(), number=3)
    result = ended.get(timeout=60)
    assert result.ending is Ending.CRASHED and "exited with code 1" in result.message
    logs = home / "results" / "job-1" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-2.log", "attempt-2.out", "attempt-3.log", "attempt-3.out"]


def test_a_run_whose_folder_went_away_is_still_told_not_left_running(home):
    gone = python("import shutil, sys; shutil.rmtree(sys.argv[sys.argv.index('--out') + 1])")
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=gone)
    _, ended = run(executor, job())
    result = ended.get(timeout=60)
    assert result.ending is Ending.CRASHED and "could not be read after it ended" in result.message
    assert executor.active() == 0


def test_a_clean_exit_that_exported_nothing_has_no_summary():
    assert run_outcome(Path("/nonexistent/metrics.json")) is None
    assert Result.of_exit(0, None).summary is None


def test_a_stopped_run_ends_stopped_and_one_that_ignores_sigterm_is_killed(home, monkeypatch):
    monkeypatch.setattr(local, "STOP_GRACE_SECONDS", 0.5)
    for worker in (python("import time; time.sleep(120)"),
                   python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)")):
        executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=worker)
        attempt, ended = run(executor, job())
        time.sleep(0.5)  # the child has set its handler
        executor.stop(attempt, "cancelled")
        assert ended.get(timeout=30).ending is Ending.STOPPED
        with pytest.raises(ProcessLookupError):
            os.kill(int(attempt.remote_id), 0)
    executor.stop(Attempt("local", "all", 9, "job-1-a9"), "never started")  # nothing to stop: nothing happens


def test_a_run_left_by_a_dead_daemon_is_stopped_before_the_job_runs_again(home):
    work = home / "results" / "job-1"
    work.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--out", str(work)],
                              start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=STUB)
        (work / ".run.pid").write_text(str(stranger.pid))  # a reused pid: not a run of this folder, left alone
        run(executor, job())[1].get(timeout=60)
        assert stranger.poll() is None
        (work / ".run.pid").write_text(str(orphan.pid))
        result = run(executor, job(), number=2)[1].get(timeout=60)
        assert orphan.wait(timeout=10) == -signal.SIGKILL and result.ending is Ending.SUCCEEDED
        (work / ".run.pid").write_text("not a pid")
        assert run(executor, job(), number=3)[1].get(timeout=60).ending is Ending.SUCCEEDED
    finally:
        for proc in (orphan, stranger):
            proc.kill()
            proc.wait()


def test_a_run_that_cannot_start_ends_the_job_saying_why(home, tmp_path_factory):
    (home / "results").mkdir()
    (home / "results" / "job-1").write_text("a file where the job's folder goes")
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=STUB)
    with pytest.raises(CannotRun) as caught:
        executor.submit(job(), Attempt("local", "all", 1, "job-1-a1"), {})
    assert caught.value.reason == f"its run could not start: File exists ({(home / 'results' / 'job-1').resolve()})"
    outside = tmp_path_factory.mktemp("outside")
    (home / "results" / "job-2").symlink_to(outside)
    with pytest.raises(CannotRun, match="its run could not start: .*leads outside"):
        executor.submit(job(job_id="job-2"), Attempt("local", "all", 1, "job-2-a1"), {})
    assert list(outside.iterdir()) == []
    executor.worker = [str(home / "no-such-worker")]
    with pytest.raises(CannotRun, match="its run could not start: .*no-such-worker"):
        executor.submit(job(job_id="job-3"), Attempt("local", "all", 1, "job-3-a1"), {})
    assert executor.active() == 0


def test_on_s3_the_run_works_in_its_cache_folder_on_the_media_it_downloaded(s3, tmp_path):
    s3.put_object(Bucket="codsplat-data", Key="uploads/clip.mp4", Body=b"\0" * 100)
    executor = LocalExecutor(S3Blobs(s3, "codsplat-data"), POLICY, tmp_path / "cache", worker=STUB)
    attempt, ended = run(executor, job())
    assert ended.get(timeout=60).ending is Ending.SUCCEEDED
    work = tmp_path / "cache" / "job-1"
    assert attempt.published == str(work) and (work / "export" / "splat.ply").is_file()
    assert (work / "media" / "clip.mp4").read_bytes() == b"\0" * 100


def test_the_run_sees_the_deployment_s_extra_environment_and_a_new_daemon_finds_no_run_to_follow(home):
    said = python("import os, sys; print(os.environ['CODSPLAT_DEVICE_NOTE'], os.environ['PATH'] != '', file=sys.stderr); "
                  "sys.exit(1)")
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=said, extra_env={"CODSPLAT_DEVICE_NOTE": "cpu-only"})
    attempt, ended = run(executor, job())
    assert ended.get(timeout=60).message == "cpu-only True"  # added to the daemon's environment, not in place of it
    assert executor.find(job(), attempt) is False  # a run is never resumed: the next submit stops it and resumes its stages
    assert executor.finishes_record is False and executor.name == "local"


def test_a_run_whose_pid_file_is_gone_when_it_ends_still_ends_by_its_own_outcome(home):
    forgets = python("import os, subprocess, sys, time; time.sleep(0.5); out = sys.argv[sys.argv.index('--out') + 1]; "
                     "os.remove(os.path.join(out, '.run.pid')); "
                     f"sys.exit(subprocess.call([{STUB[0]!r}, {STUB[1]!r}, *sys.argv[1:]]))")
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=forgets)
    assert run(executor, job())[1].get(timeout=60).ending is Ending.SUCCEEDED


def test_a_stop_after_the_run_ended_and_a_pid_that_leads_no_group_are_no_errors(home):
    executor = LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=python("pass"))
    attempt = Attempt("local", "all", 1, "job-1-a1")
    executor.submit(job(), attempt, {})
    os.waitpid(int(attempt.remote_id), 0)  # ended and reaped before anyone stops it
    executor.stop(attempt, "cancelled")

    work = home / "results" / "job-1"
    member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--out", str(work)])  # in our group
    try:
        (work / ".run.pid").write_text(str(member.pid))  # names the folder, but no group of its own to stop
        assert run(LocalExecutor(FolderBlobs(home), POLICY, home / "cache", worker=STUB), job(), 2)[1].get(timeout=60).ending \
            is Ending.SUCCEEDED
    finally:
        member.kill()
        member.wait()


def test_a_daemon_that_exits_does_not_wait_for_the_runs_it_was_following(home):
    """The waiting threads are daemon threads: a daemon that stops leaves its runs behind (the next one stops
    them and resumes their jobs from the stages they finished)."""
    script = (f"import sys; sys.path[:0] = {sys.path!r}\n"
              "from pathlib import Path\n"
              "from codsplat.orchestrator.blobs import FolderBlobs\n"
              "from codsplat.orchestrator.compute import Attempt\n"
              "from codsplat.orchestrator.executors.local import LocalExecutor\n"
              "from codsplat.orchestrator.job import parse_job\n"
              "from codsplat.orchestrator.settings import Settings\n"
              f"home = Path({str(home)!r}); policy = Settings().policy\n"
              "executor = LocalExecutor(FolderBlobs(home), policy, home / 'cache', "
              "worker=[sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "document = parse_job({'version': 1, 'id': 'job-1', 'input': 'uploads/clip.mp4'}, policy)\n"
              "attempt = Attempt('local', 'all', 1, 'job-1-a1')\n"
              "executor.submit(document, attempt, {}); executor.watch(document, attempt, print)\n"
              "print(attempt.remote_id, flush=True)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0 and time.monotonic() - started < 30, done.stderr
    run_pid = int(done.stdout.split()[0])
    os.kill(run_pid, 0)  # the run goes on
    os.killpg(run_pid, signal.SIGKILL)


@pytest.mark.parametrize("written, stage, at", [
    ('{"stage": "sfm", "fraction": 0.3}', "sfm", True), ('{"stage": "sfm"}', "train", False),
    (None, "sfm", False), ("{half", "sfm", False), ('{"fraction": 0.3}', "sfm", False),
])
def test_the_crash_tests_know_which_stage_a_run_is_in_from_its_progress_file(tmp_path, written, stage, at):
    if written is not None:
        (tmp_path / "progress.json").write_text(written)
    assert _at_stage(tmp_path, stage) is at
