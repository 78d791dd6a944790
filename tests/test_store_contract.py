"""The store's contract on the embedded SQLite store: the same checks DynamoDB Local runs
(tests/dynamo_checks.py), for what both stores promise alike. A conditional write that changed no row
is a conflict, or two daemons would both believe they hold a job and run it twice."""

import pytest

from codsplat.orchestrator.records import SQLiteStore
from dynamo_checks import (test_a_change_from_the_callers_copy_reads_only_when_it_is_stale,  # noqa: F401
                           test_a_move_to_where_a_record_is_already_is_a_no_op_and_a_move_back_is_refused,
                           test_a_move_through_states_in_one_write_records_each_of_them,
                           test_a_damaged_record_is_left_out_of_a_listing_and_the_rest_is_listed,
                           test_a_cancel_is_a_top_level_attribute_the_state_machine_can_read,
                           test_a_claim_made_on_a_stale_copy_reads_the_record_again_and_judges_it_again,
                           test_a_stale_write_is_refused, test_concurrent_writers_lose_nothing,
                           test_conditional_create_is_idempotent, test_list_since_reads_only_recent_records,
                           test_transitions_bump_the_version_and_keep_history)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return SQLiteStore(tmp_path_factory.mktemp("store") / "codsplat.db")


def test_a_success_result_carries_what_the_worker_reported():
    """What a succeeded record shows its user (console, message): every file the worker wrote with
    the reports beside them, its metrics, each stage's time and the device, the wall time and cost."""
    from codsplat.orchestrator.records import EXPORT_FILES, success_result
    from codsplat.orchestrator.settings import Settings

    summary = {"files": ["splat.ply", "mesh.glb"], "psnr": 27.5, "ssim": 0.91, "gaussians": 48_000,
               "stages": {"sfm": 30.0, "train": 600.0}, "device": "cuda"}
    settings = Settings()
    result = success_result(summary, "results/j/export/", "2026-01-01T00:00:00+00:00", "2026-01-01T00:12:30+00:00", 2, settings)
    assert result["outputs"] == [f"results/j/export/{f}" for f in ("splat.ply", "mesh.glb", *EXPORT_FILES)]
    assert result["metrics"] == {"psnr": 27.5, "ssim": 0.91, "gaussians": 48_000}
    assert result["stage_seconds"] == {"sfm": 30.0, "train": 600.0} and result["device"] == "cuda"
    assert result["wall_seconds"] == 750.0 and result["gpu_seconds"] == 1200.0 and result["cpu_seconds"] == 30.0
    assert result["estimated_cost_usd"] == round(1200 / 3600 * settings.gpu_hour_usd + 30 / 3600 * settings.cpu_hour_usd, 4)
    empty = success_result({}, "results/j/export/", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00", 1, settings)
    assert empty["outputs"] == [] and empty["stage_seconds"] == {} and empty["gpu_seconds"] == 0.0


def test_the_embedded_store_makes_the_folders_its_file_goes_in(tmp_path):
    from codsplat.orchestrator.records import JobRecord

    store = SQLiteStore(tmp_path / "new" / "state" / "codsplat.db")
    assert store.create(JobRecord(job_id="f1", job_key="k")) and store.get("f1").job_key == "k"
