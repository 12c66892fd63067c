"""Reward modelling: learn a reward from preferences (Bradley–Terry pairs, Plackett–Luce rankings).

`RewardModelModule` trains any scoring network on a `PreferenceDataModule`. The network's contract:
`forward(samples, prompts) -> (B,) scores`, where `samples` are in the modality's layout and `prompts`
the B conditions of the rows (a list, or None when the data has none); a network that ignores prompts
simply takes the argument and leaves it unused.

- pairs (winner, loser, label y): Bradley–Terry, −[y·log σ(s_w − s_l) + (1 − y)·log σ(s_l − s_w)];
- rankings (`ranking`: (B, K, ...) samples ordered best → worst): Plackett–Luce,
  −Σ_k [s_k − log Σ_{j ≥ k} exp(s_j)].

It logs `train/loss`, `train/pair_accuracy` (or `train/top1_accuracy`) and, on validation data,
`val/pair_accuracy`; `fit` holds out `val_fraction` of the pairs for it. At the end of training it
exports the network's weights (`export_path`), which `LearnedReward` loads as a `Reward` for alignment.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from diffalign.core.reward import LearnedReward


def bradley_terry_loss(s_w: Tensor, s_l: Tensor, label: Tensor | None = None) -> Tensor:
    """Per-pair Bradley–Terry negative log-likelihood (label y = P(winner ≻ loser), default 1)."""
    y = torch.ones_like(s_w) if label is None else label.to(s_w)
    d = s_w - s_l
    return -(y * F.logsigmoid(d) + (1 - y) * F.logsigmoid(-d))


def plackett_luce_loss(scores: Tensor) -> Tensor:
    """Per-ranking Plackett–Luce negative log-likelihood for scores (B, K) ordered best → worst."""
    rev_lse = torch.logcumsumexp(scores.flip(1), dim=1).flip(1)  # log Σ_{j≥k} exp(s_j)
    return -(scores - rev_lse)[:, :-1].sum(dim=1)


class RewardModelModule(L.LightningModule):
    """Trains a scoring network from preferences.

    Args:
        network: maps (samples, prompts) → scores (B,); see `score`.
        optimizer: optimiser factory.
        export_path: safetensors file written at the end of training (None: no export).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.optimizer_factory = optimizer
        self.export_path = export_path

    def score(self, samples: Tensor, prompts: Any = None) -> Tensor:
        """The network's (B,) scores of `samples` for `prompts`."""
        return self.network(samples, prompts).reshape(samples.shape[0])

    def _step(self, batch: dict[str, Any], prefix: str) -> Tensor:
        prompts = batch.get("prompt")
        if "ranking" in batch:
            r = batch["ranking"]
            b, k = r.shape[:2]
            s = self.score(r.flatten(0, 1), [p for p in (prompts or [None] * b) for _ in range(k)]).reshape(
                b, k
            )
            loss = plackett_luce_loss(s).mean()
            self.log(
                f"{prefix}/top1_accuracy", (s.argmax(1) == 0).float().mean(), batch_size=b, prog_bar=True
            )
        else:
            s_w, s_l = self.score(batch["winner"], prompts), self.score(batch["loser"], prompts)
            label = batch.get("label")
            loss = bradley_terry_loss(s_w, s_l, label).mean()
            decided = label != 0.5 if label is not None else torch.ones_like(s_w, dtype=torch.bool)
            acc = ((s_w > s_l) == (label > 0.5 if label is not None else True)).float()[decided].mean()
            self.log(f"{prefix}/pair_accuracy", acc, batch_size=len(s_w), prog_bar=True)
        self.log(f"{prefix}/loss", loss, batch_size=len(batch.get("winner", batch.get("ranking"))))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(self.network.parameters())

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            from diffalign.core.io import save_state_dict

            print(f"exported reward model to {save_state_dict(self.network, self.export_path)}")


__all__ = ["LearnedReward", "RewardModelModule", "bradley_terry_loss", "plackett_luce_loss"]
