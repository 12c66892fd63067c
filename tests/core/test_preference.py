"""Preference alignment: DPO/KTO/D3PO/SPO analytic cases, preference data errors, AI feedback, toy runs."""

import json
import math

import pytest
import torch

from diffalign.core.algorithms import (
    D3PO,
    SPO,
    AlignContext,
    DiffusionDPO,
    DiffusionKTO,
    kto_loss,
    pareto_compare,
)
from diffalign.core.algorithms.diffusion_dpo import noised_pairs
from diffalign.core.feedback import make_preference_dataset
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.preference_data import PreferenceDataError, PreferenceDataModule, PreferenceDataset
from diffalign.core.reward import GuardedReward, WeightedSum
from diffalign.core.testing import LinearReward, ToyBackbone
from diffalign.modalities.toy import MixtureBackbone
from diffalign.rewards.toy import TargetRegion
from tests.helpers import run_fit, summary


def policy_with_reference(steps=4):
    torch.manual_seed(0)
    policy = DiffusionPolicy(ToyBackbone(hidden=16, depth=2), num_steps=steps)
    policy.backbone.freeze_reference()
    return policy


def ctx_for(policy, reward=None):
    return AlignContext(
        policy, GuardedReward(reward or LinearReward()), torch.Generator().manual_seed(0), torch.device("cpu")
    )


def pair_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return {
        "prompt": list(range(4)) * (n // 4),
        "winner": torch.randn(n, 2, generator=g),
        "loser": torch.randn(n, 2, generator=g),
    }


# -- Diffusion-DPO ---------------------------------------------------------------------------------
def test_dpo_loss_is_log2_when_policy_equals_reference():
    policy = policy_with_reference()
    algo = DiffusionDPO(beta=100.0)
    data, _ = algo.prepare(ctx_for(policy), pair_batch())
    out = algo(policy, data)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["inside_mean"].item() == 0.0


def test_dpo_winner_and_loser_share_timestep_and_noise():
    policy = policy_with_reference()
    x = torch.randn(4, 2)
    data = noised_pairs(policy, x, x.clone(), {"label": torch.zeros(4, dtype=torch.long)}, torch.Generator())
    assert torch.equal(data.x_t_w, data.x_t_l) and torch.equal(data.target_w, data.target_l)


def test_dpo_pairs_keep_each_sides_mask_and_pad_to_one_size():
    from diffalign.core.testing import PointSetBackbone

    policy = DiffusionPolicy(PointSetBackbone(max_points=5), num_steps=2)
    x_w, x_l = torch.randn(2, 3, 2), torch.randn(2, 5, 2)  # padded sets of 3 and 5 points
    m_w = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    m_l = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    cond = {"label": torch.zeros(2, dtype=torch.long)}
    x_w, x_l = x_w * m_w[..., None], x_l * m_l[..., None]  # padded entries are 0, as `encode` makes them
    data = noised_pairs(policy, x_w, x_l, cond, torch.Generator(), m_w, m_l)
    assert data.x_t_w.shape == data.x_t_l.shape == (2, 5, 2) and data.mask_w.shape == (2, 5)
    assert torch.equal(data.mask_l, m_l)
    assert torch.equal(data.mask_w[:, :3], m_w) and not data.mask_w[:, 3:].any()
    # each side's padding gets no noise: the noised padded entries are exactly 0
    assert (data.x_t_w[data.mask_w == 0] == 0).all() and (data.x_t_l[data.mask_l == 0] == 0).all()
    # where both sides are real, they share the noise (x0 = 0 shows it directly)
    zeros = noised_pairs(
        policy, torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), cond, torch.Generator(), m_l, m_l
    )
    assert torch.equal(zeros.x_t_w, zeros.x_t_l)


def test_swapping_winner_and_loser_flips_the_gradient():
    grads = []
    for swap in (False, True):
        policy = policy_with_reference()
        batch = pair_batch()
        if swap:
            batch["winner"], batch["loser"] = batch["loser"], batch["winner"]
        algo = DiffusionDPO(beta=10.0)
        data, _ = algo.prepare(ctx_for(policy), batch)
        algo(policy, data)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.backbone.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], -grads[1], atol=1e-6)


