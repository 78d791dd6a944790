"""Jobs through `codsplat submit` against the Bacalhau stand-in and moto's S3: a split job whose
stages read each other's published folders as Bacalhau lays them out, and how each way a Bacalhau
job can end reaches the user (an exit code, a retry, a hand-over). The real pipeline runs where
the result depends on it; the fault cases run the fast image (benchmarks/fast_image)."""

import io
import json
from pathlib import Path

import httpx
import pytest
from plyfile import PlyData

from conftest import CPU_ONLY, QUICK, codsplat

ROOT = Path(__file__).resolve().parents[1]
FAST = "codsplat-fast:test"


def env_for(moto_server, standin, **extra):
    port = standin.url.rsplit(":", 1)[1]
    return {"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": port, "CODSPLAT_S3_ENDPOINT": moto_server.url, **extra}


def keys(s3, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="codsplat-data", Prefix=prefix).get("Contents", []))


def job_file(tmp_path, job_id, **doc):
    path = tmp_path / f"{job_id}.json"
    path.write_text(json.dumps({"version": 1, "id": job_id, "input": "s3://codsplat-data/uploads/e2e/scan.mp4", **doc}))
    return path


def labelled(standin, job_id):
    jobs = httpx.get(f"{standin.url}/api/v1/orchestrator/jobs", params={"labels": f"codsplat-job={job_id}"}).json()["Items"]
    return sorted(jobs, key=lambda j: j["CreateTime"])


def fast_node(standin, **env):
    standin.knobs(nodes=[{"images": {FAST: str(ROOT / "benchmarks" / "fast_image")}}], env=env)


def test_split_job_stages_read_what_bacalhau_published_and_the_splat_lands_at_the_output(tmp_path, s3, moto_server,
                                                                                          standin, sample_video):
    s3.upload_file(str(sample_video), "codsplat-data", "uploads/e2e/scan.mp4")
    path = job_file(tmp_path, "e2e-split", preset="tiny", **QUICK, compute={"split_stages": True, **CPU_ONLY["compute"]})
    proc = codsplat("submit", path, "--poll", "0.2", env=env_for(moto_server, standin))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["output"] == "s3://codsplat-data/results/e2e-split/"
    pre, train, export = result["attempts"]
    assert [a["stage"] for a in result["attempts"]] == ["preprocess", "train", "export"]
    # the publisher's layout: <Key><ResultPath Name>/... plus stdout, stderr and exitCode beside them
    published = keys(s3, pre["published"])
    assert {k[len(pre["published"]):].split("/")[0] for k in published} == {"frames", "sfm", "stdout", "stderr", "exitCode"}
    assert {k[len(train["published"]):].split("/")[0] for k in keys(s3, train["published"])} == {"train", "stdout", "stderr", "exitCode"}
    body = s3.get_object(Bucket="codsplat-data", Key="results/e2e-split/export/splat.ply")["Body"].read()
    metrics = json.loads(s3.get_object(Bucket="codsplat-data", Key="results/e2e-split/export/metrics.json")["Body"].read())
    assert PlyData.read(io.BytesIO(body))["vertex"].count == metrics["gaussians"] > metrics["train"]["gaussians_initial"]
    assert metrics["train"]["rasterizer"] in ("compiled", "torch") and metrics["train"]["device"] == "cpu"


def test_a_crash_that_bacalhau_retries_itself_counts_as_an_execution(tmp_path, s3, moto_server, standin):
    fast_node(standin)
    standin.knobs(crash_next=1)
    s3.put_object(Bucket="codsplat-data", Key="uploads/e2e/scan.mp4", Body=b"\0")
    proc = codsplat("submit", job_file(tmp_path, "e2e-recrash"), "--poll", "0.1",
                    env=env_for(moto_server, standin, CODSPLAT_IMAGE=FAST))
    assert proc.returncode == 0, proc.stderr
    [attempt] = json.loads(proc.stdout)["attempts"]
    assert attempt["executions"] == 2 and attempt["state"] == "Completed"  # one submission, two executions
    assert len(labelled(standin, "e2e-recrash")) == 1


def test_repeated_crashes_are_retried_up_to_compute_retries_then_bacalhau_cannot_run_it(tmp_path, s3, moto_server, standin):
    fast_node(standin, FAST_EXIT="1")  # the container exits 1: a crash, Completed with ExitCode 1 on Bacalhau
    s3.put_object(Bucket="codsplat-data", Key="uploads/e2e/scan.mp4", Body=b"\0")
    proc = codsplat("submit", job_file(tmp_path, "e2e-crash", compute={"retries": 2}), "--poll", "0.1",
                    env=env_for(moto_server, standin, CODSPLAT_IMAGE=FAST))
    assert proc.returncode == 6, proc.stderr
    assert "all failed 3 times; last error: fast job failed with 1" in proc.stderr
    assert [j["Name"] for j in labelled(standin, "e2e-crash")] == [f"codsplat-e2e-crash-all-a{n}" for n in (1, 2, 3)]


