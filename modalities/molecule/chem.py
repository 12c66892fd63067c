"""RDKit chemistry of the molecule modality: 3-D heavy atoms <-> molecules.

`build_molecule` turns heavy-atom positions and element symbols into a sanitised RDKit molecule:

1. connectivity from distances (`rdDetermineBonds.DetermineConnectivity`, covalent radii × 1.3);
2. bond orders from bond lengths and valences: a bond shorter than the triple threshold of its element
   pair becomes triple; bonds shorter than the pi threshold are candidates for a double bond, and a
   maximum-weight matching over the candidates (shorter bonds weigh more; atoms already saturated are
   left out) chooses the double bonds, which is a Kekulé structure for aromatic rings;
3. hydrogens are implicit (formal charges 0), RDKit sanitises, and the canonical SMILES is written.

Every failure is reported as a reason string instead of an exception. `embed_smiles` goes the other
way: SMILES -> RDKit ETKDG conformer (with hydrogens) -> MMFF optimisation -> heavy-atom positions.

`parse_smiles` / `parse_molblock` read molecules from text (files, rewards given SMILES) and raise
`InvalidMolecule` with RDKit's reason. The molecules they return are sanitised, and `is_sanitized`
remembers them (weakly, by identity), so rewards use them as they are instead of sanitising a copy.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffalign.core.extras import require

require("rdkit", "molecule", "diffalign.modalities.molecule.chem")

from diffalign.modalities.molecule.sample import ELEMENTS, MoleculeSample  # noqa: E402

#: normal valence of each element (neutral atoms)
VALENCE = {"C": 4, "N": 3, "O": 2, "F": 1, "S": 2, "Cl": 1, "Br": 1, "P": 3, "H": 1}

# (pi threshold, triple threshold) in Å per unordered element pair: a bond shorter than the first may be
# double (or aromatic), shorter than the second is triple. Single bonds: C-C 1.54, C-N 1.47, C-O 1.43,
# N-N 1.45, N-O 1.40; aromatic C-C 1.39; double C=C 1.34, C=N 1.28, C=O 1.21, N=N 1.25, N=O 1.21;
# triple C#C 1.20, C#N 1.16, N#N 1.10.
_THRESHOLDS: dict[frozenset[str], tuple[float, float]] = {
    frozenset(("C",)): (1.45, 1.26),
    frozenset(("C", "N")): (1.41, 1.21),
    frozenset(("C", "O")): (1.38, 0.0),
    frozenset(("N",)): (1.38, 1.15),
    frozenset(("N", "O")): (1.33, 0.0),
    frozenset(("O",)): (0.0, 0.0),
}


def _thresholds(a: str, b: str) -> tuple[float, float]:
    return _THRESHOLDS.get(frozenset((a, b)), (0.0, 0.0))


def build_molecule(
    positions: np.ndarray, atom_types: Sequence[str], allow_fragments: bool = False
) -> MoleculeSample:
    """Perceive bonds of heavy atoms and return a `MoleculeSample` (mol None and `error` set on failure).

    Args:
        positions: (n, 3) coordinates in Å.
        atom_types: n element symbols.
        allow_fragments: keep the largest fragment of a disconnected result instead of failing.
    """
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    types = [str(t) for t in atom_types]
    sample = MoleculeSample(positions=pos.astype(np.float32), atom_types=types)
    n = len(types)
    if n == 0:
        sample.error = "empty: no atoms"
        return sample
    if not np.isfinite(pos).all():
        sample.error = "non-finite coordinates"
        return sample
    rw = Chem.RWMol()
    for s in types:
        atom = Chem.Atom(s)
        atom.SetNoImplicit(False)
        rw.AddAtom(atom)
    conf = Chem.Conformer(n)
    for i, p in enumerate(pos):
        conf.SetAtomPosition(i, p.tolist())
    rw.AddConformer(conf, assignId=True)
    mol = rw.GetMol()
    if n > 1:
        try:
            rdDetermineBonds.DetermineConnectivity(mol, useHueckel=False, charge=0)
        except Exception as e:  # noqa: BLE001 - RDKit raises several types; report the reason
            sample.error = f"connectivity: {e}"
            return sample
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    rw = Chem.RWMol(mol)
    for b in rw.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
    for a in rw.GetAtoms():
        a.SetNoImplicit(False)
        a.SetNumExplicitHs(0)
        a.SetFormalCharge(0)
    # valence budget left after single bonds
    free = {}
    for a in rw.GetAtoms():
        v = VALENCE.get(a.GetSymbol(), 4)
        if a.GetDegree() > v:
            sample.error = f"valence: atom {a.GetIdx()} ({a.GetSymbol()}) has {a.GetDegree()} neighbours"
            return sample
        free[a.GetIdx()] = v - a.GetDegree()
    # triple bonds first
    for b in rw.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        _, tri = _thresholds(types[i], types[j])
        if dist[i, j] < tri and free[i] >= 2 and free[j] >= 2:
            b.SetBondType(Chem.BondType.TRIPLE)
            free[i] -= 2
            free[j] -= 2
    # double bonds: maximum-weight matching over short bonds between atoms with a free valence
    nx = require("networkx", "molecule", "bond orders from 3D coordinates")

    g = nx.Graph()
    for b in rw.GetBonds():
        if b.GetBondType() != Chem.BondType.SINGLE:
            continue
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        pi, _ = _thresholds(types[i], types[j])
        if dist[i, j] < pi and free[i] >= 1 and free[j] >= 1:
            g.add_edge(i, j, weight=1.0 + (pi - dist[i, j]))
    for i, j in nx.max_weight_matching(g, maxcardinality=True):
        rw.GetBondBetweenAtoms(int(i), int(j)).SetBondType(Chem.BondType.DOUBLE)
    mol = rw.GetMol()
    try:
        Chem.SanitizeMol(mol)
    except Exception as e:  # noqa: BLE001
        sample.error = f"sanitize: {e}"
        return sample
    frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    sample.info["num_fragments"] = len(frags)
    if len(frags) > 1:
        if not allow_fragments:
            sample.error = f"fragmented: {len(frags)} fragments"
            return sample
        mol = max(frags, key=lambda m: m.GetNumAtoms())
    try:
        smiles = Chem.MolToSmiles(mol)
        if Chem.MolFromSmiles(smiles) is None:
            raise ValueError(f"SMILES {smiles!r} does not parse back")
    except Exception as e:  # noqa: BLE001
        sample.error = f"smiles: {e}"
        return sample
    sample.mol, sample.smiles = mol, smiles
    return sample


def canonical_smiles(smiles: str, heavy_only: bool = True) -> str | None:
    """RDKit canonical SMILES (None if it does not parse)."""
    from rdkit import Chem

    m = Chem.MolFromSmiles(smiles)
    if m is None:
        return None
    if heavy_only:
        m = Chem.RemoveHs(m)
    return Chem.MolToSmiles(m)


def mol_heavy_atoms(mol: Any) -> tuple[np.ndarray, list[str]]:
    """Heavy-atom positions (centred, Å) and element symbols of a molecule with a conformer."""
    from rdkit import Chem

    heavy = Chem.RemoveHs(mol, sanitize=False)
    pos = np.asarray(heavy.GetConformer().GetPositions(), dtype=np.float32)
    pos = pos - pos.mean(axis=0, keepdims=True)
    return pos, [a.GetSymbol() for a in heavy.GetAtoms()]


def embed_smiles(smiles: str, seed: int = 0, mmff: bool = True) -> tuple[np.ndarray, list[str]]:
    """One 3-D conformer of `smiles`: ETKDG (v3) with hydrogens, then MMFF; heavy atoms returned.

    Raises ValueError when the SMILES does not parse or no conformer can be embedded.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.MolFromSmiles(smiles)
    if m is None:
        raise ValueError(f"cannot parse SMILES {smiles!r}")
    mh = Chem.AddHs(m)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(mh, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mh, params) != 0:
            raise ValueError(f"cannot embed a conformer for {smiles!r}")
    if mmff and AllChem.MMFFHasAllMoleculeParams(mh):
        AllChem.MMFFOptimizeMolecule(mh, maxIters=500)
    return mol_heavy_atoms(mh)


