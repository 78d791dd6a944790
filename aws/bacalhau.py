"""Bacalhau on our instances: a pinned release, verified by its SHA-256, configured at boot from
Secrets Manager (no secret is ever in user data), run by systemd.

- The orchestrator (on the daemon's host) listens for compute nodes on ORCHESTRATOR_PORT, which only
  the node security group reaches; they join with a shared token. Its API listens on 127.0.0.1 only,
  for the daemon, which authenticates with an API key allowed read:job, write:job and read:node
  (pkg/authz/capabilities.go).
- A compute node joins `nats://orchestrator.<zone>:4222` with the token. The worker image is pulled
  by the node's own Docker CLI (the ECR credential helper) from the image parameter the daemon reads,
  every IMAGE_SYNC_MINUTES: Bacalhau's docker executor runs an image it holds without pulling
  (pkg/docker/docker.go PullImage), and would itself pull only with DOCKER_USERNAME/PASSWORD, which
  an ECR token (12 h) cannot stay in. A pull never touches a running container.
"""

from __future__ import annotations

import json
import re

# The one Bacalhau release of the project: the CDK installs it, tests/network/build-bacalhau.sh builds
# it from source for the tests' real network. v1.9.4 changes only dependency versions, one of which
# (posthog-go v1.24.3) the Go module proxy does not serve.
BACALHAU_VERSION = "v1.9.3"
ORCHESTRATOR_PORT = 4222
API_PORT = 1234
ZONE = "codsplat.internal"
ORCHESTRATOR_NAME = f"orchestrator.{ZONE}"
DATA_DIR = "/var/lib/bacalhau"
IMAGE_SYNC_MINUTES = 2
IMAGE_SYNC = "/usr/local/bin/codsplat-image-sync"
NEXT_IMAGE_PARAMETER = "/codsplat/nodes/next-image"
DAEMON_CAPABILITIES = ["read:job", "write:job", "read:node"]
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def release_url(version: str) -> str:
    return f"https://github.com/bacalhau-project/bacalhau/releases/download/{version}/bacalhau_{version}_linux_amd64.tar.gz"


def install(version: str, sha256: str) -> list[str]:
    """Download the release, check its SHA-256, install the binary; stop if the check fails."""
    if not SHA256.match(sha256):
        raise ValueError(f"bacalhau_sha256 must be 64 hex digits, got {sha256!r}")
    return [
        f"curl -fsSL --retry 5 -o /tmp/bacalhau.tgz {release_url(version)}",
        f"echo '{sha256}  /tmp/bacalhau.tgz' | sha256sum -c -",
        "tar -xzf /tmp/bacalhau.tgz -C /tmp bacalhau && install -m 0755 /tmp/bacalhau /usr/local/bin/bacalhau",
        "rm -f /tmp/bacalhau.tgz /tmp/bacalhau",
    ]


def secret(variable: str, arn: str, region: str) -> str:
    """A shell variable set from a Secrets Manager secret at boot."""
    return f"{variable}=$(aws secretsmanager get-secret-value --region {region} --secret-id '{arn}' --query SecretString --output text)"


def service(name: str, description: str, after: str = "network-online.target", before_start: str | None = None) -> list[str]:
    return [f"cat > /etc/systemd/system/{name}.service <<'UNIT'",
            "[Unit]", f"Description={description}", f"After={after}", f"Wants={after}",
            "[Service]", *([f"ExecStartPre={before_start}"] if before_start else []),
            "ExecStart=/usr/local/bin/bacalhau serve --config /etc/bacalhau/config.yaml",
            "Restart=always", "RestartSec=5", "[Install]", "WantedBy=multi-user.target", "UNIT",
            "systemctl daemon-reload", f"systemctl enable --now {name}"]


# What every node of ours sets besides its role: no update checks (a pinned release is upgraded by a
# deploy), no analytics, no web UI, and the node's own API on loopback only.
QUIET = {"DisableAnalytics": True, "UpdateConfig": {"Interval": "0s"}, "WebUI": {"Enabled": False}}


def orchestrator_config(*, token: str, api_key: str, data_dir: str = DATA_DIR, api_port: int = API_PORT,
                        listen: str = "0.0.0.0", port: int = ORCHESTRATOR_PORT) -> dict:
    """The orchestrator's configuration (keys as pkg/config/types spells them): the API on loopback for
    the daemon, an API-key user with DAEMON_CAPABILITIES (pkg/authz/capabilities.go), and the port that
    compute nodes join with the shared token. The tests run upstream Bacalhau with this same config."""
    return {"DataDir": data_dir, **QUIET,
            "API": {"Host": "127.0.0.1", "Port": api_port,
                    "Auth": {"Users": [{"Alias": "codsplat-daemon", "APIKey": api_key,
                                        "Capabilities": [{"Actions": DAEMON_CAPABILITIES}]}]}},
            "Orchestrator": {"Enabled": True, "Host": listen, "Port": port, "Auth": {"Token": token}}}


