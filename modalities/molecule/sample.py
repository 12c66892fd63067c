"""The molecule modality's documented sample layout: what `decode` returns and rewards read.

A `MoleculeSample` survives `torch.save` / `torch.load(weights_only=True)`: it pickles as plain data (the
molecule as a mol block, positions as a tensor) rebuilt by `rebuild_molecule_sample`, which this module
registers with `torch.serialization.add_safe_globals`. That is how `diffalign feedback` stores decoded
molecules as .pt files and `PreferenceDataModule` loads them back for Diffusion-DPO (`backbone.encode`
takes a list of `MoleculeSample`s).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: atom types of the shipped model, in one-hot order (heavy atoms only; hydrogens are implicit)
ELEMENTS: tuple[str, ...] = ("C", "N", "O", "F")


@dataclass
class MoleculeSample:
    """One decoded molecule.

    Attributes:
        mol: the sanitised RDKit molecule (heavy atoms, implicit hydrogens), or None when invalid.
        smiles: canonical SMILES of `mol`, or None when invalid.
        error: why decoding failed (None when valid), e.g. "valence: atom 3 (C) has 5 bonds".
        positions: (n, 3) heavy-atom coordinates in Å, centred on the centre of mass of real atoms.
        atom_types: n element symbols, in the order of `positions`.
        info: extra diagnostics (number of fragments, ...).
    """

    mol: Any = None
    smiles: str | None = None
    error: str | None = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.float32))
    atom_types: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.mol is not None

    @property
    def num_atoms(self) -> int:
        return len(self.atom_types)

    def to_xyz(self) -> str:
        """The heavy atoms as an XYZ block."""
        lines = [str(self.num_atoms), self.smiles or ""]
        lines += [
            f"{s} {x:.4f} {y:.4f} {z:.4f}"
            for s, (x, y, z) in zip(self.atom_types, self.positions, strict=True)
        ]
        return "\n".join(lines) + "\n"

    # -- tensor-style storage: generic code that stores decoded samples calls these -------------------
    def detach(self) -> MoleculeSample:
        """Itself (holds no autograd graph); with `cpu` and `clone`, lets code written for tensor samples
        (`diffalign feedback` saves `sample.detach().cpu().clone()`) store molecules unchanged."""
        return self

    def cpu(self) -> MoleculeSample:
        """Itself (holds no device tensors)."""
        return self

    def clone(self) -> MoleculeSample:
        """An independent copy (RDKit molecule, positions, atom types and info copied)."""
        from rdkit import Chem

        return MoleculeSample(
            mol=None if self.mol is None else Chem.Mol(self.mol),
            smiles=self.smiles,
            error=self.error,
            positions=np.array(self.positions, dtype=np.float32, copy=True),
            atom_types=list(self.atom_types),
            info=copy.deepcopy(self.info),
        )

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        from rdkit import Chem

        state = {
            "molblock": None if self.mol is None else Chem.MolToMolBlock(self.mol),
            "smiles": self.smiles,
            "error": self.error,
            "positions": torch.as_tensor(np.asarray(self.positions, dtype=np.float32).reshape(-1, 3)),
            "atom_types": [str(a) for a in self.atom_types],
            "info": dict(self.info),
        }
        return rebuild_molecule_sample, (state,)


def rebuild_molecule_sample(state: dict[str, Any]) -> MoleculeSample:
    """The `MoleculeSample` of a pickled state (see `MoleculeSample.__reduce__`)."""
    mol = None
    if state.get("molblock"):
        from rdkit import Chem

        mol = Chem.MolFromMolBlock(state["molblock"], sanitize=True, removeHs=False)
        if mol is None and state.get("smiles"):
            mol = Chem.MolFromSmiles(state["smiles"])
        if mol is None:
            raise ValueError("stored molecule does not parse back")
    positions = state.get("positions")
    positions = np.zeros((0, 3), np.float32) if positions is None else np.asarray(positions, np.float32)
    return MoleculeSample(
        mol=mol,
        smiles=state.get("smiles"),
        error=state.get("error"),
        positions=positions.reshape(-1, 3),
        atom_types=list(state.get("atom_types") or []),
        info=dict(state.get("info") or {}),
    )


# stored samples load with torch.load(weights_only=True) (PreferenceDataModule's default .pt loader)
torch.serialization.add_safe_globals([rebuild_molecule_sample])
