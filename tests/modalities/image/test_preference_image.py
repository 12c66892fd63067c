"""Preference learning on the digit model: the prompt-aware CNN reward model (`DigitScorer`), its
Bradley–Terry training and use as a reward, and offline Diffusion-DPO on digit AI-feedback pairs."""

import csv
import json
import math

import pytest
import torch

from diffalign.rewards.image import DigitScorer, LearnedDigitReward, prompted_digits
from tests.helpers import quiet_trainer, run_fit, tiny_configs, write_digit_feedback


def test_digit_scorer_shapes_and_prompt_dependence():
    torch.manual_seed(0)
    net = DigitScorer()
    assert 10_000 < sum(p.numel() for p in net.parameters()) < 100_000
    x = torch.rand(6, 3, 16, 16)
    digits = torch.tensor([0, 1, 2, 7, 8, 9])
    s = net(x, [f"a handwritten {d}" for d in digits.tolist()])
    assert s.shape == (6,) and torch.isfinite(s).all()
    # prompts as strings, ints, a digit tensor or prompt dicts all mean the same
    for other in (digits.tolist(), digits, [{"digit": d} for d in digits.tolist()]):
        torch.testing.assert_close(net(x, other), s)
    gray = x[:, :1]
    torch.testing.assert_close(net(gray, digits), net(gray.repeat(1, 3, 1, 1), digits))  # gray = RGB
    # the score is the prompted digit's logit: the same image scores differently per prompt
    one = x[:1].expand(10, -1, -1, -1)
    per_digit = net(one, [f"a handwritten {d}" for d in range(10)])
    torch.testing.assert_close(per_digit, net.logits(x[:1])[0])
    assert per_digit.std() > 0
    assert net(torch.rand(2, 3, 24, 24), [3, 4]).shape == (2,)  # any image size (adaptive pooling)
    with pytest.raises(ValueError, match="name a digit"):
        net(x[:1], ["a handwritten digit"])
    with pytest.raises(ValueError, match="needs the prompts"):
        net(x[:1])
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        prompted_digits([1, 2], 1)


def test_learned_digit_reward_loads_exported_weights(tmp_path):
    from diffalign.core.io import save_state_dict

    torch.manual_seed(1)
    net = DigitScorer()
    save_state_dict(net, tmp_path / "rm.safetensors")
    reward = LearnedDigitReward(str(tmp_path / "rm.safetensors"))
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    cond = {
        "tokens": torch.zeros(4, 8, dtype=torch.long),
        "prompt": [f"a handwritten {d}" for d in (1, 2, 3, 4)],
    }
    out = reward(x, cond)
    torch.testing.assert_close(out.scores, net(x, [1, 2, 3, 4]).detach())
    out.scores.sum().backward()  # differentiable w.r.t. the samples, frozen itself
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert reward.differentiable and not any(p.requires_grad for p in reward.parameters())
    with pytest.raises(ValueError, match="needs the prompts"):
        reward(x.detach(), {"tokens": cond["tokens"]})


def _write_digit_pairs(folder, n_pairs: int = 240, seed: int = 0):
    """Pairs of real digit images of two different digits, written both ways round: under the prompt of
    image a, a ≻ b; under the prompt of b, b ≻ a. A scorer that ignores the prompt is at chance."""
    from diffalign.modalities.image import digit_prompt, load_digit_images

    x, y = load_digit_images(16, "train")
    g = torch.Generator().manual_seed(seed)
    (folder / "samples").mkdir(parents=True)
    lines = []
    for k in range(n_pairs):
        a = int(torch.randint(len(y), (1,), generator=g))
        b = int(torch.randint(len(y), (1,), generator=g))
        while y[b] == y[a]:
            b = int(torch.randint(len(y), (1,), generator=g))
        for name, i in (("a", a), ("b", b)):
            torch.save(x[i].repeat(3, 1, 1).clone(), folder / "samples" / f"{k}{name}.pt")
        fa, fb = f"samples/{k}a.pt", f"samples/{k}b.pt"
        lines.append({"prompt": digit_prompt(int(y[a])), "winner": fa, "loser": fb})
        lines.append({"prompt": digit_prompt(int(y[b])), "winner": fb, "loser": fa})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder / "pairs.jsonl"


@pytest.mark.slow
def test_bradley_terry_digit_scorer_beats_chance_on_held_out_pairs(tmp_path):
    import lightning as L

    from diffalign.core.preference_data import PreferenceDataModule
    from diffalign.core.reward_model import RewardModelModule

    path = _write_digit_pairs(tmp_path / "pairs")
    dm = PreferenceDataModule(str(path), batch_size=32, val_fraction=0.25, seed=0)
    assert len(dm.val_rows) == 120 and len(dm.dataset) == 360
    L.seed_everything(0, verbose=False)
    export = tmp_path / "rm.safetensors"
    module = RewardModelModule(
        DigitScorer(), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), export_path=str(export)
    )
    trainer = quiet_trainer(
        max_epochs=12,
    )
    trainer.fit(module, datamodule=dm)
    # held-out pair accuracy (the pairs' other direction may be in training: only the prompt decides)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/pair_accuracy"]
    assert val > 0.75, f"held-out pair accuracy {val:.3f}"
    # the exported weights load as a reward that ranks the held-out pairs the same way
    reward = LearnedDigitReward(str(export))
    rows = dm.val_rows
    backbone_cond = {"prompt": [r["prompt"] for r in rows]}
    s_w = reward(torch.stack([r["winner"] for r in rows]), backbone_cond).scores
    s_l = reward(torch.stack([r["loser"] for r in rows]), backbone_cond).scores
    assert abs((s_w > s_l).float().mean().item() - val) < 1e-6


@pytest.mark.slow
def test_offline_dpo_on_digit_feedback_logs_implicit_accuracy(cleandir):
    write_digit_feedback(cleandir, "pairs")  # 20 AI-feedback pairs from the shipped base model
    run = run_fit(
        "recipes/image/dpo_digit_fidelity.yaml",
        cleandir / "runs",
        "--trainer.max_epochs=4",
        "--data.init_args.batch_size=10",
        extra_configs=tuple(tiny_configs("recipes/image/dpo_digit_fidelity.yaml", cleandir)),
    )
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/implicit_acc")]
    assert len(rows) == 8  # 2 batches of 10 pairs per epoch
    acc = [float(r["train/implicit_acc"]) for r in rows]
    loss = [float(r["train/loss"]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in acc) and all(math.isfinite(v) for v in loss)
    # at the first step the policy is its reference: every pair's margin is 0, the loss log 2
    assert loss[0] == pytest.approx(math.log(2), abs=1e-4) and acc[0] == 0.0
    assert any(v != pytest.approx(math.log(2), abs=1e-4) for v in loss[1:])  # and then it trains
    s = json.loads((run / "summary.json").read_text())
    assert s["reward_name"] == "digit_fidelity" and s["reward_queries"] == 0  # offline: no reward in training
