"""Job records: one per job, changed only by conditional writes on a version number.

States: RECEIVED → VALIDATED → QUEUED → RUNNING (with a stage) → SUCCEEDED | FAILED | CANCELLED.
Every change appends to `history` with a timestamp and bumps `version`; a write whose version no
longer matches is refused (`Conflict`), so two daemons, or a daemon and the fallback state machine,
never overwrite each other. Creation is a conditional put: a second event for the same job id
changes nothing.

Two stores behind one interface: `SQLiteStore` (the embedded default) and `DynamoStore` (AWS).
"""

from __future__ import annotations

import copy
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol

from codsplat.pipeline.contract import ADVICE, exit_code, parse_failure, parse_outcome

from .pricing import estimate
from .settings import Settings

log = logging.getLogger("codsplat.records")

RECEIVED, VALIDATED, QUEUED, RUNNING = "RECEIVED", "VALIDATED", "QUEUED", "RUNNING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ALLOWED = {
    RECEIVED: {VALIDATED, FAILED, CANCELLED},
    VALIDATED: {QUEUED, FAILED, CANCELLED},
    QUEUED: {RUNNING, FAILED, CANCELLED},
    RUNNING: {RUNNING, SUCCEEDED, FAILED, CANCELLED},  # RUNNING → RUNNING: the next stage
    SUCCEEDED: set(), FAILED: set(), CANCELLED: set(),
}
ORDER = {RECEIVED: 0, VALIDATED: 1, QUEUED: 2, RUNNING: 3, SUCCEEDED: 4, FAILED: 4, CANCELLED: 4}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Conflict(Exception):
    """The record changed since it was read (its version moved on)."""


class InvalidTransition(Exception):
    pass


@dataclass
class JobRecord:
    job_id: str
    job_key: str  # where the job document came from (an S3 key or a local path)
    state: str = RECEIVED
    stage: str | None = None
    version: int = 0
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    event_at: str | None = None  # when the upload's event was raised: intake lag = created_at - event_at
    upload: str | None = None  # which upload of the document (events.JobEvent.upload)
    input: str | None = None
    output: str | None = None
    notify: list[str] = field(default_factory=list)
    backend: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    owner: str | None = None  # the daemon working on the job (AWS: several may serve one queue)
    owner_seen_at: str | None = None  # when it took the job; judged only for an owner with no heartbeat item (ownership.py)
    notify_claimed_at: str | None = None  # a sender claimed the message (conditional write) before sending it
    notify_claimed_by: str | None = None  # which daemon (or "fallback", the SageMaker state machine)
    notified_at: str | None = None
    cancel_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "JobRecord":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Beat(NamedTuple):
    """A daemon's last heartbeat: when, and whether it was still running then (False: it let go)."""

    at: str
    alive: bool


class Store(Protocol):
    def create(self, record: JobRecord) -> bool: ...
    def create_or_get(self, record: JobRecord) -> JobRecord | None:
        """Create the record; when its id is taken, the record that holds it (one request on DynamoDB)."""
    def create_all(self, records: list[JobRecord]) -> list[JobRecord | None]:
        """`create_or_get` for records of distinct ids, in one request where the store has one."""
    def get(self, job_id: str) -> JobRecord | None: ...
    def put(self, record: JobRecord, expected_version: int) -> None: ...
    def list(self, state: str | None = None, limit: int = 100, since: str | None = None) -> list[JobRecord]: ...
    def beat(self, owner: str, at: str, alive: bool = ...) -> None:
        """Record a daemon's heartbeat: one write for all the jobs it holds (ownership.Holds)."""
    def seen(self, owner: str) -> Beat | None:
        """A daemon's last heartbeat, if it ever wrote one."""


