"""The daemon against AWS APIs (the moto server) and Bacalhau (the stand-in): S3 upload → SNS → SQS
→ record in DynamoDB → Bacalhau → results in S3 → one SNS message, filtered to its recipient."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from codsplat.orchestrator.backends import build_daemon
from codsplat.orchestrator.events import Delivery, SqsSource
from codsplat.orchestrator.records import DynamoStore
from conftest import CPU_ONLY, QUICK, aws_deployment, sagemaker_did_its_work
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def aws(moto_server, standin):
    return aws_deployment(moto_server, bacalhau_port=int(standin.url.rsplit(":", 1)[1]), bacalhau_poll_seconds=0.2,
                          cancel_check_seconds=0.5)


def moto_server_url(aws) -> str:
    return aws["settings"].aws_endpoint


def mail(aws):
    out = []
    for m in aws["sqs"].receive_message(QueueUrl=aws["mailbox"], MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
        out.append(json.loads(m["Body"]))
    return out


def test_upload_to_email_through_aws_and_bacalhau(aws, sample_video):
    s3, bucket = aws["s3"], aws["bucket"]
    s3.upload_file(str(sample_video), bucket, "uploads/u/scan.mp4")
    daemon = build_daemon(aws["settings"])
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        # two recipients: the mailbox's filter matches the second one (SNS String.Array)
        job = {"version": 1, "input": "uploads/u/scan.mp4", "preset": "tiny",
               "notify": {"email": ["someone@example.com", "u@example.com"]}, **QUICK, **CPU_ONLY}
        s3.put_object(Bucket=bucket, Key="jobs/u/My Scan.json", Body=json.dumps(job))  # a space: URL-encoded in the event
        received = []
        deadline = time.monotonic() + 300
        while not received and time.monotonic() < deadline:
            received = mail(aws)
        assert received, "no notification"
        # the same upload delivered again (SQS is at-least-once): nothing changes
        event = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                              "s3": {"bucket": {"name": bucket}, "object": {"key": "jobs/u/My+Scan.json"}}}]}
        for _ in range(2):
            aws["sqs"].send_message(QueueUrl=aws["queue_url"], MessageBody=json.dumps(event))
        deadline = time.monotonic() + 60  # both read and found duplicates, then three sweeps: a second message would be out
        while daemon.stats["duplicates"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        sweeps = daemon.stats["sweeps"]
        while daemon.stats["sweeps"] < sweeps + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        received += mail(aws)
    finally:
        daemon.stop()
        thread.join(timeout=120)
    [message] = received
    assert message["MessageAttributes"]["job_id"]["Value"] == "my-scan"
    assert message["MessageAttributes"]["status"]["Value"] == "SUCCEEDED"
    assert "X-Amz-Expires" in message["Message"] and "splat.ply" in message["Message"]
    record = DynamoStore(aws["table"], boto3.client("dynamodb", endpoint_url=aws["settings"].aws_endpoint,
                                                    region_name="us-east-1")).get("my-scan")
    assert record.state == "SUCCEEDED" and record.backend == "bacalhau"
    assert record.attempts[0]["remote_id"].startswith("j-") and record.attempts[0]["name"] == "codsplat-my-scan-all-a1"
    assert record.result["outputs"] and record.result["metrics"]["psnr"] > 15 and record.result["device"] == "cpu"
    assert daemon.stats["duplicates"] == 2 and daemon.stats["created"] == 1
    assert s3.head_object(Bucket=bucket, Key="results/my-scan/export/splat.spz")["ContentLength"] > 0


def test_unreadable_messages_are_recorded_then_dead_lettered(aws):
    aws["sqs"].send_message(QueueUrl=aws["queue_url"], MessageBody="this is not json")
    daemon = build_daemon(aws["settings"])
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        dead = []
        while not dead and time.monotonic() < deadline:
            dead = aws["sqs"].receive_message(QueueUrl=aws["dlq_url"], WaitTimeSeconds=1).get("Messages", [])
    finally:
        daemon.stop()
        thread.join(timeout=60)
    assert dead and dead[0]["Body"] == "this is not json"
    [record] = [r for r in daemon.store.list("FAILED") if r.job_id.startswith("message-")]
    assert "Unreadable queue message: message body is not JSON" in record.error["message"]


def test_a_received_batch_is_created_in_one_request_and_taken_ids_are_renumbered(aws):
    """Intake against DynamoDB: the batch's records in one transaction; an id taken by another
    document, or twice in the batch, is renumbered; the same upload again is a duplicate."""
    from codsplat.orchestrator.backends import Backends
    from codsplat.orchestrator.events import JobEvent
    from codsplat.orchestrator.intake import Intake

    backends = Backends(aws["settings"], None)
    intake = Intake(backends.store, backends.blobs, backends.policy, aws["settings"], "daemon-a")
    documents = {"jobs/a/old.json": "kept", "jobs/b/one.json": "scan", "jobs/b/two.json": "scan",
                 "jobs/b/three.json": "kept", "jobs/b/four.json": "fresh"}
    for key, job_id in documents.items():
        aws["s3"].put_object(Bucket=aws["bucket"], Key=key, Body=json.dumps(
            {"version": 1, "id": job_id, "input": f"uploads/{key.split('/')[1]}/x.mp4"}))
    event = lambda key, upload: JobEvent(aws["bucket"], key, upload=upload)  # noqa: E731
    [old] = intake.take_in([intake.read(event("jobs/a/old.json", "u0"))])
    assert old.record.job_id == "kept", old.record.error
    before = backends.calls.operations()
    batch = [event(key, "u1") for key in list(documents)[1:]] + [event("jobs/a/old.json", "u0")]  # the last: delivered again
    arrivals = intake.take_in([intake.read(e) for e in batch])
    assert [a.record.job_id if a.record else None for a in arrivals] == ["scan", "scan-r2", "kept-r2", "fresh", None]
    assert arrivals[-1].duplicate and all(a.job.id == a.record.job_id for a in arrivals[:4])
    sent = {k: v - before.get(k, 0) for k, v in backends.calls.operations().items() if v != before.get(k, 0)}
    # the transaction (refused: "kept" is taken, and it says by whom), a create for each record it held
    # back (2), the second "scan" and its renumbering (2), "kept" renumbered (1), the redelivery (1)
    assert sent == {"s3 GetObject": 5, "dynamodb TransactWriteItems": 1, "dynamodb PutItem": 6}, sent
    assert [backends.store.get(i).job_key for i in ("scan", "scan-r2", "kept-r2", "fresh")] == list(documents)[1:]


def test_acknowledging_deletes_in_batches_and_names_a_message_the_queue_kept(moto_server, caplog):
    sqs = boto3.client("sqs", endpoint_url=moto_server.url, region_name="us-east-1")
    queue = sqs.create_queue(QueueName=f"ack-{time.time_ns()}")["QueueUrl"]
    for n in range(13):
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"n": n}))
    source, deliveries = SqsSource(sqs, queue, wait_seconds=1), []
    while len(deliveries) < 13:
        deliveries += source.receive()
    kept = Delivery([], "not-a-receipt-handle", "message-that-stays")
    source.ack(deliveries[:6] + [kept] + deliveries[6:])  # 14 entries: two DeleteMessageBatch calls
    counts = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert counts["ApproximateNumberOfMessages"] == counts["ApproximateNumberOfMessagesNotVisible"] == "0"
    warnings = [r.getMessage() for r in caplog.records if r.name == "codsplat.events"]
    assert len(warnings) == 1 and "message-that-stays" in warnings[0] and "receipt handle" in warnings[0]


def fallback_settings(aws, **extra):
    names = {"state_machine_arn": aws["state_machine_arn"]}
    return aws["settings"].model_copy(update={**names, "fallback_poll_seconds": 1, **extra})


def run_until_mail(aws, settings, job, key, timeout=120):
    daemon = build_daemon(settings)
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        aws["s3"].put_object(Bucket=aws["bucket"], Key=key, Body=json.dumps(job))
        received, deadline = [], time.monotonic() + timeout
        while not received and time.monotonic() < deadline:
            received = mail(aws)
    finally:
        daemon.stop()
        thread.join(timeout=60)
    return daemon, received


def test_no_gpu_node_hands_the_job_to_sagemaker(aws, standin, sample_video):

    standin.knobs(nodes=[{"gpus": []}])  # a node with no GPU
    aws["s3"].upload_file(str(sample_video), aws["bucket"], "uploads/u/fallback.mp4")
    sagemaker_did_its_work(aws["s3"], aws["bucket"], "fallback")
    job = {"version": 1, "input": "uploads/u/fallback.mp4", "notify": {"email": ["u@example.com"]}}
    daemon, received = run_until_mail(aws, fallback_settings(aws), job, "jobs/u/fallback.json")
    [message] = received
    assert message["MessageAttributes"]["status"]["Value"] == "SUCCEEDED" and "ran on SageMaker" in message["Message"], message["Message"]
    record = daemon.store.get("fallback")
    assert record.state == "SUCCEEDED" and record.backend == "sagemaker" and record.notified_at
    assert record.result["metrics"]["psnr"] == 27.5  # as a Bacalhau run's record
    export = {"splat.ply", "splat.spz", "metrics.json", "report.html", "cameras.json"}
    assert {o.rsplit("/", 1)[-1] for o in record.result["outputs"]} == export
    for output in record.result["outputs"]:  # each one names a file the run left in the bucket
        key = output.removeprefix(f"s3://{aws['bucket']}/")
        assert aws["s3"].get_object(Bucket=aws["bucket"], Key=key)["Body"].read() == f"fallback {key.rsplit('/', 1)[-1]}".encode()
    [attempt] = [a for a in record.attempts if a["backend"] == "sagemaker"]
    assert attempt["name"] == "codsplat-fallback-sm-a1"
    assert "bacalhau cannot run it: no Bacalhau node can hold the all stage (node n-g5-xlarge: 1 GPU asked, 0 offered)" == attempt["reason"]
    sm = boto3.client("sagemaker", endpoint_url=aws["settings"].aws_endpoint, region_name="us-east-1")
    described = sm.describe_training_job(TrainingJobName="codsplat-fallback-sm-a1")
    assert described["AlgorithmSpecification"]["TrainingImage"] == aws["settings"].image
    assert described["CheckpointConfig"]["S3Uri"] == f"s3://{aws['bucket']}/results/fallback/"


def test_a_job_pinned_to_bacalhau_that_no_node_can_hold_fails_and_never_reaches_sagemaker(aws, standin, sample_video):
    """The fallback is for `backend: auto` alone: a job that asked for Bacalhau fails with the reason,
    though a fallback is configured."""
    standin.knobs(nodes=[{"gpus": []}])
    aws["s3"].upload_file(str(sample_video), aws["bucket"], "uploads/u/pinned.mp4")
    job = {"version": 1, "input": "uploads/u/pinned.mp4", "notify": {"email": ["u@example.com"]},
           "compute": {"backend": "bacalhau"}}
    daemon, received = run_until_mail(aws, fallback_settings(aws), job, "jobs/u/pinned.json")
    [message] = received
    assert message["MessageAttributes"]["status"]["Value"] == "FAILED"
    record = daemon.store.get("pinned")
    assert record.state == "FAILED" and record.backend != "sagemaker" and record.error["kind"] == "compute"
    assert "1 GPU asked, 0 offered" in record.error["message"]
    assert not any(a["backend"] == "sagemaker" for a in record.attempts)
    sm = boto3.client("sagemaker", endpoint_url=aws["settings"].aws_endpoint, region_name="us-east-1")
    assert not [j for j in sm.list_training_jobs()["TrainingJobSummaries"] if "pinned" in j["TrainingJobName"]]


def test_a_failed_sagemaker_job_fails_the_record_with_its_reason(aws, moto_server, sample_video):
    import httpx

    httpx.post(f"{moto_server.control}/steer", json={"initial_status": "InProgress"})
    try:
        aws["s3"].upload_file(str(sample_video), aws["bucket"], "uploads/u/smf.mp4")
        job = {"version": 1, "input": "uploads/u/smf.mp4", "notify": {"email": ["u@example.com"]},
               "compute": {"backend": "sagemaker"}}

        def fail_it_later():
            for _ in range(100):
                reply = httpx.post(f"{moto_server.control}/training-job",
                                   json={"name": "codsplat-smf-sm-a1", "status": "Failed", "reason": "CUDA out of memory"})
                if reply.status_code == 200:
                    return
                time.sleep(0.2)

        threading.Thread(target=fail_it_later, daemon=True).start()
        daemon, received = run_until_mail(aws, fallback_settings(aws), job, "jobs/u/smf.json")
    finally:
        httpx.post(f"{moto_server.control}/steer", json={"initial_status": "Completed"})
    [message] = received
    assert message["MessageAttributes"]["status"]["Value"] == "FAILED"
    assert "CUDA out of memory" in message["Message"]
    record = daemon.store.get("smf")
    assert record.state == "FAILED" and "CUDA out of memory" in record.error["message"]


@pytest.mark.parametrize("how", ["aborted", "failed-at-start"])
def test_a_handed_over_job_whose_execution_ended_without_its_record_is_stopped_failed_and_told_once(
        aws, moto_server, sample_video, how):
    """The fallback's execution can end without writing the record: aborted by an operator, or failed
    (the history limit, a States.Runtime error, an end write that failed for good). The daemon's sweep
    finds it: the training job, which may still be running, is stopped, the record FAILED with the reason,
    and the user told once, though several sweeps see the job."""
    import httpx

    sfn = boto3.client("stepfunctions", endpoint_url=moto_server.url, region_name="us-east-1")
    sm = boto3.client("sagemaker", endpoint_url=moto_server.url, region_name="us-east-1")
    job_id, name = f"lost-{how}", f"codsplat-lost-{how}-sm-a1"
    arn = f"{aws['state_machine_arn'].replace(':stateMachine:', ':execution:')}:{name}"
    if how == "failed-at-start":  # an execution under the attempt's name that fails (its input lacks what it reads)
        sfn.start_execution(stateMachineArn=aws["state_machine_arn"], name=name, input="{}")
    aws["s3"].upload_file(str(sample_video), aws["bucket"], f"uploads/u/{job_id}.mp4")
    job = {"version": 1, "input": f"uploads/u/{job_id}.mp4", "notify": {"email": ["u@example.com"]},
           "compute": {"backend": "sagemaker"}}
    httpx.post(f"{moto_server.control}/steer", json={"initial_status": "InProgress"})
    daemon = build_daemon(fallback_settings(aws, claim_seconds=1.0))
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        aws["s3"].put_object(Bucket=aws["bucket"], Key=f"jobs/u/{job_id}.json", Body=json.dumps(job))
        if how == "aborted":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not sm.list_training_jobs(NameContains=name)["TrainingJobSummaries"]:
                time.sleep(0.2)
            assert daemon.store.get(job_id).state == "RUNNING"
            sfn.stop_execution(executionArn=arn, error="Operator", cause="stopped from the console")
        received, deadline = [], time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            received = mail(aws)
        sweeps = daemon.lifecycle.stats["sweeps"]
        while daemon.lifecycle.stats["sweeps"] < sweeps + 3 and time.monotonic() < deadline + 30:
            time.sleep(0.2)  # more sweeps, each of which sees the job: no second message
        received += mail(aws)
    finally:
        httpx.post(f"{moto_server.control}/steer", json={"initial_status": "Completed"})
        daemon.stop()
        thread.join(timeout=60)
    assert sfn.describe_execution(executionArn=arn)["status"] == ("ABORTED" if how == "aborted" else "FAILED")
    [message] = received
    assert message["MessageAttributes"]["status"]["Value"] == "FAILED"
    record = daemon.store.get(job_id)
    assert record.state == "FAILED" and record.notified_at and record.error["kind"] == "internal"
    assert name in record.error["message"] and ("aborted" if how == "aborted" else "failed") in record.error["message"]
    assert name in message["Message"]
    if how == "aborted":  # it was still running, unwatched: stopped
        assert sm.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] == "Stopped"
    else:  # it never started one
        assert not sm.list_training_jobs(NameContains=name)["TrainingJobSummaries"]


def test_many_jobs_at_once_each_run_once_within_the_bound(aws, standin):
    """A burst of uploads (each event delivered twice) against fast jobs: every job ends SUCCEEDED with one
    Bacalhau submission and one message, and the node never runs more than `concurrency` at once.
    The 1,000-job figures (jobs/s, latency, RSS) are in benchmarks/results/daemon_load.json."""

    from codsplat.orchestrator.bacalhau import BacalhauClient

    fast = "codsplat-fast:test"
    standin.knobs(nodes=[{"images": {fast: str(ROOT / "benchmarks" / "fast_image")}}])
    s3, bucket, jobs = aws["s3"], aws["bucket"], 60
    s3.put_object(Bucket=bucket, Key="uploads/burst/clip.mp4", Body=b"\0" * 1024)
    settings = aws["settings"].model_copy(update={"image": fast, "concurrency": 3, "bacalhau_poll_seconds": 0.1,
                                                  "cancel_check_seconds": 2.0})
    daemon = build_daemon(settings)
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    store = DynamoStore(aws["table"], boto3.client("dynamodb", endpoint_url=moto_server_url(aws), region_name="us-east-1"))
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"jobs/burst/b{i:03d}.json", Body=json.dumps(
                {"version": 1, "input": "uploads/burst/clip.mp4", "notify": {"email": ["u@example.com"]}})), range(jobs)))
        for i in range(jobs):  # SQS is at-least-once: every event again
            event = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                  "s3": {"bucket": {"name": bucket}, "object": {"key": f"jobs/burst/b{i:03d}.json"}}}]}
            aws["sqs"].send_message(QueueUrl=aws["queue_url"], MessageBody=json.dumps(event))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            records = [r for r in store.list(limit=1000) if r.job_id.startswith("b")]
            if len(records) == jobs and all(r.notified_at for r in records):
                break
            time.sleep(1)
        messages = []
        while batch := mail(aws):
            messages += batch
    finally:
        daemon.stop()
        thread.join(timeout=120)
    assert sorted(r.state for r in records) == ["SUCCEEDED"] * jobs
    assert all(r.event_at and r.event_at <= r.created_at for r in records)
    with BacalhauClient(standin.url) as client:
        submitted = [j.labels["codsplat-job"] for j in client.list_jobs(limit=500)]
    assert sorted(submitted) == sorted(r.job_id for r in records), "each job submitted exactly once"
    assert sorted(m["MessageAttributes"]["job_id"]["Value"] for m in messages) == sorted(r.job_id for r in records)
    peak = standin.knobs()["peak_running"]
    assert 1 <= peak <= 3  # what the node saw; and the daemon's own count of jobs it held at a backend at once:
    assert daemon.lifecycle.slots.peak == 3  # the bound, reached (thirty jobs wait for three slots) and kept
    assert daemon.stats["created"] == jobs and daemon.stats["duplicates"] >= jobs
    # what the daemon sent, counted at its clients, against the figures docs/daemon.md gives per job
    calls, sweeps = daemon.calls(), daemon.stats["sweeps"]
    polls = daemon.lifecycle.executors["bacalhau"].watcher.polls
    assert calls["sns"] == jobs
    # its document, read once per event (the duplicate too, and any delivered again), and its media once
    assert calls["s3"] <= daemon.stats["received"] + jobs, daemon.operations()
    # RUNNING, SUCCEEDED, sent for each job, one write per heartbeat; the creates of a received batch go
    # in one transaction (a create goes alone when a receive brought one job, or a transaction was
    # refused for an id that was taken: the duplicates here); shared by every job: the seven queries of
    # the start's recovery and two per cancel sweep
    operations = daemon.operations()
    assert daemon.stats["beats"] >= 1
    creates_alone = operations["dynamodb PutItem"] - 3 * jobs - daemon.stats["beats"]
    assert 0 <= creates_alone <= jobs // 2, operations
    assert 1 <= operations["dynamodb TransactWriteItems"] <= daemon.stats["received"] // 2, operations
    assert operations.get("dynamodb Query", 0) <= 2 * sweeps + 7, operations
    # receives and deletes, up to ten messages a call: 2 x 60 events would take 240 calls one by one; a
    # busy machine returns partial receives, so the bound leaves room (63 seen under load)
    assert calls["sqs"] <= 2 * jobs
    ops = {k.removeprefix("bacalhau "): v for k, v in daemon.operations().items() if k.startswith("bacalhau ")}
    assert ops.pop("PUT /api/v1/orchestrator/jobs") == jobs, ops  # each submitted once
    assert ops.pop("GET /api/v1/orchestrator/jobs/{id}/executions") <= jobs, ops  # read once, when it ends
    assert ops.pop("GET /api/v1/orchestrator/nodes") <= 2, ops  # one reading shared by every preflight (NODES_SECONDS)
    assert ops.pop("GET /api/v1/orchestrator/jobs") <= polls + 1, ops  # the shared poll
    assert ops.pop("GET /api/v1/agent/version") == 1, ops  # read once: it maps execution state numbers
    # the watcher's start mark, and a describe for a job no listing showed for a minute
    # (three at a time here, each described at most once a minute)
    assert ops.pop("GET /api/v1/orchestrator/jobs/{id}", 0) <= 1 + 3 * (1 + polls // 600), ops
    assert ops == {}, ops  # nothing else, per job or at all


OUTCOMES = {  # name: (media, extra settings, exit code, kind, words of the worker's own sentence)
    "succeeds": ("sample.mp4", {}, 0, None, None),
    "bad-media": ("one.mp4", {}, 2, "input", "has only 1 frame"),
    "no-overlap": ("noise.zip", {}, 3, "reconstruction", "in 3D"),
    "quality-gate": ("sample.mp4", {"export": {"min_psnr": 60}}, 4, "quality", "below export.min_psnr (60.0 dB)"),
}


def test_the_same_job_ends_the_same_way_through_run_submit_and_the_daemon(aws, standin, sample_video, tmp_path):
    """Bacalhau's real semantics (a non-zero exit is a Completed job with its ExitCode) reach the
    user as `codsplat run` reports them: the exit code of `codsplat submit`, and the record the daemon
    writes (state, error kind, exit code, the worker's sentence)."""
    import zipfile

    from conftest import codsplat
    from test_cli_errors import noise_images, one_frame_video

    one_frame_video(tmp_path / "one.mp4")
    noise_images(tmp_path / "noise")
    with zipfile.ZipFile(tmp_path / "noise.zip", "w") as z:
        for image in sorted((tmp_path / "noise").iterdir()):
            z.write(image, image.name)
    media = {"sample.mp4": sample_video, "one.mp4": tmp_path / "one.mp4", "noise.zip": tmp_path / "noise.zip"}
    s3, bucket = aws["s3"], aws["bucket"]
    for name, path in media.items():
        s3.upload_file(str(path), bucket, f"uploads/same/{name}")
    settings = aws["settings"].model_copy(update={"concurrency": 4})
    env = {"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": str(settings.bacalhau_port),
           "CODSPLAT_S3_ENDPOINT": settings.s3_endpoint, "CODSPLAT_BUCKET": bucket}
    daemon = build_daemon(settings)
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        for name, (file, extra, *_rest) in OUTCOMES.items():
            doc = {"version": 1, "input": f"uploads/same/{file}", "preset": "tiny", **QUICK, **CPU_ONLY, **extra}
            s3.put_object(Bucket=bucket, Key=f"jobs/same/{name}.json", Body=json.dumps(doc))
        observed = {}
        for name, (file, extra, code, kind, words) in OUTCOMES.items():
            doc = {"version": 1, "id": f"{name}-cli", "input": f"s3://{bucket}/uploads/same/{file}", "preset": "tiny", **QUICK,
                   **CPU_ONLY, **extra}
            (tmp_path / f"{name}.json").write_text(json.dumps(doc))
            run = codsplat("run", media[file], "--config", tmp_path / f"{name}.json", "--out", tmp_path / name)
            submit = codsplat("submit", tmp_path / f"{name}.json", "--poll", "0.2", env=env)
            observed[name] = (run.returncode, submit.returncode)
            for proc in (run, submit):
                assert words is None or words in proc.stderr, proc.stderr
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all((r := daemon.store.get(n)) and r.notified_at for n in OUTCOMES):
            time.sleep(0.5)
    finally:
        daemon.stop()
        thread.join(timeout=120)
    for name, (file, extra, code, kind, words) in OUTCOMES.items():
        record = daemon.store.get(name)
        assert observed[name] == (code, code), name
        if code == 0:
            assert record.state == "SUCCEEDED" and record.result["metrics"]["gaussians"] > 0
        else:
            assert record.state == "FAILED", record.to_json()
            assert (record.error["exit_code"], record.error["kind"]) == (code, kind) and words in record.error["message"]
            assert len(record.attempts) == 1  # the job's own fault: never retried, never handed over


def fast(aws, standin, **knobs):

    standin.knobs(nodes=[{"images": {"codsplat-fast:test": str(ROOT / "benchmarks" / "fast_image")}}], **knobs)
    aws["s3"].put_object(Bucket=aws["bucket"], Key="uploads/u/clip.mp4", Body=b"\0")
    return aws["settings"].model_copy(update={"image": "codsplat-fast:test", "bacalhau_poll_seconds": 0.1})


def serve(settings):
    daemon = build_daemon(settings)
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False, "grace_seconds": 0}, daemon=True)
    thread.start()
    return daemon, thread