def test_dpo_tie_label_gives_no_gradient_at_initialisation():
    policy = policy_with_reference()
    batch = {**pair_batch(), "label": torch.full((8,), 0.5)}
    algo = DiffusionDPO(beta=10.0)
    data, _ = algo.prepare(ctx_for(policy), batch)
    algo(policy, data)["loss"].backward()
    assert all(p.grad.abs().max() < 1e-7 for p in policy.backbone.parameters())


# -- Diffusion-KTO ---------------------------------------------------------------------------------
def test_kto_analytic_cases():
    r = torch.zeros(4)
    loss, z = kto_loss(r, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert z == 0 and torch.allclose(loss, torch.full((4,), 0.5))
    loss, z = kto_loss(torch.tensor([2.0, -2.0]), torch.tensor([1.0, 0.0]), desirable_weight=2.0)
    assert z == 0 and loss[0].item() == pytest.approx(2 * (1 - torch.sigmoid(torch.tensor(2.0))).item())
    assert loss[1].item() == pytest.approx((1 - torch.sigmoid(torch.tensor(2.0))).item())
    policy = policy_with_reference()
    batch = {"prompt": [0, 1, 2, 3], "sample": torch.randn(4, 2), "label": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    algo = DiffusionKTO(beta=10.0)
    data, metrics = algo.prepare(ctx_for(policy), batch)
    assert algo(policy, data)["loss"].item() == pytest.approx(0.5) and metrics["desirable_fraction"] == 0.5


# -- D3PO ------------------------------------------------------------------------------------------
def test_pareto_compare():
    a = torch.tensor([[1.0, 2.0], [1.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 2.0], [0.0, 2.0], [1.0, 1.0]])
    assert pareto_compare(a, b).tolist() == [1, -1, 0, 0]
    assert pareto_compare(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])).tolist() == [1, 0]


