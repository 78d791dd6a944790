"""A Bacalhau orchestrator and its compute nodes, as an HTTP server on 127.0.0.1, built on the
upstream source (bacalhau-project/bacalhau v1.5–v1.9). Each behaviour names the file it mirrors, and
tests/test_bacalhau_conformance.py checks each one against a scenario.

- API: routes, error bodies `{Status, Message, RequestID, Code, Component}`, submit-time validation
  (pkg/publicapi/endpoint/orchestrator/job.go, pkg/models/job.go Validate); auth: an API key user
  needs the capability of the route (read:job, write:job, read:node), else 403; no or a wrong key is
  401 (pkg/authz/api_key_authorizer.go, capabilities.go; pkg/publicapi/middleware/authz.go).
- Job listing: label selectors (`k=v`, `k`, `!k`, `k in (a,b)`), `order_by` created_at or
  modified_at, `reverse`, paging by `next_token` (job.go listJobs, pkg/jobstore/boltdb/store.go).
- States: job states as strings; execution ComputeState as integers, numbered as v1.6 does, or v1.5
  before it (pkg/models/execution.go).
- Nodes: `NodeState` JSON, capacities in CPU units and bytes, GPUs as `models.GPU` with no json tags
  (`Name`, `Memory` in MiB, `Vendor`, `Index`: pkg/models/resource.go), automatic labels `GPU-<i>`
  (the model with dashes for spaces) and `GPU-<i>-Memory` (pkg/compute/capacity/labels.go); a node
  offers 80% of its machine's CPU, memory and disk and all its GPUs (pkg/config/defaults.go).
- Placement: the constraints must match the node's labels (ranking/labels.go); the task must fit the
  node's MaxJobRequirements, its allocated share (ranking/max_usage.go, pkg/node/compute.go); a node
  that ran the job twice, or holds a live execution of it, is unsuitable (ranking/previous_executions.go).
  No node: the job fails at once with QueueTimeout 0, else waits Queued until QueueTimeout counted
  from its creation (pkg/orchestrator/scheduler/batch_service_job.go). A node runs what fits its free
  capacity and holds the rest.
- Retries: a failed execution is placed again by the orchestrator itself (pkg/node/requester.go:
  FixedStrategy{ShouldRetry: true}), under the same placement rules.
- Inputs: an S3 key is downloaded to its base name; a prefix (`/` or `*`) to paths relative to it,
  `Filter` matched against that relative key (pkg/storage/s3/storage.go).
- Running: each ResultPath is a folder `<results>/<Name>` mounted at its Path; stdout, stderr and
  exitCode are written beside them, and RunOutput keeps the first 2 KiB of each stream
  (pkg/executor/docker/executor.go makeContainerMounts, pkg/executor/results.go).
- Outcomes: a container that exits, whatever its code, is published and Completed with
  RunOutput.ExitCode; an ErrorMsg (an out-of-memory kill, an image that cannot be pulled, an input
  that cannot be fetched, a timeout) fails the execution with ComputeState.Message, unpublished and
  without RunOutput (pkg/compute/executor.go, pkg/executor/docker/handler.go).
- Publishing: `plain` uploads every file of the results folder under Key; `gzip` one `Key.tar.gz`
  (pkg/publisher/s3/publisher.go).
- Images: a node runs an image it holds; any other it pulls, and only with DOCKER_USERNAME /
  DOCKER_PASSWORD, and only for names with fewer than two slashes; a private registry image it does
  not hold is a pull error (pkg/docker/docker.go PullImage, getAuthToken).

    python tests/bacalhau_standin.py --port 1234 [--version 1.9.3] [--api-key KEY[:cap,cap]] [--basic USER:PASS]

Test knobs (POST /standin/knobs, not part of the real API): `nodes` (a list of machines:
`{id, cpu, memory_gib, disk_gb, gpus: [{name, memory_mib}], labels, connected, images}`; `images`:
image name → a folder put first on PATH, what that image holds, or null to hold any image),
`crash_next` (the next N executions die as a lost node would), `oom_next` (killed out of memory),
`env` (the nodes' environment for executions: what the image is run with),
`hold` (nodes accept executions but start none), `submit_delay_ms`, `unavailable` (the next N API
requests answer 503, as an orchestrator that is restarting or overloaded does). It reports `running` and
`peak_running` executions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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

# The host variables a stand-in "image" keeps: where programs and temporary files are, the locale, and
# this machine's OpenBLAS settings (it crashes on some processors without them).
IMAGE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

JOB_TYPES = {"batch", "ops", "service", "daemon"}
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
CPU = re.compile(r"^\d+(\.\d+)?m?$")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?i?b?)?\s*$", re.I)
NETWORKS = {"default", "none", "host", "http", "bridge"}
OPERATORS = {"in", "notin", "exists", "!", "=", "==", "!=", "gt", "lt", "doesnotexist"}
# ComputeState numbers, v1.6+ and v1.5 (v1.5 had no Running/Publishing: BidAccepted meant running)
STATES_16 = {"New": 1, "AskForBid": 2, "AskForBidAccepted": 3, "BidAccepted": 5, "Running": 6, "Publishing": 7,
             "BidRejected": 8, "Completed": 9, "Failed": 10, "Cancelled": 11}
STATES_15 = {"New": 1, "AskForBid": 2, "AskForBidAccepted": 3, "BidAccepted": 5, "Running": 5, "Publishing": 5,
             "BidRejected": 6, "Completed": 7, "Failed": 8, "Cancelled": 9}
ALLOCATED = 0.8  # Compute.AllocatedCapacity default for CPU, memory and disk (pkg/config/defaults.go)
RETURN_LIMIT = 2048  # system.MaxStdoutReturnLength / MaxStderrReturnLength (pkg/system/utils.go)
TERMINAL = ("Completed", "Failed", "Stopped")
G5_XLARGE = {"id": "n-g5-xlarge", "cpu": 4, "memory_gib": 16, "disk_gb": 200,
             "gpus": [{"name": "NVIDIA A10G", "memory_mib": 23028}], "labels": {}, "connected": True, "images": None}


def ci_get(d: dict | None, key: str, default: Any = None) -> Any:
    """The real server matches keys case-insensitively."""
    if not isinstance(d, dict):
        return default
    for k, v in d.items():
        if k.lower() == key.lower():
            return v
    return default


def parse_size(text: str) -> int:
    """go-humanize ParseBytes: `gb` is 10⁹, `gib` 2³⁰ (pkg/models/resource.go ToResources)."""
    m = SIZE.match(str(text))
    if not m:
        raise ValueError(text)
    unit = (m.group(2) or "b").lower()
    power = "bkmgtpe".index(unit[0]) if unit[0] != "b" else 0
    return int(float(m.group(1)) * (1024 if "i" in unit else 1000) ** power)


def task_resources(task: dict) -> dict:
    res = ci_get(task, "Resources") or {}
    cpu = str(ci_get(res, "CPU") or "0")
    return {"CPU": float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu),
            "Memory": parse_size(ci_get(res, "Memory") or "0"), "Disk": parse_size(ci_get(res, "Disk") or "0"),
            "GPU": int(ci_get(res, "GPU") or 0)}


def validate(job: dict) -> list[str]:
    """The submit-time checks of the real orchestrator (pkg/models/job.go); every problem, one per line."""
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


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector, as the jobs listing reads `labels=` (k8s.io/apimachinery labels)."""
    for part in re.split(r",(?![^()]*\))", selector):
        part = part.strip()
        if not part:
            continue
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            values = {v.strip() for v in m.group(3).split(",")}
            if (labels.get(m.group(1)) in values) != (m.group(2) == "in"):
                return False
        elif m := re.fullmatch(r"(\S+?)\s*(==|=|!=)\s*(\S*)", part):
            if (labels.get(m.group(1)) == m.group(3)) != (m.group(2) != "!="):
                return False
        elif part.startswith("!"):
            if part[1:] in labels:
                return False
        elif part not in labels:
            return False
    return True


