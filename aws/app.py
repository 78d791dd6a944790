"""The CDK app: the base stack, the orchestrator host, and (with `-c gpu_nodes=N`) Bacalhau GPU nodes.

    cd aws && cdk deploy --all -c emails=ops@example.com -c image_tag=1.2.0 -c package=<pip spec>

Context: `emails` (comma-separated, each gets only its own jobs' messages), `image_tag` (the worker
image the fallback runs), `package` (what the host pip-installs), `gpu_nodes` (0 = no GPU stack),
`gpu_instance_type`, `requester` (the Bacalhau orchestrator the GPU nodes join).
Synthesis needs no network and no AWS account; `synth()` is what the tests and CI call.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import App, Validations
from cdk_nag import AwsSolutionsChecks

from .base import BaseStack
from .gpu import GpuNodesStack
from .host import HostStack

# Behaviour this app relies on: access logs delivered by bucket policy (no ACLs anywhere)
FEATURE_FLAGS = {"@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy": True}


def build(app: App) -> list:
    ctx = lambda key, default=None: app.node.try_get_context(key) or default  # noqa: E731
    emails = tuple(e.strip() for e in str(ctx("emails", "")).split(",") if e.strip())
    origins = tuple(o.strip() for o in str(ctx("console_origins", "")).split(",") if o.strip())
    base = BaseStack(app, "CodsplatBase", emails=emails, image_tag=str(ctx("image_tag", "latest")), console_origins=origins,
                     description="codsplat: data bucket, job events, records, notifications, image, SageMaker fallback")
    host = HostStack(app, "CodsplatOrchestrator", base=base, package=str(ctx("package", "codsplat")),
                     description="codsplat: the orchestrator daemon on EC2 (private subnets, SSM only)")
    stacks = [base, host]
    gpu_nodes = int(ctx("gpu_nodes", 0))
    if gpu_nodes:
        stacks.append(GpuNodesStack(app, "CodsplatGpuNodes", base=base, vpc=host.vpc, count=gpu_nodes,
                                    instance_type=str(ctx("gpu_instance_type", "g5.xlarge")),
                                    requester=str(ctx("requester", "nats://orchestrator.codsplat.internal:4222")),
                                    description="codsplat: Bacalhau compute nodes on GPU instances"))
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return stacks


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
