"""A small typed client for Bacalhau's v1 orchestrator API, on httpx.

Facts it relies on (see shared/reference/bacalhau/NOTES.md and the upstream files named below):
keys are PascalCase; job states are strings; execution ComputeState is an integer whose numbering
changed in v1.6 (so `version()` is read once and the numbers are mapped to `ExecutionState` names);
a node's GPUs are `models.GPU` with no json tags (`Name`, `Memory` in MiB, `Vendor`, `Index`:
pkg/models/resource.go), its capacity is CPU units, bytes and a GPU count; the log WebSocket is best
effort, state is followed by polling. Server errors become `BacalhauError` subclasses that carry the
server's own message.

    client = BacalhauClient.from_settings(settings)   # BACALHAU_API_HOST / _PORT / _KEY / ... via Settings
    job_id = client.submit(spec).job_id
    info = client.describe(job_id)                    # state, executions (with RunOutput), history
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx

if TYPE_CHECKING:
    from .settings import Settings

DEFAULT_PORT = 1234


class BacalhauError(Exception):
    """The server said no. `message` is the server's own text."""

    def __init__(self, status: int, message: str, code: str | None = None, request_id: str | None = None):
        super().__init__(f"Bacalhau {status}: {message}")
        self.status, self.message, self.code, self.request_id = status, message, code, request_id


class BadRequest(BacalhauError):
    """The spec was rejected (HTTP 400); the message lists every problem, one per line."""


class Unauthorized(BacalhauError):
    """401 "Request Unauthorized" or 403 "Request Forbidden" (pkg/publicapi/middleware/authz.go at
    v1.9.3): the credentials are wrong, or their user lacks the route's capability. The message says
    which setting to fix."""

    def __init__(self, status: int, message: str, code: str | None = None, request_id: str | None = None):
        super().__init__(status, f"Bacalhau refused this deployment's credentials ({status} {message}): check "
                         "bacalhau_api_key (BACALHAU_API_KEY, or the secret bacalhau_api_key_secret names) and that its "
                         "user may read:job, write:job and read:node", code, request_id)


class NotFound(BacalhauError):
    pass


class Unavailable(BacalhauError):
    """The server could not be reached or answered 5xx: try again later, or fall back."""


class JobState(str, Enum):
    UNDEFINED = "Undefined"
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPED = "Stopped"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.STOPPED)


class ExecutionState(str, Enum):
    UNDEFINED = "Undefined"
    NEW = "New"
    ASK_FOR_BID = "AskForBid"
    ASK_FOR_BID_ACCEPTED = "AskForBidAccepted"
    ASK_FOR_BID_REJECTED = "AskForBidRejected"
    BID_ACCEPTED = "BidAccepted"
    RUNNING = "Running"
    PUBLISHING = "Publishing"
    BID_REJECTED = "BidRejected"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


# ComputeState.StateType numbers: v1.6 inserted Running and Publishing before BidRejected.
_V16 = [ExecutionState.UNDEFINED, ExecutionState.NEW, ExecutionState.ASK_FOR_BID, ExecutionState.ASK_FOR_BID_ACCEPTED,
        ExecutionState.ASK_FOR_BID_REJECTED, ExecutionState.BID_ACCEPTED, ExecutionState.RUNNING,
        ExecutionState.PUBLISHING, ExecutionState.BID_REJECTED, ExecutionState.COMPLETED, ExecutionState.FAILED,
        ExecutionState.CANCELLED]
_V15 = _V16[:6] + [ExecutionState.BID_REJECTED, ExecutionState.COMPLETED, ExecutionState.FAILED, ExecutionState.CANCELLED]


def execution_state(number: int, version: tuple[int, int]) -> ExecutionState:
    table = _V15 if version < (1, 6) else _V16
    return table[number] if 0 <= number < len(table) else ExecutionState.UNDEFINED


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    git_version: str

    @property
    def tuple(self) -> tuple[int, int]:
        return (self.major, self.minor)


@dataclass
class Execution:
    id: str
    node_id: str
    state: ExecutionState
    message: str = ""  # ComputeState.Message: why a failed execution failed (a system error)
    exit_code: int | None = None  # RunOutput.ExitCode: set once the container ran
    error_msg: str = ""  # RunOutput.ErrorMsg
    stdout: str = ""  # RunOutput.Stdout: the FIRST 2 KiB of the container's stdout (pkg/executor/results.go)
    stderr: str = ""
    details: dict[str, str] = field(default_factory=dict)
    create_time: int = 0

    @property
    def failure(self) -> str:
        """The most useful text about why it failed: the error, then the start of stderr."""
        parts = [self.error_msg or self.message] + ([self.stderr.strip()[:2000]] if self.stderr.strip() else [])
        return "\n".join(p for p in parts if p)


@dataclass
class Job:
    id: str
    name: str
    state: JobState
    message: str
    labels: dict[str, str]
    meta: dict[str, str]
    create_time: int
    modify_time: int = 0
    executions: list[Execution] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def gpu_label(name: str) -> str:
    """A GPU model in the form node labels give it: `NVIDIA A10G` → `NVIDIA-A10G` (pkg/compute/capacity/labels.go)."""
    return "-".join(name.split())


