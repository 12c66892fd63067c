"""diffalign's modality-agnostic core: trajectories, kernels, policy, rewards, algorithms, Lightning.

Names are imported lazily on first use, so `diffalign recipes` or `diffalign score` do not pay for torch,
diffusers and lightning until they need them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backbone": "diffalign.core.backbone",
    "DDIMKernel": "diffalign.core.kernels",
    "DDPMKernel": "diffalign.core.kernels",
    "FlowSDEKernel": "diffalign.core.kernels",
    "StepOutput": "diffalign.core.kernels",
    "TransitionKernel": "diffalign.core.kernels",
    "DiffusionPolicy": "diffalign.core.policy",
    "RolloutHook": "diffalign.core.policy",
    "RolloutState": "diffalign.core.policy",
    "FunctionReward": "diffalign.core.reward",
    "GuardedReward": "diffalign.core.reward",
    "Reward": "diffalign.core.reward",
    "RewardOutput": "diffalign.core.reward",
    "WeightedSum": "diffalign.core.reward",
    "PreferencePair": "diffalign.core.types",
    "Trajectory": "diffalign.core.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffalign.core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
