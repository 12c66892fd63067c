"""The variable-size contract: every algorithm and every test-time method on a backbone whose samples
differ in size (`PointSetBackbone`, sets of 2–5 points padded to 5).

The backbone's denoiser is deliberately leaky (non-zero outputs at padded rows), so these tests show
that the core itself keeps padding out: padded entries never change (they stay 0 in every state and in
every training input), never get noise, and never get gradient (its denoiser outputs record the largest
gradient reaching their padded rows, which must be exactly 0).
"""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.core.algorithms import (
    AWM,
    D3PO,
    DDPO,
    DPOK,
    GRPO,
    RAFT,
    RWR,
    SPO,
    AlignProp,
    DiffusionDPO,
    DiffusionKTO,
    DiffusionNFT,
    DRaFT,
    GRPOGuard,
    PrefGRPO,
    ReFL,
    SupervisedDenoising,
)
from diffalign.core.functional import expand_mask
from diffalign.core.guidance import (
    SVDD,
    BestOfN,
    DirectNoiseOptimization,
    FKSteering,
    PlainSampling,
    RewardGuidance,
)
from diffalign.core.kernels import DDIMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward
from diffalign.core.rollouts import AlignContext
from diffalign.core.sampling import row_generators
from diffalign.core.testing import PointSetBackbone, PointSetReward
from diffalign.core.types import Batch, Trajectory

PROMPTS = [0, 1, 2, 0, 1, 2]  # 2, 3 and 4 points


def _policy(prediction_type: str = "epsilon") -> DiffusionPolicy:
    torch.manual_seed(0)
    backbone = PointSetBackbone(prediction_type=prediction_type, probe_gradients=True)
    kernel = FlowSDEKernel() if prediction_type == "flow" else DDIMKernel(eta=1.0)
    return DiffusionPolicy(backbone, kernel, num_steps=4)


def _ragged_sets(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, generator=g) for n in sizes]


def _batch_for(algo) -> dict:
    """What each algorithm trains on: conditions, ragged samples, ragged pairs or labelled samples."""
    if isinstance(algo, SupervisedDenoising):
        return {"prompt": [0, 1, 2], "sample": _ragged_sets(1, [2, 3, 4])}
    if isinstance(algo, DiffusionDPO):  # winner and loser of a pair differ in size
        return {
            "prompt": [0, 1, 2],
            "winner": _ragged_sets(2, [2, 3, 4]),
            "loser": _ragged_sets(3, [4, 2, 3]),
        }
    if isinstance(algo, DiffusionKTO):
        return {
            "prompt": [0, 1, 2],
            "sample": _ragged_sets(4, [2, 3, 4]),
            "label": torch.tensor([1.0, 0.0, 1.0]),
        }
    return {"prompt": PROMPTS}


def _padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[expand_mask(mask, x) == 0]


def _assert_padding_zero(value) -> int:
    """Every tensor with a mask beside it is exactly 0 where the mask is 0; returns the checks made."""
    checks = 0
    if isinstance(value, Trajectory) and value.mask is not None:
        for i in range(value.num_steps + 1):
            assert (_padding(value.states[:, i], value.mask) == 0).all(), (
                f"a padded entry changed at state {i}"
            )
        checks += 1
    if isinstance(value, Batch):
        for name in value:
            v = value[name]
            if isinstance(v, (Batch, Trajectory)):
                checks += _assert_padding_zero(v)
        mask = value.get("mask")
        points = value.get("t") is not None and value["t"].dim() == 2  # forward-process points (B, J, ...)
        for name in ("x_t", "target", "winner", "loser", "x0"):
            if mask is not None and isinstance(value.get(name), torch.Tensor):
                per = (
                    [value[name][:, k] for k in range(value["t"].shape[1])]
                    if points and name != "x0"
                    else [value[name]]
                )
                for v in per:
                    assert (_padding(v, mask) == 0).all(), f"padded entries of {name} are not 0"
                checks += 1
        for side in ("w", "l"):
            m = value.get(f"mask_{side}")
            for name in (f"x_t_{side}", f"target_{side}"):
                if m is not None:
                    assert (_padding(value[name], m) == 0).all(), f"padded entries of {name} are not 0"
                    checks += 1
    if isinstance(value, list):
        checks += sum(_assert_padding_zero(v) for v in value)
    return checks


ALGORITHMS = [
    DDPO(advantages="batch"),
    DPOK(kl_coef=0.1, advantages="batch"),
    GRPO(group_size=2),
    GRPO(group_size=2, shared_noise=True),
    GRPO(group_size=2, sde_window_size=2),
    GRPOGuard(group_size=2),
    PrefGRPO(group_size=2),
    DiffusionNFT(group_size=2, kl_coef=0.1),
    AWM(group_size=2, kl_coef=0.1),
    DRaFT(k=2),
    DRaFT(lv_samples=2),
    AlignProp(k_min=1, k_max=3),
    ReFL(),
    RWR(samples_per_condition=2),
    RAFT(samples_per_condition=2),
    D3PO(),
    D3PO(keep_undecided=True),
    SPO(num_candidates=3),
    DiffusionDPO(beta=10.0),
    DiffusionKTO(beta=10.0),
    SupervisedDenoising(cond_dropout=0.2),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: f"{type(a).__name__}")
