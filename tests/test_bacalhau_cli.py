"""`codsplat jobspec | submit | status | logs` as a user runs them, against the stand-in and moto."""

import json

import httpx
import yaml

from conftest import QUICK, codsplat


def env_for(moto_server, standin):
    port = standin.url.rsplit(":", 1)[1]
    return {"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": port, "CODSPLAT_S3_ENDPOINT": moto_server.url}


def test_jobspec_prints_yaml_the_api_takes(tmp_path):
    job = tmp_path / "scan.json"
    job.write_text(json.dumps({"version": 1, "input": "s3://codsplat-data/uploads/a.mp4", "compute": {"split_stages": True}}))
    proc = codsplat("jobspec", job)
    assert proc.returncode == 0, proc.stderr
    specs = list(yaml.safe_load_all(proc.stdout))
    assert [s["Labels"]["codsplat-stage"] for s in specs] == ["preprocess", "train", "export"]
    assert specs[1]["Tasks"][0]["InputSources"][0]["Source"]["Params"]["Key"] == specs[0]["Tasks"][0]["Publisher"]["Params"]["Key"]
    proc = codsplat("jobspec", job, "--stage", "all")
    assert proc.returncode == 2 and "--stage must be one of preprocess, train, export" in proc.stderr


def test_submit_status_and_logs(tmp_path, s3, moto_server, standin, sample_video):
    s3.upload_file(str(sample_video), "codsplat-data", "uploads/cli/scan.mp4")
    job = tmp_path / "cli-scan.json"
    job.write_text(json.dumps({"version": 1, "input": "s3://codsplat-data/uploads/cli/scan.mp4", "preset": "tiny", **QUICK}))
    env = env_for(moto_server, standin)
    proc = codsplat("submit", job, "--backend", "bacalhau", "--poll", "0.2", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["output"] == "s3://codsplat-data/results/cli-scan/" and result["attempts"][0]["state"] == "Completed"
    proc = codsplat("status", "cli-scan", env=env)
    assert proc.returncode == 0 and "codsplat-cli-scan-all-a1" in proc.stdout and "Completed" in proc.stdout
    proc = codsplat("logs", "cli-scan", env=env)
    assert proc.returncode == 0 and '"stage": "export"' in proc.stdout  # the entrypoint's own progress lines


def test_submit_when_no_gpu_node(tmp_path, s3, moto_server, standin):
    httpx.post(f"{standin.url}/standin/knobs", json={"gpu_nodes": 0})
    job = tmp_path / "nogpu.json"
    job.write_text(json.dumps({"version": 1, "input": "s3://codsplat-data/uploads/cli/scan.mp4"}))
    proc = codsplat("submit", job, env=env_for(moto_server, standin))
    assert proc.returncode == 6 and "cannot run on Bacalhau: no Bacalhau node has 1 GPU" in proc.stderr


def test_status_of_unknown_job_and_unreachable_server(moto_server, standin):
    proc = codsplat("status", "nope", env=env_for(moto_server, standin))
    assert proc.returncode == 5 and "No Bacalhau job carries the label codsplat-job=nope" in proc.stderr
    proc = codsplat("status", "nope", env={"BACALHAU_API_HOST": "127.0.0.1", "BACALHAU_API_PORT": "9"})
    assert proc.returncode == 5 and "cannot reach" in proc.stderr and "Traceback" not in proc.stderr
