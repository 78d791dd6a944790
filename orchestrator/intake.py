"""Intake: a batch of job events in, the records their documents end as out (read one by one, created
in one store request). Every document ends as a record (a refused one saying why) except the same
upload delivered again. A document is bounded before it is read (`config.parse_document`), and
nothing it says is trusted until it validates: a refused one is recorded under an id made from its
file name, with its addresses only if they validate."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from codsplat.pipeline.config import MAX_DOCUMENT_BYTES, parse_document
from codsplat.pipeline.contract import ADVICE
from codsplat.pipeline.errors import InputError

from .blobs import Blobs, Refused
from .events import JobEvent
from .faults import crashpoint
from .job import MAX_RENUMBER, RANDOM_TRIES, JobDocument, job_id_from_key, job_of_record, next_id, owner_of, parse_job, valid_notify
from .records import FAILED, RECEIVED, VALIDATED, JobRecord, Store, now
from .settings import Policy, Settings

log = logging.getLogger("codsplat.daemon")
MAX_ERROR_CHARS = 2000


@dataclass
class Reading:
    """A job document as read: the job, or why it was refused (and what could be read of it)."""

    event: JobEvent
    job: JobDocument | None
    problem: str | None
    data: dict[str, Any]


@dataclass
class Arrival:
    record: JobRecord | None  # None: nothing to record (the same upload again, or the document has gone)
    job: JobDocument | None = None  # None: the document was refused, and the record says why
    duplicate: bool = False


@dataclass
class Intake:
    store: Store
    blobs: Blobs
    policy: Policy
    settings: Settings
    owner: str  # the daemon creating records: it holds the job, and sends a refused one's message

    def take_in(self, readings: list[Reading]) -> list[Arrival]:
        """Create the records of a batch of documents: one store request for all (`Store.create_all`),
        then one for each id that was taken. A taken id (another document's, or an earlier upload of
        this one) is renumbered `<id>-r2`, `-r3`, ...; the same upload delivered again is a duplicate."""
        records = [self._record_of(r) for r in readings]
        first: dict[str, int] = {}  # one create per id in the batch: a second document wanting it waits its turn
        batch = [i for i, record in enumerate(records) if first.setdefault(record.job_id, i) == i]
        crashpoint("before-create")
        taken = dict(zip(batch, self.store.create_all([records[i] for i in batch])))
        return [self._settle(reading, record, taken[i] if i in taken else self.store.create_or_get(record))
                for i, (reading, record) in enumerate(zip(readings, records))]

    def _record_of(self, reading: Reading) -> JobRecord:
        """The record a reading is created as. The folder may have changed since the document was read
        (a link planted): then this document alone is refused."""
        if reading.job is not None:
            try:
                return self._record(reading.event, reading.job.id, reading.job, None, reading.job.notify.email)
            except (Refused, ValueError, OSError) as exc:
                reading.job, reading.problem = None, self._unwritable(reading.job, exc)
        return self._record(reading.event, job_id_from_key(reading.event.key), None, reading.problem, valid_notify(reading.data))

    def _settle(self, reading: Reading, record: JobRecord, taken: JobRecord | None) -> Arrival:
        """Given what holds the id `record` was created under (None: it was created), renumber until
        an id is free, or see the same upload again."""
        event, job, problem, data = reading.event, reading.job, reading.problem, reading.data
        wanted = record.job_id
        for renumbered in range(MAX_RENUMBER + RANDOM_TRIES + 1):
            if taken is None:
                return Arrival(record, job)
            if same_upload(taken, event):
                return Arrival(None, duplicate=True)
            if renumbered == MAX_RENUMBER + RANDOM_TRIES:
                break
            job_id = next_id(wanted, renumbered)
            if job is not None:
                try:  # the job under its new id (an explicit output under the old one no longer fits)
                    job = self._writable(job_of_record(data, job_id, self.policy, owner=owner_of(event.key, self.settings)))
                except InputError as exc:
                    job, problem = None, f"The id {wanted} is taken, and as {job_id}: {exc.message}"
            record = self._record(event, job_id, job, problem, record.notify)
            crashpoint("before-create")
            taken = self.store.create_or_get(record)
        log.error("no free id for %s: %s and its renumberings are all taken", event.key, wanted)
        return Arrival(None)

    def read(self, event: JobEvent) -> Reading:
        """Read and validate one document (one request; the daemon reads a batch's documents at once)."""
        try:
            event.key.encode("utf-8")
        except UnicodeEncodeError:  # a file name of undecodable bytes
            shown = event.key.encode("utf-8", "backslashreplace").decode()
            return Reading(event, None, (f"The file name {shown[:200]} is not UTF-8 text; rename the job "
                                         "document (letters, digits, - and _ are safe)."), {})
        try:  # the size and the first bytes in one request: a document too big is never read further
            head = self.blobs.head(event.key, MAX_DOCUMENT_BYTES + 1)
        except Refused as exc:
            return Reading(event, None, f"{event.key} cannot be read as a job document: {exc}.", {})
        if head is None:
            return Reading(event, None, f"{event.key} was deleted before it could be read; upload it again.", {})
        raw, size = head
        data: dict[str, Any] = {}
        try:
            if size > MAX_DOCUMENT_BYTES:
                raise InputError(f"{event.key} is {size:,} bytes; a job document may be at most "
                                 f"{MAX_DOCUMENT_BYTES // 1024} KiB.")
            data = parse_document(raw, event.key)
            return Reading(event, self._writable(parse_job(data, self.policy, default_id=job_id_from_key(event.key),
                                                           owner=owner_of(event.key, self.settings))), None, data)
        except InputError as exc:
            return Reading(event, None, exc.message, data)

    def _writable(self, job: JobDocument) -> JobDocument:
        """The job, if the store of results can hold its output (a folder refuses a link out of itself,
        or a name its disk cannot hold): decided here, per document, so that no document can cost the
        others read with it their records."""
        try:
            self.blobs.uri(job.output_uri(self.policy).key)
        except (Refused, ValueError, OSError) as exc:
            raise InputError(self._unwritable(job, exc)) from None
        return job

    def _unwritable(self, job: JobDocument, exc: Exception) -> str:
        return f"output: {job.output_uri(self.policy)} cannot be written: {exc}."

    def _record(self, event: JobEvent, job_id: str, job: JobDocument | None, problem: str | None,
                notify: list[str]) -> JobRecord:
        key = event.key.encode("utf-8", "backslashreplace").decode()
        at = now()
        record = JobRecord(job_id=job_id, job_key=key, notify=list(notify), event_at=event.at, upload=event.upload,
                           owner=self.owner, owner_seen_at=at, history=[{"at": at, "state": RECEIVED, "stage": None,
                                                                          "note": event.event}])
        if job is not None:
            record.state, record.input = VALIDATED, job.input
            record.output = self.blobs.uri(job.output_uri(self.policy).key)
            record.history.append({"at": at, "state": VALIDATED, "stage": None, "note": ""})
        else:
            record.state, record.stage = FAILED, "validate"
            record.error = refusal(problem or "The job document could not be read.")
            record.notify_claimed_at, record.notify_claimed_by = at, self.owner  # its creator sends its message
            record.history.append({"at": at, "state": FAILED, "stage": "validate", "note": ""})
        return record


def refusal(message: str) -> dict[str, Any]:
    return {"stage": "validate", "message": message[:MAX_ERROR_CHARS], "advice": ADVICE["input"], "kind": "input",
            "exit_code": 2}


def same_upload(record: JobRecord, event: JobEvent) -> bool:
    """The same document delivered again (SQS is at-least-once; moto sends two events for one
    multipart upload): its key, and no sign of a new upload (an event without one is taken as the same)."""
    return record.job_key == event.key and (not event.upload or not record.upload or record.upload == event.upload)