def test_every_algorithm_keeps_padding_out(algo, prediction_type):
    if isinstance(algo, (DiffusionDPO, DiffusionKTO)) and prediction_type == "flow":
        pass  # Flow-DPO / Flow-KTO: same code path with the velocity target
    policy = _policy(prediction_type)
    backbone = policy.backbone
    if algo.needs_reference:
        backbone.freeze_reference()
    reward = GuardedReward(PointSetReward()) if algo.needs_reward else None
    ctx = AlignContext(policy, reward, torch.Generator().manual_seed(0), torch.device("cpu"))
    data, _ = algo.prepare(ctx, _batch_for(algo))
    checks = _assert_padding_zero(data)
    steps = 0
    for micro_batches in algo.minibatches(data, torch.Generator().manual_seed(1)):
        for micro in micro_batches:
            checks += _assert_padding_zero(micro)
            out = algo(policy, micro)
            assert torch.isfinite(out["loss"])
            out["loss"].backward()
            steps += 1
    assert steps > 0
    grads = [p.grad for p in backbone.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the model"
    assert backbone.padded_grad_max, "no denoiser output with a graph was probed"
    assert max(backbone.padded_grad_max) == 0.0, "gradient reached a padded entry"
    if not isinstance(algo, (DRaFT, AlignProp, ReFL)):  # they sample inside forward (checked below)
        assert checks > 0


METHODS = [
    PlainSampling(),
    BestOfN(n=3),
    RewardGuidance(scale=0.5),
    FKSteering(num_particles=3, lam=5.0, ess_threshold=None),
    SVDD(candidates=3),
    DirectNoiseOptimization(steps=2, lr=0.1),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_every_test_time_method_keeps_padding_out(method):
    policy = _policy()
    backbone = policy.backbone
    cond = backbone.condition({"prompt": PROMPTS})
    out = method(policy, cond, PointSetReward(), row_generators(range(len(PROMPTS))))
    expected_mask = backbone.mask_for(cond["label"])
    assert torch.equal(out.mask, expected_mask), "a row lost its own mask"
    assert (_padding(out.x0, out.mask) == 0).all(), "a padded entry of a final sample is not 0"
    assert torch.isfinite(out.scores).all()
    assert max(backbone.padded_grad_max, default=0.0) == 0.0, "gradient reached a padded entry"
    if isinstance(method, (RewardGuidance, DirectNoiseOptimization)):
        assert backbone.padded_grad_max, "the gradient-based method made no probed denoiser call"


def test_rewards_see_padding_explicitly():
    policy = _policy()
    cond = policy.backbone.condition({"prompt": [0, 2]})
    traj = policy.rollout(cond, row_generators([0, 1]))
    samples = policy.backbone.decode(traj.x0, traj.mask)
    assert samples["mask"].sum(1).tolist() == [2.0, 4.0]
    assert (samples["points"][samples["mask"] == 0] == 0).all()


def test_ragged_preference_rows_collate_into_lists_the_backbone_pads():
    from diffalign.core.preference_data import collate_preferences

    rows = [
        {"prompt": 0, "winner": torch.zeros(2, 2), "label": 1.0},
        {"prompt": 1, "winner": torch.ones(3, 2), "label": 1.0},
    ]
    batch = collate_preferences(rows)
    assert isinstance(batch["winner"], list) and batch["label"].tolist() == [1.0, 1.0]
    x0, mask = PointSetBackbone().encode(batch["winner"])
    assert x0.shape == (2, 5, 2) and mask.sum(1).tolist() == [2.0, 3.0]
    same = collate_preferences([{"winner": torch.zeros(2, 2)}, {"winner": torch.ones(2, 2)}])
    assert isinstance(same["winner"], torch.Tensor) and same["winner"].shape == (2, 2, 2)


def test_ai_feedback_on_a_dict_layout_round_trips_through_preference_data(tmp_path):
    """`diffalign feedback` saves one row of a dict layout per sample; the pairs load, collate into lists
    and the backbone encodes them back to the sampled model-space points."""
    from diffalign.core.feedback import make_preference_dataset
    from diffalign.core.preference_data import PreferenceDataModule, collate_preferences

    policy = _policy()
    result = make_preference_dataset(policy, PointSetReward(), [0, 1, 2], tmp_path, samples_per_prompt=4)
    assert result["rows"] == 3
    dm = PreferenceDataModule(path=str(tmp_path / "pairs.jsonl"), batch_size=3)
    batch = collate_preferences([dm.dataset[i] for i in range(3)])
    assert isinstance(batch["winner"], list) and isinstance(batch["winner"][0], dict)
    x0, mask = policy.backbone.encode(batch["winner"])
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        saved = torch.load(tmp_path / json.loads(line)["winner"])
        n = int(saved["mask"].sum())
        assert mask[i].sum() == n and torch.equal(x0[i, :n], saved["points"][:n])