def claim(store: Store, record: JobRecord | None, refuse: Callable[[JobRecord], bool],
          stamp: Callable[[JobRecord], None], tries: int = 3) -> JobRecord | None:
    """Stamp a copy of `record` and write it with one conditional put on the version read; on a
    conflict, read it again and judge again. None when `refuse` says it is not ours to take (another
    daemon's, or ended meanwhile). The holds on jobs and the claims on messages are both made so."""
    for _ in range(tries):
        if record is None or refuse(record):
            return None
        mine = copy.deepcopy(record)
        stamp(mine)
        mine.updated_at, mine.version = now(), record.version + 1
        try:
            store.put(mine, record.version)
            return mine
        except Conflict:
            record = store.get(record.job_id)
    return None


def change(store: Store, job_id: str, mutate: Callable[[JobRecord], None], *, to: str | None = None,
           stage: str | None = None, note: str = "", current: JobRecord | None = None, passing: tuple[str, ...] = (),
           retries: int = 20) -> JobRecord:
    """Read, mutate, write conditionally; re-read and retry when another writer got there first.

    With `to`, the state moves (checked against ALLOWED) and the history gets an entry; `passing`
    names states it moves through on the way in the same write (each hop checked, each in the
    history). `current` is the caller's copy of the record (what its last change returned): the
    first try writes on it without a read, and a conflict (or a move the copy's state refuses)
    falls back to reading. Returns the record as written.
    """
    for _ in range(retries):
        from_copy = current is not None
        record = copy.deepcopy(current) if from_copy else store.get(job_id)
        current = None
        if record is None:
            raise KeyError(job_id)
        hops = [s for s in passing if ORDER[s] > ORDER[record.state]] + ([to] if to is not None else [])
        path = [record.state, *hops]
        # a move to the state and stage the record is at already is a no-op write, except at an end:
        # a second ending of an ended job (a second follower of it) must be refused, not written again
        if to is not None and not all(b in ALLOWED[a] or (a == b == to and stage == record.stage and to not in TERMINAL)
                                      for a, b in zip(path, path[1:])):
            if from_copy:
                continue  # the copy may be behind the store: judge the move on the stored record
            raise InvalidTransition(f"{job_id}: {' → '.join(path)} is not allowed")
        expected = record.version
        mutate(record)
        for hop in hops[:-1]:
            record.history.append({"at": now(), "state": hop, "stage": None, "note": ""})
        moves = to is not None and (to, stage) != (record.state, record.stage)
        if moves or note:
            record.history.append({"at": now(), "state": to or record.state, "stage": stage, "note": note})
        if to is not None:
            record.state, record.stage = to, stage
        record.version = expected + 1
        record.updated_at = now()
        try:
            store.put(record, expected)
            return record
        except Conflict:
            time.sleep(0.005)
    raise Conflict(f"{job_id}: too many concurrent updates")


