"""LoRA for any backbone: peft adapters on chosen submodules, the base weights frozen and shared.

`LoRABackbone(backbone, rank=4, target_modules=[...])` wraps any `Backbone` (a diffusers UNet or
transformer inside an image/video/audio backbone, an EGNN, a toy MLP): it injects peft LoRA layers into
the modules whose names match `target_modules`, freezes every other weight, and trains only the adapters.
The reference model that KL penalties and DPO-style losses need is the same network with the adapters
switched off — no second copy of the weights is kept. Adapters go into `backbone.lora_target()` (the
denoising network: a Stable Diffusion backbone names its UNet, so the VAE and text encoder stay as
they are).

In a recipe:

```yaml
backbone:
  class_path: diffalign.core.lora.LoRABackbone
  init_args:
    backbone:
      class_path: diffalign.modalities.image.ImageBackbone
    rank: 4
    target_modules: [to_q, to_k, to_v, to_out.0]
```

Everything else a backbone offers (decode, encode, `save_samples`, ...) is passed through.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.backbone import Backbone
from diffalign.core.extras import require
from diffalign.core.functional import Generator
from diffalign.core.types import Cond

#: the attention projections diffusers' own LoRA scripts adapt (UNet2DConditionModel, DiT, ...)
DIFFUSERS_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class LoRABackbone(Backbone):
    """Low-rank adapters (peft) on `target_modules` of a wrapped backbone; only the adapters train.

    Args:
        backbone: the backbone to adapt (its weights are frozen; load base weights in it first).
        rank: r, the adapters' rank.
        alpha: LoRA alpha (scale alpha / r); None means alpha = r (scale 1).
        target_modules: names (or name suffixes) of the `nn.Linear`/`nn.Conv2d`/`nn.Embedding` modules to
            adapt, as peft matches them; default: diffusers' attention projections.
        dropout: dropout inside the adapters (keep 0 for policy gradients: dropout makes the re-scored
            log-probabilities differ from the sampled ones).
        weights: optional adapter weights to load: a safetensors file (path or pkg:// spec) written by
            `save_adapters`, or — for a backbone with a `load_lora` method of its own ecosystem's format
            (Stable Diffusion: diffusers' LoRA files) — a file or folder in that format.
        base_dtype: cast the frozen weights of the adapted module to this dtype ("bfloat16" halves their
            memory on a GPU); the adapters stay float32. The backbone must run its denoiser in its weights'
            dtype (StableDiffusionBackbone does). None keeps them as they are.
    """

    def __init__(
        self,
        backbone: Backbone,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: Sequence[str] = DIFFUSERS_ATTENTION,
        dropout: float = 0.0,
        weights: str | None = None,
        base_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    ) -> None:
        super().__init__()
        require("peft", "lora", "LoRABackbone")
        from peft import LoraConfig, inject_adapter_in_model

        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not target_modules:
            raise ValueError("target_modules is empty: name at least one module to adapt")
        self.inner = backbone
        self.variable_axis = backbone.variable_axis
        self.decode_chunk_size = backbone.decode_chunk_size
        self.rank, self.alpha = rank, alpha if alpha is not None else float(rank)
        self.target_modules = list(target_modules)
        self.prediction_type = backbone.prediction_type
        backbone.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=self.alpha,
            lora_dropout=dropout,
            target_modules=self.target_modules,
            init_lora_weights=True,  # B = 0: the adapted model starts equal to the base
        )
        target = backbone.lora_target()
        try:
            inject_adapter_in_model(config, target)
        except ValueError as e:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in target.named_modules() if n})
            raise ValueError(
                f"LoRA target_modules {self.target_modules} match no module of {type(backbone).__name__} "
                f"(module names include {names[:20]}): {e}"
            ) from e
        self._layers = _tuner_layers(target)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if base_dtype is not None and base_dtype not in dtype:
            raise ValueError(f"base_dtype must be one of {sorted(dtype)}, got {base_dtype!r}")
        for n, p in target.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()  # adapters train in float32, even over a low-precision base
            elif base_dtype is not None:
                p.data = p.data.to(dtype[base_dtype])
        for n, p in backbone.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        if weights is not None:
            self.load_adapters(weights)

    # -- the adapters --------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter weights only (what training changes)."""
        return {n: p.detach() for n, p in self.inner.named_parameters() if "lora_" in n}

    def save_adapters(self, path: str | Path) -> Path:
        """Write the adapter weights to a safetensors file (atomically); returns its path."""
        from safetensors.torch import save_file

        from diffalign.core.io import atomic_write

        state = {k: v.cpu().contiguous() for k, v in self.adapter_state_dict().items()}
        return atomic_write(path, lambda p: save_file(state, str(p)))

    def load_adapters(self, path: str) -> None:
        """Load adapter weights written by `save_adapters` (clear error when they do not fit)."""
        from safetensors.torch import load_file

        from diffalign.core.io import resolve_path

        file = resolve_path(path)
        own = self.adapter_state_dict()
        if not Path(file).is_file() or set(load_file(str(file))) != set(own):
            ecosystem = getattr(self.inner, "load_lora", None)
            if ecosystem is not None:  # e.g. diffusers' LoRA format for Stable Diffusion
                ecosystem(file)
                return
        if not Path(file).is_file():
            raise FileNotFoundError(f"LoRA adapter weights not found: {file}")
        state = load_file(str(file))
        if set(state) != set(own):
            extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
            raise ValueError(f"adapters in {file} do not fit: unexpected {extra[:3]}, missing {missing[:3]}")
        bad = [k for k in own if own[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"adapters in {file} have other shapes (rank?): {bad[:3]}")
        with torch.no_grad():
            for n, p in self.inner.named_parameters():
                if n in state:
                    p.copy_(state[n])

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.inner.named_parameters() if "lora_" in n and p.requires_grad)

    def shard_units(self) -> list[str]:
        return [f"inner.{name}" for name in self.inner.shard_units()]

    def _frozen(self) -> list[nn.Module]:
        return self.inner._frozen()

    def lora_target(self) -> nn.Module:
        """The adapted network: the wrapped backbone's `lora_target()` (e.g. the UNet)."""
        return self.inner.lora_target()

    def freeze_reference(self) -> None:
        """Nothing to copy: the reference is this network with the adapters off."""

    @contextmanager
    def reference(self) -> Iterator[Backbone]:
        """Yields the wrapped backbone with every adapter disabled, under torch.no_grad().

        The adapters are switched off by peft's flag alone: peft's `enable_adapters` also flips the
        adapters' requires_grad, which under FSDP (`use_orig_params`) between a forward pass and its
        backward pass loses the adapters' gradients of the live forward pass."""
        for layer in self._layers:
            layer._disable_adapters = True
        try:
            with torch.no_grad():
                yield self.inner
        finally:
            for layer in self._layers:
                layer._disable_adapters = False

    # -- the Backbone interface, delegated ----------------------------------------------------------
    def make_scheduler(self) -> Any:
        return self.inner.make_scheduler()

    def encode_condition(self, batch: Mapping[str, Any]) -> Cond:
        return self.inner.encode_condition(batch)

    def null_condition(self, cond: Cond) -> Cond:
        return self.inner.null_condition(cond)

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        return self.inner.init_noise(cond, generator)

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        return self.inner.denoise(x_t, t, cond, mask)

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> Any:
        return self.inner.decode(x0, mask, **request)

    def encode(self, samples: Any) -> tuple[Tensor, Tensor | None]:
        return self.inner.encode(samples)

    def features(self, samples: Any) -> Tensor | None:
        return self.inner.features(samples)

    def condition(self, batch: Mapping[str, Any]) -> Cond:
        return self.inner.condition(batch)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = super().__getattr__("inner")
            return getattr(inner, name)
