"""A Bacalhau orchestrator + compute node stand-in, true to shared/reference/bacalhau/NOTES.md.

Same routes, validation rules, error bodies, state names and integer execution states as the real
v1 API; it really executes a task: it downloads the S3 InputSources into a scratch folder mapped to
each Target, runs the task's Entrypoint + Parameters as a local process (paths remapped, since there
is no container), uploads the ResultPaths as the S3 publisher would (`plain` or `gzip`), and moves the
job through Pending → (Queued) → Running → Completed/Failed.

    python tests/bacalhau_standin.py --port 1234 [--version 1.7.0] [--gpus 1 --gpu-model NVIDIA-A10G]

Test knobs (POST /standin/knobs, not part of the real API): `gpu_nodes` (0 = no GPU node),
`gpu_model`, `fail_next` (the next N executions fail), `vanish_next` (the node disappears during
the next N executions), `hold` (executions wait in Queued until released), `submit_delay_ms`,
`images` (image name → a folder put first on the task's PATH: what that image would hold, e.g. a
fast stand-in entrypoint for load tests). It reports `running` and `peak_running` executions.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import uvicorn
from botocore.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

JOB_TYPES = {"batch", "ops", "service", "daemon"}
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
CPU = re.compile(r"^\d+(\.\d+)?m?$")
SIZE = re.compile(r"^\d+(\.\d+)?\s*(b|kb|mb|gb|tb|kib|mib|gib|tib|k|m|g|t|ki|mi|gi|ti)?$", re.I)
NETWORKS = {"default", "none", "host", "http", "bridge"}
OPERATORS = {"in", "notin", "exists", "!", "=", "==", "!=", "gt", "lt", "doesnotexist"}
# ComputeState numbers, v1.6+ and v1.5
STATES_16 = {"New": 1, "AskForBid": 2, "AskForBidAccepted": 3, "BidAccepted": 5, "Running": 6, "Publishing": 7,
             "BidRejected": 8, "Completed": 9, "Failed": 10, "Cancelled": 11}
STATES_15 = {"New": 1, "AskForBid": 2, "AskForBidAccepted": 3, "BidAccepted": 5, "Running": 5, "Publishing": 5,
             "BidRejected": 6, "Completed": 7, "Failed": 8, "Cancelled": 9}  # v1.5: BidAccepted is "running"


def ci_get(d: dict | None, key: str, default: Any = None) -> Any:
    """The real server matches keys case-insensitively."""
    if not isinstance(d, dict):
        return default
    for k, v in d.items():
        if k.lower() == key.lower():
            return v
    return default


def validate(job: dict) -> list[str]:
    """The submit-time checks of the real orchestrator (NOTES.md); every problem, one per line."""
    errors = []
    jtype = ci_get(job, "Type", "")
    if jtype not in JOB_TYPES:
        errors.append(f"invalid job type: {jtype!r}")
    count = ci_get(job, "Count", 0)
    if not isinstance(count, int) or count < 0:
        errors.append("count must be >= 0")
    for c in ci_get(job, "Constraints") or []:
        key, op, values = ci_get(c, "Key", ""), str(ci_get(c, "Operator", "")).lower(), ci_get(c, "Values") or []
        if not key.strip():
            errors.append("constraint key cannot be blank")
        if op not in OPERATORS:
            errors.append(f"unknown constraint operator {op!r}")
        if op in ("in", "notin") and not values:
            errors.append(f"constraint {key}: operator {op} requires values")
        if op in ("exists", "!", "doesnotexist") and values:
            errors.append(f"constraint {key}: operator {op} must not have values")
    tasks = ci_get(job, "Tasks") or []
    if not tasks:
        errors.append("job must have at least one task")
    for task in tasks:
        name = ci_get(task, "Name", "")
        if not str(name).strip():
            errors.append("task name cannot be blank")
        if not ci_get(ci_get(task, "Engine"), "Type"):
            errors.append(f"task {name}: engine type is missing")
        for k, v in (ci_get(task, "Env") or {}).items():
            if not ENV_NAME.match(k) or k.startswith("BACALHAU_"):
                errors.append(f"task {name}: invalid environment variable name {k!r}")
            elif v in ("", None):
                errors.append(f"task {name}: environment variable {k} has an empty value")
        timeouts = ci_get(task, "Timeouts") or {}
        ex, q, tot = (int(ci_get(timeouts, k, 0) or 0) for k in ("ExecutionTimeout", "QueueTimeout", "TotalTimeout"))
        if min(ex, q, tot) < 0:
            errors.append(f"task {name}: timeouts cannot be negative")
        if tot > 0 and ex + q > tot:
            errors.append(f"task {name}: execution timeout ({ex}) + queue timeout ({q}) exceeds total timeout ({tot})")
        res = ci_get(task, "Resources") or {}
        for key, pattern in (("CPU", CPU), ("Memory", SIZE), ("Disk", SIZE)):
            value = ci_get(res, key)
            if value not in (None, "") and not pattern.match(str(value)):
                errors.append(f"task {name}: invalid {key.lower()} value {value!r}")
        gpu = ci_get(res, "GPU")
        if gpu not in (None, "") and not re.fullmatch(r"\d+", str(gpu)):
            errors.append(f"task {name}: invalid gpu value {gpu!r}: must be an unsigned integer")
        network = ci_get(task, "Network")
        if network is not None:
            ntype = ci_get(network, "Type", "Default")
            if not isinstance(ntype, str) or ntype.lower() not in NETWORKS:
                errors.append(f"task {name}: invalid network type {ntype!r}")
        aliases, targets = set(), set()
        for src in ci_get(task, "InputSources") or []:
            target, alias = ci_get(src, "Target", ""), ci_get(src, "Alias", "")
            if not target:
                errors.append(f"task {name}: input source target cannot be empty")
            if not ci_get(ci_get(src, "Source"), "Type"):
                errors.append(f"task {name}: input source type is missing")
            if alias and alias in aliases:
                errors.append(f"task {name}: duplicate input source alias {alias!r}")
            if target and target in targets:
                errors.append(f"task {name}: duplicate input source target {target!r}")
            aliases.add(alias)
            targets.add(target)
        paths, names = set(), set()
        results = ci_get(task, "ResultPaths") or []
        for rp in results:
            rname, rpath = ci_get(rp, "Name", ""), ci_get(rp, "Path", "")
            if not rname:
                errors.append(f"task {name}: result path name cannot be empty")
            if not str(rpath).startswith("/"):
                errors.append(f"task {name}: result path {rpath!r} must be absolute")
            if rname in names or rpath in paths:
                errors.append(f"task {name}: duplicate result path {rname or rpath!r}")
            names.add(rname)
            paths.add(rpath)
        if results and not ci_get(ci_get(task, "Publisher"), "Type"):
            errors.append(f"task {name}: result paths need a publisher")
    return errors


@dataclass
class Execution:
    id: str
    node_id: str
    state: str = "New"
    message: str = ""
    exit_code: int | None = None
    error_msg: str = ""
    stdout: str = ""
    stderr: str = ""
    published: dict | None = None
    create_time: int = field(default_factory=time.time_ns)


@dataclass
class StoredJob:
    spec: dict
    id: str
    state: str = "Pending"
    message: str = ""
    executions: list[Execution] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    create_time: int = field(default_factory=time.time_ns)
    stop: threading.Event = field(default_factory=threading.Event)


class Node:
    """The orchestrator, its one compute node, and the knobs tests turn."""

    def __init__(self, version: str, gpus: int, gpu_model: str, token: str | None, s3_endpoint: str | None):
        self.version = tuple(int(x) for x in version.split(".")[:2])
        self.git_version = f"v{version}"
        self.states = STATES_15 if self.version < (1, 6) else STATES_16
        self.token = token
        self.s3_endpoint = s3_endpoint
        self.jobs: dict[str, StoredJob] = {}
        self.lock = threading.Lock()
        self.seq = itertools.count(1)
        self.knobs = {"gpu_nodes": 1 if gpus else 0, "gpus": gpus, "gpu_model": gpu_model, "fail_next": 0,
                      "vanish_next": 0, "hold": False, "submit_delay_ms": 0, "running": 0, "peak_running": 0,
                      "images": {}}
        self.node_id = "n-" + uuid.uuid4().hex[:8]
        self.changed = threading.Condition()  # knobs changed: queued jobs look again

    def set_knobs(self, values: dict) -> None:
        with self.changed:
            self.knobs.update(values)
            self.changed.notify_all()

    # -------------------------------------------------------------- state changes

    def _event(self, job: StoredJob, message: str, execution: Execution | None = None, new_state: str | None = None,
               new_exec_state: str | None = None, details: dict | None = None) -> None:
        event = {"Type": "ExecutionLevel" if execution else "JobLevel", "JobID": job.id, "SeqNum": next(self.seq),
                 "Time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "Event": {"Message": message, "Topic": "Exec" if execution else "Jobs", "Details": details or {}}}
        if new_state:
            event["JobState"] = {"Previous": job.state, "New": new_state}
            job.state = new_state
        if execution is not None:
            event["ExecutionID"] = execution.id
            if new_exec_state:
                event["ExecutionState"] = {"Previous": self.states.get(execution.state, 0), "New": self.states[new_exec_state]}
                execution.state = new_exec_state
        job.history.append(event)

    def submit(self, spec: dict) -> StoredJob:
        job = StoredJob(spec=spec, id="j-" + str(uuid.uuid4()))
        with self.lock:
            self.jobs[job.id] = job
        self._event(job, "Job submitted", new_state="Pending")
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return job

    def _matches(self, job: StoredJob) -> bool:
        task = ci_get(job.spec, "Tasks")[0]
        want = int(ci_get(ci_get(task, "Resources") or {}, "GPU", 0) or 0)
        if want == 0:
            return True
        if self.knobs["gpu_nodes"] == 0 or self.knobs["gpus"] < want:
            return False
        labels = {"GPU-0": self.knobs["gpu_model"]}
        for c in ci_get(job.spec, "Constraints") or []:
            key, op, values = ci_get(c, "Key"), str(ci_get(c, "Operator")).lower(), ci_get(c, "Values") or []
            if op in ("=", "==", "in") and labels.get(key) not in values:
                return False
            if op in ("!=", "notin") and labels.get(key) in values:
                return False
        return True

    def _run(self, job: StoredJob) -> None:
        task = ci_get(job.spec, "Tasks")[0]
        timeouts = ci_get(task, "Timeouts") or {}
        queue_timeout = int(ci_get(timeouts, "QueueTimeout", 0) or 0)
        started = time.monotonic()
        if not self._matches(job) or self.knobs["hold"]:
            if queue_timeout == 0:
                self._event(job, "not enough nodes to run job: no node matches the job's GPU requirements "
                                 "and constraints", new_state="Failed")
                job.message = job.history[-1]["Event"]["Message"]
                return
            self._event(job, "Job queued: waiting for a node that matches", new_state="Queued")
            while not self._matches(job) or self.knobs["hold"]:
                if job.stop.is_set():
                    return
                remaining = queue_timeout - (time.monotonic() - started)
                if remaining <= 0:
                    self._event(job, f"job queue timeout exceeded ({queue_timeout}s)", new_state="Failed")
                    job.message = job.history[-1]["Event"]["Message"]
                    return
                with self.changed:
                    self.changed.wait(timeout=min(remaining, 0.5))
        execution = Execution(id="e-" + str(uuid.uuid4()), node_id=self.node_id)
        job.executions.append(execution)
        for state in ("AskForBid", "AskForBidAccepted", "BidAccepted"):
            self._event(job, f"execution {state}", execution, new_exec_state=state)
        self._event(job, "Running", execution, new_state="Running", new_exec_state="Running")
        with self.lock:
            self.knobs["running"] += 1
            self.knobs["peak_running"] = max(self.knobs["peak_running"], self.knobs["running"])
        try:
            self._execute(job, task, execution)
        except Exception as exc:  # the stand-in itself must report, not die
            execution.error_msg = f"{exc.__class__.__name__}: {exc}"
            self._event(job, execution.error_msg, execution, new_state="Failed", new_exec_state="Failed")
        finally:
            with self.lock:
                self.knobs["running"] -= 1
        job.message = execution.error_msg if job.state == "Failed" else ""

    def _s3(self, params: dict):
        endpoint = ci_get(params, "Endpoint") or self.s3_endpoint
        return boto3.client("s3", endpoint_url=endpoint, region_name=ci_get(params, "Region") or "us-east-1",
                            config=Config(retries={"max_attempts": 2}))

    def _fetch(self, source: dict, into: Path) -> None:
        params = ci_get(ci_get(source, "Source"), "Params") or {}
        bucket, key = ci_get(params, "Bucket"), ci_get(params, "Key", "")
        if not bucket or not key:
            raise RuntimeError("S3 input source needs Bucket and Key")
        pattern = re.compile(ci_get(params, "Filter")) if ci_get(params, "Filter") else None
        s3 = self._s3(params)
        into.mkdir(parents=True, exist_ok=True)
        if key.endswith("/") or key.endswith("*"):
            prefix = key.rstrip("*")
            found = False
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if pattern and not pattern.search(obj["Key"]):
                        continue
                    target = into / obj["Key"][len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(target))
                    found = True
            if not found:
                raise RuntimeError(f"no objects found at s3://{bucket}/{key}")
        else:
            s3.download_file(bucket, key, str(into / Path(key).name))

    def _publish(self, job: StoredJob, execution: Execution, publisher: dict, results: dict[str, Path]) -> dict:
        params = ci_get(publisher, "Params") or {}
        bucket = ci_get(params, "Bucket")
        key = ci_get(params, "Key", "")
        for placeholder, value in (("{jobID}", job.id), ("{executionID}", execution.id), ("{nodeID}", self.node_id),
                                   ("{date}", time.strftime("%Y%m%d")), ("{time}", time.strftime("%H%M%S"))):
            key = key.replace(placeholder, value)
        encoding = ci_get(params, "Encoding", "gzip")
        if encoding not in ("gzip", "plain"):
            raise RuntimeError(f"unknown publisher encoding {encoding!r}")
        s3 = self._s3(params)
        if encoding == "plain":
            for path in results.values():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    s3.upload_file(str(file), bucket, key + str(file.relative_to(path)))
        else:
            with tempfile.NamedTemporaryFile(suffix=".tar.gz") as tmp:
                with tarfile.open(tmp.name, "w:gz") as tar:
                    for name, path in results.items():
                        tar.add(path, arcname=name)
                key = key + ".tar.gz"
                s3.upload_file(tmp.name, bucket, key)
        return {"Type": "s3", "Params": {"Bucket": bucket, "Key": key, "Region": ci_get(params, "Region", "")}}

    def _execute(self, job: StoredJob, task: dict, execution: Execution) -> None:
        engine = ci_get(ci_get(task, "Engine"), "Params") or {}
        if not ci_get(engine, "Image"):
            raise RuntimeError("docker engine: image is empty")
        timeout = int(ci_get(ci_get(task, "Timeouts") or {}, "ExecutionTimeout", 0) or 0) or None
        with tempfile.TemporaryDirectory(prefix="standin-") as scratch:
            root = Path(scratch)
            mapping: dict[str, Path] = {}
            for i, src in enumerate(ci_get(task, "InputSources") or []):
                local = root / f"input{i}"
                self._fetch(src, local)
                mapping[ci_get(src, "Target")] = local
            results = {}
            for i, rp in enumerate(ci_get(task, "ResultPaths") or []):
                local = root / f"result{i}"
                local.mkdir()
                mapping[ci_get(rp, "Path")] = local
                results[ci_get(rp, "Name")] = local

            def remap(arg: str) -> str:  # container paths → scratch paths, longest first
                for container_path in sorted(mapping, key=len, reverse=True):
                    if arg == container_path or arg.startswith(container_path.rstrip("/") + "/"):
                        return str(mapping[container_path]) + arg[len(container_path.rstrip("/")):]
                return arg

            argv = [remap(a) for a in (ci_get(engine, "Entrypoint") or []) + (ci_get(engine, "Parameters") or [])]
            env = {**os.environ, **dict(e.split("=", 1) for e in ci_get(engine, "EnvironmentVariables") or []),
                   **(ci_get(task, "Env") or {})}
            image_bin = self.knobs["images"].get(ci_get(engine, "Image"))
            env["PATH"] = os.pathsep.join(filter(None, [image_bin, os.path.dirname(sys.executable), env.get("PATH", "")]))
            vanish = self.knobs["vanish_next"] > 0
            fail = self.knobs["fail_next"] > 0
            if vanish:
                self.knobs["vanish_next"] -= 1
            if fail:
                self.knobs["fail_next"] -= 1
                argv = [sys.executable, "-c", "import sys; print('boom: injected failure', file=sys.stderr); sys.exit(1)"]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=ci_get(engine, "WorkingDirectory") and remap(ci_get(engine, "WorkingDirectory")) or root,
                                    start_new_session=True)
            try:
                if vanish:
                    time.sleep(0.2)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    execution.error_msg = f"node {self.node_id} disconnected: execution lost"
                    self._event(job, execution.error_msg, execution, new_state="Failed", new_exec_state="Failed")
                    return
                out, err = self._wait(job, proc, timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                execution.stdout, execution.stderr = out, err
                execution.error_msg = f"execution timed out after {timeout}s"
                self._event(job, execution.error_msg, execution, new_state="Failed", new_exec_state="Failed")
                return
            if job.stop.is_set():
                self._event(job, "execution cancelled", execution, new_state="Stopped", new_exec_state="Cancelled")
                return
            execution.stdout, execution.stderr, execution.exit_code = out, err, proc.returncode
            if proc.returncode != 0:
                execution.error_msg = f"exit status {proc.returncode}"
                self._event(job, execution.error_msg, execution, new_state="Failed", new_exec_state="Failed")
                return
            self._event(job, "publishing results", execution, new_exec_state="Publishing")
            publisher = ci_get(task, "Publisher")
            if results:
                execution.published = self._publish(job, execution, publisher, results)
            self._event(job, "execution completed", execution, new_state="Completed", new_exec_state="Completed")

    def _wait(self, job, proc, timeout):
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            try:
                return proc.communicate(timeout=0.1)
            except subprocess.TimeoutExpired:
                if job.stop.is_set():
                    os.killpg(proc.pid, signal.SIGKILL)
                    return proc.communicate()
                if deadline and time.monotonic() > deadline:
                    raise

    # -------------------------------------------------------------- views

    def job_json(self, job: StoredJob) -> dict:
        spec = dict(job.spec)
        spec.update({"ID": job.id, "State": {"StateType": job.state, "Message": job.message},
                     "CreateTime": job.create_time, "ModifyTime": time.time_ns(), "Version": 1, "Revision": len(job.history)})
        spec.setdefault("Namespace", "default")
        return spec

    def execution_json(self, job: StoredJob, e: Execution) -> dict:
        return {"ID": e.id, "JobID": job.id, "NodeID": e.node_id, "Namespace": "default", "CreateTime": e.create_time,
                "ComputeState": {"StateType": self.states.get(e.state, 0), "Message": e.error_msg or e.state, "Details": {}},
                "DesiredState": {"StateType": 2 if e.state in ("Completed", "Failed", "Cancelled") else 1},
                "RunOutput": {"Stdout": e.stdout[-4096:], "stderr": e.stderr[-4096:], "ExitCode": e.exit_code,
                              "ErrorMsg": e.error_msg},
                "PublishedResult": e.published or {}}


def error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"Status": status, "Message": message, "RequestID": uuid.uuid4().hex, "Code": code,
                         "Component": "APIServer"}, status_code=status)


def build_app(node: Node) -> Starlette:
    def authorized(request: Request) -> bool:
        if not node.token:
            return True
        given = request.headers.get("authorization", "")
        if given.startswith("Basic "):  # --token user:password also accepts HTTP basic auth
            import base64

            return base64.b64decode(given[6:]).decode() == node.token
        return given == f"Bearer {node.token}"

    def guarded(handler):
        async def wrapper(request: Request):
            if not authorized(request):
                return error(401, "unauthorized: missing or invalid token", "Unauthorized")
            return await handler(request)
        return wrapper

    def find(request: Request) -> StoredJob | None:
        job_id = request.path_params["id"]
        job = node.jobs.get(job_id)
        if job is None:  # the real server also resolves a unique job name
            job = next((j for j in node.jobs.values() if ci_get(j.spec, "Name") == job_id), None)
        return job

    async def put_job(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "invalid JSON body", "BadRequest")
        job = ci_get(body, "Job")
        if not isinstance(job, dict):
            return error(400, "missing Job", "InternalError")
        problems = validate(job)
        if problems:
            return error(400, "\n".join(problems), "InternalError")
        if node.knobs["submit_delay_ms"]:
            await asyncio.sleep(node.knobs["submit_delay_ms"] / 1000)
        stored = node.submit(job)
        return JSONResponse({"JobID": stored.id, "EvaluationID": "ev-" + uuid.uuid4().hex[:12], "Warnings": []})

    async def get_job(request: Request):
        job = find(request)
        if job is None:
            return error(404, f"job not found: {request.path_params['id']}", "NotFound")
        include = set(request.query_params.get("include", "").split(","))
        body: dict[str, Any] = {"Job": node.job_json(job)}
        if "executions" in include:
            body["Executions"] = {"Items": [node.execution_json(job, e) for e in job.executions]}
        if "history" in include:
            body["History"] = {"Items": job.history}
        return JSONResponse(body)

    async def list_jobs(request: Request):
        selector = request.query_params.get("labels", "")
        wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
        jobs = [j for j in node.jobs.values()
                if all((ci_get(j.spec, "Labels") or {}).get(k) == v for k, v in wanted.items())]
        jobs.sort(key=lambda j: j.create_time, reverse=request.query_params.get("reverse") == "true")
        limit = int(request.query_params.get("limit", 100))
        offset = int(request.query_params.get("next_token") or 0)
        page = jobs[offset: offset + limit]
        token = str(offset + limit) if offset + limit < len(jobs) else ""
        return JSONResponse({"Items": [node.job_json(j) for j in page], "NextToken": token})

    async def executions(request: Request):
        job = find(request)
        if job is None:
            return error(404, "job not found", "NotFound")
        return JSONResponse({"Items": [node.execution_json(job, e) for e in job.executions], "NextToken": ""})

    async def history(request: Request):
        job = find(request)
        if job is None:
            return error(404, "job not found", "NotFound")
        return JSONResponse({"Items": job.history, "NextToken": ""})

    async def results(request: Request):
        job = find(request)
        if job is None:
            return error(404, "job not found", "NotFound")
        items = []
        for e in job.executions:
            if e.published:
                p = e.published["Params"]
                url = f"{node.s3_endpoint or 'https://s3.amazonaws.com'}/{p['Bucket']}/{p['Key']}"
                items.append({"Type": "s3PreSigned", "Params": {**p, "PreSignedURL": url}})
        return JSONResponse({"Items": items})

    async def stop_job(request: Request):
        job = find(request)
        if job is None:
            return error(404, "job not found", "NotFound")
        if job.state not in ("Completed", "Failed", "Stopped"):
            job.stop.set()
            node._event(job, "job stopped by user", new_state="Stopped")
        return JSONResponse({"EvaluationID": "ev-" + uuid.uuid4().hex[:12]})

    async def nodes(request: Request):
        k = node.knobs
        gpus = [{"index": i, "name": k["gpu_model"], "memory": 24576, "vendor": "NVIDIA"} for i in range(k["gpus"])]
        items = [{
            "Info": {"NodeID": node.node_id, "NodeType": "Compute",
                     "Labels": {"GPU-0": k["gpu_model"], "GPU-0-Memory": "24576-MiB"} if k["gpu_nodes"] and k["gpus"] else {},
                     "ComputeNodeInfo": {
                         "MaxCapacity": {"CPU": 8, "Memory": 34359738368, "Disk": 107374182400,
                                         "GPU": k["gpus"] if k["gpu_nodes"] else 0, "GPUs": gpus if k["gpu_nodes"] else []},
                         "AvailableCapacity": {"CPU": 8, "GPU": max(0, k["gpus"] - k["running"]) if k["gpu_nodes"] else 0},
                         "RunningExecutions": k["running"]},
                     "BacalhauVersion": {"Major": str(node.version[0]), "Minor": str(node.version[1])}},
            "Membership": "APPROVED", "ConnectionState": {"Status": "CONNECTED"},
        }]
        return JSONResponse({"Nodes": items, "NextToken": ""})

    async def alive(request: Request):
        return JSONResponse({"Status": "OK"})

    async def version(request: Request):
        return JSONResponse({"Major": str(node.version[0]), "Minor": str(node.version[1]), "GitVersion": node.git_version,
                             "GitCommit": "standin", "BuildDate": "2026-01-01T00:00:00Z", "GOOS": "linux", "GOARCH": "amd64"})

    async def knobs(request: Request):
        node.set_knobs(await request.json())
        return JSONResponse(node.knobs)

    async def logs(ws: WebSocket):
        await ws.accept()
        job = node.jobs.get(ws.path_params["id"])
        if job is None:
            await ws.send_json({"error": "job not found"})
            await ws.close()
            return
        follow = ws.query_params.get("follow") == "true"
        while follow and job.state not in ("Completed", "Failed", "Stopped"):
            await asyncio.sleep(0.1)
        for e in job.executions:
            for stream, text in ((1, e.stdout), (2, e.stderr)):
                for line in text.splitlines():
                    await ws.send_json({"value": {"Type": stream, "Line": line + "\n", "ExecutionID": e.id}})
        await ws.close()

    routes = [
        Route("/api/v1/orchestrator/jobs", guarded(put_job), methods=["PUT"]),
        Route("/api/v1/orchestrator/jobs", guarded(list_jobs), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}", guarded(get_job), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}", guarded(stop_job), methods=["DELETE"]),
        Route("/api/v1/orchestrator/jobs/{id}/executions", guarded(executions), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}/history", guarded(history), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}/results", guarded(results), methods=["GET"]),
        Route("/api/v1/orchestrator/nodes", guarded(nodes), methods=["GET"]),
        Route("/api/v1/agent/alive", alive, methods=["GET"]),
        Route("/api/v1/agent/version", version, methods=["GET"]),
        Route("/standin/knobs", knobs, methods=["POST"]),
        WebSocketRoute("/api/v1/orchestrator/jobs/{id}/logs", logs),
    ]
    return Starlette(routes=routes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", default="1.7.0")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--gpu-model", default="NVIDIA-A10G")
    ap.add_argument("--token")
    ap.add_argument("--s3-endpoint")
    args = ap.parse_args()
    node = Node(args.version, args.gpus, args.gpu_model, args.token, args.s3_endpoint)
    uvicorn.run(build_app(node), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
