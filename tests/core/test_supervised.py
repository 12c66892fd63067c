"""SupervisedDenoising: condition dropout, targets per prediction type, and that it learns."""

import pytest
import torch

from diffalign.core.algorithms import AlignContext, SupervisedDenoising
from diffalign.core.denoising import noised_batch
from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import ToyBackbone
from diffalign.core.types import Cond
from diffalign.modalities.toy import GaussianMixture


def test_condition_dropout_rate_and_null_condition():
    policy = DiffusionPolicy(ToyBackbone(hidden=8, depth=1), num_steps=2)
    cond = Cond({"label": torch.zeros(4000, dtype=torch.long), "prompt": [0] * 4000})
    mb = noised_batch(policy, torch.randn(4000, 2), cond, torch.Generator().manual_seed(0), cond_dropout=0.3)
    dropped = (mb.cond["label"] == 4).float().mean().item()
    assert abs(dropped - 0.3) < 0.03
    assert set(mb.cond["label"].unique().tolist()) == {0, 4}
    assert mb.cond["prompt"] == [0] * 4000  # metadata describes the request: dropout leaves it


def test_missing_sample_key_is_a_clear_error():
    policy = DiffusionPolicy(ToyBackbone(hidden=8, depth=1), num_steps=2)
    ctx = AlignContext(policy, None, torch.Generator(), torch.device("cpu"))
    with pytest.raises(KeyError, match="'sample'"):
        SupervisedDenoising().prepare(ctx, {"prompt": [0]})


@pytest.mark.parametrize("prediction_type,kernel", [("epsilon", DDIMKernel()), ("flow", FlowSDEKernel())])
def test_loss_falls_on_mixture_data(prediction_type, kernel):
    torch.manual_seed(0)
    policy = DiffusionPolicy(ToyBackbone(hidden=32, depth=2, prediction_type=prediction_type), kernel)
    algo = SupervisedDenoising(cond_dropout=0.1)
    opt = torch.optim.Adam(policy.backbone.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixture()
    ctx = AlignContext(policy, None, gen, torch.device("cpu"))
    losses = []
    for _ in range(150):
        x, y = mix.sample(256, gen)
        data, _ = algo.prepare(ctx, {"sample": x, "prompt": y})
        loss = algo(policy, data)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