@dataclass(frozen=True)
class GPU:
    name: str  # as the driver reports it, "NVIDIA A10G"
    memory_mib: int
    vendor: str

    @property
    def label(self) -> str:
        return gpu_label(self.name)


@dataclass(frozen=True)
class Capacity:
    cpu: float = 0.0  # units
    memory: int = 0  # bytes
    disk: int = 0  # bytes
    gpu: int = 0  # count


@dataclass
class Node:
    id: str
    labels: dict[str, str]
    connected: bool
    approved: bool
    gpus: list[GPU]
    max: Capacity  # what the node offers Bacalhau (its allocated share of the machine)
    available: Capacity

    @property
    def gpu_models(self) -> list[str]:
        return [g.label for g in self.gpus]


@dataclass(frozen=True)
class Submitted:
    job_id: str
    evaluation_id: str
    warnings: list[str]


def _parse_job(raw: dict[str, Any], version: tuple[int, int]) -> Job:
    job = raw["Job"] if "Job" in raw else raw
    state = job.get("State") or {}
    executions = [
        _parse_execution(e, version) for e in ((raw.get("Executions") or {}).get("Items") or [])
    ]
    return Job(
        id=job.get("ID", ""), name=job.get("Name", ""),
        state=JobState(state.get("StateType", "Undefined")), message=state.get("Message", ""),
        labels=job.get("Labels") or {}, meta=job.get("Meta") or {}, create_time=int(job.get("CreateTime") or 0),
        modify_time=int(job.get("ModifyTime") or 0),
        executions=executions, history=(raw.get("History") or {}).get("Items") or [], raw=raw,
    )


def _parse_execution(e: dict[str, Any], version: tuple[int, int]) -> Execution:
    compute = e.get("ComputeState") or {}
    out = e.get("RunOutput") or {}
    return Execution(
        id=e.get("ID", ""), node_id=e.get("NodeID", ""),
        state=execution_state(int(compute.get("StateType", 0)), version), message=compute.get("Message", ""),
        exit_code=out.get("ExitCode"), error_msg=out.get("ErrorMsg", ""), stdout=out.get("Stdout", ""),
        stderr=out.get("stderr", out.get("Stderr", "")),  # the server sends lowercase "stderr"
        details=compute.get("Details") or {}, create_time=int(e.get("CreateTime") or 0),
    )


def _capacity(r: dict[str, Any] | None) -> Capacity:
    r = r or {}  # models.Resources: CPU float, Memory and Disk in bytes, GPU a count (omitempty)
    return Capacity(float(r.get("CPU") or 0), int(r.get("Memory") or 0), int(r.get("Disk") or 0), int(r.get("GPU") or 0))


def _parse_node(n: dict[str, Any]) -> Node:
    """A models.NodeState (pkg/models/node_state.go, node_info.go)."""
    info = n.get("Info") or {}
    compute = info.get("ComputeNodeInfo") or {}
    gpus = [GPU(str(g.get("Name", "")), int(g.get("Memory") or 0), str(g.get("Vendor", "")))
            for g in (compute.get("MaxCapacity") or {}).get("GPUs") or []]
    connection = (n.get("ConnectionState") or {}).get("Status") or n.get("Connection")
    return Node(id=info.get("NodeID", ""), labels=info.get("Labels") or {}, connected=connection == "CONNECTED",
                approved=n.get("Membership", "APPROVED") == "APPROVED", gpus=gpus,
                max=_capacity(compute.get("MaxCapacity")), available=_capacity(compute.get("AvailableCapacity")))


