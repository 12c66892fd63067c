"""Test doubles and contract checks that ship with the library.

`ToyBackbone` (an MLP on points), reward doubles, fake-trajectory builders, and `check_backbone`, which
any backbone — inside or outside this project — can run to prove it fits the core.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from diffalign.core.backbone import Backbone, standard_scheduler
from diffalign.core.functional import Generator, randn
from diffalign.core.io import AtomicCheckpointIO, atomic_write
from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond, Trajectory


def timestep_features(t: Tensor, dim: int, scale: float) -> Tensor:
    """Sinusoidal features of timesteps `t` (B,) divided by `scale`, shape (B, dim)."""
    t = t.float().reshape(-1) / scale
    half = dim // 2
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), half, device=t.device))
    angles = t[:, None] * freqs[None, :] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ToyBackbone(Backbone):
    """A class-conditional MLP denoiser on `dim`-dimensional points.

    Conditions are class ids under batch key "prompt" (or "label"); class `num_classes` is the null
    condition for classifier-free guidance.

    Args:
        dim: point dimension.
        num_classes: number of conditions.
        hidden: hidden width; depth: hidden layers.
        prediction_type: "epsilon", "v_prediction" or "sample" with a DDPM schedule, or "flow" with a
            flow-matching schedule.
        num_train_timesteps: training timesteps of the schedule.
        beta_schedule: diffusers beta schedule name (DDPM family only).
        weights: optional safetensors file (path or pkg:// spec) to load.
    """

    def __init__(
        self,
        dim: int = 2,
        num_classes: int = 4,
        hidden: int = 64,
        depth: int = 3,
        prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        emb = 16
        self.class_emb = nn.Embedding(num_classes + 1, emb)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * emb, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)
        self.time_dim = emb
        if weights is not None:
            from diffalign.core.io import load_state_dict

            load_state_dict(self, weights)

    def make_scheduler(self) -> Any:
        return standard_scheduler(self.prediction_type, self.num_train_timesteps, self.beta_schedule)

    def encode_condition(self, batch: Mapping[str, Any]) -> Cond:
        labels = batch.get("label", batch.get("prompt"))
        if labels is None:
            raise KeyError(f"ToyBackbone needs class ids under 'prompt' or 'label'; got keys {sorted(batch)}")
        labels = torch.as_tensor([int(v) for v in labels] if isinstance(labels, (list, tuple)) else labels)
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(f"class ids must be in [0, {self.num_classes}), got {labels.tolist()}")
        return {"label": labels.long().to(self.class_emb.weight.device)}

    def null_condition(self, cond: Cond) -> Cond:
        return {"label": torch.full_like(cond["label"], self.num_classes)}

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        b = cond["label"].shape[0]
        return randn((b, self.dim), generator, device=self.class_emb.weight.device), None

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        h = torch.cat(
            [
                x_t.float(),
                timestep_features(t, self.time_dim, self.num_train_timesteps),
                self.class_emb(cond["label"]),
            ],
            dim=-1,
        )
        return self.net(h)


# ---------------------------------------------------------------------------------------------------
# Reward doubles
# ---------------------------------------------------------------------------------------------------
def _flat(samples: Tensor) -> Tensor:
    return samples.reshape(samples.shape[0], -1).float()


def squared_norm(samples: Tensor, cond: Cond, scale: float = 1.0) -> Tensor:
    """A plain reward function (for `FunctionReward`): −scale·‖x‖² per sample."""
    return -scale * _flat(samples).pow(2).sum(-1)


class ConstantReward(Reward):
    """Every sample scores `value` (sanity checks: no learning signal)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__("constant")
        self.value = value

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        return RewardOutput(scores=torch.full((samples.shape[0],), self.value, device=samples.device))


class LinearReward(Reward):
    """r(x) = w·flatten(x) + b, differentiable (w defaults to all ones)."""

    differentiable = True

    def __init__(self, weight: Sequence[float] | None = None, bias: float = 0.0) -> None:
        super().__init__("linear")
        self.weight = None if weight is None else torch.tensor(list(weight), dtype=torch.float32)
        self.bias = bias

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        x = _flat(samples)
        w = torch.ones(x.shape[1], device=x.device) if self.weight is None else self.weight.to(x.device)
        return RewardOutput(scores=x @ w + self.bias)


class FlakyReward(Reward):
    """Wraps a reward and makes chosen rows NaN or raise (tests the reward guard).

    Rows are identified by `cond["row"]` when present (so a per-sample retry knows which row it is
    scoring), else by position in the batch.
    """

    def __init__(self, base: Reward, nan_rows: Sequence[int] = (), raise_rows: Sequence[int] = ()) -> None:
        super().__init__("flaky")
        self.base, self.nan_rows, self.raise_rows = base, set(nan_rows), set(raise_rows)

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        rows = cond["row"].tolist() if "row" in cond else list(range(samples.shape[0]))
        bad = sorted(self.raise_rows.intersection(rows))
        if bad:
            raise ValueError(f"flaky reward failed on rows {bad}")
        scores = self.base(samples, cond).scores.clone()
        for i, r in enumerate(rows):
            if r in self.nan_rows:
                scores[i] = float("nan")
        return RewardOutput(scores=scores)


# ---------------------------------------------------------------------------------------------------
# Fake data and contract checks
# ---------------------------------------------------------------------------------------------------
def fake_trajectory(
    batch: int = 2, steps: int = 4, event_shape: Sequence[int] = (2,), seed: int = 0, with_mask: bool = False
) -> Trajectory:
    """A random trajectory of the right shapes (for loss and container tests)."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn((batch, steps + 1, *event_shape), generator=g)
    mask = (torch.rand((batch, *event_shape), generator=g) > 0.2).float() if with_mask else None
    return Trajectory(
        states=states,
        timesteps=torch.linspace(999, 0, steps).round().long().expand(batch, -1).clone(),
        log_probs=torch.randn((batch, steps), generator=g),
        cond={"label": torch.arange(batch) % 2},
        mask=mask,
        rewards=torch.randn(batch, generator=g),
        advantages=torch.randn(batch, generator=g),
        extras={"prompt": [f"p{i}" for i in range(batch)]},
    )


def check_backbone(
    backbone: Backbone, batch: Mapping[str, Any], kernel: Any = None, num_steps: int = 3, atol: float = 1e-5
) -> None:
    """Assert that a backbone fits the core contract (raises AssertionError naming the failed check).

    Checks: init_noise/denoise shapes; a seeded rollout is deterministic; re-scored log-probs equal the
    recorded ones (ratio == 1); gradients reach only trainable parameters.
    """
    from diffalign.core.policy import DiffusionPolicy

    policy = DiffusionPolicy(backbone, kernel, num_steps=num_steps)
    cond = backbone.encode_condition(batch)
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.full((x.shape[0],), policy.kernel.num_train_timesteps // 2, device=x.device)
    out = backbone.denoise(x, t, cond, mask)
    assert out.shape == x.shape, f"denoise returned {tuple(out.shape)} for input {tuple(x.shape)}"
    t1 = policy.rollout(cond, torch.Generator().manual_seed(1))
    t2 = policy.rollout(cond, torch.Generator().manual_seed(1))
    assert torch.equal(t1.states, t2.states), "rollout with the same seed is not deterministic"
    for step in range(num_steps):
        lp = policy.log_prob(t1, step).log_prob
        err = (lp - t1.log_probs[:, step]).abs().max().item()
        assert err <= atol, f"re-scored log-prob differs from the recorded one by {err} at step {step}"
    policy.zero_grad(set_to_none=True)
    policy.log_prob(t1, 0).log_prob.sum().backward()
    trainable = {id(p) for p in backbone.trainable_parameters()}
    for name, p in backbone.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert id(p) in trainable, f"gradient reached frozen parameter {name}"
    assert any(p.grad is not None for p in backbone.trainable_parameters()), "no gradient reached the model"
    policy.zero_grad(set_to_none=True)


class SigkillAt(Callback):
    """Kills its own process with SIGKILL at the start of (epoch, batch): a crash, for resume tests."""

    def __init__(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class SigkillWhileSaving(AtomicCheckpointIO):
    """Checkpoint I/O that kills its own process with SIGKILL during its `save`-th checkpoint write, after
    the temporary file is complete and before it is renamed into place: the worst moment of an atomic
    write (resume tests; give it as `trainer.plugins`)."""

    def __init__(self, save: int = 1) -> None:
        super().__init__()
        self.save, self.count = save, 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.count += 1
        if self.count != self.save:
            return super().save_checkpoint(checkpoint, path, storage_options)

        def write_then_die(tmp: Any) -> None:
            torch.save(checkpoint, tmp)
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(path, write_then_die)
