"""The moto server on 127.0.0.1 with Step Functions state execution on, plus a control port the
tests use to steer SageMaker training jobs inside that same process (moto marks them Completed at
once; a test can make new ones start InProgress, then finish them as Completed or Failed).

    python tests/moto_launcher.py --port 5000 --control-port 5001
"""

import argparse
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STEER = {"initial_status": "Completed"}


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

    def training_job(name):
        for account in sagemaker.sagemaker_backends.values():
            for backend in account.values():
                if name in backend.training_jobs:
                    return backend.training_jobs[name]
        return None

    class Control(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path == "/steer":
                STEER.update(body)
                reply = STEER
            elif self.path == "/training-job":
                job = training_job(body["name"])
                if job is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                job.training_job_status = job.secondary_status = body["status"]
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
