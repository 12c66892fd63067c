"""The one interface a modality implements: tensors and conditioning in, model output out.

A backbone never exposes its internals (no `unet`, `vae`, `tokenizer` in the interface): the core only
needs to draw noise, call the denoiser, and decode final samples into the modality's documented layout.

Variable sizes (atoms of a molecule, points of a cloud, the length of a clip) go through one mask:
`init_noise` and `encode` return `(x, mask | None)`; the mask is 1 on real entries, shaped
(B, *event[: k]) or (B, *event), and broadcasts against x after appending trailing singleton dims. A
backbone whose samples vary in size names the varying event axis in `variable_axis`; the core pads pairs
along it and collates ragged samples into lists that `encode` pads (`functional.pad_stack`).
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
from diffalign.core.types import Cond, as_cond

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
        variable_axis: the event axis (0-based, after the batch dim) whose length varies between
            samples, or None when every sample has one shape.
        decode_chunk_size: rows `decode` runs at once in `SampleView` (None: the whole batch); bounds the
            memory of decoding large batches.
        frozen_modules: names of submodules that never train (a VAE, a text encoder): the reference
            model shares them instead of copying them.
    """

    prediction_type: PredictionType = "epsilon"
    variable_axis: int | None = None
    decode_chunk_size: int | None = None
    frozen_modules: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._reference_copy: list[Backbone] = []  # a list hides it from nn.Module registration

    @abstractmethod
    def make_scheduler(self) -> Any:
        """A fresh diffusers scheduler describing this model's noise schedule."""

    @abstractmethod
    def encode_condition(self, batch: Mapping[str, Any]) -> Cond | Mapping[str, Any]:
        """The backbone's own conditioning entries for a data batch (e.g. {"prompt": [...]} → tokens).

        Read the conditions from `batch["prompt"]` (strings, ints or dicts, per the modality's docs). Use
        `condition(batch)`, which adds the prompts as metadata, rather than calling this directly.
        """

    @abstractmethod
    def null_condition(self, cond: Cond) -> Cond | Mapping[str, Any]:
        """The unconditional counterpart of `cond` (same batch size) for classifier-free guidance.

        Return the entries the denoiser reads (e.g. empty-prompt tokens); entries left out (metadata)
        are taken from `cond`.
        """

    def condition(self, batch: Mapping[str, Any]) -> Cond:
        """The `Cond` of a data batch: `encode_condition(batch)` plus the batch's conditions as
        per-sample metadata under "prompt" (what rewards read: prompt text, target values, ids)."""
        entries = encode = self.encode_condition(batch)
        prompts = batch.get("prompt") if isinstance(batch, Mapping) else None
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is not None and "prompt" not in encode:
            if isinstance(prompts, torch.Tensor):
                prompts = prompts.reshape(-1).tolist()
            entries = {**dict(encode), "prompt": list(prompts)}
        return as_cond(entries)

    @abstractmethod
    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        """Initial noise x_T for each condition, and an optional mask for padded samples."""

    @abstractmethod
    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        """The model output at timestep(s) `t` (a scalar or a (B,) tensor)."""

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> Any:
        """Final model-space samples to the modality's documented sample layout (identity here).

        `request` holds what a reward asks for (`Reward.request`: some frames of a video, a window of
        audio, views of a shape); a backbone honours the keys it documents and refuses others. A request
        that asks for a random part (one random frame) draws it from `request["generator"]` when
        `SampleView` passes one (the run's generator in training). A layout of padded samples makes the
        padding explicit (e.g. a mask beside the values).
        """
        if request:
            raise ValueError(
                f"{type(self).__name__}.decode takes no decode options, got {sorted(request)} "
                "(a reward asked for something this modality does not provide)"
            )
        return x0

    def encode(self, samples: Any) -> tuple[Tensor, Tensor | None]:
        """Samples in the documented layout to model space, for offline data: `(x0, mask | None)`
        (identity and no mask here)."""
        return torch.as_tensor(samples), None

    def features(self, samples: Any) -> Tensor | None:
        """Per-sample feature vectors (B, D) of decoded samples: the space in which the evaluation's
        diversity guard measures distances (`core.guards`). Default: the samples flattened when they are
        one tensor (points, pixels, waveforms); None (no diversity measured) for other layouts. Override
        with a semantic embedding where the modality has one."""
        if isinstance(samples, Tensor) and samples.dim() >= 2:
            return samples.detach().float().reshape(samples.shape[0], -1)
        return None

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimiser should update (LoRA adapters where they apply)."""
        return (p for p in self.parameters() if p.requires_grad)

    def lora_target(self) -> nn.Module:
        """The module LoRA adapters go into (`core.lora.LoRABackbone`): the denoising network, not the
        frozen parts (default: the whole backbone)."""
        return self

    def shard_units(self) -> list[str]:
        """Dotted names of the submodules that FSDP shards, one unit each (`AlignmentModule` wraps them
        when the strategy is FSDP): together they must hold every trainable parameter, and `denoise`
        must call each through `__call__` (so FSDP gathers its weights before and frees them after).

        Default: `lora_target()` when it is a submodule (a UNet, a transformer), else the backbone's
        children that hold parameters; the `frozen_modules` are never sharded (FSDP leaves them whole on
        every rank, since they are used through other methods than `forward`: `vae.decode`).
        """
        target = self.lora_target()
        if target is not self:
            for name, module in self.named_modules():
                if module is target:
                    return [name]
        frozen = {id(m) for m in self._frozen()}
        return [
            name
            for name, child in self.named_children()
            if id(child) not in frozen and any(True for _ in child.parameters())
        ]

    def _frozen(self) -> list[nn.Module]:
        out = []
        for name in self.frozen_modules:
            m = getattr(self, name, None)
            if isinstance(m, (list, tuple)):  # modules kept in a list to hide them from state_dict
                out.extend(x for x in m if isinstance(x, nn.Module))
            elif isinstance(m, nn.Module):
                out.append(m)
        return out

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current trainable network as the reference model (KL, DPO).

        The modules named in `frozen_modules` are shared with the copy, not copied (they never change).
        Backbones with adapters override `reference()` instead and keep no copy.
        """
        frozen = self._frozen()
        memo: dict[int, Any] = {id(m): m for m in frozen}
        keep = {id(p) for m in frozen for p in m.parameters()}
        ref = copy.deepcopy(self, memo)
        ref._reference_copy = []
        for p in ref.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        ref.eval()
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