class SQLiteStore:
    """Records in one SQLite file (WAL), safe across threads and processes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("""CREATE TABLE IF NOT EXISTS jobs (
                job_id TEXT PRIMARY KEY, version INTEGER NOT NULL, state TEXT NOT NULL,
                updated_at TEXT NOT NULL, body TEXT NOT NULL)""")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, updated_at)")
            db.execute("CREATE TABLE IF NOT EXISTS daemons (owner TEXT PRIMARY KEY, at TEXT NOT NULL, alive INTEGER NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def create(self, record: JobRecord) -> bool:
        cur = self._db().execute(
            "INSERT OR IGNORE INTO jobs (job_id, version, state, updated_at, body) VALUES (?, ?, ?, ?, ?)",
            (record.job_id, record.version, record.state, record.updated_at, record.to_json()))
        return cur.rowcount == 1

    def create_or_get(self, record: JobRecord) -> JobRecord | None:
        return None if self.create(record) else self.get(record.job_id)

    def create_all(self, records: list[JobRecord]) -> list[JobRecord | None]:
        return [self.create_or_get(record) for record in records]  # local writes: nothing to save by batching

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db().execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRecord.from_json(row[0]) if row else None

    def put(self, record: JobRecord, expected_version: int) -> None:
        cur = self._db().execute(
            "UPDATE jobs SET version = ?, state = ?, updated_at = ?, body = ? WHERE job_id = ? AND version = ?",
            (record.version, record.state, record.updated_at, record.to_json(), record.job_id, expected_version))
        if cur.rowcount != 1:
            raise Conflict(record.job_id)

    def list(self, state: str | None = None, limit: int = 100, since: str | None = None) -> list[JobRecord]:
        if state:
            rows = self._db().execute("SELECT body FROM jobs WHERE state = ? AND updated_at >= ? "
                                      "ORDER BY updated_at DESC LIMIT ?", (state, since or "", limit))
        else:
            rows = self._db().execute("SELECT body FROM jobs ORDER BY updated_at DESC LIMIT ?", (limit,))
        return readable(JobRecord.from_json, (r[0] for r in rows))

    def beat(self, owner: str, at: str, alive: bool = True) -> None:
        self._db().execute("INSERT OR REPLACE INTO daemons (owner, at, alive) VALUES (?, ?, ?)", (owner, at, int(alive)))

    def seen(self, owner: str) -> Beat | None:
        row = self._db().execute("SELECT at, alive FROM daemons WHERE owner = ?", (owner,)).fetchone()
        return Beat(row[0], bool(row[1])) if row else None


def readable(parse: Callable[[Any], JobRecord], raw: Iterable[Any]) -> list[JobRecord]:
    """Records that parse; one that does not (written by a newer version, or damaged) is logged and
    skipped, so one bad record never stops a listing, a recovery or the console."""
    out = []
    for item in raw:
        try:
            out.append(parse(item))
        except Exception as exc:  # noqa: BLE001 - any damage: skip this record, keep the rest
            log.error("skipping an unreadable record (%s: %s)", exc.__class__.__name__, str(exc)[:200])
    return out


class DynamoStore:
    """Records in a DynamoDB table (key `job_id`; GSI `by_state` on `state` + `updated_at`).

    The record body is one JSON attribute, so floats in metrics need no Decimal dance; the state,
    version and time are top-level attributes for conditions and the index. A daemon's heartbeat is
    an item of its own (`~daemon/<owner>`, which no job id can be: ids are `[a-z0-9-]`), with no
    state and no body, so it stays out of the index and out of listings, and expires by TTL.
    """

    BEAT_PREFIX = "~daemon/"

    def __init__(self, table: str, client=None, settings: Settings | None = None):
        import boto3

        self.table = table
        self.client = client or boto3.client("dynamodb")
        self.settings = settings or Settings()  # record_days, and the prices of a fallback run's estimate

    def _item(self, record: JobRecord) -> dict[str, Any]:
        item = {"job_id": {"S": record.job_id}, "version": {"N": str(record.version)},
                "state": {"S": record.state}, "updated_at": {"S": record.updated_at}, "body": {"S": record.to_json()}}
        if record.notified_at:
            item["notified_at"] = {"S": record.notified_at}
        if record.cancel_requested:  # the fallback state machine reads it when its training job stops
            item["cancel_requested"] = {"BOOL": True}
        if record.terminal:  # old finished records expire by TTL
            item["expires_at"] = {"N": str(int(time.time()) + self.settings.record_days * 86400)}
        return item

    def create(self, record: JobRecord) -> bool:
        return self.create_or_get(record) is None

    def create_or_get(self, record: JobRecord) -> JobRecord | None:
        from botocore.exceptions import ClientError

        item = self._item(record)
        try:  # a refused create answers with the item that is there: no second request to read it
            self.client.put_item(TableName=self.table, Item=item, ConditionExpression="attribute_not_exists(job_id)",
                                 ReturnValuesOnConditionCheckFailure="ALL_OLD")
            return None
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return self._holder(record, item, exc.response.get("Item"), exc.response)

    TRANSACTION = 25  # records per transaction (DynamoDB takes 100 items and 4 MB; a new record is a few kB):
    # the records of a transaction refused for one taken id are created one by one, so smaller is cheaper then

    def create_all(self, records: list[JobRecord]) -> list[JobRecord | None]:
        """Creates in transactions of `TRANSACTION` (a transaction costs twice the write units of
        single puts, and saves all but one request: intake creates a received batch at once). A
        refused transaction says why for each record: an id that is taken answers with its holder;
        the records it only held back are created one by one."""
        if len(records) > self.TRANSACTION:
            return [taken for start in range(0, len(records), self.TRANSACTION)
                    for taken in self.create_all(records[start:start + self.TRANSACTION])]
        if len(records) < 2:
            return [self.create_or_get(record) for record in records]
        from botocore.exceptions import ClientError

        items = [self._item(record) for record in records]
        try:
            self.client.transact_write_items(ClientRequestToken=uuid.uuid4().hex, TransactItems=[
                {"Put": {"TableName": self.table, "Item": item, "ConditionExpression": "attribute_not_exists(job_id)",
                         "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}} for item in items])
            return [None] * len(records)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
            refused = exc.response
        reasons = refused.get("CancellationReasons") or [{}] * len(records)
        return [self._holder(record, item, reason.get("Item"), refused)
                if reason.get("Code") == "ConditionalCheckFailed" else self.create_or_get(record)
                for record, item, reason in zip(records, items, reasons)]

    def _holder(self, record: JobRecord, sent: dict[str, Any], held: dict[str, Any] | None,
                response: dict[str, Any]) -> JobRecord | None:
        """Who holds the id a create was refused: None when it is the very record sent, which a retry
        finds after the first try's answer was lost (botocore retries throttling and dropped connections)."""
        if held is None:
            return self.get(record.job_id)
        if response.get("ResponseMetadata", {}).get("RetryAttempts") and held.get("body") == sent["body"]:
            return None
        return self._record(held)

    def get(self, job_id: str) -> JobRecord | None:
        item = self.client.get_item(TableName=self.table, Key={"job_id": {"S": job_id}}, ConsistentRead=True).get("Item")
        return self._record(item) if item and "body" in item else None

    def beat(self, owner: str, at: str, alive: bool = True) -> None:
        self.client.put_item(TableName=self.table, Item={
            "job_id": {"S": self.BEAT_PREFIX + owner}, "beat_at": {"S": at}, "alive": {"BOOL": alive},
            "expires_at": {"N": str(int(time.time()) + 86400)}})

    def seen(self, owner: str) -> Beat | None:
        item = self.client.get_item(TableName=self.table, Key={"job_id": {"S": self.BEAT_PREFIX + owner}},
                                    ConsistentRead=True).get("Item")
        return Beat(item["beat_at"]["S"], item["alive"]["BOOL"]) if item and "beat_at" in item else None

    def _record(self, item: dict[str, Any]) -> JobRecord:
        """The body, brought up to date with what the fallback state machine writes at the top level
        (it cannot edit the JSON body): state, version, time, its end (the worker's outcome line, or
        the reason with its advice), its claim on the message, and when it sent it. The result and
        error come out as the daemon would have written them for a Bacalhau run."""
        record = JobRecord.from_json(item["body"]["S"])
        record.version = int(item["version"]["N"])
        record.updated_at = item["updated_at"]["S"]
        if item["state"]["S"] != record.state:
            fb = {k: v.get("S", "") for k, v in item.get("fallback", {}).get("M", {}).items()}
            record.history.append({"at": record.updated_at, "state": item["state"]["S"], "stage": "sagemaker",
                                   "note": f"by the fallback state machine ({fb.get('training_job', '')})"})
            record.state, record.stage = item["state"]["S"], "sagemaker"
            if record.state == FAILED:
                message, advice, code = parse_failure(fb.get("reason") or "The SageMaker training job failed.")
                kind = exit_code(code).kind if code is not None else "internal"
                record.error = {"stage": "sagemaker", "message": message, "kind": kind, "exit_code": code,
                                "advice": fb.get("advice") or advice or ADVICE.get(kind, ADVICE["internal"])}
            elif record.state == SUCCEEDED:
                summary = parse_outcome(fb.get("summary") or "") or {}
                output = fb.get("output") or record.output or ""
                export = output.partition("://")[2].partition("/")[2] + "export/"  # s3://bucket/<key>
                record.result = {**success_result(summary, export, record.created_at, record.updated_at, 1, self.settings),
                                 "output": fb.get("output"), "backend": "sagemaker"}
        for name in ("notify_claimed_at", "notify_claimed_by", "notified_at"):
            if name in item and not getattr(record, name):
                setattr(record, name, item[name]["S"])
        return record

    def put(self, record: JobRecord, expected_version: int) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.put_item(TableName=self.table, Item=self._item(record),
                                 ConditionExpression="version = :v", ExpressionAttributeValues={":v": {"N": str(expected_version)}})
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise Conflict(record.job_id) from None
            raise

    def list(self, state: str | None = None, limit: int = 100, since: str | None = None) -> list[JobRecord]:
        """The newest `limit` records (of one state), newest first. Every record is in the `by_state`
        index, whose range key is updated_at: all states is the newest `limit` of each, merged, and
        never a scan of the whole table (the console lists on every poll)."""
        if state is None:
            merged = [r for s in ALLOWED for r in self.list(s, limit, since)]  # ALLOWED: every state
            return sorted(merged, key=lambda r: r.updated_at, reverse=True)[:limit]
        values = {":s": {"S": state}, **({":since": {"S": since}} if since else {})}
        pages = self.client.get_paginator("query").paginate(
            TableName=self.table, IndexName="by_state", ExpressionAttributeNames={"#s": "state"},
            KeyConditionExpression="#s = :s" + (" AND updated_at >= :since" if since else ""),
            ExpressionAttributeValues=values, ScanIndexForward=False, PaginationConfig={"PageSize": min(limit, 1000)})
        records: list[JobRecord] = []
        for page in pages:
            records += readable(self._record, page.get("Items", []))
            if len(records) >= limit:
                break
        return records[:limit]

    @staticmethod
    def table_definition(name: str) -> dict[str, Any]:
        """The table as the CDK stack and local set-up create it (one source for both)."""
        return {
            "TableName": name, "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [{"AttributeName": n, "AttributeType": "S"} for n in ("job_id", "state", "updated_at")],
            "KeySchema": [{"AttributeName": "job_id", "KeyType": "HASH"}],
            "GlobalSecondaryIndexes": [{"IndexName": "by_state", "Projection": {"ProjectionType": "ALL"},
                                        "KeySchema": [{"AttributeName": "state", "KeyType": "HASH"},
                                                      {"AttributeName": "updated_at", "KeyType": "RANGE"}]}],
        }


