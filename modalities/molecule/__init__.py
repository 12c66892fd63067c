"""Molecule modality: EDM-style E(3)-equivariant diffusion over heavy atoms (C, N, O, F).

Model space: (B, N_max, 3 + K) padded tensors (positions Å, one-hot × 1/4) with a (B, N_max, 1) mask;
`decode` returns a list of `MoleculeSample` (see `sample.py`). Files for `diffalign score`: `io.py`.
See README.md in this folder.

The names below are imported on first use, so `diffalign.modalities.molecule.io` (scoring) does not
pull in the backbone, Lightning or diffusers.
"""

import importlib
from typing import Any

from diffalign.core.extras import require

require("rdkit", "molecule", "diffalign.modalities.molecule")

_LAZY = {
    "BASE_WEIGHTS": "diffalign.modalities.molecule.backbone",
    "DATASET": "diffalign.modalities.molecule.backbone",
    "MoleculeBackbone": "diffalign.modalities.molecule.backbone",
    "ConformerDataset": "diffalign.modalities.molecule.data",
    "MoleculeDataModule": "diffalign.modalities.molecule.data",
    "ELEMENTS": "diffalign.modalities.molecule.sample",
    "MoleculeSample": "diffalign.modalities.molecule.sample",
    "TinyMoleculeBackbone": "diffalign.modalities.molecule.testing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffalign.modalities.molecule' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
