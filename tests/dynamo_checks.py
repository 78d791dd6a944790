"""DynamoStore against DynamoDB Local. Run by test_dynamodb_local.py inside a private network
namespace (DynamoDB Local binds every interface; the namespace has only its own loopback)."""

import os
import threading
import time
import uuid

import boto3
import pytest

from codsplat.pipeline.contract import ADVICE, exit_code, failure_text

from codsplat.orchestrator.records import (FAILED, QUEUED, RECEIVED, RUNNING, SUCCEEDED, VALIDATED, Conflict,
                                           DynamoStore, InvalidTransition, JobRecord, change, now)


@pytest.fixture(scope="module")
def store():
    client = boto3.client("dynamodb", endpoint_url=os.environ["DYNAMO_ENDPOINT"], region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local")
    name = f"jobs-{uuid.uuid4().hex[:8]}"
    client.create_table(**DynamoStore.table_definition(name))
    client.get_waiter("table_exists").wait(TableName=name)
    return DynamoStore(name, client)


def test_conditional_create_is_idempotent(store):
    assert store.create(JobRecord(job_id="a1", job_key="jobs/a1.json")) is True
    assert store.create(JobRecord(job_id="a1", job_key="jobs/other.json")) is False
    # a refused create answers with the record that holds the id (DynamoDB: in the same reply)
    holder = store.create_or_get(JobRecord(job_id="a1", job_key="jobs/third.json"))
    assert holder.job_key == "jobs/a1.json"
    assert store.create_or_get(JobRecord(job_id="a2", job_key="jobs/a2.json")) is None
    assert store.get("a1").job_key == "jobs/a1.json"


def test_a_batch_is_created_in_one_transaction_and_a_taken_id_answers_with_its_holder(store):
    sent = []

    def count(event_name, **_):
        sent.append(event_name.rsplit(".", 1)[-1])

    store.client.meta.events.register("before-send.dynamodb", count)
    try:
        assert store.create_all([JobRecord(job_id=f"t{i}", job_key=f"jobs/t{i}.json") for i in range(3)]) == [None] * 3
        assert sent == ["TransactWriteItems"]
        # t1 is taken: the transaction is refused whole, says who holds t1, and t8 and t9 are created after it
        sent.clear()
        taken = store.create_all([JobRecord(job_id=i, job_key=f"jobs/{i}-again.json") for i in ("t8", "t1", "t9")])
        assert taken[0] is None and taken[2] is None and taken[1].job_key == "jobs/t1.json"
        assert sent == ["TransactWriteItems", "PutItem", "PutItem"]
        assert [store.get(i).job_key for i in ("t8", "t1", "t9")] == ["jobs/t8-again.json", "jobs/t1.json", "jobs/t9-again.json"]
        # a batch larger than a transaction takes is sent in several (a message can name many keys)
        sent.clear()
        assert store.create_all([JobRecord(job_id=f"u{i}", job_key="jobs/u.json") for i in range(30)]) == [None] * 30
        assert sent == ["TransactWriteItems"] * 2 and store.get("u29") is not None
    finally:
        store.client.meta.events.unregister("before-send.dynamodb", count)


@pytest.mark.parametrize("operation", ["PutItem", "TransactWriteItems"])
def test_a_create_whose_answer_was_lost_is_found_to_be_ours_on_the_retry(store, operation):
    """The write took, its answer did not come back, botocore sent it again: the record that holds
    the id is the one sent, so the create succeeded (the job must not be taken for a duplicate)."""
    tries = []

    def lose_the_first_answer(attempts, **_):
        tries.append(attempts)
        return 0 if attempts == 1 else None  # retry at once, as after a dropped connection

    event = f"needs-retry.dynamodb.{operation}"
    store.client.meta.events.register_first(event, lose_the_first_answer)
    try:
        records = [JobRecord(job_id=f"lost-{operation.lower()}-{i}", job_key="jobs/lost.json") for i in range(2)]
        created = store.create_or_get(records[0]) if operation == "PutItem" else store.create_all(records)
        assert created in (None, [None, None]) and tries[:2] == [1, 2]
    finally:
        store.client.meta.events.unregister(event, lose_the_first_answer)
    # another record under a taken id is still refused, with its holder
    assert store.create_or_get(JobRecord(job_id=records[0].job_id, job_key="jobs/other.json")).job_key == "jobs/lost.json"


def test_a_refused_transaction_that_does_not_say_why_is_created_record_by_record(store):
    """A cancelled transaction names, item by item, why (DynamoDB does); a reply without the reasons
    (a proxy that trims errors) still leaves no record behind: each is created alone, the taken id
    answering with its holder."""
    store.create(JobRecord(job_id="v1", job_key="jobs/v1.json"))

    def without_reasons(parsed, **_):
        parsed.pop("CancellationReasons", None)

    store.client.meta.events.register("after-call.dynamodb.TransactWriteItems", without_reasons)
    try:
        taken = store.create_all([JobRecord(job_id=i, job_key=f"jobs/{i}-new.json") for i in ("v0", "v1", "v2")])
    finally:
        store.client.meta.events.unregister("after-call.dynamodb.TransactWriteItems", without_reasons)
    assert taken[0] is None and taken[2] is None and taken[1].job_key == "jobs/v1.json"
    assert [store.get(i).job_key for i in ("v0", "v1", "v2")] == ["jobs/v0-new.json", "jobs/v1.json", "jobs/v2-new.json"]


def test_a_retried_create_refused_for_another_record_answers_with_that_record(store):
    """The first try's answer was lost and botocore tried again; the id is held, but by a different
    record (another daemon's, from a second upload): that is a duplicate, not our own write found."""
    other = boto3.client("dynamodb", endpoint_url=os.environ["DYNAMO_ENDPOINT"], region_name="us-east-1",
                         aws_access_key_id="local", aws_secret_access_key="local")

    def lost_and_taken(attempts, **_):
        if attempts == 1:  # what holds the id by the retry is not what this try sent
            other.put_item(TableName=store.table, Item=store._item(JobRecord(job_id="w1", job_key="jobs/w1-theirs.json")))
            return 0
        return None

    store.client.meta.events.register_first("needs-retry.dynamodb.PutItem", lost_and_taken)
    try:
        holder = store.create_or_get(JobRecord(job_id="w1", job_key="jobs/w1-ours.json"))
    finally:
        store.client.meta.events.unregister("needs-retry.dynamodb.PutItem", lost_and_taken)
    assert holder is not None and holder.job_key == "jobs/w1-theirs.json"


def test_transitions_bump_the_version_and_keep_history(store):
    store.create(JobRecord(job_id="b1", job_key="k"))
    for state, stage in ((VALIDATED, None), (QUEUED, None), (RUNNING, "preprocess"), (RUNNING, "train"), (SUCCEEDED, None)):
        change(store, "b1", lambda r: None, to=state, stage=stage)
    record = store.get("b1")
    assert record.version == 5 and record.state == SUCCEEDED
    assert [(h["state"], h["stage"]) for h in record.history] == [
        (VALIDATED, None), (QUEUED, None), (RUNNING, "preprocess"), (RUNNING, "train"), (SUCCEEDED, None)]
    with pytest.raises(InvalidTransition):
        change(store, "b1", lambda r: None, to=RUNNING, stage="train")
    with pytest.raises(InvalidTransition):  # ending an ended job again: its second follower must not tell it twice
        change(store, "b1", lambda r: None, to=SUCCEEDED, current=record)


def test_a_move_to_where_a_record_is_already_is_a_no_op_and_a_move_back_is_refused(store):
    """A restarted daemon queues a job that was queued before its crash: that repeat is no move (no
    history entry), while going back a state, or to the same state at another stage, is checked."""
    store.create(JobRecord(job_id="b2", job_key="k"))
    for state in (VALIDATED, QUEUED, QUEUED):
        record = change(store, "b2", lambda r: None, to=state)
    assert record.state == QUEUED and [h["state"] for h in record.history] == [VALIDATED, QUEUED]
    with pytest.raises(InvalidTransition):
        change(store, "b2", lambda r: None, to=VALIDATED)
    with pytest.raises(InvalidTransition):
        change(store, "b2", lambda r: None, to=QUEUED, stage="train")


def test_a_move_through_states_in_one_write_records_each_of_them(store):
    """A queued job's first attempt is recorded with the move QUEUED → RUNNING; one that was still
    VALIDATED passes QUEUED on the way, and its history says so, each hop checked."""
    store.create(JobRecord(job_id="b3", job_key="k"))
    change(store, "b3", lambda r: None, to=VALIDATED)
    record = change(store, "b3", lambda r: None, to=RUNNING, stage="all", passing=(VALIDATED, QUEUED))
    assert [(h["state"], h["stage"]) for h in record.history] == [(VALIDATED, None), (QUEUED, None), (RUNNING, "all")]
    assert store.get("b3").history == record.history and record.version == 2
    store.create(JobRecord(job_id="b4", job_key="k"))
    with pytest.raises(InvalidTransition):  # RECEIVED cannot pass QUEUED: it has not been validated
        change(store, "b4", lambda r: None, to=RUNNING, passing=(QUEUED,))


def test_a_claim_made_on_a_stale_copy_reads_the_record_again_and_judges_it_again(store):
    """A claim is one conditional put on the version read: when the record moved meanwhile it is read
    again, and taken only if it is still free to take (never written over the other writer's change)."""
    from codsplat.orchestrator.records import claim

    refuse = lambda r: bool(r.notified_at)  # noqa: E731 - told already: nothing to claim
    stamp = lambda r: setattr(r, "notify_claimed_by", "me")  # noqa: E731
    for job_id, meanwhile, taken in (("cl1", lambda r: setattr(r, "cancel_requested", True), True),
                                     ("cl2", lambda r: setattr(r, "notified_at", now()), False)):
        store.create(JobRecord(job_id=job_id, job_key="k", state=RUNNING))
        stale = store.get(job_id)
        change(store, job_id, meanwhile)
        claimed = claim(store, stale, refuse, stamp)
        stored = store.get(job_id)
        assert (claimed is not None) == taken and (stored.notify_claimed_by == "me") == taken, job_id
        if taken:  # on the fresh record: the other writer's change is kept
            assert stored.cancel_requested and stored.version == claimed.version == stale.version + 2


def test_a_stale_write_is_refused(store):
    store.create(JobRecord(job_id="c1", job_key="k"))
    stale = store.get("c1")
    change(store, "c1", lambda r: None, to=VALIDATED)
    stale.version += 1
    with pytest.raises(Conflict):
        store.put(stale, stale.version - 1)


def test_a_change_from_the_callers_copy_reads_only_when_it_is_stale(store):
    store.create(JobRecord(job_id="g1", job_key="k"))
    mine = change(store, "g1", lambda r: None, to=VALIDATED)
    reads = []
    counting = type("Counting", (), {"get": lambda self, job_id: reads.append(job_id) or store.get(job_id),
                                     "put": lambda self, r, v: store.put(r, v)})()
    mine = change(counting, "g1", lambda r: None, to=QUEUED, current=mine)
    assert reads == [] and store.get("g1").version == 2
    change(store, "g1", lambda r: setattr(r, "cancel_requested", True))  # another writer (jobs cancel)
    after = change(counting, "g1", lambda r: r.attempts.append({"n": 1}), to=RUNNING, stage="all", current=mine)
    assert reads == ["g1"]  # the stale copy was refused, the record read again, and nothing was lost
    assert after.cancel_requested and after.attempts == [{"n": 1}] and after.version == 4
    assert mine.state == QUEUED  # the caller's copy is left as it was
    assert store.get("g1").to_json() == after.to_json()
    # a move the stale copy's state refuses is judged on the stored record, which allows it
    moved = change(counting, "g1", lambda r: None, to=SUCCEEDED, current=mine)
    assert moved.state == SUCCEEDED and moved.version == 5 and reads == ["g1", "g1"]
    with pytest.raises(InvalidTransition):  # and a move the stored record refuses is still refused
        change(counting, "g1", lambda r: None, to=RUNNING, stage="train", current=after)


def test_concurrent_writers_lose_nothing(store):
    store.create(JobRecord(job_id="d1", job_key="k"))

    def add(i):
        change(store, "d1", lambda r: r.attempts.append({"n": i}))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = store.get("d1")
    assert sorted(a["n"] for a in record.attempts) == list(range(12)) and record.version == 12


def test_list_by_state_uses_the_index(store):
    for i in range(3):
        store.create(JobRecord(job_id=f"e{i}", job_key="k"))
        change(store, f"e{i}", lambda r: None, to=FAILED)
    store.create(JobRecord(job_id="e3", job_key="k"))
    failed, received = store.list(FAILED), store.list(RECEIVED)
    assert {"e0", "e1", "e2"} <= {r.job_id for r in failed} and "e3" not in {r.job_id for r in failed}
    assert "e3" in {r.job_id for r in received} and not {"e0", "e1", "e2"} & {r.job_id for r in received}
    assert all(r.state == FAILED for r in failed) and all(r.state == RECEIVED for r in received)


def test_every_state_is_listed_newest_first_from_the_index_never_by_a_scan(store):
    """The console lists on every poll: the newest records across states come from the `by_state`
    index, a few a state, and the table is never scanned whole."""
    store.create(JobRecord(job_id="n-old", job_key="k", state=SUCCEEDED, updated_at="2020-01-01T00:00:00.000+00:00"))
    for i, state in enumerate((RUNNING, FAILED, RECEIVED)):
        store.create(JobRecord(job_id=f"n{i}", job_key="k", state=state, updated_at=f"2030-01-0{i + 1}T00:00:00.000+00:00"))
    calls = []
    count = lambda model, **kwargs: calls.append(model.name)  # noqa: E731
    store.client.meta.events.register("before-call.dynamodb", count)
    try:
        newest = store.list(None, limit=3)
    finally:
        store.client.meta.events.unregister("before-call.dynamodb", count)
    assert [r.job_id for r in newest] == ["n2", "n1", "n0"]
    assert set(calls) == {"Query"}, calls


def test_what_the_fallback_state_machine_writes_is_read_back(store):
    store.create(JobRecord(job_id="f1", job_key="k"))
    for state, stage in ((VALIDATED, None), (QUEUED, None), (RUNNING, "sagemaker")):
        change(store, "f1", lambda r: None, to=state, stage=stage)
    store.client.update_item(  # the same expression as fallback.asl.json's RecordFailure
        TableName=store.table, Key={"job_id": {"S": "f1"}},
        UpdateExpression="SET #s = :failed, version = version + :one, updated_at = :now, fallback = :fb",
        ConditionExpression="#s = :running", ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":failed": {"S": FAILED}, ":running": {"S": RUNNING}, ":one": {"N": "1"},
                                   ":now": {"S": "2026-01-01T00:00:00Z"},
                                   ":fb": {"M": {"status": {"S": "FAILED"}, "reason": {"S": "out of memory"}}}})
    record = store.get("f1")
    assert record.state == FAILED and record.version == 4 and "out of memory" in record.error["message"]


