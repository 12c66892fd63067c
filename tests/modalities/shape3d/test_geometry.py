"""Chamfer distance, kNN and the pairwise matrix in pure torch (analytic values, masks, chunks); the
pytorch3d comparison runs only where pytorch3d is installed (it cannot be installed here)."""

import pytest
import torch

from diffalign.modalities.shape3d.geometry import (
    chamfer_distance,
    have_pytorch3d,
    knn,
    nearest_sq_dists,
    pairwise_chamfer,
)


def test_chamfer_of_a_shifted_set_is_twice_the_squared_shift():
    x = torch.tensor([[[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]])
    delta = torch.tensor([0.3, -0.1, 0.2])
    d = chamfer_distance(x, x + delta, backend="torch")
    assert torch.allclose(d, torch.tensor([2 * delta.pow(2).sum()]), atol=1e-6)
    assert chamfer_distance(x, x, backend="torch").item() == 0.0


def test_chamfer_by_hand_and_asymmetric_sizes():
    x = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0]]])
    y = torch.tensor([[[1.0, 0, 0]]])
    # x -> y: 1 and 1 (mean 1); y -> x: 1 (mean 1)
    assert torch.allclose(chamfer_distance(x, y, backend="torch"), torch.tensor([2.0]))


def test_masked_points_never_count():
    x = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0], [0.0, 0, 0]]])
    y = torch.tensor([[[1.0, 0, 0], [50.0, 50, 50]]])
    xm, ym = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert torch.allclose(chamfer_distance(x, y, xm, ym, backend="torch"), torch.tensor([2.0]))
    d = nearest_sq_dists(x, y, xm, ym)
    assert d.tolist() == [[1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="no real point"):
        nearest_sq_dists(x, y, xm, torch.zeros(1, 2))


def test_chunking_does_not_change_results_or_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 3, generator=g, requires_grad=True)
    y = torch.randn(3, 23, 3, generator=g)
    full = chamfer_distance(x, y, backend="torch", chunk=1000)
    (gx,) = torch.autograd.grad(full.sum(), x)
    small = chamfer_distance(x, y, backend="torch", chunk=4)
    (gx4,) = torch.autograd.grad(small.sum(), x)
    assert torch.allclose(full, small) and torch.allclose(gx, gx4)
    d, i = knn(x.detach(), 3, chunk=5, backend="torch")
    d2, i2 = knn(x.detach(), 3, chunk=100, backend="torch")
    assert torch.equal(i, i2) and torch.allclose(d, d2)


def test_knn_matches_brute_force_and_skips_self_and_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 3, generator=g)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    d, idx = knn(x, 2, mask, backend="torch")
    for b in range(2):
        n = int(mask[b].sum())
        full = torch.cdist(x[b, :n], x[b, :n]).pow(2) + torch.eye(n) * 1e9
        ref = full.topk(2, largest=False)
        assert torch.equal(idx[b, :n], ref.indices) and torch.allclose(d[b, :n], ref.values, atol=1e-5)
    assert torch.equal(d[1, 7:], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="more than 7"):
        knn(x, 7, mask, backend="torch")


def test_pairwise_chamfer_matches_the_batched_distance():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 8, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    m = pairwise_chamfer(a, b, rows_at_once=5, backend="torch")
    assert m.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            ref = chamfer_distance(a[i : i + 1], b[j : j + 1], backend="torch")
            assert torch.allclose(m[i, j], ref[0])


def test_explicit_pytorch3d_backend_is_refused_without_it():
    if have_pytorch3d():
        pytest.skip("pytorch3d is installed here")
    x = torch.zeros(1, 3, 3)
    with pytest.raises(ImportError, match="pytorch3d"):
        chamfer_distance(x, x, backend="pytorch3d")


@pytest.mark.skipif(
    not have_pytorch3d(), reason="pytorch3d is not installed (it has no build for this platform)"
)
def test_pytorch3d_chamfer_and_knn_agree_with_ours():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 30, 3, generator=g), torch.randn(4, 25, 3, generator=g)
    xm = (torch.arange(30)[None] < torch.tensor([30, 20, 11, 5])[:, None]).float()
    ym = (torch.arange(25)[None] < torch.tensor([25, 9, 17, 4])[:, None]).float()
    ours = chamfer_distance(x, y, xm, ym, backend="torch")
    theirs = chamfer_distance(x, y, xm, ym, backend="pytorch3d")
    assert torch.allclose(ours, theirs, atol=1e-5)
    d, i = knn(x, 3, xm, backend="torch")
    d3, i3 = knn(x, 3, xm, backend="pytorch3d")
    assert torch.allclose(d, d3, atol=1e-5)
