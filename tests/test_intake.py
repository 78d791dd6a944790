"""Intake's duplicate rule on the embedded store: the same upload delivered again is a duplicate (SQS
is at-least-once), the same key uploaded again is a new job, renumbered."""

import json

from codsplat.orchestrator.blobs import FolderBlobs
from codsplat.orchestrator.events import JobEvent
from codsplat.orchestrator.intake import Intake
from codsplat.orchestrator.records import SQLiteStore
from codsplat.orchestrator.settings import Settings


def test_the_same_upload_again_is_a_duplicate_and_the_same_key_uploaded_again_a_new_job(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "scan.json").write_text(json.dumps({"version": 1, "input": "uploads/x.mp4"}))
    settings = Settings()
    intake = Intake(SQLiteStore(tmp_path / "db.sqlite"), FolderBlobs(tmp_path), settings.policy, settings, "me")

    def arrive(upload):
        [arrival] = intake.take_in([intake.read(JobEvent(None, "jobs/scan.json", upload=upload))])
        return arrival

    assert arrive("mtime-1").record.job_id == "scan"
    again = arrive("mtime-1")
    assert again.duplicate and again.record is None
    reupload = arrive("mtime-2")
    assert not reupload.duplicate and reupload.record.job_id == "scan-r2" and reupload.job.id == "scan-r2"
    assert arrive("mtime-2").duplicate  # and that upload, delivered again, is a duplicate in its turn


def test_an_id_squatted_past_every_renumbering_still_gets_a_record_under_a_random_suffix(tmp_path):
    """Someone uploads kitchen.json and kitchen-r2.json … kitchen-r51.json; another user's kitchen.json
    then finds every renumbering taken. It used to get no record and no message; it gets its own id."""
    import re

    from codsplat.orchestrator.job import MAX_RENUMBER

    (tmp_path / "jobs").mkdir()
    settings = Settings()
    intake = Intake(SQLiteStore(tmp_path / "db.sqlite"), FolderBlobs(tmp_path), settings.policy, settings, "me")
    names = ["kitchen"] + [f"kitchen-r{n}" for n in range(2, MAX_RENUMBER + 2)]
    for name in names:
        (tmp_path / "jobs" / f"{name}.json").write_text(json.dumps({"version": 1, "input": "uploads/x.mp4"}))
    squatted = intake.take_in([intake.read(JobEvent(None, f"jobs/{name}.json", upload="u1")) for name in names])
    assert [a.record.job_id for a in squatted] == names
    [victim] = intake.take_in([intake.read(JobEvent(None, "jobs/kitchen.json", upload="u2"))])
    assert victim.record is not None and re.fullmatch(r"kitchen-[0-9a-f]{8}", victim.record.job_id)
    assert victim.job.id == victim.record.job_id and victim.record.state == "VALIDATED"


def intake_at(tmp_path):
    (tmp_path / "jobs").mkdir(exist_ok=True)
    settings = Settings()
    return Intake(SQLiteStore(tmp_path / "db.sqlite"), FolderBlobs(tmp_path), settings.policy, settings, "me")


def failed_with(intake, key):
    [arrival] = intake.take_in([intake.read(JobEvent(None, key, upload="u1"))])
    assert arrival.job is None and arrival.record.state == "FAILED", arrival.record
    return arrival.record.error["message"]


