"""Modality-agnostic reward combinators (defined in the core, re-exported here for recipes)."""

from diffalign.core.reward import FunctionReward, GuardedReward, Reward, RewardOutput, WeightedSum

__all__ = ["FunctionReward", "GuardedReward", "Reward", "RewardOutput", "WeightedSum"]
