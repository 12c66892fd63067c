"""The soft point-splatting renderer: camera axes, a point's splat where projection puts it, masks,
per-row cameras, gradients; pytorch3d's rasteriser agrees where pytorch3d is installed."""

import math

import pytest
import torch

from diffalign.modalities.shape3d.geometry import have_pytorch3d
from diffalign.modalities.shape3d.render import Camera, parse_views, pixel_centres, project, render_points


def test_camera_axes():
    rot = Camera(azimuth=0.0, elevation=0.0).rotation()  # looking from +x toward the origin
    assert torch.allclose(rot @ rot.T, torch.eye(3), atol=1e-6)
    assert torch.allclose(rot[2], torch.tensor([-1.0, 0, 0]), atol=1e-6)  # depth grows away from the camera
    assert torch.allclose(rot[1], torch.tensor([0.0, 0, 1]), atol=1e-6)  # world up is image up
    top = Camera(0.0, 90.0).rotation()
    assert torch.allclose(top[2], torch.tensor([0.0, 0, -1]), atol=1e-6)


def test_one_point_splats_a_gaussian_where_it_projects():
    size, sigma, extent = 16, 1.0, 2.0
    cam = Camera(0.0, 0.0, extent)
    point = torch.tensor([[[0.0, -0.5, 1.0]]])
    uv = project(point, [cam])[0, 0, 0]
    img = render_points(point, cameras=[cam], image_size=size, sigma=sigma, density=1.0)[0, 0, 0]
    centres = pixel_centres(size)
    s = 2 * sigma / size
    gx = torch.exp(-((uv[0] - centres) ** 2) / (2 * s * s))
    gy = torch.exp(-((uv[1] - centres.flip(0)) ** 2) / (2 * s * s))
    expected = (1 - torch.exp(-(gy[:, None] * gx[None, :]))) * 1.0  # one point: shade 1 at depth 0
    assert torch.allclose(img, expected, atol=1e-5)
    row, col = divmod(int(img.argmax()), size)
    assert row < size // 2 and col < size // 2  # z = +1 is up; seen from +x, image right is +y


def test_padding_draws_nothing_and_cameras_per_row_match_shared_ones():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2, 6, 3, generator=g) * 0.5
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3])
    far = pts.clone()
    far[1, 3:] = 100.0  # padded points anywhere change nothing
    a = render_points(pts, mask, "pair", 16)
    b = render_points(far, mask, "pair", 16)
    assert torch.allclose(a, b)
    cams = parse_views("pair")
    per_row = render_points(pts, mask, [cams, cams], 16)
    assert torch.allclose(per_row, a)


def test_render_is_differentiable_in_the_points():
    pts = (torch.randn(1, 8, 3) * 0.4).requires_grad_()
    render_points(pts, cameras="quad", image_size=16).sum().backward()
    assert pts.grad is not None and pts.grad.abs().sum() > 0 and torch.isfinite(pts.grad).all()


def test_view_specs():
    assert len(parse_views("six")) == 6
    cams = parse_views([{"azimuth": 10, "elevation": 5}])
    assert cams == [Camera(10.0, 5.0)]
    r1 = parse_views({"random": 3, "elevation": [20, 30]}, torch.Generator().manual_seed(1))
    r2 = parse_views({"random": 3, "elevation": [20, 30]}, torch.Generator().manual_seed(1))
    assert r1 == r2 and all(20 <= c.elevation <= 30 and 0 <= c.azimuth <= 360 for c in r1)
    for bad in ("nine", {"count": 2}, [{"yaw": 1}], 3):
        with pytest.raises(ValueError):
            parse_views(bad)


def test_colour_renders_take_the_nearest_points_colour():
    pts = torch.tensor([[[0.0, 0.0, 0.0], [-0.5, 0.0, 0.0]]])  # seen from +x the first hides the second
    colors = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    img = render_points(pts, cameras=[Camera(0.0, 0.0)], image_size=8, colors=colors, depth_temperature=0.05)
    centre = img[0, 0, :, 3:5, 3:5].mean(dim=(1, 2))
    assert (
        centre[0] > 0.5 and centre[2] < 0.05 * centre[0] and math.isclose(float(centre[1]), 0.0, abs_tol=1e-6)
    )


@pytest.mark.skipif(
    not have_pytorch3d(), reason="pytorch3d is not installed (it has no build for this platform)"
)
def test_pytorch3d_rasteriser_agrees_with_ours():
    g = torch.Generator().manual_seed(4)
    pts = torch.randn(3, 40, 3, generator=g) * 0.4
    mask = (torch.arange(40)[None] < torch.tensor([40, 25, 10])[:, None]).float()
    ours = render_points(pts, mask, "quad", 32, backend="torch")
    theirs = render_points(pts, mask, "quad", 32, backend="pytorch3d")
    assert (ours - theirs).abs().max() < 0.03  # only the splat tails beyond 3σ differ
