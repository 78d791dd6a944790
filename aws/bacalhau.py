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

import re

BACALHAU_VERSION = "v1.7.0"
ORCHESTRATOR_PORT = 4222
API_PORT = 1234
ZONE = "codsplat.internal"
ORCHESTRATOR_NAME = f"orchestrator.{ZONE}"
IMAGE_SYNC_MINUTES = 2
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


def service(name: str, description: str, after: str = "network-online.target") -> list[str]:
    return [f"cat > /etc/systemd/system/{name}.service <<'UNIT'",
            "[Unit]", f"Description={description}", f"After={after}", f"Wants={after}",
            "[Service]", "ExecStart=/usr/local/bin/bacalhau serve --config /etc/bacalhau/config.yaml",
            "Restart=always", "RestartSec=5", "[Install]", "WantedBy=multi-user.target", "UNIT",
            "systemctl daemon-reload", f"systemctl enable --now {name}"]


def orchestrator(token_arn: str, api_key_arn: str, region: str) -> list[str]:
    """The orchestrator's config (written with both secrets, readable by root alone) and its unit."""
    caps = ", ".join(DAEMON_CAPABILITIES)
    return [
        secret("NODE_TOKEN", token_arn, region), secret("API_KEY", api_key_arn, region),
        "install -d -m 0700 /etc/bacalhau /var/lib/bacalhau",
        "(umask 077; cat > /etc/bacalhau/config.yaml <<CONFIG",
        "DataDir: /var/lib/bacalhau",
        "API:",
        "  Host: 127.0.0.1", f"  Port: {API_PORT}",
        "  Auth:",
        "    Users:",
        f"      - {{Alias: codsplat-daemon, APIKey: \"$API_KEY\", Capabilities: [{{Actions: [{caps}]}}]}}",
        "Orchestrator:",
        "  Enabled: true", f"  Port: {ORCHESTRATOR_PORT}",
        "  Auth:",
        "    Token: \"$NODE_TOKEN\"",
        "CONFIG",
        ")", "unset NODE_TOKEN API_KEY",
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


def compute(token_arn: str, region: str, labels: dict[str, str]) -> list[str]:
    """A compute node's config (written with the join token, readable by root alone) and its unit."""
    label_lines = [f"  {k}: {v}" for k, v in sorted(labels.items())]
    return [
        secret("NODE_TOKEN", token_arn, region),
        "install -d -m 0700 /etc/bacalhau /var/lib/bacalhau",
        "(umask 077; cat > /etc/bacalhau/config.yaml <<CONFIG",
        "DataDir: /var/lib/bacalhau",
        "Labels:", *label_lines,
        "Compute:",
        "  Enabled: true",
        f"  Orchestrators: [nats://{ORCHESTRATOR_NAME}:{ORCHESTRATOR_PORT}]",
        "  AllowListedLocalPaths: []",
        "  Auth:",
        "    Token: \"$NODE_TOKEN\"",
        "CONFIG",
        ")", "unset NODE_TOKEN",
        *service("bacalhau-compute", "Bacalhau compute node (codsplat GPU)", after="docker.service"),
    ]


def image_sync(parameter: str, region: str) -> list[str]:
    """Pull the image named by the daemon's `image` parameter with the node's Docker CLI, now and every
    IMAGE_SYNC_MINUTES, so Bacalhau finds it local (a pull leaves running containers alone)."""
    script = [
        "#!/bin/sh",
        "set -eu",
        f"image=$(aws ssm get-parameter --region {region} --name '{parameter}' --query Parameter.Value --output text)",
        'docker image inspect "$image" >/dev/null 2>&1 || docker pull "$image"',
    ]
    return [
        "mkdir -p /root/.docker && echo '{\"credsStore\": \"ecr-login\"}' > /root/.docker/config.json",
        "cat > /usr/local/bin/codsplat-image-sync <<'SYNC'", *script, "SYNC",
        "chmod 0755 /usr/local/bin/codsplat-image-sync",
        "cat > /etc/systemd/system/codsplat-image-sync.service <<'UNIT'",
        "[Unit]", "Description=Pull the codsplat worker image the daemon names", "After=docker.service",
        "[Service]", "Type=oneshot", "ExecStart=/usr/local/bin/codsplat-image-sync", "UNIT",
        "cat > /etc/systemd/system/codsplat-image-sync.timer <<'UNIT'",
        "[Unit]", "Description=Keep the codsplat worker image pulled",
        "[Timer]", "OnBootSec=30s", f"OnUnitActiveSec={IMAGE_SYNC_MINUTES}min", "[Install]", "WantedBy=timers.target",
        "UNIT",
        "systemctl daemon-reload", "systemctl enable --now codsplat-image-sync.timer",
    ]
