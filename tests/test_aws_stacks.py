"""The CDK app, synthesized offline: cdk-nag (as a validation plugin), cfn-lint and checkov on every
template, the security properties asserted on the templates themselves, and the wiring the daemon
relies on, down to reading its settings from the SSM parameters the stack writes."""

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest

from codsplat.aws.app import synth
from codsplat.aws.base import TEMPORARY_PREFIXES
from codsplat.orchestrator.backends import build_daemon
from codsplat.orchestrator.executors.sagemaker import ASL_PATH
from codsplat.orchestrator.provision import MAX_RECEIVE_COUNT, QUEUE_VISIBILITY_SECONDS, SSM_PATH, provision
from codsplat.orchestrator.records import DynamoStore
from codsplat.orchestrator.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
CHECKS_VENV = ROOT / ".venv-checks" / "bin"


@pytest.fixture(scope="module")
def assembly(tmp_path_factory):
    out = tmp_path_factory.mktemp("cdk.out")
    synth(out, {"emails": "ops@example.com,artist@example.com", "gpu_nodes": 1, "console_origins": "https://console.example.com"})  # raises on any unacknowledged finding
    templates = {p.name.split(".")[0]: json.loads(p.read_text()) for p in out.glob("*.template.json")}
    return out, templates


def resources(template, kind):
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def test_every_stack_synthesizes_offline_with_every_nag_finding_acknowledged(assembly):
    out, templates = assembly
    assert set(templates) == {"CodsplatBase", "CodsplatOrchestrator", "CodsplatGpuNodes"}
    report = out / "validation-report.json"
    assert not report.exists() or not any(r["violations"] for r in json.loads(report.read_text())["pluginReports"])


def test_cfn_lint_reports_no_errors(assembly):
    out, _ = assembly
    assert (CHECKS_VENV / "cfn-lint").exists(), "install aws/requirements-checks.txt into .venv-checks (README)"
    proc = subprocess.run([CHECKS_VENV / "cfn-lint", *sorted(out.glob("*.template.json"))], capture_output=True, text=True)
    assert proc.returncode & 2 == 0, proc.stdout  # bit 2: errors (4 and 8 are warnings and notes)


def test_checkov_passes_or_skips_with_a_reason(assembly):
    out, templates = assembly
    proc = subprocess.run([CHECKS_VENV / "checkov", "-d", out, "--framework", "cloudformation", "--skip-download",
                           "-o", "json"], capture_output=True, text=True)
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert failed == [], failed
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert skipped and all(len(c["check_result"].get("suppress_comment", "")) > 20 for c in skipped)


def test_no_statement_grants_a_wildcard_action_or_a_managed_full_access_policy(assembly):
    """Every Allow names its actions. The one exception is the key policy's statement that hands the
    key to the account's IAM (kms:* for the account root, AWS's default), so IAM policies govern it."""
    _, templates = assembly
    allows = 0
    for name, template in templates.items():
        for key, res in template["Resources"].items():
            props = res.get("Properties", {})
            for doc in filter(None, [props.get("PolicyDocument"), props.get("KeyPolicy"),
                                     *[p["PolicyDocument"] for p in props.get("Policies", [])]]):
                for statement in (s for s in doc["Statement"] if s["Effect"] == "Allow"):
                    allows += 1
                    actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                    if res["Type"] == "AWS::KMS::Key" and actions == ["kms:*"]:
                        assert json.dumps(statement["Principal"]).endswith(':root"]]}}'), statement
                        continue
                    for action in actions:
                        assert action != "*" and not action.endswith(":*"), f"{name}/{key}: {action}"
            for arn in props.get("ManagedPolicyArns", []):
                assert "FullAccess" not in json.dumps(arn), f"{name}/{key}"
    assert allows > 20


