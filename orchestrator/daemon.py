"""The orchestrator daemon as a service: the receive loop, the pools, health, signals, restarts.

    source (SQS or a folder) → `receivers` loops, each: receive a batch → intake pool:
        `Lifecycle.receive` records each job → the batch's messages whose jobs all have records
        are acknowledged in one call (with several loops, one batch is recorded while the next is
        on its way)
    step pool: the lifecycle's steps (`schedule`), each short; a backend's work holds no thread
    every cancel_check_seconds: `Lifecycle.sweep` stops what was cancelled

Nothing is lost: a message is acknowledged only after its job has a record, and on start the daemon
resumes every record that is not finished (`Lifecycle.resume`). What a job goes through is in
lifecycle.py; which backends it can use is decided in backends.py.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from .events import Delivery
from .faults import crashpoint
from .lifecycle import Lifecycle
from .records import CANCELLED, FAILED, RECEIVED, RUNNING, SUCCEEDED, VALIDATED, QUEUED, JobRecord, now

log = logging.getLogger("codsplat.daemon")
STEP_WORKERS = 16  # threads for lifecycle steps: each is a few store/blob calls, never a backend's wait


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


class Scheduler:
    """Runs functions on a pool, now or after a delay, and never lets one's exception escape."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="step")
        self._timers: list[tuple[float, int, Callable, tuple]] = []
        self._count = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self.busy = 0
        self._busy_lock = threading.Lock()
        threading.Thread(target=self._timer_loop, name="scheduler", daemon=True).start()

    def __call__(self, fn: Callable, *args: Any, delay: float = 0.0) -> None:
        if delay > 0:
            with self._wake:
                heapq.heappush(self._timers, (time.monotonic() + delay, next(self._count), fn, args))
                self._wake.notify()
            return
        with self._busy_lock:
            self.busy += 1
        try:
            self.pool.submit(self._guarded, fn, args)
        except RuntimeError:  # shutting down: the record is consistent, and the next start resumes it
            with self._busy_lock:
                self.busy -= 1

    def _guarded(self, fn: Callable, args: tuple) -> None:
        try:
            fn(*args)
        except Exception:  # a bug must fail one step, never the daemon; the record shows where the job is
            log.exception("a step of %s failed", getattr(fn, "__name__", fn),
                          extra={"job_id": next((a.job_id for a in args if isinstance(a, JobRecord)), None)})
        finally:
            with self._busy_lock:
                self.busy -= 1

    def _timer_loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (not self._timers or self._timers[0][0] > time.monotonic()):
                    self._wake.wait(timeout=(self._timers[0][0] - time.monotonic()) if self._timers else None)
                if self._stopping:
                    return
                _, _, fn, args = heapq.heappop(self._timers)
            self(fn, *args)

    def shutdown(self, wait: bool) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self.pool.shutdown(wait=wait, cancel_futures=not wait)


