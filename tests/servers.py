"""Servers the tests start on 127.0.0.1 and stop by process id: the moto server (S3 and the other
AWS APIs) and the Bacalhau stand-in."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    control: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def knobs(self, headers: dict | None = None, **values) -> dict:
        """Turn the stand-in's test knobs (an unknown knob is refused); returns them with its counters."""
        response = httpx.post(f"{self.url}/standin/knobs", json=values, headers=headers)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(name: str, argv: list[str], url: str, ready_path: str, env: dict | None = None, timeout: float = 30) -> Server:
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"codsplat-{name}-{os.getpid()}.log", "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
        try:
            httpx.get(url + ready_path, timeout=1.0)
            return Server(name, proc, url)
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{name} did not start within {timeout} s; see {log.name}")


def start_moto() -> Server:
    """moto on 127.0.0.1 with state execution on; `server.control` steers SageMaker jobs."""
    port, control = free_port(), free_port()
    server = start("moto", [sys.executable, str(HERE / "moto_launcher.py"), "--port", str(port), "--control-port", str(control)],
                   f"http://127.0.0.1:{port}", "/moto-api/")
    server.control = f"http://127.0.0.1:{control}"
    return server


def start_standin(s3_endpoint: str, *args: str, api_key: str | None = None, basic: str | None = None) -> Server:
    """The Bacalhau stand-in; `api_key` is KEY or KEY:capability,... and `basic` USER:PASSWORD."""
    port = free_port()
    argv = [sys.executable, str(HERE / "bacalhau_standin.py"), "--port", str(port), "--s3-endpoint", s3_endpoint, *args]
    argv += ["--api-key", api_key] if api_key else []
    argv += ["--basic", basic] if basic else []
    return start("bacalhau", argv, f"http://127.0.0.1:{port}", "/api/v1/agent/alive")