def test_d3po_pairs_share_noise_and_start_at_log2():
    policy = policy_with_reference()
    algo = D3PO(beta=0.1)
    reward = WeightedSum([LinearReward(weight=[1.0, 0.0]), LinearReward(weight=[0.0, 1.0])])
    pairs, metrics = algo.prepare(ctx_for(policy, reward), {"prompt": [0, 1, 2, 3] * 4})
    assert torch.equal(pairs.winner.states[:, 0], pairs.loser.states[:, 0])
    assert 0 < metrics["pair_fraction"] < 1  # Pareto: some pairs are incomparable on the two terms
    terms_w = torch.stack([pairs.winner.x0[:, 0], pairs.winner.x0[:, 1]], 1)
    terms_l = torch.stack([pairs.loser.x0[:, 0], pairs.loser.x0[:, 1]], 1)
    assert (pareto_compare(terms_w, terms_l) == 1).all()
    micro = next(iter(algo.minibatches(pairs, torch.Generator())))[0]
    assert algo(policy, micro)["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


# -- SPO -------------------------------------------------------------------------------------------
def test_spo_forms_step_pairs_and_starts_at_log2():
    policy = policy_with_reference(steps=5)
    algo = SPO(num_candidates=3, beta=1.0)
    data, metrics = algo.prepare(ctx_for(policy), {"prompt": [0, 1, 2, 3]})
    assert (
        len(data) == 4 * 4 and metrics["tie_fraction"] == 0
    )  # the DDPM schedule's last step is deterministic
    micro = next(iter(algo.minibatches(data, torch.Generator())))[0]
    out = algo(policy, micro)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


# -- preference data -------------------------------------------------------------------------------
def _write_pairs(folder, rows):
    (folder / "a.pt").write_bytes(b"")
    torch.save(torch.ones(2), folder / "w.pt")
    torch.save(torch.zeros(2), folder / "l.pt")
    (folder / "bad.pt").write_bytes(b"not a tensor")
    path = folder / "pairs.jsonl"
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


ROWS = [
    {"prompt": 0, "winner": "w.pt", "loser": "l.pt"},  # 1 ok
    {"prompt": 1, "winner": "missing.pt", "loser": "l.pt"},  # 2 missing file
    {"prompt": 2, "winner": "w.pt", "loser": "l.pt", "label": 7},  # 3 bad label
    {"prompt": 3, "winner": "bad.pt", "loser": "l.pt"},  # 4 unreadable
    b"\xff\xfe not utf8\n",  # 5
    b"{broken json\n",  # 6
    {"caption": 4, "jpg_0": "l.pt", "jpg_1": "w.pt", "label_0": 0.0, "label_1": 1.0},  # 7 ok (Pick-a-Pic)
    {"prompt": 5, "winner": "w.pt"},  # 8 missing loser
    {"caption": 6, "jpg_0": "l.pt", "jpg_1": "w.pt", "label_0": 0.5, "label_1": 0.5},  # 9 tie
]


def test_malformed_rows_are_reported_with_file_and_row(tmp_path):
    path = _write_pairs(tmp_path, ROWS)
    with pytest.raises(PreferenceDataError, match=r"pairs.jsonl:2: 'winner' file not found"):
        PreferenceDataset(path)
    ds = PreferenceDataset(path, on_error="skip")
    assert len(ds) == 2 and ds.ties == 1
    assert [n for n, _ in ds.skipped] == [2, 3, 4, 5, 6, 8]
    reasons = dict(ds.skipped)
    assert "label" in reasons[3] and "cannot read" in reasons[4] and "UTF-8" in reasons[5]
    assert "JSON" in reasons[6] and "loser" in reasons[8]
    # the Pick-a-Pic row with label_0 = 0 prefers jpg_1
    assert torch.equal(ds[1]["winner"], torch.ones(2)) and torch.equal(ds[1]["loser"], torch.zeros(2))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PreferenceDataset(tmp_path / "nope.jsonl")


def test_parquet_and_data_module_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_pairs(tmp_path, [])
    table = pa.Table.from_pylist([{"prompt": i % 4, "winner": "w.pt", "loser": "l.pt"} for i in range(10)])
    pq.write_table(table, tmp_path / "pairs.parquet")
    dm = PreferenceDataModule(str(tmp_path / "pairs.parquet"), batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["winner"].shape == (4, 2) and batch["label"].tolist() == [1.0] * 4
    assert dm.eval_prompts == [0, 1, 2, 3]


# -- AI feedback and end to end ----------------------------------------------------------------------
def test_ai_feedback_writes_ranked_pairs(tmp_path):
    policy = DiffusionPolicy(MixtureBackbone(), num_steps=5)
    result = make_preference_dataset(
        policy, TargetRegion(), [0, 1, 2, 3], tmp_path, samples_per_prompt=4, pairs_per_prompt=2
    )
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert result["rows"] == len(rows) == 8
    for r in rows:
        assert r["winner_score"] > r["loser_score"]
        w = torch.load(tmp_path / r["winner"])
        assert TargetRegion()(w[None]).scores.item() == pytest.approx(r["winner_score"], rel=1e-5)
    assert len(PreferenceDataset(tmp_path / "pairs.jsonl")) == 8


def _feedback(cwd, layout):
    from diffalign.core.cli import cli_main
    from tests.helpers import REPO

    out = cwd / "feedback" / ("feedback_target" + ("_unpaired" if layout == "unpaired" else ""))
    args = [
        "feedback",
        "--config",
        str(REPO / "recipes/toy/feedback_target.yaml"),
        "--output",
        str(out),
        "--layout",
        layout,
    ]
    assert cli_main(args) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,min_gain", [("dpo_target", 0.08), ("d3po_mode", 0.3), ("spo_mode", 0.1)])
def test_toy_preference_recipes_raise_the_reward(name, min_gain, cleandir):
    if name == "dpo_target":
        _feedback(cleandir, "pairs")
    epochs = {"dpo_target": 15, "d3po_mode": 25, "spo_mode": 10}[name]
    run = run_fit(f"recipes/toy/{name}.yaml", cleandir / "runs", f"--trainer.max_epochs={epochs}")
    s = summary(run)
    stderr = s["reward_before_std"] / math.sqrt(s["eval_samples"])
    assert s["reward_after"] - s["reward_before"] > max(min_gain, 8 * stderr), s
