"""Create the AWS resources the daemon needs with boto3: for local runs against a test endpoint
(moto) and for trying codsplat without CDK. Production deployments use the CDK stacks in aws/,
which create the same resources with the same names and wiring.

    python -m codsplat.orchestrator.provision --endpoint http://127.0.0.1:5000 --prefix codsplat
"""

from __future__ import annotations

import argparse
import json

from .executors.sagemaker import definition
from .records import DynamoStore

# Shared with the CDK stacks (aws/), so that a local deployment and a real one are wired alike.
QUEUE_VISIBILITY_SECONDS = 300  # longer than the daemon takes to record a message's jobs
MAX_RECEIVE_COUNT = 5  # deliveries before a message moves to the dead-letter queue
DLQ_RETENTION_SECONDS = 14 * 86400
SSM_PATH = "/codsplat/daemon"  # where the daemon reads its settings (CODSPLAT_SSM_PATH in the systemd unit)


def provision(session, prefix: str = "codsplat", bucket: str | None = None, jobs_prefix: str = "jobs/",
              image: str = "codsplat:latest",
              max_receive_count: int = MAX_RECEIVE_COUNT, visibility_timeout: int = QUEUE_VISIBILITY_SECONDS,
              endpoint: str | None = None,
              region: str = "us-east-1") -> dict[str, str]:
    """Bucket → (ObjectCreated on jobs/*.json) → events topic → queue (with a dead-letter queue);
    a notifications topic; the records table. Returns the daemon's settings for them."""
    client = lambda service: session.client(service, endpoint_url=endpoint, region_name=region)  # noqa: E731
    s3, sns, sqs, ddb = client("s3"), client("sns"), client("sqs"), client("dynamodb")
    bucket = bucket or f"{prefix}-data"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    events_topic = sns.create_topic(Name=f"{prefix}-job-uploads")["TopicArn"]
    notify_topic = sns.create_topic(Name=f"{prefix}-notifications")["TopicArn"]
    dlq_url = sqs.create_queue(QueueName=f"{prefix}-jobs-dlq", Attributes={"MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS)})["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=f"{prefix}-jobs", Attributes={
        "VisibilityTimeout": str(visibility_timeout), "ReceiveMessageWaitTimeSeconds": "20",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}),
    })["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "sns.amazonaws.com"},
                                                "Action": "sqs:SendMessage", "Resource": queue_arn,
                                                "Condition": {"ArnEquals": {"aws:SourceArn": events_topic}}}]})})
    sns.subscribe(TopicArn=events_topic, Protocol="sqs", Endpoint=queue_arn)
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"TopicConfigurations": [{
        "TopicArn": events_topic, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": jobs_prefix}, {"Name": "suffix", "Value": ".json"}]}},
    }]})
    table = f"{prefix}-jobs"
    ddb.create_table(**DynamoStore.table_definition(table))
    ddb.get_waiter("table_exists").wait(TableName=table)
    iam, sfn = client("iam"), client("stepfunctions")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                     "Principal": {"Service": ["states.amazonaws.com", "sagemaker.amazonaws.com"]}}]}
    role = iam.create_role(RoleName=f"{prefix}-fallback", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    machine = sfn.create_state_machine(name=f"{prefix}-fallback", definition=definition(image, role), roleArn=role)["stateMachineArn"]
    return {"bucket": bucket, "queue_url": queue_url, "dlq_url": dlq_url, "topic_arn": notify_topic,
            "events_topic_arn": events_topic, "table": table, "state_machine_arn": machine, "sagemaker_role_arn": role}


def main() -> None:
    import boto3

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint")
    ap.add_argument("--prefix", default="codsplat")
    ap.add_argument("--region", default="us-east-1")
    args = ap.parse_args()
    print(json.dumps(provision(boto3.Session(), args.prefix, endpoint=args.endpoint, region=args.region), indent=2))


if __name__ == "__main__":
    main()