def test_the_data_bucket_is_private_tls_only_logged_and_versioned(assembly):
    _, templates = assembly
    base = templates["CodsplatBase"]
    buckets = resources(base, "AWS::S3::Bucket")
    data = next(v for v in buckets.values() if "NotificationConfiguration" in v["Properties"])["Properties"]
    assert data["VersioningConfiguration"]["Status"] == "Enabled"
    assert data["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert all(data["PublicAccessBlockConfiguration"].values())
    assert data["LoggingConfiguration"]["DestinationBucketName"]
    # the console's origin (and only it) may PUT upload parts and read splats with presigned links
    assert data["CorsConfiguration"]["CorsRules"] == [{
        "AllowedHeaders": ["*"], "AllowedMethods": ["GET", "PUT", "HEAD"], "AllowedOrigins": ["https://console.example.com"],
        "ExposedHeaders": ["ETag"], "MaxAge": 3600}]
    for rule in data["LifecycleConfiguration"]["Rules"]:  # only temporary prefixes; results are never expired
        assert rule["Prefix"] in TEMPORARY_PREFIXES and not rule["Prefix"].startswith(Settings().output_prefix)
    for policy in resources(base, "AWS::S3::BucketPolicy").values():
        denies = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
        assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} and s["Action"] == "s3:*"
                   and s["Principal"] == {"AWS": "*"} for s in denies)


def test_job_events_reach_a_queue_with_a_dead_letter_queue(assembly):
    _, templates = assembly
    base = templates["CodsplatBase"]
    data = next(v for v in resources(base, "AWS::S3::Bucket").values() if "NotificationConfiguration" in v["Properties"])
    [topic_config] = data["Properties"]["NotificationConfiguration"]["TopicConfigurations"]
    rules = {r["Name"]: r["Value"] for r in topic_config["Filter"]["S3Key"]["Rules"]}
    assert topic_config["Event"] == "s3:ObjectCreated:*" and rules == {"prefix": Settings().jobs_prefix, "suffix": ".json"}
    queues = resources(base, "AWS::SQS::Queue")
    [jobs] = [q["Properties"] for q in queues.values() if "RedrivePolicy" in q["Properties"]]
    assert jobs["RedrivePolicy"]["maxReceiveCount"] == MAX_RECEIVE_COUNT
    assert jobs["VisibilityTimeout"] == QUEUE_VISIBILITY_SECONDS and jobs["KmsMasterKeyId"]
    assert jobs["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0] in queues
    [subscription] = [s["Properties"] for s in resources(base, "AWS::SNS::Subscription").values() if s["Properties"]["Protocol"] == "sqs"]
    assert subscription["TopicArn"] == {"Ref": topic_config["Topic"]["Ref"]}
    emails = {s["Properties"]["Endpoint"]: s["Properties"]["FilterPolicy"]
              for s in resources(base, "AWS::SNS::Subscription").values() if s["Properties"]["Protocol"] == "email"}
    assert emails == {e: {"recipient": [e]} for e in ("ops@example.com", "artist@example.com")}


def test_the_table_is_the_one_the_store_uses_with_recovery_and_ttl(assembly):
    _, templates = assembly
    [table] = resources(templates["CodsplatBase"], "AWS::DynamoDB::Table").values()
    props, want = table["Properties"], DynamoStore.table_definition("x")
    assert props["KeySchema"] == want["KeySchema"] and props["AttributeDefinitions"] == want["AttributeDefinitions"]
    assert props["GlobalSecondaryIndexes"] == want["GlobalSecondaryIndexes"] and props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}


def test_the_state_machine_is_the_asl_file_the_daemon_tests_execute(assembly):
    _, templates = assembly
    [machine] = resources(templates["CodsplatBase"], "AWS::StepFunctions::StateMachine").values()
    props = machine["Properties"]
    asl = ASL_PATH.read_text()
    assert props["DefinitionString"] == asl
    assert set(props["DefinitionSubstitutions"]) == set(re.findall(r"\$\{(\w+)\}", asl)) == {"TrainingImage", "SageMakerRoleArn"}
    assert props["LoggingConfiguration"]["Level"] == "ALL"


