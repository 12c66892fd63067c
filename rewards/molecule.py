"""Molecule rewards (RDKit): validity, QED, SA score, logP, weight, Lipinski, stability, MMFF energy.

Two layers share one implementation:

- **plain per-molecule functions** (`qed(mol)`, `sa_score(mol)`, `logp(mol)`, …) that take a sanitized
  RDKit `Mol` and return a float;
- **`Reward` classes** (`QED`, `SAScore`, `LogP`, …), what recipes train with and `diffalign score`
  scores files with. `forward(samples, cond)` takes a list whose items are RDKit `Mol`s, SMILES strings,
  objects with `.mol` / `.smiles` / `.error` attributes (the molecule modality's `MoleculeSample`), or
  `None`. An item that yields no valid molecule scores `invalid_value`; the reason is logged, kept in
  `last_invalid_reasons` ({row: reason}) and counted in `RewardOutput.info["invalid"]` (1.0 per invalid
  row, so its logged mean is the invalid fraction). Their files are read by
  `diffalign.modalities.molecule.io.MoleculeReader` (`MoleculeReward.reader`).

Signs: QED, validity, Lipinski and the stabilities are "higher is better". `SAScore` returns
(10 − SA)/9 in [0, 1] by default (higher = easier to synthesise; `normalize=False` gives the raw SA
score, 1 easy … 10 hard). `MMFFEnergy` returns **minus** the MMFF94 energy per atom (kcal/mol/atom), so
higher is better; the plain function `mmff_energy` is the energy itself (lower is better). See
docs/rewards/molecule.md.

RDKit is imported lazily (inside functions), as for every heavy reward dependency.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import weakref
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from diffalign.core.extras import require
from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond

require("rdkit", "molecule", "diffalign.rewards.molecule")

from diffalign.modalities.molecule.chem import (  # noqa: E402
    InvalidMolecule,
    block_logs,
    is_sanitized,
    mark_sanitized,
    parse_molblock,
    parse_smiles,
)

log = logging.getLogger(__name__)

__all__ = [
    "AtomStability",
    "LogP",
    "Lipinski",
    "MMFFEnergy",
    "MoleculeReward",
    "MoleculeStability",
    "MolecularWeight",
    "QED",
    "SAScore",
    "Validity",
    "ALLOWED_VALENCES",
    "atom_stability",
    "lipinski",
    "logp",
    "mmff_energy",
    "mol_stability",
    "molecular_weight",
    "parse_molblock",
    "parse_smiles",
    "qed",
    "sa_score",
    "validity",
]


# ---------------------------------------------------------------------------------------------------
# Samples -> molecules (parsing lives with the modality: diffalign.modalities.molecule.chem)
# ---------------------------------------------------------------------------------------------------
def _is_mol(x: Any) -> bool:
    from rdkit import Chem

    return isinstance(x, Chem.Mol)


def to_mol(sample: Any) -> Any:
    """A sanitized RDKit Mol from a Mol / SMILES / object with .mol/.smiles/.error; else `InvalidMolecule`.

    A Mol is sanitized on a copy (the caller's object is never modified), except one that `parse_smiles`
    / `parse_molblock` made (or this function returned), which is used as it is: every reward of a batch
    then sees the same object, and `logp` reuses the logP `qed` computed for it.
    """
    from rdkit import Chem

    if sample is None:
        raise InvalidMolecule("sample is None")
    if _is_mol(sample):
        if is_sanitized(sample):
            return sample
        mol = Chem.Mol(sample)
        with block_logs():
            try:
                Chem.SanitizeMol(mol)
            except Exception as e:  # noqa: BLE001
                raise InvalidMolecule(f"RDKit sanitization failed: {e}") from None
        return mark_sanitized(mol)
    if isinstance(sample, str):
        return parse_smiles(sample)
    error = getattr(sample, "error", None)
    if error:
        raise InvalidMolecule(str(error))
    mol = getattr(sample, "mol", None)
    if mol is not None:
        return to_mol(mol)
    smiles = getattr(sample, "smiles", None)
    if smiles is not None:
        return parse_smiles(smiles)
    if hasattr(sample, "mol") or hasattr(sample, "smiles"):
        raise InvalidMolecule("sample has neither a molecule nor a SMILES")
    raise InvalidMolecule(f"unsupported sample type {type(sample).__name__}")


def to_graph(sample: Any) -> Any:
    """The molecular graph of a sample, *not* requiring RDKit validity (for stability, EDM-style).

    Like `to_mol`, but an unsanitizable Mol or SMILES (e.g. a pentavalent carbon) still gives its graph,
    and a sample whose `.error` is set but that carries a `.mol` is used as well.
    """
    from rdkit import Chem

    if sample is None:
        raise InvalidMolecule("sample is None")
    if _is_mol(sample):
        mol = Chem.Mol(sample)
        mol.UpdatePropertyCache(strict=False)
        return mol
    if isinstance(sample, str):
        try:
            return parse_smiles(sample)
        except InvalidMolecule:
            if not sample.strip() or "\x00" in sample:
                raise
            with block_logs():
                raw = Chem.MolFromSmiles(sample.strip(), sanitize=False)
            if raw is None:
                raise
            raw.UpdatePropertyCache(strict=False)
            return raw
    mol = getattr(sample, "mol", None)
    if mol is not None:
        return to_graph(mol)
    smiles = getattr(sample, "smiles", None)
    if smiles:
        return to_graph(smiles)
    error = getattr(sample, "error", None)
    raise InvalidMolecule(str(error) if error else f"no molecular graph in {type(sample).__name__}")


def _heavy(mol: Any) -> Any:
    """The molecule without explicit hydrogen atoms (descriptors are defined on the heavy-atom graph)."""
    if mol.GetNumAtoms() == mol.GetNumHeavyAtoms():
        return mol
    from rdkit import Chem

    return Chem.RemoveHs(mol)


# ---------------------------------------------------------------------------------------------------
# Plain per-molecule functions: sanitized Mol -> float
# ---------------------------------------------------------------------------------------------------
def validity(mol: Any) -> float:
    """1.0 when `mol` is an RDKit-sanitizable molecule, else 0.0 (never raises)."""
    try:
        to_mol(mol)
    except InvalidMolecule:
        return 0.0
    return 1.0


#: molecule -> the ALOGP (Crippen logP of the heavy-atom graph) `qed` computed for it: `logp` of the same
#: Mol object reuses it instead of computing it again (a fifth of the CPU time of scoring "qed,sa,logp").
#: Keyed weakly by identity, so entries go with their molecules.
_QED_ALOGP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def qed(mol: Any) -> float:
    """Quantitative estimate of drug-likeness (RDKit `QED.qed`), in [0, 1]; higher is more drug-like."""
    from rdkit.Chem import QED as _QED

    props = _QED.properties(mol)  # removes explicit hydrogens itself
    with contextlib.suppress(TypeError):  # an object that takes no weak reference is not remembered
        _QED_ALOGP[mol] = float(props.ALOGP)
    return float(_QED.qed(mol, qedProperties=props))


@lru_cache(maxsize=1)
def _sascorer() -> Any:
    """RDKit Contrib's sascorer module, imported by path (it is not a package)."""
    from rdkit import RDConfig

    path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
    if not os.path.isfile(path):
        raise ImportError(f"RDKit Contrib SA_Score not found at {path}")
    spec = importlib.util.spec_from_file_location("diffalign_rdkit_sascorer", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    module.readFragmentScores()
    return module


def sa_score(mol: Any) -> float:
    """Synthetic accessibility (Ertl & Schuffenhauer 2009; RDKit Contrib `sascorer.calculateScore`).

    1 (easy to make) … 10 (hard); lower is better.
    """
    return float(_sascorer().calculateScore(_heavy(mol)))


def logp(mol: Any) -> float:
    """Wildman–Crippen logP (RDKit `Crippen.MolLogP`)."""
    cached = _QED_ALOGP.get(mol)
    if cached is not None:  # `qed` scored this very molecule: the same number, already computed
        return cached
    from rdkit.Chem import Crippen

    return float(Crippen.MolLogP(_heavy(mol)))


def molecular_weight(mol: Any) -> float:
    """Average molecular weight in g/mol, implicit hydrogens included (RDKit `Descriptors.MolWt`)."""
    from rdkit.Chem import Descriptors

    return float(Descriptors.MolWt(mol))


def lipinski(mol: Any) -> float:
    """Number of Lipinski rule-of-five criteria met, 0–4.

    MW ≤ 500 (`Descriptors.MolWt`), logP ≤ 5 (`Crippen.MolLogP`), H-bond donors ≤ 5
    (`Lipinski.NumHDonors`), H-bond acceptors ≤ 10 (`Lipinski.NumHAcceptors`).
    """
    from rdkit.Chem import Crippen, Descriptors
    from rdkit.Chem import Lipinski as _Lipinski

    m = _heavy(mol)
    return float(
        (Descriptors.MolWt(m) <= 500)
        + (Crippen.MolLogP(m) <= 5)
        + (_Lipinski.NumHDonors(m) <= 5)
        + (_Lipinski.NumHAcceptors(m) <= 10)
    )


# Allowed total valences (bond orders + hydrogens) per element and formal charge. The neutral entries are
# EDM's table (Hoogeboom et al. 2022, `bond_analyze.allowed_bonds`) except sulfur, where EDM allows
# only 4 and we allow 2, 4 and 6 (thioethers and sulfones are stable); charged entries follow MiDi.
ALLOWED_VALENCES: dict[str, dict[int, tuple[int, ...]]] = {
    "H": {0: (1,)},
    "B": {0: (3,), -1: (4,)},
    "C": {0: (4,), 1: (3,), -1: (3,)},
    "N": {0: (3,), 1: (4,), -1: (2,)},
    "O": {0: (2,), 1: (3,), -1: (1,)},
    "F": {0: (1,)},
    "Al": {0: (3,)},
    "Si": {0: (4,)},
    "P": {0: (3, 5), 1: (4,)},
    "S": {0: (2, 4, 6), 1: (3,), -1: (1,)},
    "Cl": {0: (1,)},
    "As": {0: (3,)},
    "Se": {0: (2, 4, 6)},
    "Br": {0: (1,)},
    "I": {0: (1,)},
    "Hg": {0: (1, 2)},
    "Bi": {0: (3, 5)},
}


def _atom_valences(mol: Any) -> list[tuple[str, int, int]]:
    """(symbol, formal charge, total valence) per atom; aromatic bonds are kekulized first."""
    from rdkit import Chem

    m = Chem.Mol(mol)
    m.UpdatePropertyCache(strict=False)
    try:
        Chem.Kekulize(m, clearAromaticFlags=True)
        orders = None
    except Exception:  # noqa: BLE001 - unkekulizable graph: aromatic bonds count 1.5
        orders = {b.GetIdx(): b.GetBondTypeAsDouble() for b in m.GetBonds()}
    out = []
    for a in m.GetAtoms():
        bond_sum = sum(
            (orders[b.GetIdx()] if orders is not None else b.GetBondTypeAsDouble()) for b in a.GetBonds()
        )
        valence = int(round(bond_sum)) + a.GetTotalNumHs(includeNeighbors=False)
        out.append((a.GetSymbol(), a.GetFormalCharge(), valence))
    return out


def _stable_flags(mol: Any) -> list[bool]:
    return [
        valence in ALLOWED_VALENCES.get(sym, {}).get(charge, ())
        for sym, charge, valence in _atom_valences(mol)
    ]


def atom_stability(mol: Any) -> float:
    """Fraction of atoms whose total valence is allowed for their element and charge (EDM-style).

    Hydrogens count as atoms when they are explicit atoms of the graph (as in 3D samples); implicit
    hydrogens count toward their heavy atom's valence. Works on unsanitized graphs too.
    """
    flags = _stable_flags(mol)
    if not flags:
        raise InvalidMolecule("molecule has no atoms")
    return sum(flags) / len(flags)


def mol_stability(mol: Any) -> float:
    """1.0 when every atom is stable (see `atom_stability`), else 0.0."""
    return float(atom_stability(mol) == 1.0)


def mmff_energy(mol: Any, optimize: bool = False, max_iters: int = 200, seed: int = 0) -> float:
    """MMFF94 energy per atom (kcal/mol/atom, hydrogens included); lower is better.

    A molecule with a 3D conformer is scored at the given coordinates (missing hydrogens are added with
    generated coordinates); one without (e.g. from SMILES) is embedded with ETKDG (`seed`) and then
    always optimised. `optimize=True` also minimises a given conformer (up to `max_iters` steps) first.
    Raises `InvalidMolecule` when MMFF94 has no parameters for the molecule or embedding fails.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    has_3d = mol.GetNumConformers() > 0 and mol.GetConformer().Is3D()
    m = Chem.AddHs(mol, addCoords=has_3d)
    if not has_3d:
        m.RemoveAllConformers()
        params = AllChem.ETKDGv3()
        params.randomSeed = seed
        if AllChem.EmbedMolecule(m, params) != 0:
            raise InvalidMolecule("could not embed a 3D conformer (ETKDG)")
        optimize = True
    props = AllChem.MMFFGetMoleculeProperties(m)
    if props is None:
        raise InvalidMolecule("MMFF94 has no parameters for this molecule")
    ff = AllChem.MMFFGetMoleculeForceField(m, props)
    if ff is None:
        raise InvalidMolecule("could not set up the MMFF94 force field")
    if optimize:
        ff.Minimize(maxIts=max_iters)
    return float(ff.CalcEnergy()) / m.GetNumAtoms()


# ---------------------------------------------------------------------------------------------------
# Reward classes
# ---------------------------------------------------------------------------------------------------
class MoleculeReward(Reward):
    """Base class: scores each sample with `score(mol)`; invalid samples get `invalid_value`.

    Subclasses set `score`; `to_molecule` (default `to_mol`, which requires RDKit validity) turns a sample
    into a Mol. A sample that is invalid, whose score raises, or whose score is NaN/inf gets
    `invalid_value` (NaN there lets `GuardedReward`'s raise/drop policy decide, and `diffalign score`
    leave the cell empty with the reason in its error column).
    """

    reader = "diffalign.modalities.molecule.io.MoleculeReader"

    def __init__(self, invalid_value: float = 0.0, name: str | None = None) -> None:
        super().__init__(name)
        self.invalid_value = float(invalid_value)
        self.last_invalid_reasons: dict[int, str] = {}

    def score(self, mol: Any) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_molecule(self, sample: Any) -> Any:
        return to_mol(sample)

    def forward(self, samples: Sequence[Any], cond: Cond) -> RewardOutput:
        if _is_mol(samples) or isinstance(samples, str) or not isinstance(samples, Sequence):
            raise TypeError(
                f"{self.name} expects a list of molecules (Mol, SMILES, MoleculeSample or None), "
                f"got {type(samples).__name__}"
            )
        scores: list[float] = []  # Python lists, one tensor at the end: no per-element tensor writes
        invalid = [0.0] * len(samples)
        reasons: dict[int, str] = {}
        for i, sample in enumerate(samples):
            try:
                value = float(self.score(self.to_molecule(sample)))
                if not math.isfinite(value):
                    raise InvalidMolecule(f"score is {value}")
            except Exception as e:  # noqa: BLE001 - any per-molecule failure makes that sample invalid
                reasons[i] = str(e) if isinstance(e, InvalidMolecule) else f"{type(e).__name__}: {e}"
                value = self.invalid_value
                invalid[i] = 1.0
            scores.append(value)
        self.last_invalid_reasons = reasons
        if reasons:
            kinds = Counter(r.split(":")[0].split(" '")[0] for r in reasons.values())
            log.info(
                "%s: %d of %d samples invalid, scored %s (%s)",
                self.name,
                len(reasons),
                len(samples),
                self.invalid_value,
                ", ".join(f"{n}× {k}" for k, n in kinds.most_common()),
            )
        return RewardOutput(
            scores=torch.tensor(scores, dtype=torch.float32),
            info={"invalid": torch.tensor(invalid, dtype=torch.float32)},
        )


class Validity(MoleculeReward):
    """1 for a sample RDKit can sanitize, else `invalid_value` (default 0)."""

    def __init__(self, invalid_value: float = 0.0, name: str | None = None) -> None:
        super().__init__(invalid_value, name or "validity")

    def score(self, mol: Any) -> float:
        return 1.0


class QED(MoleculeReward):
    """Drug-likeness QED in [0, 1] (RDKit `QED.qed`)."""

    def __init__(self, invalid_value: float = 0.0, name: str | None = None) -> None:
        super().__init__(invalid_value, name or "qed")

    def score(self, mol: Any) -> float:
        return qed(mol)


class SAScore(MoleculeReward):
    """Synthetic accessibility. `normalize=True` (default): (10 − SA)/9 in [0, 1], higher = easier.

    `normalize=False`: the raw SA score, 1 (easy) … 10 (hard), so lower is better — give it a negative
    weight in a `WeightedSum` (and an `invalid_value` such as 10).
    """

    def __init__(self, invalid_value: float = 0.0, normalize: bool = True, name: str | None = None) -> None:
        super().__init__(invalid_value, name or "sa")
        self.normalize = normalize

    def score(self, mol: Any) -> float:
        sa = sa_score(mol)
        return (10.0 - sa) / 9.0 if self.normalize else sa


class LogP(MoleculeReward):
    """Wildman–Crippen logP (RDKit `Crippen.MolLogP`). Default `invalid_value` NaN: the guard decides."""

    def __init__(self, invalid_value: float = float("nan"), name: str | None = None) -> None:
        super().__init__(invalid_value, name or "logp")

    def score(self, mol: Any) -> float:
        return logp(mol)


class MolecularWeight(MoleculeReward):
    """Molecular weight in g/mol (RDKit `Descriptors.MolWt`). Default `invalid_value` NaN."""

    def __init__(self, invalid_value: float = float("nan"), name: str | None = None) -> None:
        super().__init__(invalid_value, name or "mw")

    def score(self, mol: Any) -> float:
        return molecular_weight(mol)


class Lipinski(MoleculeReward):
    """Number of rule-of-five criteria satisfied, 0–4 (see `lipinski`); `normalize=True` divides by 4."""

    def __init__(self, invalid_value: float = 0.0, normalize: bool = False, name: str | None = None) -> None:
        super().__init__(invalid_value, name or "lipinski")
        self.normalize = normalize

    def score(self, mol: Any) -> float:
        n = lipinski(mol)
        return n / 4.0 if self.normalize else n


class AtomStability(MoleculeReward):
    """Fraction of atoms with an allowed valence (EDM's atom stability; see `ALLOWED_VALENCES`).

    Needs only the molecular graph, not RDKit validity: a pentavalent carbon scores < 1 instead of
    `invalid_value`. Only a sample with no graph at all (None, unparsable SMILES) is invalid.
    """

    def __init__(self, invalid_value: float = 0.0, name: str | None = None) -> None:
        super().__init__(invalid_value, name or "atom_stability")

    def to_molecule(self, sample: Any) -> Any:
        return to_graph(sample)

    def score(self, mol: Any) -> float:
        return atom_stability(mol)


class MoleculeStability(AtomStability):
    """1 when every atom is stable (EDM's molecule stability), else 0."""

    def __init__(self, invalid_value: float = 0.0, name: str | None = None) -> None:
        super().__init__(invalid_value, name or "mol_stability")

    def score(self, mol: Any) -> float:
        return mol_stability(mol)


class MMFFEnergy(MoleculeReward):
    """Minus the MMFF94 energy per atom (kcal/mol/atom), so higher is better (see `mmff_energy`).

    Args:
        invalid_value: score of molecules that are invalid or have no MMFF94 parameters (default NaN).
        optimize: minimise a given 3D conformer before taking its energy (molecules without a
            conformer are always embedded and minimised).
        max_iters: minimisation steps.
        seed: ETKDG seed for molecules without a conformer.
    """

    def __init__(
        self,
        invalid_value: float = float("nan"),
        optimize: bool = False,
        max_iters: int = 200,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(invalid_value, name or "mmff_energy")
        self.optimize = optimize
        self.max_iters = max_iters
        self.seed = seed

    def score(self, mol: Any) -> float:
        return -mmff_energy(mol, optimize=self.optimize, max_iters=self.max_iters, seed=self.seed)
