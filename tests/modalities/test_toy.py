"""The toy modality: data, the shipped base model's quality, and that its recipe reproduces it."""

import pytest
import torch
from safetensors.torch import load_file

from diffalign.core.io import resolve_path
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import check_backbone
from diffalign.modalities.toy import BASE_WEIGHTS, GaussianMixture, MixtureBackbone
from tests.helpers import run_fit


def test_mixture_samples_match_their_components():
    mix = GaussianMixture(num_components=4, radius=2.0, std=0.35)
    x, y = mix.sample(4000, torch.Generator().manual_seed(0))
    for k in range(4):
        pts = x[y == k]
        assert torch.allclose(pts.mean(0), mix.means[k], atol=0.05)
        assert torch.allclose(pts.std(0), torch.full((2,), 0.35), atol=0.03)


def test_shipped_base_model_follows_its_condition():
    backbone = MixtureBackbone()
    check_backbone(backbone, {"prompt": [0, 1, 2, 3]})
    policy = DiffusionPolicy(backbone, num_steps=20)
    labels = torch.arange(4).repeat_interleave(200)
    x = policy.sample({"label": labels}, torch.Generator().manual_seed(0))
    mix = GaussianMixture()
    nearest = torch.cdist(x, mix.means).argmin(1)
    assert (nearest == labels).float().mean() > 0.97
    for k in range(4):
        assert torch.allclose(x[labels == k].mean(0), mix.means[k], atol=0.15)
        assert 0.2 < x[labels == k].std(0).mean() < 0.5


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,weights",
    [
        ("pretrain", BASE_WEIGHTS),
        ("pretrain_flow", "pkg://diffalign.modalities.toy/toy_flow_base.safetensors"),
    ],
)
def test_pretrain_recipe_reproduces_the_shipped_weights(cleandir, recipe, weights):
    run_fit(f"recipes/toy/{recipe}.yaml", cleandir / "runs")
    made = load_file(str(cleandir / "modalities/toy" / weights.rsplit("/", 1)[1]))
    shipped = load_file(str(resolve_path(weights)))
    assert made.keys() == shipped.keys()
    for k in shipped:
        assert torch.allclose(made[k], shipped[k], atol=1e-5), k
