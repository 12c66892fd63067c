"""Strategies for the CPU tests."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

#: gradient buckets all-reduced by `CountingDDPStrategy` in this process
ALL_REDUCES = [0]


def counting_hook(state, bucket):  # unannotated: torch's DDP checks a hook's annotations
    """A DDP communication hook that counts the gradient buckets it all-reduces (then all-reduces)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ALL_REDUCES[0] += 1
    return allreduce_hook(state, bucket)


class CountingDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy with `counting_hook` registered, on CPU too (Lightning registers DDP
    communication hooks on CUDA only; torch's DDP takes them on gloo as well)."""

    def _register_ddp_hooks(self) -> None:
        self.model.register_comm_hook(None, counting_hook)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU with gloo, for tests of sharded training without a GPU.

    Lightning refuses the FSDPStrategy class itself on a CPU accelerator (an exact type check) and
    passes FSDP no device on CPU (for the root and for units wrapped in `configure_model`), which
    torch's FSDP then refuses; given `device_id=cpu`, torch's FSDP shards on CPU. Everything else is
    Lightning's strategy.
    """

    def _setup_model(self, model: torch.nn.Module) -> Any:
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(
            wrapper_cls=FullyShardedDataParallel,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        ):
            yield

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Lightning gathers the full state dict with offload_to_cpu, which on CPU weights hands back memory
        # that FSDP frees at once (a segfault in torch 2.11); on CPU there is nothing to offload
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()
