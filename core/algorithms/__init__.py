"""Alignment algorithms, one file each."""

from diffalign.core.algorithms.base import Algorithm, AlignContext
from diffalign.core.algorithms.ddpo import DDPO, ddpo_loss
from diffalign.core.algorithms.supervised import SupervisedDenoising

__all__ = ["DDPO", "AlignContext", "Algorithm", "SupervisedDenoising", "ddpo_loss"]
