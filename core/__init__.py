"""diffalign's modality-agnostic core: trajectories, kernels, policy, rewards, algorithms, Lightning."""

from diffalign.core.backbone import Backbone
from diffalign.core.kernels import DDIMKernel, DDPMKernel, FlowSDEKernel, StepOutput, TransitionKernel
from diffalign.core.policy import DiffusionPolicy, RolloutHook, RolloutState
from diffalign.core.reward import FunctionReward, GuardedReward, Reward, RewardOutput, WeightedSum
from diffalign.core.types import PreferencePair, Trajectory

__all__ = [
    "Backbone",
    "DDIMKernel",
    "DDPMKernel",
    "DiffusionPolicy",
    "FlowSDEKernel",
    "FunctionReward",
    "GuardedReward",
    "PreferencePair",
    "Reward",
    "RewardOutput",
    "RolloutHook",
    "RolloutState",
    "StepOutput",
    "Trajectory",
    "TransitionKernel",
    "WeightedSum",
]
