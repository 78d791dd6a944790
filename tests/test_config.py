"""Settings: presets, layering, and every error reported at once with its path."""

import json

import pytest

from codsplat.pipeline.config import PipelineConfig, build_config, load_pipeline_config
from codsplat.pipeline.errors import InputError


def problems(settings, preset=None) -> str:
    with pytest.raises(InputError) as info:
        build_config(settings, preset)
    return info.value.message


def test_defaults_presets_and_user_keys_layer_in_that_order():
    assert build_config({}).train.steps == 30000
    tiny = build_config({}, "tiny")
    assert tiny.train.steps == 1200 and tiny.frames.max == 40 and tiny.preset == "tiny"
    mine = build_config({"preset": "tiny", "train": {"steps": 250}})
    assert mine.train.steps == 250 and mine.train.max_side == 80  # preset kept for the other keys


def test_every_error_is_reported_with_its_path():
    msg = problems({"train": {"steps": 5, "sh_degree": 7}, "frames": {"max_side": "big"}})
    assert "3 problems" in msg
    assert "train.steps: must be ≥ 100, got 5" in msg
    assert "train.sh_degree: must be ≤ 3, got 7" in msg
    assert 'frames.max_side: must be an integer, got "big"' in msg


def test_unknown_keys_name_the_closest_valid_one():
    assert "train.stepz: unknown key; did you mean 'steps'?" in problems({"train": {"stepz": 100}})
    assert "trian: unknown key; did you mean 'train'?" in problems({"trian": {}})


def test_types_are_real_types():
    assert "sfm.loop_detection: must be true or false" in problems({"sfm": {"loop_detection": "true"}})
    assert "train.steps: must be an integer" in problems({"train": {"steps": "1000"}})
    assert build_config({"train": {"ssim_lambda": 0}}).train.ssim_lambda == 0.0  # an int is a fine number


def test_choices_and_cross_field_rules():
    assert "must be one of" in problems({"sfm": {"matcher": "fuzzy"}})
    assert "frames.stop (1.0) must be after frames.start (2.0)" in problems({"frames": {"start": 2.0, "stop": 1.0}})
    assert "preset: must be one of tiny, fast, quality" in problems({}, "huge")


def test_files_json_yaml_and_job_documents(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 300\n")
    assert load_pipeline_config(tmp_path / "a.yaml").train.steps == 300
    (tmp_path / "job.json").write_text(json.dumps({"version": 1, "input": "s3://b/k.mp4", "train": {"steps": 200}}))
    assert load_pipeline_config(tmp_path / "job.json").train.steps == 200
    (tmp_path / "bad.json").write_text('{"train": {"steps": 100,}}')
    with pytest.raises(InputError, match=r"bad.json is not valid JSON: .* line 1"):
        load_pipeline_config(tmp_path / "bad.json")
    with pytest.raises(InputError, match="does not exist"):
        load_pipeline_config(tmp_path / "missing.json")


def test_each_stage_section_is_separate_for_fingerprints():
    cfg = PipelineConfig()
    assert set(cfg.section("export")) == {"formats", "min_psnr", "previews", "mesh", "mesh_resolution"}


@pytest.mark.parametrize("text", [
    '{"version": 1, "train": {"x": [' + ",".join(["0"] * 20_000) + ']}}',  # a flat list, inside a section
    '{"notify": {"email": [' + ",".join(['{"a": [0, 0]}'] * 4_000) + ']}}',  # objects inside a list
], ids=["list", "objects-in-a-list"])
def test_a_document_is_bounded_by_the_values_its_lists_hold(text):
    """The value bound walks lists as it walks objects: a list of 20,000 values fits in 64 KiB."""
    from codsplat.pipeline.config import parse_document

    with pytest.raises(InputError, match=r"expands to more than 10,000 values"):
        parse_document(text.encode(), "jobs/big-list.json")


def test_yaml_aliases_are_counted_each_time_they_are_used():
    from codsplat.pipeline.config import parse_document

    laughs = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(4))
    with pytest.raises(InputError, match=r"expands to more than"):
        parse_document(laughs.encode(), "settings.yaml", yaml_ok=True)


def test_the_document_bounds_hold_at_their_edges_and_name_themselves():
    """At most 16 levels and 10,000 values pass, one more of either does not; brackets inside strings
    are text, not nesting; a document over 64 KiB is refused naming the bound in whole KiB."""
    from codsplat.pipeline.config import MAX_DEPTH, MAX_NODES, parse_document

    def nested(levels):
        return ('{"a": ' * levels + "0" + "}" * levels).encode()

    assert parse_document(nested(MAX_DEPTH), "deep.json")
    with pytest.raises(InputError, match=rf"deep.json nests {MAX_DEPTH + 1} levels deep; a document nests at most {MAX_DEPTH}\."):
        parse_document(nested(MAX_DEPTH + 1), "deep.json")
    assert parse_document(json.dumps({"note": "[[[[{{{{" * 10}).encode(), "text.json")["note"].startswith("[[[[")

    def values(n):  # the object, its list, and n - 2 numbers
        return json.dumps({"a": [0] * (n - 2)}).encode()

    assert parse_document(values(MAX_NODES), "many.json")
    with pytest.raises(InputError, match=r"many.json expands to more than 10,000 values;"):
        parse_document(values(MAX_NODES + 1), "many.json")
    last = json.dumps({"a": [0] * (MAX_NODES - 3), "b": [0]}).encode()  # the 10,000th value holds the 10,001st
    with pytest.raises(InputError, match=r"many.json expands to more than 10,000 values;"):
        parse_document(last, "many.json")
    with pytest.raises(InputError, match=r"big.json is 70,000 bytes; a document may be at most 64 KiB\.$"):
        parse_document(b" " * 70_000, "big.json")
    assert parse_document(b"{}" + b" " * (64 * 1024 - 2), "full.json") == {}  # exactly 64 KiB
    with pytest.raises(InputError, match=r"is 65,537 bytes"):
        parse_document(b"{}" + b" " * (64 * 1024 - 1), "full.json")


