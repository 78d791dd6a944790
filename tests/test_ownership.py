"""Which daemon holds a job (orchestrator/ownership.py): the judgement every take-over makes, on the
embedded SQLite store. Two daemons may share a store; a job must never be taken from a live one,
and a dead one's jobs must be taken."""

import pytest

from codsplat.orchestrator import ownership
from codsplat.orchestrator.ownership import Holds
from codsplat.orchestrator.records import JobRecord, SQLiteStore, now

CLAIM = 60.0
OLD = "2020-01-01T00:00:00.000+00:00"


class CountingStore(SQLiteStore):
    def __init__(self, path):
        super().__init__(path)
        self.looks = 0

    def seen(self, owner):
        self.looks += 1
        return super().seen(owner)


@pytest.fixture
def store(tmp_path):
    return CountingStore(tmp_path / "db.sqlite")


def holds(store, owner="me", others_alive=True):
    return Holds(store, owner, CLAIM, others_alive)


def test_a_heartbeat_is_alive_unless_the_daemon_lets_go(store):
    holds(store, "other").beat()
    assert store.seen("other").alive
    assert holds(store).elsewhere("other", OLD), "a live daemon's job is not ours, whatever its own stamp"
    holds(store, "gone").beat(alive=False)
    assert not holds(store).elsewhere("gone", now()), "a daemon that let go holds nothing, even just now"


def test_only_another_daemon_that_may_be_alive_holds_a_job(store):
    holds(store, "other").beat()
    me = holds(store)
    assert not me.elsewhere(None, now()), "no owner: nobody holds it"
    assert not me.elsewhere("me", now()), "this daemon's own hold"
    assert me.elsewhere("other", now())
    alone = holds(store, others_alive=False)  # an embedded folder: one daemon at a time
    assert not alone.elsewhere("other", now()), "the only daemon there is takes every hold"
    assert alone.take(None) is None and alone.take(JobRecord(job_id="x", job_key="k", state="SUCCEEDED")).state == "SUCCEEDED"
    assert not me.elsewhere("silent", OLD), "no heartbeat and an old stamp: a dead daemon's"
    assert me.elsewhere("silent", now()), "no heartbeat yet (the fallback state machine) but a fresh stamp"


def test_a_job_that_is_gone_or_has_ended_is_not_taken(store):
    me = holds(store)
    assert me.take(None) is None
    done = JobRecord(job_id="done", job_key="jobs/done.json", state="SUCCEEDED", owner="gone", owner_seen_at=OLD)
    store.create(done)
    assert me.take(store.get("done")) is None
    assert store.get("done").owner == "gone", "an ended job's record is not written"


def test_heartbeats_are_read_once_per_sixth_of_the_claim_time_however_many_jobs_are_judged(store, monkeypatch):
    """A take-over judges every record at once; each daemon's heartbeat is read from the store once
    per `claim_seconds` / 6, not once per record, and read again after that."""
    clock = [1000.0]
    monkeypatch.setattr(ownership.time, "monotonic", lambda: clock[0])
    holds(store, "other").beat()
    me = holds(store)
    assert all(me.elsewhere("other", OLD) for _ in range(50))
    assert store.looks == 1
    clock[0] += CLAIM / 6 * 0.9
    me.elsewhere("other", OLD)
    assert store.looks == 1
    holds(store, "other").beat(alive=False)  # it let go meanwhile: seen at the next read
    clock[0] += CLAIM / 6 * 0.2
    assert not me.elsewhere("other", OLD)
    assert store.looks == 2