EXPORT_FILES = ("metrics.json", "report.html", "cameras.json")  # beside the splats in export/


def success_result(summary: dict[str, Any], export: str, created_at: str, ended_at: str, gpus: int,
                   settings: Settings) -> dict[str, Any]:
    """A succeeded record's result from the worker's outcome line (`contract.run_summary`): its
    files under `export`, quality, stage times and cost; the same whichever backend ran it."""
    return {
        "outputs": [export + f for f in [*(summary.get("files") or []), *EXPORT_FILES]] if summary.get("files") else [],
        "metrics": {k: summary.get(k) for k in ("psnr", "ssim", "gaussians")},
        "stage_seconds": summary.get("stages") or {}, "device": summary.get("device"),
        "wall_seconds": round(max(0.0, _epoch(ended_at) - _epoch(created_at)), 1),
        **estimate(summary.get("stages") or {}, summary.get("device"), gpus, settings),
    }


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def request_cancel(store: Store, job_id: str) -> JobRecord:
    """Mark a job for cancellation; one that has not started running ends CANCELLED at once, a
    running one is stopped by the daemon at its next check."""
    record = store.get(job_id)
    if record is None:
        raise KeyError(job_id)
    if record.terminal:
        raise InvalidTransition(f"Job {job_id} already ended ({record.state}).")
    record = change(store, job_id, lambda r: setattr(r, "cancel_requested", True), note="cancel requested")
    if record.state in (RECEIVED, VALIDATED, QUEUED):
        record = change(store, job_id, lambda r: None, to=CANCELLED)
    return record