def until(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def bacalhau_jobs(standin, job_id):
    import httpx

    return httpx.get(f"{standin.url}/api/v1/orchestrator/jobs", params={"labels": f"codsplat-job={job_id}"}).json()["Items"]


def test_a_cancel_stops_the_running_bacalhau_job_and_ends_the_record_cancelled(aws, standin):
    from codsplat.orchestrator.records import request_cancel

    settings = fast(aws, standin, hold=True)  # placed on the node, never started: running until stopped
    daemon, thread = serve(settings)
    try:
        aws["s3"].put_object(Bucket=aws["bucket"], Key="jobs/u/stopme.json",
                             Body=json.dumps({"version": 1, "input": "uploads/u/clip.mp4", "notify": {"email": ["u@example.com"]}}))
        until(lambda: (r := daemon.store.get("stopme")) and r.state == "RUNNING")
        request_cancel(daemon.store, "stopme")
        until(lambda: daemon.store.get("stopme").notified_at)
    finally:
        daemon.stop()
        thread.join(timeout=60)
    record = daemon.store.get("stopme")
    assert record.state == "CANCELLED" and record.attempts[-1]["state"] == "Cancelled"
    [job] = bacalhau_jobs(standin, "stopme")
    assert job["State"]["StateType"] == "Stopped"
    [message] = mail(aws)
    assert message["MessageAttributes"]["status"]["Value"] == "CANCELLED"


def test_a_restarted_daemon_follows_the_bacalhau_job_it_had_sent_and_sends_nothing_again(aws, standin):

    settings = fast(aws, standin, hold=True)
    daemon, thread = serve(settings)
    aws["s3"].put_object(Bucket=aws["bucket"], Key="jobs/u/across.json", Body=json.dumps({"version": 1, "input": "uploads/u/clip.mp4"}))
    until(lambda: (r := daemon.store.get("across")) and r.state == "RUNNING")
    daemon.stop()  # stopped while its job runs on Bacalhau
    thread.join(timeout=60)
    assert daemon.store.get("across").state == "RUNNING"
    standin.knobs(hold=False)
    until(lambda: bacalhau_jobs(standin, "across")[0]["State"]["StateType"] == "Completed")  # it ended while no daemon ran
    daemon, thread = serve(settings)
    try:
        until(lambda: daemon.store.get("across").notified_at)
    finally:
        daemon.stop()
        thread.join(timeout=60)
    assert daemon.store.get("across").state == "SUCCEEDED" and len(bacalhau_jobs(standin, "across")) == 1


@pytest.mark.parametrize("blip", [0, 8], ids=["bacalhau-answers", "bacalhau-down-at-the-restart"])
def test_an_attempt_sent_just_before_a_crash_is_found_and_followed_not_sent_again(aws, standin, blip):
    """The daemon died after Bacalhau accepted the attempt and before its record said so: the record
    is VALIDATED, the job runs. The next daemon looks the attempt up by its labels before it sends;
    if Bacalhau cannot answer then, it sends nothing, hands nothing over, and looks again."""
    from codsplat.orchestrator.bacalhau import BacalhauClient
    from codsplat.orchestrator.job import parse_job
    from codsplat.orchestrator.records import VALIDATED, JobRecord
    from codsplat.orchestrator.translate import translate

    settings = fast(aws, standin)
    doc = {"version": 1, "input": "uploads/u/clip.mp4"}
    aws["s3"].put_object(Bucket=aws["bucket"], Key="tmp/lost.json", Body=json.dumps(doc))  # not under jobs/: no event
    job = parse_job(doc, settings.policy, default_id="lost")
    with BacalhauClient.from_settings(settings) as client:
        client.submit(translate(job, settings, "all", 1))  # ...and then the daemon died
    store = DynamoStore(aws["table"], boto3.client("dynamodb", endpoint_url=settings.aws_endpoint, region_name="us-east-1"))
    store.create(JobRecord(job_id="lost", job_key="tmp/lost.json", state=VALIDATED))
    standin.knobs(unavailable=blip)
    settings = settings.model_copy(update={"lookup_retry_seconds": 0.5, "state_machine_arn": aws["state_machine_arn"]})
    daemon, thread = serve(settings)
    try:
        until(lambda: (r := daemon.store.get("lost")) and r.notified_at)
    finally:
        daemon.stop()
        thread.join(timeout=60)
    record = daemon.store.get("lost")
    assert record.state == "SUCCEEDED" and [a["name"] for a in record.attempts] == ["codsplat-lost-all-a1"]
    assert len(bacalhau_jobs(standin, "lost")) == 1 and record.backend == "bacalhau"  # not SageMaker's too
    assert any(h["note"] == "found again after a restart" for h in record.history)


def test_a_job_that_crashes_on_every_node_is_handed_to_sagemaker(aws, standin):
    settings = fast(aws, standin, env={"FAST_EXIT": "1"})
    settings = settings.model_copy(update={"state_machine_arn": aws["state_machine_arn"], "fallback_poll_seconds": 1})
    daemon, thread = serve(settings)
    sagemaker_did_its_work(aws["s3"], aws["bucket"], "crashy")
    try:
        aws["s3"].put_object(Bucket=aws["bucket"], Key="jobs/u/crashy.json",
                             Body=json.dumps({"version": 1, "input": "uploads/u/clip.mp4", "compute": {"retries": 1}}))
        until(lambda: (r := daemon.store.get("crashy")) and r.terminal, timeout=120)
    finally:
        daemon.stop()
        thread.join(timeout=60)
    record = daemon.store.get("crashy")
    assert [(a["backend"], a["state"]) for a in record.attempts] == [("bacalhau", "Failed"), ("bacalhau", "Failed"),
                                                                    ("sagemaker", "Running")]
    assert record.attempts[-1]["reason"].startswith("bacalhau cannot run it: all failed 2 times; last error: fast job failed with 1")
    assert record.state == "SUCCEEDED" and record.backend == "sagemaker"


def test_two_daemons_on_one_queue_one_killed_every_job_runs_once_and_is_told_once(aws, standin):
    """Two `codsplat daemon` processes serve one queue; jobs spread over both and wait on the node.
    One is killed with SIGKILL. The other takes over its jobs once their holds go stale
    (`claim_seconds`), follows the attempts already sent, and every job ends SUCCEEDED with one
    Bacalhau submission and one message."""
    import os
    import signal
    import subprocess
    import sys

    settings = fast(aws, standin, hold=True)
    env = {**os.environ, "CODSPLAT_BUCKET": aws["bucket"], "CODSPLAT_QUEUE_URL": aws["queue_url"],
           "CODSPLAT_TABLE": aws["table"], "CODSPLAT_TOPIC_ARN": aws["topic_arn"],
           "CODSPLAT_AWS_ENDPOINT": settings.aws_endpoint, "CODSPLAT_S3_ENDPOINT": settings.aws_endpoint,
           "CODSPLAT_IMAGE": settings.image, "CODSPLAT_QUEUE_WAIT_SECONDS": "1", "CODSPLAT_BACALHAU_POLL_SECONDS": "0.2",
           "CODSPLAT_CLAIM_SECONDS": "3", "CODSPLAT_CANCEL_CHECK_SECONDS": "0.5",
           "CODSPLAT_CONCURRENCY": "20", "BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": str(settings.bacalhau_port)}
    ports = [free_port(), free_port()]
    daemons = [subprocess.Popen([sys.executable, "-m", "codsplat.orchestrator.cli", "daemon"],
                                env={**env, "CODSPLAT_HEALTH_PORT": str(port)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    store = DynamoStore(aws["table"], boto3.client("dynamodb", endpoint_url=settings.aws_endpoint, region_name="us-east-1"))
    ids = [f"pair-{i:02d}" for i in range(12)]
    try:
        until(lambda: all(answers(f"http://127.0.0.1:{port}/health") for port in ports), timeout=90)  # both up
        time.sleep(1)  # and receiving: a slow start of one (a loaded machine) would leave it no job
        for job_id in ids:
            aws["s3"].put_object(Bucket=aws["bucket"], Key=f"jobs/u/{job_id}.json", Body=json.dumps(
                {"version": 1, "input": "uploads/u/clip.mp4", "notify": {"email": ["u@example.com"]}}))
        until(lambda: all((r := store.get(j)) and r.state == "RUNNING" for j in ids), timeout=90)
        owners = [store.get(j).owner for j in ids]
        assert len(set(owners)) == 2, "both daemons took jobs"  # the pids are in the owner names
        victim = max(daemons, key=lambda p: sum(f":{p.pid}:" in o for o in owners))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        standin.knobs(hold=False)
        until(lambda: all((r := store.get(j)) and r.notified_at for j in ids), timeout=120)
        messages = []
        while batch := mail(aws):
            messages += batch
    finally:
        for process in daemons:
            process.kill()
            process.wait()
    records = [store.get(j) for j in ids]
    assert [r.state for r in records] == ["SUCCEEDED"] * len(ids)
    assert all(len(bacalhau_jobs(standin, j)) == 1 for j in ids), "each job submitted once"
    told = [m["MessageAttributes"]["job_id"]["Value"] for m in messages]
    assert sorted(told) == sorted(ids), "each job told once"
    taken = [r for r in records if any("taken over from" in h["note"] for h in r.history)]
    assert taken and all(f":{victim.pid}:" in h["note"] for r in taken for h in r.history if "taken over" in h["note"])
