"""Optional Bacalhau compute nodes on GPU instances, so an operator can stand up a private GPU
network with nothing but this app. The Deep Learning AMI brings the NVIDIA driver and Docker (installing
Debian's docker.io over it would replace the engine the NVIDIA runtime is configured for); user data
adds the NVIDIA container toolkit and a pinned, checksummed Bacalhau, then joins the host's
orchestrator with the token from Secrets Manager (aws/bacalhau.py), and keeps the worker images the
daemon names, and the one it is to name next, pulled. The nodes' role reads the job inputs, writes
results in the data bucket, pulls the worker image, reads the join token and the two image
parameters; nothing else."""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from codsplat.orchestrator.provision import SSM_PATH

from . import bacalhau
from .base import BaseStack
from .checks import acknowledge
from .host import HostStack, grant_secrets, group_of, session_manager

# AWS's Deep Learning base AMI (NVIDIA driver installed), resolved at deploy time from its public SSM parameter
GPU_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


class GpuNodesStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, base: BaseStack, host: HostStack, bacalhau_sha256: str,
                 bacalhau_version: str = bacalhau.BACALHAU_VERSION, count: int = 1, instance_type: str = "g5.xlarge",
                 next_image_tag: str = "latest", **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        role = iam.Role(self, "NodeRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
                        description="codsplat GPU node: job inputs and results in the data bucket, the worker image")
        session_manager(role)
        base.grant_job_data(role)
        role.add_to_policy(iam.PolicyStatement(
            actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            resources=[base.repository.repository_arn]))
        role.add_to_policy(iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]))
        role.add_to_policy(iam.PolicyStatement(actions=["kms:Decrypt"], resources=[base.key.key_arn]))
        image_parameter = f"{SSM_PATH}/image"
        # The image the next roll-out moves the daemon to: nodes pull it before the daemon names it
        # (docs/deploy.md, "Roll the container image"). Outside the daemon's path: not a daemon setting.
        ssm.StringParameter(self, "NextImage", parameter_name=bacalhau.NEXT_IMAGE_PARAMETER,
                            string_value=base.repository.repository_uri_for_tag(next_image_tag),
                            description="codsplat: the worker image GPU nodes pull ahead of the daemon's `image`")
        role.add_to_policy(iam.PolicyStatement(actions=["ssm:GetParameter"], resources=[
            self.format_arn(service="ssm", resource="parameter", resource_name=name.strip("/"))
            for name in (image_parameter, bacalhau.NEXT_IMAGE_PARAMETER)]))
        grant_secrets(role, host.node_token)
        acknowledge(role, "AwsSolutions-IAM5[Resource::*]", "ecr:GetAuthorizationToken and Session Manager's agent "
                    "actions support no resource-level permission.", all_policies=True)

        user_data = ec2.UserData.for_linux()
        user_data.add_commands(
            "set -euo pipefail",
            "curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --dearmor -o /usr/share/keyrings/nvidia-container-toolkit.gpg",
            "curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list"
            " | sed 's#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit.gpg] https://#'"
            " > /etc/apt/sources.list.d/nvidia-container-toolkit.list",
            "apt-get update && apt-get install -y nvidia-container-toolkit amazon-ecr-credential-helper",
            "nvidia-ctk runtime configure --runtime=docker && systemctl restart docker",
            *bacalhau.install(bacalhau_version, bacalhau_sha256),
            *bacalhau.image_sync([image_parameter, bacalhau.NEXT_IMAGE_PARAMETER], self.region),
            *bacalhau.compute(host.node_token.secret_arn, self.region, {"codsplat": "gpu"},
                              before_start=bacalhau.IMAGE_SYNC),
        )
        # /dev/sda1: the Deep Learning AMI's root device. Bacalhau offers 80% of the root disk's free space,
        # and a 60 GB stage is placed only if this volume is the root.
        self.group = group_of(self, host.vpc, role, instance_type, ec2.MachineImage.from_ssm_parameter(GPU_AMI_PARAMETER),
                              user_data, count=count, disk_gb=200, group_sg=host.node_security_group, root_device="/dev/sda1")
