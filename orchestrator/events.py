"""Where job uploads are noticed: S3 events through SNS → SQS, or a watched local folder.

S3 delivers ObjectCreated events for `.json` keys under the jobs prefix to an SNS topic; the queue
subscribed to it receives them wrapped in an SNS envelope (unless raw delivery is on). The same
upload can arrive twice (moto sends Put and CompleteMultipartUpload for one multipart upload, and
SQS delivers at least once), so everything downstream is idempotent on the job id.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

log = logging.getLogger("codsplat.events")


class BadMessage(Exception):
    """A queue message that is not an S3 event we understand."""


@dataclass(frozen=True)
class JobEvent:
    bucket: str | None  # None for the local folder
    key: str  # the job document's key (S3) or path relative to the watched folder
    event: str = "ObjectCreated:Put"
    at: str | None = None  # when the upload happened (S3 eventTime, or the file's mtime), ISO 8601
    upload: str | None = None  # which upload of the key (S3 versionId or ETag, the file's mtime and size): a
    # second event with the same one is the same upload delivered again, another one is the key uploaded again


def parse_message(body: str, jobs_prefix: str = "jobs/") -> list[JobEvent]:
    """Job events in one SQS message body; [] for test events and keys we do not watch."""
    try:
        outer = json.loads(body)
    except json.JSONDecodeError as exc:
        raise BadMessage(f"message body is not JSON ({exc.msg})") from None
    if not isinstance(outer, dict):
        raise BadMessage("message body is not a JSON object")
    inner: Any = outer
    if outer.get("Type") == "Notification" and "Message" in outer:  # the SNS envelope
        try:
            inner = json.loads(outer["Message"])
        except (TypeError, json.JSONDecodeError):
            raise BadMessage("SNS message is not JSON") from None
    if not isinstance(inner, dict):
        raise BadMessage("event is not a JSON object")
    if inner.get("Event") == "s3:TestEvent":  # S3 sends one when the notification is configured
        return []
    records = inner.get("Records")
    if not isinstance(records, list):
        raise BadMessage("message has no S3 Records")
    events = []
    for record in records:
        if record.get("eventSource") != "aws:s3" or not str(record.get("eventName", "")).startswith("ObjectCreated"):
            continue
        try:
            bucket = record["s3"]["bucket"]["name"]
            key = unquote_plus(record["s3"]["object"]["key"])  # S3 URL-encodes keys in events
        except (KeyError, TypeError):
            raise BadMessage("S3 record without bucket or key") from None
        if key.startswith(jobs_prefix) and key.endswith(".json"):
            obj = record["s3"]["object"] if isinstance(record["s3"]["object"], dict) else {}
            upload = obj.get("versionId") or obj.get("eTag") or obj.get("sequencer")
            events.append(JobEvent(bucket, key, record["eventName"], record.get("eventTime"), upload))
    return events


@dataclass
class Delivery:
    """One received message: its events, and how to acknowledge it."""

    events: list[JobEvent]
    receipt: str | None = None
    message_id: str | None = None
    error: str | None = None  # set when the message could not be parsed


class SqsSource:
    def __init__(self, client, queue_url: str, jobs_prefix: str = "jobs/", wait_seconds: int = 20, batch: int = 10):
        self.client, self.queue_url, self.jobs_prefix = client, queue_url, jobs_prefix
        self.wait_seconds, self.batch = wait_seconds, batch

    def receive(self) -> list[Delivery]:
        reply = self.client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=self.batch,
                                            WaitTimeSeconds=self.wait_seconds, AttributeNames=["ApproximateReceiveCount"])
        out = []
        for message in reply.get("Messages", []):
            try:
                events = parse_message(message["Body"], self.jobs_prefix)
                out.append(Delivery(events, message["ReceiptHandle"], message["MessageId"]))
            except BadMessage as exc:
                out.append(Delivery([], message["ReceiptHandle"], message["MessageId"], error=str(exc)))
        return out

    def ack(self, deliveries: list[Delivery]) -> None:
        """Delete handled messages, ten to a call. One the queue refuses to delete is delivered again,
        which is harmless (its job already has a record)."""
        for start in range(0, len(deliveries), 10):
            chunk = deliveries[start:start + 10]
            response = self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": d.receipt} for i, d in enumerate(chunk)])
            for failed in response.get("Failed", []):
                log.warning("the queue did not delete message %s (%s); it will be delivered again",
                            chunk[int(failed["Id"])].message_id, failed.get("Message") or failed.get("Code"))


class FolderSource:
    """The embedded default: job documents dropped into `<root>/jobs/` (subfolders too).

    A file is reported once it has stopped changing for a moment (still being written otherwise);
    reporting one twice is harmless, as with SQS.
    """

    def __init__(self, root: Path, jobs_prefix: str = "jobs/", poll_seconds: float = 0.5, settle_seconds: float = 0.2):
        self.root, self.jobs_prefix = root, jobs_prefix
        self.poll_seconds, self.settle_seconds = poll_seconds, settle_seconds
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()

    def receive(self) -> list[Delivery]:
        jobs = self.root / self.jobs_prefix
        jobs.mkdir(parents=True, exist_ok=True)
        fresh = []
        for path in self._documents(jobs):
            key = str(path.relative_to(self.root))
            try:  # a link is reported as itself (lstat): reading it is where one leading out is refused
                st = path.lstat()
            except OSError:
                continue
            upload = f"{st.st_mtime_ns}:{st.st_size}"
            if self._seen.get(key) == upload or time.time() - st.st_mtime < self.settle_seconds:
                continue
            self._seen[key] = upload
            at = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(timespec="milliseconds")
            fresh.append(Delivery([JobEvent(None, key, at=at, upload=upload)]))
        if not fresh:
            self._stop.wait(self.poll_seconds)
        return fresh

    def ack(self, deliveries: list[Delivery]) -> None:
        pass  # a file stays where it is; its record is what marks it taken

    @staticmethod
    def _documents(jobs: Path) -> list[Path]:
        """Every `.json` under the folder, without following links to folders (a loop, or a link to
        `/`, would stop intake) and without stopping at a folder it cannot read."""
        found = []
        for folder, dirs, files in os.walk(jobs, onerror=lambda exc: log.warning("cannot read %s", exc.filename)):
            dirs.sort()
            found += [Path(folder) / f for f in sorted(files) if f.endswith(".json") and not f.startswith(".")]
        return found