@pytest.mark.parametrize("reason,fb_advice,expected", [
    (failure_text("Input clip.mp4 is not a readable video.", 2), None,
     ("Input clip.mp4 is not a readable video.", "input", 2, exit_code(2).advice)),
    (failure_text("Input clip.mp4 is not a readable video.", 2), "Upload it again.",
     ("Input clip.mp4 is not a readable video.", "input", 2, "Upload it again.")),
    ("ClientError: capacity error", None, ("ClientError: capacity error", "internal", None, ADVICE["internal"]))])
def test_a_fallback_failure_is_read_back_in_the_worker_s_words(store, reason, fb_advice, expected):
    """The state machine records SageMaker's FailureReason: the worker's sentence, the advice its exit
    code carries and the code come back as a Bacalhau run's error would (advice the state machine
    wrote itself wins); SageMaker's own reasons come back whole, with the internal error's advice."""
    job_id = f"fr-{uuid.uuid4().hex[:6]}"
    store.create(JobRecord(job_id=job_id, job_key="k", state=RUNNING, stage="sagemaker"))
    fb = {"status": {"S": "FAILED"}, "reason": {"S": reason}, **({"advice": {"S": fb_advice}} if fb_advice else {})}
    store.client.update_item(TableName=store.table, Key={"job_id": {"S": job_id}},
                             UpdateExpression="SET #s = :failed, version = version + :one, fallback = :fb",
                             ExpressionAttributeNames={"#s": "state"},
                             ExpressionAttributeValues={":failed": {"S": FAILED}, ":one": {"N": "1"}, ":fb": {"M": fb}})
    error = store.get(job_id).error
    assert (error["message"], error["kind"], error["exit_code"], error["advice"]) == expected


