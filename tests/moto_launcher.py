"""The moto server on 127.0.0.1 with Step Functions state execution on, plus a control port the
tests use to steer SageMaker training jobs inside that same process (moto marks them Completed at
once; a test can make new ones start InProgress, then move them to any status).

Where moto's SageMaker falls short of the API reference, this fills in what the fallback relies on:
- CreateTrainingJob with a name in use answers ResourceInUse (moto overwrites the job);
- `create_errors` (steered: name → count) makes the next creates of that name answer
  ResourceLimitExceeded, as an account without GPU quota does; `lose_create_reply` (name → count)
  creates the job, then answers ThrottlingException, as a reply lost on the way back would look;
- a training job keeps its `Environment` and DescribeTrainingJob returns it (moto drops it);
- errors of AWS SDK tasks are named as Step Functions names them, `SageMaker.<Error>Exception` and
  `S3.<Error>Exception` (moto knows the Pascal-case names of DynamoDB and Sfn only);
- the context object's `$$.Execution.StartTime` is ISO 8601 text, as Step Functions gives it (moto
  hands on a datetime, which no task can send);
- an AWS SDK task's streamed reply (S3 GetObject's Body) is its text, as Step Functions hands it on
  (moto passes the stream along and fails copying it);
- `describe_errors` (steered: name → a list of true/false, one per DescribeTrainingJob of that name)
  makes a look fail with ThrottlingException where the list says true, as a blip in SageMaker's API does;
- `update_errors` (steered: job id → count) makes the next DynamoDB UpdateItems of that record answer
  ThrottlingException, a name no retrier of the fallback lists on its own;
- StopTrainingJob (moto has none): an InProgress job goes Stopped (SecondaryStatus Stopped), or
  stays Stopping where `stop_to` (name → status) says so; a job that has ended answers
  ValidationException.

And where moto's cost would be the rig's, not AWS's: SQS ReceiveMessage judged each message's
retention by computing every queue attribute, three scans of the whole queue per message
(`SQSBackend.is_message_valid_based_on_retention_period`), so a receive from a queue of a thousand
messages held moto's one interpreter for tens of milliseconds; it reads the one attribute.
DynamoDB TransactWriteItems backed up every table it writes with a deep copy (a whole table per
transaction, which also raced writes from other threads and failed with a 500); it backs up the
items the transaction writes, and a cancelled one puts back just those, on the live table.

    python tests/moto_launcher.py --port 5000 --control-port 5001
"""

import argparse
import datetime
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STEER = {"initial_status": "Completed", "create_errors": {}, "lose_create_reply": {}, "stop_to": {},
         "describe_errors": {}, "update_errors": {}}  # all but the first by name


def fill_in_sagemaker(sagemaker) -> None:
    from moto.sagemaker import responses
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import state_task_service_aws_sdk as sdk

    from botocore.response import StreamingBody

    sdk._SERVICE_ERROR_NAMES.update({"sagemaker": "SageMaker", "s3": "S3"})
    evaluate = sdk.StateTaskServiceAwsSdk._eval_service_task

    def eval_service_task(self, env, *args, **kwargs):
        evaluate(self, env, *args, **kwargs)
        reply = env.stack[-1]
        if isinstance(reply, dict):
            for key, value in reply.items():
                if isinstance(value, StreamingBody):
                    reply[key] = value.read().decode()

    sdk.StateTaskServiceAwsSdk._eval_service_task = eval_service_task
    from moto.sagemaker.exceptions import ResourceInUseException, ResourceNotFound, SagemakerClientError, ValidationError

    class ResourceLimitExceeded(SagemakerClientError):
        code = "ResourceLimitExceeded"

    class ThrottlingException(SagemakerClientError):
        code = "ThrottlingException"

    backend = sagemaker.SageMakerModelBackend
    create = backend.create_training_job
    asked = threading.local()  # the request's Environment, which moto's handler does not pass to its backend
    create_response = responses.SageMakerResponse.create_training_job

    def create_with_environment(self):
        asked.environment = self._get_param("Environment")
        return create_response(self)

    def create_training_job(self, training_job_name, *args, **kwargs):
        if training_job_name in self.training_jobs:
            raise ResourceInUseException(f"Training job names must be unique within an AWS account and region, and "
                                         f"a training job with this name already exists ({training_job_name})")
        if STEER["create_errors"].get(training_job_name, 0) > 0:
            STEER["create_errors"][training_job_name] -= 1
            raise ResourceLimitExceeded("The account-level service limit 'ml.g5.2xlarge for training job usage' is 0 "
                                        "Instances, with current utilization of 0 Instances and a request delta of 1 "
                                        "Instances. Please use AWS Service Quotas to request an increase for this quota.")
        created = create(self, training_job_name, *args, **kwargs)
        if getattr(asked, "environment", None):
            self.training_jobs[training_job_name].environment, asked.environment = asked.environment, None
        if STEER["lose_create_reply"].get(training_job_name, 0) > 0:
            STEER["lose_create_reply"][training_job_name] -= 1
            raise ThrottlingException("Rate exceeded")
        return created

    def stop_training_job(self, training_job_name):
        job = self.training_jobs.get(training_job_name)
        if job is None:
            raise ResourceNotFound(f"Requested resource not found: training job {training_job_name}")
        if job.training_job_status != "InProgress":
            raise ValidationError(f"The request was rejected because the training job is in status {job.training_job_status}.")
        job.training_job_status = job.secondary_status = STEER["stop_to"].get(training_job_name, "Stopped")

    def stop_response(self):
        self.sagemaker_backend.stop_training_job(self._get_param("TrainingJobName"))
        return responses.ActionResult({})

    describe = backend.describe_training_job

    def describe_training_job(self, training_job_name, *args, **kwargs):
        blips = STEER["describe_errors"].get(training_job_name) or []
        if blips and blips.pop(0):
            raise ThrottlingException("Rate exceeded")
        return describe(self, training_job_name, *args, **kwargs)

    backend.create_training_job = create_training_job
    backend.describe_training_job = describe_training_job
    backend.stop_training_job = stop_training_job
    responses.SageMakerResponse.stop_training_job = stop_response
    responses.SageMakerResponse.create_training_job = create_with_environment