def check_elements(atom_types: Sequence[str], elements: Sequence[str] = ELEMENTS) -> None:
    bad = sorted(set(atom_types) - set(elements))
    if bad:
        raise ValueError(f"elements {bad} are not in the model's atom types {list(elements)}")


# ---------------------------------------------------------------------------------------------------
# Molecules from text
# ---------------------------------------------------------------------------------------------------
class InvalidMolecule(ValueError):
    """A sample that yields no (valid) molecule; the message is the reason."""


_SANITIZED: weakref.WeakSet = weakref.WeakSet()


def is_sanitized(mol: Any) -> bool:
    """True for a molecule `parse_smiles` / `parse_molblock` sanitised (the very object)."""
    try:
        return mol in _SANITIZED
    except TypeError:
        return False


def mark_sanitized(mol: Any) -> Any:
    """Remember `mol` as sanitised (only for molecules nobody modifies afterwards); returns it."""
    _SANITIZED.add(mol)
    return mol


def block_logs() -> Any:
    """A context that silences RDKit's log while parsing."""
    from rdkit import rdBase

    return rdBase.BlockLogs()


def short_text(s: str, n: int = 60) -> str:
    """`s` quoted for a message, cut to `n` characters."""
    return repr(s if len(s) <= n else s[: n - 3] + "...")


