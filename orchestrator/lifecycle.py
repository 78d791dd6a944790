"""A job's life, from its upload to its one message: the daemon's state machine, top to bottom.

    receive   RECEIVED → VALIDATED | FAILED   read the document (bounded), validate it, create the record
    admit     VALIDATED                       the media are there (looked at again until media_wait_seconds)
    start     → QUEUED → RUNNING(stage)       a free slot; the backend's preflight; the first attempt sent
    ended     RUNNING → RUNNING(next stage) | SUCCEEDED | FAILED | CANCELLED, by `compute.decide`;
              a job that cannot run here is handed to the fallback backend (SageMaker)
    announce  the one message: claimed by a conditional write, sent, then marked sent

Every step writes the record once, conditionally on its version, on the copy the step before wrote
(`records.change(current=...)`), so a job costs a handful of writes and another writer's change is
never lost. A step runs on the daemon's pool (`schedule`) and holds no thread while a backend works:
executors call back when an attempt ends. At most `concurrency` jobs hold a backend at once; the
rest wait for a slot in arrival order, their records still VALIDATED (a write per waiting job would
cost the most when the most jobs wait); the write that starts a job records QUEUED and RUNNING. A
restarted daemon `resume`s every record that is not finished.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from codsplat.pipeline.config import MAX_DOCUMENT_BYTES, parse_document
from codsplat.pipeline.contract import ADVICE, EXIT_CANNOT_RUN, EXIT_INTERNAL, exit_code

from .blobs import Blobs, Refused
from .compute import (Attempt, CannotRun, Done, Ending, Executor, Fail, Misconfigured, Result, Stopped, Submit, decide, first_step,
                      upstream_of)
from .events import JobEvent
from .faults import crashpoint
from .job import JobDocument, job_of_record, owner_of
from .notify import Notifier, compose
from .intake import MAX_ERROR_CHARS, Intake, Reading
from .ownership import Holds
from .records import (CANCELLED, FAILED, QUEUED, RECEIVED, RUNNING, SUCCEEDED, VALIDATED, InvalidTransition,
                      JobRecord, Store, change, claim, now, success_result)
from .settings import Policy, Settings

log = logging.getLogger("codsplat.daemon")


@dataclass
class Flight:
    """A job this daemon is working on: the document, and the record as last written."""

    job: JobDocument
    record: JobRecord
    lock: threading.RLock = field(default_factory=threading.RLock)  # one step of a job at a time
    holds_slot: bool = False
    media_deadline: float = 0.0
    resumed: bool = False  # picked up after a restart: every attempt is looked up before it is sent


class Slots:
    """At most `size` jobs at a backend at once; the others wait in arrival order."""

    def __init__(self, size: int):
        self.size, self.held, self.waiting = size, set(), deque()
        self.peak = 0  # the most jobs held at once (`force`d resumes may pass `size`; nothing else may)
        self._lock = threading.Lock()

    def take(self, job_id: str, force: bool = False) -> bool:
        with self._lock:
            if job_id in self.held or force or len(self.held) < self.size:
                self.held.add(job_id)
                self.peak = max(self.peak, len(self.held))
                return True
            if job_id not in self.waiting:
                self.waiting.append(job_id)
            return False

    def give_back(self, job_id: str) -> str | None:
        """Free a slot; the job that waited longest gets it (returned), if any."""
        with self._lock:
            self.held.discard(job_id)
            if job_id in self.waiting:
                self.waiting.remove(job_id)
            if self.waiting and len(self.held) < self.size:
                nxt = self.waiting.popleft()
                self.held.add(nxt)
                self.peak = max(self.peak, len(self.held))
                return nxt
            return None


class Lifecycle:
    def __init__(self, store: Store, blobs: Blobs, notifier: Notifier, executors: dict[str, Executor],
                 settings: Settings, policy: Policy, default_backend: str, fallback: str | None,
                 schedule: Callable[..., None], others_alive: bool = True):
        self.store, self.blobs, self.notifier, self.executors = store, blobs, notifier, executors
        # who this daemon is, in the claims it makes; and whether any other daemon may be alive (an
        # embedded folder holds one daemon at a time, so there a claim by another owner is a dead one's)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.others_alive = others_alive
        self.holds = Holds(store, self.owner, settings.claim_seconds, others_alive)
        self.intake = Intake(store, blobs, policy, settings, self.owner)
        self.settings, self.policy = settings, policy
        self.default_backend, self.fallback = default_backend, fallback
        self.schedule = schedule  # schedule(fn, *args, delay=0.0): run fn(*args) on the daemon's pool
        self.slots = Slots(settings.concurrency)
        self.flights: dict[str, Flight] = {}
        self._lock = threading.Lock()
        self._stopped: set[str] = set()  # handed-over attempts already told to stop
        self._resuming: set[str] = set()  # records being resumed, before their flight exists
        self._swept = now()
        self._beat: float | None = None  # when the last heartbeat was written (None: never)
        self._looked = time.monotonic()  # takeovers, on their own interval
        self._looked_handed = 0.0  # handed-over jobs, on theirs (the first sweep looks)
        self.stats = {"received": 0, "created": 0, "duplicates": 0, "succeeded": 0, "failed": 0, "cancelled": 0,
                      "sweeps": 0, "beats": 0}

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    # ------------------------------------------------------------------ receive: RECEIVED → VALIDATED | FAILED

    def receive(self, events: list[JobEvent], read: Callable = map) -> list[bool]:
        """Record the jobs a batch of documents names (`intake.Intake`): the documents are read at
        once (`read`: the daemon passes its intake pool's map), then their records are created in one
        request. For each event, whether it has its record (or needs none) and may be acknowledged; a
        document that could not be read for a passing fault is not, and comes back. A valid job goes
        on to `admit`; a refused one's message is sent."""
        readings = list(read(self._read, events))
        done = [reading is not None for reading in readings]
        for arrival in self.intake.take_in([r for r in readings if r is not None]):
            self._count("received")
            record, job = arrival.record, arrival.job
            if record is None:  # the same upload again (or no free id: intake logged it)
                self._count("duplicates" if arrival.duplicate else "failed")
                continue
            self._count("created")
            crashpoint("after-create")
            if job is None:
                self._count("failed")
                log.warning("job failed: %s", record.error["message"][:300],
                            extra={"job_id": record.job_id, "state": FAILED, "stage": "validate"})
                self.schedule(self.send, record)
            else:
                log.info("job received", extra={"job_id": job.id, "state": VALIDATED})
                self.schedule(self.admit, self._flight(job, record))
        return done

    def _read(self, event: JobEvent) -> Reading | None:
        try:
            return self.intake.read(event)
        except Exception:  # a store or S3 blip: unacknowledged, the message comes back after its visibility timeout
            log.exception("could not read %s; it will be delivered again", event.key)
            return None

    # ------------------------------------------------------------------ admit: VALIDATED → QUEUED

    def admit(self, flight: Flight) -> None:
        """Wait (without holding a thread) for the media to finish uploading, then queue the job."""
        with flight.lock:
            job = flight.job
            if flight.media_deadline == 0.0:
                flight.media_deadline = time.monotonic() + self.settings.media_wait_seconds
            crashpoint("before-media-check")
            uri, policy = job.input_uri, self.policy
            try:  # what the job would fetch, bounded before anything is fetched
                if uri.is_prefix:
                    files, size = self.blobs.usage(uri.key, policy.max_input_files)
                else:
                    size = self.blobs.size(uri.key)
                    files, size = (0, 0) if size is None else (1, size)
            except Refused as exc:
                return self.fail(flight, "validate", f"The media {job.input} cannot be read: {exc}.", "input", code=2)
            if files == 0:
                if time.monotonic() < flight.media_deadline:
                    return self.schedule(self.admit, flight, delay=self.settings.media_poll_seconds)
                return self.fail(flight, "validate", f"The media {job.input} was not found (waited "
                                 f"{self.settings.media_wait_seconds:.0f} s for it to finish uploading).", "input", code=2)
            if files > policy.max_input_files or size > policy.max_input_bytes:
                counted = f"{policy.max_input_files:,}+" if files > policy.max_input_files else f"{files:,}"
                return self.fail(flight, "validate", f"The media {job.input} are too much to fetch ({counted} files, "
                                 f"{size / 1e9:.1f} GB); a job may read at most {policy.max_input_files:,} files and "
                                 f"{policy.max_input_bytes / 1e9:.1f} GB.", "input", code=2)
            crashpoint("before-queue")
            if self.slots.take(job.id):
                self.start(job.id)

    # ------------------------------------------------------------------ start: QUEUED → RUNNING

    def start(self, job_id: str) -> None:
        """The job has a slot: choose its backend, check it can run there, send its first attempt."""
        flight = self.flights.get(job_id)
        if flight is None:
            return self._give_back(job_id)
        with flight.lock:
            flight.holds_slot = True
            if flight.record.cancel_requested:
                return self.cancelled(flight, "cancelled before it ran")
            backend = self._backend(flight.job)
            step = first_step(flight.job)
            if flight.resumed and self._adopt(flight, backend, step, retry=lambda: self.start(job_id)):
                return
            try:
                self.executors[backend].preflight(flight.job)
            except CannotRun as exc:
                return self.cannot_run(flight, backend, exc.reason, exc.stage)
            except Misconfigured as exc:
                return self.fail(flight, step.stage, str(exc), exit_code(EXIT_INTERNAL).kind, code=EXIT_INTERNAL)
            self.submit(flight, backend, step)

    def submit(self, flight: Flight, backend: str, step: Submit, reason: str | None = None,
               mutate: Callable[[JobRecord], None] = lambda r: None) -> None:
        """Send one attempt, record it (with `mutate`, in the same write), and have its end called back."""
        job = flight.job
        attempt = Attempt.new(backend, job.id, step.stage, step.number, reason=reason)
        if flight.resumed and self._adopt(flight, backend, step, mutate,
                                          retry=lambda: self.submit(flight, backend, step, reason, mutate)):
            return
        crashpoint("before-submit")
        try:
            self.executors[backend].submit(job, attempt, upstream_of([Attempt.from_dict(a) for a in flight.record.attempts]))
        except CannotRun as exc:
            return self.cannot_run(flight, backend, exc.reason, exc.stage, mutate)
        except Misconfigured as exc:
            return self.fail(flight, step.stage, str(exc), exit_code(EXIT_INTERNAL).kind, mutate, EXIT_INTERNAL)
        crashpoint("after-submit")
        self._running(flight, attempt, mutate, note=reason or "")

    def _adopt(self, flight: Flight, backend: str, step: Submit, mutate: Callable[[JobRecord], None] = lambda r: None,
               retry: Callable[[], None] = lambda: None) -> bool:
        """After a restart: an attempt sent just before the crash is followed, never sent again. If
        the backend cannot say (an API blip), nothing is sent: the lookup is tried again later, since
        sending now, or judging the job unrunnable and handing it over, could run it twice."""
        attempt = Attempt.new(backend, flight.job.id, step.stage, step.number)
        try:
            found = self.executors[backend].find(flight.job, attempt)
        except Exception as exc:  # noqa: BLE001 - whatever the backend's client raised
            log.warning("could not look up %s (%s); looking again in %.0f s", attempt.name, str(exc)[:200],
                        self.settings.lookup_retry_seconds, extra={"job_id": flight.job.id})
            self.schedule(retry, delay=self.settings.lookup_retry_seconds)
            return True
        if not found:
            return False
        log.info("found attempt %s sent before a restart", attempt.name, extra={"job_id": flight.job.id})
        self._running(flight, attempt, mutate, note="found again after a restart", resumed=True)
        return True

    def _running(self, flight: Flight, attempt: Attempt, mutate: Callable[[JobRecord], None], note: str = "",
                 resumed: bool = False) -> None:
        job, executor = flight.job, self.executors[attempt.backend]
        attempt.state = "Running"

        def record(r: JobRecord) -> None:
            mutate(r)
            r.backend = attempt.backend
            r.attempts.append(attempt.to_dict())

        try:
            flight.record = change(self.store, job.id, record, to=RUNNING, passing=(QUEUED,), note=note,
                                   stage="sagemaker" if attempt.backend == "sagemaker" else attempt.stage,
                                   current=flight.record)
        except InvalidTransition:  # ended meanwhile (a queued job's cancel): stop what was sent
            executor.stop(attempt, "cancelled by the user")
            stored = self.store.get(job.id)
            if stored is not None and not stored.terminal:
                log.error("job %s cannot move from %s to RUNNING", job.id, stored.state, extra={"job_id": job.id})
            return self.closed(flight)
        crashpoint("after-running")
        if executor.finishes_record:  # the fallback's state machine records the end and sends the message
            log.info("job handed to %s", attempt.backend, extra={"job_id": job.id, "backend": attempt.backend})
            return self.release(flight)
        executor.watch(job, attempt, lambda result: self.schedule(self.ended, job.id, attempt, result), resumed=resumed)

    # ------------------------------------------------------------------ ended: an attempt's result decides

    def ended(self, job_id: str, attempt: Attempt, result: Result) -> None:
        flight = self.flights.get(job_id)
        if flight is None:
            return
        with flight.lock:
            crashpoint("after-compute")
            attempt.state, attempt.ending = result.ending.state, result.ending.value
            attempt.exit_code, attempt.executions = result.exit_code, result.executions
            attempt.error, attempt.updated_at = (result.message[:MAX_ERROR_CHARS] or None), now()

            def store_attempt(r: JobRecord) -> None:
                r.attempts = [attempt.to_dict() if a.get("name") == attempt.name else a for a in r.attempts]

            attempts = [attempt if a.get("name") == attempt.name else Attempt.from_dict(a) for a in flight.record.attempts]
            decision = decide(flight.job, attempts, attempt, result)
            if isinstance(decision, Submit):
                if decision.stage != attempt.stage:  # the next stage reads what this one published
                    flight.record = change(self.store, job_id, store_attempt, current=flight.record)
                    return self.submit(flight, attempt.backend, decision)
                return self.submit(flight, attempt.backend, decision, reason=f"attempt {attempt.number} crashed",
                                   mutate=store_attempt)
            if isinstance(decision, Done):
                return self.succeed(flight, decision.summary, store_attempt)
            if isinstance(decision, Fail):
                kind = exit_code(decision.exit_code).kind
                return self.fail(flight, decision.stage, decision.message, kind, store_attempt, decision.exit_code)
            if isinstance(decision, Stopped):
                return self.cancelled(flight, "stopped while running", store_attempt, stage=decision.stage)
            return self.cannot_run(flight, attempt.backend, decision.reason, decision.stage, store_attempt)

    def cannot_run(self, flight: Flight, backend: str, reason: str, stage: str | None,
                   mutate: Callable[[JobRecord], None] = lambda r: None) -> None:
        """Hand the job to the fallback backend, or fail it: no backend could run it."""
        fallback = self.fallback if flight.job.compute.backend == "auto" and backend != self.fallback else None
        if fallback is None:
            return self.fail(flight, stage, f"No backend could run the job: {reason}", "compute", mutate, EXIT_CANNOT_RUN)
        self.release(flight, keep_flight=True)  # the fallback holds none of our slots
        number = 1 + sum(a.get("backend") == fallback for a in flight.record.attempts)
        self.submit(flight, fallback, Submit("all", number), reason=f"{backend} cannot run it: {reason}", mutate=mutate)

    # ------------------------------------------------------------------ the endings

    def succeed(self, flight: Flight, summary: dict[str, Any] | None, mutate: Callable[[JobRecord], None]) -> None:
        job = flight.job
        if not summary or not summary.get("files"):
            return self.fail(flight, "export", "The job ended but its outputs are missing (no export/metrics.json).",
                             "internal", mutate, EXIT_INTERNAL)
        result = success_result(summary, job.output_uri(self.policy).key + "export/", flight.record.created_at, now(),
                                job.compute.gpus, self.settings)
        crashpoint("before-succeed")
        claimed = self._end(flight, SUCCEEDED, None, "", lambda r: (mutate(r), setattr(r, "result", result)))
        crashpoint("after-succeed")
        self._count("succeeded")
        log.info("job succeeded", extra={"job_id": job.id, "state": SUCCEEDED})
        self.closed(flight, claimed)

    def fail(self, flight: Flight, stage: str | None, message: str, kind: str,
             mutate: Callable[[JobRecord], None] = lambda r: None, code: int | None = None) -> None:
        error = self._error(stage, message, ADVICE.get(kind, ADVICE["internal"]), kind, code)
        crashpoint("before-fail")
        claimed = self._end(flight, FAILED, stage, "", lambda r: (mutate(r), setattr(r, "error", error)))
        crashpoint("after-fail")
        self._count("failed")
        log.warning("job failed: %s", error["message"][:300], extra={"job_id": flight.job.id, "state": FAILED, "stage": stage})
        self.closed(flight, claimed)

    def cancelled(self, flight: Flight, note: str, mutate: Callable[[JobRecord], None] = lambda r: None,
                  stage: str | None = None) -> None:
        claimed = self._end(flight, CANCELLED, stage, note, mutate)
        self._count("cancelled")
        self.closed(flight, claimed)

    def _end(self, flight: Flight, state: str, stage: str | None, note: str, mutate: Callable[[JobRecord], None]) -> bool:
        """The terminal write, which claims the job's message for this daemon in the same put.
        False when the job had ended elsewhere meanwhile (a cancel): that ending's message stands."""
        try:
            flight.record = change(self.store, flight.job.id, lambda r: (mutate(r), self._stamp(r)),
                                   to=state, stage=stage, note=note, current=flight.record)
            return True
        except InvalidTransition:
            flight.record = self.store.get(flight.job.id) or flight.record
            return False

    def closed(self, flight: Flight, claimed: bool = False) -> None:
        """The job is finished, here or elsewhere: free its slot and see its message out."""
        self.release(flight)
        if claimed:
            return self.send(flight.record)
        self.announce(flight.record if flight.record.terminal else self.store.get(flight.job.id))

    def release(self, flight: Flight, keep_flight: bool = False) -> None:
        if not keep_flight:
            with self._lock:
                self.flights.pop(flight.job.id, None)
        if flight.holds_slot:
            flight.holds_slot = False
            self._give_back(flight.job.id)

    def _give_back(self, job_id: str) -> None:
        nxt = self.slots.give_back(job_id)
        if nxt is not None:
            self.schedule(self.start, nxt)

    # ------------------------------------------------------------------ announce: the one message

    def announce(self, record: JobRecord | None) -> None:
        """See out the message of a finished job this daemon did not end (found at a restart, or ended
        by another writer). Its ender claimed it; the claim of a sender that is gone (`Holds.elsewhere`)
        is taken over; a live one's is looked at again after `claim_seconds`."""
        if record is None or not record.terminal or record.notified_at:
            return
        claimed = self._claim(record)
        if claimed is not None:
            return self.send(claimed)
        latest = self.store.get(record.job_id)
        if latest is not None and latest.terminal and not latest.notified_at:
            self.schedule(lambda: self.announce(self.store.get(record.job_id)), delay=self.settings.claim_seconds)

    def _stamp(self, record: JobRecord) -> None:
        record.notify_claimed_at, record.notify_claimed_by = now(), self.owner

    def _claim(self, record: JobRecord | None) -> JobRecord | None:
        """Take the message: one conditional put on the version read, never retried over another writer.
        A claim is left alone while its owner may be alive and it is younger than `claim_seconds`, and
        always when the owner is this daemon: its own send is under way (or waits to be tried again),
        and a second claim would send the message twice (a cancel's end raced the sweep so)."""
        return claim(self.store, record, lambda r: not r.terminal or bool(r.notified_at) or r.notify_claimed_by == self.owner
                     or self.holds.elsewhere(r.notify_claimed_by, r.notify_claimed_at), self._stamp)

    def send(self, record: JobRecord, retry: int = 0) -> None:
        """Send the message of a record this daemon has claimed, then mark it sent. A failed send is
        tried again on a growing interval, the claim renewed each time so no one takes it over."""
        links = {}
        for key in (record.result or {}).get("outputs", []):
            name = key.rsplit("/", 1)[-1]
            if name.startswith(("splat.", "mesh.")) or name in ("report.html", "metrics.json"):
                links[name] = self.blobs.link(key, self.settings.link_seconds)
        crashpoint("before-notify")
        try:
            self.notifier.send(compose(record, links))
        except Exception as exc:  # SNS or the disk said no: keep the claim, try again later
            delay = min(self.settings.claim_seconds / 2, 2.0 ** retry)
            log.warning("could not send the message of %s (%s); trying again in %.0f s", record.job_id, exc, delay,
                        extra={"job_id": record.job_id})
            renewed = change(self.store, record.job_id, self._stamp, current=record)
            return self.schedule(self.send, renewed, retry + 1, delay=delay)
        crashpoint("after-notify")
        change(self.store, record.job_id, lambda r: setattr(r, "notified_at", now()), current=record)

    # ------------------------------------------------------------------ resume: after a restart

    def resume(self, record: JobRecord) -> None:
        """Pick up a record a previous daemon left unfinished. Nothing is sent twice: an attempt the
        record names is followed; one that may have been sent just before the crash is looked up
        (by its labels on Bacalhau) before anything is sent."""
        if record.terminal:
            return self.announce(record)
        with self._lock:  # one follower a job: a take-over can see a record again before its resume made a flight
            if record.job_id in self.flights or record.job_id in self._resuming:
                return
            self._resuming.add(record.job_id)
        try:
            self._resume(record)
        finally:
            with self._lock:
                self._resuming.discard(record.job_id)

    def _resume(self, record: JobRecord) -> None:
        record = self.holds.take(record)
        if record is None:
            return  # another daemon is working on it
        try:
            job = job_of_record(parse_document(self.blobs.read(record.job_key, limit=MAX_DOCUMENT_BYTES + 1), record.job_key),
                                record.job_id, self.policy, owner=owner_of(record.job_key, self.settings))
        except Exception as exc:  # the document went bad or away: the job cannot go on
            flight = self._flight(JobDocument.model_construct(id=record.job_id), record)
            message = getattr(exc, "message", None) or f"Its job document {record.job_key} can no longer be read ({exc.__class__.__name__})."
            return self.fail(flight, "validate", message, "input", code=2)
        flight = self._flight(job, record)
        flight.resumed = True
        if record.state in (RECEIVED, VALIDATED, QUEUED):
            return self.admit(flight)
        if record.backend in self.executors and self.executors[record.backend].finishes_record:
            return  # handed over: the fallback's state machine finishes it
        attempts = [Attempt.from_dict(a) for a in record.attempts]
        last = attempts[-1] if attempts else None
        self.slots.take(job.id, force=True)
        flight.holds_slot = True
        if last is None or last.backend not in self.executors:
            return self.start(job.id)
        executor = self.executors[last.backend]
        if last.state == "Running" and last.remote_id and last.backend != "local":
            done = lambda result: self.schedule(self.ended, job.id, last, result)  # noqa: E731
            return executor.watch(job, last, done, resumed=True)
        if last.state == "Running":  # a local run dies with its daemon: run the stage again (finished stages are kept)
            return self.submit(flight, last.backend, Submit(last.stage, last.number + 1), reason="resumed after a restart")
        # the last attempt ended (recorded) but what it led to was not sent: decide again
        self.ended(job.id, last, Result(Ending(last.ending or Ending.CRASHED.value), last.error or "", last.exit_code,
                                        last.executions))

    # ------------------------------------------------------------------ holds: several daemons, one queue

    def heartbeat(self) -> None:
        """Renew this daemon's hold on every job it works on, with one write (every `claim_seconds` / 3).
        After a lapse (a pause, or a store that said no), other daemons may have judged this one dead:
        each job is read again, and one another daemon took meanwhile is let go, not fought over."""
        since = time.monotonic() - self._beat if self._beat is not None else None
        if not self.others_alive or (since is not None and since < self.settings.claim_seconds / 3):
            return
        lapsed = since is not None and since > self.settings.claim_seconds * 2 / 3
        started = time.monotonic()
        try:
            self.holds.beat()
        except Exception as exc:  # noqa: BLE001 - tried again at the next sweep; the lapse check covers a long gap
            log.warning("could not write this daemon's heartbeat (%s)", str(exc)[:200])
            return
        self._beat = started
        self._count("beats")
        for flight in list(self.flights.values()) if lapsed else []:
            with flight.lock:
                stored = self.store.get(flight.job.id)
                if stored is None or stored.terminal or stored.owner != self.owner:
                    log.warning("job %s is another daemon's now; letting it go", flight.job.id, extra={"job_id": flight.job.id})
                    self.release(flight)

    def let_go(self) -> None:
        """On shutdown: every job still at a backend is released at once (one write: this daemon's
        heartbeat marked stopped), so the next daemon, on this host or another, takes them without
        waiting out `claim_seconds`."""
        if not self.others_alive:
            return
        try:
            self.holds.beat(alive=False)
            self._count("beats")
        except Exception as exc:  # noqa: BLE001 - the holds then lapse by themselves after claim_seconds
            log.warning("could not let go of this daemon's jobs (%s); they are taken over in %.0f s", exc,
                        self.settings.claim_seconds)

    def take_over(self) -> None:
        """Resume what a dead daemon held (its heartbeat stopped); looked at every `claim_seconds`."""
        if not self.others_alive or time.monotonic() - self._looked < self.settings.claim_seconds:
            return
        self._looked = time.monotonic()
        for state in (VALIDATED, QUEUED, RUNNING):
            for record in self.store.list(state, 100_000):
                handed = record.backend in self.executors and self.executors[record.backend].finishes_record
                if record.job_id not in self.flights and not handed and not self.holds.elsewhere(record.owner, record.owner_seen_at):
                    self.schedule(self.resume, record)

    def abandoned_handovers(self, running: list[JobRecord]) -> None:
        """Handed-over jobs whose backend ended without recording their end (a failed execution of the
        fallback's state machine) would stay RUNNING forever, maybe with a training job running unwatched:
        stop what runs, fail the record and tell the user once. Any daemon may do it (the terminal write
        is conditional: one wins); `running` is the sweep's own list, looked through every `claim_seconds`,
        one lookup per handed-over job."""
        if time.monotonic() - self._looked_handed < self.settings.claim_seconds:
            return
        self._looked_handed = time.monotonic()
        for record in running:
            attempt = Attempt.from_dict(record.attempts[-1]) if record.attempts else None
            executor = self.executors.get(attempt.backend) if attempt else None
            if executor is None or not executor.finishes_record or record.job_id in self.flights:
                continue
            why = executor.abandoned(attempt)
            if why is None:
                continue
            log.error("job %s: %s ended without recording the job's end: %s", record.job_id, attempt.name, why,
                      extra={"job_id": record.job_id, "backend": attempt.backend})
            executor.stop(attempt, "its follower ended")
            flight = self._flight(JobDocument.model_construct(id=record.job_id), record)
            self.fail(flight, attempt.backend, f"The {attempt.backend} run {attempt.name} could not be followed to its end "
                      f"(its state machine's execution {why}); whatever it was running has been stopped.", "internal")

    # ------------------------------------------------------------------ cancels

    def sweep(self) -> None:
        """Stop what was cancelled: running jobs whose record asks for it (one query for all of them),
        and queued ones cancelled while they waited for a slot."""
        swept, self._swept = self._swept, now()
        self._count("sweeps")
        self.heartbeat()
        self.take_over()
        running = self.store.list(RUNNING, 100_000)
        self.abandoned_handovers(running)
        for record in running:
            if not record.cancel_requested or not record.attempts:
                continue
            attempt = Attempt.from_dict(record.attempts[-1])
            executor = self.executors.get(attempt.backend)
            if executor is None or (record.job_id not in self.flights and not executor.finishes_record):
                continue  # another daemon's job
            if attempt.name not in self._stopped:
                self._stopped.add(attempt.name)
                log.info("stopping %s: cancelled", attempt.name, extra={"job_id": record.job_id})
                executor.stop(attempt, "cancelled by the user")
        for record in self.store.list(CANCELLED, 100_000, since=swept):
            flight = self.flights.get(record.job_id)
            if flight is not None and not flight.holds_slot:
                self.release(flight)
            if not record.notified_at:
                self.announce(record)

    # ------------------------------------------------------------------ helpers

    def local_runs(self) -> int:
        """Runs in processes of this machine, which end when they end (not resumed remotely)."""
        return sum(getattr(e, "active", lambda: 0)() for e in self.executors.values())

    def _flight(self, job: JobDocument, record: JobRecord) -> Flight:
        with self._lock:
            flight = self.flights.get(record.job_id)
            if flight is None:
                flight = self.flights[record.job_id] = Flight(job, record)
            return flight

    def _backend(self, job: JobDocument) -> str:
        wanted = job.compute.backend
        return wanted if wanted in self.executors else self.default_backend

    @staticmethod
    def _error(stage: str | None, message: str, advice: str, kind: str, code: int | None = None) -> dict[str, Any]:
        return {"stage": stage, "message": message[:MAX_ERROR_CHARS], "advice": advice, "kind": kind, "exit_code": code}