def test_a_larger_document_s_value_bound_grows_with_its_size_bound():
    """transforms.json may be 16 MiB and hold thousands of frames: its value bound is its size bound
    over 16, not the job document's 10,000 (which once capped every document, whatever its size)."""
    from codsplat.pipeline.config import parse_document

    frames = json.dumps({"frames": [{"file_path": f"f{i}.jpg", "m": [0] * 6} for i in range(3_000)]}).encode()
    assert len(parse_document(frames, "transforms.json", max_bytes=16 * 2**20)["frames"]) == 3_000
    with pytest.raises(InputError, match=r"transforms.json expands to more than 20,480 values;"):
        parse_document(json.dumps({"a": [0] * 30_000}).encode(), "transforms.json", max_bytes=320 * 1024)


def test_one_problem_is_called_one_problem():
    with pytest.raises(InputError, match=r"^The settings have 1 problem: "):
        build_config({"train": {"steps": -1}})
    with pytest.raises(InputError, match=r"^The settings have 2 problems: "):
        build_config({"train": {"steps": -1, "sh_degree": 9}})


def test_a_given_starting_scale_is_used_and_the_strategy_s_otherwise():
    from codsplat.pipeline.config import STRATEGY_START, TrainConfig

    assert TrainConfig().start == STRATEGY_START[TrainConfig().strategy]
    assert TrainConfig(init_scale=0.5).start == (STRATEGY_START[TrainConfig().strategy][0], 0.5)
    assert TrainConfig(init_opacity=0.3).start[0] == 0.3


def test_escaped_quotes_do_not_end_a_string_for_the_nesting_bound():
    from codsplat.pipeline.config import parse_document

    text = json.dumps({"note": 'say \\"' + "[{" * 20 + '\\" and more ' + "}]" * 20})
    assert parse_document(text.encode(), "quoted.json")["note"].startswith('say \\"[{')


@pytest.mark.parametrize("marker", [{"input": "clip.mp4"}, {"output": "out/"}, {"version": 1}])
def test_a_job_document_given_as_settings_lends_its_pipeline_sections(tmp_path, marker):
    """`codsplat run --config job.json`: any one of a job document's own keys marks it as one."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**marker, "notify": {"email": ["a@b.co"]}, "train": {"steps": 777}}))
    assert load_pipeline_config(path).train.steps == 777


@pytest.mark.parametrize("frames,valid", [({"start": 2.0}, True), ({"stop": 5.0}, True), ({"start": 1.0, "stop": 4.0}, True),
                                          ({"start": 5.0, "stop": 3.0}, False), ({"start": 3.0, "stop": 3.0}, False)])
def test_a_frame_range_needs_its_stop_after_its_start_only_when_both_are_given(frames, valid):
    if valid:
        assert build_config({"frames": frames}).frames.start == frames.get("start", build_config({}).frames.start)
    else:
        with pytest.raises(InputError, match="frames"):
            build_config({"frames": frames})


def test_yaml_nested_by_indentation_past_the_parser_s_stack_is_refused_not_a_crash():
    """Block style nests without brackets (`- - - … 1`): 5,000 levels in 10 kB overflow the YAML
    parser's recursion, which is refused like any document nested too deeply."""
    from codsplat.pipeline.config import parse_document

    with pytest.raises(InputError, match=r"settings.yaml nests too deeply; a document nests at most 16 levels"):
        parse_document(("a:\n" + "- " * 5000 + "1\n").encode(), "settings.yaml", yaml_ok=True)


def test_a_settings_file_of_exactly_the_largest_size_is_read(tmp_path):
    from codsplat.pipeline.config import MAX_DOCUMENT_BYTES, read_document

    start, end = '{"train":', ' {"steps": 500}}'
    path = tmp_path / "full.json"
    path.write_text(start + " " * (MAX_DOCUMENT_BYTES - len(start) - len(end)) + end)
    assert path.stat().st_size == MAX_DOCUMENT_BYTES and read_document(path)["train"]["steps"] == 500
    path.write_text(start + " " * (MAX_DOCUMENT_BYTES + 1 - len(start) - len(end)) + end)
    with pytest.raises(InputError, match=r"is 65,537 bytes; a document may be at most 64 KiB"):
        read_document(path)
