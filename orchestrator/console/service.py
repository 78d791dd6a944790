"""What the console does, apart from HTTP: submit, list, show, cancel and resubmit jobs.

It talks to the same store and blobs as the daemon and never runs a job itself: a submission is a
job document written under the jobs prefix (after its media have fully arrived), which the daemon
picks up exactly as it picks up any upload.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

from codsplat.pipeline.config import MAX_DOCUMENT_BYTES, merge, parse_document
from codsplat.pipeline.contract import ARCHIVE_SUFFIXES, PROGRESS, VIDEO_SUFFIXES
from codsplat.pipeline.errors import InputError
from codsplat.pipeline.validation import show

from ..blobs import Blobs
from ..job import MAX_RENUMBER, JobDocument, job_id_from_key, job_of_record, owner_of, parse_job
from ..pricing import running
from ..records import RUNNING, InvalidTransition, JobRecord, Store, request_cancel
from ..settings import Policy, Settings
from .uploads import MAX_PARTS, Uploads, check_files, safe_name

CONSOLE_USER = "console"  # token login has one user; an OIDC identity would go here
REUSABLE = ("frames", "sfm", "train")  # stage folders a resubmission starts from (the pipeline re-checks them)
SUBMITTED = "SUBMITTED"  # shown for a job document the daemon has not recorded yet
SETTINGS = ("preset", "frames", "sfm", "train", "export", "compute", "notify")  # what the form may set


class NotFound(Exception):
    pass


def _known(settings: Any) -> None:
    if not isinstance(settings, dict):
        raise InputError("settings: must be an object of job sections.")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InputError(f"{unknown[0]}: not a setting the console sends; use {', '.join(SETTINGS)}.")


def _seconds_since(iso: str, until: str | None = None) -> float:
    start = datetime.fromisoformat(iso)
    end = datetime.fromisoformat(until) if until else datetime.now(timezone.utc)
    return max(0.0, (end - start).total_seconds())


@dataclass
class ConsoleService:
    store: Store
    blobs: Blobs
    uploads: Uploads
    policy: Policy
    settings: Settings  # the deployment: its jobs prefix, and its hourly prices for running jobs

    @property
    def jobs_prefix(self) -> str:
        return self.settings.jobs_prefix

    # ------------------------------------------------------------------ uploads and submission

    def start_upload(self, files: list[dict]) -> dict[str, Any]:
        """One multipart upload per file, all under one fresh prefix of the user's uploads."""
        check_files(files)
        self.uploads.clear_abandoned()  # once a request (once a file, 2,000 photos scanned 2,000 folders 2,000 times)
        prefix = f"{self.policy.input_prefixes[0]}{CONSOLE_USER}/{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}/"
        started = [self.uploads.start(prefix + safe_name(f["name"]), f["size"]) for f in files]
        whole = len(files) == 1 and files[0]["name"].lower().endswith(VIDEO_SUFFIXES + ARCHIVE_SUFFIXES)
        return {"input": started[0]["key"] if whole else prefix, "files": started}

    def complete_upload(self, key: str, upload_id: str, parts: list[dict]) -> None:
        if not key.startswith(self.policy.input_prefixes[0] + CONSOLE_USER + "/"):
            raise InputError(f"key: {show(key)} is not a console upload.")
        if not parts or len(parts) > MAX_PARTS or not all(
                isinstance(p, dict) and type(p.get("part")) is int and 1 <= p["part"] <= MAX_PARTS
                and isinstance(p.get("etag"), str) and len(p["etag"]) <= 100 for p in parts):
            raise InputError('parts: a list of {"part": number from 1, "etag": the ETag of its upload}, '
                             f"at most {MAX_PARTS:,}.")
        numbers = [p["part"] for p in parts]
        if numbers != list(range(1, len(numbers) + 1)):  # each part once, in order: no part joined twice
            raise InputError(f"parts: must be parts 1 to {len(numbers)}, each once and in order.")
        self.uploads.complete(key, upload_id, parts)

    def submit(self, input_key: str, settings: dict[str, Any], name: str | None = None) -> JobDocument:
        """Validate, check the media are there, then write the job document (which starts the job)."""
        _known(settings)
        name = name if isinstance(name, str) and name.strip() else PurePosixPath(input_key.rstrip("/")).name
        base = job_id_from_key(name)[:50]
        doc = {"version": 1, "id": f"{base}-{secrets.token_hex(3)}", "input": input_key, **settings}
        job = self._write(doc)
        if job is None:
            raise InputError(f"id: a job {doc['id']!r} exists already; submit again.")
        return job

    def check(self, settings: dict[str, Any]) -> None:
        """Validate settings before any media is sent; the input itself is checked at submission."""
        _known(settings)
        placeholder = f"{self.policy.input_prefixes[0]}{CONSOLE_USER}/check.mp4"
        parse_job({"version": 1, "id": "settings-check", "input": placeholder, **settings}, self.policy)

    def _write(self, doc: dict[str, Any], owner: str | None = CONSOLE_USER) -> JobDocument | None:
        """Write the job document (which starts the job) into its owner's folder; None when its id was
        taken meanwhile (the document is created only where none is, so two submissions never share an id)."""
        job = parse_job(doc, self.policy, owner=owner)
        key = job.input_uri.key
        if not (self.blobs.exists_prefix(key) if key.endswith("/") else self.blobs.exists(key)):
            raise InputError(f"input: {key} has not arrived; upload the media before submitting the job.")
        if self.store.get(job.id) is not None or not self.blobs.create(self.document_key(job.id, owner),
                                                                       json.dumps(doc, indent=2).encode()):
            return None
        return job

    def resubmit(self, job_id: str, changes: dict[str, Any]) -> JobDocument:
        """The same media with changed settings, as a new job that starts from the old job's finished
        stages: the pipeline re-runs a stage only when its settings or inputs changed."""
        record = self._record(job_id)
        old = parse_document(self.blobs.read(record.job_key, limit=MAX_DOCUMENT_BYTES + 1), record.job_key)
        _known(changes)
        doc = merge({k: v for k, v in old.items() if k not in ("id", "output")}, changes)
        stem = re.sub(r"-r\d+$", "", job_id)[:55]
        source, owner = self._document(record)[1], owner_of(record.job_key, self.settings)  # it stays its owner's
        for number in range(2, MAX_RENUMBER + 2):  # the first free `-r<n>`; a concurrent resubmission takes the next
            doc["id"] = f"{stem}-r{number}"
            if self.store.get(doc["id"]) is not None or self.blobs.exists(self.document_key(doc["id"], owner)):
                continue
            target = parse_job(doc, self.policy, owner=owner).output_uri(self.policy).key  # fail before copying
            for stage in REUSABLE:
                self.blobs.copy_prefix(f"{source}{stage}/", f"{target}{stage}/")
            job = self._write(doc, owner)
            if job is not None:
                return job
        raise InputError(f"{job_id}: resubmitted {MAX_RENUMBER} times already; submit it as a new job.")

    def cancel(self, job_id: str) -> JobRecord:
        self._record(job_id)
        try:
            return request_cancel(self.store, job_id)
        except InvalidTransition as exc:
            raise InputError(str(exc)) from None

    # ------------------------------------------------------------------ reading

    def _record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise NotFound(job_id)
        return record

    def document_key(self, job_id: str, owner: str | None = CONSOLE_USER) -> str:
        return f"{self.jobs_prefix}{owner}/{job_id}.json" if owner else f"{self.jobs_prefix}{job_id}.json"

    def _document(self, record: JobRecord) -> tuple[dict[str, Any], str]:
        """The job document as written, and its output prefix."""
        raw = parse_document(self.blobs.read(record.job_key, limit=MAX_DOCUMENT_BYTES + 1), record.job_key)
        return raw, job_of_record(raw, record.job_id, self.policy,
                                  owner=owner_of(record.job_key, self.settings)).output_uri(self.policy).key

    def summary(self, record: JobRecord) -> dict[str, Any]:
        """A row of the job list: state, stage, time so far and estimated cost."""
        finished = record.updated_at if record.terminal else None
        seconds = _seconds_since(record.created_at, finished)
        result = record.result or {}
        cost = result.get("estimated_cost_usd")
        if cost is None and record.state == RUNNING:
            cost = running(seconds, record.backend, self.settings)
        return {
            "id": record.job_id, "state": record.state, "stage": record.stage, "backend": record.backend,
            "created_at": record.created_at, "updated_at": record.updated_at, "seconds": round(seconds, 1),
            "estimated_cost_usd": None if cost is None else round(cost, 4),
            "psnr": (result.get("metrics") or {}).get("psnr"), "cancel_requested": record.cancel_requested,
            "error": (record.error or {}).get("message"),
        }

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        return [self.summary(r) for r in self.store.list(None, limit)]

    def detail(self, job_id: str) -> dict[str, Any]:
        """The job page: the record, where the run is, and the metrics, previews and files once done."""
        record = self.store.get(job_id)
        if record is None and self.blobs.exists(self.document_key(job_id)):
            # written by the console, not yet taken in by the daemon
            record = JobRecord(job_id=job_id, job_key=self.document_key(job_id), state=SUBMITTED)
        elif record is None:
            raise NotFound(job_id)
        out = {**self.summary(record), "history": record.history, "attempts": record.attempts,
               "error": record.error, "result": record.result, "input": record.input, "progress": None,
               "metrics": None, "previews": [], "files": {}, "log": None}
        try:
            document, output = self._document(record)
        except Exception:  # a job document that never validated: the record says why
            return out
        out["settings"] = {k: v for k, v in document.items() if k in SETTINGS}
        out["progress"] = None if record.terminal else self._json(output + PROGRESS)
        out["log"] = self._log_tail(output)
        if record.result:
            out["metrics"] = self._json(output + "export/metrics.json")
            export = output + "export/"
            for key in record.result.get("outputs", []):
                name = key[len(export):] if key.startswith(export) else PurePosixPath(key).name
                out["files"][name] = self.file_link(job_id, name)
            out["previews"] = [self.file_link(job_id, p) for p in (out["metrics"] or {}).get("previews", [])]
        return out

    def file_link(self, job_id: str, name: str) -> str:
        return f"/files/{job_id}/{name}"

    def file_key(self, job_id: str, name: str) -> str:
        """The key of one of a finished job's export files (nothing else is served). The record's
        outputs name the export folder (metrics.json is always one), so no document is read."""
        outputs = (self._record(job_id).result or {}).get("outputs", [])
        metrics = next((k for k in outputs if k.endswith("export/metrics.json")), None)
        parts = PurePosixPath(name).parts
        if metrics is None or not parts or any(p in ("..", ".") for p in parts):
            raise NotFound(name)
        key = metrics[: -len("metrics.json")] + name
        if not self.blobs.exists(key):
            raise NotFound(name)
        return key

    def _json(self, key: str) -> Any:
        try:
            return json.loads(self.blobs.read(key))
        except Exception:  # not written yet, or not visible from here (a Bacalhau node's disk)
            return None

    def _log_tail(self, output: str, lines: int = 200) -> str | None:
        logs = sorted(k for k in self.blobs.list(output + "logs/") if k.endswith(".log"))
        if not logs:
            return None
        text = self.blobs.read(logs[-1]).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