def constraint_matches(constraint: dict, labels: dict[str, str]) -> bool:
    key, op = ci_get(constraint, "Key"), str(ci_get(constraint, "Operator")).lower()
    values = [str(v) for v in ci_get(constraint, "Values") or []]
    have = labels.get(key)
    return {"=": have in values, "==": have in values, "in": have in values, "!=": have not in values,
            "notin": have not in values, "exists": key in labels, "!": key not in labels,
            "doesnotexist": key not in labels,
            "gt": have is not None and values and have.isdigit() and int(have) > int(values[0]),
            "lt": have is not None and values and have.isdigit() and int(have) < int(values[0])}.get(op, False)


@dataclass
class ComputeNode:
    """One compute node: a machine's share offered to Bacalhau, its labels and what it runs."""

    id: str
    cpu: float
    memory: int
    disk: int
    gpus: list[dict]
    labels: dict[str, str]
    connected: bool = True
    images: dict[str, str | None] | None = None  # image → folder on PATH; None: holds any image
    used: dict[str, float] = field(default_factory=lambda: {"CPU": 0.0, "Memory": 0, "Disk": 0, "GPU": 0})

    @classmethod
    def from_spec(cls, spec: dict) -> "ComputeNode":
        gpus = [{"Index": i, "Name": g["name"], "Vendor": g.get("vendor", "NVIDIA"), "Memory": g["memory_mib"],
                 "PCIAddress": f"0000:00:1{e}.0"} for i, (g, e) in enumerate(zip(spec.get("gpus", []), "efghijkl"))]
        labels = dict(spec.get("labels") or {})
        for g in gpus:  # automatic labels (pkg/compute/capacity/labels.go)
            labels[f"GPU-{g['Index']}"] = g["Name"].replace(" ", "-")
            labels[f"GPU-{g['Index']}-Memory"] = f"{g['Memory']}-MiB"
        return cls(id=spec["id"], cpu=spec["cpu"] * ALLOCATED, memory=int(spec["memory_gib"] * 2**30 * ALLOCATED),
                   disk=int(spec["disk_gb"] * 10**9 * ALLOCATED), gpus=gpus, labels=labels,
                   connected=spec.get("connected", True), images=spec.get("images"))

    def max(self) -> dict:
        return {"CPU": self.cpu, "Memory": self.memory, "Disk": self.disk, "GPU": len(self.gpus)}

    def fits(self, need: dict, free: bool) -> bool:
        have = self.max()
        return all(need[k] <= have[k] - (self.used[k] if free else 0) + 1e-9 for k in need)

    def resources_json(self, values: dict, gpus: list[dict] | None) -> dict:
        out = {"CPU": values["CPU"], "Memory": values["Memory"], "Disk": values["Disk"]}
        if values["GPU"]:
            out["GPU"] = values["GPU"]
            out["GPUs"] = gpus or []
        return out

    def state_json(self, version: tuple[int, int], running: int) -> dict:
        free = {k: self.max()[k] - self.used[k] for k in self.used}
        status = "CONNECTED" if self.connected else "DISCONNECTED"
        return {
            "Info": {"NodeID": self.id, "NodeType": "Compute", "Labels": self.labels, "SupportedProtocols": ["ncl/v1"],
                     "ComputeNodeInfo": {
                         "ExecutionEngines": ["docker"], "Publishers": ["s3", "noop"], "StorageSources": ["s3", "urldownload"],
                         "MaxCapacity": self.resources_json(self.max(), self.gpus),
                         "QueueCapacity": {}, "AvailableCapacity": self.resources_json(free, self.gpus[: int(free["GPU"])]),
                         "MaxJobRequirements": self.resources_json(self.max(), self.gpus),
                         "RunningExecutions": running, "EnqueuedExecutions": 0, "address": "127.0.0.1"},
                     "BacalhauVersion": {"Major": str(version[0]), "Minor": str(version[1])}},
            "Membership": "APPROVED", "Connection": status,
            "ConnectionState": {"Status": status, "LastHeartbeat": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }


@dataclass
class Execution:
    id: str
    node_id: str
    state: str = "New"
    message: str = ""
    run_output: dict | None = None
    published: dict | None = None
    create_time: int = field(default_factory=time.time_ns)
    modify_time: int = field(default_factory=time.time_ns)


@dataclass
class StoredJob:
    spec: dict
    id: str
    state: str = "Pending"
    message: str = ""
    executions: list[Execution] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    create_time: int = field(default_factory=time.time_ns)
    modify_time: int = field(default_factory=time.time_ns)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def task(self) -> dict:
        return ci_get(self.spec, "Tasks")[0]


class Orchestrator:
    """The orchestrator, its compute nodes, and the knobs tests turn."""

    def __init__(self, version: str, s3_endpoint: str | None, api_key: str | None, basic: str | None):
        self.version = tuple(int(x) for x in version.split(".")[:2])
        self.git_version = f"v{version}"
        self.states = STATES_15 if self.version < (1, 6) else STATES_16
        self.api_key, self.basic = api_key, basic
        self.s3_endpoint = s3_endpoint
        self.jobs: dict[str, StoredJob] = {}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # capacity, knobs or nodes changed: waiting work looks again
        self.seq = itertools.count(1)
        self.nodes = [ComputeNode.from_spec(G5_XLARGE)]
        self.knobs = {"crash_next": 0, "oom_next": 0, "hold": False, "submit_delay_ms": 0, "env": {}, "running": 0,
                      "peak_running": 0, "unavailable": 0}

    def set_knobs(self, values: dict) -> dict:
        unknown = set(values) - set(self.knobs) - {"nodes"}
        if unknown:  # a misspelt knob would otherwise leave a test running something it did not mean to
            raise ValueError(f"unknown knobs {sorted(unknown)}; known: {sorted(self.knobs)} and nodes")
        with self.changed:
            if "nodes" in values:
                self.nodes = [ComputeNode.from_spec({**G5_XLARGE, **spec}) for spec in values.pop("nodes")]
            self.knobs.update(values)
            self.changed.notify_all()
            return {**self.knobs, "nodes": [n.id for n in self.nodes]}

    # -------------------------------------------------------------- state changes

    def _event(self, job: StoredJob, message: str, execution: Execution | None = None, new_state: str | None = None,
               new_exec_state: str | None = None) -> None:
        event = {"Type": "ExecutionLevel" if execution else "JobLevel", "JobID": job.id, "SeqNum": next(self.seq),
                 "Time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "Event": {"Message": message, "Topic": "Exec" if execution else "Jobs", "Details": {}}}
        with self.lock:
            if new_state:
                event["JobState"] = {"Previous": job.state, "New": new_state}
                job.state = new_state
                if new_state in ("Failed", "Stopped"):
                    job.message = message
            if execution is not None:
                event["ExecutionID"] = execution.id
                execution.modify_time = time.time_ns()
                if new_exec_state:
                    event["ExecutionState"] = {"Previous": self.states.get(execution.state, 0), "New": self.states[new_exec_state]}
                    execution.state = new_exec_state
            job.modify_time = time.time_ns()
            job.history.append(event)

    def submit(self, spec: dict) -> StoredJob:
        job = StoredJob(spec=spec, id="j-" + str(uuid.uuid4()))
        with self.lock:
            self.jobs[job.id] = job
        self._event(job, "Job submitted", new_state="Pending")
        threading.Thread(target=self._schedule, args=(job,), daemon=True).start()
        return job

    # -------------------------------------------------------------- scheduling (batch_service_job.go)

    def _why_not(self, job: StoredJob, node: ComputeNode, need: dict) -> str | None:
        if not node.connected:
            return "node is not connected"
        for c in ci_get(job.spec, "Constraints") or []:
            if not constraint_matches(c, node.labels):
                return f"does not match selector {ci_get(c, 'Key')} {ci_get(c, 'Operator')} {ci_get(c, 'Values')}"
        if not node.fits(need, free=False):
            return f"job requires more resources than the maximum available ({node.max()})"
        runs = [e for e in job.executions if e.node_id == node.id]
        if len(runs) > 1:
            return "job already executed on this node more than once"
        if any(e.state not in ("Failed", "Cancelled") for e in runs):
            return "job rejected"
        return None

    def _schedule(self, job: StoredJob) -> None:
        """Place the job's one partition on a node, again after each failed execution, until it
        completes, fails, is stopped, or no node will take it within its queue timeout."""
        timeouts = ci_get(job.task, "Timeouts") or {}
        queue_timeout = int(ci_get(timeouts, "QueueTimeout", 0) or 0)
        total_timeout = int(ci_get(timeouts, "TotalTimeout", 0) or 0)
        need = task_resources(job.task)
        while not job.stop.is_set():
            with self.changed:
                reasons = {n.id: self._why_not(job, n, need) for n in self.nodes}
                node = next((n for n in self.nodes if reasons[n.id] is None), None)
                if node is None:
                    detail = "; ".join(f"node {k}: {v}" for k, v in reasons.items())
                    message = f"not enough nodes to run job. requested: 1, available: 0. {detail}"
                    if time.time_ns() - job.create_time >= queue_timeout * 10**9:
                        self._event(job, message, new_state="Failed")
                        return
                    if job.state != "Queued":
                        self._event(job, f"Job queued: {message}", new_state="Queued")
                    self.changed.wait(timeout=0.2)
                    continue
                execution = Execution(id="e-" + str(uuid.uuid4()), node_id=node.id)
                job.executions.append(execution)
            for state in ("AskForBid", "AskForBidAccepted", "BidAccepted"):
                self._event(job, f"execution {state}", execution, new_exec_state=state)
            self._run_on(job, node, execution, need, total_timeout)
            if job.state in TERMINAL:
                return
            # the execution failed: the orchestrator places it again (requester.go, FixedStrategy)

    def _run_on(self, job: StoredJob, node: ComputeNode, execution: Execution, need: dict, total_timeout: int) -> None:
        with self.changed:  # the node runs what fits its free capacity and holds the rest
            while not job.stop.is_set() and (self.knobs["hold"] or not node.fits(need, free=True)):
                self.changed.wait(timeout=0.2)
            if job.stop.is_set():
                return self._event(job, "execution cancelled", execution, new_exec_state="Cancelled")
            for k in need:
                node.used[k] += need[k]
            self.knobs["running"] += 1
            self.knobs["peak_running"] = max(self.knobs["peak_running"], self.knobs["running"])
        self._event(job, "Running", execution, new_state="Running" if job.state != "Running" else None,
                    new_exec_state="Running")
        try:
            self._execute(job, node, execution)
        except Exception as exc:  # a system error of the stand-in's own: the execution fails, as upstream's would
            self._fail(job, execution, f"{exc.__class__.__name__}: {exc}")
        finally:
            with self.changed:
                for k in need:
                    node.used[k] -= need[k]
                self.knobs["running"] -= 1
                self.changed.notify_all()

    def _fail(self, job: StoredJob, execution: Execution, message: str) -> None:
        """An ErrorMsg fails the execution, unpublished; the job goes on (it will be placed again)."""
        execution.message = message
        self._event(job, message, execution, new_exec_state="Failed")

    # -------------------------------------------------------------- the compute node (docker executor)

    def _s3(self, params: dict):
        endpoint = ci_get(params, "Endpoint") or self.s3_endpoint
        return boto3.client("s3", endpoint_url=endpoint, region_name=ci_get(params, "Region") or "us-east-1",
                            config=Config(retries={"max_attempts": 2}))

    def _fetch(self, source: dict, into: Path) -> None:
        """pkg/storage/s3/storage.go: a key to its base name; a prefix to paths relative to it."""
        params = ci_get(ci_get(source, "Source"), "Params") or {}
        bucket, key = ci_get(params, "Bucket"), ci_get(params, "Key", "")
        if not bucket or not key:
            raise RuntimeError("S3 input source needs Bucket and Key")
        pattern = re.compile(ci_get(params, "Filter")) if ci_get(params, "Filter") else None
        s3 = self._s3(params)
        into.mkdir(parents=True, exist_ok=True)
        if key.endswith("/") or key.endswith("*"):
            prefix = key.rstrip("*")
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    relative = obj["Key"][len(prefix.rsplit("/", 1)[0]) + 1 if "/" in prefix else 0:]
                    if pattern and not pattern.search(obj["Key"][len(prefix):]):
                        continue
                    target = into / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(target))
        else:
            s3.download_file(bucket, key, str(into / Path(key).name))

    def _publish(self, job: StoredJob, execution: Execution, results: Path) -> dict:
        """pkg/publisher/s3/publisher.go: the whole results folder under Key."""
        params = ci_get(ci_get(job.task, "Publisher"), "Params") or {}
        bucket, key = ci_get(params, "Bucket"), ci_get(params, "Key", "")
        for placeholder, value in (("{jobID}", job.id), ("{executionID}", execution.id), ("{nodeID}", execution.node_id),
                                   ("{date}", time.strftime("%Y%m%d")), ("{time}", time.strftime("%H%M%S"))):
            key = key.replace(placeholder, value)
        encoding = ci_get(params, "Encoding", "gzip")
        if encoding not in ("gzip", "plain"):
            raise RuntimeError(f"unknown publisher encoding {encoding!r}")
        s3 = self._s3(params)
        if encoding == "plain":
            for file in sorted(p for p in results.rglob("*") if p.is_file()):
                s3.upload_file(str(file), bucket, key + file.relative_to(results).as_posix())
        else:
            with tempfile.NamedTemporaryFile(suffix=".tar.gz") as tmp:
                with tarfile.open(tmp.name, "w:gz") as tar:
                    for path in sorted(results.iterdir()):
                        tar.add(path, arcname=path.name)
                key = key + ".tar.gz"
                s3.upload_file(tmp.name, bucket, key)
        return {"Type": "s3", "Params": {"Bucket": bucket, "Key": key, "Region": ci_get(params, "Region", "")}}

    def _image_path(self, node: ComputeNode, image: str) -> str:
        """pkg/docker/docker.go: a held image runs; another is pulled, with credentials only from
        DOCKER_USERNAME/PASSWORD and only for names with fewer than two slashes."""
        if node.images is None:
            return ""
        if image in node.images:
            return node.images[image] or ""
        if image.count("/") >= 2 or "." in image.split("/")[0]:  # a private registry: no credentials reach it
            raise RuntimeError(f"failed to pull image {image}: unauthorized: authentication required")
        raise RuntimeError(f"failed to pull image {image}: not found")

    def _execute(self, job: StoredJob, node: ComputeNode, execution: Execution) -> None:
        task = job.task
        engine = ci_get(ci_get(task, "Engine"), "Params") or {}
        image = ci_get(engine, "Image")
        if not image:
            raise RuntimeError("docker engine: image is empty")
        timeout = int(ci_get(ci_get(task, "Timeouts") or {}, "ExecutionTimeout", 0) or 0) or None
        with tempfile.TemporaryDirectory(prefix="standin-") as scratch:
            root = Path(scratch)
            image_bin = self._image_path(node, image)
            # the container's filesystem: a folder where each mount is a link at its target path
            # (no mount namespace here); the arguments' container paths are rewritten into it
            fs = root / "fs"

            def mount(target: str, host: Path) -> None:
                at = fs / target.lstrip("/")
                at.parent.mkdir(parents=True, exist_ok=True)
                at.symlink_to(host, target_is_directory=True)

            for i, src in enumerate(ci_get(task, "InputSources") or []):
                local = root / f"input{i}"
                try:
                    self._fetch(src, local)
                except Exception as exc:
                    raise RuntimeError(f"failed to prepare input {ci_get(src, 'Alias')}: {exc}") from None
                mount(ci_get(src, "Target"), local)
            results = root / "results"
            results.mkdir()
            for rp in ci_get(task, "ResultPaths") or []:  # makeContainerMounts: <results>/<Name> at Path
                (results / ci_get(rp, "Name")).mkdir()
                mount(ci_get(rp, "Path"), results / ci_get(rp, "Name"))

            def remap(arg: str) -> str:
                top = arg.lstrip("/").split("/", 1)[0]
                return str(fs) + arg if arg.startswith("/") and top and (fs / top).exists() else arg

            argv = [remap(a) for a in (ci_get(engine, "Entrypoint") or []) + (ci_get(engine, "Parameters") or [])]
            # what the image's own ENV would hold, the `env` knob (the image), then the spec's variables:
            # never the node's environment, whose S3 credentials a container must not see
            # (pkg/executor/docker/executor.go passes only the spec's EnvironmentVariables and Env)
            env = {**{k: os.environ[k] for k in IMAGE_ENV if k in os.environ}, **self.knobs["env"],
                   **dict(e.split("=", 1) for e in ci_get(engine, "EnvironmentVariables") or []), **(ci_get(task, "Env") or {})}
            env["PATH"] = os.pathsep.join(filter(None, [image_bin, os.path.dirname(sys.executable), env.get("PATH", "")]))
            with self.lock:
                crash, oom = self.knobs["crash_next"] > 0, self.knobs["oom_next"] > 0
                self.knobs["crash_next"] -= int(crash)
                self.knobs["oom_next"] -= int(oom and not crash)
            stdout, stderr = open(root / "stdout.tmp", "w+b"), open(root / "stderr.tmp", "w+b")
            workdir = ci_get(engine, "WorkingDirectory")
            proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=remap(workdir) if workdir else root,
                                    start_new_session=True)
            started = time.monotonic()
            while proc.poll() is None:
                if job.stop.is_set() or crash or oom or (timeout and time.monotonic() - started > timeout):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.05)
            if job.stop.is_set():
                return self._event(job, "execution cancelled", execution, new_exec_state="Cancelled")
            if crash:
                return self._fail(job, execution, f"node {node.id} is unhealthy: execution lost")
            if oom:  # docker's State.OOMKilled: an ErrorMsg (handler.go)
                return self._fail(job, execution, "memory limit exceeded")
            if timeout and proc.returncode < 0 and time.monotonic() - started > timeout:
                return self._fail(job, execution, f"execution timed out after {timeout}s")
            run_output = {}
            for name, fh in (("stdout", stdout), ("stderr", stderr)):  # WriteJobResults
                fh.seek(0)
                data = fh.read()
                fh.close()
                (results / name).write_bytes(data)
                run_output["Stdout" if name == "stdout" else "stderr"] = data[:RETURN_LIMIT].decode(errors="replace")
                run_output["StdoutTruncated" if name == "stdout" else "StderrTruncated"] = len(data) > RETURN_LIMIT
            (results / "exitCode").write_text(str(proc.returncode))
            run_output.update(ExitCode=proc.returncode, ErrorMsg="")
            execution.run_output = run_output
            self._event(job, "publishing results", execution, new_exec_state="Publishing")
            if ci_get(ci_get(task, "Publisher"), "Type"):
                execution.published = self._publish(job, execution, results)
            self._event(job, "execution completed", execution, new_state="Completed", new_exec_state="Completed")

    # -------------------------------------------------------------- views

    def job_json(self, job: StoredJob) -> dict:
        spec = dict(job.spec)
        spec.update({"ID": job.id, "State": {"StateType": job.state, "Message": job.message},
                     "CreateTime": job.create_time, "ModifyTime": job.modify_time, "Version": 1, "Revision": len(job.history)})
        spec.setdefault("Namespace", "default")
        return spec

    def execution_json(self, job: StoredJob, e: Execution) -> dict:
        return {"ID": e.id, "JobID": job.id, "NodeID": e.node_id, "Namespace": "default", "CreateTime": e.create_time,
                "ModifyTime": e.modify_time,
                "ComputeState": {"StateType": self.states.get(e.state, 0), "Message": e.message, "Details": {}},
                "DesiredState": {"StateType": 2 if e.state in ("Completed", "Failed", "Cancelled") else 1},
                "RunOutput": e.run_output, "PublishedResult": e.published or {}}


