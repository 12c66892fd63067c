"""Alignment algorithms, one file each."""

from diffalign.core.algorithms.alignprop import AlignProp
from diffalign.core.algorithms.awm import AWM
from diffalign.core.algorithms.base import Algorithm, AlignContext
from diffalign.core.algorithms.d3po import D3PO, pareto_compare
from diffalign.core.algorithms.ddpo import DDPO
from diffalign.core.algorithms.diffusion_dpo import DiffusionDPO, preference_loss
from diffalign.core.algorithms.diffusion_kto import DiffusionKTO, kto_loss
from diffalign.core.algorithms.dpok import DPOK
from diffalign.core.algorithms.draft import DRaFT
from diffalign.core.algorithms.grpo import GRPO
from diffalign.core.algorithms.grpo_guard import GRPOGuard
from diffalign.core.algorithms.nft import DiffusionNFT, nft_loss
from diffalign.core.algorithms.pref_grpo import PrefGRPO
from diffalign.core.algorithms.raft import RAFT, select_top
from diffalign.core.algorithms.refl import ReFL
from diffalign.core.algorithms.rwr import RWR, reward_weights
from diffalign.core.algorithms.spo import SPO
from diffalign.core.algorithms.supervised import SupervisedDenoising

__all__ = [
    "AWM",
    "D3PO",
    "DiffusionNFT",
    "GRPOGuard",
    "PrefGRPO",
    "nft_loss",
    "DDPO",
    "SPO",
    "DiffusionDPO",
    "DiffusionKTO",
    "kto_loss",
    "pareto_compare",
    "preference_loss",
    "DPOK",
    "GRPO",
    "RAFT",
    "RWR",
    "AlignContext",
    "AlignProp",
    "Algorithm",
    "DRaFT",
    "ReFL",
    "SupervisedDenoising",
    "reward_weights",
    "select_top",
]
