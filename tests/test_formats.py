"""Exports are read back by third-party readers: plyfile for .ply, splat-transform for all three."""

import csv
import gzip
import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from codsplat.pipeline import formats

C0 = 0.28209479177387814  # the degree-0 SH basis constant


def cloud(n=500, sh_degree=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2 - 1
    return {
        "means": (torch.rand(n, 3, generator=g) - 0.5) * 8,
        "scales": torch.rand(n, 3, generator=g) * 4 - 6,
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g) * 2,
        "sh0": torch.rand(n, 1, 3, generator=g) * 2 - 1,
        "shN": (torch.rand(n, k, 3, generator=g) - 0.5) * 0.8,
    }


def read_csv(splat_transform, path, tmp_path):
    out = tmp_path / f"{path.name}.csv"
    proc = subprocess.run([splat_transform, "-q", "-w", path, out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    return {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}


def same_rotation(q_wxyz, cols):
    a = q_wxyz / np.linalg.norm(q_wxyz, axis=1, keepdims=True)
    b = np.stack([cols[f"rot_{i}"] for i in range(4)], 1)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.abs((a * b).sum(1))  # 1 = same rotation (q and -q are one rotation)


def test_ply_has_the_standard_3dgs_layout(tmp_path):
    params = cloud(sh_degree=3)
    path = tmp_path / "s.ply"
    formats.write(params, 3, "ply", path)
    ply = PlyData.read(str(path))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names[:3] == ["x", "y", "z"] and names[3:6] == ["f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[6:51] == [f"f_rest_{i}" for i in range(45)]
    assert names[51:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert ply.text is False and ply.byte_order == "<"
    np.testing.assert_allclose(v["opacity"], params["opacities"].numpy(), rtol=0, atol=1e-6)  # logit
    np.testing.assert_allclose(v["scale_1"], params["scales"][:, 1].numpy(), atol=1e-6)  # log
    np.testing.assert_allclose(v["rot_0"], params["quats"][:, 0].numpy(), atol=1e-6)  # w first
    # f_rest runs channel by channel: all red coefficients, then green, then blue
    np.testing.assert_allclose(v["f_rest_15"], params["shN"][:, 0, 1].numpy(), atol=1e-6)


def test_ply_and_splat_read_by_splat_transform(tmp_path, splat_transform):
    params = cloud(sh_degree=1)
    for fmt in ("ply", "splat"):
        path = tmp_path / f"s.{fmt}"
        formats.write(params, 1, fmt, path)
        cols = read_csv(splat_transform, path, tmp_path)
        assert len(cols["x"]) == 500
        # .splat is re-ordered by the writer; match Gaussians by position
        order = np.lexsort((cols["z"], cols["y"], cols["x"]))
        mine = params["means"].numpy()
        ref = np.lexsort((mine[:, 2], mine[:, 1], mine[:, 0]))
        np.testing.assert_allclose(cols["x"][order], mine[ref, 0], atol=1e-5)
        np.testing.assert_allclose(cols["scale_0"][order], params["scales"][ref, 0].numpy(), atol=1e-4)
        # .splat stores colour, opacity and each quaternion component in a byte: under one step off
        # (gsplat's writer truncates)
        byte = 1 / 255 if fmt == "splat" else 1e-6
        rotation = same_rotation(params["quats"][ref].numpy(), {k: v[order] for k, v in cols.items()})
        assert np.degrees(2 * np.arccos(np.clip(rotation, 0, 1))).max() < (0.1 if fmt == "ply" else 1.0)  # float32 round-off; 8-bit components
        sh0 = params["sh0"][ref, 0].numpy()
        for c in range(3):  # RGB = 0.5 + C0·f_dc
            np.testing.assert_allclose(0.5 + C0 * cols[f"f_dc_{c}"][order], 0.5 + C0 * sh0[:, c], atol=byte + 1e-6)
        alpha = torch.sigmoid(params["opacities"][ref]).numpy()
        np.testing.assert_allclose(1 / (1 + np.exp(-cols["opacity"][order])), alpha, atol=byte + 1e-6)


def test_spz_version_3_header(tmp_path):
    path = tmp_path / "s.spz"
    formats.write(cloud(n=7, sh_degree=2), 2, "spz", path)
    raw = gzip.decompress(path.read_bytes())
    magic, version, n, sh_degree, frac_bits, flags, reserved = struct.unpack("<IIIBBBB", raw[:16])
    assert (magic, version, n, sh_degree, frac_bits, flags, reserved) == (0x5053474E, 3, 7, 2, 12, 0, 0)
    assert len(raw) == 16 + 7 * (9 + 1 + 3 + 3 + 4 + 8 * 3)


def reference(*args: str, tmp_path=None) -> str:
    """Niantic's reference library (tests/spz_reference.mjs), as a spec-following reader/writer."""
    proc = subprocess.run(["node", str(Path(__file__).with_name("spz_reference.mjs")), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def as_reference_cloud(params, sh_degree):
    """A cloud as the reference library holds one: xyzw quaternions, SH as [point][coefficient][colour]."""
    k = (sh_degree + 1) ** 2 - 1
    q = params["quats"].numpy()
    return {"numPoints": len(q), "shDegree": sh_degree, "positions": params["means"].numpy().ravel().tolist(),
            "scales": params["scales"].numpy().ravel().tolist(),
            "rotations": np.concatenate([q[:, 1:], q[:, :1]], axis=1).ravel().tolist(),
            "alphas": params["opacities"].numpy().tolist(), "colors": params["sh0"].numpy().ravel().tolist(),
            "sh": params["shN"][:, :k].numpy().ravel().tolist()}


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_spz_is_byte_for_byte_what_the_reference_writer_writes_from_rdf(tmp_path, sh_degree):
    """The spec stores RUB; the reference writer, told the cloud is RDF (as trained, as in the .ply),
    turns it over. Ours must write the same bytes, saturated opacities (stored as 255) included."""
    params = cloud(n=400, sh_degree=sh_degree, seed=10 + sh_degree)
    params["opacities"][:20] = 9.0  # sigmoid(9) * 255 rounds to 255: saturated, as the reference stores it
    (tmp_path / "cloud.json").write_text(json.dumps(as_reference_cloud(params, sh_degree)))
    reference("write", tmp_path / "cloud.json", tmp_path / "ref.spz")
    formats.write(params, sh_degree, "spz", tmp_path / "ours.spz")
    ref, ours = (gzip.decompress((tmp_path / f).read_bytes()) for f in ("ref.spz", "ours.spz"))
    assert len(ours) == len(ref)
    diff = np.frombuffer(ours, np.uint8) != np.frombuffer(ref, np.uint8)
    assert not diff.any(), f"{diff.sum()} bytes differ, first at {np.argmax(diff)}"


def test_spz_clamps_values_a_byte_cannot_hold_as_the_reference_writer_does(tmp_path):
    """Opacities, scales, colours and SH far out of range: clamped as the reference writer clamps
    them, byte for byte (a clamp that let -1 through would wrap to 255); and rotations at the edges of
    their packing."""
    params = cloud(n=300, sh_degree=1, seed=5)
    params["opacities"][:10], params["opacities"][10:20] = -40.0, 40.0
    params["scales"][:10], params["scales"][10:20] = -30.0, 20.0
    params["sh0"][:10], params["sh0"][10:20] = -9.0, 9.0
    params["shN"][:10], params["shN"][10:20] = -4.0, 4.0
    # exact zeros (their sign bit) and two equal largest components (the magnitude at its top, 511)
    params["quats"][:4] = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 1.0]])
    (tmp_path / "cloud.json").write_text(json.dumps(as_reference_cloud(params, 1)))
    reference("write", tmp_path / "cloud.json", tmp_path / "ref.spz")
    formats.write(params, 1, "spz", tmp_path / "ours.spz")
    ref, ours = (gzip.decompress((tmp_path / f).read_bytes()) for f in ("ref.spz", "ours.spz"))
    diff = np.frombuffer(ours, np.uint8) != np.frombuffer(ref, np.uint8)
    assert len(ours) == len(ref) and not diff.any(), f"{diff.sum()} bytes differ, first at {np.argmax(diff)}"


@pytest.mark.parametrize("extent,bits", [(0.8, 12), (3_000.0, 11), (1e6, 3), (1e7, 0)])
def test_spz_keeps_as_many_fractional_bits_as_the_scene_allows(tmp_path, extent, bits):
    """24-bit positions with 12 fractional bits reach ±2,048 units; a scene within a unit keeps all
    12, a larger one fewer (one bit of headroom), none past 2^22, and the reference reader decodes
    each to within half a step. (The reference writer always keeps 12, and cannot write the large.)"""
    params = cloud(n=300, sh_degree=0, seed=5)
    params["means"] *= extent / 8
    formats.write(params, 0, "spz", tmp_path / "s.spz")
    assert gzip.decompress((tmp_path / "s.spz").read_bytes())[13] == bits
    got = np.reshape(json.loads(reference("read", tmp_path / "s.spz", "RDF"))["positions"], (-1, 3))
    means = params["means"].numpy()
    np.testing.assert_allclose(got, means, rtol=0, atol=0.5 / 2**bits + np.abs(means).max() * 2e-7)


def test_spz_clamps_positions_past_its_range_to_the_edge_on_their_side(tmp_path):
    """Past ±2^23 units nothing fits 24 bits: a far floater is kept at the edge, on its own side
    (an integer that wrapped would put it at the opposite edge)."""
    params = cloud(n=4, sh_degree=0, seed=5)
    params["means"][:] = torch.tensor([[2e7, -2e7, 1.0], [-3e7, 5e7, 2.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    formats.write(params, 0, "spz", tmp_path / "s.spz")
    got = np.reshape(json.loads(reference("read", tmp_path / "s.spz", "RDF"))["positions"], (-1, 3))
    top, bottom = 2**23 - 1, -(2**23)  # stored in RUB: y is negated on the way in and out
    np.testing.assert_array_equal(got[:2, :2], [[top, -top], [bottom, -bottom]])
    np.testing.assert_array_equal(got[2:], params["means"][2:].numpy())


def test_ply_at_a_lower_degree_than_trained_keeps_only_that_degree_s_coefficients(tmp_path):
    params = cloud(n=50, sh_degree=3)
    formats.write(params, 1, "ply", tmp_path / "s.ply")
    v = PlyData.read(str(tmp_path / "s.ply"))["vertex"]
    assert [p.name for p in v.properties if p.name.startswith("f_rest_")] == [f"f_rest_{i}" for i in range(9)]
    np.testing.assert_allclose(v["f_rest_3"], params["shN"][:, 0, 1].numpy(), atol=1e-6)  # green starts after 3 reds


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_spz_read_by_the_reference_reader_in_rdf_matches_the_ply_axes(tmp_path, sh_degree):
    params = cloud(sh_degree=sh_degree, seed=sh_degree)
    path = tmp_path / "s.spz"
    formats.write(params, sh_degree, "spz", path)
    got = json.loads(reference("read", path, "RDF"))
    p = {k: v.numpy() for k, v in params.items()}
    n, k = len(p["means"]), (sh_degree + 1) ** 2 - 1
    assert (got["numPoints"], got["shDegree"]) == (n, sh_degree)
    np.testing.assert_allclose(np.reshape(got["positions"], (n, 3)), p["means"], atol=0.5 / 4096 + 1e-6)
    np.testing.assert_allclose(np.reshape(got["scales"], (n, 3)), p["scales"], atol=1 / 32 + 1e-4)
    np.testing.assert_allclose(np.reshape(got["colors"], (n, 3)), p["sh0"][:, 0], atol=0.5 / (0.15 * 255) + 1e-4)
    sigmoid = lambda x: 1 / (1 + np.exp(-np.asarray(x, float)))  # noqa: E731
    np.testing.assert_allclose(sigmoid(got["alphas"]), sigmoid(p["opacities"]), atol=0.5 / 255 + 1e-6)
    xyzw = np.reshape(got["rotations"], (n, 4))
    assert same_rotation(p["quats"], {f"rot_{i}": xyzw[:, (i - 1) % 4] for i in range(4)}).min() > 0.998
    sh = np.reshape(got["sh"], (n, k, 3))
    for j in range(k):  # 5 bits for degree 1, 4 bits above: half a bucket, plus the 1/128 grid
        step = 8 / 128 if j < 3 else 16 / 128
        np.testing.assert_allclose(sh[:, j], p["shN"][:, j], atol=step / 2 + 1 / 128)


def test_spz_stores_rub_which_raw_readers_see_turned_over(tmp_path, splat_transform):
    """splat-transform 3.7 reads SPZ raw (no conversion): it sees the stored RUB axes, y and z of
    the .ply's negated. (The console's viewer, also a raw reader, turns .spz accordingly.)"""
    params = cloud(sh_degree=0, seed=7)
    path = tmp_path / "s.spz"
    formats.write(params, 0, "spz", path)
    cols = read_csv(splat_transform, path, tmp_path)
    means = params["means"].numpy()
    np.testing.assert_allclose(cols["x"], means[:, 0], atol=1 / 4096)
    np.testing.assert_allclose(cols["y"], -means[:, 1], atol=1 / 4096)
    np.testing.assert_allclose(cols["z"], -means[:, 2], atol=1 / 4096)


def test_the_quality_gate_passes_only_a_score_at_or_above_the_floor():
    """A splat with no score (no held-out view), a NaN score, or one below export.min_psnr is never
    exported; one at the floor is."""
    import pytest

    from codsplat.pipeline.errors import QualityError
    from codsplat.pipeline.export import quality_gate

    params = {"means": [[0.0, 0.0, 0.0]]}
    for psnr, words in ((None, "could not be scored"), (float("nan"), "could not be scored"), (14.99, "below export.min_psnr")):
        with pytest.raises(QualityError, match=words):
            quality_gate({"psnr": psnr}, params, 15.0)
    quality_gate({"psnr": 15.0}, params, 15.0)
    with pytest.raises(QualityError, match="no Gaussians"):
        quality_gate({"psnr": 30.0}, {"means": []}, 15.0)


def test_exit_4_names_the_sfm_statistics_when_the_model_is_the_weak_part():
    """Below the floor after a model that lost cameras, the advice names the model's figures and
    says training is not what fell short; after a sound model it says to train longer."""
    import pytest

    from codsplat.pipeline.errors import QualityError
    from codsplat.pipeline.export import quality_gate

    weak = {"registered_images": 13, "total_images": 24, "connected_images": 24,
            "stray_cameras_dropped": [f"IMG_{i}.jpg" for i in range(11)],
            "tries": [{"mapper": "global", "weak": "dropped 11 of 24 cameras as stray", "kept": True}]}
    sound = {"registered_images": 24, "total_images": 24, "connected_images": 24, "stray_cameras_dropped": [],
             "tries": [{"mapper": "global", "weak": None, "kept": True}]}
    with pytest.raises(QualityError) as caught:
        quality_gate({"psnr": 11.06}, {"means": [[0.0, 0.0, 0.0]]}, 15.0, weak)
    assert "placed 13 of 24 frames" in caught.value.hint and "dropped 11 cameras as stray" in caught.value.hint
    assert "after 1 mapping try" in caught.value.hint and "Train longer" not in caught.value.hint
    with pytest.raises(QualityError) as caught:
        quality_gate({"psnr": 11.06}, {"means": [[0.0, 0.0, 0.0]]}, 15.0, sound)
    assert caught.value.hint.startswith("Train longer")


@pytest.mark.parametrize("sfm,weak", [
    (None, False), ({"registered_images": 24, "total_images": 24}, False),
    ({"registered_images": 9, "total_images": 10}, False),  # 90 % placed is sound
    ({"registered_images": 17, "total_images": 20}, True),  # 85 % is not
    ({"registered_images": 24, "total_images": 24, "stray_cameras_dropped": ["IMG_3.jpg"]}, True),
    ({"registered_images": 24, "total_images": 24, "tries": [{"weak": "few points", "kept": True}]}, True),
    ({"registered_images": 24, "total_images": 24, "tries": [{"weak": "few points", "kept": False},
                                                             {"weak": None, "kept": True}]}, False),
])
def test_the_sfm_model_is_called_the_weak_part_only_on_its_own_figures(sfm, weak):
    from codsplat.pipeline.export import sfm_weakness

    said = sfm_weakness(sfm)
    assert (said is not None) == weak
    if weak:
        assert f"placed {sfm['registered_images']} of {sfm['total_images']} frames" in said


def test_a_preview_of_a_small_render_is_scaled_up_to_be_seen(tmp_path):
    from PIL import Image

    from codsplat.pipeline.export import PREVIEW_MIN_HEIGHT, side_by_side

    Image.new("RGB", (80, 50), "red").save(tmp_path / "render.png")
    Image.new("RGB", (400, 250), "blue").save(tmp_path / "photo.png")
    side_by_side(tmp_path / "render.png", tmp_path / "photo.png", tmp_path / "out.png")
    out = Image.open(tmp_path / "out.png")
    assert out.size == (80 * 5 * 2 + 8, 50 * 5 + 22) and 50 * 5 >= PREVIEW_MIN_HEIGHT  # scaled 5×: 250 px tall
    Image.new("RGB", (640, 480), "red").save(tmp_path / "render.png")
    side_by_side(tmp_path / "render.png", tmp_path / "photo.png", tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").size == (640 * 2 + 8, 480 + 22)  # tall enough already: as it is