@dataclass
class Daemon:
    lifecycle: Lifecycle
    source: Any  # SqsSource | FolderSource
    scheduler: Scheduler
    intake_workers: int = 8
    receivers: int = 1  # receive loops at once (SQS: several; a folder is listed by one)
    sweep_seconds: float = 5.0
    recover_days: int = 14
    folder_lock: Any = None  # embedded mode: the open lock file that keeps a second daemon off the folder
    calls: Callable[[], dict[str, int]] = dict  # requests sent so far, by service (backends.CallCounter)
    operations: Callable[[], dict[str, int]] = dict  # the same by operation ("s3 GetObject", "bacalhau PUT /api/v1/...")
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self):
        self._intake = ThreadPoolExecutor(max_workers=self.intake_workers, thread_name_prefix="intake")
        self._stopping = threading.Event()
        self._burst = threading.Event()  # receives come back full: every receive loop runs
        self._intake_cpu = 0.0  # CPU seconds spent receiving, reading, recording and acknowledging (health)
        self._cpu_lock = threading.Lock()

    @property
    def store(self):
        return self.lifecycle.store

    @property
    def stats(self) -> dict[str, int]:
        return self.lifecycle.stats

    # ------------------------------------------------------------------ intake

    def handle(self, deliveries: list[Delivery]) -> list[bool]:
        """Record every job in a received batch; for each delivery, True when it may be acknowledged.
        The documents are read on the intake pool at once and their records created in one request
        (`Lifecycle.receive`). A message we cannot read is recorded and left unacknowledged: the
        queue's redrive policy moves it to the dead-letter queue."""
        if self._stopping.is_set():
            return [False] * len(deliveries)  # not acknowledged: they will be delivered again
        events = [event for d in deliveries if not d.error for event in d.events]
        try:
            recorded = iter(self.lifecycle.receive(events, read=self._on_intake_pool) if events else ())
        except Exception:  # a store blip: unacknowledged, the messages come back after their visibility timeout
            log.exception("could not take %d messages; they will be delivered again", len(deliveries))
            return [False] * len(deliveries)
        return [self._unreadable(d) if d.error else all([next(recorded) for _ in d.events]) for d in deliveries]

    def _on_intake_pool(self, fn: Callable, items: list) -> list:
        """`map` on the intake pool, each call's CPU counted as intake's."""
        return list(self._intake.map(lambda item: self._timed(fn, item), items))

    def _unreadable(self, delivery: Delivery) -> bool:
        job_id = f"message-{(delivery.message_id or 'unknown')[:36]}"
        record = JobRecord(job_id=job_id, job_key=f"sqs:{delivery.message_id}", state=FAILED, notified_at=now(),
                           error={"stage": "intake", "message": f"Unreadable queue message: {delivery.error}",
                                  "advice": "", "kind": "message"},
                           history=[{"at": now(), "state": FAILED, "stage": "intake", "note": delivery.error}])
        try:
            self.store.create(record)
        except Exception:
            log.exception("could not record unreadable message %s", delivery.message_id)
        log.error("unreadable message %s: %s", delivery.message_id, delivery.error,
                  extra={"job_id": job_id, "error": delivery.error})
        return False

    # ------------------------------------------------------------------ the service

    def recover(self) -> int:
        """Resume every unfinished record, and see out the messages of recently finished ones."""
        records = [r for state in (RECEIVED, VALIDATED, QUEUED, RUNNING) for r in self.store.list(state, 100_000)]
        for record in records:
            self.scheduler(self.lifecycle.resume, record)
        since = (datetime.now(timezone.utc) - timedelta(days=self.recover_days)).isoformat(timespec="milliseconds")
        for record in (r for state in (SUCCEEDED, FAILED, CANCELLED) for r in self.store.list(state, 100_000, since=since)):
            if not record.notified_at:
                self.scheduler(self.lifecycle.announce, record)
        return len(records)

    def serve(self, health_port: int | None = None, install_signals: bool = True, grace_seconds: float | None = None) -> None:
        """Take deliveries until stop() (or SIGTERM). Then stop taking messages and give running
        steps `grace_seconds` to finish; what is still at a backend stays RUNNING in its record and
        is resumed when the daemon starts again (None: wait for every step)."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        health = self._health_server(health_port) if health_port is not None else None
        self.lifecycle.heartbeat()  # before anything is taken over: this daemon's holds are alive from the start
        log.info("daemon started; %d unfinished jobs picked up", self.recover())
        sweeper = threading.Thread(target=self._sweep_loop, name="sweep", daemon=True)
        sweeper.start()
        loops = [threading.Thread(target=self._receive_loop, args=(i,), name=f"receive-{i}", daemon=True)
                 for i in range(self.receivers)]
        for loop in loops:
            loop.start()
        for loop in loops:
            loop.join()
        self._shutdown(grace_seconds, health)

    def _receive_loop(self, number: int) -> None:
        """The first loop always receives; the others only while receives come back full (a burst),
        so an idle queue costs one long poll at a time."""
        while not self._stopping.is_set():
            if number and not self._burst.wait(1.0):
                continue
            try:
                deliveries = self._timed(self.source.receive)
            except Exception:
                log.exception("receiving failed; retrying")
                self._stopping.wait(2.0)
                continue
            if len(deliveries) >= getattr(self.source, "batch", 10):
                self._burst.set()
            elif number == 0:
                self._burst.clear()
            # a batch is recorded at once, then the messages whose jobs all have records are
            # acknowledged in one call
            handled = [d for d, ok in zip(deliveries, self._timed(self.handle, deliveries)) if ok]
            crashpoint("before-ack")
            if handled:
                self._timed(self._ack, handled)

    def _timed(self, fn: Callable, *args):
        """fn(*args), its thread's CPU time counted as intake's: what taking a job in costs the daemon
        (health: `cpu_seconds`), apart from the work each job goes on to."""
        start = time.thread_time()
        try:
            return fn(*args)
        finally:
            with self._cpu_lock:
                self._intake_cpu += time.thread_time() - start

    def _shutdown(self, grace_seconds: float | None, health) -> None:
        """Steps in progress and local runs get `grace_seconds` to finish (a job on Bacalhau or
        SageMaker runs on without us); whatever is still running stays RUNNING in its record and is
        resumed by the next start."""
        self._intake.shutdown(wait=True)
        for hook in self.on_stop:
            hook()
        deadline = time.monotonic() + (grace_seconds if grace_seconds is not None else float("inf"))
        while (self.scheduler.busy or self.lifecycle.local_runs()) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.scheduler.shutdown(wait=False)
        self.lifecycle.let_go()
        if health:
            health.shutdown()
        if self.folder_lock is not None:
            self.folder_lock.close()
        running = len(self.lifecycle.flights)
        log.info("daemon stopped" + (f"; {running} running jobs resume on restart" if running else ""))

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.sweep_seconds):
            try:
                self.lifecycle.sweep()
            except Exception:
                log.exception("the cancel sweep failed; it runs again shortly")

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
                                   "inflight": len(daemon.lifecycle.flights), "queued": len(daemon.lifecycle.slots.waiting),
                                   **daemon.stats, "calls": daemon.calls(),
                                   "cpu_seconds": {"intake": round(daemon._intake_cpu, 3),
                                                   "process": round(time.process_time(), 3)},
                                   "operations": daemon.operations()}).encode()
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if self.path == "/health" else b"{}")

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
