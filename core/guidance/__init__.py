"""Test-time alignment methods (no weight change), compared at equal denoiser evaluations (NFE)."""

from diffalign.core.guidance.base import (
    BestOfN,
    PlainSampling,
    TestTimeMethod,
    count_denoiser_rows,
)
from diffalign.core.guidance.dno import DirectNoiseOptimization, noise_regulariser
from diffalign.core.guidance.reward_guidance import RewardGuidance, RewardGuidanceHook
from diffalign.core.guidance.smc import (
    FKSteering,
    FKSteeringHook,
    effective_sample_size,
    multinomial_resample,
)
from diffalign.core.guidance.svdd import SVDD, SVDDHook

__all__ = [
    "SVDD",
    "BestOfN",
    "DirectNoiseOptimization",
    "FKSteering",
    "FKSteeringHook",
    "PlainSampling",
    "RewardGuidance",
    "RewardGuidanceHook",
    "SVDDHook",
    "TestTimeMethod",
    "count_denoiser_rows",
    "effective_sample_size",
    "multinomial_resample",
    "noise_regulariser",
]
