"""The one interface a modality implements: tensors and conditioning in, model output out.

A backbone never exposes its internals (no `unet`, `vae`, `tokenizer` in the interface): the core only
needs to draw noise, call the denoiser, and decode final samples into the modality's documented layout.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.functional import Generator
from diffalign.core.types import Cond

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]


def standard_scheduler(
    prediction_type: str,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    clip_sample: bool = False,
) -> Any:
    """The schedule most backbones describe in `make_scheduler`: a `FlowMatchEulerDiscreteScheduler`
    (shift 1) for "flow", else a `DDPMScheduler` with this prediction type and beta schedule
    (`clip_sample` clips the predicted x0 to [−1, 1] while sampling)."""
    if prediction_type == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=1.0,
    )


class Backbone(nn.Module, ABC):
    """A conditional denoiser plus the few facts the core needs about its modality.

    Subclasses implement the abstract methods; the defaults below suit most backbones.

    Attributes:
        prediction_type: what `denoise` predicts: "epsilon", "v_prediction", "sample" (x0) or
            "flow" (velocity ε − x0 of rectified flow).
    """

    prediction_type: PredictionType = "epsilon"

    def __init__(self) -> None:
        super().__init__()
        self._reference_copy: list[Backbone] = []  # a list hides it from nn.Module registration

    @abstractmethod
    def make_scheduler(self) -> Any:
        """A fresh diffusers scheduler describing this model's noise schedule."""

    @abstractmethod
    def encode_condition(self, batch: Mapping[str, Any]) -> Cond:
        """Turn a data batch (e.g. {"prompt": [...]}) into a dict of batched tensors."""

    @abstractmethod
    def null_condition(self, cond: Cond) -> Cond:
        """The unconditional counterpart of `cond` (same batch size) for classifier-free guidance."""

    @abstractmethod
    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        """Initial noise x_T for each condition, and an optional mask for padded samples."""

    @abstractmethod
    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        """The model output at timestep(s) `t` (a scalar or a (B,) tensor)."""

    def decode(self, x0: Tensor, mask: Tensor | None = None) -> Any:
        """Final model-space samples to the modality's documented sample layout (identity here)."""
        return x0

    def encode(self, samples: Any) -> Tensor:
        """Samples in the documented layout to model space (identity here), for offline data."""
        return samples

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimiser should update (LoRA adapters where they apply)."""
        return (p for p in self.parameters() if p.requires_grad)

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current weights as the reference model (KL, DPO).

        Backbones with adapters override `reference()` instead and keep no copy.
        """
        ref = copy.deepcopy(self)
        ref._reference_copy = []
        ref.requires_grad_(False).eval()
        self._reference_copy = [ref]

    @contextmanager
    def reference(self) -> Iterator[Backbone]:
        """Context giving the frozen base model: `with backbone.reference() as ref: ref.denoise(...)`."""
        if not self._reference_copy:
            raise RuntimeError(
                f"{type(self).__name__} has no reference model: call freeze_reference() first "
                "(AlignmentModule does this for algorithms with needs_reference = True)"
            )
        ref = self._reference_copy[0]
        dev = next(self.parameters(), None)
        if dev is not None:
            ref.to(dev.device)
        with torch.no_grad():
            yield ref