def test_every_document_that_cannot_be_a_job_gets_a_record_saying_why(tmp_path):
    """Each becomes a FAILED record (so its user is told), never a traceback: a name that is not UTF-8,
    a link out of the folder, too many bytes, not JSON, gone before it was read."""
    import os

    intake = intake_at(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"
    outside.write_text("{}")
    os.symlink(outside, tmp_path / "jobs" / "link.json")
    (tmp_path / "jobs" / "big.json").write_text('{"version": 1, "pad": "' + "x" * 70_000 + '"}')
    (tmp_path / "jobs" / "bad.json").write_text('{"version": 1,')
    assert "is not UTF-8 text; rename the job document" in failed_with(intake, "jobs/caf\udce9.json")
    assert "jobs/link.json cannot be read as a job document" in failed_with(intake, "jobs/link.json")
    assert "a job document may be at most 64 KiB" in failed_with(intake, "jobs/big.json")
    assert "jobs/bad.json is not valid JSON" in failed_with(intake, "jobs/bad.json")
    assert "was deleted before it could be read" in failed_with(intake, "jobs/gone.json")


def test_a_document_of_exactly_the_largest_size_is_read_whole(tmp_path):
    from codsplat.pipeline.config import MAX_DOCUMENT_BYTES

    intake = intake_at(tmp_path)
    start, end = '{"version": 1,', ' "input": "uploads/x.mp4"}'  # its last byte closes it: a cut would show
    (tmp_path / "jobs" / "full.json").write_text(start + " " * (MAX_DOCUMENT_BYTES - len(start) - len(end)) + end)
    assert (tmp_path / "jobs" / "full.json").stat().st_size == MAX_DOCUMENT_BYTES
    [arrival] = intake.take_in([intake.read(JobEvent(None, "jobs/full.json", upload="u1"))])
    assert arrival.job is not None and arrival.record.state == "VALIDATED"


def test_a_job_whose_output_became_a_link_out_of_the_folder_is_refused_alone(tmp_path):
    """The folder may change between reading a batch and recording it: a link planted where one job
    writes its results refuses that job only, naming its output; the batch's other job goes on."""
    import os

    intake = intake_at(tmp_path)
    for name in ("planted", "fine"):
        (tmp_path / "jobs" / f"{name}.json").write_text(json.dumps({"version": 1, "input": "uploads/x.mp4"}))
    readings = [intake.read(JobEvent(None, f"jobs/{name}.json", upload="u1")) for name in ("planted", "fine")]
    (tmp_path / "results").mkdir()
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "results" / "planted")
    planted, fine = intake.take_in(readings)
    assert planted.job is None and planted.record.state == "FAILED"
    assert "output: " in planted.record.error["message"] and "cannot be written" in planted.record.error["message"]
    assert fine.job is not None and fine.record.state == "VALIDATED"


def test_an_id_whose_every_renumbering_and_random_suffix_is_taken_gets_no_record_after_the_last_try(tmp_path):
    """Every id tried is somebody else's: the renumberings, then each random suffix, all of them and
    no more; then no record, rather than a loop or a record that overwrites another's."""
    from codsplat.orchestrator.job import MAX_RENUMBER, RANDOM_TRIES
    from codsplat.orchestrator.records import JobRecord

    class Squatted(SQLiteStore):
        tried = []

        def create_or_get(self, record):
            self.tried.append(record.job_id)
            return JobRecord(job_id=record.job_id, job_key="jobs/someone-else.json", upload="theirs")

    settings = Settings()
    intake = Intake(Squatted(tmp_path / "db.sqlite"), FolderBlobs(tmp_path), settings.policy, settings, "me")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "den.json").write_text(json.dumps({"version": 1, "input": "uploads/x.mp4"}))
    [arrival] = intake.take_in([intake.read(JobEvent(None, "jobs/den.json", upload="mine"))])
    assert arrival.record is None and not arrival.duplicate
    assert len(Squatted.tried) == 1 + MAX_RENUMBER + RANDOM_TRIES
    assert Squatted.tried[:3] == ["den", "den-r2", "den-r3"] and len(set(Squatted.tried)) == len(Squatted.tried)


def test_a_job_uploaded_again_whose_output_names_its_old_id_fails_saying_both_ids(tmp_path):
    """Renumbered, a job whose document names its output under the id it wanted no longer fits it:
    its record says the id was taken and why the new one cannot be used, rather than writing into
    the first job's results."""
    intake = intake_at(tmp_path)
    (tmp_path / "jobs" / "scan.json").write_text(json.dumps({"version": 1, "input": "uploads/x.mp4", "output": "results/scan/"}))
    [first] = intake.take_in([intake.read(JobEvent(None, "jobs/scan.json", upload="u1"))])
    assert first.job is not None and first.record.job_id == "scan"
    [again] = intake.take_in([intake.read(JobEvent(None, "jobs/scan.json", upload="u2"))])
    assert again.job is None and again.record.job_id == "scan-r2" and again.record.state == "FAILED"
    assert again.record.error["message"].startswith("The id scan is taken, and as scan-r2: "), again.record.error
