"""2-D toy modality: a Gaussian mixture whose components are the conditions.

Sample layout: float tensor (B, 2), points in the plane. Condition: the component id (int).
"""

from diffalign.modalities.toy.backbone import BASE_WEIGHTS, FLOW_BASE_WEIGHTS, MixtureBackbone
from diffalign.modalities.toy.data import GaussianMixture, MixtureDataModule

__all__ = ["BASE_WEIGHTS", "FLOW_BASE_WEIGHTS", "GaussianMixture", "MixtureBackbone", "MixtureDataModule"]