def test_every_read_of_a_record_or_a_heartbeat_is_strongly_consistent(store):
    """Each conditional write starts from a read: an eventually consistent one (DynamoDB's default)
    could be a version behind, and a daemon could judge a live daemon dead from a stale heartbeat."""
    asked = []
    capture = lambda params, **kwargs: asked.append(params.get("ConsistentRead"))  # noqa: E731
    store.client.meta.events.register("provide-client-params.dynamodb.GetItem", capture)
    try:
        store.create(JobRecord(job_id="cr1", job_key="k"))
        change(store, "cr1", lambda r: None, to=VALIDATED)
        store.get("cr1")
        store.beat("daemon-cr", "2026-01-01T00:00:00.000+00:00")
        store.seen("daemon-cr")
    finally:
        store.client.meta.events.unregister("provide-client-params.dynamodb.GetItem", capture)
    assert len(asked) >= 3 and all(a is True for a in asked), asked


def test_a_listing_longer_than_one_page_is_read_whole(store):
    """DynamoDB answers a query at most 1 MB at a time: a listing goes on to the next page until it
    has `limit` records (large records: a long history)."""
    since = now()
    for i in range(5):
        store.create(JobRecord(job_id=f"big{i}", job_key="k", state=SUCCEEDED,
                               history=[{"at": "x", "state": SUCCEEDED, "stage": None, "note": "n" * 300_000}]))
    pages = []
    count = lambda parsed, **kwargs: pages.append(parsed.get("Count"))  # noqa: E731
    store.client.meta.events.register("after-call.dynamodb.Query", count)
    try:
        listed = store.list(SUCCEEDED, limit=5, since=since)
        assert {f"big{i}" for i in range(5)} <= {r.job_id for r in listed} and len(listed) == 5
        assert len(pages) > 1  # the premise: more than one page was read
        first = pages[0]
        pages.clear()
        assert len(store.list(SUCCEEDED, limit=first, since=since)) == first
        assert pages == [first]  # and no page past the one that completes the listing
    finally:
        store.client.meta.events.unregister("after-call.dynamodb.Query", count)