def error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"Status": status, "Message": message, "RequestID": uuid.uuid4().hex, "Code": code,
                         "Component": "APIServer"}, status_code=status)


def build_app(orch: Orchestrator) -> Starlette:
    def authorize(request: Request, capability: str) -> JSONResponse | None:
        """api_key_authorizer.go + capabilities.go: no/unknown key 401, a key without the capability 403."""
        if not orch.api_key and not orch.basic:
            return None
        given = request.headers.get("authorization", "")
        if orch.basic and given.startswith("Basic "):
            if base64.b64decode(given[6:]).decode(errors="replace") == orch.basic:
                return None
            return error(401, "Request Unauthorized", "UnauthorizedError")
        key, _, caps = (orch.api_key or "").partition(":")
        if not key or given != f"Bearer {key}":
            return error(401, "Request Unauthorized", "UnauthorizedError")
        allowed = caps.split(",") if caps else ["*"]
        if not ({"*", capability} & set(allowed) or (capability.startswith("read:") and "read:*" in allowed)):
            return error(403, "Request Forbidden", "Forbidden")
        return None

    def guarded(handler, capability: str):
        async def wrapper(request: Request):
            with orch.lock:  # knob `unavailable`: the next N API requests meet an orchestrator that is down
                down = orch.knobs["unavailable"] > 0
                orch.knobs["unavailable"] -= down
            if down:
                return error(503, "service unavailable", "ServiceUnavailable")
            return authorize(request, capability) or await handler(request)
        return wrapper

    def find(request: Request) -> StoredJob | None:
        job_id = request.path_params["id"]
        job = orch.jobs.get(job_id)
        if job is None:  # the real server also resolves a unique job name
            job = next((j for j in orch.jobs.values() if ci_get(j.spec, "Name") == job_id), None)
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
        if orch.knobs["submit_delay_ms"]:
            await asyncio.sleep(orch.knobs["submit_delay_ms"] / 1000)
        stored = orch.submit(job)
        return JSONResponse({"JobID": stored.id, "EvaluationID": "ev-" + uuid.uuid4().hex[:12], "Warnings": []})

    async def get_job(request: Request):
        job = find(request)
        if job is None:
            return error(404, f"job not found: {request.path_params['id']}", "NotFound")
        include = set(request.query_params.get("include", "").split(","))
        body: dict[str, Any] = {"Job": orch.job_json(job)}
        if "executions" in include:
            body["Executions"] = {"Items": [orch.execution_json(job, e) for e in job.executions]}
        if "history" in include:
            body["History"] = {"Items": job.history}
        return JSONResponse(body)

    async def list_jobs(request: Request):
        q = request.query_params
        order = q.get("order_by") or "created_at"
        if order not in ("created_at", "modified_at", "create_time", "modify_time"):
            return error(400, f"OrderBy {order} not supported for listJobs", "BadRequest")
        selector = ",".join(request.query_params.getlist("labels"))
        namespace = q.get("namespace") or "default"
        with orch.lock:
            jobs = [j for j in orch.jobs.values() if selector_matches(selector, ci_get(j.spec, "Labels") or {})
                    and (namespace == "*" or (ci_get(j.spec, "Namespace") or "default") == namespace)]
        key = (lambda j: j.modify_time) if order.startswith("modif") else (lambda j: j.create_time)
        jobs.sort(key=key, reverse=q.get("reverse") == "true")
        limit = int(q.get("limit") or 100)
        offset = int(base64.b64decode(q["next_token"]).decode()) if q.get("next_token") else 0
        page = jobs[offset: offset + limit]
        token = base64.b64encode(str(offset + limit).encode()).decode() if offset + limit < len(jobs) else ""
        return JSONResponse({"Items": [orch.job_json(j) for j in page], "NextToken": token})

    async def executions(request: Request):
        job = find(request)
        if job is None:
            return error(404, "job not found", "NotFound")
        return JSONResponse({"Items": [orch.execution_json(job, e) for e in job.executions], "NextToken": ""})

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
                url = f"{orch.s3_endpoint or 'https://s3.amazonaws.com'}/{p['Bucket']}/{p['Key']}"
                items.append({"Type": "s3PreSigned", "Params": {**p, "PreSignedURL": url}})
        return JSONResponse({"Items": items})

    async def stop_job(request: Request):
        job = find(request)
        if job is None:
            return error(404, "job not found", "NotFound")
        if job.state not in TERMINAL:
            job.stop.set()
            orch._event(job, "job stopped by user", new_state="Stopped")
            with orch.changed:
                orch.changed.notify_all()
        return JSONResponse({"EvaluationID": "ev-" + uuid.uuid4().hex[:12]})

    async def nodes(request: Request):
        with orch.lock:
            running = {n.id: sum(1 for j in orch.jobs.values() for e in j.executions
                                 if e.node_id == n.id and e.state == "Running") for n in orch.nodes}
            items = [n.state_json(orch.version, running[n.id]) for n in orch.nodes]
        return JSONResponse({"Nodes": items, "NextToken": ""})

    async def alive(request: Request):
        return JSONResponse({"Status": "OK"})

    async def version(request: Request):
        return JSONResponse({"Major": str(orch.version[0]), "Minor": str(orch.version[1]), "GitVersion": orch.git_version,
                             "GitCommit": "standin", "BuildDate": "2026-01-01T00:00:00Z", "GOOS": "linux", "GOARCH": "amd64"})

    async def knobs(request: Request):
        try:
            return JSONResponse(orch.set_knobs(await request.json()))
        except ValueError as exc:
            return error(400, str(exc), "BadRequest")

    async def logs(ws: WebSocket):
        await ws.accept()
        job = orch.jobs.get(ws.path_params["id"])
        if job is None:
            await ws.send_json({"error": "job not found"})
            await ws.close()
            return
        follow = ws.query_params.get("follow") == "true"
        while follow and job.state not in TERMINAL:
            await asyncio.sleep(0.1)
        for e in job.executions:
            for stream, key in ((1, "Stdout"), (2, "stderr")):
                for line in ((e.run_output or {}).get(key) or "").splitlines():
                    await ws.send_json({"value": {"Type": stream, "Line": line + "\n", "ExecutionID": e.id}})
        await ws.close()

    routes = [
        Route("/api/v1/orchestrator/jobs", guarded(put_job, "write:job"), methods=["PUT"]),
        Route("/api/v1/orchestrator/jobs", guarded(list_jobs, "read:job"), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}", guarded(get_job, "read:job"), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}", guarded(stop_job, "write:job"), methods=["DELETE"]),
        Route("/api/v1/orchestrator/jobs/{id}/executions", guarded(executions, "read:job"), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}/history", guarded(history, "read:job"), methods=["GET"]),
        Route("/api/v1/orchestrator/jobs/{id}/results", guarded(results, "read:job"), methods=["GET"]),
        Route("/api/v1/orchestrator/nodes", guarded(nodes, "read:node"), methods=["GET"]),
        Route("/api/v1/agent/alive", alive, methods=["GET"]),
        Route("/api/v1/agent/version", version, methods=["GET"]),
        Route("/standin/knobs", knobs, methods=["POST"]),
        WebSocketRoute("/api/v1/orchestrator/jobs/{id}/logs", logs),
    ]
    return Starlette(routes=routes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", default="1.9.3")  # the pinned release (aws/bacalhau.py)
    ap.add_argument("--api-key", help="KEY or KEY:capability,capability (an API key user, pkg/authz)")
    ap.add_argument("--basic", help="USER:PASSWORD (a basic-auth user)")
    ap.add_argument("--s3-endpoint")
    args = ap.parse_args()
    orch = Orchestrator(args.version, args.s3_endpoint, args.api_key, args.basic)
    uvicorn.run(build_app(orch), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
