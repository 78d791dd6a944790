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