def fill_in_stepfunctions() -> None:
    from moto.stepfunctions.parser.backend import execution_worker

    environment = execution_worker.ExecutionWorker._get_evaluation_environment

    def with_text_start(self):
        env = environment(self)
        execution = env.states.context_object.context_object_data["Execution"]
        if not isinstance(execution["StartTime"], str):
            execution["StartTime"] = execution["StartTime"].astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return env

    execution_worker.ExecutionWorker._get_evaluation_environment = with_text_start


def fill_in_sqs() -> None:
    from moto.core.utils import unix_time
    from moto.sqs.models import SQSBackend

    def retained(self, queue_name, message) -> bool:
        period = int(self.get_queue(queue_name).message_retention_period)
        return period + message.sent_timestamp / 1000 > unix_time()

    SQSBackend.is_message_valid_based_on_retention_period = retained


def fill_in_dynamodb() -> None:
    import copy
    import types

    from moto.dynamodb import models
    from moto.dynamodb.exceptions import ERROR_TYPE_PREFIX, DynamodbException
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    writing = threading.local()  # the hash keys the running transaction writes, by table name

    def backup(value, memo=None):  # transact_write_items' `copy.deepcopy(table)`: just the items it writes
        keys = getattr(writing, "keys", None)
        if keys is None or not isinstance(value, Table):
            return copy.deepcopy(value, memo)
        clone = copy.copy(value)
        clone.items = {h: copy.deepcopy(value.items[h]) for h in keys.get(value.name, ()) if h in value.items}
        return clone

    models.copy = types.SimpleNamespace(deepcopy=backup)
    transact = models.DynamoDBBackend.transact_write_items

    def transact_write_items(self, transact_items):
        keys: dict[str, set] = {}
        for entry in transact_items:
            op = next(iter(entry.values()), {})
            table = self.tables.get(op.get("TableName"))
            key = op.get("Key") or op.get("Item") or {}
            if table is not None and table.hash_key_attr in key:
                keys.setdefault(table.name, set()).add(DynamoType(key[table.hash_key_attr]))
        live = {name: self.tables[name] for name in keys}
        writing.keys = keys
        try:
            return transact(self, transact_items)
        except Exception:  # moto put its backups in place of the tables: back to the live ones, undoing the writes
            for name, table in live.items():
                kept, self.tables[name] = self.tables[name], table
                for h in keys[name]:
                    if h in kept.items:
                        table.items[h] = kept.items[h]
                    else:
                        table.items.pop(h, None)
            raise
        finally:
            writing.keys = None

    models.DynamoDBBackend.transact_write_items = transact_write_items
    update = models.DynamoDBBackend.update_item

    def update_item(self, table_name, key, *args, **kwargs):
        job_id = (key.get("job_id") or {}).get("S")
        if STEER["update_errors"].get(job_id, 0) > 0:
            STEER["update_errors"][job_id] -= 1
            raise DynamodbException(ERROR_TYPE_PREFIX + "ThrottlingException", "Throughput exceeds the current capacity "
                                    "for one or more global secondary indexes. DynamoDB is automatically scaling your index.")
        return update(self, table_name, key, *args, **kwargs)

    models.DynamoDBBackend.update_item = update_item


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--control-port", type=int, required=True)
    args = ap.parse_args()
    os.environ["MOTO_PORT"] = str(args.port)  # the state machine's own AWS calls come back here

    from moto.core.config import default_user_config
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.sagemaker import models as sagemaker

    default_user_config["stepfunctions"] = {"execute_state_machine": True}
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request costs moto a fifth of its CPU

    original = sagemaker.FakeTrainingJob.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.training_job_status = self.secondary_status = STEER["initial_status"]

    sagemaker.FakeTrainingJob.__init__ = init
    fill_in_sagemaker(sagemaker)
    fill_in_stepfunctions()
    fill_in_sqs()
    fill_in_dynamodb()

    def training_job(name):
        for account in sagemaker.sagemaker_backends.values():
            for backend in account.values():
                if name in backend.training_jobs:
                    return backend.training_jobs[name]
        return None

    class Control(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path == "/steer":  # by-name steering merges into what is there
                for key, value in body.items():
                    STEER[key] = {**STEER[key], **value} if isinstance(STEER.get(key), dict) else value
                reply = STEER
            elif self.path == "/training-job":
                job = training_job(body["name"])
                if job is not None and body["status"] == "gone":  # as if SageMaker no longer knew it
                    for account in sagemaker.sagemaker_backends.values():
                        for backend in account.values():
                            backend.training_jobs.pop(body["name"], None)
                    reply = {"name": body["name"], "status": "gone"}
                elif job is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                else:
                    job.training_job_status = body["status"]
                    job.secondary_status = body.get("secondary", body["status"])
                    job.failure_reason = body.get("reason", "")
                    reply = {"name": body["name"], "status": job.training_job_status}
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(reply).encode())

        def log_message(self, *a):
            pass

    control = ThreadingHTTPServer(("127.0.0.1", args.control_port), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
