"""What makes a re-run skip a stage, and what a stage leaves behind, with stand-in stage functions:
a stage is skipped only when what it read, its settings and its outputs are all as they were; a
stage that dies leaves nothing that looks finished; progress and memory are reported as they go."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from types import SimpleNamespace

import pytest

from codsplat.pipeline import stages
from codsplat.pipeline.config import build_config
from codsplat.pipeline.contract import MANIFEST, PROGRESS, RUN_LOG, STAGES
from codsplat.pipeline.errors import InputError
from codsplat.pipeline.stages import (PeakMemory, ProgressFile, RunSummary, StageContext, fingerprint, hash_path,
                                      process_peak_rss, run_stage)


def stage(name: str, *files: str, stats: dict | None = None, calls: list | None = None):
    """A stand-in for stage `name`: writes `files` into its folder and returns `stats`."""
    def fn(ctx):
        for rel in files:
            path = ctx.dir(name) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rel)
        if calls is not None:
            calls.append(name)
        return dict(stats or {})
    return fn


@pytest.fixture
def ctx(tmp_path):
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"frames")
    return StageContext(tmp_path / "work", build_config({}, "tiny"), input=media)


def test_a_stage_that_ran_leaves_a_manifest_of_what_it_did(ctx):
    result = run_stage("frames", stage("frames", "a.png", "sub/b.png", stats={"kept": 2}), ctx)
    manifest = json.loads((ctx.dir("frames") / MANIFEST).read_text())
    assert result.manifest == manifest and not result.skipped
    assert manifest["stage"] == "frames" and manifest["stats"] == {"kept": 2}
    assert manifest["fingerprint"] == fingerprint(ctx, "frames")
    assert manifest["settings"] == ctx.config.section("frames")
    assert manifest["outputs"] == ["a.png", "sub/b.png"]  # every file it wrote, not its own manifest
    assert 0 <= manifest["seconds"] < 60 and manifest["peak_gpu_mb"] is None  # the stage's own time, not a clock reading
    assert 0 < manifest["peak_rss_mb"] <= manifest["process_peak_rss_mb"] + 1
    assert manifest["process_peak_rss_mb"] <= process_peak_rss() / 2**20 + 1  # in MB, as high as the process has been
    assert not list(ctx.dir("frames").glob("*.tmp"))
    logged = [json.loads(line) for line in (ctx.work / RUN_LOG).read_text().splitlines()]
    assert logged == [{"stage": "frames", "fingerprint": manifest["fingerprint"], "finished_at": manifest["finished_at"],
                       "seconds": manifest["seconds"]}]


def test_a_stage_is_skipped_only_while_its_input_settings_and_outputs_are_unchanged(ctx):
    calls: list[str] = []
    frames, sfm = stage("frames", "a.png", calls=calls), stage("sfm", "model.bin", calls=calls)
    for name, fn in (("frames", frames), ("sfm", sfm)):
        run_stage(name, fn, ctx)
    assert [run_stage(n, f, ctx).skipped for n, f in (("frames", frames), ("sfm", sfm))] == [True, True]
    assert calls == ["frames", "sfm"]
    assert len((ctx.work / RUN_LOG).read_text().splitlines()) == 2  # a skip is not an execution

    assert not run_stage("sfm", sfm, ctx, force=True).skipped and calls[-1] == "sfm"

    ctx.input.write_bytes(b"other frames")  # what the first stage read changed: both run again
    assert [run_stage(n, f, ctx).skipped for n, f in (("frames", frames), ("sfm", sfm))] == [False, False]

    ctx.config = build_config({"sfm": {"max_features": 1024}}, "tiny")  # only the second's settings changed
    assert [run_stage(n, f, ctx).skipped for n, f in (("frames", frames), ("sfm", sfm))] == [True, False]
    assert calls == ["frames", "sfm", "sfm", "frames", "sfm", "sfm"]


def test_a_stage_whose_output_went_missing_or_whose_manifest_was_edited_runs_again(ctx):
    calls: list[str] = []
    frames = stage("frames", "a.png", "b.png", calls=calls)
    run_stage("frames", frames, ctx)
    (ctx.dir("frames") / "b.png").unlink()
    assert not run_stage("frames", frames, ctx).skipped and (ctx.dir("frames") / "b.png").is_file()
    path = ctx.dir("frames") / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "fingerprint": "0" * 64}))
    assert not run_stage("frames", frames, ctx).skipped and len(calls) == 3


def test_a_stage_that_dies_leaves_no_manifest_even_where_an_older_one_was(ctx):
    run_stage("frames", stage("frames", "a.png"), ctx)
    ctx.input.write_bytes(b"changed")

    def dies(c):
        (c.dir("frames") / "half.png").write_text("half")
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        run_stage("frames", dies, ctx)
    assert not (ctx.dir("frames") / MANIFEST).exists()
    assert len((ctx.work / RUN_LOG).read_text().splitlines()) == 1


def test_a_stage_names_the_earlier_stage_it_needs_and_the_run_that_makes_it(ctx):
    with pytest.raises(InputError) as caught:
        run_stage("train", stage("train", "splats.pt"), ctx)
    assert "The sfm stage has not run" in str(caught.value) and "--stage preprocess" in caught.value.hint
    with pytest.raises(InputError) as caught:
        ctx.manifest("train")
    assert "--stage train" in caught.value.hint
    ctx.input = None
    with pytest.raises(InputError, match="needs an INPUT"):
        fingerprint(ctx, "frames")


def test_content_hashes_see_names_and_bytes_but_not_links(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"A" * 3_000_000)  # past one read's chunk
    (folder / "sub" / "b.jpg").write_bytes(b"B")
    first = hash_path(folder)
    assert hash_path(folder) == first and len(first) == 64
    (folder / "link.jpg").symlink_to(folder / "a.jpg")
    (folder / "sublink").symlink_to(folder / "sub")
    assert hash_path(folder) == first  # links are not read by ingest, so they change nothing
    (folder / "sub" / "b.jpg").rename(folder / "sub" / "c.jpg")
    renamed = hash_path(folder)
    assert renamed != first
    (folder / "a.jpg").write_bytes(b"A" * 2_999_999 + b"a")
    assert hash_path(folder) != renamed
    assert hash_path(folder / "a.jpg") != hash_path(folder / "sub" / "c.jpg")
    here = hash_path(folder)
    folder.rename(tmp_path / "renamed")
    assert hash_path(tmp_path / "renamed") == here  # a folder's hash is of what is in it, whatever it is called
    (tmp_path / "renamed").rename(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.jpg").write_bytes(b"A" * 2_999_999 + b"a")
    assert hash_path(tmp_path / "other" / "a.jpg") == hash_path(folder / "a.jpg")  # a file: its name and bytes
    (tmp_path / "other" / "a.jpg").rename(tmp_path / "other" / "b.jpg")
    assert hash_path(tmp_path / "other" / "b.jpg") != hash_path(folder / "a.jpg")


def test_a_fingerprint_does_not_depend_on_the_order_keys_are_listed():
    assert stages.hash_json({"a": 1, "b": {"c": 2, "d": 3}}) == stages.hash_json({"b": {"d": 3, "c": 2}, "a": 1})
    assert stages.hash_json({"a": 1}) != stages.hash_json({"a": 2})


def test_progress_is_written_whole_at_most_once_a_period_and_always_at_a_stage_s_end(tmp_path):
    progress = ProgressFile(tmp_path, STAGES, every=60)
    report = progress.reporter("sfm")
    report(0.25, "matching")
    body = json.loads((tmp_path / PROGRESS).read_text())
    assert body["stage"] == "sfm" and body["stage_fraction"] == 0.25 and body["note"] == "matching"
    assert body["fraction"] == pytest.approx((1 + 0.25) / 4) and body["at"].endswith("+00:00")
    report(0.5, "mapping")  # within the period: not written
    assert json.loads((tmp_path / PROGRESS).read_text())["note"] == "matching"
    report(1.0, "done")  # a stage's end always is
    assert json.loads((tmp_path / PROGRESS).read_text())["fraction"] == 0.5
    progress.reporter("export")(1.0, "3 files")
    assert json.loads((tmp_path / PROGRESS).read_text())["fraction"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROGRESS]

    often = ProgressFile(tmp_path, STAGES, every=0.05)
    often.reporter("frames")(0.1, "a")
    time.sleep(0.1)
    often.reporter("frames")(0.2, "b")
    assert json.loads((tmp_path / PROGRESS).read_text())["note"] == "b"


def test_peak_memory_sees_a_block_s_own_peak_and_the_process_its_high_water_mark():
    with PeakMemory(interval=0.01) as before:
        time.sleep(0.05)
    with PeakMemory(interval=0.01) as during:
        block = bytearray(200 * 2**20)  # touched: resident
        block[:: 4096] = b"x" * len(block[:: 4096])
        time.sleep(0.1)
        del block
    assert during.peak - before.peak > 150 * 2**20
    assert process_peak_rss() >= during.peak - 2**20  # the kernel's high-water mark holds the peak since


def test_a_run_summary_reads_a_stage_from_its_results_or_else_from_its_folder(ctx):
    ran = run_stage("frames", stage("frames", "a.png", stats={"kept": 1}), ctx)
    summary = RunSummary(ctx.work, [ran])
    assert summary.manifest("frames") is ran.manifest
    other = RunSummary(ctx.work)
    assert other.manifest("frames") == ran.manifest and other.manifest("sfm") is None
    assert os.path.isdir(ctx.work)


def test_where_proc_cannot_be_read_the_peak_comes_from_getrusage(monkeypatch):
    class Unreadable:
        def __init__(self, path):
            pass

        def read_text(self):
            raise PermissionError("/proc is not mounted here")

    monkeypatch.setattr(stages, "Path", Unreadable)
    assert process_peak_rss() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class FakeCuda:
    """What a stage reads of torch.cuda on a GPU machine: its peak since the last reset."""

    def __init__(self):
        self.resets = 0

    def is_available(self):
        return True

    def reset_peak_memory_stats(self):
        self.resets += 1

    def max_memory_allocated(self):
        return 3 * 2**20 if self.resets else 99 * 2**20  # the peak of an earlier stage, until reset


def test_a_stage_that_trained_on_a_gpu_records_its_own_gpu_peak(ctx, monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    manifest = run_stage("frames", stage("frames", "a.png"), ctx).manifest
    assert manifest["peak_gpu_mb"] == 3.0 and cuda.resets == 1
    monkeypatch.setattr(cuda, "is_available", lambda: False)  # torch loaded, no GPU
    assert run_stage("frames", stage("frames", "a.png"), ctx, force=True).manifest["peak_gpu_mb"] is None
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # a stage that never loaded torch does not load it to ask
    assert run_stage("frames", stage("frames", "a.png"), ctx, force=True).manifest["peak_gpu_mb"] is None
    assert "torch" not in sys.modules