class BacalhauClient:
    """One orchestrator endpoint. Thread-safe (httpx.Client is)."""

    def __init__(
        self,
        base_url: str = f"http://127.0.0.1:{DEFAULT_PORT}",
        *,
        token: str | None = None,
        basic: tuple[str, str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        on_request: Callable[[httpx.Request], None] | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, auth=basic, verify=verify,
                                  timeout=timeout, transport=transport,
                                  event_hooks={"request": [on_request]} if on_request else None)
        self._version: Version | None = None
        self._version_lock = threading.Lock()  # threads share a client: read the version once
        self._token, self._basic, self._verify = token, basic, verify

    @classmethod
    def from_settings(cls, settings: "Settings", **overrides: Any) -> "BacalhauClient":
        """The endpoint, TLS and credentials of `settings` (BACALHAU_API_HOST, _PORT, _TLS_USETLS,
        _TLS_CACERT, _TLS_INSECURE, _KEY for a bearer token, _USERNAME/_PASSWORD for basic auth)."""
        verify: bool | ssl.SSLContext = not settings.bacalhau_insecure
        if settings.bacalhau_ca_cert:
            try:
                verify = ssl.create_default_context(cafile=settings.bacalhau_ca_cert)
            except (OSError, ssl.SSLError) as exc:
                from codsplat.pipeline.errors import InputError

                raise InputError(f"bacalhau_ca_cert (BACALHAU_API_TLS_CACERT): {settings.bacalhau_ca_cert} is not a "
                                 f"readable CA bundle ({exc.strerror or exc}).") from None
        basic = (settings.bacalhau_username, settings.bacalhau_password or "") if settings.bacalhau_username else None
        return cls(settings.bacalhau_url, **{"token": settings.bacalhau_api_key, "basic": basic, "verify": verify, **overrides})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "BacalhauClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(0, f"cannot reach {self.base_url}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code < 400:
            return response.json() if response.content else {}
        try:
            body = response.json()
        except ValueError:
            body = {"Message": response.text.strip()}
        message = body.get("Message") or body.get("message") or response.reason_phrase
        cls = {400: BadRequest, 401: Unauthorized, 403: Unauthorized, 404: NotFound}.get(response.status_code)
        cls = cls or (Unavailable if response.status_code >= 500 else BacalhauError)
        raise cls(response.status_code, message, body.get("Code"), body.get("RequestID"))

    # ------------------------------------------------------------------ agent

    def alive(self) -> bool:
        try:
            return self._request("GET", "/api/v1/agent/alive").get("Status") == "OK"
        except BacalhauError:
            return False

    def version(self) -> Version:
        with self._version_lock:
            if self._version is None:
                raw = self._request("GET", "/api/v1/agent/version")
                body = raw.get("BuildVersionInfo", raw)
                self._version = Version(int(body.get("Major") or 0), int(str(body.get("Minor") or 0).rstrip("+")),
                                        body.get("GitVersion", ""))
            return self._version

    # ------------------------------------------------------------------ jobs

    def submit(self, job: dict[str, Any], force: bool = False) -> Submitted:
        body = self._request("PUT", "/api/v1/orchestrator/jobs", json={"Job": job, "Force": force})
        return Submitted(body["JobID"], body.get("EvaluationID", ""), body.get("Warnings") or [])

    def describe(self, job_id: str, executions: bool = True, history: bool = False) -> Job:
        include = ",".join(k for k, on in (("executions", executions), ("history", history)) if on)
        raw = self._request("GET", f"/api/v1/orchestrator/jobs/{job_id}", params={"include": include} if include else None)
        return _parse_job(raw, self.version().tuple)

    def iter_jobs(self, selector: str = "", order_by: str = "created_at", limit: int = 100,
                  namespace: str | None = None) -> Iterator[Job]:
        """Jobs matching a label selector (`codsplat-job=abc`, or `codsplat-job` for any value),
        newest first by `order_by` (created_at or modified_at), page by page as they are read."""
        params: dict[str, Any] = {"limit": limit, "order_by": order_by, "reverse": "true"}
        if selector:
            params["labels"] = selector
        if namespace:
            params["namespace"] = namespace
        token = None
        while True:
            body = self._request("GET", "/api/v1/orchestrator/jobs", params={**params, **({"next_token": token} if token else {})})
            yield from (_parse_job(j, self.version().tuple) for j in body.get("Items") or [])
            token = body.get("NextToken")
            if not token:
                return

    def list_jobs(self, labels: dict[str, str] | None = None, limit: int = 100) -> list[Job]:
        """Every job matching the labels (all pages), newest first."""
        return list(self.iter_jobs(",".join(f"{k}={v}" for k, v in (labels or {}).items()), limit=limit))

    def executions(self, job_id: str) -> list[Execution]:
        body = self._request("GET", f"/api/v1/orchestrator/jobs/{job_id}/executions")
        return [_parse_execution(e, self.version().tuple) for e in body.get("Items") or []]

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/v1/orchestrator/jobs/{job_id}/history", params={"event_type": "all"}).get("Items") or []

    def results(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/v1/orchestrator/jobs/{job_id}/results").get("Items") or []

    def stop(self, job_id: str, reason: str = "stopped by codsplat") -> str:
        return self._request("DELETE", f"/api/v1/orchestrator/jobs/{job_id}", json={"reason": reason}).get("EvaluationID", "")

    def nodes(self) -> list[Node]:
        body = self._request("GET", "/api/v1/orchestrator/nodes")
        return [_parse_node(n) for n in body.get("Nodes") or []]

    def logs(self, job_id: str, follow: bool = False, execution_id: str | None = None, timeout: float = 10.0) -> Iterator[tuple[str, str]]:
        """(stream, line) pairs over the log WebSocket. Best effort: ends quietly if it breaks."""
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        url = self.base_url.replace("http", "ws", 1) + f"/api/v1/orchestrator/jobs/{job_id}/logs?follow={str(follow).lower()}"
        if execution_id:
            url += f"&execution_id={execution_id}"
        headers = dict(self._http.headers)
        try:
            with connect(url, additional_headers={k: v for k, v in headers.items() if k.lower() == "authorization"},
                         open_timeout=timeout) as ws:
                for message in ws:
                    frame = json.loads(message)
                    if frame.get("error"):
                        return
                    value = frame.get("value") or {}
                    yield ("stderr" if value.get("Type") == 2 else "stdout"), value.get("Line", "")
        except (OSError, WebSocketException, TimeoutError):
            return
