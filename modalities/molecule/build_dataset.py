"""Build the shipped conformer dataset: `python -m diffalign.modalities.molecule.build_dataset`.

Source: RDKit's bundled NCI set (`RDConfig.RDDataDir/NCI/first_5K.smi`, 4,999 SMILES). Kept: neutral,
single-fragment molecules made only of C, N, O, F with 3 to `max_atoms` heavy atoms, plus the BRICS
fragments of every NCI molecule over the same elements (dummy attachment atoms replaced by hydrogen),
deduplicated by canonical SMILES. Each molecule gets one conformer (ETKDGv3 with hydrogens, then MMFF);
hydrogens are dropped and the heavy atoms centred. A molecule is kept only if `build_molecule` perceives
the same canonical SMILES back from its conformer, so the data and the decoder agree.

Writes `modalities/molecule/conformers.npz` (positions float32 (M, N_max, 3), types int8 (M, N_max) with
-1 for padding, num_atoms, smiles, source) and prints a summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from diffalign.modalities.molecule.chem import build_molecule, embed_smiles
from diffalign.modalities.molecule.sample import ELEMENTS

DEFAULT_OUT = Path(__file__).with_name("conformers.npz")


def _allowed(mol, max_atoms: int) -> bool:
    from rdkit import Chem

    if mol is None or len(Chem.GetMolFrags(mol)) != 1:
        return False
    if not 3 <= mol.GetNumAtoms() <= max_atoms:
        return False
    return all(
        a.GetSymbol() in ELEMENTS and a.GetFormalCharge() == 0 and a.GetNumRadicalElectrons() == 0
        for a in mol.GetAtoms()
    )


def _cap(frag_smiles: str):
    """A BRICS fragment with its dummy atoms removed (their bonds become implicit hydrogens)."""
    from rdkit import Chem

    m = Chem.MolFromSmiles(frag_smiles)
    if m is None:
        return None
    rw = Chem.RWMol(m)
    for idx in sorted((a.GetIdx() for a in rw.GetAtoms() if a.GetAtomicNum() == 0), reverse=True):
        rw.RemoveAtom(idx)
    m = rw.GetMol()
    for a in m.GetAtoms():
        a.SetNoImplicit(False)
        a.SetNumExplicitHs(0)
    try:
        Chem.SanitizeMol(m)
    except Exception:  # noqa: BLE001
        return None
    return Chem.MolFromSmiles(Chem.MolToSmiles(m))


def candidates(max_atoms: int, brics: bool = True) -> list[tuple[str, str]]:
    """(canonical SMILES, source) pairs from the NCI file, then its BRICS fragments."""
    from rdkit import Chem, RDConfig, RDLogger
    from rdkit.Chem import BRICS

    RDLogger.DisableLog("rdApp.*")
    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    seen: dict[str, str] = {}
    mols = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        m = Chem.MolFromSmiles(line.split()[0])
        if m is None:
            continue
        mols.append(m)
        if _allowed(m, max_atoms):
            seen.setdefault(Chem.MolToSmiles(m), "nci")
    if brics:
        for m in mols:
            try:
                frags = BRICS.BRICSDecompose(m)
            except Exception:  # noqa: BLE001
                continue
            for f in sorted(frags):
                c = _cap(f)
                if _allowed(c, max_atoms):
                    seen.setdefault(Chem.MolToSmiles(c), "brics")
    return sorted(seen.items())


def build(out: Path = DEFAULT_OUT, max_atoms: int = 15, brics: bool = True, seed: int = 0) -> dict:
    t0 = time.time()
    cands = candidates(max_atoms, brics)
    pos_l, typ_l, n_l, smi_l, src_l = [], [], [], [], []
    failed = {"embed": 0, "roundtrip": 0}
    for k, (smi, src) in enumerate(cands):
        try:
            pos, types = embed_smiles(smi, seed=seed + k)
        except ValueError:
            failed["embed"] += 1
            continue
        back = build_molecule(pos, types)
        if back.smiles != smi:
            failed["roundtrip"] += 1
            continue
        n = len(types)
        p = np.zeros((max_atoms, 3), np.float32)
        t = np.full((max_atoms,), -1, np.int8)
        p[:n] = pos
        t[:n] = [ELEMENTS.index(s) for s in types]
        pos_l.append(p)
        typ_l.append(t)
        n_l.append(n)
        smi_l.append(smi)
        src_l.append(src)
    np.savez_compressed(
        out,
        positions=np.stack(pos_l),
        types=np.stack(typ_l),
        num_atoms=np.asarray(n_l, np.int16),
        smiles=np.asarray(smi_l),
        source=np.asarray(src_l),
        elements=np.asarray(ELEMENTS),
    )
    summary = {
        "candidates": len(cands),
        "kept": len(smi_l),
        "nci": src_l.count("nci"),
        "brics": src_l.count("brics"),
        "failed": failed,
        "max_atoms": max_atoms,
        "seconds": round(time.time() - t0, 1),
        "path": str(out),
    }
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--max-atoms", type=int, default=15)
    p.add_argument("--no-brics", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build(a.out, a.max_atoms, not a.no_brics, a.seed))


if __name__ == "__main__":
    main()