def parse_smiles(smiles: str, sanitize: bool = True) -> Any:
    """SMILES -> RDKit Mol; raises `InvalidMolecule` with RDKit's reason (syntax or valence error)."""
    from rdkit import Chem

    if not isinstance(smiles, str):
        raise InvalidMolecule(f"expected a SMILES string, got {type(smiles).__name__}")
    s = smiles.strip()
    if not s:
        raise InvalidMolecule("empty SMILES")
    if "\x00" in s:
        raise InvalidMolecule("SMILES contains a NUL character")
    with block_logs():
        mol = Chem.MolFromSmiles(s, sanitize=sanitize)
        if mol is not None:
            return mark_sanitized(mol) if sanitize else mol
        raw = Chem.MolFromSmiles(s, sanitize=False)
        if raw is None:
            raise InvalidMolecule(f"unparsable SMILES {short_text(s)}")
        try:
            Chem.SanitizeMol(raw)
        except Exception as e:  # noqa: BLE001 - RDKit raises several exception types
            raise InvalidMolecule(f"invalid molecule {short_text(s)}: {e}") from None
        return mark_sanitized(raw)  # pragma: no cover - MolFromSmiles failed but sanitizing succeeded


def parse_molblock(block: str, sanitize: bool = True) -> Any:
    """MDL mol block (one SDF record) -> RDKit Mol with its hydrogens and conformer kept."""
    from rdkit import Chem

    if not isinstance(block, str) or not block.strip():
        raise InvalidMolecule("empty SDF record")
    if "\x00" in block:
        raise InvalidMolecule("SDF record contains a NUL character")
    with block_logs():
        mol = Chem.MolFromMolBlock(block, sanitize=sanitize, removeHs=False)
        if mol is not None:
            return mark_sanitized(mol) if sanitize else mol
        raw = Chem.MolFromMolBlock(block, sanitize=False, removeHs=False)
        if raw is None:
            raise InvalidMolecule("unparsable SDF record (bad mol block)")
        try:
            Chem.SanitizeMol(raw)
        except Exception as e:  # noqa: BLE001
            raise InvalidMolecule(f"invalid molecule in SDF record: {e}") from None
        return mark_sanitized(raw)  # pragma: no cover