def compute_config(*, token: str, orchestrators: list[str], labels: dict[str, str], data_dir: str = DATA_DIR,
                   api_port: int = API_PORT) -> dict:
    """A compute node's configuration: it joins `orchestrators` with the token, runs Docker jobs and
    reads no local paths."""
    return {"DataDir": data_dir, **QUIET, "Labels": labels, "API": {"Host": "127.0.0.1", "Port": api_port},
            "Compute": {"Enabled": True, "Orchestrators": orchestrators, "AllowListedLocalPaths": [],
                        "Auth": {"Token": token}}}


def write_config(config: dict) -> list[str]:
    """User-data lines that write `config` readable by root alone. It is written as JSON (which YAML
    reads): the secrets go in as quoted "$VARIABLE"s that the unquoted heredoc expands, and a secret
    of digits stays a string."""
    return ["install -d -m 0700 /etc/bacalhau /var/lib/bacalhau",
            "(umask 077; cat > /etc/bacalhau/config.yaml <<CONFIG", *json.dumps(config, indent=2).splitlines(),
            "CONFIG", ")"]


def orchestrator(token_arn: str, api_key_arn: str, region: str) -> list[str]:
    """The orchestrator's config, written with both secrets, and its unit."""
    return [
        secret("NODE_TOKEN", token_arn, region), secret("API_KEY", api_key_arn, region),
        *write_config(orchestrator_config(token="$NODE_TOKEN", api_key="$API_KEY")),
        "unset NODE_TOKEN API_KEY",
        *service("bacalhau-orchestrator", "Bacalhau orchestrator (codsplat)"),
    ]


def point_name_here(zone_id: str) -> list[str]:
    """Point ORCHESTRATOR_NAME at this instance's private address (IMDSv2)."""
    return [
        "TOKEN=$(curl -sf -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')",
        "IP=$(curl -sf -H \"X-aws-ec2-metadata-token: $TOKEN\" http://169.254.169.254/latest/meta-data/local-ipv4)",
        "cat > /tmp/orchestrator-dns.json <<DNS",
        f'{{"Changes": [{{"Action": "UPSERT", "ResourceRecordSet": {{"Name": "{ORCHESTRATOR_NAME}", "Type": "A", "TTL": 30, '
        '"ResourceRecords": [{"Value": "$IP"}]}}]}',
        "DNS",
        f"aws route53 change-resource-record-sets --hosted-zone-id {zone_id} --change-batch file:///tmp/orchestrator-dns.json",
    ]


def compute(token_arn: str, region: str, labels: dict[str, str], before_start: str | None = None) -> list[str]:
    """A compute node's config, written with the join token, and its unit; `before_start` runs before
    every start of Bacalhau (the image sync, so a node never joins without the image it is to run)."""
    return [
        secret("NODE_TOKEN", token_arn, region),
        *write_config(compute_config(token="$NODE_TOKEN", labels=labels,
                                     orchestrators=[f"nats://{ORCHESTRATOR_NAME}:{ORCHESTRATOR_PORT}"])),
        "unset NODE_TOKEN",
        *service("bacalhau-compute", "Bacalhau compute node (codsplat GPU)", after="docker.service", before_start=before_start),
    ]


def image_sync(parameters: list[str], region: str) -> list[str]:
    """IMAGE_SYNC: pull every image the `parameters` name (the daemon's `image`, and the next one), and
    remove the repository's other images, at every start of `bacalhau-compute` (ExecStartPre: a node
    never joins without them) and every IMAGE_SYNC_MINUTES. A pull or a removal never touches a running
    container (Docker refuses to remove an image a container uses, and that refusal is ignored)."""
    names = " ".join(f"'{p}'" for p in parameters)
    script = [
        "#!/bin/sh",
        "set -eu",
        f"wanted=$(for name in {names}; do aws ssm get-parameter --region {region} --name \"$name\" "
        "--query Parameter.Value --output text; done | sort -u)",
        'for image in $wanted; do docker image inspect "$image" >/dev/null 2>&1 || docker pull "$image"; done',
        'for repo in $(echo "$wanted" | sed "s/:[^:/]*$//" | sort -u); do',
        '  docker image ls --format "{{.Repository}}:{{.Tag}}" "$repo" | while read -r held; do',
        '    echo "$wanted" | grep -qxF "$held" || docker image rm "$held" >/dev/null 2>&1 || true',
        "  done",
        "done",
        "docker image prune --force >/dev/null",
    ]
    return [
        "mkdir -p /root/.docker && echo '{\"credsStore\": \"ecr-login\"}' > /root/.docker/config.json",
        f"cat > {IMAGE_SYNC} <<'SYNC'", *script, "SYNC",
        f"chmod 0755 {IMAGE_SYNC}",
        "cat > /etc/systemd/system/codsplat-image-sync.service <<'UNIT'",
        "[Unit]", "Description=Pull the codsplat worker images the daemon names", "After=docker.service",
        "[Service]", "Type=oneshot", f"ExecStart={IMAGE_SYNC}", "UNIT",
        "cat > /etc/systemd/system/codsplat-image-sync.timer <<'UNIT'",
        "[Unit]", "Description=Keep the codsplat worker images pulled",
        "[Timer]", "OnBootSec=30s", f"OnUnitActiveSec={IMAGE_SYNC_MINUTES}min", "[Install]", "WantedBy=timers.target",
        "UNIT",
        "systemctl daemon-reload", "systemctl enable --now codsplat-image-sync.timer",
    ]
