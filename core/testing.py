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


def class_ids(batch: Mapping[str, Any], num_classes: int) -> Tensor:
    """The class ids (B,) under the batch's "prompt" key (ints, digit strings or a tensor), checked."""
    if "prompt" not in batch:
        raise KeyError(f"the toy backbones read class ids from batch key 'prompt'; got keys {sorted(batch)}")
    values = batch["prompt"]
    if isinstance(values, Tensor):
        labels = values.reshape(-1)
    else:
        try:
            labels = torch.as_tensor([int(v) for v in values])
        except (TypeError, ValueError) as e:
            raise ValueError(f"toy conditions are class ids (ints), got {list(values)[:4]}: {e}") from None
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"class ids must be in [0, {num_classes}), got {labels.tolist()}")
    return labels.long()


class ToyBackbone(Backbone):
    """A class-conditional MLP denoiser on `dim`-dimensional points.

    Conditions are class ids under batch key "prompt" (ints or digit strings); class `num_classes` is
    the null condition for classifier-free guidance. (Preference batches use "label" for the
    preference strength: the condition is always read from "prompt".)

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

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"label": class_ids(batch, self.num_classes).to(self.class_emb.weight.device)}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
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


class PointSetBackbone(Backbone):
    """Sets of 2-D points whose size varies per sample: the core's variable-size test double.

    Model space: (B, N, 2) with N = `max_points`, and a mask (B, N) of real points (`variable_axis` 0).
    A condition is a class id c under "prompt"; its sets have `min_points + c % (max_points − min_points
    + 1)` points. The denoiser is a per-point MLP over the point, the masked mean of the set, the time
    and the class — and deliberately *leaky*: it returns non-zero outputs at padded rows, so a test on
    it shows that the core (not the backbone) keeps padding out of noise, states, losses and gradients.

    Sample layout (`decode`): `{"points": (B, N, 2), "mask": (B, N)}`, padding explicit (zeros, mask 0).
    `encode` takes that layout, or a list of (n_i, 2) tensors or of one-sample layouts `{"points": (N, 2),
    "mask": (N,)}` (what `diffalign feedback` saves per sample), padded with `functional.pad_stack`.

    With `probe_gradients`, every denoiser output that requires grad records the largest |gradient|
    that reaches its padded rows in `padded_grad_max` (what the contract test asserts is 0).
    """

    variable_axis = 0

    def __init__(
        self,
        num_classes: int = 3,
        max_points: int = 5,
        min_points: int = 2,
        hidden: int = 32,
        prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] = "epsilon",
        probe_gradients: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= min_points <= max_points:
            raise ValueError(f"need 1 <= min_points <= max_points, got {min_points}, {max_points}")
        self.num_classes, self.max_points, self.min_points = num_classes, max_points, min_points
        self.prediction_type = prediction_type
        emb = 8
        self.class_emb = nn.Embedding(num_classes + 1, emb)
        self.net = nn.Sequential(
            nn.Linear(4 + 2 * emb, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )
        self.time_dim = emb
        self.probe_gradients = probe_gradients
        self.padded_grad_max: list[float] = []

    def make_scheduler(self) -> Any:
        return standard_scheduler(self.prediction_type, 1000)

    def num_points(self, labels: Tensor) -> Tensor:
        return self.min_points + labels.long() % (self.max_points - self.min_points + 1)

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"label": class_ids(batch, self.num_classes).to(self.class_emb.weight.device)}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        return {"label": torch.full_like(cond["label"], self.num_classes)}

    def mask_for(self, labels: Tensor) -> Tensor:
        n = self.num_points(labels)
        return (torch.arange(self.max_points, device=labels.device)[None, :] < n[:, None]).float()

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        from diffalign.core.functional import masked_noise

        mask = self.mask_for(cond["label"])
        x = masked_noise((mask.shape[0], self.max_points, 2), generator, mask, device=mask.device)
        return x, mask

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        b, n = x_t.shape[:2]
        m = mask if mask is not None else torch.ones((b, n), device=x_t.device)
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.dim() == 0 else t
        pooled = (x_t * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        h = torch.cat(
            [
                x_t.float(),
                pooled[:, None, :].expand(b, n, 2),
                timestep_features(t, self.time_dim, 1000)[:, None, :].expand(b, n, self.time_dim),
                self.class_emb(cond["label"])[:, None, :].expand(b, n, self.time_dim),
            ],
            dim=-1,
        )
        out = self.net(h)
        if self.probe_gradients and out.requires_grad and mask is not None:
            pad = (m == 0)[..., None]

            def record(g: Tensor) -> None:
                self.padded_grad_max.append(float(g.abs().masked_select(pad).max()) if pad.any() else 0.0)

            out.register_hook(record)
        return out

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> dict[str, Tensor]:
        request.pop("generator", None)
        if request:
            raise ValueError(f"PointSetBackbone.decode takes no options, got {sorted(request)}")
        m = mask if mask is not None else torch.ones(x0.shape[:2], device=x0.device)
        return {"points": x0 * m[..., None], "mask": m}

    def encode(self, samples: Any) -> tuple[Tensor, Tensor | None]:
        from diffalign.core.functional import pad_stack

        if isinstance(samples, Mapping):
            points, mask = (
                torch.as_tensor(samples["points"]).float(),
                torch.as_tensor(samples["mask"]).float(),
            )
        else:
            sets = [
                torch.as_tensor(x["points"]).float()[torch.as_tensor(x["mask"]) > 0]
                if isinstance(x, Mapping)
                else torch.as_tensor(x).float()
                for x in samples
            ]
            if any(x.shape[0] > self.max_points for x in sets):
                raise ValueError(f"a point set has more than max_points={self.max_points} points")
            points, mask = pad_stack(sets, axis=0)
        points = _pad_points(points, self.max_points)
        mask = _pad_points(mask[..., None], self.max_points)[..., 0]
        dev = self.class_emb.weight.device
        return (points * mask[..., None]).to(dev), mask.to(dev)


def _pad_points(x: Tensor, n: int) -> Tensor:
    from diffalign.core.functional import pad_along

    return pad_along(x, n, 1)


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


class PointSetReward(Reward):
    """Mean over the real points of a `PointSetBackbone` sample of exp(−‖p − center‖²/2) (differentiable;
    reads the padding from the layout's mask)."""

    differentiable = True

    def __init__(self, center: Sequence[float] = (1.0, 0.0)) -> None:
        super().__init__("point_set")
        self.center = torch.tensor(list(center), dtype=torch.float32)

    def forward(self, samples: Mapping[str, Tensor], cond: Cond) -> RewardOutput:
        p, m = samples["points"].float(), samples["mask"].float()
        d2 = ((p - self.center.to(p.device)) ** 2).sum(-1)
        per_point = torch.exp(-d2 / 2) * m
        return RewardOutput(scores=per_point.sum(1) / m.sum(1).clamp_min(1))


class FlakyReward(Reward):
    """Wraps a reward and makes chosen rows NaN or raise (tests the reward guard).

    Rows are identified by `cond["row"]` (a tensor or a metadata list) when present (so a per-sample
    retry knows which row it is scoring), else by position in the batch.
    """

    def __init__(self, base: Reward, nan_rows: Sequence[int] = (), raise_rows: Sequence[int] = ()) -> None:
        super().__init__("flaky")
        self.base, self.nan_rows, self.raise_rows = base, set(nan_rows), set(raise_rows)

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        rows = list(cond["row"]) if "row" in cond else list(range(samples.shape[0]))
        rows = [int(r) for r in rows]
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
    recorded ones (ratio == 1); gradients reach only trainable parameters; `encode` returns
    `(x0, mask | None)`; padded entries (mask 0) of every state stay unchanged.
    """
    from diffalign.core.functional import expand_mask
    from diffalign.core.policy import DiffusionPolicy

    policy = DiffusionPolicy(backbone, kernel, num_steps=num_steps)
    cond = backbone.condition(batch)
    x, mask = backbone.init_noise(cond, torch.Generator().manual_seed(0))
    t = torch.full((x.shape[0],), policy.kernel.num_train_timesteps // 2, device=x.device)
    out = backbone.denoise(x, t, cond, mask)
    assert out.shape == x.shape, f"denoise returned {tuple(out.shape)} for input {tuple(x.shape)}"
    t1 = policy.rollout(cond, torch.Generator().manual_seed(1))
    t2 = policy.rollout(cond, torch.Generator().manual_seed(1))
    assert torch.equal(t1.states, t2.states), "rollout with the same seed is not deterministic"
    if t1.mask is not None:
        pad = expand_mask(t1.mask, t1.states[:, 0]) == 0
        for i in range(1, t1.num_steps + 1):
            assert torch.equal(t1.states[:, i][pad], t1.states[:, 0][pad]), "a padded entry changed"
    enc = backbone.encode(backbone.decode(t1.x0, t1.mask))
    assert isinstance(enc, tuple) and len(enc) == 2, "encode must return (x0, mask | None)"
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


class SignalAt(Callback):
    """Sends its own process a signal at the start of (epoch, batch): SIGKILL is a crash (resume tests),
    SIGTERM or SIGINT a scheduler's or a user's stop (interrupted-export tests).

    Args:
        epoch, batch: where the signal is sent.
        signal: its name, e.g. "SIGKILL", "SIGTERM", "SIGINT".
    """

    def __init__(self, epoch: int, batch: int = 0, signal: str = "SIGKILL") -> None:
        import signal as signals

        if not hasattr(signals, signal):
            raise ValueError(f"SignalAt: unknown signal {signal!r}")
        self.epoch, self.batch, self.signum = epoch, batch, getattr(signals, signal)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


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
