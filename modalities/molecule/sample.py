"""The molecule modality's documented sample layout: what `decode` returns and rewards read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
