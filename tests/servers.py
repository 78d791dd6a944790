"""Servers the tests start on 127.0.0.1 and stop by process id: the moto server (S3 and the other
AWS APIs), the Bacalhau stand-in, and a real Bacalhau network (upstream's orchestrator and a compute
node with the Docker executor, configured as the CDK configures them) with the local registry that
serves it the worker image."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
NETWORK = HERE / "network"
CACHE = Path(os.environ.get("CODSPLAT_CACHE", Path.home() / ".cache" / "codsplat"))


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


# ------------------------------------------------------------------ a real Bacalhau network

@dataclass
class Network:
    """Upstream Bacalhau on 127.0.0.1: `url` is the orchestrator's API, `api_key` the daemon's key."""
    orchestrator: Server
    compute: Server
    api_key: str
    node_id: str
    folder: Path

    @property
    def url(self) -> str:
        return self.orchestrator.url

    def env(self, **extra: str) -> dict:
        """What `codsplat` needs to reach it, as an operator sets it."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return {"BACALHAU_API_HOST": host, "BACALHAU_API_PORT": port, "BACALHAU_API_KEY": self.api_key, **extra}

    def stop(self) -> None:
        for server in (self.compute, self.orchestrator):
            server.stop()


def command_output(argv: list[str], what: str, timeout: float) -> str:
    """A build step's one line of output; its log is kept beside the other servers' logs."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"codsplat-{what}-{os.getpid()}.log"
    with open(log, "w") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {log.read_text()[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def bacalhau_binary() -> str:
    """Upstream Bacalhau at the pinned release, built from source once per machine."""
    return command_output([str(NETWORK / "build-bacalhau.sh")], "bacalhau-build", timeout=1800)


def start_registry(port: int) -> Server:
    """Debian's docker-registry on 127.0.0.1, its storage kept on the machine (a pushed layer stays)."""
    storage = CACHE / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    config = CACHE / f"registry-{port}.yml"
    config.write_text(json.dumps({"version": 0.1, "storage": {"filesystem": {"rootdirectory": str(storage)}},
                                  "http": {"addr": f"127.0.0.1:{port}"}}))
    return start("registry", ["docker-registry", "serve", str(config)], f"http://127.0.0.1:{port}", "/v2/")


def worker_image(registry: str) -> str:
    """The CPU worker image, built from container/ and pushed; its reference by digest."""
    return command_output([str(NETWORK / "build-worker-image.sh"), registry], "worker-image", timeout=3600)


def start_bacalhau_network(folder: Path, env: dict[str, str]) -> Network:
    """An orchestrator and one compute node, both on 127.0.0.1 with free ports, configured by the same
    functions that write the deployed nodes' configs (aws/bacalhau.py): the daemon an API-key user,
    the node joining with a token. `env` is the compute node's environment (its S3 credentials)."""
    import yaml

    from codsplat.aws import bacalhau as deployed
    from codsplat.orchestrator.bacalhau import BacalhauClient

    binary = bacalhau_binary()
    token, api_key = secrets.token_hex(24), secrets.token_hex(24)
    api, nats, node_api = free_port(), free_port(), free_port()
    configs = {
        "orchestrator": deployed.orchestrator_config(token=token, api_key=api_key, data_dir=str(folder / "orchestrator"),
                                                     api_port=api, listen="127.0.0.1", port=nats),
        "compute": deployed.compute_config(token=token, orchestrators=[f"nats://127.0.0.1:{nats}"],
                                           labels={"codsplat": "cpu"}, data_dir=str(folder / "compute"), api_port=node_api),
    }
    servers = {}
    for role, config in configs.items():
        path = folder / f"{role}.yaml"
        path.write_text(yaml.safe_dump(config))
        port = config["API"]["Port"]
        servers[role] = start(f"bacalhau-{role}", [binary, "serve", "--config", str(path)], f"http://127.0.0.1:{port}",
                              "/api/v1/agent/alive", env={"HOME": str(folder), **(env if role == "compute" else {})},
                              timeout=60)
    network = Network(servers["orchestrator"], servers["compute"], api_key, node_id="", folder=folder)
    with BacalhauClient(network.url, token=api_key) as client:  # ready once the node has joined
        deadline = time.monotonic() + 60
        while not (nodes := [n for n in client.nodes() if n.connected and "codsplat" in n.labels]):
            if time.monotonic() > deadline:
                network.stop()
                raise RuntimeError(f"the compute node did not join within 60 s; see {folder}")
            time.sleep(0.5)
    network.node_id = nodes[0].id
    return network