def test_a_damaged_record_is_left_out_of_a_listing_and_the_rest_is_listed(store, caplog):
    """A record that no longer parses (damaged, or written by a newer version) is logged and skipped:
    one bad record never stops a listing, a recovery or the console."""
    since = now()
    store.create(JobRecord(job_id="dm1", job_key="k", state=FAILED))
    damaged = {"job_id": "dm2", "version": 1, "state": FAILED, "updated_at": now(), "body": '{"job_id": "dm2", "sta'}
    if isinstance(store, DynamoStore):
        store.client.put_item(TableName=store.table, Item={k: {"N": str(v)} if k == "version" else {"S": v}
                                                           for k, v in damaged.items()})
    else:  # the embedded SQLite store
        store._db().execute("INSERT INTO jobs (job_id, version, state, updated_at, body) VALUES (?, ?, ?, ?, ?)",
                            tuple(damaged.values()))
    with caplog.at_level("ERROR"):
        listed = [r.job_id for r in store.list(FAILED, since=since)]
    assert [i for i in listed if i.startswith("dm")] == ["dm1"]  # (other checks leave records dated in the future)
    assert any("skipping an unreadable record" in r.getMessage() for r in caplog.records)


def test_a_cancel_is_a_top_level_attribute_the_state_machine_can_read(store):
    """The fallback's state machine reads the cancel mark without parsing the body."""
    from codsplat.orchestrator.records import request_cancel

    store.create(JobRecord(job_id="cx1", job_key="k", state=RUNNING))
    store.create(JobRecord(job_id="cx2", job_key="k", state=RUNNING))
    request_cancel(store, "cx1")
    assert store.get("cx1").cancel_requested and store.get("cx1").state == RUNNING and not store.get("cx2").cancel_requested
    if isinstance(store, DynamoStore):
        item = lambda job_id: store.client.get_item(TableName=store.table, Key={"job_id": {"S": job_id}})["Item"]  # noqa: E731
        assert item("cx1")["cancel_requested"] == {"BOOL": True} and "cancel_requested" not in item("cx2")


