"""The CDK app: the base stack, the orchestrator host (the daemon and the Bacalhau orchestrator),
and (with `-c gpu_nodes=N`) Bacalhau GPU nodes that join it.

    cd aws && cdk deploy --all -c bacalhau_sha256=<sha256 of the release tarball> -c emails=ops@example.com \
        -c image_tag=1.2.0 -c package=codsplat==1.2.0

Context: `bacalhau_sha256` (required: the SHA-256 of `bacalhau_<version>_linux_amd64.tar.gz`, from
the release page; every instance checks its download against it), `bacalhau_version`, `emails`
(comma-separated, each gets only its own jobs' messages), `image_tag` (the worker image), `package`
(what the host pip-installs, pinned: a version or a URL with `#sha256=`; default this app's release), `gpu_nodes` (0 = no GPU stack), `gpu_instance_type`, `next_image_tag`
(the image GPU nodes pull ahead of a roll-out; defaults to `image_tag`), `settings` (a daemon settings
file: written to SSM, and the IAM limits are built from it).
Synthesis needs no network and no AWS account; `synth()` is what the tests and CI call.
"""

from __future__ import annotations

import re
from importlib.metadata import version as installed_version
from pathlib import Path

from aws_cdk import App, Validations
from cdk_nag import AwsSolutionsChecks
from packaging.requirements import InvalidRequirement, Requirement

from codsplat.orchestrator.settings import Settings, load_settings
from codsplat.pipeline.errors import InputError

from . import bacalhau
from .base import SECRET_SETTINGS, STACK_SETTINGS, BaseStack
from .gpu import GpuNodesStack
from .host import HostStack

# Behaviour this app relies on: access logs delivered by bucket policy (no ACLs anywhere)
DEFAULT_PACKAGE = f"codsplat=={installed_version('codsplat')}"  # the release this app is part of
FEATURE_FLAGS = {"@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy": True}


def build(app: App) -> list:
    ctx = lambda key, default=None: app.node.try_get_context(key) or default  # noqa: E731
    emails = tuple(e.strip() for e in str(ctx("emails", "")).split(",") if e.strip())
    origins = tuple(o.strip() for o in str(ctx("console_origins", "")).split(",") if o.strip())
    base = BaseStack(app, "CodsplatBase", emails=emails, image_tag=str(ctx("image_tag", "latest")), console_origins=origins,
                     settings=deployment_settings(ctx("settings")),
                     description="codsplat: data bucket, job events, records, notifications, image, SageMaker fallback")
    version, sha256 = str(ctx("bacalhau_version", bacalhau.BACALHAU_VERSION)), str(ctx("bacalhau_sha256", ""))
    if not bacalhau.SHA256.match(sha256):
        raise SystemExit(f"Set -c bacalhau_sha256=<64 hex digits>: the SHA-256 of bacalhau_{version}_linux_amd64.tar.gz "
                         f"as published with the release ({bacalhau.release_url(version)}); every instance checks its "
                         "download against it (docs/deploy.md).")
    host = HostStack(app, "CodsplatOrchestrator", base=base, package=pinned_package(str(ctx("package", DEFAULT_PACKAGE))),
                     bacalhau_version=version, bacalhau_sha256=sha256,
                     description="codsplat: the orchestrator daemon and the Bacalhau orchestrator on EC2 (private subnets, SSM only)")
    stacks = [base, host]
    gpu_nodes = int(ctx("gpu_nodes", 0))
    if gpu_nodes:
        stacks.append(GpuNodesStack(app, "CodsplatGpuNodes", base=base, host=host, count=gpu_nodes,
                                    next_image_tag=str(ctx("next_image_tag", ctx("image_tag", "latest"))),
                                    bacalhau_version=version, bacalhau_sha256=sha256,
                                    instance_type=str(ctx("gpu_instance_type", "g5.xlarge")),
                                    description="codsplat: Bacalhau compute nodes on GPU instances"))
    validate(app)
    return stacks


def deployment_settings(path: str | None) -> Settings:
    """The deployment's settings file (`-c settings=deploy.yaml`), read as the daemon reads one. The stacks
    build their IAM limits from it and write it to SSM, so that jobs are validated against the limits IAM
    enforces. The stacks name their own resources, and secrets never go into plain parameters."""
    if not path:
        return Settings()
    try:
        settings = load_settings(Path(path), env={})
    except InputError as exc:
        raise SystemExit(f"-c settings={path}: {exc}") from None
    if refused := sorted(settings.model_fields_set & (STACK_SETTINGS | SECRET_SETTINGS)):
        raise SystemExit(f"-c settings={path} sets {', '.join(refused)}: the stacks set "
                         f"{', '.join(sorted(STACK_SETTINGS))} from the resources they make, and secrets "
                         f"({', '.join(sorted(SECRET_SETTINGS))}) belong in Secrets Manager, not in SSM parameters "
                         "(docs/deploy.md).")
    return settings


def pinned_package(spec: str) -> str:
    """What the host pip-installs, pinned so that every host of a deployment runs the same code: a
    version (`codsplat==0.1.0`) or a URL whose `#sha256=` pip checks. A bare name would install
    whatever the index serves the day a host boots."""
    try:
        requirement = Requirement(spec)
    except InvalidRequirement:
        requirement = None
    pinned = requirement is not None and "'" not in spec and (
        bool(re.search(r"#sha256=[0-9a-f]{64}$", requirement.url)) if requirement.url else
        [s.operator for s in requirement.specifier] in (["=="], ["==="]) and "*" not in str(requirement.specifier))
    if not pinned:
        raise SystemExit(f"-c package={spec!r} is not pinned. Give a version, `codsplat==0.1.0`, or a URL with its "
                         "checksum, `codsplat @ https://.../codsplat-0.1.0-py3-none-any.whl#sha256=<64 hex digits>`: "
                         "every host boot installs it (docs/deploy.md).")
    return spec


def validate(app: App) -> None:
    """cdk-nag's AWS Solutions rules as a validation plugin: synthesis fails on any finding that is not
    acknowledged with a reason (aws/checks.py), and writes validation-report.json either way."""
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))


def synth(outdir: Path, context: dict | None = None):
    """Synthesize every stack into `outdir` (offline). Returns the cloud assembly."""
    app = App(outdir=str(outdir), context={**FEATURE_FLAGS, "gpu_nodes": 1, **(context or {})})
    build(app)
    return app.synth()


def main() -> None:
    app = App(context=FEATURE_FLAGS)
    build(app)
    app.synth()


if __name__ == "__main__":
    main()