@pytest.mark.parametrize("code,meaning", [(2, "input"), (3, "reconstruction"), (4, "quality")])
def test_a_user_error_exit_ends_the_job_with_that_code_and_no_retry(tmp_path, s3, moto_server, standin, code, meaning):
    fast_node(standin, FAST_EXIT=str(code))
    s3.put_object(Bucket="codsplat-data", Key="uploads/e2e/scan.mp4", Body=b"\0")
    proc = codsplat("submit", job_file(tmp_path, f"e2e-user{code}"), "--poll", "0.1",
                    env=env_for(moto_server, standin, CODSPLAT_IMAGE=FAST))
    assert proc.returncode == code, proc.stderr
    assert f"fast job failed with {code}" in proc.stderr and len(labelled(standin, f"e2e-user{code}")) == 1


def test_a_gpu_model_is_matched_in_the_labels_normal_form(tmp_path, s3, moto_server, standin):
    fast_node(standin)
    s3.put_object(Bucket="codsplat-data", Key="uploads/e2e/scan.mp4", Body=b"\0")
    env = env_for(moto_server, standin, CODSPLAT_IMAGE=FAST)
    proc = codsplat("submit", job_file(tmp_path, "e2e-a10g", compute={"gpu_model": "NVIDIA A10G"}), "--poll", "0.1", env=env)
    assert proc.returncode == 0, proc.stderr  # written as nvidia-smi prints it, matched as the node label has it
    spec = labelled(standin, "e2e-a10g")[0]
    assert spec["Constraints"] == [{"Key": "GPU-0", "Operator": "=", "Values": ["NVIDIA-A10G"]}]
    proc = codsplat("submit", job_file(tmp_path, "e2e-h100", compute={"gpu_model": "NVIDIA-H100"}), env=env)
    assert proc.returncode == 6 and not labelled(standin, "e2e-h100")
    assert "GPU NVIDIA-H100 asked, GPU-0 is NVIDIA-A10G" in proc.stderr and "n-g5-xlarge" in proc.stderr


def test_a_job_no_node_can_hold_is_refused_before_submission_naming_the_node_and_the_shortfall(tmp_path, moto_server, standin):
    resources = json.dumps({"all": {"cpu": "8", "memory": "64gb", "disk": "60gb"}})
    proc = codsplat("submit", job_file(tmp_path, "e2e-big"), env=env_for(moto_server, standin, CODSPLAT_RESOURCES=resources))
    assert proc.returncode == 6 and not labelled(standin, "e2e-big")
    assert "node n-g5-xlarge: 8 CPU asked, 3.2 offered; 64.0 GB memory asked, 13.7 GB offered" in proc.stderr
    proc = codsplat("nodes", "--job", job_file(tmp_path, "e2e-big"), env=env_for(moto_server, standin, CODSPLAT_RESOURCES=resources))
    assert proc.returncode == 6 and "NVIDIA A10G (23,028 MiB)" in proc.stdout and "no node fits" in proc.stderr


def test_status_logs_and_nodes(tmp_path, s3, moto_server, standin):
    fast_node(standin, FAST_EXIT="3")
    s3.put_object(Bucket="codsplat-data", Key="uploads/e2e/scan.mp4", Body=b"\0")
    env = env_for(moto_server, standin, CODSPLAT_IMAGE=FAST)
    assert codsplat("submit", job_file(tmp_path, "e2e-seen"), "--poll", "0.1", env=env).returncode == 3
    proc = codsplat("status", "e2e-seen", env=env)
    assert proc.returncode == 0 and "codsplat-e2e-seen-all-a1" in proc.stdout and "Completed" in proc.stdout
    assert "fast job failed with 3" in proc.stdout  # the worker's own sentence, from its outcome line
    proc = codsplat("logs", "e2e-seen", env=env)
    assert proc.returncode == 0 and "fast job failed with 3" in proc.stdout
    proc = codsplat("nodes", "--json", env=env)
    [node] = json.loads(proc.stdout)["nodes"]
    assert node["gpus"][0]["name"] == "NVIDIA A10G" and node["labels"]["GPU-0"] == "NVIDIA-A10G"


def test_unknown_job_and_unreachable_server(moto_server, standin):
    proc = codsplat("status", "nope", env=env_for(moto_server, standin))
    assert proc.returncode == 5 and "No Bacalhau job carries the label codsplat-job=nope" in proc.stderr
    proc = codsplat("status", "nope", env={"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": "9"})
    assert proc.returncode == 5 and "cannot reach" in proc.stderr and "Traceback" not in proc.stderr


def test_jobspec_prints_yaml_the_api_takes(tmp_path):
    import yaml

    job = tmp_path / "scan.json"
    job.write_text(json.dumps({"version": 1, "input": "s3://codsplat-data/uploads/a.mp4", "compute": {"split_stages": True}}))
    proc = codsplat("jobspec", job)
    assert proc.returncode == 0, proc.stderr
    specs = list(yaml.safe_load_all(proc.stdout))
    assert [s["Labels"]["codsplat-stage"] for s in specs] == ["preprocess", "train", "export"]
    assert specs[1]["Tasks"][0]["InputSources"][0]["Source"]["Params"]["Key"] == specs[0]["Tasks"][0]["Publisher"]["Params"]["Key"]
    assert [r["Name"] for r in specs[0]["Tasks"][0]["ResultPaths"]] == ["frames", "sfm"]
    assert specs[1]["Tasks"][0]["Resources"] == {"CPU": "3", "Memory": "12gb", "Disk": "60gb", "GPU": "1"}  # a g5.xlarge holds it
    proc = codsplat("jobspec", job, "--stage", "all")
    assert proc.returncode == 2 and "--stage must be one of preprocess, train, export" in proc.stderr
