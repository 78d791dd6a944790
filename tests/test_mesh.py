"""export.mesh: a coloured triangle mesh from the splat (pipeline/mesh.py), on a scene whose surface is
known (flat Gaussians on a unit sphere, made here) and on the sample run, through `codsplat run --mesh`."""

import json

import numpy as np
import pytest
import torch

from codsplat.pipeline import mesh
from codsplat.pipeline import splats as splat_io
from codsplat.pipeline.scene import View
from conftest import SAMPLE, codsplat
from test_train import look_at

SIDE = 120


def sphere_splat(n: int = 12000, seed: int = 0):
    """Flat Gaussians tangent to the unit sphere, coloured by height (red at the top, blue below)."""
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    colors = np.where(normals[:, 1:2] < 0, [[0.9, 0.1, 0.1]], [[0.1, 0.1, 0.9]])  # +y is down: y < 0 is the top
    params = splat_io.init_from_points(normals, colors, 0, 0.95, seed, init_scale=1.5)
    n_ = torch.tensor(normals, dtype=torch.float32)
    q = torch.stack([1 + n_[:, 2], -n_[:, 1], n_[:, 0], torch.zeros(n)], 1)  # turns +z onto the normal
    params["quats"] = q / q.norm(dim=1, keepdim=True)
    params["scales"][:, 2] = float(np.log(0.005))
    return params, normals


def views_around(count_per_ring: int = 8, side: int = SIDE):
    K = torch.tensor([[side * 1.2, 0, side / 2], [0, side * 1.2, side / 2], [0, 0, 1.0]])
    out = []
    for ring, elevation in enumerate((-0.5, 0.3, 1.2)):
        for k, azimuth in enumerate(np.linspace(0, 2 * np.pi, count_per_ring, endpoint=False)):
            centre = 3.5 * np.array([np.cos(azimuth) * np.cos(elevation), np.sin(elevation), np.sin(azimuth) * np.cos(elevation)])
            out.append(View(f"r{ring}v{k}.png", torch.zeros(side, side, 3), K, look_at(centre)))
    return out


def test_a_sphere_of_flat_gaussians_gives_a_coloured_mesh_on_the_sphere():
    params, points = sphere_splat()
    built = mesh.build(params, 0, views_around(), points, resolution=96)
    radius = np.linalg.norm(built.vertices, axis=1)
    assert abs(np.median(radius) - 1) < 0.04 and np.percentile(np.abs(radius - 1), 95) < 0.06, np.percentile(radius, [5, 50, 95])
    agreement = mesh.agreement(built, points, 0.01 * mesh.extent(points))
    assert agreement["points_on_mesh"] > 0.9 and agreement["mesh_near_points"] > 0.4, agreement
    top = built.vertices[:, 1] < -0.5  # colours come from the views: red on top, blue below
    rgb = built.visual.vertex_colors[:, :3].astype(float)
    assert rgb[top, 0].mean() > 150 > rgb[top, 2].mean() and rgb[built.vertices[:, 1] > 0.5, 2].mean() > 150
    assert built.is_winding_consistent


def test_nothing_seen_gives_no_mesh_rather_than_an_empty_file():
    params, points = sphere_splat(n=500)
    outwards = torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0])) @ look_at(np.array([4.0, 0.0, 0.0]))  # the sphere behind it
    view = views_around(1)[0]
    assert mesh.build(params, 0, [View("away.png", view.image, view.K, outwards)], points, resolution=48) is None


def test_run_with_mesh_writes_ply_and_glb_in_the_export_stage_only(tiny_copy):
    """`codsplat run --mesh` on the finished sample: only export runs again; mesh.ply and mesh.glb open in
    trimesh with their colours, and metrics.json says how they agree with the SfM points."""
    import trimesh

    proc = codsplat("run", SAMPLE, "--preset", "tiny", "--out", tiny_copy, "--mesh", "--json")
    assert proc.returncode == 0, proc.stderr
    stages = json.loads(proc.stdout)["stages"]
    assert {name: s["skipped"] for name, s in stages.items()} == {"frames": True, "sfm": True, "train": True, "export": False}
    metrics = json.loads((tiny_copy / "export" / "metrics.json").read_text())
    stats = metrics["mesh"]
    print("sample mesh:", stats)
    assert stats["faces"] > 1000 and stats["points_on_mesh"] > 0.3, stats
    assert {"mesh_ply", "mesh_glb"} <= set(metrics["files"])
    for name in ("mesh.ply", "mesh.glb"):
        loaded = trimesh.load(tiny_copy / "export" / name, force="mesh")
        assert len(loaded.faces) == stats["faces"] and loaded.visual.kind == "vertex"


@pytest.mark.parametrize("value", [16, 1024, "fine"])
def test_a_mesh_resolution_out_of_bounds_is_refused_naming_the_field(tmp_path, value):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"export": {"mesh": True, "mesh_resolution": value}}))
    proc = codsplat("run", SAMPLE, "--config", cfg, "--out", tmp_path / "w")
    assert proc.returncode == 2 and "export.mesh_resolution" in proc.stderr and "Traceback" not in proc.stderr
