"""Build a daemon (and a record store) from settings: AWS mode, or the embedded default.

Embedded (`--embedded DIR`): the folder is the bucket (`DIR/uploads`, `DIR/jobs`, `DIR/results`),
SQLite at `DIR/codsplat.db` holds the records, notifications are files in `DIR/notifications`, and
jobs run in local processes. AWS: S3 + SQS + DynamoDB + SNS named in the settings, Bacalhau as the
executor (and the local one for `compute.backend: local`).
"""

from __future__ import annotations

import fcntl
import logging
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import IO

from codsplat.pipeline.errors import InputError

from .bacalhau import BacalhauClient
from .blobs import FolderBlobs, S3Blobs
from .daemon import Daemon, DaemonOptions, JsonLogFormatter
from .events import FolderSource, SqsSource
from .executors import BacalhauExecutor, LocalExecutor
from .fallback import SageMakerFallback
from .job import Policy
from .notify import FileNotifier, SnsNotifier
from .records import DynamoStore, SQLiteStore, Store
from .settings import Settings


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("codsplat")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def embedded_policy(settings: Settings) -> Policy:
    return Policy(bucket="local", input_prefixes=tuple(settings.input_prefixes), output_prefix=settings.output_prefix,
                  max_gpus=settings.max_gpus, max_runtime_minutes=settings.max_runtime_minutes)


class CallCounter:
    """Requests the daemon sends, by service (AWS retries included): what a job costs in calls.
    The health endpoint shows them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def __call__(self, service: str) -> None:
        with self._lock:
            self.counts[service] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def aws_client(settings: Settings, service: str, calls: CallCounter | None = None):
    import boto3
    from botocore.config import Config

    # SigV4 presigned links: they carry X-Amz-Expires and cannot outlive 7 days
    config = Config(signature_version="s3v4") if service == "s3" else None
    client = boto3.client(service, endpoint_url=settings.aws_endpoint, region_name=settings.region or "us-east-1", config=config)
    if calls is not None:
        client.meta.events.register("before-send", lambda **_: calls(service))  # per client: counts its own requests
    return client


def store_for(settings: Settings, embedded: Path | None, calls: CallCounter | None = None) -> Store:
    if embedded is not None:
        return SQLiteStore(embedded / "codsplat.db")
    if not settings.table:
        raise InputError("Set the DynamoDB table (table: in the settings, or CODSPLAT_TABLE), or use --embedded DIR.")
    return DynamoStore(settings.table, aws_client(settings, "dynamodb", calls))


def hold_folder(embedded: Path) -> IO:
    """One daemon per embedded folder: two would both resume the same unfinished jobs. A second one
    (a console restarted while the old daemon still winds down) waits for the first to let go."""
    lock = open(embedded / "daemon.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logging.getLogger("codsplat.daemon").warning("another daemon is running on %s; waiting for it to stop", embedded)
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock  # held while the process lives (the kernel lets go when it ends, however it ends)


def build_daemon(settings: Settings, embedded: Path | None = None) -> Daemon:
    options = DaemonOptions(concurrency=settings.concurrency, intake_workers=settings.intake_workers,
                            media_wait_seconds=settings.media_wait_seconds)
    if embedded is not None:
        embedded.mkdir(parents=True, exist_ok=True)
        lock = hold_folder(embedded)
        blobs = FolderBlobs(embedded)
        local = LocalExecutor(blobs, embedded / ".cache")
        return Daemon(store=store_for(settings, embedded), blobs=blobs,
                      source=FolderSource(embedded, settings.jobs_prefix),
                      notifier=FileNotifier(embedded / "notifications"), executors={"local": local},
                      policy=embedded_policy(settings), options=options, folder_lock=lock)
    missing = [name for name in ("queue_url", "table", "topic_arn") if not getattr(settings, name)]
    if missing:
        raise InputError(f"The daemon needs {', '.join(missing)} in its settings (or CODSPLAT_* variables), "
                         "or --embedded DIR to run with no AWS at all.")
    calls = CallCounter()
    blobs = S3Blobs(aws_client(settings, "s3", calls), settings.bucket)
    bacalhau = BacalhauExecutor(BacalhauClient.from_env(on_request=lambda _: calls("bacalhau")), settings.deployment,
                                settings.bacalhau_poll_seconds)
    options.default_backend = "bacalhau"
    store = store_for(settings, None, calls)
    fallback = None
    if settings.state_machine_arn:
        fallback = SageMakerFallback(aws_client(settings, "stepfunctions", calls), settings.state_machine_arn, store,
                                     settings.policy, settings.table, settings.topic_arn, settings.fallback_poll_seconds)
    return Daemon(store=store, blobs=blobs, fallback=fallback,
                  source=SqsSource(aws_client(settings, "sqs", calls), settings.queue_url, settings.jobs_prefix,
                                   wait_seconds=settings.queue_wait_seconds),
                  notifier=SnsNotifier(aws_client(settings, "sns", calls), settings.topic_arn),
                  executors={"bacalhau": bacalhau, "local": LocalExecutor(blobs, Path(settings.cache_dir))},
                  policy=settings.policy, options=options, calls=calls.snapshot)
