"""The one place that decides what the daemon, the console and `codsplat jobs` work on.

Embedded (`--embedded DIR`, the default a new user runs): the folder is the bucket (`DIR/uploads`,
`DIR/jobs`, `DIR/results`), SQLite at `DIR/codsplat.db` holds the records, messages are files in
`DIR/notifications`, and jobs run as local processes. AWS: S3, SQS, DynamoDB and SNS named in the
settings; Bacalhau runs the jobs, and SageMaker (through the fallback state machine) takes those
Bacalhau cannot run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from codsplat.pipeline.errors import EnvironmentProblem, InputError

from .blobs import Blobs, FolderBlobs, S3Blobs
from .compute import Misconfigured
from .daemon import Daemon, JsonLogFormatter, Scheduler, STEP_WORKERS
from .events import FolderSource, SqsSource
from .lifecycle import Lifecycle
from .notify import FileNotifier, Notifier, SnsNotifier
from .records import DynamoStore, SQLiteStore, Store
from .settings import Policy, Settings


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("codsplat")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class CallCounter:
    """Requests sent, by service and by operation (AWS retries included): what a job costs in calls.
    /health shows both."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.by_operation: Counter[str] = Counter()

    def __call__(self, service: str, operation: str = "") -> None:
        with self._lock:
            self.counts[service] += 1
            self.by_operation[f"{service} {operation}".strip()] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def operations(self) -> dict[str, int]:
        with self._lock:
            return dict(self.by_operation)


def bacalhau_route(request) -> str:
    """`GET /api/v1/orchestrator/jobs/{id}/executions`: the route, without ids, for counting."""
    return request.method + " " + re.sub(r"/(jobs|nodes)/[^/]+", r"/\1/{id}", request.url.path)


def aws_client(settings: Settings, service: str, calls: CallCounter | None = None):
    import boto3
    from botocore.config import Config

    # SigV4 presigned links: they carry X-Amz-Expires and cannot outlive 7 days
    config = Config(signature_version="s3v4") if service == "s3" else None
    client = boto3.client(service, endpoint_url=settings.aws_endpoint, region_name=settings.region or "us-east-1", config=config)
    if calls is not None:
        client.meta.events.register(  # per client: counts its own requests
            "before-send", lambda event_name, **_: calls(service, event_name.rsplit(".", 1)[-1]))
    return client


@dataclass
class Backends:
    settings: Settings
    embedded: Path | None
    calls: CallCounter = field(default_factory=CallCounter)

    def __post_init__(self):
        if self.embedded is not None:
            self.embedded = self.embedded.resolve()
            self.embedded.mkdir(parents=True, exist_ok=True)
            self.store: Store = SQLiteStore(self.embedded / "codsplat.db")
            self.blobs: Blobs = FolderBlobs(self.embedded)
            self.policy: Policy = self.settings.embedded_policy
        else:
            if not self.settings.table:
                raise InputError("Set the DynamoDB table (table: in the settings, or CODSPLAT_TABLE), or use --embedded DIR.")
            self.store = DynamoStore(self.settings.table, self.client("dynamodb"), self.settings)
            self.blobs = S3Blobs(self.client("s3"), self.settings.bucket)
            self.policy = self.settings.policy

    def client(self, service: str):
        return aws_client(self.settings, service, self.calls)

    def notifier(self) -> Notifier:
        if self.embedded is not None:
            return FileNotifier(self.embedded / "notifications")
        return SnsNotifier(self.client("sns"), self.settings.topic_arn)

    def source(self):
        if self.embedded is not None:
            return FolderSource(self.embedded, self.settings.jobs_prefix)
        return SqsSource(self.client("sqs"), self.settings.queue_url, self.settings.jobs_prefix,
                         wait_seconds=self.settings.queue_wait_seconds)

    def executors(self) -> tuple[dict, str, str | None]:
        """The executors by name, the default backend, and the fallback (or None)."""
        from .executors.local import LocalExecutor

        if self.embedded is not None:
            local = LocalExecutor(self.blobs, self.policy, self.embedded / ".cache",
                                  **({"worker": self.settings.local_worker} if self.settings.local_worker else {}))
            return {"local": local}, "local", None
        from .bacalhau import BacalhauClient
        from .executors.bacalhau import BacalhauExecutor
        from .executors.sagemaker import SageMakerExecutor

        settings = self.settings
        if settings.bacalhau_api_key_secret and not settings.bacalhau_api_key:
            key = self.client("secretsmanager").get_secret_value(SecretId=settings.bacalhau_api_key_secret)["SecretString"]
            settings = settings.model_copy(update={"bacalhau_api_key": key})
        client = BacalhauClient.from_settings(settings, on_request=lambda request: self.calls("bacalhau", bacalhau_route(request)))
        executors = {"bacalhau": BacalhauExecutor(client, self.settings)}
        if self.settings.state_machine_arn:
            executors["sagemaker"] = SageMakerExecutor(self.client("stepfunctions"), self.client("sagemaker"), self.settings)
        return executors, "bacalhau", "sagemaker" if "sagemaker" in executors else None


def hold_folder(embedded: Path) -> IO:
    """One daemon per embedded folder: two would both resume the same unfinished jobs. A second one
    (a console restarted while the old daemon still winds down) waits for the first to let go."""
    try:  # never through a link planted at daemon.lock: the lock file would be opened for writing elsewhere
        lock = os.fdopen(os.open(embedded / "daemon.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "w")
    except OSError as exc:
        raise InputError(f"{embedded / 'daemon.lock'} cannot be opened as the daemon's lock ({exc.strerror}); "
                         "it must be a plain file (remove a link there).") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logging.getLogger("codsplat.daemon").warning("another daemon is running on %s; waiting for it to stop", embedded)
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock  # held while the process lives (the kernel lets go when it ends, however it ends)


def build_daemon(settings: Settings, embedded: Path | None = None) -> Daemon:
    if embedded is None:
        missing = [name for name in ("queue_url", "table", "topic_arn") if not getattr(settings, name)]
        if missing:
            raise InputError(f"The daemon needs {', '.join(missing)} in its settings (or CODSPLAT_* variables), "
                             "or --embedded DIR to run with no AWS at all.")
    backends = Backends(settings, embedded)
    lock = hold_folder(backends.embedded) if embedded is not None else None
    executors, default, fallback = backends.executors()
    if "bacalhau" in executors:
        try:
            executors["bacalhau"].check_credentials()
        except Misconfigured as exc:
            raise EnvironmentProblem(str(exc)) from None
    scheduler = Scheduler(STEP_WORKERS)
    lifecycle = Lifecycle(backends.store, backends.blobs, backends.notifier(), executors, settings, backends.policy,
                          default, fallback, scheduler, others_alive=embedded is None)
    watchers = [e.watcher.stop for e in executors.values() if hasattr(e, "watcher")]
    return Daemon(lifecycle, backends.source(), scheduler, intake_workers=settings.intake_workers,
                  receivers=settings.intake_receivers if embedded is None else 1,  # a folder is listed by one
                  sweep_seconds=settings.cancel_check_seconds, recover_days=settings.recover_days, folder_lock=lock,
                  calls=backends.calls.snapshot,
                  operations=backends.calls.operations, on_stop=watchers)