def test_list_since_reads_only_recent_records(store):
    store.create(JobRecord(job_id="old1", job_key="k", state=FAILED, updated_at="2020-01-01T00:00:00.000+00:00"))
    store.create(JobRecord(job_id="new1", job_key="k", state=FAILED))
    recent = {r.job_id for r in store.list(FAILED, since="2025-01-01T00:00:00.000+00:00")}
    assert "new1" in recent and "old1" not in recent
    assert "old1" in {r.job_id for r in store.list(FAILED)}


def test_the_console_lists_shows_and_cancels_jobs_kept_in_dynamodb(store, tmp_path):
    """The web console over the DynamoDB store (its AWS mode keeps records there): the job list reads
    the state index, a job page reads one record, a cancel is a conditional write the store keeps."""
    import re

    from starlette.testclient import TestClient

    from codsplat.orchestrator.blobs import FolderBlobs
    from codsplat.orchestrator.console.app import create_app
    from codsplat.orchestrator.console.auth import Guard
    from codsplat.orchestrator.console.service import ConsoleService
    from codsplat.orchestrator.console.uploads import FolderUploads
    from codsplat.orchestrator.settings import Settings

    store.create(JobRecord(job_id="c-queued", job_key="jobs/c-queued.json", state=QUEUED))
    store.create(JobRecord(job_id="c-done", job_key="jobs/c-done.json"))
    for state in (VALIDATED, QUEUED, RUNNING, SUCCEEDED):
        change(store, "c-done", lambda r: None, to=state)
    guard = Guard(token="t", allowed_hosts=frozenset({"testserver"}))
    service = ConsoleService(store, FolderBlobs(tmp_path), FolderUploads(tmp_path, guard.sign_path), Settings().policy, Settings())
    with TestClient(create_app(service, guard)) as client:
        assert client.post("/login", data={"token": "t", "next": "/"}, follow_redirects=False).status_code == 303
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)
        listed = {j["id"]: j["state"] for j in client.get("/api/jobs").json()["jobs"]}
        assert listed["c-queued"] == QUEUED and listed["c-done"] == SUCCEEDED
        shown = client.get("/api/jobs/c-done").json()
        assert shown["state"] == SUCCEEDED and [h["state"] for h in shown["history"]][-1] == SUCCEEDED
        reply = client.post("/api/jobs/c-queued/cancel", headers={"X-CSRF-Token": csrf})
        assert reply.status_code == 200 and reply.json()["state"] == "CANCELLED"
        assert store.get("c-queued").state == "CANCELLED"  # written to DynamoDB, not only shown
        assert client.post("/api/jobs/c-done/cancel", headers={"X-CSRF-Token": csrf}).status_code == 422


