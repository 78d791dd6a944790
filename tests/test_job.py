"""The job document: schema in sync with the model, safety rules, and a corpus of bad documents."""

import json
from pathlib import Path

import pytest
import yaml

from codsplat.orchestrator.job import SCHEMA_PATH, json_schema, job_id_from_key, parse_job
from codsplat.orchestrator.settings import Settings
from codsplat.pipeline.config import merge
from codsplat.pipeline.errors import InputError
from conftest import codsplat

POLICY = Settings().policy  # the defaults live in Settings alone
BASE = {"version": 1, "input": "s3://codsplat-data/uploads/u/scan.mp4"}
CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "bad_jobs.yaml").read_text())


def test_schema_file_is_in_sync_with_the_model():
    """`python -m codsplat.orchestrator.job` regenerates it; this fails when someone forgets."""
    assert json.loads(SCHEMA_PATH.read_text()) == json.loads(json.dumps(json_schema()))


def test_schema_validates_a_document_like_the_model(tmp_path):
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate({**BASE, "train": {"steps": 500}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**BASE, "train": {"steps": 5}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**BASE, "compute": {"image": "x"}}, schema)


def test_corpus_has_at_least_forty_documents():
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_bad_document_is_rejected_with_path_and_message(case):
    doc = case["doc"] if case.get("raw") else merge(BASE, case["doc"])
    with pytest.raises(InputError) as info:
        parse_job(doc, POLICY, default_id="scan")
    for expected in case["expect"]:
        assert expected in info.value.message, info.value.message


def test_good_document_is_normalised_with_defaults_and_preset():
    job = parse_job({**BASE, "preset": "fast", "train": {"steps": 9000}, "notify": {"email": ["a@b.co"]}},
                    POLICY, default_id="scan")
    assert job.id == "scan" and job.train.steps == 9000 and job.frames.max == 150  # preset under the user's keys
    assert job.compute.backend == "auto" and job.compute.gpus == 1
    assert str(job.output_uri(POLICY)) == "s3://codsplat-data/results/scan/"
    assert set(job.pipeline_settings()) == {"preset", "frames", "sfm", "train", "export"}


def test_policy_comes_from_the_deployment_not_the_job():
    strict = Settings(bucket="team-a", input_prefixes=["in/"], output_prefix="out/", max_gpus=1).policy
    with pytest.raises(InputError, match="bucket 'codsplat-data' is not allowed; use s3://team-a/"):
        parse_job(BASE, strict, default_id="scan")
    job = parse_job({"version": 1, "input": "s3://team-a/in/x/", "compute": {"gpus": 1}}, strict, default_id="scan")
    assert job.input_uri.is_prefix and str(job.output_uri(strict)) == "s3://team-a/out/scan/"


def test_default_ids_from_file_names():
    assert job_id_from_key("jobs/alice/Kitchen Scan (2).json") == "kitchen-scan-2"
    assert job_id_from_key("jobs/x.json") == "job-x"


def test_validate_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**BASE, "preset": "tiny"}))
    proc = codsplat("validate", good)
    assert proc.returncode == 0, proc.stderr
    tiny = json.loads((Path(__file__).parents[1] / "pipeline" / "presets" / "tiny.json").read_text())
    assert json.loads(proc.stdout)["train"]["steps"] == tiny["train"]["steps"]  # the preset, layered on the defaults
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**BASE, "train": {"steps": 5}, "compute": {"image": "x"}}))
    proc = codsplat("validate", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.steps: must be ≥ 100, got 5" in proc.stderr and "compute.image: not allowed" in proc.stderr


def test_every_sagemaker_instance_a_job_may_ask_for_has_a_gpu_the_image_is_built_for():
    """gsplat's kernels run only on the compute capabilities the CUDA image compiles (TORCH_CUDA_ARCH_LIST):
    an instance family outside them would fail at the first training step, after the job was paid for."""
    import re

    from codsplat.orchestrator.settings import GPU_COMPUTE_CAPABILITY, SAGEMAKER_GPU_INSTANCES

    dockerfile = (Path(__file__).resolve().parents[1] / "container" / "Dockerfile").read_text()
    built = set(re.search(r'TORCH_CUDA_ARCH_LIST="([0-9.;]+)"', dockerfile)[1].split(";"))
    families = {name.split(".")[1] for name in SAGEMAKER_GPU_INSTANCES}
    assert families <= set(GPU_COMPUTE_CAPABILITY), families - set(GPU_COMPUTE_CAPABILITY)
    assert {f: GPU_COMPUTE_CAPABILITY[f] for f in families if GPU_COMPUTE_CAPABILITY[f] not in built} == {}
    policy = Settings(max_gpus=8).policy
    with pytest.raises(InputError, match=r"compute\.sagemaker_instance_type"):
        parse_job({"version": 1, "id": "v100", "input": "s3://codsplat-data/uploads/a.mp4",
                   "compute": {"sagemaker_instance_type": "ml.p3.2xlarge"}}, policy)
