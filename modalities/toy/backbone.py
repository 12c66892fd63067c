"""The toy modality's backbone: the core's MLP `ToyBackbone` with the mixture's defaults."""

from __future__ import annotations

from typing import Literal

from diffalign.core.testing import ToyBackbone

BASE_WEIGHTS = "pkg://diffalign.modalities.toy/toy_base.safetensors"
FLOW_BASE_WEIGHTS = (
    "pkg://diffalign.modalities.toy/toy_flow_base.safetensors"  # recipes/toy/pretrain_flow.yaml
)


class MixtureBackbone(ToyBackbone):
    """Class-conditional MLP denoiser for the 4-component mixture.

    Args:
        weights: safetensors weights; the default is the shipped base model trained by
            `recipes/toy/pretrain.yaml`. None starts from random weights (pretraining).
        prediction_type, num_classes, hidden, depth: as in `ToyBackbone`.
    """

    def __init__(
        self,
        weights: str | None = BASE_WEIGHTS,
        num_classes: int = 4,
        hidden: int = 64,
        depth: int = 3,
        prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] = "epsilon",
    ) -> None:
        super().__init__(
            dim=2,
            num_classes=num_classes,
            hidden=hidden,
            depth=depth,
            prediction_type=prediction_type,
            weights=weights,
        )