def test_only_an_ended_record_expires_and_only_after_the_deployment_s_record_days(store):
    """DynamoDB's TTL deletes a record once its expires_at passes: never one still running."""
    store.create(JobRecord(job_id="x1", job_key="k"))
    raw = lambda: store.client.get_item(TableName=store.table, Key={"job_id": {"S": "x1"}})["Item"]  # noqa: E731
    for state in (VALIDATED, QUEUED, RUNNING):
        change(store, "x1", lambda r: None, to=state)
        assert "expires_at" not in raw(), state
    change(store, "x1", lambda r: None, to=FAILED)
    days = store.settings.record_days * 86400
    assert time.time() + days - 3600 < int(raw()["expires_at"]["N"]) <= time.time() + days + 3600


def test_a_daemons_heartbeat_is_one_item_outside_the_index_and_the_listings(store):
    from codsplat.orchestrator.records import Beat

    assert store.seen("host:1:abc") is None
    store.beat("host:1:abc", "2026-01-01T00:00:00.000+00:00")
    assert store.seen("host:1:abc") == Beat("2026-01-01T00:00:00.000+00:00", True)
    store.beat("host:1:abc", "2026-01-01T00:01:00.000+00:00", alive=False)
    assert store.seen("host:1:abc") == Beat("2026-01-01T00:01:00.000+00:00", False)
    store.create(JobRecord(job_id="h1", job_key="k"))
    listed = [r.job_id for r in store.list(None, 10_000)]
    assert "h1" in listed and not any(i.startswith("~") for i in listed)  # a scan skips the heartbeats
    assert store.get("~daemon/host:1:abc") is None  # never read as a job
    # DynamoDB's TTL removes the heartbeat of a daemon gone for a day, never one still beating
    item = store.client.get_item(TableName=store.table, Key={"job_id": {"S": "~daemon/host:1:abc"}})["Item"]
    assert time.time() + 23 * 3600 < int(item["expires_at"]["N"]) <= time.time() + 25 * 3600