def test_the_repository_and_the_host(assembly):
    _, templates = assembly
    [repo] = resources(templates["CodsplatBase"], "AWS::ECR::Repository").values()
    assert repo["Properties"]["ImageTagMutability"] == "IMMUTABLE"
    assert repo["Properties"]["ImageScanningConfiguration"] == {"ScanOnPush": True}
    host = templates["CodsplatOrchestrator"]
    for group in resources(host, "AWS::EC2::SecurityGroup").values():
        assert "SecurityGroupIngress" not in group["Properties"], "reached through SSM Session Manager only"
    [template] = resources(host, "AWS::EC2::LaunchTemplate").values()
    data = template["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required" and "KeyName" not in data
    user_data = json.dumps(data["UserData"])
    unit = (ROOT / "orchestrator" / "codsplat-daemon.service").read_text()
    assert f"CODSPLAT_SSM_PATH={SSM_PATH}" in unit
    assert all(json.dumps(line)[1:-1] in user_data for line in unit.splitlines() if line)  # the repo's unit, as is


def test_the_daemon_reads_its_settings_from_the_parameters_the_stack_writes(assembly, moto_server, standin, monkeypatch):
    """Deploy the base stack's wiring into moto (boto3 provisioning, the same names the docs use for
    local runs), write the stack's SSM parameters with those values, then run a job through a daemon
    whose settings come only from SSM, as on the EC2 host."""
    _, templates = assembly
    base = templates["CodsplatBase"]
    prefix = f"stk{int(time.time() * 1000) % 10**8}"
    names = provision(boto3.Session(), prefix, endpoint=moto_server.url)
    by_type = {"AWS::S3::Bucket": names["bucket"], "AWS::SQS::Queue": names["queue_url"], "AWS::DynamoDB::Table": names["table"],
               "AWS::SNS::Topic": names["topic_arn"], "AWS::StepFunctions::StateMachine": names["state_machine_arn"],
               "AWS::ECR::Repository": "codsplat"}
    pseudo = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "AWS::URLSuffix": "amazonaws.com"}

    def value(node):  # what CloudFormation would put in the parameter, with the provisioned resources
        if isinstance(node, str):
            return node
        if "Ref" in node:
            return pseudo.get(node["Ref"]) or by_type[base["Resources"][node["Ref"]]["Type"]]
        if "Fn::Join" in node:
            return node["Fn::Join"][0].join(value(p) for p in node["Fn::Join"][1])
        if "Fn::Select" in node or "Fn::Split" in node or "Fn::GetAtt" in node:
            return "123456789012.dkr.ecr.us-east-1.amazonaws.com/codsplat"
        raise AssertionError(node)

    ssm = boto3.client("ssm", endpoint_url=moto_server.url, region_name="us-east-1")
    path = f"/{prefix}{SSM_PATH}"
    for param in resources(base, "AWS::SSM::Parameter").values():
        key = param["Properties"]["Name"].removeprefix(SSM_PATH + "/")
        assert key in Settings.model_fields, f"{key} is not a daemon setting"
        ssm.put_parameter(Name=f"{path}/{key}", Value=value(param["Properties"]["Value"]), Type="String")
    monkeypatch.setenv("CODSPLAT_AWS_ENDPOINT", moto_server.url)
    settings = load_settings(env={"CODSPLAT_SSM_PATH": path}, ssm_client=ssm)
    assert (settings.bucket, settings.queue_url, settings.table, settings.topic_arn) == (
        names["bucket"], names["queue_url"], names["table"], names["topic_arn"])
    assert settings.state_machine_arn == names["state_machine_arn"] and settings.image.endswith(":latest")

    fast = "codsplat-fast:stack"
    httpx.post(f"{standin.url}/standin/knobs", json={"images": {fast: str(ROOT / "benchmarks" / "fast_image")}})
    monkeypatch.setenv("BACALHAU_API_HOST", "127.0.0.1")
    monkeypatch.setenv("BACALHAU_API_PORT", standin.url.rsplit(":", 1)[1])
    settings = settings.model_copy(update={"image": fast, "aws_endpoint": moto_server.url, "s3_endpoint": moto_server.url,
                                           "queue_wait_seconds": 1, "bacalhau_poll_seconds": 0.1})
    s3 = boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1")
    s3.put_object(Bucket=names["bucket"], Key="uploads/stack/clip.mp4", Body=b"\0" * 64)
    daemon = build_daemon(settings)
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        s3.put_object(Bucket=names["bucket"], Key="jobs/stack/first.json",
                      Body=json.dumps({"version": 1, "input": "uploads/stack/clip.mp4"}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (daemon.store.get("first") and daemon.store.get("first").notified_at):
            time.sleep(0.5)
    finally:
        daemon.stop()
        thread.join(timeout=60)
    record = daemon.store.get("first")
    assert record.state == "SUCCEEDED" and record.backend == "bacalhau"
    assert s3.head_object(Bucket=names["bucket"], Key="results/first/export/splat.ply")
