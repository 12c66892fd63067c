"""MMD / COV / 1-NNA on hand-made distance matrices and point sets; the run-folder callbacks; PLY/OBJ io."""

from types import SimpleNamespace

import pytest
import torch

from diffalign.core.kernels import FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.modalities.shape3d.metrics import mmd_cov, one_nna, shape_metrics
from diffalign.modalities.shape3d.testing import tiny_shape_backbone


def test_mmd_and_cov_by_hand():
    d_sr = torch.tensor([[1.0, 5.0, 9.0], [2.0, 0.5, 7.0]])  # 2 generated, 3 references
    out = mmd_cov(d_sr)
    assert out["mmd"] == pytest.approx((1.0 + 0.5 + 7.0) / 3)
    assert out["cov"] == pytest.approx(2 / 3)  # references 0 and 1 are someone's nearest, 2 is not
    collapsed = torch.tensor([[1.0, 5.0, 9.0], [1.0, 5.0, 9.0]])
    assert mmd_cov(collapsed)["cov"] == pytest.approx(1 / 3)


def test_one_nna_is_one_for_separated_sets_and_half_for_interleaved_ones():
    pos = torch.tensor([0.0, 1.0, 10.0, 11.0])  # generated near 0, references near 10
    d = (pos[:, None] - pos[None]).abs()
    assert one_nna(d[:2, :2], d[:2, 2:], d[2:, 2:]) == 1.0
    pos = torch.tensor([0.0, 10.0, 0.1, 10.1])  # each generated point has a reference twin
    d = (pos[:, None] - pos[None]).abs()
    assert one_nna(d[:2, :2], d[:2, 2:], d[2:, 2:]) == 0.0
    with pytest.raises(ValueError, match="d_sr"):
        one_nna(d[:2, :2], d[:3, 2:], d[2:, 2:])


def test_shape_metrics_on_clouds():
    from diffalign.modalities.shape3d import make_dataset

    ref = make_dataset(8, seed=41, min_points=30, max_points=40)
    same = shape_metrics(ref.points, ref.mask, ref.points, ref.mask, backend="torch")
    assert same["mmd_cd"] == 0.0 and same["cov_cd"] == 1.0
    one = ref.points[:1].expand(8, -1, -1)  # a generator that always draws the same shape
    collapsed = shape_metrics(one, ref.mask[:1].expand(8, -1), ref.points, ref.mask, backend="torch")
    assert collapsed["cov_cd"] == pytest.approx(1 / 8) and collapsed["mmd_cd"] > 0
    assert collapsed["nna_cd"] >= 0.5


def _fake_trainer(tmp_path):
    return SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True, global_step=0, loggers=[]
    )


def test_shape_callbacks_write_pictures_plys_and_metrics(tmp_path):
    import json

    from PIL import Image

    from diffalign.modalities.shape3d.callbacks import ShapeMetrics, ShapeSamples

    module = SimpleNamespace(policy=DiffusionPolicy(tiny_shape_backbone(), FlowSDEKernel(0.7), num_steps=2))
    trainer = _fake_trainer(tmp_path)
    pictures = ShapeSamples(prompts=["a box", "a cone"], seeds_per_prompt=2, image_size=24)
    metrics = ShapeMetrics(prompts=["a box"], samples_per_prompt=3, reference_per_prompt=3)
    for cb in (pictures, metrics):
        cb.on_fit_start(trainer, module)
    trainer.global_step = 2
    for cb in (pictures, metrics):
        cb.on_fit_end(trainer, module)
    before, after = Image.open(tmp_path / "samples_before.png"), Image.open(tmp_path / "samples_after.png")
    assert before.size == after.size and before.mode == "RGB"
    plys = sorted((tmp_path / "shapes_after").glob("*.ply"))
    assert len(plys) == 4  # the weights did not change: the same seeds give the same shapes
    assert all(p.read_bytes() == (tmp_path / "shapes_before" / p.name).read_bytes() for p in plys)
    out = json.loads((tmp_path / "shape_metrics.json").read_text())
    assert out["before"]["cov_cd"] == out["after"]["cov_cd"] and 0 < out["after"]["cov_cd"] <= 1
    assert set(out["after"]["per_prompt"]) == {"a box"}


def test_point_cloud_files_round_trip_and_errors(tmp_path):
    import trimesh

    from diffalign.modalities.shape3d.io import PointCloudReader, read_point_cloud, write_point_cloud

    pts = torch.randn(20, 3)
    colors = torch.rand(20, 3)
    write_point_cloud(tmp_path / "a.ply", pts, colors)
    write_point_cloud(tmp_path / "b.obj", pts)
    back = read_point_cloud(tmp_path / "a.ply")
    assert back.shape == (20, 6) and torch.allclose(back[:, :3], pts, atol=1e-6)
    assert torch.allclose(back[:, 3:], colors, atol=1 / 255)
    assert torch.allclose(read_point_cloud(tmp_path / "b.obj"), pts, atol=1e-6)
    assert read_point_cloud(tmp_path / "a.ply", max_points=7).shape == (7, 6)  # subsampled, seeded
    trimesh.creation.box().export(tmp_path / "c.obj")  # a mesh: sampled on its surface
    mesh_points = read_point_cloud(tmp_path / "c.obj", max_points=50)
    assert mesh_points.shape == (50, 3) and mesh_points.abs().max() <= 0.5 + 1e-6
    (tmp_path / "d.ply").write_text("not a ply file")
    reader = PointCloudReader(mesh_points=64)
    records = list(reader.records(tmp_path))
    assert [r.id for r in records] == ["a.ply", "b.obj", "c.obj", "d.ply"]
    assert reader.load(records[2].payload).shape == (64, 3)
    with pytest.raises(ValueError, match="d.ply"):
        reader.load(records[3].payload)
    with pytest.raises(ValueError, match="not a point-cloud file"):
        read_point_cloud(tmp_path / "x.txt")
