"""The orchestrator daemon: job uploads in, one finished record and one message out per job.

    source (SQS or a folder) → intake: read + validate the job document, check the media,
        create the record (conditional put: a duplicate event changes nothing), then acknowledge
    → worker pool (bounded): QUEUED → RUNNING(stage) on an executor → SUCCEEDED | FAILED
    → notify once (the record's `notified_at` is the guard)

Nothing is lost: a message is acknowledged only after its job has a record, and on start the daemon
picks up every record that is not finished. Nothing runs twice: records are created conditionally,
executors resume (the local one skips finished stages; Bacalhau attempts are found again by label).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from codsplat.pipeline.errors import InputError

from .blobs import Blobs
from .events import Delivery, JobEvent
from .executors import Executor, Progress
from .faults import crashpoint
from .job import JobDocument, Policy, job_id_from_key, parse_job
from .notify import ADVICE, Notifier, compose
from .records import (CANCELLED, FAILED, QUEUED, RECEIVED, RUNNING, SUCCEEDED, VALIDATED, InvalidTransition, JobRecord,
                      Store, change, now, unfinished)
from .runner import Cancelled, CannotRunHere, JobFailed

log = logging.getLogger("codsplat.daemon")
STAGE_ADVICE = {2: "input", 3: "reconstruction", 4: "quality"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the job id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        for key in ("job_id", "stage", "state", "backend", "error", "subject"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


@dataclass
class DaemonOptions:
    concurrency: int = 2  # jobs at a backend at once
    intake_workers: int = 8  # messages of a receive batch read, validated and recorded at once
    media_wait_seconds: float = 120.0
    media_poll_seconds: float = 2.0
    cancel_check_seconds: float = 5.0  # how soon a running job notices `codsplat jobs cancel`
    recover_days: int = 14  # on start, finished records this recent are checked for a message not yet sent
    link_seconds: int = 7 * 24 * 3600 - 300
    default_backend: str = "local"
    gpu_hour_usd: float = 1.006  # an A10G (g5.xlarge) on-demand hour: the estimate in records
    cpu_hour_usd: float = 0.10


@dataclass
class Daemon:
    store: Store
    blobs: Blobs
    source: Any  # SqsSource | FolderSource
    notifier: Notifier
    executors: dict[str, Executor]
    policy: Policy = field(default_factory=Policy)
    options: DaemonOptions = field(default_factory=DaemonOptions)
    fallback: Callable[[JobDocument, JobRecord, str], None] | None = None  # SageMaker hand-over
    folder_lock: Any = None  # embedded mode: the open lock file that keeps a second daemon off the folder
    calls: Callable[[], dict[str, int]] = dict  # requests sent so far, by service (assemble.CallCounter)

    def __post_init__(self):
        self._pool = ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="job")
        self._intake = ThreadPoolExecutor(max_workers=self.options.intake_workers, thread_name_prefix="intake")
        self._stopping = threading.Event()
        self._inflight: set[str] = set()
        self._handoff: dict[str, tuple[JobDocument | None, JobRecord | None]] = {}  # see submit()
        self._lock = threading.Lock()
        self.stats = {"received": 0, "created": 0, "duplicates": 0, "succeeded": 0, "failed": 0}

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    # ------------------------------------------------------------------ intake

    def handle(self, delivery: Delivery) -> bool:
        """Record every job in a delivery; True when it may be acknowledged. A message we cannot read
        is recorded and left unacknowledged: the queue's redrive policy moves it to the dead-letter queue."""
        if delivery.error:  # recorded, never acknowledged: the redrive policy moves it to the DLQ
            job_id = f"message-{(delivery.message_id or 'unknown')[:36]}"
            record = JobRecord(job_id=job_id, job_key=f"sqs:{delivery.message_id}", state=FAILED, notified_at=now(),
                               error={"stage": "intake", "message": f"Unreadable queue message: {delivery.error}",
                                      "advice": ADVICE["internal"], "kind": "message"},
                               history=[{"at": now(), "state": FAILED, "stage": "intake", "note": delivery.error}])
            self.store.create(record)
            log.error("unreadable message %s: %s", delivery.message_id, delivery.error,
                      extra={"job_id": job_id, "error": delivery.error})
            return False
        for event in delivery.events:
            self.intake(event)
        return True

    def _handle_guarded(self, delivery: Delivery) -> bool:
        if self._stopping.is_set():
            return False  # not acknowledged: it will be delivered again
        try:
            return self.handle(delivery)
        except Exception:  # a store or S3 blip: unacknowledged, the message comes back after its visibility timeout
            log.exception("could not take message %s; it will be delivered again", delivery.message_id)
            return False

    def intake(self, event: JobEvent) -> str | None:
        self._count("received")
        job_id = job_id_from_key(event.key)
        try:
            raw = self.blobs.read(event.key)
        except Exception:  # deleted again before we looked: nothing to do
            log.warning("job document %s has gone", event.key, extra={"job_id": job_id})
            return None
        data, problem = None, None
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("id"), str):
                job_id = data["id"] if len(data["id"]) >= 3 else job_id
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"{event.key} is not valid JSON: {getattr(exc, 'msg', exc)}"
        job = None
        if problem is None:
            try:
                job = parse_job(data, self.policy, default_id=job_id_from_key(event.key))
                job_id = job.id
            except InputError as exc:
                problem = exc.message
        notify = [e for e in (data or {}).get("notify", {}).get("email", []) if isinstance(e, str)] \
            if isinstance(data, dict) and isinstance(data.get("notify"), dict) else []
        record = JobRecord(job_id=job_id, job_key=event.key, notify=notify, event_at=event.at,
                           input=getattr(job, "input", None), history=[{"at": now(), "state": RECEIVED, "stage": None, "note": event.event}])
        crashpoint("before-create")
        if not self.store.create(record):
            self._count("duplicates")
            log.info("duplicate event for %s", job_id, extra={"job_id": job_id})
            return job_id
        self._count("created")
        log.info("job received", extra={"job_id": job_id, "state": RECEIVED})
        crashpoint("after-create")
        if problem:
            self.finish(job_id, self._fail(job_id, "validate", problem, "input", current=record))
            return job_id
        output = self.blobs.uri(job.output_uri(self.policy).key)
        record = change(self.store, job_id, lambda r: setattr(r, "output", output), to=VALIDATED, current=record)
        crashpoint("after-validate")
        self.submit(job_id, job, record)
        return job_id

    def submit(self, job_id: str, job: JobDocument | None = None, record: JobRecord | None = None) -> None:
        """Queue a job for a worker. What the caller already holds (the parsed document, the record
        as last written) goes with it, so the worker need not read them again."""
        with self._lock:
            if job_id in self._inflight:
                return
            self._inflight.add(job_id)
            self._handoff[job_id] = (job, record)
        self._pool.submit(self._run_guarded, job_id)

    # ------------------------------------------------------------------ running

    def _run_guarded(self, job_id: str) -> None:
        try:
            self.run(job_id)
        except InvalidTransition:  # the record moved on meanwhile (cancelled before it ran): announce that
            self.finish(job_id)
        except Exception as exc:  # a bug must fail one job, never the daemon
            log.exception("job crashed the worker", extra={"job_id": job_id})
            try:
                self.finish(job_id, self._fail(job_id, None, f"Internal error: {exc.__class__.__name__}: {exc}", "internal"))
            except Exception:
                log.exception("could not record the failure", extra={"job_id": job_id})
        finally:
            with self._lock:
                self._inflight.discard(job_id)

    def run(self, job_id: str) -> None:
        with self._lock:
            job, record = self._handoff.pop(job_id, (None, None))
        record = record or self.store.get(job_id)
        if record is None or record.terminal:
            if record is not None:
                self.finish(job_id, record)
            return
        job = job or parse_job(json.loads(self.blobs.read(record.job_key)), self.policy, default_id=job_id)
        if record.state == VALIDATED:
            crashpoint("before-media-check")
            if not self._wait_for_media(job):
                return self.finish(job_id, self._fail(
                    job_id, "validate", f"The media {job.input} was not found (waited "
                    f"{self.options.media_wait_seconds:.0f} s for it to finish uploading).", "input", current=record))
            crashpoint("before-queue")
            record = change(self.store, job_id, lambda r: None, to=QUEUED, current=record)
            crashpoint("after-queue")
        if record.cancel_requested:
            return self.finish(job_id, change(self.store, job_id, lambda r: None, to=CANCELLED,
                                              note="cancelled before it ran", current=record))
        if record.backend == "sagemaker":  # handed over before a restart: the state machine finishes it
            if self.fallback and not any(a.get("backend") == "sagemaker" for a in record.attempts):
                self.fallback(job, record, "resumed after a restart")  # died before it was started
            return
        if job.compute.backend == "sagemaker" and self.fallback is not None:
            record = change(self.store, job_id, lambda r: setattr(r, "backend", "sagemaker"), to=RUNNING,
                            stage="sagemaker", note="the job asks for SageMaker", current=record)
            self.fallback(job, record, "the job asks for SageMaker")
            return
        backend = job.compute.backend if job.compute.backend in self.executors else self.options.default_backend
        executor = self.executors[backend]
        record = change(self.store, job_id, lambda r: setattr(r, "backend", backend), to=RUNNING,
                        stage="all" if record.state == QUEUED else record.stage, current=record)
        output_key = job.output_uri(self.policy).key
        crashpoint("after-running")
        started = time.monotonic()
        latest = {"record": record}  # the record as last written while the job runs
        try:
            executor.run(job, output_key, self._progress(job_id, backend, latest))
        except Cancelled as exc:
            return self.finish(job_id, change(self.store, job_id, lambda r: None, to=CANCELLED, stage=exc.stage,
                                              note="stopped while running", current=latest["record"]))
        except JobFailed as exc:
            advice = STAGE_ADVICE.get(exc.exit_code or 0, "internal")
            return self.finish(job_id, self._fail(job_id, exc.stage, exc.message, advice, current=latest["record"]))
        except CannotRunHere as exc:
            if self.fallback is not None and backend != "local":
                record = change(self.store, job_id, lambda r: setattr(r, "backend", "sagemaker"), to=RUNNING,
                                stage="sagemaker", note=f"Bacalhau cannot run it: {exc.reason}", current=latest["record"])
                self.fallback(job, record, exc.reason)
                return
            return self.finish(job_id, self._fail(job_id, exc.stage, f"No backend could run the job: {exc.reason}",
                                                  "compute", current=latest["record"]))
        crashpoint("after-compute")
        record = self.store.get(job_id)  # read once more: a cancel may have come while it ran
        if record.cancel_requested:
            return self.finish(job_id, change(self.store, job_id, lambda r: None, to=CANCELLED, current=record))
        record = self._succeed(job, record, output_key, time.monotonic() - started)
        crashpoint("after-succeed")
        self.finish(job_id, record)

    def _progress(self, job_id: str, backend: str, latest: dict[str, JobRecord]) -> Progress:
        """The executor's reports, written to the record. `latest["record"]` is the record as last
        written: each change starts from it instead of reading it again."""
        def write(mutate: Callable[[JobRecord], None], **how: Any) -> None:
            latest["record"] = change(self.store, job_id, mutate, current=latest["record"], **how)

        def upsert(attempt: dict) -> None:
            def mutate(r: JobRecord) -> None:
                key = (attempt.get("stage"), attempt.get("number"))
                for existing in r.attempts:
                    if (existing.get("stage"), existing.get("number")) == key:
                        existing.update({k: v for k, v in attempt.items() if v is not None}, updated_at=now())
                        return
                r.attempts.append({**attempt, "started_at": now()})
            write(mutate)

        def stage(name: str) -> None:  # called on every poll: writes only when the stage moves
            if latest["record"].stage != name and not latest["record"].terminal:
                write(lambda r: None, to=RUNNING, stage=name)

        checked = {"at": time.monotonic(), "cancel": bool(latest["record"].cancel_requested)}

        def cancelled() -> bool:  # asked on every poll; the store is read at most every few seconds
            if not checked["cancel"] and time.monotonic() - checked["at"] >= self.options.cancel_check_seconds:
                latest["record"] = self.store.get(job_id)
                checked["at"], checked["cancel"] = time.monotonic(), bool(latest["record"].cancel_requested)
            return checked["cancel"]

        return Progress(attempt_started=upsert, attempt_updated=upsert, stage=stage, cancelled=cancelled)

    def _wait_for_media(self, job: JobDocument) -> bool:
        uri = job.input_uri
        deadline = time.monotonic() + self.options.media_wait_seconds
        while True:
            found = self.blobs.exists_prefix(uri.key) if uri.is_prefix else self.blobs.exists(uri.key)
            if found or time.monotonic() >= deadline or self._stopping.is_set():
                return found
            time.sleep(self.options.media_poll_seconds)

    def _succeed(self, job: JobDocument, record: JobRecord, output_key: str, seconds: float) -> JobRecord:
        export = output_key + "export/"
        crashpoint("before-outputs-check")
        keys = self.blobs.list(export)  # one listing answers both: are the outputs there, and which are they
        missing = [name for name in [f"splat.{fmt}" for fmt in job.export.formats] + ["metrics.json"]
                   if export + name not in keys]
        if missing:
            return self._fail(record.job_id, "export", f"The job ended but its outputs are missing: {', '.join(missing)}.",
                              "internal", current=record)
        metrics = json.loads(self.blobs.read(export + "metrics.json"))
        stages = {k: v.get("seconds") for k, v in metrics.get("stages", {}).items()}
        on_gpu = metrics.get("train", {}).get("device") == "cuda"
        gpu_seconds = (stages.get("train") or 0) * job.compute.gpus if on_gpu else 0.0
        cpu_seconds = sum(v or 0 for v in stages.values()) - (stages.get("train") or 0 if on_gpu else 0)
        cost = gpu_seconds / 3600 * self.options.gpu_hour_usd + cpu_seconds / 3600 * self.options.cpu_hour_usd
        result = {
            "outputs": sorted(k for k in keys if "/previews/" not in k),
            "metrics": {k: metrics.get(k) for k in ("psnr", "ssim", "gaussians")},
            "stage_seconds": stages, "gpu_seconds": round(gpu_seconds, 1), "wall_seconds": round(seconds, 1),
            "estimated_cost_usd": round(cost, 4),
        }
        crashpoint("before-succeed")
        record = change(self.store, record.job_id, lambda r: setattr(r, "result", result), to=SUCCEEDED, current=record)
        self._count("succeeded")
        log.info("job succeeded", extra={"job_id": record.job_id, "state": SUCCEEDED})
        return record

    def _fail(self, job_id: str, stage: str | None, message: str, advice: str,
              current: JobRecord | None = None) -> JobRecord:
        error = {"stage": stage, "message": message, "advice": ADVICE[advice], "kind": advice}
        crashpoint("before-fail")
        record = change(self.store, job_id, lambda r: setattr(r, "error", error), to=FAILED, stage=stage, current=current)
        crashpoint("after-fail")
        self._count("failed")
        log.warning("job failed: %s", message, extra={"job_id": job_id, "state": FAILED, "stage": stage})
        return record

    def finish(self, job_id: str, record: JobRecord | None = None) -> None:
        """Send the one message a finished job gets, unless it has been sent. `record`: as the
        caller just wrote it (else it is read)."""
        record = record or self.store.get(job_id)
        if record is None or not record.terminal or record.notified_at:
            return
        links = {}
        for key in (record.result or {}).get("outputs", []):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("splat.") or name in ("report.html", "metrics.json"):
                links[name] = self.blobs.link(key, self.options.link_seconds)
        message = compose(record, links)
        crashpoint("before-notify")
        self.notifier.send(message)
        change(self.store, job_id, lambda r: setattr(r, "notified_at", now()), current=record)
        crashpoint("after-notify")

    # ------------------------------------------------------------------ lifecycle

    def recover(self) -> int:
        """Pick up every unfinished record (a previous daemon died or was stopped)."""
        records = unfinished(self.store)
        for record in records:
            if record.state == RECEIVED:
                self.intake_again(record)
            else:
                self.submit(record.job_id, record=record)
        # a job finished but not yet announced was finished just before a stop: only recent records can be
        since = (datetime.now(timezone.utc) - timedelta(days=self.options.recover_days)).isoformat(timespec="milliseconds")
        for record in (r for state in (SUCCEEDED, FAILED, CANCELLED) for r in self.store.list(state, 100_000, since=since)):
            if not record.notified_at:
                self.finish(record.job_id, record)
        return len(records)

    def intake_again(self, record: JobRecord) -> None:
        """A record created just before a crash: validate and go on from there."""
        try:
            job = parse_job(json.loads(self.blobs.read(record.job_key)), self.policy, default_id=record.job_id)
        except (InputError, ValueError) as exc:
            return self.finish(record.job_id, self._fail(record.job_id, "validate", getattr(exc, "message", str(exc)),
                                                         "input", current=record))
        output = self.blobs.uri(job.output_uri(self.policy).key)
        record = change(self.store, record.job_id, lambda r: setattr(r, "output", output), to=VALIDATED, current=record)
        self.submit(record.job_id, job, record)

    def serve(self, health_port: int | None = None, install_signals: bool = True, grace_seconds: float | None = None) -> None:
        """Take deliveries until stop() (or SIGTERM). Then stop taking messages and give running
        jobs `grace_seconds` to finish; whatever still runs after that is left RUNNING in its record
        and resumes when the daemon starts again (None: wait for all of them)."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        health = self._health_server(health_port) if health_port is not None else None
        log.info("daemon started; %d unfinished jobs picked up", self.recover())
        while not self._stopping.is_set():
            try:
                deliveries = self.source.receive()
            except Exception:
                log.exception("receiving failed; retrying")
                self._stopping.wait(2.0)
                continue
            # a batch is recorded in parallel, then the messages whose jobs all have records are
            # acknowledged in one call
            handled = [d for d, ok in zip(deliveries, self._intake.map(self._handle_guarded, deliveries)) if ok]
            crashpoint("before-ack")
            if handled:
                self._ack(handled)
        self._intake.shutdown(wait=True)
        self._pool.shutdown(wait=grace_seconds is None, cancel_futures=True)
        if grace_seconds is not None:
            deadline = time.monotonic() + grace_seconds
            while self._inflight and time.monotonic() < deadline:
                time.sleep(0.2)
        if health:
            health.shutdown()
        if self.folder_lock is not None:
            self.folder_lock.close()
        if self._inflight:
            log.info("daemon stopped; %d running jobs resume on restart", len(self._inflight))
            for handler in logging.getLogger("codsplat").handlers:
                handler.flush()
            os._exit(0)  # worker threads cannot be interrupted; their records are consistent as they are
        log.info("daemon stopped")

    def _ack(self, deliveries: list[Delivery]) -> None:
        try:
            self.source.ack(deliveries)
        except Exception:  # unacknowledged: delivered again, and the duplicate changes nothing
            log.exception("could not acknowledge %d messages; they will be delivered again", len(deliveries))

    def stop(self) -> None:
        self._stopping.set()

    def _health_server(self, port: int) -> ThreadingHTTPServer:
        daemon = self

        class Health(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = json.dumps({"status": "stopping" if daemon._stopping.is_set() else "ok",
                                   "inflight": len(daemon._inflight), **daemon.stats, "calls": daemon.calls()}).encode()
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if self.path == "/health" else b"{}")

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
