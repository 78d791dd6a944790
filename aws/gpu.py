"""Optional Bacalhau compute nodes on GPU instances, so an operator can stand up a private GPU
network with nothing but this app. User data installs the NVIDIA driver's container toolkit, Docker
and Bacalhau, then joins the requester (orchestrator) given in the context. The nodes' role reads the
job inputs and writes results in the data bucket, and pulls the worker image; nothing else."""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from constructs import Construct

from .base import BaseStack
from .checks import acknowledge
from .host import group_of, session_manager

# AWS's Deep Learning base AMI (NVIDIA driver installed), resolved at deploy time from its public SSM parameter
GPU_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
BACALHAU_VERSION = "v1.7.0"


class GpuNodesStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, base: BaseStack, vpc: ec2.IVpc, count: int = 1,
                 instance_type: str = "g5.xlarge", requester: str, **kwargs) -> None:
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
        acknowledge(role, "AwsSolutions-IAM5[Resource::*]", "ecr:GetAuthorizationToken and Session Manager's agent "
                    "actions support no resource-level permission.", all_policies=True)

        user_data = ec2.UserData.for_linux()
        user_data.add_commands(
            "set -euo pipefail",
            "curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --dearmor -o /usr/share/keyrings/nvidia-container-toolkit.gpg",
            "curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list"
            " | sed 's#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit.gpg] https://#'"
            " > /etc/apt/sources.list.d/nvidia-container-toolkit.list",
            "apt-get update && apt-get install -y docker.io nvidia-container-toolkit amazon-ecr-credential-helper",
            "nvidia-ctk runtime configure --runtime=docker && systemctl restart docker",
            f"curl -fsSL https://get.bacalhau.org/install.sh | BACALHAU_VERSION={BACALHAU_VERSION} bash",
            "mkdir -p /root/.docker && echo '{\"credsStore\": \"ecr-login\"}' > /root/.docker/config.json",
            "cat > /etc/systemd/system/bacalhau-compute.service <<'UNIT'",
            "[Unit]", "Description=Bacalhau compute node (codsplat GPU)", "After=docker.service", "Requires=docker.service",
            "[Service]",
            f"ExecStart=/usr/local/bin/bacalhau serve --compute --orchestrators={requester} "
            "--labels codsplat=gpu --config Compute.AllowListedLocalPaths=[]",
            "Restart=always", "RestartSec=5",
            "[Install]", "WantedBy=multi-user.target",
            "UNIT",
            "systemctl daemon-reload",
            "systemctl enable --now bacalhau-compute",
        )
        self.group = group_of(self, vpc, role, instance_type, ec2.MachineImage.from_ssm_parameter(GPU_AMI_PARAMETER),
                              user_data, count=count, disk_gb=200)
