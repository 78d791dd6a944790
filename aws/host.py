"""The orchestrator host: one EC2 instance (an Auto Scaling group of one, so it comes back if it
dies) in a private subnet, reached only through SSM Session Manager, running `codsplat daemon`
under the systemd unit from the repo. Its role can do exactly what the daemon does, nothing more."""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from codsplat.orchestrator.executors.sagemaker import ASL_PATH
from codsplat.orchestrator.provision import SSM_PATH

from .base import BaseStack
from .checks import acknowledge, skip_checkov

UNIT = ASL_PATH.with_name("codsplat-daemon.service")
SESSION_MANAGER_ACTIONS = [  # what the SSM agent needs for Session Manager; none has resource-level permissions
    "ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel", "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage", "ec2messages:FailMessage", "ec2messages:GetEndpoint", "ec2messages:GetMessages",
    "ec2messages:SendReply",
]


def private_vpc(scope: Construct) -> ec2.Vpc:
    flow_logs = logs.LogGroup(scope, "FlowLogs", retention=logs.RetentionDays.THREE_MONTHS)
    skip_checkov(flow_logs, "CKV_AWS_158", "VPC flow logs carry no job data; CloudWatch's own encryption applies.")
    vpc = ec2.Vpc(scope, "Vpc", max_azs=2, nat_gateways=1, subnet_configuration=[
        ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
        ec2.SubnetConfiguration(name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=22)],
        flow_logs={"all": ec2.FlowLogOptions(destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs))},
        gateway_endpoints={"s3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                           "dynamodb": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.DYNAMODB)})
    for subnet in vpc.public_subnets:  # only the NAT gateway lives there; instances get no public address
        subnet.node.default_child.map_public_ip_on_launch = False
    return vpc


def session_manager(role: iam.Role) -> None:
    role.add_to_policy(iam.PolicyStatement(actions=SESSION_MANAGER_ACTIONS, resources=["*"]))
    skip_checkov(role.node.find_child("DefaultPolicy"), "CKV_AWS_111", "Session Manager's agent actions support "
                 "no resource-level permission; every other write in this policy names its resource.")
    acknowledge(role, "AwsSolutions-IAM5[Resource::*]", "Session Manager's agent actions (ssm:UpdateInstanceInformation, "
                "ssmmessages:*Channel, ec2messages:*) support no resource-level permission.", all_policies=True)


def group_of(scope: Construct, vpc: ec2.Vpc, role: iam.Role, instance_type: str, image: ec2.IMachineImage,
             user_data: ec2.UserData, count: int, disk_gb: int) -> autoscaling.AutoScalingGroup:
    """Instances in private subnets: IMDSv2 only, encrypted disks, no inbound rule, no key pair."""
    group_sg = ec2.SecurityGroup(scope, "InstanceSecurityGroup", vpc=vpc, allow_all_outbound=True,
                                 description="no inbound; outbound to AWS APIs and the Bacalhau network")
    template = ec2.LaunchTemplate(
        scope, "LaunchTemplate", instance_type=ec2.InstanceType(instance_type), machine_image=image, role=role,
        user_data=user_data, security_group=group_sg, require_imdsv2=True, detailed_monitoring=True,
        block_devices=[ec2.BlockDevice(device_name="/dev/xvda" if "nvidia" not in instance_type else "/dev/sda1",
                                       volume=ec2.BlockDeviceVolume.ebs(disk_gb, encrypted=True,
                                                                        volume_type=ec2.EbsDeviceVolumeType.GP3))])
    group = autoscaling.AutoScalingGroup(
        scope, "Group", vpc=vpc, vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
        launch_template=template, min_capacity=count, max_capacity=count, desired_capacity=count,
        health_checks=autoscaling.HealthChecks.ec2(grace_period=Duration.minutes(10)))
    acknowledge(group, "AwsSolutions-AS3", "A fixed-size group that replaces failed instances; the daemon's own "
                "JSON logs and health endpoint report on it, so scaling notifications would say nothing new.")
    return group


class HostStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, base: BaseStack, package: str = "codsplat",
                 instance_type: str = "t3.small", bacalhau_host: str = "orchestrator.codsplat.internal", **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.vpc = private_vpc(self)
        role = iam.Role(self, "DaemonRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
                        description="codsplat daemon: its queue, table, bucket prefixes, topic, state machine and settings")
        session_manager(role)
        role.add_to_policy(iam.PolicyStatement(
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"],
            resources=[base.queue.queue_arn]))
        role.add_to_policy(iam.PolicyStatement(
            actions=["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query", "dynamodb:Scan"],
            resources=[base.table_arn, f"{base.table_arn}/index/by_state"]))
        role.add_to_policy(iam.PolicyStatement(actions=["states:StartExecution"],
                                               resources=[base.state_machine.state_machine_arn]))
        role.add_to_policy(iam.PolicyStatement(actions=["sns:Publish"], resources=[base.notify_topic.topic_arn]))
        role.add_to_policy(iam.PolicyStatement(actions=["kms:Decrypt", "kms:GenerateDataKey"], resources=[base.key.key_arn]))
        role.add_to_policy(iam.PolicyStatement(
            actions=["ssm:GetParametersByPath", "ssm:GetParameters", "ssm:GetParameter"],
            resources=[self.format_arn(service="ssm", resource="parameter", resource_name=SSM_PATH.strip("/")),
                       self.format_arn(service="ssm", resource="parameter", resource_name=SSM_PATH.strip("/") + "/*")]))
        base.grant_job_data(role)
        acknowledge(role, f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:parameter{SSM_PATH}/*]",
                    "Every daemon setting is one parameter under this path.", all_policies=True)

        user_data = ec2.UserData.for_linux()
        user_data.add_commands(
            "set -euo pipefail",
            "dnf install -y python3.12 python3.12-pip",
            "id codsplat || useradd --system --home-dir /var/lib/codsplat --create-home codsplat",
            "python3.12 -m venv /opt/codsplat/venv",
            f"/opt/codsplat/venv/bin/pip install --quiet '{package}'",
            "mkdir -p /etc/codsplat",
            f"echo 'BACALHAU_API_HOST={bacalhau_host}' > /etc/codsplat/daemon.env",
            f"echo 'AWS_REGION={self.region}' >> /etc/codsplat/daemon.env",
            "cat > /etc/systemd/system/codsplat-daemon.service <<'UNIT'",
            *UNIT.read_text().splitlines(),
            "UNIT",
            "systemctl daemon-reload",
            "systemctl enable --now codsplat-daemon",
        )
        self.group = group_of(self, self.vpc, role, instance_type, ec2.MachineImage.latest_amazon_linux2023(),
                              user_data, count=1, disk_gb=30)
