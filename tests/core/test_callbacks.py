"""Callbacks: the ratio consistency check catches a sampler/trainer mismatch."""

import pytest
from torch import nn

from diffalign.core.algorithms import DDPO
from diffalign.core.callbacks import RatioConsistencyCheck
from diffalign.core.data import PromptDataModule
from diffalign.core.module import AlignmentModule
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import LinearReward, ToyBackbone
from tests.helpers import quiet_trainer


class DropoutToy(ToyBackbone):
    """A toy backbone with dropout: left in train mode, re-scoring no longer matches sampling."""

    def __init__(self) -> None:
        super().__init__(hidden=16, depth=2)
        self.net.insert(1, nn.Dropout(0.5))


def _fit(backbone, check):
    module = AlignmentModule(DiffusionPolicy(backbone, num_steps=3), DDPO(advantages="batch"), LinearReward())
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=[check],
    )
    trainer.fit(module, PromptDataModule(prompts=[0, 1, 2, 3], batch_size=8, batches_per_epoch=1))
    return check


def test_ratio_is_one_before_the_first_update_of_a_consistent_run():
    check = _fit(ToyBackbone(hidden=16, depth=2), RatioConsistencyCheck(tolerance=1e-5))
    assert check.checked == 2 and check.worst < 1e-5


def test_a_mismatch_between_sampling_and_rescoring_is_reported():
    with pytest.warns(UserWarning, match="deviates from 1 by up to"):
        check = _fit(DropoutToy(), RatioConsistencyCheck(tolerance=1e-4))
    assert check.worst > 1e-3
    with pytest.raises(RuntimeError, match="sampling and re-scoring disagree"):
        _fit(DropoutToy(), RatioConsistencyCheck(raise_error=True))
