"""The base stack: everything the daemon and the SageMaker fallback use, secure by default.

Data bucket (uploads/, jobs/, results/) → S3 event for `jobs/*.json` → events topic → queue (+ DLQ)
→ the daemon; records table; notifications topic (email subscriptions filtered to their recipient);
ECR repository for the worker image; the SageMaker role and the fallback state machine, built from
`orchestrator/fallback.asl.json`, the very file the daemon's tests execute; and one SSM parameter
per daemon setting under `/codsplat/daemon`, where the systemd unit tells the daemon to look.
"""

from __future__ import annotations

from aws_cdk import ArnFormat, CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_ssm as ssm
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from codsplat.orchestrator.executors.sagemaker import ASL_PATH
from codsplat.orchestrator.provision import DLQ_RETENTION_SECONDS, MAX_RECEIVE_COUNT, QUEUE_VISIBILITY_SECONDS, SSM_PATH
from codsplat.orchestrator.records import DynamoStore
from codsplat.orchestrator.settings import Settings, as_text
from codsplat.pipeline.contract import OUTCOME_FILE

from .checks import acknowledge, nag_form, skip_checkov

TEMPORARY_PREFIXES = ("uploads/", "jobs/", "tmp/")  # lifecycle rules touch only these; never results/
# Settings the stacks build IAM and bucket rules from: always written to SSM, so that the daemon validates
# jobs against the very limits IAM enforces. Those the stacks make (STACK_SETTINGS) no settings file may set.
POLICY_SETTINGS = frozenset({"input_prefixes", "output_prefix", "jobs_prefix", "max_gpus", "max_runtime_minutes",
                             "max_input_bytes", "max_input_files"})
STACK_SETTINGS = frozenset({"bucket", "queue_url", "table", "topic_arn", "state_machine_arn", "image", "region",
                            "aws_endpoint", "s3_endpoint", "bacalhau_host", "bacalhau_api_key_secret"})
SECRET_SETTINGS = frozenset({"bacalhau_api_key", "bacalhau_password"})
TRAINING_JOB_PREFIX = "codsplat-"  # attempts name training jobs codsplat-<job id>-sm-a<n> (orchestrator/compute.py)


def data_bucket_name(stack: Stack) -> str:
    """One data bucket per account and region; any stack can name it (and its ARN) without an import."""
    return f"codsplat-data-{stack.account}-{stack.region}"


class BaseStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, emails: tuple[str, ...] = (),
                 image_tag: str = "latest", daemon_settings: dict[str, str] | None = None,
                 console_origins: tuple[str, ...] = (), settings: Settings | None = None, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        # The deployment's settings: the IAM limits below are built from the same values the stack writes to
        # SSM, which the daemon validates jobs against (app.py deployment_settings).
        self.settings = deployed = settings or Settings()
        self.key = kms.Key(self, "DataKey", enable_key_rotation=True, removal_policy=RemovalPolicy.RETAIN,
                           description="codsplat: the queues, topics, table and image repository")
        # S3 publishes events and SNS delivers to the encrypted queue with this key, from this account only
        self.key.add_to_resource_policy(iam.PolicyStatement(
            principals=[iam.ServicePrincipal("s3.amazonaws.com"), iam.ServicePrincipal("sns.amazonaws.com")],
            actions=["kms:GenerateDataKey*", "kms:Decrypt"], resources=["*"],
            conditions={"StringEquals": {"aws:SourceAccount": self.account}}))

        # ------------------------------------------------------------ buckets
        access_logs = s3.Bucket(
            self, "AccessLogs", encryption=s3.BucketEncryption.S3_MANAGED, enforce_ssl=True, versioned=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, removal_policy=RemovalPolicy.RETAIN,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[s3.LifecycleRule(id="expire-old-logs", expiration=Duration.days(365),
                                              noncurrent_version_expiration=Duration.days(30))])
        acknowledge(access_logs, "AwsSolutions-S1", "This is the access-log bucket; logging it into itself would loop.")
        skip_checkov(access_logs, "CKV_AWS_18", "This is the access-log bucket; logging it into itself would loop.")
        skip_checkov(access_logs, "CKV_AWS_145", "S3 server access logs can be delivered only to SSE-S3 buckets.")
        self.bucket = s3.Bucket(
            # a name of its own (one per account and region) lets other stacks name its ARN without an import
            self, "Data", bucket_name=data_bucket_name(self), encryption=s3.BucketEncryption.S3_MANAGED, enforce_ssl=True, versioned=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, removal_policy=RemovalPolicy.RETAIN,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=access_logs, server_access_logs_prefix="data/",
            # the web console's browser PUTs upload parts and reads splats through presigned links
            cors=[s3.CorsRule(allowed_methods=[s3.HttpMethods.GET, s3.HttpMethods.PUT, s3.HttpMethods.HEAD],
                              allowed_origins=list(console_origins), allowed_headers=["*"], exposed_headers=["ETag"],
                              max_age=3600)] if console_origins else None,
            lifecycle_rules=[
                s3.LifecycleRule(id="uploads", prefix="uploads/", abort_incomplete_multipart_upload_after=Duration.days(7),
                                 noncurrent_version_expiration=Duration.days(30)),
                s3.LifecycleRule(id="job-documents", prefix=deployed.jobs_prefix, noncurrent_version_expiration=Duration.days(30)),
                s3.LifecycleRule(id="scratch", prefix="tmp/", expiration=Duration.days(7),
                                 abort_incomplete_multipart_upload_after=Duration.days(1)),
            ])
        skip_checkov(self.bucket, "CKV_AWS_145", "SSE-S3: presigned result links and Bacalhau's S3 publisher "
                                                 "then need no KMS grants; the bucket is private and TLS-only.")

        # ------------------------------------------------------------ events: S3 → SNS → SQS (+ DLQ)
        self.events_topic = sns.Topic(self, "JobUploads", master_key=self.key, enforce_ssl=True,
                                      display_name="codsplat job uploads")
        self.events_topic.add_to_resource_policy(iam.PolicyStatement(
            principals=[iam.ServicePrincipal("s3.amazonaws.com")], actions=["sns:Publish"],
            resources=[self.events_topic.topic_arn],
            # SourceAccount, not SourceArn: the bucket depends on this policy, so it cannot name the bucket
            conditions={"StringEquals": {"aws:SourceAccount": self.account}}))
        # Native CloudFormation notification (no custom-resource Lambda): ObjectCreated for jobs/*.json
        cfn_bucket: s3.CfnBucket = self.bucket.node.default_child
        cfn_bucket.notification_configuration = s3.CfnBucket.NotificationConfigurationProperty(
            topic_configurations=[s3.CfnBucket.TopicConfigurationProperty(
                event="s3:ObjectCreated:*", topic=self.events_topic.topic_arn,
                filter=s3.CfnBucket.NotificationFilterProperty(s3_key=s3.CfnBucket.S3KeyFilterProperty(rules=[
                    s3.CfnBucket.FilterRuleProperty(name="prefix", value=deployed.jobs_prefix),
                    s3.CfnBucket.FilterRuleProperty(name="suffix", value=".json")])))])
        for policy in self.events_topic.node.find_all():
            if isinstance(policy, sns.CfnTopicPolicy):
                cfn_bucket.node.add_dependency(policy)
        self.dlq = sqs.Queue(self, "JobsDeadLetters", encryption=sqs.QueueEncryption.KMS, encryption_master_key=self.key,
                             enforce_ssl=True, retention_period=Duration.seconds(DLQ_RETENTION_SECONDS))
        acknowledge(self.dlq, "AwsSolutions-SQS3", "This is the dead-letter queue.")
        self.queue = sqs.Queue(
            self, "Jobs", encryption=sqs.QueueEncryption.KMS, encryption_master_key=self.key, enforce_ssl=True,
            visibility_timeout=Duration.seconds(QUEUE_VISIBILITY_SECONDS), receive_message_wait_time=Duration.seconds(20),
            dead_letter_queue=sqs.DeadLetterQueue(max_receive_count=MAX_RECEIVE_COUNT, queue=self.dlq))
        self.events_topic.add_subscription(subs.SqsSubscription(self.queue))

        # ------------------------------------------------------------ notifications
        self.notify_topic = sns.Topic(self, "Notifications", master_key=self.key, enforce_ssl=True,
                                      display_name="codsplat")
        for email in emails:  # each address receives only its own jobs' messages
            self.notify_topic.add_subscription(subs.EmailSubscription(email, filter_policy={
                "recipient": sns.SubscriptionFilter.string_filter(allowlist=[email])}))

        # ------------------------------------------------------------ records
        definition = DynamoStore.table_definition("unused")
        self.table = dynamodb.CfnTable(
            self, "Records", billing_mode=definition["BillingMode"],
            attribute_definitions=[dynamodb.CfnTable.AttributeDefinitionProperty(attribute_name=a["AttributeName"],
                                                                                 attribute_type=a["AttributeType"])
                                   for a in definition["AttributeDefinitions"]],
            key_schema=[dynamodb.CfnTable.KeySchemaProperty(attribute_name=k["AttributeName"], key_type=k["KeyType"])
                        for k in definition["KeySchema"]],
            global_secondary_indexes=[dynamodb.CfnTable.GlobalSecondaryIndexProperty(
                index_name=g["IndexName"], projection=dynamodb.CfnTable.ProjectionProperty(projection_type="ALL"),
                key_schema=[dynamodb.CfnTable.KeySchemaProperty(attribute_name=k["AttributeName"], key_type=k["KeyType"])
                            for k in g["KeySchema"]]) for g in definition["GlobalSecondaryIndexes"]],
            point_in_time_recovery_specification=dynamodb.CfnTable.PointInTimeRecoverySpecificationProperty(
                point_in_time_recovery_enabled=True),
            time_to_live_specification=dynamodb.CfnTable.TimeToLiveSpecificationProperty(
                attribute_name="expires_at", enabled=True),
            sse_specification=dynamodb.CfnTable.SSESpecificationProperty(
                sse_enabled=True, sse_type="KMS", kms_master_key_id=self.key.key_arn),
            deletion_protection_enabled=True)
        self.table.apply_removal_policy(RemovalPolicy.RETAIN)
        self.table_arn = self.table.attr_arn

        # ------------------------------------------------------------ the worker image
        self.repository = ecr.Repository(
            self, "WorkerImage", image_tag_mutability=ecr.TagMutability.IMMUTABLE, image_scan_on_push=True,
            encryption=ecr.RepositoryEncryption.KMS, encryption_key=self.key, removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[ecr.LifecycleRule(max_image_count=20, description="keep the last 20 images")])
        self.image_uri = self.repository.repository_uri_for_tag(image_tag)

        # ------------------------------------------------------------ SageMaker fallback
        self.sagemaker_role = iam.Role(self, "SageMakerExecution", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                                       description="codsplat SageMaker training jobs (the fallback)")
        self.grant_job_data(self.sagemaker_role)
        self.sagemaker_role.add_to_policy(iam.PolicyStatement(
            actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            resources=[self.repository.repository_arn]))
        self.sagemaker_role.add_to_policy(iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]))
        self.sagemaker_role.add_to_policy(iam.PolicyStatement(actions=["kms:Decrypt"], resources=[self.key.key_arn]))
        training_logs = self.format_arn(service="logs", resource="log-group",
                                        resource_name="/aws/sagemaker/TrainingJobs:*",
                                        arn_format=ArnFormat.COLON_RESOURCE_NAME)
        self.sagemaker_role.add_to_policy(iam.PolicyStatement(
            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=[training_logs]))
        acknowledge(self.sagemaker_role, "AwsSolutions-IAM5[Resource::*]",
                    "ecr:GetAuthorizationToken supports no resource-level permission (AWS documents Resource *).", all_policies=True)
        acknowledge(self.sagemaker_role, f"AwsSolutions-IAM5[Resource::{nag_form(self, training_logs)}]",
                    "SageMaker writes one log stream per training job into this log group.", all_policies=True)

        machine_logs = logs.LogGroup(self, "FallbackLogs", retention=logs.RetentionDays.ONE_YEAR,
                                     encryption_key=None, removal_policy=RemovalPolicy.RETAIN)
        skip_checkov(machine_logs, "CKV_AWS_158", "Execution history holds job ids and S3 keys, no secrets; "
                                                  "a KMS key policy for CloudWatch Logs is left to the operator.")
        self.fallback_name = f"{self.stack_name}-fallback"  # a plain name: the host grants on its executions by it
        self.state_machine = sfn.StateMachine(
            self, "Fallback", state_machine_name=self.fallback_name, definition_body=sfn.DefinitionBody.from_string(ASL_PATH.read_text()),
            definition_substitutions={"TrainingImage": self.image_uri, "SageMakerRoleArn": self.sagemaker_role.role_arn},
            logs=sfn.LogOptions(destination=machine_logs, level=sfn.LogLevel.ALL, include_execution_data=True),
            tracing_enabled=True, comment="codsplat SageMaker fallback (orchestrator/fallback.asl.json)")
        role = self.state_machine.role
        self.training_jobs = training_jobs = self.format_arn(service="sagemaker", resource="training-job",
                                                             resource_name=f"{TRAINING_JOB_PREFIX}*")
        policy = deployed.policy
        # Only the instance types the deployment's policy lets a job ask for (job.py checks the same list),
        # network-isolated, and no longer than the policy allows.
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateTrainingJob"], resources=[training_jobs], conditions={
                "ForAllValues:StringEquals": {"sagemaker:InstanceTypes": list(policy.sagemaker_instance_types)},
                "Null": {"sagemaker:InstanceTypes": "false"},
                "Bool": {"sagemaker:NetworkIsolation": "true"},
                "NumericLessThanEquals": {"sagemaker:MaxRuntimeInSeconds": policy.sagemaker_max_runtime_seconds}}))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob", "sagemaker:AddTags"],
            resources=[training_jobs]))
        # the worker's outcome line, which the fallback records (results/<id>/outcome.json)
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:GetObject"], resources=[self.bucket.arn_for_objects(f"{deployed.output_prefix}*/{OUTCOME_FILE}")]))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[self.sagemaker_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}))
        role.add_to_principal_policy(iam.PolicyStatement(actions=["dynamodb:UpdateItem", "dynamodb:GetItem"],
                                                         resources=[self.table_arn]))
        self.notify_topic.grant_publish(role)
        acknowledge(role, f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:sagemaker:<AWS::Region>:<AWS::AccountId>:training-job/{TRAINING_JOB_PREFIX}*]",
                    "Training jobs are named per attempt (codsplat-<job id>-sm-a<n>); the prefix scopes them.", all_policies=True)
        outcomes = self.bucket.arn_for_objects(f"{deployed.output_prefix}*/{OUTCOME_FILE}")
        acknowledge(role, f"AwsSolutions-IAM5[Resource::{nag_form(self, outcomes)}]", "Reads only each job's outcome.json, which the "
                    "worker writes; job ids are made at run time.", all_policies=True)
        acknowledge(role, "AwsSolutions-IAM5[Resource::*]", "CloudWatch Logs delivery and X-Ray actions of a "
                    "logged, traced state machine support no resource-level permission.", all_policies=True)
        acknowledge(role, "AwsSolutions-IAM5[Action::kms:GenerateDataKey*]", "CDK's grant for publishing to the "
                    "encrypted topic; scoped to the one key.", all_policies=True)
        acknowledge(role, "AwsSolutions-IAM5[Action::kms:ReEncrypt*]", "CDK's grant for the encrypted topic; "
                    "scoped to the one key.", all_policies=True)

        # ------------------------------------------------------------ the daemon's settings
        settings = {
            **{name: as_text(getattr(deployed, name)) for name in sorted(deployed.model_fields_set | POLICY_SETTINGS)},
            "bucket": self.bucket.bucket_name, "queue_url": self.queue.queue_url, "table": self.table.ref,
            "topic_arn": self.notify_topic.topic_arn, "state_machine_arn": self.state_machine.state_machine_arn,
            "image": self.image_uri, "region": self.region, **(daemon_settings or {}),
        }
        self.parameters = {
            name: ssm.StringParameter(self, f"Setting-{name}", parameter_name=f"{SSM_PATH}/{name}", string_value=str(value),
                                      description=f"codsplat daemon setting '{name}'")
            for name, value in settings.items()
        }
        for name, value in (("Bucket", self.bucket.bucket_name), ("QueueUrl", self.queue.queue_url),
                            ("Table", self.table.ref), ("NotificationsTopic", self.notify_topic.topic_arn),
                            ("StateMachine", self.state_machine.state_machine_arn),
                            ("Repository", self.repository.repository_uri)):
            CfnOutput(self, name, value=value)

    def grant_job_data(self, role: iam.Role, *, read_inputs: bool = True, write_results: bool = True) -> None:
        """Read the input prefixes and read/write the results prefix of the data bucket, nothing else."""
        deployed = self.settings
        stack = Stack.of(role)
        bucket_arn = stack.format_arn(service="s3", region="", account="", resource=data_bucket_name(stack))
        inputs = [f"{bucket_arn}/{p}*" for p in deployed.input_prefixes] if read_inputs else []
        results = [f"{bucket_arn}/{deployed.output_prefix}*"] if write_results else []
        if inputs:
            role.add_to_principal_policy(iam.PolicyStatement(actions=["s3:GetObject"], resources=inputs))
        if results:
            role.add_to_principal_policy(iam.PolicyStatement(
                actions=["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"], resources=results))
        prefixes = [*deployed.input_prefixes, deployed.output_prefix]
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:ListBucket"], resources=[bucket_arn],
            conditions={"StringLike": {"s3:prefix": [f"{p}*" for p in prefixes]}}))
        for arn in inputs + results:
            acknowledge(role, f"AwsSolutions-IAM5[Resource::{nag_form(role, arn)}]",
                        "Objects under one prefix of the data bucket: per-job keys are not known in advance.",
                        all_policies=True)
