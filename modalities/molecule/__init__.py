"""Molecule modality: EDM-style E(3)-equivariant diffusion over heavy atoms (C, N, O, F).

Model space: (B, N_max, 3 + K) padded tensors (positions Å, one-hot × 1/4) with a (B, N_max, 1) mask;
`decode` returns a list of `MoleculeSample` (see `sample.py`). See README.md in this folder.
"""

from diffalign.core.extras import require

require("rdkit", "molecule", "diffalign.modalities.molecule")

from diffalign.modalities.molecule.backbone import BASE_WEIGHTS, DATASET, MoleculeBackbone  # noqa: E402
from diffalign.modalities.molecule.data import ConformerDataset, MoleculeDataModule  # noqa: E402
from diffalign.modalities.molecule.sample import ELEMENTS, MoleculeSample  # noqa: E402
from diffalign.modalities.molecule.testing import TinyMoleculeBackbone  # noqa: E402

__all__ = [
    "BASE_WEIGHTS",
    "DATASET",
    "ELEMENTS",
    "ConformerDataset",
    "MoleculeBackbone",
    "MoleculeDataModule",
    "MoleculeSample",
    "TinyMoleculeBackbone",
]
