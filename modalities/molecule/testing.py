"""A tiny molecule backbone built in code (random weights) for tests and recipe smoke runs."""

from __future__ import annotations

from diffalign.modalities.molecule.backbone import MoleculeBackbone


class TinyMoleculeBackbone(MoleculeBackbone):
    """`MoleculeBackbone` with random weights, a small EGNN and a uniform atom count in [2, max_atoms]."""

    def __init__(self, max_atoms: int = 6, hidden: int = 16, num_layers: int = 2, **kwargs) -> None:
        probs = [0.0, 0.0] + [1.0 / (max_atoms - 1)] * (max_atoms - 1)
        kwargs.setdefault("atom_count_probs", probs)
        super().__init__(weights=None, max_atoms=max_atoms, hidden=hidden, num_layers=num_layers, **kwargs)


def tiny_backbone(max_atoms: int = 6, hidden: int = 16, num_layers: int = 2) -> MoleculeBackbone:
    return TinyMoleculeBackbone(max_atoms=max_atoms, hidden=hidden, num_layers=num_layers)
